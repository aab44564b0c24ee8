"""Depth for many image files: gather them, batch equal sizes, write each image's outputs as its batch is done."""

from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
import sys
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from vpd_jax import visualize as vis
from vpd_jax.inference.images import IMAGE_SUFFIXES, load_image
from vpd_jax.inference.predictor import Predictor


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


def _todo(inputs, out_dir: pathlib.Path, paths_of, skip_existing: bool, log):
    """``(files to do, Summary)``: the inputs' images (``gather_inputs``), each spec matching nothing warned about
    and counted, and with ``skip_existing`` those whose outputs (``paths_of(stem)``) all exist left out."""
    files, missing = gather_inputs(inputs, exclude=out_dir)
    summary = Summary()
    for spec in missing:
        log(f"warning: {spec}: no such file, or no images in it; skipped")
        summary.skipped.append((spec, "no images"))
    if skip_existing:
        todo = [(f, s) for f, s in files if not all(p.exists() for p in paths_of(s).values())]
        summary.existing = len(files) - len(todo)
        files = todo
    return files, summary


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
                  log=None, predictor_for: Callable[[pathlib.Path], Predictor] | None = None) -> Summary:
    """Depth for every image named by ``inputs`` into ``out_dir`` (see ``gather_inputs``, ``Outputs``).

    Images are grouped by size (header read) so that equal sizes share batches and compiled shapes; each
    image's files are written (atomically) as soon as its batch is done. An image that cannot be read is
    skipped with a one-line warning naming it. ``predictor_for(path)`` picks each image's predictor (e.g. its
    scene from its folder; predictors made by ``Predictor.for_scene`` share one compiled forward).
    """
    from tqdm import tqdm

    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    out_dir = pathlib.Path(out_dir)
    files, summary = _todo(inputs, out_dir, lambda stem: outputs.paths(out_dir, stem), skip_existing, log)
    sizes = {f: _header_size(f) for f, _ in files}
    chosen = {f: predictor_for(f) if predictor_for else predictor for f, _ in files}
    kinds = {id(p): i for i, p in enumerate(dict.fromkeys(chosen.values()))}
    # Stable sort by size, then predictor: equal sizes become neighbours; unknown sizes last.
    order = sorted(files, key=lambda fs: (sizes[fs[0]] is None, sizes[fs[0]] or (0, 0), kinds[id(chosen[fs[0]])]))
    per_batch = images_per_batch or predictor.batch_size
    bar = tqdm(total=len(order), unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    pending: list[tuple[pathlib.Path, pathlib.Path, np.ndarray]] = []

    def flush():
        if not pending:
            return
        depths = chosen[pending[0][0]].predict_batch([img for _, _, img in pending])
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
            if pending and (pending[0][2].shape != img.shape or len(pending) >= per_batch
                            or chosen[pending[0][0]] is not chosen[f]):
                flush()
            pending.append((f, stem, img))
        flush()
    finally:
        bar.close()
    return summary


SEG_SUFFIXES = {"labels": "_labels.png", "classes": "_classes.png", "overlay": "_overlay.png"}


def seg_output_paths(out_dir: pathlib.Path, stem: pathlib.Path) -> dict[str, pathlib.Path]:
    """``<stem>_labels.png`` (raw class ids, 8-bit), ``<stem>_classes.png`` (palette PNG: the ids, coloured) and
    ``<stem>_overlay.png`` (the classes over the image)."""
    base = out_dir / stem
    return {k: base.with_name(base.name + suffix) for k, suffix in SEG_SUFFIXES.items()}


def segment_files(segmenter, inputs: Sequence[str], out_dir: str | os.PathLike, *, skip_existing: bool = False,
                  progress: bool = True, log=None) -> Summary:
    """Class maps for every image named by ``inputs`` (as :func:`predict_files`), one image at a time (the
    segmenter batches each image's windows); an unreadable image is skipped with a one-line warning."""
    from tqdm import tqdm

    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    out_dir = pathlib.Path(out_dir)
    files, summary = _todo(inputs, out_dir, lambda stem: seg_output_paths(out_dir, stem), skip_existing, log)
    for f, stem in tqdm(files, unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True):
        try:
            img = load_image(f)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            log(f"warning: skipping {f}: not a readable image ({type(e).__name__}: {e})")
            summary.skipped.append((str(f), str(e)))
            continue
        labels = segmenter.predict(img)
        paths = seg_output_paths(out_dir, stem)
        vis.save_label_png(paths["labels"], labels)
        vis.save_palette_png(paths["classes"], labels, segmenter.palette)
        vis.save_png(paths["overlay"], vis.overlay_labels(img, labels, segmenter.palette))
        summary.files += len(paths)
        summary.written += 1
    return summary
