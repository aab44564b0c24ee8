"""``train(config, workdir)``: the whole training run behind ``train.py`` (and the demo, and the tests).

Order (STYLE.md): mesh -> shapes (``jax.eval_shape``) -> shardings -> restore the latest checkpoint of the
workdir into them, or allocate fresh weights directly into them -> one AOT-compiled, donated train step ->
loop with logging, periodic evaluation (the same ``Evaluator`` as eval.py), checkpoints and the best weights.

Failure is loud: a non-finite loss or gradient norm raises ``NonFiniteError`` before anything is saved, so
the last checkpoint stays the last good one. SIGTERM finishes the current step, saves and returns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vpd_jax import parallel

log = logging.getLogger("vpd_jax.train")


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient norm."""


class ConfigError(ValueError):
    """A config value that cannot work (reported in one line by the entry points)."""


# ------------------------------------------------------------------------------------------------ builders
def model_config(cfg):
    """The ``VPDConfig`` of ``cfg.model``."""
    from vpd_jax.models.unet import UNetConfig
    from vpd_jax.models.vae import VAEConfig
    from vpd_jax.models.vpd import VPDConfig

    m = cfg.model
    common = dict(max_depth=float(m.max_depth), head_init=m.head_init, dtype=m.dtype, param_dtype=m.param_dtype,
                  remat=bool(m.remat), attention_impl=m.attention_impl or None)
    if m.size == "sd15":
        return VPDConfig(**common)
    if m.size == "tiny":
        return VPDConfig.tiny(**common)
    if m.size == "micro":
        # The demo's toy: SD's layout (4 UNet levels, VAE x8) with one resnet per level and one
        # cross-attention block down and up; compiles in ~1 min on 2 CPU cores.
        unet = UNetConfig(block_out_channels=(16, 32, 32, 32),
                          down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * 3,
                          up_block_types=("UpBlock2D",) * 3 + ("CrossAttnUpBlock2D",), mid_block_type=None,
                          layers_per_block=1, attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8)
        vae = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
                        mid_block_add_attention=False)
        return VPDConfig.tiny(unet=unet, vae=vae, neck_features=32, **common)
    raise ConfigError(f"model.size {m.size!r} is not one of 'sd15', 'tiny', 'micro'")


def build_schedule(cfg):
    from vpd_jax.training.schedules import make_schedule

    o = cfg.optimizer
    if o.schedule == "official":
        return make_schedule("official", max_lr=o.max_lr, min_lr=o.min_lr, iters_per_epoch=o.iters_per_epoch,
                             epochs=o.epochs)
    if o.schedule == "mmseg":
        return make_schedule("mmseg", base_lr=o.max_lr, warmup_start_factor=o.warmup_start_factor,
                             warmup_end=o.warmup_steps, decay_end=o.decay_steps, eta_min_ratio=o.min_lr / o.max_lr)
    if o.schedule == "constant":
        return make_schedule("constant", value=o.max_lr)
    raise ConfigError(f"optimizer.schedule {o.schedule!r} is not one of 'official', 'mmseg', 'constant'")


def build_optimizer(cfg):
    """``(tx, schedule, rules)``."""
    from vpd_jax.training.optimizer import ParamRules, adamw

    o = cfg.optimizer
    rules = ParamRules(lr_multipliers=((r"^unet(/|$)", float(o.unet_lr_mult)),), no_decay=o.no_decay)
    schedule = build_schedule(cfg)
    return adamw(schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, rules=rules), schedule, rules


def augment_config(cfg):
    from vpd_jax.data.augment import AugmentConfig

    presets = {"official_480": AugmentConfig.official_480, "mmseg_480": AugmentConfig.mmseg_480,
               "mmseg_512": AugmentConfig.mmseg_512, "none": AugmentConfig.none}
    if cfg.aug.preset not in presets:
        raise ConfigError(f"aug.preset {cfg.aug.preset!r} is not one of {sorted(presets)}")
    aug = presets[cfg.aug.preset]()
    crop = tuple(cfg.aug.crop_size) if cfg.aug.crop_size else None
    return dataclasses.replace(aug, crop_size=crop, max_depth=float(cfg.model.max_depth))


