"""Depth maps as files: colour pictures, side-by-side panels, 16-bit PNGs and point clouds.

* ``colorize`` / ``save_colormap_png``: a perceptual colormap (turbo by default) over the valid pixels, near =
  the colormap's first colour; optional colour bar with the scale in metres.
* ``save_panel``: image | ground truth | prediction, both depths on one colour scale (the training and
  evaluation logs' picture).
* ``save_depth_png16``: uint16 millimetres, 0 = no depth; the NYU / VPD release format.
* ``write_ply``: a coloured point cloud from depth and pinhole intrinsics (NYU's Kinect by default, scaled to
  the depth map's size).
* ``write_glb_points``: the same point cloud as binary glTF points (for web viewers that draw glTF, such as
  the app's 3-D view).

Every file is written to a temporary name in its folder and renamed into place, so a crash never leaves a
half-written file under the final name. Only numpy and PIL are imported at module level; matplotlib (for the
colormaps and tick placement) is imported on first use.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np

from vpd_jax.files import atomic_path

# NYU Depth v2 Kinect colour intrinsics at 640x480 (the values of the NYU toolbox and both VPD repos' loaders).
NYU_INTRINSICS = (518.8579, 519.4696, 325.5824, 253.7362)  # fx, fy, cx, cy
NYU_SIZE = (480, 640)  # (height, width) at which NYU_INTRINSICS hold
PNG16_SCALE = 1000.0  # 16-bit PNG units per metre (millimetres)
DEFAULT_CMAP = "turbo"


# ------------------------------------------------------------------------------------------- files

def save_npy(path: str | os.PathLike, depth_m) -> pathlib.Path:
    """float32 metres as ``.npy`` (atomic)."""
    path = pathlib.Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(depth_m, np.float32))
    return path


def save_png(path: str | os.PathLike, array: np.ndarray) -> pathlib.Path:
    """Write a uint8 (H, W[, 3]) or uint16 (H, W) array as PNG, atomically."""
    from PIL import Image

    path = pathlib.Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


# ------------------------------------------------------------------------------------------- depth

def valid_mask(depth) -> np.ndarray:
    """Pixels that hold a depth: finite and > 0."""
    d = np.asarray(depth, np.float32)
    return np.isfinite(d) & (d > 0)


def depth_to_png16(depth_m) -> np.ndarray:
    """uint16 millimetres, rounded; invalid pixels (<= 0, NaN, inf) -> 0; valid ones clipped to [1, 65535] mm."""
    d = np.asarray(depth_m, np.float32)
    if d.ndim != 2:
        raise ValueError(f"depth: expected an (H, W) map, got shape {d.shape}")
    ok = valid_mask(d)
    mm = np.zeros(d.shape, np.uint16)
    # A valid depth under 0.5 mm stays valid (1 mm) rather than turning into the "no depth" 0.
    mm[ok] = np.clip(np.rint(d[ok].astype(np.float64) * PNG16_SCALE), 1, 65535).astype(np.uint16)
    return mm


def save_depth_png16(path: str | os.PathLike, depth_m) -> pathlib.Path:
    """Write depth (metres) as a 16-bit grayscale PNG in millimetres (0 = invalid); atomic."""
    return save_png(pathlib.Path(path), depth_to_png16(depth_m))


def read_depth_png16(path: str | os.PathLike) -> np.ndarray:
    """A 16-bit millimetre PNG back to float32 metres (0 stays 0)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im, np.float32) / np.float32(PNG16_SCALE)


# ------------------------------------------------------------------------------------------- colour

