"""Writers of small NYUv2 trees in the real on-disk layouts (BTS sync tree and list, official test tree,
mmseg, labeled .mat + splits.mat, FastDepth h5) and of plain folders of image/depth pairs (``--source folder``),
filled with synthetic scenes, and of a small KITTI tree (raw drives, annotated depth, Eigen-split lists) filled
with generated streets; for tests and demos without the real datasets."""

from __future__ import annotations

import dataclasses
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


# --- KITTI ---------------------------------------------------------------------------------------------------

KITTI_SIZE = (375, 1242)  # the 2011_09_26 drives; other days are 370x1224, 374x1238, 376x1241, ...
KITTI_CAMERA_HEIGHT = 1.65  # metres above the road
KITTI_MAX_DEPTH = 80.0


def _hash01(ix: np.ndarray, iz: np.ndarray, seed: int) -> np.ndarray:
    """A value in [0, 1) per integer cell (ix, iz): texture fixed to the world, so it shrinks with distance."""
    ix, iz = (np.where(np.isfinite(v), v, 0).astype(np.int64) for v in (ix, iz))
    h = (ix * 73856093) ^ (iz * 19349663) ^ (seed * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF).astype(np.float32) / np.float32(65536.0)


@dataclasses.dataclass
class _Street:
    """One drive's world: a straight road along +z, building facades on both sides, parked cars, trees."""

    road_half: float
    walls: tuple[float, float]  # lateral distance of the left and right facades
    blocks: list  # per side: (z edges, heights, colours) of the facade segments (height 0: a gap)
    cars: list  # (x centre, z of the rear face, width, height, colour)
    trees: list  # (x, z, trunk height, crown radius)


def _make_street(rng: np.random.Generator) -> _Street:
    road_half = float(rng.uniform(3.0, 4.5))
    walls = (float(road_half + rng.uniform(3.0, 6.0)), float(road_half + rng.uniform(3.0, 6.0)))
    blocks = []
    for _ in range(2):
        edges = np.cumsum(rng.uniform(8.0, 22.0, 24)) - 20.0
        heights = np.where(rng.random(24) < 0.2, 0.0, rng.uniform(4.0, 16.0, 24))
        colours = rng.uniform(70, 210, (24, 3)) * np.array([1.0, 0.95, 0.85])
        blocks.append((edges, heights, colours))
    cars = []
    for z in np.cumsum(rng.uniform(6.0, 14.0, 30)):
        side = rng.choice([-1.0, 1.0, 0.0], p=[0.45, 0.45, 0.1])
        x = side * (road_half - 1.1) if side else float(rng.uniform(-1.0, 1.0))
        cars.append((x, float(z), float(rng.uniform(1.6, 1.9)), float(rng.uniform(1.3, 1.7)),
                     rng.uniform(20, 230, 3)))
    trees = [(float(s * rng.uniform(road_half + 1.0, road_half + 2.5)), float(z), float(rng.uniform(2.0, 3.0)),
              float(rng.uniform(1.2, 2.2))) for z in np.cumsum(rng.uniform(8.0, 18.0, 16))
             for s in (rng.choice([-1.0, 1.0]),)]
    return _Street(road_half, walls, blocks, cars, trees)


def road_scene(seed: int, drive: int, frame: int, height: int = KITTI_SIZE[0], width: int = KITTI_SIZE[1],
               focal: float = 721.5377) -> tuple[np.ndarray, np.ndarray]:
    """A generated street seen from a KITTI-like camera (1.65 m above the road, focal scaled from the 1242-pixel
    width): ``(image uint8 (H, W, 3) RGB, dense depth float32 metres, 0 for the sky)``. The road's depth falls
    toward the bottom rows; facades, parked cars and trees stand on it; colours fade into the haze with
    distance. ``frame`` moves the camera 0.8 m forward along the drive; everything is fixed by (seed, drive)."""
    with np.errstate(divide="ignore", invalid="ignore"):  # rays that never meet a surface carry inf and nan
        return _road_scene(seed, drive, frame, height, width, focal)