def class_table(cfg, abstract_constants) -> dict:
    """``constants`` (the class-embedding table): from ``cfg.class_embeddings`` (.npy) or zeros."""
    from vpd_jax.models.vpd import with_unknown_row

    shape = abstract_constants["class_embeddings"].shape
    if not cfg.class_embeddings:
        return {"class_embeddings": np.zeros(shape, np.float32)}
    if not os.path.isfile(cfg.class_embeddings):
        raise ConfigError(f"class_embeddings: no such file {cfg.class_embeddings}")
    table = with_unknown_row(np.load(cfg.class_embeddings), shape[0] - 1)
    if table.shape != tuple(shape):
        raise ConfigError(f"class_embeddings {cfg.class_embeddings}: table {table.shape}, model needs {shape}")
    return {"class_embeddings": table}


def check_config(cfg, num_devices: int) -> None:
    t = cfg.train
    if t.global_batch_size % (t.num_microbatches * t.group_size):
        raise ConfigError(f"train.global_batch_size {t.global_batch_size} is not a multiple of num_microbatches "
                          f"{t.num_microbatches} x group_size {t.group_size}")
    if t.global_batch_size % jax.process_count():
        raise ConfigError(f"train.global_batch_size {t.global_batch_size} does not split over "
                          f"{jax.process_count()} processes")
    micro = t.global_batch_size // t.num_microbatches
    if micro % num_devices:
        raise ConfigError(f"micro-batch {micro} (global_batch_size / num_microbatches) does not split over "
                          f"{num_devices} devices")
    if t.loss not in ("official", "mmseg"):
        raise ConfigError(f"train.loss {t.loss!r} is not 'official' or 'mmseg'")
    if t.state_layout not in ("default", "auto"):
        raise ConfigError(f"train.state_layout {t.state_layout!r} is not 'default' or 'auto'")


def make_loss_fn(model, cfg, constants):
    from vpd_jax.training.losses import silog_loss

    kind, lambd = cfg.train.loss, float(cfg.train.silog_lambda)

    def loss_fn(params, batch_stats, batch, rng):
        del rng  # no dropout anywhere in VPD (spec §8.1.11)
        pred, updates = model.apply({"params": params, "batch_stats": batch_stats, "constants": constants},
                                    batch["image"], batch["class_id"], train=True, mutable=["batch_stats"])
        loss = silog_loss(pred, batch["depth"], kind, lambd=lambd)
        return loss, (updates["batch_stats"], {})

    return loss_fn


def abstract_train_state(abstract_vars, tx, mesh):
    """``(abstract TrainState, shardings)`` from abstract variables, without allocating anything."""
    from vpd_jax.training.step import TrainState

    def _init(params, batch_stats):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                          opt_state=tx.init(params), rng=jnp.zeros((2,), jnp.uint32))

    abstract = jax.eval_shape(_init, abstract_vars["params"], abstract_vars.get("batch_stats", {}))
    shardings = parallel.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def initial_variables(cfg, model) -> dict:
    from vpd_jax.training import initialize

    variables = initialize.random_variables(model, cfg.seed, cfg.model.init)
    if cfg.pretrained:
        log.info("loading Stable Diffusion weights from %s", cfg.pretrained)
        variables = initialize.with_pretrained(variables, model, cfg.pretrained)
    return variables


def _flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        f = float(ca.get("flops", 0.0))
        return f if f > 0 else None
    except Exception:  # noqa: BLE001 - some backends have no cost analysis
        return None


def _json_metrics(m: dict) -> dict:
    return {k: float(v) for k, v in m.items()}


