"""One door to a trained VPD, depth or segmentation: ``load_model(source)`` for every kind of source, one named
result (``.task`` says which network, ``VPDDepth`` or ``VPDSeg``).

Sources:

* the official VPD segmentation ``.pth`` (the key names tell it apart);
* an official or mmseg PyTorch depth file (``.pth``/``.ckpt``/``.safetensors``), converted on the fly
  (``torch.load(weights_only=True)``; ``vpd_checkpoint.convert_file``);
* a folder written by ``python -m vpd_jax.tools.convert`` (``config.json`` + ``variables/``);
* a ``train.py`` workdir: its best-by-RMSE weights (default), or its newest checkpoint with ``which="latest"``
  or the suffix ``:latest`` (``:best`` also works). Only the parameters, the batch statistics and the class table
  are read (an orbax partial restore), never the optimizer state;
* any other folder holding a converted checkpoint (``best/``, ``export/``, ``final/`` or numbered step folders).

The result holds host numpy arrays; ``overrides`` replace ``VPDConfig`` fields that do not change the weights
(``dtype``, ``attention_impl``, ``remat``, ``max_depth``, ...).

``load_seg_model(source)`` reads segmentation sources only (the released ``.pth`` or a converted folder), with the
conversion's skip report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from vpd_jax.data.segmentation import ADE20K_CLASSES
from vpd_jax.models.vpd import VPDConfig, VPDDepth, abstract_variables
from vpd_jax.models.vpd_seg import VPDSeg, VPDSegConfig
from vpd_jax.models.vpd_seg import abstract_variables as seg_abstract_variables
from vpd_jax.scenes import NUM_CLASSES, NYU_CLASSES
from vpd_jax.weights import vpd_checkpoint as vc
from vpd_jax.weights import vpd_seg_checkpoint as vsc
from vpd_jax.weights.common import WeightsError, orbax

# The layout of a train.py workdir (written by vpd_jax.training.checkpoint).
WORKDIR_CONFIG = "config.json"
CLASSES_FILE = "classes.json"  # {"classes": the table's row names, "class_rule", "scene_rows", "scene_default"}
CHECKPOINTS = "checkpoints"  # <step>/{state, constants, data, meta}: the full train state, the last K
BEST = "best"  # <step>/{model, meta}: params, batch_stats and constants of the best test RMSE
STATE_ITEMS = ("state", "constants", "data", "meta")
BEST_ITEMS = ("model", "meta")
WHICH = ("best", "latest")
PYTORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: ``model.apply(variables, images, ...)``.

    ``crop``: the square training crop if the source records it (None: the released models' 480 applies);
    ``class_rule``: the filename-to-class rule the weights were trained with ("official"/"mmseg") if known;
    ``kind``: "pytorch", "converted" or "workdir"; ``step``: the training step of a workdir checkpoint.
    """

    model: VPDDepth
    variables: dict[str, Any]
    config: VPDConfig
    crop: int | None
    class_rule: str | None
    description: str
    kind: str
    step: int | None = None
    class_names: list[str] | None = None  # the class table's row names (None: unknown)

    @property
    def task(self) -> str:
        return "segmentation" if isinstance(self.model, VPDSeg) else "depth"

    def __post_init__(self):
        if self.class_names is None and self.task == "depth" and self.config.num_classes == NUM_CLASSES:
            self.class_names = list(NYU_CLASSES)  # the released models' table, in the official order

    @property
    def class_embeddings(self) -> np.ndarray:
        return np.asarray(self.variables["constants"]["class_embeddings"])


def split_source(source: str | os.PathLike) -> tuple[pathlib.Path, str | None]:
    """``"DIR:latest"`` -> (DIR, "latest"); a plain path -> (path, None). A path that exists as written wins."""
    s = os.fspath(source)
    p = pathlib.Path(s).expanduser()
    if not p.exists():
        for which in WHICH:
            if s.endswith(":" + which):
                return pathlib.Path(s[: -len(which) - 1]).expanduser(), which
    return p, None