def _lut(cmap: str) -> np.ndarray:
    import matplotlib

    try:
        cm = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown colormap {cmap!r} (any matplotlib name: turbo, viridis, magma, ...)") from None
    return np.rint(cm(np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def depth_range(*depths, vmin: float | None = None, vmax: float | None = None) -> tuple[float, float]:
    """(vmin, vmax): the given ones, else the min / max over the valid pixels of all ``depths`` (None skipped)."""
    vals = [np.asarray(d, np.float32)[valid_mask(d)] for d in depths if d is not None]
    vals = np.concatenate(vals) if vals else np.zeros((0,), np.float32)
    lo = float(vals.min()) if vmin is None and vals.size else (vmin if vmin is not None else 0.0)
    hi = float(vals.max()) if vmax is None and vals.size else (vmax if vmax is not None else 1.0)
    if hi <= lo:
        hi = lo + 1e-6
    return lo, hi


def colorize(depth, vmin: float | None = None, vmax: float | None = None, cmap: str = DEFAULT_CMAP, *,
             invalid_color: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) uint8 through ``cmap`` (any matplotlib name; "turbo", "viridis", ...).

    ``vmin``/``vmax`` default to the valid pixels' range; ``vmin`` gets the colormap's first colour. Invalid
    pixels (<= 0, NaN, inf) get ``invalid_color``.
    """
    d = np.asarray(depth, np.float32)
    if d.ndim != 2:
        raise ValueError(f"colorize: expected an (H, W) depth map, got shape {d.shape}")
    lo, hi = depth_range(d, vmin=vmin, vmax=vmax)
    ok = valid_mask(d)
    t = np.clip((np.where(ok, d, lo) - lo) / (hi - lo), 0.0, 1.0)
    out = _lut(cmap)[np.rint(t * 255).astype(np.int32)]
    out[~ok] = np.asarray(invalid_color, np.uint8)
    return out


def colorbar(height: int, vmin: float, vmax: float, cmap: str = DEFAULT_CMAP, *, width: int | None = None,
             unit: str = "m") -> np.ndarray:
    """A (height, width, 3) uint8 vertical colour bar (vmin at the top, as near = first colour) with ticks in metres."""
    from matplotlib.ticker import MaxNLocator
    from PIL import Image, ImageDraw, ImageFont

    font_size = int(np.clip(height // 30, 9, 24))
    bar_w = max(8, font_size)
    width = width or bar_w + font_size * 5
    margin = font_size  # room for the first and last labels
    canvas = np.full((height, width, 3), 255, np.uint8)
    span = max(height - 2 * margin, 2)
    ramp = _lut(cmap)[np.rint(np.linspace(0, 255, span)).astype(np.int32)]
    canvas[margin : margin + span, 2 : 2 + bar_w] = ramp[:, None, :]
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=font_size)
    except (TypeError, OSError):  # PIL without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    for tick in MaxNLocator(nbins=6).tick_values(vmin, vmax):
        if not vmin - 1e-9 <= tick <= vmax + 1e-9:
            continue
        y = margin + (tick - vmin) / (vmax - vmin) * (span - 1)
        draw.line([(2 + bar_w, y), (2 + bar_w + 3, y)], fill=(0, 0, 0))
        draw.text((bar_w + 7, y), f"{tick:g} {unit}", fill=(0, 0, 0), font=font, anchor="lm")
    return np.asarray(img)


def save_colormap_png(path: str | os.PathLike, depth, colorbar: bool = False, *, vmin: float | None = None,
                      vmax: float | None = None, cmap: str = DEFAULT_CMAP) -> pathlib.Path:
    """Colour-mapped depth as PNG, at the depth's size; ``colorbar=True`` appends a metre scale on the right."""
    lo, hi = depth_range(depth, vmin=vmin, vmax=vmax)
    rgb = colorize(depth, lo, hi, cmap)
    if colorbar:
        rgb = np.concatenate([rgb, _colorbar(rgb.shape[0], lo, hi, cmap)], axis=1)
    return save_png(pathlib.Path(path), rgb)


_colorbar = colorbar  # ``save_colormap_png``'s flag has the same name


def _as_rgb_uint8(image) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a.astype(np.float32)), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image: expected (H, W), (H, W, 1|3|4), got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return a[..., :3]


def _fit(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if rgb.shape[:2] == size:
        return rgb
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.NEAREST))


