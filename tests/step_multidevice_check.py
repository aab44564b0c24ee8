"""A toy conv+BatchNorm depth model for the train-step tests, and the multi-device comparison.

Run as a script (by tests/test_step.py, in a subprocess with 8 simulated CPU devices):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/step_multidevice_check.py
It prints one JSON line {"max_abs_diff": {config: float}} comparing each sharded configuration with the
single-device step, and exits non-zero on any mismatch.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vpd_jax import parallel
from vpd_jax.training import optimizer as O
from vpd_jax.training import schedules, step
from vpd_jax.training.losses import silog_loss

IMAGE = (8, 8, 3)
FSDP_MIN_SIZE = 32  # small, so the toy kernels really get sharded over fsdp


class ToyDepth(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), name="vae")(x)  # frozen by the default rules
        x = nn.Conv(8, (3, 3), name="unet")(x)  # lr x0.01
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        x = nn.relu(x)
        x = nn.Conv(1, (3, 3), name="head")(x)
        return nn.sigmoid(x[..., 0]) * 10.0


MODEL = ToyDepth()


def init_fn(rng):
    return MODEL.init(rng, jnp.zeros((1, *IMAGE)), train=False)


def loss_fn(params, batch_stats, batch, rng):
    # The rng perturbs the input so that the per-group rng folding is part of what the tests compare.
    # A cheap function of the key rather than jax.random.normal, whose compile is slow on CPU.
    phase = jnp.sum(jax.random.key_data(rng).astype(jnp.float32) % 9973.0)
    noise = 1.0 + 0.05 * jnp.sin(phase + jnp.arange(batch["image"].size, dtype=jnp.float32)).reshape(
        batch["image"].shape)
    pred, updates = MODEL.apply(
        {"params": params, "batch_stats": batch_stats}, batch["image"] * noise, train=True, mutable=["batch_stats"]
    )
    loss = silog_loss(pred, batch["depth"], kind="official")
    return loss, (updates["batch_stats"], {"pred_mean": jnp.mean(pred)})


def make_batch(n, seed=0):
    rng = np.random.default_rng(seed)
    depth = rng.uniform(0.5, 9.0, (n, *IMAGE[:2])).astype(np.float32)
    depth[:, :2, :2] = 0.0  # invalid pixels
    image = rng.normal(size=(n, *IMAGE)).astype(np.float32) + depth[..., None] / 5
    return {"image": image, "depth": depth}


def run(mesh, *, num_microbatches=1, group_size=2, steps=2, batch_size=16, bn_reduce="mean"):
    """Trains ``steps`` steps from the same init; returns host copies of params, batch_stats, metrics."""
    sched = schedules.mmseg_schedule(base_lr=1e-2, warmup_end=4, decay_end=8)
    tx = O.adamw(sched)
    state, shardings = step.create_train_state(init_fn, tx, mesh, 0, fsdp_min_size=FSDP_MIN_SIZE)
    train_step = step.make_train_step(
        loss_fn, tx, mesh, shardings, num_microbatches=num_microbatches, group_size=group_size, schedule=sched,
        trainable=O.trainable_mask(state.params), bn_reduce=bn_reduce,
    )
    metrics = []
    for i in range(steps):
        batch = make_batch(batch_size, seed=i)
        if mesh.is_multi_process:  # each process feeds only its own rows, in process order
            per = batch_size // jax.process_count()
            batch = jax.tree.map(lambda x: x[jax.process_index() * per : (jax.process_index() + 1) * per], batch)
        batch = parallel.shard_batch(batch, mesh)
        state, m = train_step(state, batch)
        metrics.append(jax.device_get(m))
    return jax.device_get(state.params), jax.device_get(state.batch_stats), metrics, state, shardings


def max_abs_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def main():
    root = pathlib.Path(__file__).resolve().parents[1]
    jax.config.update("jax_compilation_cache_dir", os.environ.get("VPD_JAX_CACHE", str(root / ".jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # Partitionable threefry compiles ~15 s slower per random op on CPU (jax 0.10); the values differ but
    # stay sharding-independent either way, which is all this comparison needs.
    jax.config.update("jax_threefry_partitionable", False)
    devices = jax.devices()
    assert len(devices) == 8, devices

    ref = run(parallel.make_mesh(1, 1, devices[:1]))
    configs = {
        "8x1": dict(data=8, fsdp=1),
        "2x4": dict(data=2, fsdp=4),
        "1x8": dict(data=1, fsdp=8),
        "2x4_accum4": dict(data=2, fsdp=4, num_microbatches=4),
    }
    diffs, ok = {}, True
    for name, cfg in configs.items():
        mesh = parallel.make_mesh(cfg.pop("data"), cfg.pop("fsdp"))
        params, bstats, metrics, state, shardings = run(mesh, **cfg)
        if name == "1x8":  # the FSDP rule must really have sharded something
            specs = [s.spec for s in jax.tree.leaves(shardings.params)]
            ok &= any(parallel.FSDP in tuple(sp) for sp in specs)
            ok &= any(len(s.device_set) == 8 and not s.is_fully_replicated
                      for s in jax.tree.leaves(shardings.opt_state))
        d = max(
            max_abs_diff(params, ref[0]),
            max_abs_diff(bstats, ref[1]),
            max(abs(m["loss"] - r["loss"]) for m, r in zip(metrics, ref[2])),
            max(abs(m["grad_norm"] - r["grad_norm"]) for m, r in zip(metrics, ref[2])),
        )
        diffs[name] = d
        ok &= d < 2e-5
    print(json.dumps({"max_abs_diff": diffs, "ok": bool(ok)}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    main()