def _road_scene(seed, drive, frame, height, width, focal):
    rng = np.random.default_rng([seed, drive])
    st = _make_street(rng)
    f = focal * width / KITTI_SIZE[1]
    cx, cy = width / 2.0, height * (172.85 / KITTI_SIZE[0])
    cam_z = 0.8 * frame
    hc = KITTI_CAMERA_HEIGHT
    a = ((np.arange(width, dtype=np.float32) + 0.5 - cx) / f)[None, :]  # x / z of each column's ray
    b = ((np.arange(height, dtype=np.float32) + 0.5 - cy) / f)[:, None]  # y / z of each row's ray (y down)
    a2, b2 = np.broadcast_arrays(a, b)
    depth = np.full((height, width), np.inf, np.float32)
    img = np.zeros((height, width, 3), np.float32)

    def paint(mask, z, colour, box=(slice(None), slice(None))):
        d, im = depth[box], img[box]
        mask = mask & (z > 0.5) & (z < d)
        d[mask] = z[mask]
        im[mask] = colour[mask] if np.ndim(colour) == 3 else colour

    def crop(z, x0, x1, y0, y1):
        """The crop of the rows and columns that a fronto-parallel rectangle at depth z can cover, its rays'
        (x, y) at that depth, and the constant depth; None when it is behind the camera or off the image."""
        if z < 0.5 or z > 150.0:
            return None
        u0, u1 = int(max(np.floor(cx + f * x0 / z), 0)), int(min(np.ceil(cx + f * x1 / z) + 1, width))
        v0, v1 = int(max(np.floor(cy + f * y0 / z), 0)), int(min(np.ceil(cy + f * y1 / z) + 1, height))
        if u0 >= u1 or v0 >= v1:
            return None
        box = (slice(v0, v1), slice(u0, u1))
        return box, a2[box] * z, b2[box] * z, np.full((v1 - v0, u1 - u0), z, np.float32)

    # Road, pavements and verges: the plane y = hc.
    zg = np.where(b2 > 0, hc / np.maximum(b2, 1e-6), np.inf).astype(np.float32)
    xg, wz = a2 * zg, zg + cam_z
    grain = _hash01(np.floor(xg * 4), np.floor(wz * 4), seed)[..., None]
    road = np.array([88.0, 88.0, 92.0]) + 30.0 * (grain - 0.5)
    pave = np.array([150.0, 145.0, 135.0]) + 25.0 * (grain - 0.5)
    grass = np.array([70.0, 120.0, 50.0]) + 40.0 * (grain - 0.5)
    ax = np.abs(xg)[..., None]
    colour = np.where(ax < st.road_half, road, np.where(ax < st.road_half + 2.0, pave, grass))
    lane = (np.abs(xg) < 0.08) & (np.mod(wz, 6.0) < 3.0)
    colour[lane] = 235.0
    paint(np.isfinite(zg), zg, colour)

    # Facades (planes x = -walls[0] and x = +walls[1]) in blocks of varying height, with windows.
    for side, (wall, (edges, heights, colours)) in zip((-1.0, 1.0), zip(st.walls, st.blocks)):
        zw = np.where(a2 * side > 1e-6, wall / np.abs(a2), np.inf).astype(np.float32)
        yw, wzw = b2 * zw, zw + cam_z
        k = np.clip(np.searchsorted(edges, wzw), 0, len(edges) - 1)
        top = hc - heights[k]
        col = colours[k].copy()
        window = (np.mod(wzw, 2.6) < 1.3) & (np.mod(hc - yw, 3.0) > 1.2) & (hc - yw > 1.0)
        col[window] = col[window] * 0.35 + np.array([20.0, 30.0, 45.0])
        paint(np.isfinite(zw) & (yw <= hc) & (yw >= top), zw, col)

    # Trees: a trunk and a round crown, each at one depth.
    for x, z, trunk, radius in st.trees:
        top = hc - trunk - 1.8 * radius
        win = crop(z - cam_z, x - radius, x + radius, top, hc)
        if win is None:
            continue
        box, xt, yt, zt = win
        paint((np.abs(xt - x) < 0.15) & (yt <= hc) & (yt >= hc - trunk), zt, np.array([90.0, 65.0, 40.0]), box)
        crown = (xt - x) ** 2 + (yt - (hc - trunk - radius * 0.8)) ** 2 < radius ** 2
        grain = _hash01(np.floor(xt * 6), np.floor(yt * 6), seed + 1)[..., None]
        paint(crown, zt, np.array([40.0, 100.0, 35.0]) + 50.0 * (grain - 0.5), box)

    # Cars: the rear face, a darker window band, lights, wheels.
    for x, z, w, h, body in st.cars:
        win = crop(z - cam_z, x - w / 2, x + w / 2, hc - h, hc)
        if win is None:
            continue
        box, xc, yc, zc = win
        xc = xc - x
        col = np.broadcast_to(body, (*zc.shape, 3)).copy()
        col[(yc < hc - h + 0.45) & (np.abs(xc) < w / 2 - 0.15)] = np.array([35.0, 40.0, 50.0])
        col[(np.abs(np.abs(xc) - w / 2 + 0.25) < 0.15) & (np.abs(yc - (hc - 0.8)) < 0.1)] = np.array([200.0, 30, 30])
        paint((np.abs(xc) < w / 2) & (yc <= hc - 0.15) & (yc >= hc - h), zc, col, box)
        paint((np.abs(np.abs(xc) - w / 2 + 0.3) < 0.2) & (yc > hc - 0.15) & (yc <= hc), zc,
              np.array([15.0, 15.0, 15.0]), box)

    # Sky, then haze over distance.
    sky_top, sky_low = np.array([90.0, 140.0, 215.0]), np.array([205.0, 220.0, 235.0])
    t = np.clip((np.arange(height) / max(cy, 1.0)), 0.0, 1.0)[:, None, None]
    sky = sky_top * (1 - t) + sky_low * t
    sky = np.broadcast_to(sky, img.shape)
    finite = np.isfinite(depth)
    img[~finite] = sky[~finite]
    fog = (1.0 - np.exp(-np.where(finite, depth, 0.0) / 120.0))[..., None]
    img = img * (1 - fog) + sky_low * fog
    img += rng.normal(0.0, 3.0, img.shape)
    out_depth = np.where(finite, depth, 0.0).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), out_depth