def is_training_workdir(path: str | os.PathLike) -> bool:
    """A ``train.py`` workdir: its training config as JSON and orbax checkpoints under ``best/`` or
    ``checkpoints/`` (not converted checkpoints placed in a folder)."""
    p = pathlib.Path(path)
    try:
        cfg = json.loads((p / WORKDIR_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    if not (isinstance(cfg, dict) and "model" in cfg and "train" in cfg):
        return False
    return any((p / d).is_dir() and not vc.is_converted_dir(p / d) for d in (BEST, CHECKPOINTS))


def workdir_config(workdir: str | os.PathLike) -> dict[str, Any]:
    """The training config a workdir was run with (its ``config.json``) as a plain dict."""
    path = pathlib.Path(workdir) / WORKDIR_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable training config ({e})") from None
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise WeightsError(f"{path}: not a train.py config (no 'model' section)")
    return cfg


def workdir_model_config(cfg: Mapping[str, Any]):
    """The ``VPDConfig`` (or ``VPDSegConfig``, task "segmentation") a workdir's training config describes; the
    class count is the resolved one ``train.py`` writes there."""
    if cfg.get("task", "depth") == "segmentation":
        return VPDSegConfig.from_training(cfg["model"], int(cfg["model"].get("num_classes") or 150))
    return VPDConfig.from_training(cfg["model"])


def workdir_class_names(workdir: str | os.PathLike, num_classes: int) -> list[str] | None:
    """The class names a workdir's table rows stand for (its ``classes.json``), if recorded and consistent."""
    try:
        names = json.loads((pathlib.Path(workdir) / CLASSES_FILE).read_text()).get("classes")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return names
    return None


def config_crop(cfg: Mapping[str, Any]) -> int | None:
    """The square training crop of a training config (``aug.crop_size``), if it has one."""
    try:
        size = cfg["aug"]["crop_size"]
        return int(size[0] if isinstance(size, (list, tuple)) else size)
    except (KeyError, TypeError, IndexError, ValueError):
        return None


def checkpoint_steps(root: str | os.PathLike) -> list[int]:
    """The finished checkpoints of an orbax manager folder, oldest first (orbax's temporary folders excluded)."""
    p = pathlib.Path(root)
    if not p.is_dir():
        return []
    return sorted(int(d.name) for d in p.iterdir() if d.is_dir() and d.name.isdigit())


def stored_shapes(item: str | os.PathLike, prefixes: tuple[str, ...] = ()) -> list[tuple[int, ...]]:
    """The sorted array shapes an orbax PyTree item holds (those whose names start with ``prefixes``), from its
    metadata alone. Raises whatever orbax raises when the metadata cannot be read (a damaged checkpoint)."""
    ocp = orbax()

    # orbax reads OCDBT checkpoints from absolute paths only (a relative one fails as unreadable metadata).
    meta = ocp.PyTreeCheckpointer().metadata(pathlib.Path(item).absolute())
    meta = getattr(meta, "item_metadata", meta)  # orbax 0.12: StepMetadata -> the tree's metadata
    meta = getattr(meta, "tree", meta)
    if not isinstance(meta, Mapping):
        raise ValueError(f"{item}: no readable tree metadata")
    flat = []

    def walk(node, path):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, (*path, str(k)))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, (*path, str(i)))
        elif node is not None:
            flat.append((".".join(path), tuple(getattr(node, "shape", ()))))

    walk(meta, ())
    return sorted(shape for name, shape in flat if not prefixes or name.startswith(prefixes))


def abstract_shapes(tree) -> list[tuple[int, ...]]:
    """The sorted shapes of a tree's leaves (arrays or ShapeDtypeStructs)."""
    import jax

    return sorted(tuple(x.shape) for x in jax.tree.leaves(tree))


