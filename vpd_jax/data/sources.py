"""Readers for the NYUv2 layouts VPD users have on disk, each turning one image/depth pair into an example.

Layouts (wl-zhao/VPD depth/README.md, depth/dataset/nyudepthv2.py; mmsegmentation configs/_base_/datasets/nyu.py,
tools/dataset_converters/nyu.py):

* BTS ``sync`` training tree, ``<scene_dir>/rgb_NNNNN.jpg`` + ``sync_depth_NNNNN.png`` (uint16 mm): every pair
  found, or the pairs of a BTS-format list file (``/<scene_dir>/rgb_N.jpg /<scene_dir>/sync_depth_N.png
  [focal]``). The official ``official_splits/test/<scene>/`` tree has the same layout.
* ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3, read with h5py) + ``splits.mat`` (MATLAB v5, scipy): the 654
  test / 795 train images exactly as BTS' ``extract_official_train_test_set_from_mat.py`` writes them:
  ``rawDepths`` * 1000 truncated to uint16 mm, RGB kept inside rows 7:474 and columns 7:632 with a black border,
  JPEG-encoded by OpenCV at its default quality (so the pixels equal the official ``official_splits`` files),
  named ``<sceneType>/rgb_<0-based index>.jpg``.
* mmsegmentation's ``images/{train,test}/<flat>.jpg`` + ``annotations/{train,test}/<flat>.png``, where
  ``<flat>`` is ``<scene_dir>_<NNNNN>``.

Every reader yields :class:`Item` objects whose ``load()`` returns the builder's example dict or raises
:class:`BadInput` with a one-line message that names the file. Heavy imports (cv2, h5py, scipy) happen inside.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Iterator

import numpy as np

from vpd_jax import scenes
from vpd_jax.data import synthetic

NYU_SIZE = (480, 640)


class BadInput(Exception):
    """One bad image/depth pair or list line; ``str()`` is a single line naming the file."""


@dataclasses.dataclass
class Item:
    """A lazily loaded pair: ``name`` identifies it in messages before it is read."""

    name: str
    load: Callable[[], dict]


def class_names(scene_dir: str, base_name: str) -> tuple[str, str]:
    """The names the two class rules see for ``<scene_dir>/<base_name>`` (wl-zhao/VPD depth/dataset/nyudepthv2.py;
    mmsegmentation mmseg/datasets/nyu.py): the official one is ``<scene_dir>_<file>``; mmseg's converter
    (tools/dataset_converters/nyu.py) flattens ``<scene_dir>/rgb_N.jpg`` to ``<scene_dir>_N.jpg``."""
    official = f"{scene_dir}_{base_name}"
    flat = re.sub(r"^(rgb|sync_depth)_", "", base_name)
    return official, f"{scene_dir}_{flat}"


def class_ids(official_name: str, mmseg_name: str, where: str) -> tuple[int, int]:
    try:
        official = scenes.class_id_for_file(official_name, "official")
    except ValueError:
        raise BadInput(f"{where}: unknown scene name {official_name!r} (no NYU scene class in it)") from None
    return official, scenes.class_id_for_file(mmseg_name, "mmseg")


def make_example(image_bytes: bytes, depth_m: np.ndarray, scene: str, file_name: str, official_name: str,
                 mmseg_name: str, where: str) -> dict:
    official, mmseg = class_ids(official_name, mmseg_name, where)
    return {"image": image_bytes, "depth": np.ascontiguousarray(depth_m, dtype=np.float32), "scene": scene,
            "file_name": file_name, "class_id": official, "class_id_mmseg": mmseg}


def decode_image(data: bytes, path: str, expected_size: tuple[int, int] | None) -> np.ndarray:
    import cv2

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if img is None:
        raise BadInput(f"{path}: corrupt or unreadable image")
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise BadInput(f"{path}: expected an 8-bit 3-channel image, got shape {img.shape} {img.dtype}")
    if expected_size is not None and img.shape[:2] != tuple(expected_size):
        raise BadInput(f"{path}: image is {img.shape[0]}x{img.shape[1]}, expected "
                       f"{expected_size[0]}x{expected_size[1]}")
    return img


def decode_depth_png(data: bytes, path: str, size: tuple[int, int], scale: float = 1000.0) -> np.ndarray:
    """uint16 depth PNG -> float32 metres (value / ``scale``: NYU's millimetres 1000, KITTI's 256; 0 = invalid),
    checked against the image ``size``."""
    import cv2

    dep = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if dep is None:
        raise BadInput(f"{path}: corrupt or unreadable depth map")
    if dep.ndim != 2 or dep.dtype != np.uint16:
        raise BadInput(f"{path}: expected a 16-bit single-channel depth PNG (metres * {scale:g}), got shape "
                       f"{dep.shape} {dep.dtype}")
    if dep.shape != tuple(size):
        raise BadInput(f"{path}: depth map is {dep.shape[0]}x{dep.shape[1]} but its image is {size[0]}x{size[1]}")
    return dep.astype(np.float32) / np.float32(scale)


def _read(path: str, what: str, where: str | None = None) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        prefix = f"{where}: " if where else ""
        raise BadInput(f"{prefix}{what} {path} does not exist") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot read {what} ({e.strerror})") from None


def _pair_item(root: str, scene_dir: str, rgb_rel: str, depth_rel: str, expected_size, where: str | None) -> Item:
    rgb_path = os.path.join(root, rgb_rel)
    depth_path = os.path.join(root, depth_rel)
    base = os.path.basename(rgb_rel)

    def load():
        data = _read(rgb_path, "image", where)
        img = decode_image(data, rgb_path, expected_size)
        depth = decode_depth_png(_read(depth_path, "depth map", where), depth_path, img.shape[:2])
        official, mmseg = class_names(scene_dir, base)
        return make_example(data, depth, scene_dir, f"{scene_dir}/{base}", official, mmseg, rgb_path)

    return Item(f"{scene_dir}/{base}", load)


def bts_tree_items(root: str, expected_size=NYU_SIZE) -> list[Item]:
    """Every ``<scene_dir>/rgb_N.jpg`` under ``root`` with its ``sync_depth_N.png`` (sorted by path); an image
    without its depth map becomes an item that fails with a message naming it."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such directory (expected <scene_dir>/rgb_NNNNN.jpg files)")
    items = []
    for scene_dir in sorted(os.listdir(root)):
        d = os.path.join(root, scene_dir)
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            m = re.fullmatch(r"rgb_(\d+)\.(jpg|jpeg|png)", name)
            if m:
                items.append(_pair_item(root, scene_dir, f"{scene_dir}/{name}",
                                        f"{scene_dir}/sync_depth_{m.group(1)}.png", expected_size, None))
    return items