def lidar_depth(depth: np.ndarray, rng: np.random.Generator, keep: float = 0.2) -> np.ndarray:
    """Sparse uint16 ground truth (metres * 256, 0 = none) from a dense depth map, like the annotated KITTI maps:
    nothing in the top 30% of the rows (above the LiDAR's field of view) or in the sky, about ``keep`` of the
    other pixels, only 1-80 m."""
    h = depth.shape[0]
    mask = (rng.random(depth.shape) < keep) & (depth >= 1.0) & (depth <= KITTI_MAX_DEPTH)
    mask[: int(0.3 * h)] = False
    return np.where(mask, np.clip(np.round(depth * 256.0), 1, 65535), 0).astype(np.uint16)


@dataclasses.dataclass
class KittiTree:
    """What :func:`write_kitti_tree` wrote: the roots, the two Eigen lists and what preparing them should give."""

    raw: str
    depth: str
    train_list: str
    test_list: str
    # (image path as listed, depth file on disk) of the lines with ground truth, in list order
    train: list[tuple[str, str]]
    test: list[tuple[str, str]]
    no_gt: dict[str, int]  # split -> lines listed with None
    depth_missing: dict[str, int]  # split -> lines whose depth file is absent


# (date, drive, focal, where data_depth_annotated keeps its depth, split of the list it goes to)
_KITTI_DRIVES = (("2011_09_26", "2011_09_26_drive_0002_sync", 721.5377, "train", "train"),
                 ("2011_09_26", "2011_09_26_drive_0009_sync", 721.5377, "train", "train"),
                 ("2011_09_29", "2011_09_29_drive_0071_sync", 718.3351, "val", "test"))


