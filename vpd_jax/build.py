"""The one place a config becomes objects: model, variables, optimizer and schedule, data, loss and train step.

``train.py`` (through ``vpd_jax.training.trainer``), ``eval.py`` (through ``vpd_jax.evaluate``), the benchmarks and
the tests all build from a config here, so "the step as train.py builds it" holds by construction. A config
value that cannot work raises ``ConfigError`` (one line at the entry points).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vpd_jax import parallel, protocols, scenes
from vpd_jax.data import catalog
from vpd_jax.data.augment import AugmentConfig
from vpd_jax.data.loader import (
    ALL_CLASS_RULES,
    INPUT_CROPS,
    ClassRule,
    make_eval_loader,
    make_train_loader,
    open_source,
)
from vpd_jax.data.seg_augment import SegAugmentConfig
from vpd_jax.data.seg_loader import make_seg_eval_loader, make_seg_train_loader
from vpd_jax.data.segmentation import NUM_CLASSES as ADE20K_NUM_CLASSES
from vpd_jax.errors import ConfigError
from vpd_jax.models.seg_head import cross_entropy_loss
from vpd_jax.models.vpd import VPDConfig, VPDDepth, abstract_variables, with_unknown_row
from vpd_jax.models.vpd_seg import VPDSeg, VPDSegConfig
from vpd_jax.models.vpd_seg import abstract_variables as seg_abstract_variables
from vpd_jax.training import initialize
from vpd_jax.training import step as S
from vpd_jax.training.losses import silog_loss
from vpd_jax.training.optimizer import ParamRules, adamw, trainable_mask
from vpd_jax.training.schedules import make_schedule
from vpd_jax.training.step import TrainState
from vpd_jax.weights.common import load_class_table
from vpd_jax.weights.loader import load_model

log = logging.getLogger("vpd_jax.train")

TASKS = ("depth", "segmentation")


def task(cfg) -> str:
    """``cfg.task``: "depth" (``VPDDepth``, the default) or "segmentation" (``VPDSeg``)."""
    t = cfg.get("task", "depth")
    if t not in TASKS:
        raise ConfigError(f"task {t!r} is not one of {TASKS}")
    return t


def is_segmentation(cfg) -> bool:
    return task(cfg) == "segmentation"


def class_names(cfg) -> list[str] | None:
    """The row names of ``cfg.class_embeddings`` (its ``.classes.json``, as ``class_embeddings`` writes it); None
    without a table or a list (a table without one has NYU's 27 scene classes in the official order)."""
    if not cfg.class_embeddings:
        return None
    try:
        return scenes.read_class_list(cfg.class_embeddings)
    except ValueError as e:
        raise ConfigError(f"class_embeddings: {e}") from None


def num_classes(cfg) -> int:
    """``model.num_classes``, or (0) the length of the class table's class list, else NYU's 27 scene classes
    (depth) or ADE20K's 150 (segmentation)."""
    n = int(cfg.model.get("num_classes", 0) or 0)
    names = class_names(cfg)
    if n and names and n != len(names):
        raise ConfigError(f"model.num_classes={n}: the class table {cfg.class_embeddings} lists {len(names)} "
                          "classes; leave model.num_classes at 0 to take the table's")
    default = ADE20K_NUM_CLASSES if is_segmentation(cfg) else scenes.NUM_CLASSES
    return n or (len(names) if names else default)


def model_config(cfg):
    """The ``VPDConfig`` (depth) or ``VPDSegConfig`` (segmentation) of ``cfg.model``, its class count resolved by
    :func:`num_classes`."""
    m = cfg.model
    try:
        if is_segmentation(cfg):
            return VPDSegConfig.from_training(m, num_classes(cfg))
        return VPDConfig.from_training({**m.to_dict(), "num_classes": num_classes(cfg)})
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def _read_scene_map(path: str) -> dict[str, str]:
    if not os.path.isfile(path):
        raise ConfigError(f"scene_map: no such file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"scene_map {path}: not readable JSON ({e})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
        raise ConfigError(f"scene_map {path}: expected a JSON object of scene name -> class name (\"*\": the rest)")
    return obj


def class_rule(cfg) -> ClassRule:
    """How each example finds its class-table row (``cfg.class_rule``; see ``vpd_jax.data.loader.ClassRule``).

    ``"scene"`` maps the dataset's scene names (KITTI drives, a folder dataset's scenes) to the table's classes,
    through ``cfg.scene_map`` when given (``{"scene": "class", "*": "class for the rest"}``), comparing names as
    ``scenes.name_key`` does. Every scene the dataset recorded must reach a row (or ``"*"`` catch it): else one
    error naming them.
    """
    rule = cfg.class_rule
    if rule not in ALL_CLASS_RULES:
        raise ConfigError(f"class_rule {rule!r} is not one of {ALL_CLASS_RULES}")
    if rule != "scene":
        if cfg.get("scene_map"):
            raise ConfigError(f"scene_map is set but class_rule is {rule!r}; scene_map applies to class_rule 'scene'")
        return ClassRule(rule)
    names = class_names(cfg)
    if names is None:
        if cfg.class_embeddings or num_classes(cfg) != scenes.NUM_CLASSES:
            raise ConfigError(f"class_rule 'scene' needs the class table's class list "
                              f"({scenes.class_list_path(cfg.class_embeddings or 'TABLE.npy')}, written by "
                              "python -m vpd_jax.tools.class_embeddings)")
        names = list(scenes.NYU_CLASSES)
    row_of = {scenes.name_key(n): i for i, n in enumerate(names)}
    mapping = _read_scene_map(cfg.scene_map) if cfg.get("scene_map") else {}
    default = -1
    if "*" in mapping:
        if scenes.name_key(mapping["*"]) not in row_of:
            raise ConfigError(f"scene_map {cfg.scene_map}: \"*\" -> {mapping['*']!r} is not a class of the table "
                              f"({', '.join(names)})")
        default = row_of[scenes.name_key(mapping["*"])]
    bad_targets = sorted({v for k, v in mapping.items() if k != "*" and scenes.name_key(v) not in row_of})
    if bad_targets:
        raise ConfigError(f"scene_map {cfg.scene_map}: {', '.join(map(repr, bad_targets))} not among the table's "
                          f"classes ({', '.join(names)})")
    recorded = catalog.dataset_scenes(cfg.data_dir, cfg.dataset) or {}
    seen = sorted({s for split in (cfg.train_split, cfg.test_split) for s in recorded.get(split, {})})
    rows, missing = {}, []
    for scene in sorted(set(seen) | {k for k in mapping if k != "*"}):
        target = mapping.get(scene, scene)
        row = row_of.get(scenes.name_key(target))
        if row is not None:
            rows[scene] = row
        elif scene in seen and "*" not in mapping:
            missing.append(scene or "(no scene)")
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ConfigError(f"class_rule 'scene': {len(missing)} scene(s) of {cfg.dataset} have no class in the table "
                          f"({', '.join(names)}): {shown}; map them with --config.scene_map=FILE.json "
                          "({\"scene\": \"class\", \"*\": \"class for the rest\"})")
    return ClassRule("scene", tuple(sorted(rows.items())), default)


def build_schedule(cfg):
    o = cfg.optimizer
    if o.schedule == "official":
        return make_schedule("official", max_lr=o.max_lr, min_lr=o.min_lr, iters_per_epoch=o.iters_per_epoch,
                             epochs=o.epochs)
    if o.schedule == "mmseg":
        return make_schedule("mmseg", base_lr=o.max_lr, warmup_start_factor=o.warmup_start_factor,
                             warmup_end=o.warmup_steps, decay_end=o.decay_steps, eta_min_ratio=o.eta_min_ratio)
    if o.schedule == "mmcv_poly":
        return make_schedule("mmcv_poly", base_lr=o.max_lr, total_steps=cfg.train.total_steps,
                             power=float(o.get("power", 1.0)), min_lr=float(o.min_lr), warmup_steps=o.warmup_steps,
                             warmup_ratio=float(o.get("warmup_ratio", 1e-6)))
    if o.schedule == "constant":
        return make_schedule("constant", value=o.max_lr)
    raise ConfigError(f"optimizer.schedule {o.schedule!r} is not one of 'official', 'mmseg', 'mmcv_poly', "
                      "'constant'")


def build_optimizer(cfg):
    """``(tx, schedule, rules)``."""
    o = cfg.optimizer
    rules = ParamRules(lr_multipliers=((r"^unet(/|$)", float(o.unet_lr_mult)),), no_decay=o.no_decay)
    schedule = build_schedule(cfg)
    return adamw(schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, rules=rules), schedule, rules


def seg_augment_config(cfg) -> SegAugmentConfig:
    presets = {"ade_512": SegAugmentConfig.ade_512, "none": SegAugmentConfig.none}
    if cfg.aug.preset not in presets:
        raise ConfigError(f"aug.preset {cfg.aug.preset!r} is not one of {sorted(presets)} (segmentation)")
    aug = presets[cfg.aug.preset]()
    crop = tuple(cfg.aug.crop_size) if cfg.aug.crop_size else None
    kw = {"crop_size": crop}
    if cfg.aug.get("resize_scale"):
        kw["scale"] = tuple(cfg.aug.resize_scale)
    return dataclasses.replace(aug, **kw)


def augment_config(cfg):
    if is_segmentation(cfg):
        return seg_augment_config(cfg)
    presets = {"official_480": AugmentConfig.official_480, "mmseg_480": AugmentConfig.mmseg_480,
               "mmseg_512": AugmentConfig.mmseg_512, "none": AugmentConfig.none}
    if cfg.aug.preset not in presets:
        raise ConfigError(f"aug.preset {cfg.aug.preset!r} is not one of {sorted(presets)}")
    aug = presets[cfg.aug.preset]()
    crop = tuple(cfg.aug.crop_size) if cfg.aug.crop_size else None
    return dataclasses.replace(aug, crop_size=crop, max_depth=float(cfg.model.max_depth),
                               cutdepth_units=float(cfg.aug.get("cutdepth_units", aug.cutdepth_units)))


def input_crop(cfg) -> str:
    crop = cfg.get("input_crop", "none")
    if crop not in INPUT_CROPS:
        raise ConfigError(f"input_crop {crop!r} is not one of {INPUT_CROPS}")
    return crop


def train_loader(cfg, process_index: int | None = None, process_count: int | None = None):
    """The training batch stream of ``cfg`` for this process (``jax.process_index()`` of ``process_count``)."""
    if is_segmentation(cfg):
        return make_seg_train_loader(
            cfg.data_dir, dataset=cfg.dataset, split=cfg.train_split, global_batch_size=cfg.train.global_batch_size,
            seed=cfg.seed, aug=seg_augment_config(cfg),
            process_index=jax.process_index() if process_index is None else process_index,
            process_count=jax.process_count() if process_count is None else process_count,
            worker_count=cfg.worker_count)
    return make_train_loader(cfg.data_dir, dataset=cfg.dataset, split=cfg.train_split,
                             global_batch_size=cfg.train.global_batch_size, seed=cfg.seed, aug=augment_config(cfg),
                             process_index=jax.process_index() if process_index is None else process_index,
                             process_count=jax.process_count() if process_count is None else process_count,
                             worker_count=cfg.worker_count, class_rule=class_rule(cfg), input_crop=input_crop(cfg))


def class_table(cfg, abstract_constants) -> dict:
    """``constants`` (the class-embedding table): from ``cfg.class_embeddings`` (.npy) or zeros."""
    shape = abstract_constants["class_embeddings"].shape
    if not cfg.class_embeddings:
        return {"class_embeddings": np.zeros(shape, np.float32)}
    if not os.path.isfile(cfg.class_embeddings):
        raise ConfigError(f"class_embeddings: no such file {cfg.class_embeddings}")
    try:
        if is_segmentation(cfg):  # every class is a context token: no mean row
            table = np.asarray(load_class_table(cfg.class_embeddings), np.float32)
        else:
            table = with_unknown_row(load_class_table(cfg.class_embeddings), shape[0] - 1)
    except (OSError, ValueError) as e:
        raise ConfigError(f"class_embeddings {cfg.class_embeddings}: {e}") from None
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
    if is_segmentation(cfg):
        avg_non_ignore = bool(cfg.train.get("avg_non_ignore", False))

        def seg_loss_fn(params, batch_stats, batch, rng):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats, "constants": constants},
                                          batch["image"], train=True, valid_hw=batch["image_hw"],
                                          mutable=["batch_stats"], rngs={"dropout": rng})
            loss = cross_entropy_loss(logits, batch["label"], avg_non_ignore=avg_non_ignore)
            return loss, (updates["batch_stats"], {})

        return seg_loss_fn
    kind, lambd = cfg.train.loss, float(cfg.train.silog_lambda)

    def loss_fn(params, batch_stats, batch, rng):
        del rng  # no dropout anywhere in VPD
        pred, updates = model.apply({"params": params, "batch_stats": batch_stats, "constants": constants},
                                    batch["image"], batch["class_id"], train=True, mutable=["batch_stats"])
        loss = silog_loss(pred, batch["depth"], kind, lambd=lambd)
        return loss, (updates["batch_stats"], {})

    return loss_fn


