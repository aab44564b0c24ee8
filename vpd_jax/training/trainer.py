"""``train(config, workdir)``: the whole training run behind ``train.py`` (and the demo, and the tests).

Order: mesh -> shapes (``jax.eval_shape``) -> shardings -> restore the latest checkpoint of the
workdir into them, or allocate fresh weights directly into them -> one AOT-compiled, donated train step ->
loop with logging, periodic evaluation (the same ``Evaluator`` as eval.py), checkpoints and the best weights.

Failure is loud: a non-finite loss or gradient norm raises ``NonFiniteError`` before anything is saved, so
the last checkpoint stays the last good one. SIGTERM finishes the current step, saves and returns.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
import traceback

import jax
import numpy as np

from vpd_jax import build, files, parallel
from vpd_jax.data.segmentation import ADE20K_CLASSES
from vpd_jax.errors import CheckpointError, ConfigError, NonFiniteError
from vpd_jax.evaluation.evaluator import EvalSettings, Evaluator, format_table, picture_grid
from vpd_jax.evaluation.seg_evaluator import SegEvalSettings, SegEvaluator, format_summary
from vpd_jax.evaluation.seg_evaluator import picture_grid as seg_picture_grid
from vpd_jax.scenes import NYU_CLASSES
from vpd_jax.training import checkpoint as C
from vpd_jax.training import step as S
from vpd_jax.training.logging import MetricWriter, Throughput, fmt_duration, step_line
from vpd_jax.training.optimizer import learning_rates
from vpd_jax.visualize import save_png
from vpd_jax.weights.loader import CLASSES_FILE, failure_cause

log = logging.getLogger("vpd_jax.train")


def _json_metrics(m: dict) -> dict:
    return {k: float(v) for k, v in m.items()}


# ------------------------------------------------------------------------------------------------ train
def train(cfg, workdir: str) -> dict:
    """Trains ``cfg`` in ``workdir`` (resuming from its latest checkpoint). Returns a summary dict."""
    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0

    def say(text: str) -> None:
        if is_main:
            print(text, flush=True)

    build.validate(cfg)  # every bad field in one line, before anything is built or read
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir}: exists and is not a folder")
    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    build.check_config(cfg, mesh.size)
    say(f"mesh {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process{'es' if jax.process_count() > 1 else ''}")
    total = int(cfg.train.total_steps)
    setup = build.train_setup(cfg, mesh)  # model, optimizer, shapes and shardings: nothing allocated
    model, schedule, rules, abstract_vars = setup.model, setup.schedule, setup.rules, setup.abstract_vars
    seg = build.is_segmentation(cfg)
    # validates eval fields before any long work
    settings = SegEvalSettings.from_config(cfg.eval) if seg else EvalSettings.from_config(cfg.eval)
    best_name, higher = ("mIoU", True) if seg else ("rmse", False)

    # Data first: a missing dataset fails in one line before any compilation.
    loader = build.train_loader(cfg)
    eval_loader = build.eval_loader(cfg)
    build.check_crop_fits(cfg, build.train_image_shape(cfg))

    # Restore or allocate into the shardings. Nothing is written to the workdir before this succeeds.
    abstract_state = setup.abstract_state
    best_value = -math.inf if higher else math.inf
    t0 = time.perf_counter()
    restored = C.restore_newest_intact(workdir, abstract_state, abstract_vars["constants"], say=say)
    start = restored[0] if restored else None
    if restored:
        state, constants, data_state, meta = restored[1]
        constants = jax.tree.map(np.asarray, constants)
        if data_state is not None:
            loader.set_state(_for_this_process(data_state))
        best = C.best_meta(workdir)
        if best and best_name in best.get("metrics", {}):
            best_value = float(best["metrics"][best_name])
        say(f"resumed from {workdir}/{C.CHECKPOINTS}/{start} in {time.perf_counter() - t0:.1f}s"
            + (f" (init_from {cfg.init_from} only seeds a new run; ignored)" if cfg.init_from else ""))
    else:
        variables, constants, notes = build.initial_variables(cfg, model, abstract_vars)
        state, _ = S.create_train_state_from_variables(variables, setup.tx, mesh, int(cfg.seed))
        del variables
        say(f"initialised {sum(x.size for x in jax.tree.leaves(state.params)):,} parameters ({cfg.model.size}) in "
            f"{time.perf_counter() - t0:.1f}s")
        for note in notes:
            say(f"  {note}")
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        cfg.model.num_classes = model.config.num_classes  # resolved, so the workdir's config rebuilds this model
        files.write_text(os.path.join(workdir, "config.json"), cfg.to_json(indent=2))
        if seg:
            files.write_json(os.path.join(workdir, CLASSES_FILE),
                             {"classes": build.class_names(cfg) or list(ADE20K_CLASSES)})
        else:
            rule = build.class_rule(cfg)
            files.write_json(os.path.join(workdir, CLASSES_FILE), {
                "classes": build.class_names(cfg) or list(NYU_CLASSES), "class_rule": rule.rule,
                "scene_rows": dict(rule.rows), "scene_default": rule.default})
    writer = MetricWriter(workdir, enabled=is_main, resume_step=start)
    ckpt = C.Checkpointer(workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)

    step_fn = build.train_step(cfg, setup, mesh, constants)
    first = next(loader)
    batch_abstract = build.abstract_batch(cfg, mesh, first)
    compiled, compile_s = S.compile_step(step_fn, abstract_state, batch_abstract)
    if cfg.train.state_layout == "auto":  # the layouts XLA chose (e.g. cuDNN's OHWI conv kernels on GPUs)
        state = S.place_state(compiled, state)
    flops = S.step_flops(compiled)
    writer.console(f"compiled the train step in {compile_s:.1f}s"
                   + (f" ({flops / 1e12:.3f} TFLOP per step)" if flops else ""))
    writer.scalars(int(jax.device_get(state.step)), {"compile_seconds": compile_s}, kind="compile")

    evaluator = SegEvaluator(model, settings) if seg else Evaluator(model, settings, mesh)
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
        nonlocal best_value
        res = evaluator.evaluate(variables_of(st), eval_loader, desc=f"eval@{step}")
        m = res["metrics"]
        table = format_summary(m) if seg else format_table({f"step {step}": m})
        writer.console(f"eval at step {step} on {res['num_images']} images ({res['seconds']:.1f}s)\n{table}")
        writer.scalars(step, m, prefix="test/", kind="eval")
        if is_main:
            record = {"step": step, "metrics": m, "num_images": res["num_images"]}
            if seg:
                record["IoU"] = [None if math.isnan(v) else float(v) for v in res["IoU"]]
            files.write_json(os.path.join(workdir, "eval", f"step_{step}.json"), record)
            if res["pictures"]:
                grid = (seg_picture_grid(res["pictures"], model.config.num_classes) if seg
                        else picture_grid(res["pictures"]))
                save_png(os.path.join(workdir, "pictures", f"step_{step}.png"), grid)
                writer.image(step, "test/image_gt_prediction", grid)
        if (m[best_name] > best_value) if higher else (m[best_name] < best_value):
            best_value = m[best_name]
            saving(step, "the best weights", lambda: ckpt.save_best(
                st, constants, {"step": step, "metrics": m, "config": cfg.to_dict()}))
        return m

    def saving(step, what, fn):
        """Run a save (or a wait for one); a failure (a full disk, a permission, a quota) is one CheckpointError
        naming the checkpoint, the cause and where to resume from; the traceback goes to workdir/errors.log."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - orbax and the OS raise many types; the cause is kept
            raise _save_failed(workdir, step, what, e) from e

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
                group_lrs = {k: float(v) for k, v in learning_rates(schedule, step - 1, rules).items()
                             if k not in ("lr", "lr_x1")}
                m = {**last_metrics, **group_lrs, **throughput.measure(step)}
                writer.console(step_line(step, total, m))
                writer.scalars(step, m, prefix="train/")
            if do_eval:
                run_eval(state, step)
                throughput.reset(step)
            if do_ckpt or stopping:
                saving(step, f"checkpoint {step}", lambda: ckpt.save(
                    state, constants, loader.get_state(),
                    {"step": step, "metrics": last_metrics, "config": cfg.to_dict()}, force=True))
            if stopping:
                saving(step, f"checkpoint {step}", ckpt.wait)
                status = f"stopped by {signal.Signals(stop['signal']).name} at step {step}"
                writer.console(f"{status}; checkpoint saved")
                break
        saving(step, f"checkpoint {step}", ckpt.wait)  # an asynchronous save's failure surfaces here
    finally:
        with contextlib.suppress(Exception):  # already failing: the first error is the one to report
            ckpt.wait()
        ckpt.close()
        writer.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        if hasattr(loader, "close"):
            loader.close()
    evaluated = (f"best test {best_name} {best_value:.4f}" if math.isfinite(best_value) else "no evaluation yet")
    writer.console(f"{status}: {step}/{total} steps in {fmt_duration(time.perf_counter() - t0)}; {evaluated}")
    return {"status": status, "step": step, "train": last_metrics, f"best_{best_name.lower()}": best_value,
            "compile_seconds": compile_s, "flops_per_step": flops}