# ------------------------------------------------------------------------------------------------ train
def train(cfg, workdir: str) -> dict:
    """Trains ``cfg`` in ``workdir`` (resuming from its latest checkpoint). Returns a summary dict."""
    from vpd_jax.data.loader import make_eval_loader, make_train_loader
    from vpd_jax.evaluation.evaluator import EvalSettings, Evaluator, format_table, save_picture, picture_grid, write_json
    from vpd_jax.models.vpd import VPDDepth, abstract_variables
    from vpd_jax.training import step as S
    from vpd_jax.training.checkpoint import Checkpointer
    from vpd_jax.training.logging import MetricWriter, Throughput, fmt_duration, step_line
    from vpd_jax.training.optimizer import trainable_mask

    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    writer = MetricWriter(workdir, enabled=is_main)
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json(indent=2))

    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    check_config(cfg, mesh.size)
    writer.console(f"mesh {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} devices, "
                   f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''}")
    total = int(cfg.train.total_steps)
    model = VPDDepth(model_config(cfg))
    tx, schedule, rules = build_optimizer(cfg)
    settings = EvalSettings.from_config(cfg.eval)  # validates eval fields before any long work

    # Data first: a missing dataset fails in one line before any compilation.
    aug = augment_config(cfg)
    loader = make_train_loader(cfg.data_dir, dataset=cfg.dataset, split=cfg.train_split,
                               global_batch_size=cfg.train.global_batch_size, seed=cfg.seed, aug=aug,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               worker_count=cfg.worker_count, class_rule=cfg.class_rule)
    eval_loader = make_eval_loader(cfg.data_dir, dataset=cfg.dataset, split=cfg.test_split,
                                   batch_size=cfg.eval.batch_size, process_index=jax.process_index(),
                                   process_count=jax.process_count(), class_rule=cfg.class_rule)

    # Shapes -> shardings -> restore or allocate.
    abstract_vars = abstract_variables(model)
    abstract_state, shardings = abstract_train_state(abstract_vars, tx, mesh)
    ckpt = Checkpointer(workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    best_rmse = math.inf
    t0 = time.perf_counter()
    if ckpt.latest_step() is not None:
        start = ckpt.latest_step()
        state, constants, data_state, meta = ckpt.restore(abstract_state, abstract_vars["constants"], start)
        constants = jax.tree.map(np.asarray, constants)
        if data_state is not None:
            loader.set_state(_for_this_process(data_state))
        best = ckpt.best_meta()
        if best and "rmse" in best.get("metrics", {}):
            best_rmse = float(best["metrics"]["rmse"])
        writer.console(f"resumed from {ckpt.latest.directory}/{start} in {time.perf_counter() - t0:.1f}s")
    else:
        variables = initial_variables(cfg, model)
        constants = class_table(cfg, abstract_vars["constants"])
        state, _ = S.create_train_state_from_variables(variables, tx, mesh, int(cfg.seed))
        del variables
        writer.console(f"initialised {sum(x.size for x in jax.tree.leaves(state.params)):,} parameters "
                       f"({cfg.model.size}{', pretrained ' + cfg.pretrained if cfg.pretrained else ', random'}) "
                       f"in {time.perf_counter() - t0:.1f}s")

    step_fn = S.make_train_step(make_loss_fn(model, cfg, constants), tx, mesh, shardings,
                                num_microbatches=cfg.train.num_microbatches, group_size=cfg.train.group_size,
                                schedule=schedule, trainable=trainable_mask(abstract_vars["params"], rules),
                                bn_reduce=cfg.train.bn_reduce, state_layout=cfg.train.state_layout)
    per_host = cfg.train.global_batch_size // jax.process_count()
    first = next(loader)
    batch_abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((cfg.train.global_batch_size, *np.shape(x)[1:]), np.asarray(x).dtype,
                                       sharding=parallel.batch_sharding(mesh)), first)
    compiled, compile_s = S.compile_step(step_fn, abstract_state, batch_abstract)
    if cfg.train.state_layout == "auto":  # the layouts XLA chose (e.g. cuDNN's OHWI conv kernels on GPUs)
        state = S.place_state(compiled, state)
    flops = _flops(compiled)
    writer.console(f"compiled the train step in {compile_s:.1f}s"
                   + (f" ({flops / 1e12:.3f} TFLOP per step)" if flops else ""))
    writer.scalars(int(jax.device_get(state.step)), {"compile_seconds": compile_s})

    evaluator = Evaluator(model, settings, mesh)
    throughput = Throughput(cfg.train.global_batch_size, flops, mesh.size, cfg.peak_flops_per_device, total)

    stop = {"signal": None}
    old_handler = None
    if _main_thread():
        def on_term(signum, frame):
            stop["signal"] = signum
        old_handler = signal.signal(signal.SIGTERM, on_term)

    def variables_of(st):
        return {"params": st.params, "batch_stats": st.batch_stats, "constants": constants}

    def run_eval(st, step):
        nonlocal best_rmse
        res = evaluator.evaluate(variables_of(st), eval_loader, desc=f"eval@{step}")
        m = res["metrics"]
        writer.console(f"eval at step {step} on {res['num_images']} images ({res['seconds']:.1f}s)\n"
                       + format_table({f"step {step}": m}))
        writer.scalars(step, m, prefix="test/")
        if is_main:
            write_json(os.path.join(workdir, "eval", f"step_{step}.json"),
                       {"step": step, "metrics": m, "num_images": res["num_images"]})
            if res["pictures"]:
                save_picture(os.path.join(workdir, "pictures", f"step_{step}.png"), res["pictures"])
                writer.image(step, "test/image_gt_prediction", picture_grid(res["pictures"]))
        if m["rmse"] < best_rmse:
            best_rmse = m["rmse"]
            ckpt.save_best(st, constants, {"step": step, "metrics": m, "config": cfg.to_dict()})
        return m

    step = int(jax.device_get(state.step))
    throughput.reset(step)
    pending = first
    last_metrics: dict = {}
    status = "finished"
    try:
        while step < total:
            batch = pending if pending is not None else next(loader)
            pending = None
            state, metrics = compiled(state, parallel.shard_batch(batch, mesh))
            step += 1
            do_log = step % cfg.log_every_steps == 0 or step == total
            do_ckpt = (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or step == total
            do_eval = (cfg.eval.every_steps and step % cfg.eval.every_steps == 0) or step == total
            stopping = stop["signal"] is not None
            if do_log or do_ckpt or do_eval or stopping:
                m = _json_metrics(jax.device_get(metrics))
                if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                    ckpt.wait()
                    last = ckpt.latest_step()
                    where = (f"the last good checkpoint is step {last} in {ckpt.latest.directory}" if last is not None
                             else "no checkpoint was written")
                    raise NonFiniteError(
                        f"non-finite training at step {step}: loss={m['loss']}, grad_norm={m['grad_norm']}; "
                        f"stopped without saving; {where}. Lower optimizer.max_lr or check the data.")
                last_metrics = m
            if do_log:
                m = {**last_metrics, **throughput.measure(step)}
                writer.console(step_line(step, total, m))
                writer.scalars(step, m, prefix="train/")
            if do_eval:
                run_eval(state, step)
                throughput.reset(step)
            if do_ckpt or stopping:
                ckpt.save(state, constants, loader.get_state(),
                          {"step": step, "metrics": last_metrics, "config": cfg.to_dict()}, force=True)
            if stopping:
                status = f"stopped by signal {stop['signal']} at step {step}"
                writer.console(f"{status}; checkpoint saved")
                break
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        if hasattr(loader, "close"):
            loader.close()
    writer.console(f"{status}: {step}/{total} steps in {fmt_duration(time.perf_counter() - t0)}")
    return {"status": status, "step": step, "train": last_metrics, "best_rmse": best_rmse,
            "compile_seconds": compile_s, "flops_per_step": flops}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _for_this_process(data_state: bytes) -> bytes:
    """Process 0's saved loader state adapted to this process: the stream position is the same on every host
    (equal shards, same batch), only the fingerprint's host index differs."""
    if jax.process_index() == 0:
        return data_state
    d = json.loads(data_state)
    d.setdefault("fingerprint", {})["process_index"] = jax.process_index()
    return json.dumps(d).encode()