def write_kitti_tree(root: str, height: int = KITTI_SIZE[0], width: int = KITTI_SIZE[1], frames_per_drive: int = 3,
                     seed: int = 0, other_size: tuple[int, int] | None = None) -> KittiTree:
    """A small KITTI tree under ``root``: ``raw/<date>/<drive>/image_02/data/<frame>.png`` for three drives on
    two days, ``data_depth_annotated/{train,val}/<drive>/proj_depth/groundtruth/image_02/<frame>.png`` (sparse,
    uint16 metres * 256) and Eigen-format ``eigen_train_files_with_gt.txt`` / ``eigen_test_files_with_gt.txt``.

    Each drive has ``frames_per_drive`` frames with depth (numbered from 5, like the annotated maps, which lack a
    drive's first and last frames) plus frames 0 and 1 without. The train list (the first two drives, depth in
    ``train/``) and the test list (the third, the second day, depth in ``val/``) list their frames in a shuffled
    order, plus one ``None`` line (frame 0) and one line whose depth file does not exist (frame 1). Images of the
    second day are ``other_size`` (default: the same size).
    """
    rng = np.random.default_rng(seed)
    raw, depth_root = os.path.join(root, "raw"), os.path.join(root, "data_depth_annotated")
    lines = {"train": [], "test": []}
    for d, (date, drive, focal, folder, split) in enumerate(_KITTI_DRIVES):
        h, w = (height, width) if other_size is None or date == _KITTI_DRIVES[0][0] else other_size
        entries = []
        for frame in [0, 1] + list(range(5, 5 + frames_per_drive)):
            image_rel = f"{date}/{drive}/image_02/data/{frame:010d}.png"
            depth_rel = f"{drive}/proj_depth/groundtruth/image_02/{frame:010d}.png"
            image, dense = road_scene(seed, d, frame, h, w, focal)
            _imwrite(os.path.join(raw, image_rel), image[..., ::-1])
            if frame == 0:
                entries.append((f"{image_rel} None {focal}", None))
            elif frame == 1:
                entries.append((f"{image_rel} {depth_rel} {focal}", None))
            else:
                depth_path = os.path.join(depth_root, folder, depth_rel)
                _imwrite(depth_path, lidar_depth(dense, rng))
                entries.append((f"{image_rel} {depth_rel} {focal}", (image_rel, depth_path)))
        lines[split] += entries
    trees = {}
    for split in ("train", "test"):
        order = rng.permutation(len(lines[split]))
        chosen = [lines[split][i] for i in order]
        path = os.path.join(root, f"eigen_{split}_files_with_gt.txt")
        with open(path, "w") as f:
            f.write("\n".join(line for line, _ in chosen) + "\n")
        trees[split] = (path, [pair for _, pair in chosen if pair is not None])
    per_drive = {split: sum(1 for dr in _KITTI_DRIVES if dr[4] == split) for split in lines}  # one line of each
    return KittiTree(raw=raw, depth=depth_root, train_list=trees["train"][0], test_list=trees["test"][0],
                     train=trees["train"][1], test=trees["test"][1], no_gt=dict(per_drive),
                     depth_missing=dict(per_drive))


# --- folders of image/depth pairs ------------------------------------------------------------------------

def write_exr(path: str, channels: dict[str, np.ndarray]) -> None:
    """An EXR file of float channels (``{"Z": depth}``), written with the OpenEXR package."""
    import OpenEXR

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    OpenEXR.File(header, {k: np.ascontiguousarray(v) for k, v in channels.items()}).write(path)


FOLDER_LAYOUTS = ("nested", "flat", "stems")
FOLDER_DEPTH_FORMATS = ("png16", "png8", "npy", "tiff", "exr")