ERRORS_LOG = "errors.log"


def _save_failed(workdir: str, step: int, what: str, e: BaseException) -> CheckpointError:
    """The one-line error of a failed save; the full traceback is appended to ``workdir/errors.log``."""
    log_path = os.path.join(workdir, ERRORS_LOG)
    with contextlib.suppress(OSError):  # the disk may be full: the log is a courtesy
        with open(log_path, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} writing {what}\n")
            traceback.print_exception(e, file=f)
    last = C.latest_step(workdir)
    resume = (f"the newest intact checkpoint is step {last} ({os.path.join(workdir, C.CHECKPOINTS, str(last))}): "
              "free the space (or fix the permission) and rerun the same command to resume from it"
              if last is not None else "no checkpoint was written yet")
    return CheckpointError(f"writing {what} under {workdir} failed: {failure_cause(e)}; {resume} "
                           f"(traceback in {log_path})")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _for_this_process(data_state: bytes) -> bytes:
    """Process 0's saved loader state adapted to this process: the stream position is the same on every host
    (equal shards, same batch), only the fingerprint's host index differs."""
    if jax.process_index() == 0:
        return data_state
    d = json.loads(data_state)
    d.setdefault("fingerprint", {})["process_index"] = jax.process_index()
    return json.dumps(d).encode()
