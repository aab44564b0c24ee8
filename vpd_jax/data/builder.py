"""TFDS builders of our array_record depth and segmentation datasets, and the stock ``nyu_depth_v2``.

Datasets (``<name>/<config>``): ``nyu_vpd/<source>`` (NYUv2 in the layouts VPD users have), ``kitti_vpd/eigen``
(KITTI, Eigen split) and ``depth_folder/<name>`` (any folder of image/depth pairs). One feature set for all,
one example per image:

* ``image``: uint8 (H, W, 3) RGB, any size (480x640 for real NYU data). The source file's bytes are stored
  unchanged (JPEG/PNG), so reading decodes the very pixels the reference's ``cv2.imread`` sees.
* ``depth``: float32 (H, W) metres, 0 = invalid (NYU: uint16 mm / 1000; KITTI: uint16 / 256), zlib-compressed.
* ``scene``: NYU's scene directory (``kitchen_0028b``) or scene type (``bathroom``); KITTI's drive
  (``2011_09_26_drive_0002_sync``); a folder dataset's scene name (``--scene_from``), or "".
* ``file_name``: the image's path relative to its source root (``<scene_dir>/rgb_NNNNN.jpg``, ...).
* ``class_id``: NYU's official class rule's id (0..26); ``class_id_mmseg``: the mmseg rule's (0..27). Datasets
  without NYU scene classes store -1 in both; their rows come from the run's ``class_rule`` at load time.

Segmentation (``ade20k_vpd/<config>``: ``ade``, ADE20K from ``ADEChallengeData2016``; ``synthetic``, generated
rooms with labels; ``segmentation.py``) has its own feature set, one example per image:

* ``image``: as above (the source file's bytes).
* ``label``: uint8 (H, W, 1) class ids after ``reduce_zero_label`` (0..149, 255 = ignore), PNG-encoded; the
  image's size.
* ``file_name``: the image's file name (``ADE_train_00000001.jpg``).

Beside ``dataset_info.json``, ``scenes.json`` counts the examples of each scene name per split, so a run can check
that every scene has a row in its class table without reading the data.

Building writes into a staging directory next to the target and moves the finished version into place, so a
failed or interrupted build never damages a dataset already prepared under ``data_dir``. Bad pairs are
reported one line each and skipped (or, when strict, stop the build); :class:`PrepareReport` counts them.

TensorFlow and tensorflow_datasets are imported inside functions: only building needs them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import uuid
from typing import Callable, Iterable

import numpy as np

from vpd_jax.data.sources import BadInput, Item
from vpd_jax.files import write_json

NAME = "nyu_vpd"
VERSION = "1.0.0"
SOURCES = ("bts", "mat", "mmseg", "synthetic")
KITTI_NAME = "kitti_vpd"
FOLDER_NAME = "depth_folder"
SEG_NAME = "ade20k_vpd"
SEG_CONFIGS = ("ade", "synthetic")
# builder name -> (fixed configs (None: any name), homepage, what a config is)
BUILDERS = {
    NAME: (SOURCES, "https://cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html", "NYUv2 from the {} source"),
    KITTI_NAME: (("eigen",), "https://www.cvlibs.net/datasets/kitti/eval_depth_all.php",
                 "KITTI raw drives with the annotated depth maps, {} split"),
    FOLDER_NAME: (None, "", "image/depth pairs of the folder dataset {!r}"),
    SEG_NAME: (SEG_CONFIGS, "http://sceneparsing.csail.mit.edu/",
               "ADE20K semantic segmentation (150 classes, reduce_zero_label applied), {} source"),
}
FEATURE_SETS = ("depth", "segmentation")
BUILDER_FEATURES = {SEG_NAME: "segmentation"}  # builder name -> feature set (default "depth")
NO_CLASS = -1  # class_id of examples without a NYU scene class
SCENES_FILE = "scenes.json"  # beside dataset_info.json: {split: {scene name: number of examples}}
STOCK_NAME = "nyu_depth_v2"
STOCK_VERSION = "0.0.1"


@dataclasses.dataclass
class PrepareReport:
    """What a build wrote and skipped; ``strict`` turns the first bad pair into an error."""

    strict: bool = False
    written: dict = dataclasses.field(default_factory=dict)
    skipped: list = dataclasses.field(default_factory=list)
    scenes: dict = dataclasses.field(default_factory=dict)  # split -> {scene name: examples}
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)

    def bad(self, exc: BadInput):
        self.skipped.append(str(exc))
        self.log(f"skipped: {exc}")
        if self.strict:
            raise exc


class StrictStop(RuntimeError):
    """A bad pair under ``--strict``; nothing under ``data_dir`` was changed."""


class EmptySplit(ValueError):
    """Every pair of a split was bad (or it had none); nothing under ``data_dir`` was changed."""


def _define_builders() -> dict:
    """Creates the TFDS builder classes on first use (the import of tfds is deferred until then)."""
    import tensorflow_datasets as tfds

    class _DepthBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Examples from ``split_items`` (split -> callable giving :class:`Item`); bad ones reported and skipped."""

        VERSION = tfds.core.Version(VERSION)
        HOMEPAGE = ""
        FEATURE_SET = "depth"

        def __init__(self, *, split_items: dict[str, Callable[[], Iterable[Item]]] | None = None,
                     split_sizes: dict[str, int] | None = None, report: PrepareReport | None = None, **kwargs):
            self._split_items = split_items or {}
            self._split_sizes = split_sizes or {}
            self._report = report or PrepareReport()
            super().__init__(**kwargs)

        def _info(self):
            if self.FEATURE_SET == "segmentation":
                features = {
                    "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
                    "label": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png"),
                    "file_name": tfds.features.Text(),
                }
            else:
                features = {
                    "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
                    "depth": tfds.features.Tensor(shape=(None, None), dtype=np.float32,
                                                  encoding=tfds.features.Encoding.ZLIB),
                    "scene": tfds.features.Text(),
                    "file_name": tfds.features.Text(),
                    "class_id": tfds.features.Scalar(dtype=np.int32),
                    "class_id_mmseg": tfds.features.Scalar(dtype=np.int32),
                }
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(features),
                homepage=self.HOMEPAGE,
                # Keep source order (e.g. the official test list's) instead of TFDS' key-hash order: the eval
                # loader promises that order, and training shuffles in grain anyway.
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # everything is local
            return {split: self._generate_examples(split) for split in self._split_items}

        def _generate_examples(self, split):
            from tqdm import tqdm

            seen = set()
            written = 0
            scenes = self._report.scenes.setdefault(split, {})
            items = self._split_items[split]()
            bar = tqdm(items, total=self._split_sizes.get(split), desc=f"{self.builder_config.name}/{split}",
                       unit="img", file=sys.stderr, dynamic_ncols=True)
            for item in bar:
                try:
                    if item.name in seen:
                        raise BadInput(f"{item.name}: listed more than once")
                    ex = item.load()
                except BadInput as e:
                    bar.clear()
                    self._report.bad(e)
                    continue
                seen.add(item.name)
                written += 1
                scene = ex.get("scene", "")
                scene = scene.decode() if isinstance(scene, bytes) else str(scene)
                scenes[scene] = scenes.get(scene, 0) + 1
                yield item.name, ex
            self._report.written[split] = written
            if written == 0:
                raise EmptySplit(f"split {split!r} has no usable {self._pair_kind()} pairs "
                                 f"({len(self._report.skipped)} skipped); nothing was written")

        def _pair_kind(self) -> str:
            return "image/label" if self.FEATURE_SET == "segmentation" else "image/depth"

    classes = {}
    for builder_name, (configs, homepage, what) in BUILDERS.items():
        attrs = {"name": builder_name, "HOMEPAGE": homepage, "__doc__": what.format("<config>"),
                 "__module__": __name__, "FEATURE_SET": BUILDER_FEATURES.get(builder_name, "depth")}
        if configs is not None:
            attrs["BUILDER_CONFIGS"] = [tfds.core.BuilderConfig(name=c, description=what.format(c)) for c in configs]
        classes[builder_name] = type(f"_{builder_name.title().replace('_', '')}", (_DepthBuilder,), attrs,
                                     skip_registration=True)
    return classes


