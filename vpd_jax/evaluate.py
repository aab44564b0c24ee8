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
from vpd_jax.errors import ConfigError
from vpd_jax.evaluation.evaluator import EvalSettings, Evaluator, format_table
from vpd_jax.files import write_json
from vpd_jax.models.vpd import VPDDepth, abstract_variables
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
            variables = {**variables, "constants": build.class_table(cfg, abstract_variables(model)["constants"])}
        return model, variables, checkpoint
    config = build.model_config(cfg)
    variables, step, notes = restore_workdir_variables(workdir, config, which, origin="--config's model")
    return VPDDepth(config), variables, describe_restore(workdir, which, step, notes)


def evaluate_main(cfg, *, workdir: str | None = None, which: str = "best", checkpoint: str | None = None,
                  save_predictions: str | None = None, output: str | None = None, progress: bool = True) -> dict:
    """Everything ``eval.py`` does; returns ``{"metrics", "num_images", ...}`` and writes the JSON."""
    build.validate(cfg)
    settings = EvalSettings.from_config(cfg.eval)
    loader = build.eval_loader(cfg)
    model, variables, source = load_for_eval(cfg, workdir=workdir, which=which, checkpoint=checkpoint)
    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    variables = jax.device_put(variables, parallel.replicated(mesh)) if not mesh.is_multi_process else variables
    ev = Evaluator(model, settings, mesh)
    res = ev.evaluate(variables, loader, save_predictions=save_predictions, progress=progress)
    m = res["metrics"]
    if jax.process_index() == 0:
        print(f"{source}: {res['num_images']} images of {cfg.dataset}/{cfg.test_split}, TTA {settings.tta}"
              f"{' + flip' if settings.flip else ''}, {res['seconds']:.1f}s")
        print(format_table({"test": m}), flush=True)
        if output is None:
            output = os.path.join(workdir, f"eval_{which}.json") if workdir else "eval.json"
        write_json(output, {"source": source, "dataset": cfg.dataset, "split": cfg.test_split,
                            "num_images": res["num_images"], "tta": settings.tta, "flip": settings.flip,
                            "metrics": m})
        print(f"wrote {output}" + (f" and {res['num_images']} PNGs to {save_predictions}" if save_predictions else ""))
    res["source"] = source
    return res