def abstract_train_state(abstract_vars, tx, mesh):
    """``(abstract TrainState, shardings)`` from abstract variables, without allocating anything."""
    def _init(params, batch_stats):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                          opt_state=tx.init(params), rng=jnp.zeros((2,), jnp.uint32))

    abstract = jax.eval_shape(_init, abstract_vars["params"], abstract_vars.get("batch_stats", {}))
    shardings = parallel.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def check_architecture(source, config, cfg) -> None:
    """``init_from``'s architecture must be the config's (``model.size``): else one error naming the differences.
    The class count may differ when ``class_embeddings`` replaces the source's table."""
    src, want = source.architecture(), config.architecture()
    if cfg.class_embeddings:
        src.pop("num_classes")
        want.pop("num_classes")
    if src == want:
        return
    if [k for k in want if src[k] != want[k]] == ["num_classes"]:
        raise ConfigError(f"init_from {cfg.init_from}: it has {source.num_classes} scene classes, the run "
                          f"{config.num_classes}; give its class table as --config.class_embeddings, or a new one")
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
    if cfg.init_from and (cfg.pretrained or cfg.pretrained_vae):
        raise ConfigError("give --config.init_from or --config.pretrained(_vae), not both: init_from brings its own "
                          "Stable Diffusion weights")
    if cfg.init_from:
        # A PyTorch file is read into the run's architecture (group and head counts are not in its tensors).
        loaded = load_model(cfg.init_from, config=None if is_segmentation(cfg) else
                            model.config.replace(dtype="float32", remat=False))
        if isinstance(loaded.model, VPDSeg) != is_segmentation(cfg):
            kind = "segmentation" if isinstance(loaded.model, VPDSeg) else "depth"
            raise ConfigError(f"init_from {cfg.init_from}: a {kind} model, but the config's task is {task(cfg)!r}")
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
        missing.append("--config.class_embeddings (the CLIP " + ("class" if is_segmentation(cfg) else "scene")
                       + " table)")
    if missing and not cfg.allow_random_init:
        raise ConfigError(f"{' and '.join(missing)} not given, nor --config.init_from (a trained VPD); "
                          "--config.allow_random_init=True trains without them, for experiments only")
    if is_segmentation(cfg):  # mmseg's initialisers live in the head's modules
        variables = initialize.flax_init(model, cfg.seed)
        notes = ["head, text adapter and gamma: random (module initialisers: mmseg's FPN/FPNHead, PyTorch Linear)"]
    else:
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


