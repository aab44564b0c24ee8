"""Any folder of image/depth pairs as a ``depth_folder/<name>`` dataset (``prepare --source folder``).

Files: ``--images`` and ``--depths`` are globs (``**`` recursive; quote them so the shell leaves them alone) or
plain folders (every image file, ``.jpg .jpeg .png``, or depth file, ``.png .npy .tif .tiff .exr``, under it).
A glob's root is its leading run of path components without a wildcard. A file matched by both sides goes to
the side given as a glob when the other was a plain folder; two globs (or two folders) that match the same
file are a usage error.

Pairing: by the path relative to each side's root with the suffix dropped (``rgb/a/b/x.jpg`` <->
``depth/a/b/x.png``); an image left over pairs with a left-over depth file of the same stem (``x``) when that
stem names exactly one image and one depth file in all. Nothing else: ``x.jpg`` does not pair with
``x_depth.png``. Every file left unpaired is reported by name and skipped (``--strict``: the first stops the
build).

Images: 8-bit JPEG or PNG of any size. The file's bytes are stored unchanged when ``cv2.imread`` would give the
very pixels decoded as they are (8-bit, 3 channels, no EXIF rotation); grey, RGBA and EXIF-rotated images are
stored as the PNG of what ``cv2.imread`` gives. So the stored pixels are always ``cv2.imread(path)[..., ::-1]``.

Depth: a 2-D map, 8- or 16-bit PNG, ``.npy`` (any numeric dtype), TIFF (``cv2`` reads float32 TIFF) or EXR
(read with the ``OpenEXR`` package: its one channel, or the first of ``Z``, ``depth``, ``Y``, ``R``).
metres = float32(value) / float32(``depth_scale``); the ``invalid`` value, negative and non-finite values become 0
(no depth). The map must have its image's height and width.

Splits ``train`` and ``val``: ``val_list`` (a file of image relative paths, with or without suffix, or stems;
one a line) or ``val_fraction``: the ``round(fraction * n)`` pairs (at least 1 when there are 2 or more, at
most n - 1) whose relative image paths have the smallest SHA-1 hashes, so the choice is deterministic and
stays mostly the same when files are added. Both splits are in sorted order of the relative image path.

Scenes (``scene_from``): ``parent`` (the image's parent folder name), ``none`` ("") or a file mapping keys to
scene names: a JSON object, or text lines ``<key> <scene name...>`` (``#`` comments). A key is an image's
relative path (with or without suffix), its file name or stem, or one of its parent folders (relative path or
name); the most specific match wins. Images with no entry get "".
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from typing import Callable

import numpy as np

from vpd_jax.data import builder
from vpd_jax.data.sources import BadInput, Item, _read
from vpd_jax.errors import UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEPTH_SUFFIXES = (".png", ".npy", ".tif", ".tiff", ".exr")
DEFAULT_VAL_FRACTION = 0.05
_WILDCARD = re.compile(r"[*?\[]")


@dataclasses.dataclass(frozen=True)
class Files:
    """What one of ``--images`` / ``--depths`` matched: the root and the matched files (absolute, sorted)."""

    flag: str
    spec: str
    root: str
    paths: tuple[str, ...]
    is_glob: bool

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")


@dataclasses.dataclass(frozen=True)
class Pair:
    image: str  # absolute paths
    depth: str
    rel: str  # the image's path relative to the images root: the example's file_name

    @property
    def key(self) -> str:
        return os.path.splitext(self.rel)[0]

    @property
    def stem(self) -> str:
        return os.path.splitext(os.path.basename(self.rel))[0]


@dataclasses.dataclass
class FolderPlan:
    """Everything :func:`plan` decided before any file is read: the pairs of each split, their scenes, and what
    was reported."""

    name: str
    splits: dict[str, list[Pair]]
    scenes: dict[str, str]  # rel -> scene
    unpaired: int = 0
    unmatched_val_names: int = 0
    no_scene: int = 0  # images the scene file does not name

    def split_items(self, depth_scale: float, invalid: float) -> tuple[dict[str, Callable], dict[str, int]]:
        plan, sizes = {}, {}
        for split, pairs in self.splits.items():
            if pairs:
                items = [pair_item(p, self.scenes.get(p.rel, ""), depth_scale, invalid) for p in pairs]
                plan[split], sizes[split] = (lambda items=items: items), len(items)
        return plan, sizes


def glob_root(pattern: str) -> str:
    """The leading path components of ``pattern`` that hold no wildcard (``DIR/**/*.jpg`` -> ``DIR``)."""
    parts = pattern.split("/")
    fixed = []
    for part in parts[:-1]:
        if _WILDCARD.search(part):
            break
        fixed.append(part)
    root = "/".join(fixed)
    if pattern.startswith("/") and not root:
        root = "/"
    return root or "."


def _walk(root: str, suffixes: tuple[str, ...]) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out += [os.path.join(d, f) for f in files if not f.startswith(".") and f.lower().endswith(suffixes)]
    return out


def expand(flag: str, spec: str, suffixes: tuple[str, ...]) -> Files:
    """The files of ``--images`` / ``--depths``: a glob (``**`` recursive) or a plain folder (``suffixes``)."""
    spec_x = os.path.expanduser(spec)
    if _WILDCARD.search(spec_x):
        paths = [p for p in glob.glob(spec_x, recursive=True) if os.path.isfile(p)]
        root, is_glob = glob_root(spec_x), True
        if not paths:
            raise UsageError(f"{flag} {spec!r}: matches no files")
    elif os.path.isdir(spec_x):
        root, is_glob = spec_x, False
        paths = _walk(root, suffixes)
        if not paths:
            raise UsageError(f"{flag} {spec}: no {'/'.join(suffixes)} files under this folder")
    elif os.path.isfile(spec_x):
        root, is_glob, paths = os.path.dirname(spec_x) or ".", True, [spec_x]
    else:
        raise UsageError(f"{flag} {spec}: no such file or folder (expected a glob such as 'DIR/**/*.jpg' "
                         "or a folder)")
    root = os.path.abspath(root)
    return Files(flag, spec, root, tuple(sorted(os.path.abspath(p) for p in paths)), is_glob)


def _split_overlap(images: Files, depths: Files) -> tuple[Files, Files]:
    both = set(images.paths) & set(depths.paths)
    if not both:
        return images, depths
    if images.is_glob == depths.is_glob:
        first = sorted(both)[0]
        raise UsageError(f"{first}: matched by both --images {images.spec!r} and --depths {depths.spec!r} "
                         f"({len(both)} files); narrow one of them (e.g. --images 'DIR/**/*.jpg')")
    if images.is_glob:  # the explicit glob wins the shared files
        depths = dataclasses.replace(depths, paths=tuple(p for p in depths.paths if p not in both))
    else:
        images = dataclasses.replace(images, paths=tuple(p for p in images.paths if p not in both))
    for f in (images, depths):
        if not f.paths:
            raise UsageError(f"{f.flag} {f.spec}: every file it matches is claimed by the other side")
    return images, depths


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _stem(rel: str) -> str:
    return os.path.splitext(os.path.basename(rel))[0]


def pair_files(images: Files, depths: Files, bad: Callable[[BadInput], None]) -> tuple[list[Pair], int]:
    """Pairs by relative path without suffix, then by unique stem; every left-over file goes to ``bad`` (one
    message naming it). Returns (pairs sorted by image path, number of files reported)."""
    images, depths = _split_overlap(images, depths)
    reported = 0

    def by_key(files: Files) -> dict[str, str]:
        nonlocal reported
        out = {}
        for p in files.paths:
            key = os.path.splitext(files.rel(p))[0]
            if key in out:
                reported += 1
                bad(BadInput(f"{p}: same name apart from the suffix as {out[key]}; only the first is used"))
                continue
            out[key] = p
        return out

    img_by_key, dep_by_key = by_key(images), by_key(depths)
    pairs = {k: Pair(img_by_key[k], dep_by_key[k], images.rel(img_by_key[k])) for k in img_by_key
             if k in dep_by_key}
    left_img = {k: p for k, p in img_by_key.items() if k not in pairs}
    left_dep = {k: p for k, p in dep_by_key.items() if k not in pairs}
    img_stems: dict[str, list[str]] = {}
    dep_stems: dict[str, list[str]] = {}
    for k in img_by_key:
        img_stems.setdefault(_stem(k), []).append(k)
    for k in dep_by_key:
        dep_stems.setdefault(_stem(k), []).append(k)

    def why(key: str, root: str, other_side: str) -> str:
        s = _stem(key)
        n_img, n_dep = len(img_stems.get(s, [])), len(dep_stems.get(s, []))
        if n_img > 1 or n_dep > 1:
            return (f"no {key}.* under {root}; its stem {s!r} is not unique ({_count(n_img, 'image')}, "
                    f"{_count(n_dep, 'depth file')})")
        return f"no {key}.* under {root}, nor an unpaired {other_side} named {s}.*"

    for k, p in sorted(left_img.items()):
        cands = dep_stems.get(_stem(k), [])
        if len(img_stems[_stem(k)]) == 1 and len(cands) == 1 and cands[0] in left_dep:
            pairs[k] = Pair(p, left_dep.pop(cands[0]), images.rel(p))
            continue
        reported += 1
        bad(BadInput(f"{p}: image with no depth map ({why(k, depths.root, 'depth file')})"))
    for k, p in sorted(left_dep.items()):
        reported += 1
        bad(BadInput(f"{p}: depth map with no image ({why(k, images.root, 'image')})"))
    return sorted(pairs.values(), key=lambda q: q.rel), reported


def default_name(images_root: str) -> str:
    """The images' root folder name as a dataset name: lower case, other characters turned into ``_`` (none at
    either end)."""
    base = os.path.basename(os.path.normpath(os.path.abspath(images_root)))
    name = re.sub(r"[^a-z0-9_]", "_", base.lower()).strip("_")
    return name or "folder"


# --- splits -------------------------------------------------------------------------------------------------


def _hash(rel: str) -> str:
    return hashlib.sha1(rel.encode()).hexdigest()


def val_count(fraction: float, n: int) -> int:
    """``round(fraction * n)``, at least 1 when ``n >= 2`` and at most ``n - 1`` (0 for a fraction of 0)."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(round(fraction * n), 1), n - 1)


