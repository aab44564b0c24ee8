"""Depth for anyone's images: ``Predictor`` (the Python API) and the library side of ``predict.py``.

    >>> from vpd_jax import Predictor
    >>> p = Predictor.from_checkpoint("checkpoints/vpd_nyu")   # converted dir, workdir or official/mmseg .pth
    >>> depth = p.predict(image)                                  # (H, W, 3) uint8 -> (H, W) float32 metres

Any size and aspect ratio (asked for in wl-zhao/VPD GitHub issues 4, 34, 39 and 42: the references only take
480, 352 or 512 squares, ``VPDDepth.forward`` in wl-zhao/VPD depth/models_depth/model.py):

* ``mode="slide"`` (default): the evaluator's test-time augmentation (wl-zhao/VPD depth/test.py; mmsegmentation
  mmseg/models/segmentors/depth_estimator.py) at the image's own resolution: windows of the model's training
  crop (480 for the released NYU models) placed by mmseg's ``slide_flip`` rule at stride crop/3 (on 480x640
  that is the official x = 0 and 160), each averaged with its flipped prediction, merged by overlap count. An
  image smaller than the crop in either side is first upscaled (bilinear, aspect kept) until it covers the crop,
  then the prediction is resized back. Upscaling rather than padding: padding would show the model a small
  picture inside a grey frame it never saw in training, and metric depth from one image hangs on the apparent
  size of things, which a frame changes and an upscale (to the pixel scale of the training frames) does not.
* ``mode="resize"``: the image is resized (bilinear, aspect kept) so that its short side is the crop — NYU's
  pixel scale — then windowed as above and the prediction resized back to the input size (mmseg's 512 recipe,
  generalised). Better for photos much larger than 640x480 whose field of view is a whole room.

Scene conditioning (wl-zhao/VPD depth/models_depth/model.py, depth/dump_nyu_text_embeddings.py; mmsegmentation
mmseg/models/backbones/vpd.py): a NYU scene class (``scene="kitchen"``), a free-text ``prompt`` embedded by CLIP
(``clip=`` weights), or by default the table's last row, the mean of the 27 scenes (mmseg's "unknown").
The row is looked up on the host and passed as ``text_embeddings``, so every choice runs one compiled model.

All windows of a batch of equal-size images, and their flips, go through one jitted forward in chunks of
``batch_size`` rows (the last chunk padded), so the model compiles once per window shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import pathlib
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from vpd_jax import visualize as vis
from vpd_jax.evaluation.tta import mmseg_window_starts, resize_bilinear
from vpd_jax.scenes import NYU_CLASSES, UNKNOWN_CLASS, class_id_from_name
from vpd_jax.text import TextEncoder
from vpd_jax.weights.loader import load_model

MODES = ("slide", "resize")
DEFAULT_CROP = 480  # the released NYU models' training crop (both repos)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------- images

def as_rgb(image) -> np.ndarray:
    """(H, W) gray, (H, W, 1|3|4) -> (H, W, 3) float32 in [0, 255]. Alpha is dropped; uint16 is scaled by 1/257.

    uint8 and float images are taken as [0, 255] (the model's input range), other integer types must fit it.
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.stack([a, a, a], axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"image: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    a = a[..., :3]
    if a.dtype == np.uint16:
        return a.astype(np.float32) / np.float32(257.0)
    if a.dtype == np.bool_:
        return a.astype(np.float32) * 255
    return a.astype(np.float32)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, EXIF orientation applied; gray, palette, RGBA and 16-bit handled.

    Raises ``OSError`` / ``ValueError`` (from PIL) for files that are not readable images.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im).astype(np.float64)
            top = 65535.0 if a.max(initial=0) > 255 else 255.0
            return np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8)[..., None].repeat(3, -1)
        if im.mode == "F":
            a = np.asarray(im, np.float32)
            return np.clip(np.rint(a), 0, 255).astype(np.uint8)[..., None].repeat(3, -1)
        return np.asarray(im.convert("RGB"))


# ------------------------------------------------------------------------------------------- windows

def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """mmseg's ``slide_flip`` offsets (the evaluator's; the last window ends at the border)."""
    return mmseg_window_starts(size, crop, stride)


