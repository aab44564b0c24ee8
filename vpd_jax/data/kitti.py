"""Readers for KITTI in the layout the KITTI depth codebases use (cleinc/bts pytorch/bts_dataloader.py and the
Eigen-split lists of cleinc/bts train_test_inputs/eigen_{train,test}_files_with_gt.txt):

* raw drives (``--kitti_raw``): ``<date>/<drive>/image_02/data/<frame>.png``, 8-bit RGB PNGs whose size depends
  on the recording day (375x1242, 370x1224, 374x1238, 376x1241, ...);
* annotated depth (``--kitti_depth``, the extracted ``data_depth_annotated``):
  ``{train,val}/<drive>/proj_depth/groundtruth/image_02/<frame>.png``, uint16, metres = value / 256, 0 = no
  measurement. BTS reads the listed ``<drive>/proj_depth/...`` paths under ``--gt_path data_depth_annotated/``
  (cleinc/bts pytorch/arguments_train_eigen.txt), so its users move the contents of ``train/`` and ``val/`` up
  into the folder itself; a listed depth path is looked for under ``<kitti_depth>/``, then
  ``<kitti_depth>/train/``, then ``<kitti_depth>/val/``;
* Eigen-split lists: one ``<image path under kitti_raw> <depth path under kitti_depth, or None> <focal>`` per line.

A line without ground truth (``None``, or a depth file found in none of those folders) is not a bad pair: the
reference evaluators leave it out of the metrics (cleinc/bts pytorch/bts_eval.py ``missing_ids``,
pytorch/bts_main.py ``has_valid_depth``), and so does :func:`eigen_items` (the
counts and the depth files missing on disk are in its result). Every other item's ``load()`` returns the
builder's example dict or raises :class:`BadInput` with one line naming the file (a missing or unreadable image,
a depth map that is not 2-D uint16 or not the image's size). cv2 is imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from vpd_jax.data.builder import NO_CLASS
from vpd_jax.data.sources import BadInput, Item, _raiser, _read, decode_depth_png, decode_image
from vpd_jax.protocols import KITTI_DEPTH_SCALE

DEPTH_SCALE = KITTI_DEPTH_SCALE  # stored uint16 = metres * 256
DEPTH_SUBDIRS = ("", "train", "val")  # where a listed depth path is looked for, in this order


@dataclasses.dataclass
class EigenLine:
    """One parsed list line: ``depth`` is None for a line listed without ground truth."""

    image: str
    depth: str | None
    focal: float | None
    drive: str


@dataclasses.dataclass
class EigenList:
    """What a list yields under given roots: the items to build, and the lines left out for lack of ground truth."""

    items: list[Item]
    no_gt: list[str] = dataclasses.field(default_factory=list)  # "<list>:<n>: <image>" of the ``None`` lines
    depth_missing: list[str] = dataclasses.field(default_factory=list)  # one line each, naming the depth file

    @property
    def left_out(self) -> int:
        return len(self.no_gt) + len(self.depth_missing)


def parse_eigen_line(line: str, where: str) -> EigenLine:
    """One line of an Eigen-split list (``<image> <depth or None> [focal]``), or :class:`BadInput` naming ``where``."""
    parts = line.split()
    if len(parts) not in (2, 3):
        raise BadInput(f"{where}: expected '<image path> <depth path or None> <focal>', got {line.strip()!r}")
    image, depth = parts[0].lstrip("/"), parts[1].lstrip("/")
    focal = None
    if len(parts) == 3:
        try:
            focal = float(parts[2])
        except ValueError:
            raise BadInput(f"{where}: focal length {parts[2]!r} is not a number") from None
    dirs = image.split("/")
    if len(dirs) < 3 or not all(dirs):
        raise BadInput(f"{where}: image path {parts[0]!r} is not <date>/<drive>/.../<frame>.png")
    return EigenLine(image=image, depth=None if depth == "None" else depth, focal=focal, drive=dirs[1])


def find_depth(kitti_depth: str, rel: str) -> str | None:
    """``rel`` under ``kitti_depth``, ``kitti_depth/train`` or ``kitti_depth/val`` (the first that exists)."""
    for sub in DEPTH_SUBDIRS:
        path = os.path.join(kitti_depth, sub, rel)
        if os.path.isfile(path):
            return path
    return None


def decode_depth(data: bytes, path: str, size: tuple[int, int]) -> np.ndarray:
    """A KITTI uint16 depth PNG -> float32 metres (value / 256, 0 = invalid), checked against the image ``size``."""
    return decode_depth_png(data, path, size, DEPTH_SCALE)


def _item(kitti_raw: str, entry: EigenLine, depth_path: str, where: str) -> Item:
    image_path = os.path.join(kitti_raw, entry.image)

    def load():
        data = _read(image_path, "image", where)
        img = decode_image(data, image_path, None)
        depth = decode_depth(_read(depth_path, "depth map", where), depth_path, img.shape[:2])
        return {"image": data, "depth": depth, "scene": entry.drive, "file_name": entry.image,
                "class_id": NO_CLASS, "class_id_mmseg": NO_CLASS}

    return Item(entry.image, load)


def eigen_items(kitti_raw: str, kitti_depth: str, list_file: str) -> EigenList:
    """The pairs of an Eigen-split list, in list order, with the lines that have no ground truth left out.

    A malformed line becomes an item that fails with ``<list_file>:<line>: ...``; a missing image is found when
    its item is loaded (a bad pair); a depth file found nowhere is counted in ``depth_missing`` instead.
    """
    out = EigenList(items=[])
    try:
        with open(list_file) as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{list_file}: not a text file (expected an Eigen-split list)") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{list_file}:{n}"
        try:
            entry = parse_eigen_line(line, where)
        except BadInput as e:
            out.items.append(Item(where, _raiser(e)))
            continue
        if entry.depth is None:
            out.no_gt.append(f"{where}: {entry.image}")
            continue
        depth_path = find_depth(kitti_depth, entry.depth)
        if depth_path is None:
            tried = ", ".join(os.path.join(kitti_depth, s) if s else kitti_depth for s in DEPTH_SUBDIRS)
            out.depth_missing.append(f"{where}: depth map {entry.depth} is in none of {tried}")
            continue
        out.items.append(_item(kitti_raw, entry, depth_path, where))
    return out
