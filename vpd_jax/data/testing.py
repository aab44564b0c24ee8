"""Writers of small NYUv2 trees in the real on-disk layouts (BTS sync tree and list, official test tree,
mmseg, labeled .mat + splits.mat, FastDepth h5), filled with synthetic scenes; for tests and demos without
the real dataset."""

from __future__ import annotations

import os

import numpy as np

from vpd_jax.data import synthetic


def _imwrite(path: str, array: np.ndarray):
    import cv2

    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not cv2.imwrite(path, array):
        raise OSError(f"could not write {path}")


def depth_to_mm(depth_m: np.ndarray) -> np.ndarray:
    return np.clip(np.round(depth_m * 1000.0), 0, 65535).astype(np.uint16)


def write_bts_tree(root: str, num_images: int, height: int, width: int, seed: int = 0, split: str = "train",
                   frames_per_scene: int = 3) -> list[tuple[str, str]]:
    """``<scene_dir>/rgb_NNNNN.jpg`` + ``sync_depth_NNNNN.png`` (uint16 mm); returns the (rgb, depth) relative
    paths in generation order."""
    pairs = []
    for i, sc in enumerate(synthetic.iter_scenes(seed, num_images, height, width, split, frames_per_scene)):
        idx = 10 * i + 1  # gaps and non-zero start, like real BTS frame numbers
        rgb = f"{sc.scene_dir}/rgb_{idx:05d}.jpg"
        dep = f"{sc.scene_dir}/sync_depth_{idx:05d}.png"
        _imwrite(os.path.join(root, rgb), sc.image[..., ::-1])
        _imwrite(os.path.join(root, dep), depth_to_mm(sc.depth))
        pairs.append((rgb, dep))
    return pairs


def write_bts_list(path: str, pairs: list[tuple[str, str]], focal: bool = True):
    """A BTS-format list: ``/<rgb> /<depth> [518.8579]`` per line."""
    with open(path, "w") as f:
        for rgb, dep in pairs:
            f.write(f"/{rgb} /{dep}" + (" 518.8579\n" if focal else "\n"))


def write_mmseg(root: str, split: str, bts_root: str, pairs: list[tuple[str, str]]) -> list[str]:
    """mmseg's converter output for BTS ``pairs``: flattened ``<scene_dir>_<N>.jpg`` / ``.png``."""
    import shutil

    names = []
    for rgb, dep in pairs:
        scene_dir, base = rgb.split("/")
        stem = f"{scene_dir}_{base[len('rgb_'):-len('.jpg')]}"
        for sub, src, ext in (("images", rgb, ".jpg"), ("annotations", dep, ".png")):
            os.makedirs(os.path.join(root, sub, split), exist_ok=True)
            shutil.copyfile(os.path.join(bts_root, src), os.path.join(root, sub, split, stem + ext))
        names.append(stem + ".jpg")
    return names


def cheap_nyu_image(rng: np.random.Generator, height: int = 480, width: int = 640) -> np.ndarray:
    """A smooth random RGB image (full NYU size costs seconds to render; the .mat and h5 tests need only
    plausible pixels)."""
    import cv2

    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(img.astype(np.int16) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)


def write_labeled_mat(path: str, scene_types: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """A MATLAB v7.3 ``nyu_depth_v2_labeled.mat`` with ``images`` (N,3,640,480) uint8, ``rawDepths``
    (N,640,480) float32 metres and ``sceneTypes`` (1,N) references to uint16 char arrays, as MATLAB writes
    them. Returns the row-major arrays written (``images`` (N,480,640,3), ``rawDepths`` (N,480,640))."""
    import h5py

    rng = np.random.default_rng(seed)
    n = len(scene_types)
    images = np.stack([cheap_nyu_image(rng) for _ in range(n)])
    raw = rng.uniform(0.5, 9.5, (n, 480, 640)).astype(np.float32)
    raw[:, :20, :] = 0.0  # rawDepths has holes
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images.transpose(0, 3, 2, 1))
        f.create_dataset("rawDepths", data=raw.transpose(0, 2, 1))
        refs = f.create_group("#refs#")
        ref_list = []
        for i, s in enumerate(scene_types):
            ds = refs.create_dataset(f"s{i}", data=np.array([[ord(c)] for c in s], dtype=np.uint16))
            ref_list.append(ds.ref)
        f.create_dataset("sceneTypes", data=np.array([ref_list], dtype=h5py.ref_dtype))
    return {"images": images, "rawDepths": raw}


def write_splits(path: str, train_idx: list[int], test_idx: list[int]):
    """``splits.mat`` (MATLAB v5) with 1-based ``trainNdxs`` / ``testNdxs`` column vectors."""
    import scipy.io

    scipy.io.savemat(path, {"trainNdxs": np.array(train_idx, dtype=np.float64).reshape(-1, 1) + 1,
                            "testNdxs": np.array(test_idx, dtype=np.float64).reshape(-1, 1) + 1})


def write_fastdepth(root: str, train_scenes: dict[str, int], num_val: int, seed: int = 0):
    """The extracted FastDepth tarball: ``nyudepthv2/{train/<scene>,val/official}/NNNNN.h5`` with ``rgb``
    (3,480,640) uint8 and ``depth`` (480,640) float32 metres."""
    import h5py

    rng = np.random.default_rng(seed)
    layout = [("train", s, n) for s, n in train_scenes.items()] + [("val", "official", num_val)]
    for split, scene, n in layout:
        d = os.path.join(root, "nyudepthv2", split, scene)
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            with h5py.File(os.path.join(d, f"{i + 1:05d}.h5"), "w") as f:
                f.create_dataset("rgb", data=cheap_nyu_image(rng).transpose(2, 0, 1))
                f.create_dataset("depth", data=rng.uniform(0.5, 9.5, (480, 640)).astype(np.float32))