def working_size(h: int, w: int, crop: int, mode: str) -> tuple[int, int]:
    """The (h, w) the image is brought to before windowing (``mode`` and the small-image rule above)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if mode == "slide" and min(h, w) >= crop:
        return h, w
    f = crop / min(h, w)
    # Round, but never below the crop (a 333-high image must reach 480, not 479).
    return max(crop, int(h * f + 0.5)), max(crop, int(w * f + 0.5))


@dataclasses.dataclass(frozen=True)
class Scene:
    """The conditioning in words, for logs: ``kind`` is "class", "prompt" or "mean"."""

    kind: str
    value: str | int | None = None

    def __str__(self):
        if self.kind == "class":
            return f"scene class {NYU_CLASSES[self.value]} ({self.value})"
        if self.kind == "prompt":
            return f"prompt {self.value!r}"
        return "mean of the NYU scene embeddings (unknown scene)"


class Predictor:
    """A VPD model ready for images of any size; see the module docstring for the modes.

    ``model``: a ``VPDDepth``; ``variables``: its ``{params, batch_stats, constants}``; ``embedding``: the raw
    (text_dim,) scene embedding (None: the table's mean row); ``crop``: the training crop (square windows);
    ``stride``: window stride (default crop // 3); ``flip``: average each window with its mirror image;
    ``batch_size``: windows per forward call.
    """

    def __init__(self, model, variables, *, embedding=None, mode: str = "slide", crop: int = DEFAULT_CROP,
                 stride: int | None = None, flip: bool = True, batch_size: int = 4, scene: Scene | None = None):
        import jax

        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if crop < 1 or batch_size < 1:
            raise ValueError(f"crop ({crop}) and batch_size ({batch_size}) must be positive")
        self.model, self.config = model, model.config
        self.mode, self.crop, self.flip, self.batch_size = mode, int(crop), bool(flip), int(batch_size)
        self.stride = int(stride) if stride else max(1, self.crop // 3)
        table = np.asarray(variables["constants"]["class_embeddings"], np.float32)
        if embedding is None:
            embedding = table[-1]
        embedding = np.asarray(embedding, np.float32).reshape(-1)
        if embedding.shape != (self.config.text_dim,):
            raise ValueError(f"scene embedding of size {embedding.shape[0]}; this model takes "
                             f"{self.config.text_dim}")
        self.embedding = embedding
        self.scene = scene or Scene("mean")
        self.variables = jax.device_put(variables)
        self._embedding = jax.device_put(embedding)
        # One jit; XLA caches one executable per input shape (one per window shape here).
        self._forward = jax.jit(lambda v, x, e: model.apply(v, x, text_embeddings=e))

    # ----------------------------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(cls, src: str | os.PathLike, *, mode: str = "slide", scene: str | int | None = None,
                        prompt: str | None = None, clip: str | os.PathLike | None = None, batch_size: int = 4,
                        crop: int | None = None, stride: int | None = None, flip: bool = True,
                        dtype: str | None = None, **model_overrides) -> Predictor:
        """Load ``src`` (any source of ``vpd_jax.weights.loader.load_model``) and choose the conditioning.

        ``scene``: a NYU class name or id; ``prompt`` (with ``clip``, CLIP ViT-L/14 weights: a local folder or
        a hub id for ``TextEncoder.from_pretrained``); neither: the mean scene row. ``crop``: the training crop
        (default: the checkpoint's, else 480). ``dtype``: compute dtype override ("bfloat16" on accelerators).
        """
        if scene is not None and prompt is not None:
            raise ValueError("give a scene class or a prompt, not both")
        if dtype is not None:
            model_overrides["dtype"] = dtype
        loaded = load_model(src, overrides=model_overrides)
        model, variables, ckpt_crop = loaded.model, loaded.variables, loaded.crop
        embedding, desc = None, Scene("mean")
        table = np.asarray(variables["constants"]["class_embeddings"], np.float32)
        if prompt is not None:
            if clip is None:
                raise ValueError("a text prompt needs CLIP weights: pass clip= (--clip SOURCE)")

            embedding, desc = TextEncoder.from_pretrained(clip).embed([prompt])[0], Scene("prompt", prompt)
        elif scene is not None and not (isinstance(scene, int) and scene in (-1, UNKNOWN_CLASS)):
            cid = scene if isinstance(scene, int) else class_id_from_name(scene)
            if not 0 <= cid < table.shape[0] - 1:
                raise ValueError(f"scene id {cid} is outside the checkpoint's {table.shape[0] - 1} classes")
            embedding, desc = table[cid], Scene("class", cid)
        return cls(model, variables, embedding=embedding, mode=mode, crop=crop or ckpt_crop or DEFAULT_CROP,
                   stride=stride, flip=flip, batch_size=batch_size, scene=desc)

    # ----------------------------------------------------------------------------------- prediction
    def predict(self, image) -> np.ndarray:
        """(H, W, 3) uint8 image (gray and RGBA accepted) -> (H, W) float32 depth in metres."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Equal-size images, (B, H, W, 3) or a list of (H, W[, C]) -> (B, H, W) float32 metres."""
        if len({np.shape(im)[:2] for im in images}) > 1:
            raise ValueError("predict_batch: images differ in size; use predict() per image")
        batch = np.stack([as_rgb(im) for im in images])
        b, h, w, _ = batch.shape
        if b == 0:
            return np.zeros((0, h, w), np.float32)
        wh, ww = working_size(h, w, self.crop, self.mode)
        if (wh, ww) != (h, w):
            batch = self._resize(batch, (wh, ww))
        depth = self._slide(batch)
        if (wh, ww) != (h, w):
            depth = self._resize(depth, (h, w))
        return depth

    def forward(self, images) -> np.ndarray:
        """One plain forward pass at the images' own size (no windows, no flip): (B, H, W) metres."""
        return self._run(np.stack([as_rgb(im) for im in images]))

    @staticmethod
    def _resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return np.asarray(resize_bilinear(np.asarray(x, np.float32), size), np.float32)

    def _slide(self, batch: np.ndarray) -> np.ndarray:
        """Flip-averaged sliding windows over (B, H, W, 3) float images with H, W >= crop."""
        b, h, w, _ = batch.shape
        ch, cw = min(self.crop, h), min(self.crop, w)
        ys, xs = window_starts(h, ch, self.stride), window_starts(w, cw, self.stride)
        spots = [(y, x) for y in ys for x in xs]
        rows = [batch[:, y : y + ch, x : x + cw] for y, x in spots]
        if self.flip:
            rows += [r[:, :, ::-1] for r in rows]
        preds = self._run(np.concatenate(rows, 0))  # (len(rows) * b, ch, cw)
        n = len(spots)
        per = preds.reshape(-1, b, ch, cw)
        win = per[:n]
        if self.flip:
            win = (win + per[n:, :, :, ::-1]) / np.float32(2.0)
        canvas = np.zeros((b, h, w), np.float32)
        count = np.zeros((h, w), np.float32)
        for (y, x), p in zip(spots, win, strict=True):
            canvas[:, y : y + ch, x : x + cw] += p
            count[y : y + ch, x : x + cw] += 1
        return canvas / count

    def _run(self, rows: np.ndarray) -> np.ndarray:
        """The jitted forward over ``rows`` in chunks of ``batch_size`` (last chunk padded: one shape, one compile)."""
        out = []
        k = self.batch_size
        for i in range(0, len(rows), k):
            chunk = rows[i : i + k]
            m = len(chunk)
            if m < k:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], k - m, 0)], 0)
            out.append(np.asarray(self._forward(self.variables, chunk, self._embedding), np.float32)[:m])
        return np.concatenate(out, 0)


