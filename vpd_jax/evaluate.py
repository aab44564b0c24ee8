"""The job behind ``eval.py``: a config and a model source in, the test-split metrics table and JSON out.

The model comes through the one loader (``vpd_jax.weights.loader``): a training workdir's best weights or its
latest checkpoint (parameters, batch statistics and class table only, never the optimizer state), a folder
written by ``vpd_jax.tools.convert``, or an official/mmseg PyTorch file. The evaluation itself is
``vpd_jax.evaluation.evaluator.Evaluator``, the same one training runs.
"""

from __future__ import annotations

import os

import jax

from vpd_jax import build, parallel
from vpd_jax.data.segmentation import ADE20K_CLASSES
from vpd_jax.errors import ConfigError
from vpd_jax.evaluation.evaluator import EvalSettings, Evaluator, format_table
from vpd_jax.evaluation.seg_evaluator import SegEvalSettings, SegEvaluator
from vpd_jax.evaluation.segmentation import format_class_table
from vpd_jax.files import write_json
from vpd_jax.models.vpd_seg import VPDSeg
from vpd_jax.weights.loader import describe_restore, load_model, restore_workdir_variables


def load_for_eval(cfg, *, workdir: str | None = None, which: str = "best", checkpoint: str | None = None):
    """``(model, variables, source description)``: a training workdir read into ``cfg``'s model, or a
    checkpoint file/folder with its own architecture (``cfg.model`` sets its dtype and attention)."""
    if (workdir is None) == (checkpoint is None):
        raise ConfigError("give exactly one of --workdir and --checkpoint")
    if checkpoint is not None:
        loaded = load_model(checkpoint, overrides={"dtype": cfg.model.dtype,
                                                   "attention_impl": cfg.model.attention_impl or None})
        model, variables = loaded.model, loaded.variables
        if cfg.class_embeddings:
            abstract = build.model_abstract_variables(model)
            variables = {**variables, "constants": build.class_table(cfg, abstract["constants"])}
        return model, variables, checkpoint
    model = build.build_model(cfg)
    variables, step, notes = restore_workdir_variables(workdir, model.config, which, origin="--config's model")
    return model, variables, describe_restore(workdir, which, step, notes)


def evaluate_main(cfg, *, workdir: str | None = None, which: str = "best", checkpoint: str | None = None,
                  save_predictions: str | None = None, output: str | None = None, progress: bool = True) -> dict:
    """Everything ``eval.py`` does; returns ``{"metrics", "num_images", ...}`` and writes the JSON."""
    build.validate(cfg)
    seg = build.is_segmentation(cfg)
    settings = SegEvalSettings.from_config(cfg.eval) if seg else EvalSettings.from_config(cfg.eval)
    loader = build.eval_loader(cfg)
    model, variables, source = load_for_eval(cfg, workdir=workdir, which=which, checkpoint=checkpoint)
    if isinstance(model, VPDSeg) != seg:
        raise ConfigError(f"{source}: a {'segmentation' if isinstance(model, VPDSeg) else 'depth'} model, but the "
                          f"config's task is {build.task(cfg)!r}")
    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    variables = jax.device_put(variables, parallel.replicated(mesh)) if not mesh.is_multi_process else variables
    ev = SegEvaluator(model, settings) if seg else Evaluator(model, settings, mesh)
    res = ev.evaluate(variables, loader, save_predictions=save_predictions, progress=progress)
    m = res["metrics"]
    if jax.process_index() == 0:
        if seg:
            how = (f"windows {settings.crop[0]}x{settings.crop[1]} stride {settings.stride[0]}, scales "
                   f"{', '.join(f'{r:g}' for r in settings.scales)}{' + flip' if settings.flip else ''}")
        else:
            how = f"TTA {settings.tta}{' + flip' if settings.flip else ''}"
        print(f"{source}: {res['num_images']} images of {cfg.dataset}/{cfg.test_split}, {how}, {res['seconds']:.1f}s")
        if seg:
            print(format_class_table({**res, **m}, build.class_names(cfg) or
                                     (list(ADE20K_CLASSES) if len(res["IoU"]) == len(ADE20K_CLASSES) else None)))
        else:
            print(format_table({"test": m}), flush=True)
        if output is None:
            output = os.path.join(workdir, f"eval_{which}.json") if workdir else "eval.json"
        record = {"source": source, "dataset": cfg.dataset, "split": cfg.test_split, "num_images": res["num_images"],
                  "metrics": m}
        if seg:
            record.update(windows=list(settings.crop), stride=list(settings.stride), scales=list(settings.scales),
                          flip=settings.flip, IoU=[None if v != v else float(v) for v in res["IoU"]])
        else:
            record.update(tta=settings.tta, flip=settings.flip)
        write_json(output, record)
        print(f"wrote {output}" + (f" and {res['num_images']} PNGs to {save_predictions}" if save_predictions else ""))
    res["source"] = source
    return res