def failure_cause(e: BaseException, limit: int = 240) -> str:
    """The innermost cause of an exception chain, in one line (what a damaged file's read actually said)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = " ".join(str(e).split()) or type(e).__name__
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _host_restore_args(tree):
    ocp = orbax()

    return {k: _host_restore_args(v) if isinstance(v, Mapping) else ocp.RestoreArgs(restore_type=np.ndarray)
            for k, v in tree.items()}


def restore_workdir_variables(workdir: str | os.PathLike, config: VPDConfig, which: str = "best",
                              origin: str | None = None) -> tuple[dict[str, Any], int, list[str]]:
    """``(variables, step, notes)`` of a workdir's best weights or newest intact checkpoint, as host numpy arrays.

    Only ``params``, ``batch_stats`` and ``constants`` are read; the optimizer state stays on disk. Weights whose
    shapes are not the model's are one error (``origin`` names where ``config`` came from; default: the
    workdir's own config.json). A checkpoint that has the right shapes but cannot be read is damaged: ``latest``
    then falls back to the next older one and says so in ``notes``; nothing in the workdir is changed.
    """
    ocp = orbax()

    if which not in WHICH:
        raise WeightsError(f"which={which!r} is not one of {WHICH}")
    wd = pathlib.Path(workdir)
    abstract = (seg_abstract_variables(VPDSeg(config)) if isinstance(config, VPDSegConfig)
                else abstract_variables(VPDDepth(config)))
    if which == "best":
        root, item_name, keys = wd / BEST, "model", ("params", "batch_stats", "constants")
        steps = checkpoint_steps(root)
        if not steps:
            raise WeightsError(f"{root}: no best checkpoint (training never evaluated?); use the latest "
                               "checkpoint instead (WORKDIR:latest, or eval.py --which=latest)")
        steps = steps[-1:]  # one best is kept
    else:
        root, item_name, keys = wd / CHECKPOINTS, "state", ("params", "batch_stats")
        steps = checkpoint_steps(root)
        if not steps:
            raise WeightsError(f"{root}: no checkpoint")
    target = {k: abstract[k] for k in keys}
    want = abstract_shapes({k: abstract[k] for k in ("params", "batch_stats")})
    notes: list[str] = []
    ckptr = ocp.PyTreeCheckpointer()
    for step in reversed(steps):
        item = root / str(step) / item_name
        at = item.absolute()  # orbax reads OCDBT checkpoints from absolute paths only
        try:
            stored = stored_shapes(item, ("params.", "batch_stats."))
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint raises anything
            notes.append(f"{item.parent} is damaged ({failure_cause(e)})")
            continue
        if stored != want:
            raise WeightsError(f"{item}: does not fit the model of {origin or wd / WORKDIR_CONFIG} "
                               f"({len(stored)} stored arrays, the model has {len(want)}, shapes differ)")
        try:
            out = ckptr.restore(at, args=ocp.args.PyTreeRestore(
                item=target, restore_args=_host_restore_args(target), partial_restore=True))
            if which == "latest":
                const_target = {"class_embeddings": abstract["constants"]["class_embeddings"]}
                out = {**out, "constants": ckptr.restore(
                    at.parent / "constants", args=ocp.args.PyTreeRestore(
                        item=const_target, restore_args=_host_restore_args(const_target)))}
            variables = {k: _as_numpy(out[k]) for k in ("params", "batch_stats", "constants")}
            vc.check_shapes(abstract, variables, str(item))
        except WeightsError:
            raise
        except Exception as e:  # noqa: BLE001 - the shapes fit, so the files are damaged
            notes.append(f"{item.parent} is damaged ({failure_cause(e)})")
            continue
        return variables, step, notes
    tried = "; ".join(notes)
    hint = " (use eval.py --which=latest, or WORKDIR:latest)" if which == "best" else ""
    raise WeightsError(f"no intact {'best ' if which == 'best' else ''}checkpoint in {root}: {tried}{hint}")


def describe_restore(workdir, which: str, step: int, notes: list[str]) -> str:
    """``"WORKDIR (latest, step N)"``, with the damaged newer checkpoints that were passed over."""
    passed = f"; passed over: {'; '.join(notes)}" if notes else ""
    return f"{workdir} ({which}, step {step}{passed})"


def _as_numpy(tree):
    if isinstance(tree, Mapping):
        return {k: _as_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def find_converted(folder: pathlib.Path) -> pathlib.Path | None:
    """The converted checkpoint inside a folder: ``best/``, ``export/`` or ``final/`` if one is, else the
    highest-numbered step folder that is one (or holds one under ``model/``/``export/``); None if none."""
    for name in ("best", "export", "final"):
        if vc.is_converted_dir(folder / name):
            return folder / name
    steps = []
    for d in folder.glob("*"):
        if not d.name.isdigit():
            continue
        for cand in (d, d / "model", d / "export"):
            if vc.is_converted_dir(cand):
                steps.append((int(d.name), cand))
                break
    if steps:
        return max(steps)[1]
    return find_converted(folder / CHECKPOINTS) if (folder / CHECKPOINTS).is_dir() else None


def load_model(source: str | os.PathLike, *, which: str | None = None, config: VPDConfig | None = None,
               fmt: str = "auto", overrides: Mapping[str, Any] | None = None) -> LoadedModel:
    """The model of ``source`` (see the module docstring). ``config``/``fmt`` only apply to PyTorch files (an
    architecture other than SD-1.5's, the layout); ``which`` only to workdirs."""
    path, suffix_which = split_source(source)
    which = which or suffix_which
    if which is not None and which not in WHICH:
        raise WeightsError(f"which={which!r} is not one of {WHICH}")
    overrides = {k: v for k, v in dict(overrides or {}).items() if v is not None}

    def finish(loaded: LoadedModel) -> LoadedModel:
        if overrides:
            loaded.config = loaded.config.replace(**overrides)
            loaded.model = VPDSeg(loaded.config) if loaded.task == "segmentation" else VPDDepth(loaded.config)
        return loaded

    if path.is_file():
        state, _ = vc.read_checkpoint(path)  # read once; the keys tell the task
        if vsc.is_segmentation_state(state):
            return _as_loaded(load_seg_model(path, config=config if isinstance(config, VPDSegConfig) else None,
                                             overrides=overrides, state=state))
        conv = vc.convert_state_dict(state, config, fmt, what=str(path))
        return finish(LoadedModel(VPDDepth(conv.config), conv.variables, conv.config, None, conv.format,
                                  f"{path} ({conv.format} layout)", "pytorch"))
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise WeightsError(f"{path}: not a checkpoint file or folder")
    if vsc.is_segmentation_dir(path):
        return _as_loaded(load_seg_model(path, overrides=overrides))
    if vc.is_converted_dir(path):
        return finish(_load_converted(path))
    if is_training_workdir(path):
        cfg = workdir_config(path)
        try:
            config = workdir_model_config(cfg)
        except (ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{path / WORKDIR_CONFIG}: model section: {e}") from None
        which = which or ("best" if checkpoint_steps(path / BEST) else "latest")
        variables, step, notes = restore_workdir_variables(path, config, which)
        model = VPDSeg(config) if isinstance(config, VPDSegConfig) else VPDDepth(config)
        return finish(LoadedModel(model, variables, config, config_crop(cfg), cfg.get("class_rule"),
                                  describe_restore(path, which, step, notes), "workdir", step,
                                  workdir_class_names(path, config.num_classes)))
    found = find_converted(path)
    if found is None:
        raise WeightsError(f"{path}: neither a converted VPD checkpoint (config.json + variables/), a train.py "
                           "workdir, nor a folder holding a converted checkpoint")
    loaded = _load_converted(found)
    if loaded.crop is None and (path / WORKDIR_CONFIG).is_file():
        try:
            loaded.crop = config_crop(json.loads((path / WORKDIR_CONFIG).read_text()))
        except (OSError, ValueError):
            pass
    return finish(loaded)


def _load_converted(path: pathlib.Path) -> LoadedModel:
    meta = vc.read_converted_meta(path)
    variables, config = vc.load_converted(path)
    crop = meta.get("crop") or meta.get("source", {}).get("crop")
    rule = meta.get("source", {}).get("class_rule")
    return LoadedModel(VPDDepth(config), variables, config, int(crop) if crop else None, rule, str(path),
                       "converted")


# ------------------------------------------------------------------------------------------- segmentation

@dataclasses.dataclass
class LoadedSegModel:
    """A segmentation network ready to run: ``model.apply(variables, images)`` -> logits (B, H, W, classes).

    ``crop``: the square training crop if the source records it; ``kind``: "pytorch" or "converted";
    ``class_names``: the table's row names (ADE20K's 150 in the official order for a 150-row table, else None).
    """

    model: VPDSeg
    variables: dict[str, Any]
    config: VPDSegConfig
    crop: int | None
    description: str
    kind: str
    skipped: dict[str, str] | None = None  # key -> reason, for a PyTorch source
    class_names: list[str] | None = None

    def __post_init__(self):
        if self.class_names is None and self.config.num_classes == len(ADE20K_CLASSES):
            self.class_names = list(ADE20K_CLASSES)

    @property
    def class_embeddings(self) -> np.ndarray:
        return np.asarray(self.variables["constants"]["class_embeddings"])


def _as_loaded(seg: LoadedSegModel) -> LoadedModel:
    """A segmentation model in ``load_model``'s result type (``task == "segmentation"``)."""
    return LoadedModel(seg.model, seg.variables, seg.config, seg.crop, None, seg.description, seg.kind,
                       class_names=seg.class_names)


def load_seg_model(source: str | os.PathLike, *, config: VPDSegConfig | None = None, heads: Any = None,
                   overrides: Mapping[str, Any] | None = None, state: Mapping[str, Any] | None = None
                   ) -> LoadedSegModel:
    """The ``VPDSeg`` of ``source``: the official segmentation ``.pth`` (``config``/``heads`` for an architecture
    other than SD-1.5's) or a converted folder. ``overrides`` replace ``VPDSegConfig`` fields that do not change
    the weights (``dtype``, ``attention_impl``, ``remat``, ...)."""
    path = pathlib.Path(os.fspath(source)).expanduser()
    overrides = {k: v for k, v in dict(overrides or {}).items() if v is not None}
    if path.is_file():
        conv = (vsc.convert_state_dict(state, config, what=str(path), heads=heads) if state is not None
                else vsc.convert_file(path, config, heads=heads))
        loaded = LoadedSegModel(VPDSeg(conv.config), conv.variables, conv.config, None,
                                f"{path} (official segmentation layout)", "pytorch", conv.skipped)
    elif not path.exists():
        raise WeightsError(f"{path}: no such file or folder")
    elif vc.is_converted_dir(path):
        if not vsc.is_segmentation_dir(path):
            raise WeightsError(f"{path}: a converted depth checkpoint; load it with vpd_jax.weights.loader.load_model")
        meta = vc.read_converted_meta(path)
        variables, cfg = vsc.load_converted(path)
        crop = meta.get("crop")
        loaded = LoadedSegModel(VPDSeg(cfg), variables, cfg, int(crop) if crop else None, str(path), "converted")
    else:
        raise WeightsError(f"{path}: neither a VPD segmentation checkpoint file nor a converted folder "
                           "(config.json + variables/)")
    if overrides:
        loaded.config = loaded.config.replace(**overrides)
        loaded.model = VPDSeg(loaded.config)
    return loaded