# ------------------------------------------------------------------------------------------- checkpoints

# ------------------------------------------------------------------------------------------- files

def gather_inputs(inputs: Iterable[str], exclude: pathlib.Path | None = None
                  ) -> tuple[list[tuple[pathlib.Path, pathlib.Path]], list[str]]:
    """``(path, relative output stem)`` for every image named by ``inputs`` (files, folders searched recursively
    for image suffixes, glob patterns), in order, without duplicates; plus the inputs that matched nothing.

    Files under ``exclude`` (the output folder) are left out of folder and glob matches. The stem keeps the
    sub-path inside a named folder, so ``a/x.jpg`` and ``a/b/x.jpg`` do not collide.
    """
    out, seen, missing = [], set(), []
    exclude = exclude.resolve() if exclude is not None else None

    def excluded(f: pathlib.Path) -> bool:
        return exclude is not None and (f.resolve() == exclude or exclude in f.resolve().parents)

    def add(f: pathlib.Path, stem: pathlib.Path):
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append((f, stem))

    for spec in inputs:
        p = pathlib.Path(spec).expanduser()
        if p.is_file():
            add(p, pathlib.Path(p.stem))
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                           and not excluded(f) and not any(part.startswith(".") for part in f.relative_to(p).parts))
            for f in files:
                add(f, f.relative_to(p).with_suffix(""))
            if not files:
                missing.append(spec)
        else:
            files = sorted(pathlib.Path(f) for f in glob.glob(os.path.expanduser(spec), recursive=True))
            files = [f for f in files if f.is_file() and not excluded(f)]
            for f in files:
                add(f, pathlib.Path(f.stem))
            if not files:
                missing.append(spec)
    # Different folders can still give equal stems (x.jpg and x.png, or two named files): number the later ones.
    used: dict[pathlib.Path, int] = {}
    result = []
    for f, stem in out:
        n = used.get(stem, 0)
        used[stem] = n + 1
        result.append((f, stem if n == 0 else stem.with_name(f"{stem.name}_{n}")))
    return result, missing