_BUILDER_CLASSES = None


def builder_class(name: str = NAME):
    """The TFDS builder class of ``name`` (``nyu_vpd``, ``kitti_vpd``, ``depth_folder`` or ``ade20k_vpd``)."""
    global _BUILDER_CLASSES
    if _BUILDER_CLASSES is None:
        _BUILDER_CLASSES = _define_builders()
    return _BUILDER_CLASSES[name]


def _quiet_stdout():
    # TFDS prints "Dataset ... prepared to <staging dir>"; the staging path is not where the data ends up.
    import contextlib
    import io

    return contextlib.redirect_stdout(io.StringIO())


def _quiet_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _publish(staging: str, data_dir: str, rel: str):
    """Moves ``staging/rel`` to ``data_dir/rel``, replacing an older build only once the new one is complete."""
    src = os.path.join(staging, rel)
    dst = os.path.join(data_dir, rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    old = None
    if os.path.exists(dst):
        old = f"{dst}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        if old:
            os.rename(old, dst)  # the earlier build stays in place
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def check_config_name(name: str, config: str) -> None:
    """``config`` must be one of ``name``'s fixed configs, or (folder datasets) a plain name."""
    if name not in BUILDERS:
        raise ValueError(f"dataset {name!r}: expected one of {tuple(BUILDERS)}")
    fixed = BUILDERS[name][0]
    if fixed is not None and config not in fixed:
        raise ValueError(f"{name} config {config!r}: expected one of {fixed}")
    if fixed is None and not re.fullmatch(r"[a-z0-9][a-z0-9_]*", config):
        raise ValueError(f"dataset name {config!r}: expected lower-case letters, digits and _ (e.g. my_rooms)")


def build_dataset(data_dir: str, name: str, config: str, split_items: dict[str, Callable[[], Iterable[Item]]],
                  split_sizes: dict[str, int] | None = None, report: PrepareReport | None = None) -> str:
    """Builds ``<name>/<config>`` under ``data_dir`` from ``split_items`` (split -> callable giving Items).

    Returns the dataset directory. Raises :class:`StrictStop` on the first bad pair when ``report.strict``.
    """
    check_config_name(name, config)
    _quiet_tf()
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # ours (per split, with skips) replaces TFDS' generic one
    report = report or PrepareReport()
    os.makedirs(data_dir, exist_ok=True)
    staging = os.path.join(data_dir, f".staging-{name}-{config}-{uuid.uuid4().hex[:8]}")
    cls = builder_class(name)
    cfg = config
    if BUILDERS[name][0] is None:
        # A builder class that lists this one config, so TFDS does not warn about a "custom data configuration".
        cfg = tfds.core.BuilderConfig(name=config, description=BUILDERS[name][2].format(config))
        cls = type(cls.__name__, (cls,), {"name": name, "BUILDER_CONFIGS": [cfg], "__module__": __name__},
                   skip_registration=True)
    try:
        builder = cls(config=cfg, data_dir=staging, file_format="array_record", split_items=split_items,
                      split_sizes=split_sizes, report=report)
        try:
            with _quiet_stdout():
                builder.download_and_prepare(download_dir=os.path.join(staging, "downloads"))
        except BadInput as e:
            raise StrictStop(str(e)) from None
        rel = os.path.join(name, config, VERSION)
        write_json(os.path.join(staging, rel, SCENES_FILE),
                   {split: dict(sorted(c.items())) for split, c in report.scenes.items()})
        _publish(staging, data_dir, rel)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(data_dir, name, config, VERSION)


def build_nyu_vpd(data_dir: str, source: str, split_items: dict[str, Callable[[], Iterable[Item]]],
                  split_sizes: dict[str, int] | None = None, report: PrepareReport | None = None) -> str:
    """Builds ``nyu_vpd/<source>`` under ``data_dir`` (see :func:`build_dataset`)."""
    if source not in SOURCES:
        raise ValueError(f"source {source!r}: expected one of {SOURCES}")
    return build_dataset(data_dir, NAME, source, split_items, split_sizes, report)


def build_stock_nyu_depth_v2(data_dir: str, extracted_dir: str) -> str:
    """Builds the stock TFDS ``nyu_depth_v2`` (FastDepth h5 files) as array_record from a local copy.

    ``extracted_dir`` holds ``nyudepthv2/{train,val}/<scene>/*.h5`` (the extracted ``nyudepthv2.tar.gz``).
    The stock builder's own ``_info`` and ``_generate_examples`` are used unchanged; only the download is
    replaced by the local directory, so the result is what ``tfds build nyu_depth_v2`` would write.
    """
    _quiet_tf()
    import tensorflow_datasets as tfds
    from tensorflow_datasets.datasets.nyu_depth_v2 import nyu_depth_v2_dataset_builder as stock

    root = extracted_dir
    if os.path.isdir(os.path.join(root, "nyudepthv2")):
        base = root
    elif os.path.basename(os.path.normpath(root)) == "nyudepthv2":
        base = os.path.dirname(os.path.normpath(root))
    else:
        raise FileNotFoundError(f"{root}: expected a nyudepthv2/{{train,val}} tree (the extracted FastDepth tarball)")
    for split_dir in ("train", "val"):
        if not os.path.isdir(os.path.join(base, "nyudepthv2", split_dir)):
            raise FileNotFoundError(f"{os.path.join(base, 'nyudepthv2', split_dir)}: no such directory")

    class LocalNyuDepthV2(stock.Builder, skip_registration=True):
        name = STOCK_NAME

        def _split_generators(self, dl_manager):
            del dl_manager
            return [tfds.core.SplitGenerator(name=tfds.Split.TRAIN,
                                             gen_kwargs={"root_dir": os.path.join(base, "nyudepthv2", "train")}),
                    tfds.core.SplitGenerator(name=tfds.Split.VALIDATION,
                                             gen_kwargs={"root_dir": os.path.join(base, "nyudepthv2", "val")})]

    os.makedirs(data_dir, exist_ok=True)
    staging = os.path.join(data_dir, f".staging-{STOCK_NAME}-{uuid.uuid4().hex[:8]}")
    try:
        builder = LocalNyuDepthV2(data_dir=staging, file_format="array_record")
        with _quiet_stdout():
            builder.download_and_prepare(download_dir=os.path.join(staging, "downloads"))
        _publish(staging, data_dir, os.path.join(STOCK_NAME, STOCK_VERSION))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(data_dir, STOCK_NAME, STOCK_VERSION)