def build_model(cfg):
    """The ``VPDDepth`` (or, for segmentation, ``VPDSeg``) of ``cfg.model``."""
    config = model_config(cfg)
    return VPDSeg(config) if is_segmentation(cfg) else VPDDepth(config)


def model_abstract_variables(model) -> dict:
    """Shapes and dtypes of a ``VPDDepth``'s or ``VPDSeg``'s variables."""
    return seg_abstract_variables(model) if isinstance(model, VPDSeg) else abstract_variables(model)


def eval_loader(cfg, batch_size: int | None = None):
    """The test-split batches of ``cfg`` for this process."""
    if is_segmentation(cfg):
        return make_seg_eval_loader(cfg.data_dir, dataset=cfg.dataset, split=cfg.test_split, batch_size=1,
                                    process_index=jax.process_index(), process_count=jax.process_count(),
                                    scale=tuple(cfg.eval.seg_scale) if cfg.eval.get("seg_scale") else None)
    return make_eval_loader(cfg.data_dir, dataset=cfg.dataset, split=cfg.test_split,
                            batch_size=int(batch_size or cfg.eval.batch_size), process_index=jax.process_index(),
                            process_count=jax.process_count(), class_rule=class_rule(cfg),
                            input_crop=input_crop(cfg))


@dataclasses.dataclass
class TrainSetup:
    """Everything about a run's train step that needs no weights: its shapes, shardings and optimizer."""

    model: VPDDepth
    tx: Any
    schedule: Any
    rules: ParamRules
    abstract_vars: dict
    abstract_state: Any
    shardings: Any