def parse_list_line(line: str, where: str) -> tuple[str, str, str]:
    """``(scene_dir, rgb relative path, depth relative path)`` of one BTS list line."""
    parts = line.split()
    if len(parts) not in (2, 3):
        raise BadInput(f"{where}: expected '<rgb path> <depth path> [focal]', got {line.strip()!r}")
    rgb, dep = parts[0].lstrip("/"), parts[1].lstrip("/")
    scene_dir = os.path.dirname(rgb)
    if not scene_dir or "/" in scene_dir:
        raise BadInput(f"{where}: rgb path {parts[0]!r} is not <scene_dir>/<file>")
    return scene_dir, rgb, dep


def bts_list_items(root: str, list_file: str, expected_size=NYU_SIZE) -> list[Item]:
    """The pairs of a BTS-format list, in list order, resolved under ``root``."""
    items = []
    with open(list_file) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{list_file}:{n}"
            try:
                scene_dir, rgb, dep = parse_list_line(line, where)
            except BadInput as e:
                items.append(Item(where, _raiser(e)))
                continue
            items.append(_pair_item(root, scene_dir, rgb, dep, expected_size, where))
    return items


def _raiser(exc: Exception) -> Callable[[], dict]:
    def load():
        raise exc

    return load


def mmseg_items(root: str, split: str, expected_size=NYU_SIZE) -> list[Item]:
    """``images/<split>/*.jpg`` with ``annotations/<split>/<same stem>.png``, sorted like mmseg's scan."""
    img_dir = os.path.join(root, "images", split)
    ann_dir = os.path.join(root, "annotations", split)
    if not os.path.isdir(img_dir):
        raise FileNotFoundError(f"{img_dir}: no such directory (mmseg layout images/{{train,test}})")
    items = []
    for name in sorted(os.listdir(img_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        rgb_path = os.path.join(img_dir, name)
        depth_path = os.path.join(ann_dir, stem + ".png")
        m = re.fullmatch(r"(.*?)_?(\d+)", stem)
        scene = m.group(1) if m else stem

        def load(rgb_path=rgb_path, depth_path=depth_path, name=name, scene=scene):
            data = _read(rgb_path, "image")
            img = decode_image(data, rgb_path, expected_size)
            depth = decode_depth_png(_read(depth_path, "depth map"), depth_path, img.shape[:2])
            return make_example(data, depth, scene, name, name, name, rgb_path)

        items.append(Item(name, load))
    return items


def read_splits(splits_path: str) -> dict[str, list[int]]:
    """0-based image indices of the official split (``splits.mat`` stores 1-based ``trainNdxs``/``testNdxs``)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(splits_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{splits_path}: no such file (the official splits.mat)") from None
    except Exception as e:  # scipy raises assorted errors on a damaged file
        raise ValueError(f"{splits_path}: not a readable MATLAB splits file ({e})") from e
    return {"train": sorted(int(i) - 1 for i in np.ravel(mat["trainNdxs"])),
            "test": sorted(int(i) - 1 for i in np.ravel(mat["testNdxs"]))}


class LabeledMat:
    """Lazy access to ``nyu_depth_v2_labeled.mat``; opened once, in the process that reads it."""

    def __init__(self, path: str, image_format: str = "jpeg"):
        if image_format not in ("jpeg", "png"):
            raise ValueError(f"image_format {image_format!r}: expected 'jpeg' or 'png'")
        self.path = path
        self.image_format = image_format
        self._file = None
        self._scenes = None

    def _open(self):
        if self._file is None:
            import h5py

            try:
                self._file = h5py.File(self.path, "r")
            except FileNotFoundError:
                raise FileNotFoundError(f"{self.path}: no such file (nyu_depth_v2_labeled.mat)") from None
            except OSError as e:
                raise ValueError(f"{self.path}: not an HDF5 (MATLAB v7.3) file ({e})") from None
            for key in ("images", "rawDepths", "sceneTypes"):
                if key not in self._file:
                    raise ValueError(f"{self.path}: has no {key!r} dataset; is it nyu_depth_v2_labeled.mat?")
            f = self._file
            self._scenes = ["".join(chr(int(c)) for c in np.ravel(f[ref])) for ref in np.ravel(f["sceneTypes"])]
        return self._file

    def __len__(self) -> int:
        return int(self._open()["images"].shape[0])

    def item(self, index: int) -> Item:
        scene = self._scene(index)
        name = f"{scene}/rgb_{index:05d}.jpg"
        where = f"{self.path}[{index}] ({name})"

        def load():
            import cv2

            f = self._open()
            # MATLAB stores column-major: images (N,3,W,H), rawDepths (N,W,H).
            rgb = np.asarray(f["images"][index]).T
            raw = np.asarray(f["rawDepths"][index]).T
            if rgb.shape != (*NYU_SIZE, 3) or raw.shape != NYU_SIZE:
                raise BadInput(f"{where}: image {rgb.shape} / depth {raw.shape}, expected 480x640")
            bordered = np.zeros_like(rgb, dtype=np.uint8)
            bordered[7:474, 7:632] = rgb[7:474, 7:632]
            ext = ".jpg" if self.image_format == "jpeg" else ".png"
            ok, enc = cv2.imencode(ext, np.ascontiguousarray(bordered[..., ::-1]))
            if not ok:
                raise BadInput(f"{where}: could not encode image")
            mm = (raw.astype(np.float32) * 1000.0).astype(np.uint16)
            official, mmseg = class_names(scene, f"rgb_{index:05d}.jpg")
            return make_example(enc.tobytes(), mm.astype(np.float32) / np.float32(1000.0), scene, name, official,
                                mmseg, where)

        return Item(name, load)

    def _scene(self, index: int) -> str:
        self._open()
        return self._scenes[index]

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def mat_items(mat_path: str, splits_path: str, split: str, image_format: str = "jpeg") -> Iterator[Item]:
    """The official ``split`` ("train": 795, "test": 654) of the labeled .mat, in index order."""
    indices = read_splits(splits_path)[split]
    mat = LabeledMat(mat_path, image_format)
    try:
        n = len(mat)
        for i in indices:
            if not 0 <= i < n:
                yield Item(f"{splits_path}[{i + 1}]", _raiser(BadInput(
                    f"{splits_path}: index {i + 1} points past the {n} images of {mat_path}")))
                continue
            yield mat.item(i)
    finally:
        mat.close()


def synthetic_items(seed: int, num_images: int, height: int, width: int, split: str,
                    frames_per_scene: int = 4) -> Iterator[Item]:
    """Generated scenes (``synthetic.py``), PNG-encoded so the stored pixels are exactly the rendered ones."""
    for i in range(num_images):
        scene_index, frame = divmod(i, frames_per_scene)
        scene_dir, _ = synthetic.scene_dir_name(seed, scene_index, split)
        base = f"rgb_{frame:05d}.png"

        def load(scene_index=scene_index, frame=frame, scene_dir=scene_dir, base=base):
            import cv2

            sc = synthetic.generate_scene(seed, scene_index, frame, height, width, split)
            ok, enc = cv2.imencode(".png", np.ascontiguousarray(sc.image[..., ::-1]))
            official, mmseg = class_names(scene_dir, base)
            return make_example(enc.tobytes(), sc.depth, scene_dir, f"{scene_dir}/{base}", official, mmseg,
                                f"synthetic {scene_dir}/{base}")

        yield Item(f"{scene_dir}/{base}", load)