def split_by_fraction(pairs: list[Pair], fraction: float) -> dict[str, list[Pair]]:
    k = val_count(fraction, len(pairs))
    val = {p.rel for p in sorted(pairs, key=lambda p: (_hash(p.rel), p.rel))[:k]}
    return {"train": [p for p in pairs if p.rel not in val], "val": [p for p in pairs if p.rel in val]}


def split_by_list(pairs: list[Pair], list_file: str, warn: Callable[[BadInput], None]) -> tuple[dict, int]:
    """Pairs named in ``list_file`` (relative path with or without suffix, or a stem naming one pair) go to val;
    a line matching no pair (or an ambiguous stem) goes to ``warn``. Returns (splits, lines reported)."""
    index: dict[str, set[str]] = {}
    for p in pairs:
        for key in (p.rel, p.key, p.stem):
            index.setdefault(key, set()).add(p.rel)
    try:
        with open(list_file) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{list_file}: no such file (--val_list)") from None
    val, reported = set(), 0
    for n, line in enumerate(lines, 1):
        name = _norm_key(line) if not line.strip().startswith("#") else ""
        if not name:
            continue
        hits = index.get(name, set())
        if len(hits) == 1:
            val |= hits
            continue
        reported += 1
        why = "matches no image/depth pair" if not hits else f"is the stem of {len(hits)} images; give the path"
        warn(BadInput(f"{list_file}:{n}: {name!r} {why}"))
    return {"train": [p for p in pairs if p.rel not in val], "val": [p for p in pairs if p.rel in val]}, reported


