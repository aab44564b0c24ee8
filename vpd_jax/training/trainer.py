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
    from vpd_jax.models.vpd import VPDConfig

    try:
        return VPDConfig.from_training(cfg.model)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def build_schedule(cfg):
    from vpd_jax.training.schedules import make_schedule

    o = cfg.optimizer
    if o.schedule == "official":
        return make_schedule("official", max_lr=o.max_lr, min_lr=o.min_lr, iters_per_epoch=o.iters_per_epoch,
                             epochs=o.epochs)
    if o.schedule == "mmseg":
        return make_schedule("mmseg", base_lr=o.max_lr, warmup_start_factor=o.warmup_start_factor,
                             warmup_end=o.warmup_steps, decay_end=o.decay_steps, eta_min_ratio=o.eta_min_ratio)
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


def train_loader(cfg, process_index: int | None = None, process_count: int | None = None):
    """The training batch stream of ``cfg`` for this process (``jax.process_index()`` of ``process_count``)."""
    from vpd_jax.data.loader import make_train_loader

    return make_train_loader(cfg.data_dir, dataset=cfg.dataset, split=cfg.train_split,
                             global_batch_size=cfg.train.global_batch_size, seed=cfg.seed, aug=augment_config(cfg),
                             process_index=jax.process_index() if process_index is None else process_index,
                             process_count=jax.process_count() if process_count is None else process_count,
                             worker_count=cfg.worker_count, class_rule=cfg.class_rule)


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


def check_architecture(source, config, cfg) -> None:
    """``init_from``'s architecture must be the config's (``model.size``): else one error naming the differences."""
    src, want = source.architecture(), config.architecture()
    if src == want:
        return
    diff = [k for k in want if src[k] != want[k]]
    size = source.architecture_size()
    hint = f"; use --config.model.size={size}" if size else ""
    raise ConfigError(f"init_from {cfg.init_from}: its architecture ({size or 'no preset'}) is not model.size "
                      f"{cfg.model.size!r}'s (differs in {', '.join(diff)}){hint}")


def initial_variables(cfg, model, abstract_vars) -> tuple[dict, dict, list[str]]:
    """``(variables, constants, notes)`` a fresh run starts from, ``notes`` saying where they came from.

    ``init_from``: a whole trained VPD (every weight, the BatchNorm statistics and the class table; an explicit
    ``class_embeddings`` replaces its table). Otherwise the head, text adapter and gamma start random (the
    references' initialisation), the UNet and VAE from ``pretrained``, the class table from ``class_embeddings``.
    Missing SD weights or class table are an error unless ``allow_random_init`` (then said loudly).
    """
    from vpd_jax.training import initialize

    if cfg.init_from and (cfg.pretrained or cfg.pretrained_vae):
        raise ConfigError("give --config.init_from or --config.pretrained(_vae), not both: init_from brings its own "
                          "Stable Diffusion weights")
    if cfg.init_from:
        from vpd_jax.weights.loader import load_model

        # A PyTorch file is read into the run's architecture (group and head counts are not in its tensors).
        loaded = load_model(cfg.init_from, config=model.config.replace(dtype="float32", remat=False))
        check_architecture(loaded.config, model.config, cfg)
        variables = {"params": loaded.variables["params"], "batch_stats": loaded.variables["batch_stats"]}
        notes = [f"weights, BatchNorm statistics and class table from {loaded.description}"]
        constants = dict(loaded.variables["constants"])
        if cfg.class_embeddings:
            constants = class_table(cfg, abstract_vars["constants"])
            notes.append(f"class table replaced by {cfg.class_embeddings}")
        return variables, constants, notes
    missing = []
    if not cfg.pretrained:
        missing.append("--config.pretrained (Stable Diffusion weights)")
    if not cfg.class_embeddings:
        missing.append("--config.class_embeddings (the CLIP scene table)")
    if missing and not cfg.allow_random_init:
        raise ConfigError(f"{' and '.join(missing)} not given, nor --config.init_from (a trained VPD); "
                          "--config.allow_random_init=True trains without them, for experiments only")
    variables = initialize.random_variables(model, cfg.seed, cfg.model.init)
    notes = [f"head, text adapter and gamma: random ({cfg.model.init} init, the references' distributions)"]
    if cfg.pretrained:
        log.info("loading Stable Diffusion weights from %s", cfg.pretrained)
        variables = initialize.with_pretrained(variables, model, cfg.pretrained)
        notes.append(f"UNet and VAE from {cfg.pretrained}")
    if cfg.pretrained_vae:
        variables = initialize.with_pretrained_vae(variables, model, cfg.pretrained_vae)
        notes.append(f"VAE from {cfg.pretrained_vae}")
    if not cfg.pretrained:
        notes.append(f"WARNING: UNet{'' if cfg.pretrained_vae else ' and VAE'} random (no --config.pretrained; "
                     "allow_random_init)")
    if not cfg.class_embeddings:
        notes.append("WARNING: class table all zeros, every scene gets the same context (no "
                     "--config.class_embeddings; allow_random_init)")
    return variables, class_table(cfg, abstract_vars["constants"]), notes