def make_panel(image, gt, pred, *, vmin: float | None = None, vmax: float | None = None,
               cmap: str = DEFAULT_CMAP, colorbar: bool = True) -> np.ndarray:
    """image | GT | prediction as one uint8 array; both depths on one scale (the GT's valid range by default,
    the prediction's when there is no GT). ``gt`` may be None (then image | prediction). Depth maps of
    another size than the image are shown resized (nearest) to its size."""
    img = _as_rgb_uint8(image)
    size = img.shape[:2]
    lo, hi = depth_range(gt if gt is not None and valid_mask(gt).any() else pred, vmin=vmin, vmax=vmax)
    parts = [img]
    if gt is not None:
        parts.append(_fit(colorize(gt, lo, hi, cmap), size))
    parts.append(_fit(colorize(pred, lo, hi, cmap), size))
    if colorbar:
        parts.append(_colorbar(size[0], lo, hi, cmap))
    return np.concatenate(parts, axis=1)


def save_panel(path: str | os.PathLike, image, gt, pred, **kw) -> pathlib.Path:
    """Write ``make_panel(image, gt, pred, **kw)`` as PNG (atomic)."""
    return save_png(pathlib.Path(path), make_panel(image, gt, pred, **kw))


# ------------------------------------------------------------------------------------------- 3-D

def scaled_intrinsics(height: int, width: int, intrinsics: Sequence[float] = NYU_INTRINSICS,
                      at_size: tuple[int, int] = NYU_SIZE) -> tuple[float, float, float, float]:
    """``(fx, fy, cx, cy)`` given at ``at_size`` (H, W) for an image resized to (height, width).

    Pixel centres sit at integer coordinates, so a principal point moves as ``(c + 0.5) * s - 0.5``.
    """
    fx, fy, cx, cy = map(float, intrinsics)
    sy, sx = height / at_size[0], width / at_size[1]
    return fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5


def depth_to_points(depth, intrinsics: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) float32 camera-frame points (x right, y down, z forward; metres) of the valid pixels, and the
    (H, W) mask that selected them in row-major order. ``intrinsics``: (fx, fy, cx, cy) at the depth's size;
    default NYU's, scaled from 640x480."""
    d = np.asarray(depth, np.float32)
    if d.ndim != 2:
        raise ValueError(f"depth: expected an (H, W) map, got shape {d.shape}")
    h, w = d.shape
    fx, fy, cx, cy = scaled_intrinsics(h, w) if intrinsics is None else map(float, intrinsics)
    ok = valid_mask(d)
    v, u = np.nonzero(ok)
    z = d[ok].astype(np.float64)
    pts = np.stack([(u - cx) * z / fx, (v - cy) * z / fy, z], axis=-1).astype(np.float32)
    return pts, ok


def write_ply(path: str | os.PathLike, depth, intrinsics: Sequence[float] | None = None, image=None, *,
              binary: bool = True) -> int:
    """Write the valid pixels of ``depth`` as a PLY point cloud (coloured from ``image`` if given); atomic.

    Coordinates as ``depth_to_points`` (OpenCV camera frame, metres). Returns the number of points.
    """
    pts, ok = depth_to_points(depth, intrinsics)
    n = len(pts)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if image is not None:
        rgb = _as_rgb_uint8(image)
        if rgb.shape[:2] != ok.shape:
            raise ValueError(f"write_ply: image {rgb.shape[:2]} and depth {ok.shape} differ in size")
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    verts = np.empty(n, dtype=fields)
    verts["x"], verts["y"], verts["z"] = pts[:, 0], pts[:, 1], pts[:, 2]
    if image is not None:
        cols = rgb[ok]
        verts["red"], verts["green"], verts["blue"] = cols[:, 0], cols[:, 1], cols[:, 2]
    ply_type = {"<f4": "float", "u1": "uchar"}
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0",
              "comment vpd-jax depth, camera frame: x right, y down, z forward, metres",
              f"element vertex {n}"]
    header += [f"property {ply_type[t]} {name}" for name, t in fields]
    header.append("end_header")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        if binary:
            f.write(verts.tobytes())
        else:
            fmt = " ".join(["%.6g"] * 3 + (["%d"] * 3 if image is not None else []))
            np.savetxt(f, np.column_stack([verts[name] for name, _ in fields]), fmt=fmt)
    return n