# --- scenes -------------------------------------------------------------------------------------------------


def _norm_key(key: str) -> str:
    key = key.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key.strip("/")


def read_scene_file(path: str) -> dict[str, str]:
    """``{key: scene}`` from a JSON object or ``<key> <scene name...>`` lines."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (--scene_from expects parent, none or a file)") from None
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        bad = [k for k, v in obj.items() if not isinstance(v, str)]
        if bad:
            raise UsageError(f"{path}: the scene of {bad[0]!r} is {obj[bad[0]]!r}; expected a string")
        return {_norm_key(k): v for k, v in obj.items()}
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise UsageError(f"{path}:{n}: expected '<image path, stem or folder> <scene name>', got {line!r}")
        key = _norm_key(parts[0])
        if key in out:
            raise UsageError(f"{path}:{n}: {parts[0]!r} is listed twice")
        out[key] = parts[1].strip()
    return out


def scene_keys(rel: str) -> list[str]:
    """The keys that can name ``rel``'s scene, most specific first."""
    key, base = os.path.splitext(rel)[0], os.path.basename(rel)
    keys = [rel, key, base, os.path.splitext(base)[0]]
    folder = os.path.dirname(rel)
    while folder:
        keys += [folder, os.path.basename(folder)]
        folder = os.path.dirname(folder)
    return keys


