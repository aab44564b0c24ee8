"""TFDS builders: ``nyu_vpd/<source>`` (our array_record NYUv2 in VPD's layouts) and the stock ``nyu_depth_v2``.

``nyu_vpd`` features (one example per image):

* ``image``: uint8 (H, W, 3) RGB (480x640 for real NYU data). The source file's bytes are stored unchanged
  (the BTS/mmseg JPEGs), so reading decodes the very pixels the reference's ``cv2.imread`` sees.
* ``depth``: float32 (H, W) metres, 0 = invalid (uint16 mm / 1000 for real data), zlib-compressed.
* ``scene``: the scene directory (``kitchen_0028b``) or scene type (``bathroom``).
* ``file_name``: ``<scene_dir>/rgb_NNNNN.jpg`` (mmseg layout: the flattened name).
* ``class_id``: the official class rule's id (0..26); ``class_id_mmseg``: the mmseg rule's (0..27).

Building writes into a staging directory next to the target and moves the finished version into place, so a
failed or interrupted build never damages a dataset already prepared under ``data_dir``. Bad pairs are
reported one line each and skipped (or, when strict, stop the build); :class:`PrepareReport` counts them.

TensorFlow and tensorflow_datasets are imported inside functions: only building needs them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import uuid
from typing import Callable, Iterable

import numpy as np

from vpd_jax.data.sources import BadInput, Item

NAME = "nyu_vpd"
VERSION = "1.0.0"
SOURCES = ("bts", "mat", "mmseg", "synthetic")
STOCK_NAME = "nyu_depth_v2"
STOCK_VERSION = "0.0.1"


@dataclasses.dataclass
class PrepareReport:
    """What a build wrote and skipped; ``strict`` turns the first bad pair into an error."""

    strict: bool = False
    written: dict = dataclasses.field(default_factory=dict)
    skipped: list = dataclasses.field(default_factory=list)
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


def _define_builders():
    """Creates the TFDS builder classes on first use (the import of tfds is deferred until then)."""
    import tensorflow_datasets as tfds

    class NyuVpd(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """NYUv2 in the layouts VPD users have; configs name the source."""

        name = NAME
        VERSION = tfds.core.Version(VERSION)
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=s, description=f"NYUv2 from the {s} source")
                           for s in SOURCES]

        def __init__(self, *, split_items: dict[str, Callable[[], Iterable[Item]]] | None = None,
                     split_sizes: dict[str, int] | None = None, report: PrepareReport | None = None, **kwargs):
            self._split_items = split_items or {}
            self._split_sizes = split_sizes or {}
            self._report = report or PrepareReport()
            super().__init__(**kwargs)

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
                    "depth": tfds.features.Tensor(shape=(None, None), dtype=np.float32,
                                                  encoding=tfds.features.Encoding.ZLIB),
                    "scene": tfds.features.Text(),
                    "file_name": tfds.features.Text(),
                    "class_id": tfds.features.Scalar(dtype=np.int32),
                    "class_id_mmseg": tfds.features.Scalar(dtype=np.int32),
                }),
                homepage="https://cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html",
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
                yield item.name, ex
            self._report.written[split] = written
            if written == 0:
                raise EmptySplit(f"split {split!r} has no usable image/depth pairs "
                                 f"({len(self._report.skipped)} skipped); nothing was written")

    return NyuVpd


_BUILDER_CLS = None


def builder_class():
    global _BUILDER_CLS
    if _BUILDER_CLS is None:
        _BUILDER_CLS = _define_builders()
    return _BUILDER_CLS


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
    os.rename(src, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def build_nyu_vpd(data_dir: str, source: str, split_items: dict[str, Callable[[], Iterable[Item]]],
                  split_sizes: dict[str, int] | None = None, report: PrepareReport | None = None) -> str:
    """Builds ``nyu_vpd/<source>`` under ``data_dir`` from ``split_items`` (split -> callable giving Items).

    Returns the dataset directory. Raises :class:`StrictStop` on the first bad pair when ``report.strict``.
    """
    if source not in SOURCES:
        raise ValueError(f"source {source!r}: expected one of {SOURCES}")
    _quiet_tf()
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # ours (per split, with skips) replaces TFDS' generic one
    report = report or PrepareReport()
    os.makedirs(data_dir, exist_ok=True)
    staging = os.path.join(data_dir, f".staging-{NAME}-{source}-{uuid.uuid4().hex[:8]}")
    try:
        builder = builder_class()(config=source, data_dir=staging, file_format="array_record",
                                  split_items=split_items, split_sizes=split_sizes, report=report)
        try:
            with _quiet_stdout():
                builder.download_and_prepare(download_dir=os.path.join(staging, "downloads"))
        except BadInput as e:
            raise StrictStop(str(e)) from None
        rel = os.path.join(NAME, source, VERSION)
        _publish(staging, data_dir, rel)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(data_dir, NAME, source, VERSION)


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