@dataclasses.dataclass(frozen=True)
class Outputs:
    """Which files to write per image (suffixes below), and the colormap / point-cloud settings."""

    png16: bool = True  # <stem>_depth.png: uint16 millimetres, 0 = invalid
    npy: bool = False  # <stem>_depth.npy: float32 metres
    color: bool = True  # <stem>_depth_color.png
    colorbar: bool = False
    cmap: str = "turbo"
    ply: bool = False  # <stem>.ply
    intrinsics: tuple[float, float, float, float] | None = None  # at the image's size; None: NYU's, scaled

    def paths(self, out_dir: pathlib.Path, stem: pathlib.Path) -> dict[str, pathlib.Path]:
        base = out_dir / stem
        d = {}
        if self.png16:
            d["png16"] = base.with_name(base.name + "_depth.png")
        if self.npy:
            d["npy"] = base.with_name(base.name + "_depth.npy")
        if self.color:
            d["color"] = base.with_name(base.name + "_depth_color.png")
        if self.ply:
            d["ply"] = base.with_name(base.name + ".ply")
        return d

    def write(self, out_dir: pathlib.Path, stem: pathlib.Path, image: np.ndarray,
              depth: np.ndarray) -> list[pathlib.Path]:
        written = []
        for kind, path in self.paths(out_dir, stem).items():
            if kind == "png16":
                vis.save_depth_png16(path, depth)
            elif kind == "npy":
                vis.save_npy(path, depth)
            elif kind == "color":
                vis.save_colormap_png(path, depth, colorbar=self.colorbar, cmap=self.cmap)
            elif kind == "ply":
                vis.write_ply(path, depth, self.intrinsics, image)
            written.append(path)
        return written


@dataclasses.dataclass
class Summary:
    written: int = 0
    files: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    existing: int = 0