def scene_of(pair: Pair, scene_from: str, table: dict[str, str] | None) -> str | None:
    """The pair's scene; None when ``table`` has no entry for it."""
    if scene_from == "none":
        return ""
    if scene_from == "parent":
        return os.path.basename(os.path.dirname(pair.image))
    for k in scene_keys(pair.rel):
        if k in table:
            return table[k]
    return None


# --- reading ------------------------------------------------------------------------------------------------


EXR_DEPTH_CHANNELS = ("Z", "depth", "Y", "R")  # tried in this order when an EXR file has several channels


def exr_supported() -> bool:
    """Whether the ``OpenEXR`` package (requirements.txt) is installed."""
    import importlib.util

    return importlib.util.find_spec("OpenEXR") is not None


def read_exr(path: str) -> np.ndarray:
    """The depth channel of an EXR file (its only channel, or the first of ``EXR_DEPTH_CHANNELS``)."""
    import OpenEXR

    if not os.path.isfile(path):
        raise BadInput(f"{path}: depth map does not exist")
    try:
        with OpenEXR.File(path, separate_channels=True) as f:
            channels = {name: np.asarray(c.pixels) for name, c in f.channels().items()}
    except Exception as e:  # noqa: BLE001 - OpenEXR raises RuntimeError and others for damaged files
        raise BadInput(f"{path}: corrupt or unreadable EXR depth map ({' '.join(str(e).split())[:160]})") from None
    if len(channels) == 1:
        return next(iter(channels.values()))
    for name in EXR_DEPTH_CHANNELS:
        if name in channels:
            return channels[name]
    raise BadInput(f"{path}: EXR channels {sorted(channels)}; expected one channel or one named "
                   f"{', '.join(EXR_DEPTH_CHANNELS)}")


def load_image(path: str) -> tuple[bytes, tuple[int, int]]:
    """(bytes to store, (H, W)): the file's own bytes when they decode to ``cv2.imread``'s pixels, else a PNG of
    those pixels."""
    import cv2

    data = _read(path, "image")
    buf = np.frombuffer(data, np.uint8)
    raw = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if data else None
    if raw is None:
        raise BadInput(f"{path}: corrupt or unreadable image")
    if raw.dtype != np.uint8:
        raise BadInput(f"{path}: expected an 8-bit image, got {raw.dtype}")
    if raw.ndim == 3 and raw.shape[2] not in (1, 3, 4):
        raise BadInput(f"{path}: expected a grey, RGB or RGBA image, got {raw.shape[2]} channels")
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)  # what cv2.imread gives: EXIF rotation applied, 3 channels
    if img is None:
        raise BadInput(f"{path}: corrupt or unreadable image")
    if raw.shape == img.shape and np.array_equal(raw, img):
        return data, img.shape[:2]
    ok, enc = cv2.imencode(".png", img)
    if not ok:
        raise BadInput(f"{path}: could not re-encode the image as PNG")
    return enc.tobytes(), img.shape[:2]


