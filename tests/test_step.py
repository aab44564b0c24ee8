"""Train state, sharding rules and the train step: groups, accumulation, and 8 simulated devices."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import step_multidevice_check as toy
from jax.sharding import PartitionSpec as P

from vpd_jax import parallel
from vpd_jax.training import optimizer as O
from vpd_jax.training import step

HERE = pathlib.Path(__file__).resolve().parent


def test_fsdp_spec_rules():
    big = 1 << 20
    assert parallel.fsdp_spec((3, 3, 1280, 1280), 8, big) == P(None, None, None, parallel.FSDP)  # tie -> last
    assert parallel.fsdp_spec((3, 3, 2560, 1280), 8, big) == P(None, None, parallel.FSDP, None)
    assert parallel.fsdp_spec((1280, 1000), 8, 1000) == P(parallel.FSDP, None)  # 1000 % 8 == 0 too, 1280 larger
    assert parallel.fsdp_spec((512, 512), 8, big) == P()  # below the size threshold
    assert parallel.fsdp_spec((1001, 1003), 8, 10) == P()  # nothing divisible
    assert parallel.fsdp_spec((4096, 4096), 1, 10) == P()  # no fsdp axis


def test_make_mesh_one_device():
    mesh = parallel.make_mesh(-1, 1, jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError):
        parallel.make_mesh(2, 1, jax.devices()[:1])


def test_initialize_distributed_is_a_noop_for_one_process(monkeypatch):
    for k in ("VPD_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    assert parallel.initialize_distributed() is False
    assert parallel.initialize_distributed("localhost:1234", num_processes=1, process_id=0) is False
    with pytest.raises(ValueError):
        parallel.initialize_distributed("localhost:1234")


@pytest.fixture(scope="module")
def mesh1():
    return parallel.make_mesh(1, 1, jax.devices()[:1])


def _run(mesh, **kw):
    # Threefry partitionable random ops compile slowly on CPU; the toy's results don't depend on it.
    with jax.threefry_partitionable(False):
        return toy.run(mesh, **kw)


def test_state_layout(mesh1):
    tx = O.adamw(1e-3)
    with jax.threefry_partitionable(False):
        state, shardings = step.create_train_state(toy.init_fn, tx, mesh1, 0)
    assert int(state.step) == 0 and state.rng.dtype == jnp.uint32
    assert set(state.params) == {"vae", "unet", "bn", "head"}
    assert set(state.batch_stats["bn"]) == {"mean", "var"}
    # The frozen VAE has no optimizer state: mu/nu cover only the trainable leaves.
    n_trainable = sum(x.size for k, v in state.params.items() if k != "vae" for x in jax.tree.leaves(v))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0) == 2 * n_trainable
    assert all(s.mesh is mesh1 for s in jax.tree.leaves(shardings))


def test_auto_state_layout_trains_like_the_default(mesh1):
    """``state_layout="auto"``: compiled for abstract state, the state moved once into the chosen layouts, and
    then the same training (on a CPU the chosen layouts are the default ones; on GPUs they differ)."""
    with jax.threefry_partitionable(False):
        ref_params = toy.run(mesh1, steps=2)[0]
        tx = O.adamw(toy.schedules.mmseg_schedule(base_lr=1e-2, warmup_end=4, decay_end=8))
        state, shardings = step.create_train_state(toy.init_fn, tx, mesh1, 0, fsdp_min_size=toy.FSDP_MIN_SIZE)
        fn = step.make_train_step(toy.loss_fn, tx, mesh1, shardings, group_size=2,
                                  trainable=O.trainable_mask(state.params), state_layout="auto")
        batches = [parallel.shard_batch(toy.make_batch(16, seed=i), mesh1) for i in range(2)]
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        with pytest.raises(ValueError, match="AUTO"):  # the auto layouts are really asked for
            fn(state, batches[0])
        compiled, _ = step.compile_step(fn, abstract, batches[0])
        state = step.place_state(compiled, state)
        for b in batches:
            state, _ = compiled(state, b)
    assert toy.max_abs_diff(jax.device_get(state.params), ref_params) == 0.0
    with pytest.raises(ValueError, match="state_layout"):
        step.make_train_step(toy.loss_fn, tx, mesh1, shardings, state_layout="nhwc")


def test_state_in_non_default_layouts_checkpoints_and_restores(mesh1, tmp_path):
    """On GPUs ``state_layout="auto"`` leaves state arrays in layouts that are not row-major (conv kernels in cuDNN's
    OHWI order), and train.py checkpoints them as they are. Forced here on the CPU (every array of rank >= 2
    column-major): orbax writes the logical values, and they restore into the default layouts unchanged."""
    from jax.experimental.layout import Format, Layout

    from vpd_jax.training.checkpoint import Checkpointer

    with jax.threefry_partitionable(False):
        state, shardings = step.create_train_state(toy.init_fn, O.adamw(1e-3), mesh1, 0)

    def column_major(x):
        if x.ndim < 2:
            return x
        return jax.device_put(x, Format(Layout(major_to_minor=tuple(range(x.ndim))), x.sharding))

    moved = jax.tree.map(column_major, state)
    kernels = [x for x in jax.tree.leaves(moved) if x.ndim >= 2]
    assert kernels and all(x.format.layout.major_to_minor == tuple(range(x.ndim)) for x in kernels)
    ckpt = Checkpointer(str(tmp_path), keep=1, async_save=False)
    ckpt.save(moved, {"table": np.zeros((2, 3), np.float32)}, None, {"step": 0}, force=True)
    ckpt.wait()
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    restored, _, _, _ = ckpt.restore(abstract, {"table": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
    ckpt.close()
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_accumulation_4x2_equals_one_batch_of_8(mesh1):
    full = _run(mesh1, num_microbatches=1, group_size=2, batch_size=8)
    accum = _run(mesh1, num_microbatches=4, group_size=2, batch_size=8)
    np.testing.assert_allclose(accum[2][-1]["loss"], full[2][-1]["loss"], rtol=1e-6)
    assert toy.max_abs_diff(accum[0], full[0]) < 1e-5
    assert toy.max_abs_diff(accum[1], full[1]) < 1e-5
    assert set(full[2][0]) == {"loss", "grad_norm", "lr", "pred_mean"}
    assert float(full[2][0]["lr"]) == pytest.approx(1e-2 * 0.03)  # mmseg warm-up start, step 0
    assert int(full[3].step) == 2


def test_groups_are_the_reference_per_gpu_batches(mesh1):
    """Loss = mean over groups of loss_fn on consecutive images, each with its own statistics and rng."""
    tx = O.adamw(1e-3)
    with jax.threefry_partitionable(False):
        state, shardings = step.create_train_state(toy.init_fn, tx, mesh1, 0)
        batch = toy.make_batch(8)
        expected, stats = [], []
        key = jax.random.fold_in(state.rng, 0)
        for k in range(4):
            group = jax.tree.map(lambda x: x[2 * k : 2 * k + 2], batch)
            loss, (bs, _) = jax.jit(toy.loss_fn)(state.params, state.batch_stats, group, jax.random.fold_in(key, k))
            expected.append(float(loss))
            stats.append(bs)
        train_step = step.make_train_step(toy.loss_fn, tx, mesh1, shardings, group_size=2, donate=False)
        _, metrics = train_step(state, batch)
        first_step = step.make_train_step(toy.loss_fn, tx, mesh1, shardings, group_size=2, bn_reduce="first")
        new_state, _ = first_step(state, batch)
    assert float(metrics["loss"]) == pytest.approx(np.mean(expected), rel=1e-6)
    np.testing.assert_allclose(new_state.batch_stats["bn"]["mean"], stats[0]["bn"]["mean"], rtol=1e-6)


def test_sharded_step_equals_single_device_on_8_cpu_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    env.pop("JAX_PLATFORMS", None)
    out = subprocess.run(
        [sys.executable, str(HERE / "step_multidevice_check.py")], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"] and set(result["max_abs_diff"]) == {"8x1", "2x4", "1x8", "2x4_accum4"}


def test_two_processes_on_localhost_match_one_device():
    """jax.distributed over 2 local processes (2 CPU devices each), a 2x2 mesh spanning both."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    env.pop("JAX_PLATFORMS", None)
    cmd = [sys.executable, str(HERE / "multihost_check.py"), f"localhost:{port}"]
    procs = [subprocess.Popen([*cmd, str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
        assert json.loads(out.strip().splitlines()[-1])["ok"]


def test_state_from_given_variables(mesh1):
    tx = O.adamw(1e-3)
    with jax.threefry_partitionable(False):
        variables = jax.device_get(jax.jit(toy.init_fn)(jax.random.PRNGKey(3)))
        state, shardings = step.create_train_state_from_variables(variables, tx, mesh1, 7)
    assert toy.max_abs_diff(state.params, variables["params"]) == 0
    assert toy.max_abs_diff(state.batch_stats, variables["batch_stats"]) == 0
    assert int(state.step) == 0 and jax.tree.structure(state) == jax.tree.structure(shardings)