def _flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        f = float(ca.get("flops", 0.0))
        return f if f > 0 else None
    except Exception:  # noqa: BLE001 - some backends have no cost analysis
        return None


def write_json_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file renamed over it)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _json_metrics(m: dict) -> dict:
    return {k: float(v) for k, v in m.items()}


# ------------------------------------------------------------------------------------------------ train
def train(cfg, workdir: str) -> dict:
    """Trains ``cfg`` in ``workdir`` (resuming from its latest checkpoint). Returns a summary dict."""
    from vpd_jax.data.loader import make_eval_loader
    from vpd_jax.evaluation.evaluator import EvalSettings, Evaluator, format_table, save_picture, picture_grid, write_json
    from vpd_jax.models.vpd import VPDDepth, abstract_variables
    from vpd_jax.training import checkpoint as C
    from vpd_jax.training import step as S
    from vpd_jax.training.checkpoint import Checkpointer
    from vpd_jax.training.logging import MetricWriter, Throughput, fmt_duration, step_line
    from vpd_jax.training.optimizer import learning_rates, trainable_mask

    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0

    def say(text: str) -> None:
        if is_main:
            print(text, flush=True)

    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir}: exists and is not a folder")
    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    check_config(cfg, mesh.size)
    say(f"mesh {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''}")
    total = int(cfg.train.total_steps)
    model = VPDDepth(model_config(cfg))
    tx, schedule, rules = build_optimizer(cfg)
    settings = EvalSettings.from_config(cfg.eval)  # validates eval fields before any long work

    # Data first: a missing dataset fails in one line before any compilation.
    loader = train_loader(cfg)
    eval_loader = make_eval_loader(cfg.data_dir, dataset=cfg.dataset, split=cfg.test_split,
                                   batch_size=cfg.eval.batch_size, process_index=jax.process_index(),
                                   process_count=jax.process_count(), class_rule=cfg.class_rule)

    # Shapes -> shardings -> restore or allocate. Nothing is written to the workdir before this succeeds.
    abstract_vars = abstract_variables(model)
    abstract_state, shardings = abstract_train_state(abstract_vars, tx, mesh)
    best_rmse = math.inf
    t0 = time.perf_counter()
    start = C.latest_step(workdir)
    if start is not None:
        state, constants, data_state, meta = C.restore_latest(workdir, abstract_state, abstract_vars["constants"],
                                                              start)
        constants = jax.tree.map(np.asarray, constants)
        if data_state is not None:
            loader.set_state(_for_this_process(data_state))
        best = C.best_meta(workdir)
        if best and "rmse" in best.get("metrics", {}):
            best_rmse = float(best["metrics"]["rmse"])
        say(f"resumed from {workdir}/{C.CHECKPOINTS}/{start} in {time.perf_counter() - t0:.1f}s"
            + (f" (init_from {cfg.init_from} only seeds a new run; ignored)" if cfg.init_from else ""))
    else:
        variables, constants, notes = initial_variables(cfg, model, abstract_vars)
        state, _ = S.create_train_state_from_variables(variables, tx, mesh, int(cfg.seed))
        del variables
        say(f"initialised {sum(x.size for x in jax.tree.leaves(state.params)):,} parameters ({cfg.model.size}) in "
            f"{time.perf_counter() - t0:.1f}s")
        for note in notes:
            say(f"  {note}")
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        write_json_text(os.path.join(workdir, "config.json"), cfg.to_json(indent=2))
    writer = MetricWriter(workdir, enabled=is_main, resume_step=start)
    ckpt = Checkpointer(workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)

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
    writer.scalars(int(jax.device_get(state.step)), {"compile_seconds": compile_s}, kind="compile")

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
        writer.scalars(step, m, prefix="test/", kind="eval")
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
            every = int(cfg.eval.every_steps)
            do_eval = every >= 0 and ((every and step % every == 0) or step == total)
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
                # the rate of each multiplier group for this update (the step's own "lr" is the base rate)
                group_lrs = {k: float(v) for k, v in learning_rates(schedule, step - 1, rules).items() if k not in ("lr", "lr_x1")}
                m = {**last_metrics, **group_lrs, **throughput.measure(step)}
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