def read_ply(path: str | os.PathLike) -> np.ndarray:
    """A PLY written by ``write_ply`` (binary or ascii) back as a numpy structured array of its vertices."""
    ply_type = {"float": "<f4", "uchar": "u1"}
    with open(path, "rb") as f:
        fields, n, fmt = [], 0, None
        while True:
            line = f.readline().decode("ascii").strip()
            if line.startswith("format"):
                fmt = line.split()[1]
            elif line.startswith("element vertex"):
                n = int(line.split()[-1])
            elif line.startswith("property"):
                _, t, name = line.split()
                fields.append((name, ply_type[t]))
            elif line == "end_header" or not line:
                break
        dt = np.dtype(fields)
        if fmt == "binary_little_endian":
            return np.frombuffer(f.read(n * dt.itemsize), dtype=dt, count=n)
        rows = np.loadtxt(f, ndmin=2) if n else np.zeros((0, len(fields)))
    out = np.empty(n, dtype=dt)
    for i, (name, _) in enumerate(fields):
        out[name] = rows[:, i]
    return out


def write_glb_points(path: str | os.PathLike, depth, intrinsics: Sequence[float] | None = None, image=None, *,
                     max_points: int | None = None) -> int:
    """The point cloud of ``write_ply`` (same points, intrinsics and colours) as a binary glTF (.glb); atomic.

    For viewers that draw glTF but not point-cloud PLY (Gradio's ``Model3D`` shows .ply files as Gaussian
    splats): one primitive of mode POINTS with COLOR_0 and an unlit material. glTF is y-up with the camera
    looking down -z, so a camera-frame point (x, y, z) is stored as (x, -y, -z). ``max_points``: keep every
    k-th row and column of the depth map (the same k for both) so that at most that many points remain.
    Returns the number of points written.
    """
    import json
    import struct

    d = np.asarray(depth, np.float32)
    if d.ndim != 2:
        raise ValueError(f"depth: expected an (H, W) map, got shape {d.shape}")
    pts, ok = depth_to_points(d, intrinsics)
    rgb = _as_rgb_uint8(image) if image is not None else np.full(d.shape + (3,), 200, np.uint8)
    if rgb.shape[:2] != d.shape:
        raise ValueError(f"write_glb_points: image {rgb.shape[:2]} and depth {d.shape} differ in size")
    cols = rgb[ok]
    if max_points is not None and len(pts) > max_points:
        k = int(np.ceil(np.sqrt(len(pts) / max(max_points, 1))))
        while True:
            grid = np.zeros(d.shape, bool)
            grid[::k, ::k] = True
            if int((grid & ok).sum()) <= max_points:
                break
            k += 1
        keep = grid[ok]
        pts, cols = pts[keep], cols[keep]
    n = len(pts)
    pos = np.ascontiguousarray(pts * np.array([1.0, -1.0, -1.0], np.float32), dtype="<f4")
    rgba = np.concatenate([cols, np.full((n, 1), 255, np.uint8)], axis=1)
    blob = pos.tobytes() + rgba.tobytes()  # both 4-byte aligned
    gltf = {
        "asset": {"version": "2.0", "generator": "vpd-jax"},
        "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0, "name": "depth"}],
        "extensionsUsed": ["KHR_materials_unlit"],
        "materials": [{"pbrMetallicRoughness": {"baseColorFactor": [1, 1, 1, 1], "metallicFactor": 0.0,
                                                "roughnessFactor": 1.0},
                       "extensions": {"KHR_materials_unlit": {}}}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0, "COLOR_0": 1}, "mode": 0, "material": 0}]}],
        "buffers": [{"byteLength": len(blob)}],
        "bufferViews": [{"buffer": 0, "byteOffset": 0, "byteLength": n * 12, "target": 34962},
                        {"buffer": 0, "byteOffset": n * 12, "byteLength": n * 4, "target": 34962}],
        "accessors": [{"bufferView": 0, "componentType": 5126, "count": n, "type": "VEC3",
                       "min": pos.min(0).tolist() if n else [0, 0, 0], "max": pos.max(0).tolist() if n else [0, 0, 0]},
                      {"bufferView": 1, "componentType": 5121, "normalized": True, "count": n, "type": "VEC4"}],
    }
    js = json.dumps(gltf, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 4)
    blob += b"\0" * (-len(blob) % 4)
    total = 12 + 8 + len(js) + 8 + len(blob)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<4sII", b"glTF", 2, total))
        f.write(struct.pack("<I4s", len(js), b"JSON") + js)
        f.write(struct.pack("<I4s", len(blob), b"BIN\0") + blob)
    return n