def read_depth_values(path: str) -> np.ndarray:
    """The depth file's stored values as a 2-D array (no scaling)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise BadInput(f"{path}: depth map does not exist") from None
        except (OSError, ValueError, EOFError) as e:
            raise BadInput(f"{path}: corrupt or unreadable .npy depth map ({' '.join(str(e).split())})") from None
    elif ext == ".exr":
        arr = read_exr(path)
    elif ext in (".png", ".tif", ".tiff"):
        import cv2

        data = _read(path, "depth map")
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
        if arr is None:
            raise BadInput(f"{path}: corrupt or unreadable depth map")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
    else:
        raise BadInput(f"{path}: unsupported depth file type {ext or '(none)'!r}; expected "
                       f"{', '.join(DEPTH_SUFFIXES)}")
    if arr.ndim != 2:
        raise BadInput(f"{path}: expected a single-channel (2-D) depth map, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise BadInput(f"{path}: expected numeric depth values, got {arr.dtype}")
    return arr


def to_metres(values: np.ndarray, depth_scale: float, invalid: float) -> np.ndarray:
    """float32(values) / float32(depth_scale); ``invalid``, negative and non-finite values -> 0."""
    with np.errstate(invalid="ignore", over="ignore"):
        bad = values == invalid
        if np.issubdtype(values.dtype, np.floating):
            bad |= ~np.isfinite(values)
        bad |= values < 0
        depth = values.astype(np.float32) / np.float32(depth_scale)
        bad |= ~np.isfinite(depth)
    depth[bad] = 0.0
    return depth


def pair_item(pair: Pair, scene: str, depth_scale: float, invalid: float) -> Item:
    def load():
        image, (h, w) = load_image(pair.image)
        values = read_depth_values(pair.depth)
        if values.shape != (h, w):
            raise BadInput(f"{pair.depth}: depth map is {values.shape[0]}x{values.shape[1]} but its image "
                           f"{pair.image} is {h}x{w}")
        return {"image": image, "depth": to_metres(values, depth_scale, invalid), "scene": scene,
                "file_name": pair.rel, "class_id": builder.NO_CLASS, "class_id_mmseg": builder.NO_CLASS}

    return Item(pair.rel, load)


# --- the plan -----------------------------------------------------------------------------------------------


def plan(images: str, depths: str, *, name: str | None = None, val_fraction: float | None = None,
         val_list: str | None = None, scene_from: str = "parent",
         report: builder.PrepareReport | None = None) -> FolderPlan:
    """Finds and pairs the files, splits them and assigns scenes, before anything is read. Unpaired files are
    ``report.bad`` (skipped, counted); val-list names matching no pair are logged as warnings. Under
    ``report.strict`` either raises :class:`BadInput`."""
    report = report or builder.PrepareReport()

    def warn(e: BadInput):
        report.log(f"warning: {e}")
        if report.strict:
            raise e

    img_files = expand("--images", images, IMAGE_SUFFIXES)
    dep_files = expand("--depths", depths, DEPTH_SUFFIXES)
    name = name or default_name(img_files.root)
    builder.check_config_name(builder.FOLDER_NAME, name)
    table = None
    if scene_from not in ("parent", "none"):
        table = read_scene_file(scene_from)
    pairs, unpaired = pair_files(img_files, dep_files, report.bad)
    if not pairs:
        raise ValueError(f"no image/depth pairs: none of the {len(img_files.paths)} images under "
                         f"{img_files.root} pairs with one of the {len(dep_files.paths)} depth files under "
                         f"{dep_files.root} (same relative path or unique stem)")
    exr = sorted(p.depth for p in pairs if p.depth.lower().endswith(".exr"))
    if exr and not exr_supported():
        raise ValueError(f"{exr[0]}: reading EXR needs the OpenEXR package ({len(exr)} EXR depth files); "
                         "pip install -r requirements.txt, or convert them to .npy or float32 .tiff")
    unmatched = 0
    if val_list is not None:
        splits, unmatched = split_by_list(pairs, val_list, warn)
    else:
        splits = split_by_fraction(pairs, DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction)
    scenes, no_scene = {}, 0
    for p in pairs:
        s = scene_of(p, scene_from, table)
        if s is None:
            no_scene += 1
            s = ""
        scenes[p.rel] = s
    return FolderPlan(name, splits, scenes, unpaired=unpaired, unmatched_val_names=unmatched, no_scene=no_scene)