def write_depth_folder(root: str, layout: str = "nested", depth_format: str = "png16", num_images: int = 6,
                       height: int = 48, width: int = 64, depth_scale: float = 1000.0, invalid: float = 0.0,
                       image_format: str = "jpg", seed: int = 0, frames_per_scene: int = 3) -> list[tuple[str, str]]:
    """Synthetic rooms as a folder of image/depth pairs; returns the (image, depth) paths relative to ``root``.

    Layouts: ``nested``: ``rgb/<scene>/frame_NNN.<image_format>`` + ``depth/<scene>/frame_NNN.<ext>`` (pairs by
    relative path; stems repeat across scenes); ``flat``: ``<scene>_NNN.<image_format>`` + ``<scene>_NNN.<ext>``
    in ``root``; ``stems``: ``rgb/<scene>/<scene>_NNN.<image_format>`` + ``depth/<scene>_NNN.<ext>`` (pairs only by
    the unique stem). Depth formats: ``png16`` (uint16 of metres * ``depth_scale``, rounded), ``png8`` (uint8,
    likewise), ``npy`` (float32 metres * scale), ``tiff`` (float32 TIFF, likewise), ``exr`` (float32 EXR, channel
    ``Z``). A 4x4 block in the top-left corner of every depth map holds ``invalid``.
    """
    if layout not in FOLDER_LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {FOLDER_LAYOUTS}")
    if depth_format not in FOLDER_DEPTH_FORMATS:
        raise ValueError(f"depth_format {depth_format!r}: expected one of {FOLDER_DEPTH_FORMATS}")
    ext = {"png16": ".png", "png8": ".png", "npy": ".npy", "tiff": ".tiff", "exr": ".exr"}[depth_format]
    pairs = []
    for sc in synthetic.iter_scenes(seed, num_images, height, width, "train", frames_per_scene):
        stem = f"{sc.scene_dir}_{sc.frame:03d}"
        img_rel, dep_rel = {
            "nested": (f"rgb/{sc.scene_dir}/frame_{sc.frame:03d}.{image_format}",
                       f"depth/{sc.scene_dir}/frame_{sc.frame:03d}{ext}"),
            "flat": (f"{stem}.{image_format}", f"{stem}{ext}"),
            "stems": (f"rgb/{sc.scene_dir}/{stem}.{image_format}", f"depth/{stem}{ext}"),
        }[layout]
        _imwrite(os.path.join(root, img_rel), sc.image[..., ::-1])
        stored = sc.depth.astype(np.float64) * depth_scale
        if depth_format in ("png16", "png8"):
            top = 65535 if depth_format == "png16" else 255
            stored = np.clip(np.round(stored), 0, top).astype(np.uint16 if depth_format == "png16" else np.uint8)
        else:
            stored = stored.astype(np.float32)
        stored[:4, :4] = invalid
        dep_path = os.path.join(root, dep_rel)
        if depth_format == "npy":
            os.makedirs(os.path.dirname(dep_path), exist_ok=True)
            np.save(dep_path, stored)
        elif depth_format == "exr":
            write_exr(dep_path, {"Z": stored})
        else:
            _imwrite(dep_path, stored)
        pairs.append((img_rel, dep_rel))
    return pairs


# --- ADE20K ----------------------------------------------------------------------------------------------------

def write_ade_tree(root: str, num_train: int = 4, num_val: int = 2, sizes=((40, 56), (48, 40), (36, 64)),
                   seed: int = 0) -> dict[str, list[str]]:
    """``ADEChallengeData2016``'s layout: ``images/{training,validation}/ADE_{train,val}_NNNNNNNN.jpg`` and
    ``annotations/<same>/<stem>.png`` (8-bit grey, 0 = other, 1..150 = ADE20K class + 1), filled with generated
    rooms of varying sizes (labels from ``synthetic.py``, with a band of "other" at the top-left). Returns the
    image file names per split."""
    out = {}
    for split, folder, prefix, n in (("train", "training", "ADE_train", num_train),
                                     ("validation", "validation", "ADE_val", num_val)):
        names = []
        for i in range(n):
            h, w = sizes[i % len(sizes)]
            sc = synthetic.generate_scene(seed, i, 0, h, w, "train" if split == "train" else "test")
            raw = sc.label.astype(np.uint8) + 1
            raw[: h // 6, : w // 3] = 0  # unlabelled ("other")
            stem = f"{prefix}_{i + 1:08d}"
            _imwrite(os.path.join(root, "images", folder, stem + ".jpg"), sc.image[..., ::-1])
            _imwrite(os.path.join(root, "annotations", folder, stem + ".png"), raw)
            names.append(stem + ".jpg")
        out[split] = names
    return out