def train_setup(cfg, mesh) -> TrainSetup:
    """The model, optimizer and abstract (sharded) train state of ``cfg`` on ``mesh``; nothing allocated."""
    model = build_model(cfg)
    tx, schedule, rules = build_optimizer(cfg)
    abstract_vars = model_abstract_variables(model)
    abstract_state, shardings = abstract_train_state(abstract_vars, tx, mesh)
    return TrainSetup(model, tx, schedule, rules, abstract_vars, abstract_state, shardings)


def train_step(cfg, setup: TrainSetup, mesh, constants):
    """The jitted (not yet compiled) train step of ``cfg``: loss, groups, frozen VAE, microbatches, BatchNorm
    groups and state layout as the config says."""
    t = cfg.train
    return S.make_train_step(make_loss_fn(setup.model, cfg, constants), setup.tx, mesh, setup.shardings,
                             num_microbatches=t.num_microbatches, group_size=t.group_size, schedule=setup.schedule,
                             trainable=trainable_mask(setup.abstract_vars["params"], setup.rules),
                             bn_reduce=t.bn_reduce, state_layout=t.state_layout)


def abstract_batch(cfg, mesh, example: dict) -> dict:
    """The global batch's shapes (sharded over the mesh's batch axes) from one host batch or one example."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((cfg.train.global_batch_size, *np.shape(x)[1:]), np.asarray(x).dtype,
                                       sharding=parallel.batch_sharding(mesh)), example)


# ------------------------------------------------------------------------------------------------ validation
# Numbers are checked by what a field's name says it is (a count, a size, a rate), so a new field that follows
# the naming gets its check for free; the few fields whose meaning breaks the pattern say so here.
_AT_LEAST = {"eval.every_steps": (-1, "a number of updates, 0 (at the end only) or -1 (never)"),
             "checkpoint.every_steps": (0, "a number of updates, or 0 (at the end only)"),
             "optimizer.warmup_steps": (0, "a number of updates (0: no warm-up)"),
             "eval.max_images": (0, "a number of images (0: all)"),
             "eval.num_pictures": (0, "a number of pictures (0: none)"),
             "worker_count": (0, "a number of processes (0: in the main process)"),
             "model.num_classes": (0, "a number of scene classes, or 0 (from the class table's list)"),
             "seed": (None, "any whole number")}
_COUNT_SUFFIXES = ("_size", "_steps", "microbatches", "epochs", "iters_per_epoch", "keep", "fsdp")
_RATE_SUFFIXES = ("_lr", "weight_decay", "_ratio", "_factor", "_lambda", "_depth", "peak_flops_per_device",
                  "unet_lr_mult")
_POSITIVE = ("optimizer.max_lr", "model.max_depth", "eval.max_depth", "peak_flops_per_device", "aug.cutdepth_units")


def _flat(cfg, prefix=""):
    for k, v in cfg.items():
        if hasattr(v, "items"):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def config_problems(cfg) -> list[str]:
    """Every field whose value cannot work, as "field value: what is allowed" (empty when all are fine)."""
    bad = []
    for name, v in _flat(cfg):
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(v, bool):
            continue
        if isinstance(v, int):
            if name in _AT_LEAST:
                low, what = _AT_LEAST[name]
                if low is not None and v < low:
                    bad.append(f"{name}={v}: expected {what}")
            elif name == "mesh.data":
                if v == 0 or v < -1:
                    bad.append(f"{name}={v}: expected a number of devices, or -1 (what fsdp leaves)")
            elif leaf.endswith(_COUNT_SUFFIXES) and v < 1:
                bad.append(f"{name}={v}: expected a whole number >= 1")
        elif isinstance(v, float):
            if not math.isfinite(v):
                bad.append(f"{name}={v}: expected a finite number")
            elif name in _POSITIVE and v <= 0:
                bad.append(f"{name}={v}: expected a number > 0")
            elif leaf in ("b1", "b2") and not 0 <= v < 1:
                bad.append(f"{name}={v}: expected a number in [0, 1)")
            elif leaf.endswith(_RATE_SUFFIXES) and v < 0:
                bad.append(f"{name}={v}: expected a number >= 0")
        elif isinstance(v, tuple) and leaf.endswith("_size"):
            if v and not (len(v) == 2 and all(isinstance(x, int) and x >= 1 for x in v)):
                bad.append(f"{name}={v}: expected (height, width) in pixels, or () for the full image")
    e = cfg.eval
    if "min_depth" in e and "max_depth" in e and e.min_depth >= e.max_depth:
        bad.append(f"eval.min_depth={e.min_depth}: expected less than eval.max_depth ({e.max_depth})")
    o = cfg.optimizer
    if o.schedule == "mmseg" and o.warmup_steps > o.decay_steps:
        bad.append(f"optimizer.warmup_steps={o.warmup_steps}: expected at most optimizer.decay_steps "
                   f"({o.decay_steps})")
    return bad


def validate(cfg) -> None:
    """One ``ConfigError`` naming every bad field, before anything is built or read."""
    bad = config_problems(cfg)
    if bad:
        raise ConfigError("; ".join(bad))


def train_image_shape(cfg) -> tuple[int, ...]:
    """The (h, w, 3) of the first training image, after ``input_crop``."""
    shape = tuple(np.shape(open_source(cfg.data_dir, cfg.dataset, cfg.train_split)[0]["image"]))
    if input_crop(cfg) == "kb":
        if shape[0] < protocols.KITTI_KB_CROP_SIZE[0] or shape[1] < protocols.KITTI_KB_CROP_SIZE[1]:
            raise ConfigError(f"input_crop='kb': the {cfg.dataset} images are {shape[0]}x{shape[1]}, smaller than "
                              f"the {protocols.KITTI_KB_CROP_SIZE[0]}x{protocols.KITTI_KB_CROP_SIZE[1]} KITTI "
                              "benchmark crop")
        return (*protocols.KITTI_KB_CROP_SIZE, shape[2])
    return shape


def check_crop_fits(cfg, image_shape: tuple[int, ...]) -> None:
    """A training crop larger than the dataset's images would only pad them (the mmseg 512 recipe's random resize
    is the one case where that is meant)."""
    crop = tuple(cfg.aug.crop_size or ())
    if is_segmentation(cfg):
        return  # mmseg's recipe resizes first and pads smaller crops with the ignore label
    if crop and not augment_config(cfg).random_resize and (crop[0] > image_shape[0] or crop[1] > image_shape[1]):
        raise ConfigError(f"aug.crop_size={crop}: larger than the {cfg.dataset} images "
                          f"({image_shape[0]}x{image_shape[1]}); expected at most their size")