def _header_size(path: pathlib.Path) -> tuple[int, int] | None:
    """(h, w) after EXIF rotation, from the header only; None if unreadable (it is then tried, and warned, later)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
        return (w, h) if orientation in (5, 6, 7, 8) else (h, w)
    except Exception:  # noqa: BLE001 - any header failure just means "no size known"
        return None


def predict_files(predictor: Predictor, inputs: Sequence[str], out_dir: str | os.PathLike, outputs: Outputs,
                  *, images_per_batch: int | None = None, skip_existing: bool = False, progress: bool = True,
                  log=None) -> Summary:
    """Depth for every image named by ``inputs`` into ``out_dir`` (see ``gather_inputs``, ``Outputs``).

    Images are grouped by size (header read) so that equal sizes share batches and compiled shapes; each
    image's files are written (atomically) as soon as its batch is done. An image that cannot be read is
    skipped with a one-line warning naming it.
    """
    from tqdm import tqdm

    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    out_dir = pathlib.Path(out_dir)
    files, missing = gather_inputs(inputs, exclude=out_dir)
    summary = Summary()
    for spec in missing:
        log(f"warning: {spec}: no such file, or no images in it; skipped")
        summary.skipped.append((spec, "no images"))
    if skip_existing:
        todo = [(f, s) for f, s in files if not all(p.exists() for p in outputs.paths(out_dir, s).values())]
        summary.existing = len(files) - len(todo)
        files = todo
    sizes = {f: _header_size(f) for f, _ in files}
    # Stable sort by size: equal sizes become neighbours; unknown sizes last.
    order = sorted(files, key=lambda fs: (sizes[fs[0]] is None, sizes[fs[0]] or (0, 0)))
    per_batch = images_per_batch or predictor.batch_size
    bar = tqdm(total=len(order), unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    pending: list[tuple[pathlib.Path, pathlib.Path, np.ndarray]] = []

    def flush():
        if not pending:
            return
        depths = predictor.predict_batch([img for _, _, img in pending])
        for (f, stem, img), depth in zip(pending, depths, strict=True):
            summary.files += len(outputs.write(out_dir, stem, img, depth))
            summary.written += 1
        bar.update(len(pending))
        pending.clear()

    try:
        for f, stem in order:
            try:
                img = load_image(f)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
                log(f"warning: skipping {f}: not a readable image ({type(e).__name__}: {e})")
                summary.skipped.append((str(f), str(e)))
                bar.update(1)
                continue
            if pending and (pending[0][2].shape != img.shape or len(pending) >= per_batch):
                flush()
            pending.append((f, stem, img))
        flush()
    finally:
        bar.close()
    return summary


# ------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="predict.py",
        description="VPD depth for your own images, at their own size. Writes, per image, the files chosen "
                    "below (default: --png16 and --color).",
    )
    ap.add_argument("--checkpoint", required=True, metavar="SRC",
                    help="converted checkpoint folder, training workdir, or official/mmseg PyTorch file")
    ap.add_argument("--input", required=True, nargs="+", metavar="PATH",
                    help="image files, folders (searched recursively) or glob patterns")
    ap.add_argument("--output", required=True, metavar="DIR", help="output folder (created)")
    ap.add_argument("--mode", choices=MODES, default="slide",
                    help="slide: windows of the training crop at the image's resolution (evaluator TTA); "
                         "resize: short side resized to the crop first (default: %(default)s)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--scene", metavar="CLASS", help=f"NYU scene class: {', '.join(NYU_CLASSES)}")
    g.add_argument("--prompt", metavar="TEXT", help='free-text scene, e.g. "a photo of a garage" (needs --clip)')
    ap.add_argument("--clip", metavar="SOURCE", help="CLIP ViT-L/14 text weights (folder or hub id) for --prompt")
    ap.add_argument("--crop", type=int, help="training crop (default: the checkpoint's, else 480)")
    ap.add_argument("--stride", type=int, help="window stride (default: crop // 3)")
    ap.add_argument("--no-flip", dest="flip", action="store_false", help="no flip averaging")
    ap.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: %(default)s)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype override")
    o = ap.add_argument_group("outputs (none given: --png16 --color)")
    o.add_argument("--png16", action="store_true", help="<name>_depth.png, 16-bit, millimetres, 0 = invalid")
    o.add_argument("--npy", action="store_true", help="<name>_depth.npy, float32 metres")
    o.add_argument("--color", action="store_true", help="<name>_depth_color.png, colour-mapped")
    o.add_argument("--colorbar", action="store_true", help="add a metre scale to the colour PNG (implies --color)")
    o.add_argument("--cmap", default="turbo", help="matplotlib colormap (default: %(default)s)")
    o.add_argument("--ply", action="store_true", help="<name>.ply coloured point cloud")
    for k in ("fx", "fy", "cx", "cy"):
        o.add_argument(f"--{k}", type=float, help="intrinsics in pixels at the image's size (default: NYU's, scaled)")
    ap.add_argument("--skip-existing", action="store_true", help="skip images whose outputs all exist")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    intr = [args.fx, args.fy, args.cx, args.cy]
    if any(v is not None for v in intr) and not all(v is not None for v in intr):
        print("error: give all of --fx --fy --cx --cy, or none (NYU's)", file=sys.stderr)
        return 2
    if args.prompt and not args.clip:
        print("error: --prompt needs --clip SOURCE (CLIP ViT-L/14 text weights)", file=sys.stderr)
        return 2
    chosen = args.png16 or args.npy or args.color or args.colorbar or args.ply
    outputs = Outputs(png16=args.png16 or not chosen, npy=args.npy, color=args.color or args.colorbar or not chosen,
                      colorbar=args.colorbar, cmap=args.cmap, ply=args.ply,
                      intrinsics=tuple(intr) if intr[0] is not None else None)
    if args.scene is not None:
        try:
            class_id_from_name(args.scene)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    predictor = Predictor.from_checkpoint(args.checkpoint, mode=args.mode, scene=args.scene, prompt=args.prompt,
                                          clip=args.clip, batch_size=args.batch_size, crop=args.crop,
                                          stride=args.stride, flip=args.flip, dtype=args.dtype)
    print(f"vpd-jax predict: {args.checkpoint}, mode {predictor.mode}, crop {predictor.crop}, stride "
          f"{predictor.stride}, flip {predictor.flip}, {predictor.scene}", file=sys.stderr)
    s = predict_files(predictor, args.input, args.output, outputs, skip_existing=args.skip_existing,
                      progress=args.progress)
    line = f"done: {s.written} image(s) written ({s.files} files) to {args.output}; {len(s.skipped)} skipped"
    if s.existing:
        line += f"; {s.existing} already done"
    print(line, file=sys.stderr)
    for name, _ in s.skipped:
        print(f"  skipped: {name}", file=sys.stderr)
    return 0 if s.written or s.existing else 1