def read_glb_points(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A .glb written by ``write_glb_points`` back as ((N, 3) float32 glTF positions, (N, 4) uint8 colours)."""
    import json
    import struct

    data = pathlib.Path(path).read_bytes()
    magic, version, total = struct.unpack_from("<4sII", data, 0)
    if magic != b"glTF" or version != 2 or total != len(data):
        raise ValueError(f"{path}: not a glTF 2.0 binary file")
    jlen, _ = struct.unpack_from("<I4s", data, 12)
    gltf = json.loads(data[20 : 20 + jlen])
    blen, _ = struct.unpack_from("<I4s", data, 20 + jlen)
    blob = data[28 + jlen : 28 + jlen + blen]
    n = gltf["accessors"][0]["count"]
    views = gltf["bufferViews"]
    pos = np.frombuffer(blob, "<f4", n * 3, views[0]["byteOffset"]).reshape(n, 3)
    rgba = np.frombuffer(blob, np.uint8, n * 4, views[1]["byteOffset"]).reshape(n, 4)
    return pos, rgba


# ------------------------------------------------------------------------------------------- class maps
IGNORE_COLOR = (0, 0, 0)  # the ignore index (255) in palette pictures


def class_palette(num_classes: int, seed: int = 3) -> np.ndarray:
    """(num_classes, 3) uint8 colours, distinct and fixed for a class count: hues spread by the golden ratio,
    saturation and value varied so that neighbours in the class order differ."""
    i = np.arange(num_classes)
    hue = (i * 0.6180339887 + seed * 0.1) % 1.0
    sat = 0.55 + 0.4 * ((i * 7) % 5) / 4
    val = 0.6 + 0.4 * ((i * 3) % 4) / 3
    k = (hue[:, None] * 6 + np.array([5, 3, 1])) % 6
    rgb = val[:, None] - val[:, None] * sat[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def save_label_png(path: str | os.PathLike, labels) -> pathlib.Path:
    """The raw class map as an 8-bit single-channel PNG (class ids; 255 = ignore), atomically."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError(f"class map of shape {labels.shape} with values {labels.min()}..{labels.max()}: expected "
                         "(H, W) ids in 0..255")
    return save_png(path, labels.astype(np.uint8))


def save_palette_png(path: str | os.PathLike, labels, palette: np.ndarray) -> pathlib.Path:
    """The class map as a palette ("P" mode) PNG: pixel values are the class ids, shown in ``palette``'s colours
    (ignored pixels black), atomically."""
    from PIL import Image

    labels = np.asarray(labels).astype(np.uint8)
    full = np.zeros((256, 3), np.uint8)
    full[:len(palette)] = palette[:256]
    full[255] = IGNORE_COLOR
    im = Image.fromarray(labels, mode="P")
    im.putpalette(full.reshape(-1).tolist())
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
    return path


def colorize_labels(labels, palette: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 picture of a class map (ignored and out-of-palette ids black)."""
    labels = np.asarray(labels).astype(np.int64)
    out = np.zeros((*labels.shape, 3), np.uint8)
    ok = (labels >= 0) & (labels < len(palette))
    out[ok] = palette[labels[ok]]
    return out


def overlay_labels(image, labels, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with its class map blended on top (``alpha`` of the class colour), uint8 (H, W, 3)."""
    rgb = _as_rgb_uint8(image).astype(np.float32)
    colors = colorize_labels(labels, palette).astype(np.float32)
    return np.clip(np.round((1 - alpha) * rgb + alpha * colors), 0, 255).astype(np.uint8)
