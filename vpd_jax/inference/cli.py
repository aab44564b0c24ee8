"""``predict.py`` (``vpd-predict``): depth for your own images from the command line."""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from vpd_jax.console import ArgumentParser, check_output_folder, run_tool
from vpd_jax.errors import UsageError, UserError
from vpd_jax.inference.files import Outputs, gather_inputs, predict_files, segment_files
from vpd_jax.inference.images import IMAGE_SUFFIXES
from vpd_jax.inference.predictor import MODES, Predictor
from vpd_jax.inference.segmenter import Segmenter
from vpd_jax.scenes import NUM_CLASSES, NYU_CLASSES, name_key, read_class_list
from vpd_jax.weights.common import WeightsError
from vpd_jax.weights.loader import (
    is_training_workdir,
    load_model,
    split_source,
    workdir_class_names,
    workdir_config,
)


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(
        prog="predict.py",
        description="VPD depth (or, with a segmentation checkpoint, class maps) for your own images, at their own "
                    "size. Writes, per image, the files chosen below (default: --png16 and --color); a segmentation "
                    "model writes <name>_labels.png, <name>_classes.png and <name>_overlay.png.",
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
    g.add_argument("--scene", metavar="CLASS", help="a class of the model's table (the released models: NYU's "
                   f"{', '.join(NYU_CLASSES)})")
    g.add_argument("--scene_from", choices=("parent",),
                   help="parent: each image's folder name as its class (folders matching no class: the mean row)")
    g.add_argument("--prompt", metavar="TEXT", help='free-text scene, e.g. "a photo of a garage" (needs --clip)')
    ap.add_argument("--class_embeddings", metavar="TABLE",
                    help="your class table (python -m vpd_jax.tools.class_embeddings; its .classes.json names the "
                         "rows) instead of the checkpoint's")
    ap.add_argument("--clip", metavar="SOURCE", help="CLIP ViT-L/14 text weights (folder or hub id) for --prompt")
    ap.add_argument("--crop", type=_crop, help="training crop, 480 or HxW such as 352x704 (default: the "
                    "checkpoint's, else 480)")
    ap.add_argument("--stride", type=int, help="window stride (default: a third of the crop)")
    ap.add_argument("--no_flip", dest="flip", action="store_false", help="no flip averaging")
    ap.add_argument("--batch_size", type=int, default=4, help="windows per forward pass (default: %(default)s)")
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
    ap.add_argument("--multi_scale", action="store_true",
                    help="segmentation models: the multi-scale (0.5-1.75) + flip test instead of one scale")
    ap.add_argument("--test_resize", type=_resize_spec, default=(2048, 512), metavar="LONGxSHORT",
                    help="segmentation models: resize to fit LONGxSHORT keeping the ratio first (default 2048x512, "
                         "the reference's), or none")
    ap.add_argument("--skip_existing", action="store_true", help="skip images whose outputs all exist")
    ap.add_argument("--no_progress", dest="progress", action="store_false")
    return ap


def _resize_spec(text: str) -> tuple[int, int] | None:
    if text.lower() == "none":
        return None
    try:
        long, short = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LONGxSHORT such as 2048x512, or none") from None
    return long, short


def _crop(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive size such as 480 or 352x704")
    return parts[0], parts[1]


def known_class_names(checkpoint: str, class_embeddings: str | None) -> list[str] | None:
    """The class names ``--scene`` can name, found without loading the model (None: known only after)."""
    if class_embeddings:
        return read_class_list(class_embeddings)
    path, _ = split_source(checkpoint)
    if path.is_dir() and is_training_workdir(path):
        try:
            cfg = workdir_config(path)
            if cfg.get("task", "depth") != "depth":
                return None  # a segmentation model: said once it is loaded
            n = int(cfg["model"].get("num_classes") or NUM_CLASSES)
        except (WeightsError, KeyError, TypeError, ValueError):
            return None
        return workdir_class_names(path, n) or (list(NYU_CLASSES) if n == NUM_CLASSES else None)
    return list(NYU_CLASSES)  # converted folders and PyTorch files: the released models' NYU table


def predict(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    intr = [args.fx, args.fy, args.cx, args.cy]
    if any(v is not None for v in intr) and not all(v is not None for v in intr):
        raise UsageError("give all of --fx --fy --cx --cy, or none (NYU's)")
    if args.prompt and not args.clip:
        raise UsageError("--prompt needs --clip SOURCE (CLIP ViT-L/14 text weights)")
    chosen = args.png16 or args.npy or args.color or args.colorbar or args.ply
    outputs = Outputs(png16=args.png16 or not chosen, npy=args.npy, color=args.color or args.colorbar or not chosen,
                      colorbar=args.colorbar, cmap=args.cmap, ply=args.ply,
                      intrinsics=tuple(intr) if intr[0] is not None else None)
    if args.class_embeddings and not pathlib.Path(args.class_embeddings).is_file():
        raise UserError(f"--class_embeddings {args.class_embeddings}: no such file")
    if args.scene is not None:
        try:
            names = known_class_names(args.checkpoint, args.class_embeddings)
        except ValueError as e:
            raise UserError(f"--class_embeddings: {e}") from e
        if names is not None and name_key(args.scene) not in [name_key(n) for n in names]:
            raise UsageError(f"--scene {args.scene}: not a class of the model's table; expected one of: "
                             f"{', '.join(names)}")
    for flag in ("stride", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: expected a positive number")
    # Before the model is loaded (minutes with SD-1.5 weights): where to write, and that there is something to read.
    out_dir = check_output_folder("--output", args.output)
    if not split_source(args.checkpoint)[0].exists():  # WORKDIR:latest names WORKDIR
        raise UserError(f"--checkpoint {args.checkpoint}: no such file or folder")
    if not gather_inputs(args.input, exclude=out_dir)[0]:
        raise UsageError(f"--input {' '.join(args.input)}: no images there (expected image files, folders holding "
                         f"{'/'.join(sorted(IMAGE_SUFFIXES))} files, or glob patterns)")
    loaded = load_model(args.checkpoint, overrides={"dtype": args.dtype} if args.dtype else None)
    if loaded.task == "segmentation":
        return _segment(args, loaded, out_dir)
    try:
        predictor = Predictor.from_loaded(loaded, mode=args.mode, scene=args.scene, prompt=args.prompt,
                                          clip=args.clip, batch_size=args.batch_size, crop=args.crop,
                                          stride=args.stride, flip=args.flip, class_embeddings=args.class_embeddings)
    except ValueError as e:  # a scene or table that does not fit the model
        raise UserError(str(e)) from e
    scene = "scene from each image's folder" if args.scene_from else str(predictor.scene)
    print(f"vpd-jax predict: {args.checkpoint}, mode {predictor.mode}, crop {predictor.crop[0]}x{predictor.crop[1]}, "
          f"stride {predictor.stride[0]}x{predictor.stride[1]}, flip {predictor.flip}, {scene}", file=sys.stderr)
    predictor_for = _by_parent(predictor) if args.scene_from == "parent" else None
    s = predict_files(predictor, args.input, args.output, outputs, skip_existing=args.skip_existing,
                      progress=args.progress, predictor_for=predictor_for)
    return _report(s, "written", args.output)


def _report(s, verb: str, output: str) -> int:
    """The last lines of a run over files; exit 0 when something was written (or was there already)."""
    line = f"done: {s.written} image(s) {verb} ({s.files} files) to {output}; {len(s.skipped)} skipped"
    if s.existing:
        line += f"; {s.existing} already done"
    print(line, file=sys.stderr)
    for name, _ in s.skipped:
        print(f"  skipped: {name}", file=sys.stderr)
    return 0 if s.written or s.existing else 1


DEPTH_ONLY = ("scene", "scene_from", "prompt", "class_embeddings", "png16", "npy", "color", "colorbar", "ply", "fx",
              "fy", "cx", "cy")


def _segment(args, loaded, out_dir) -> int:
    """A segmentation checkpoint: class maps (raw ids, palette PNG, overlay) for every input image."""
    given = [f"--{k}" for k in DEPTH_ONLY if getattr(args, k) not in (None, False)]
    if given:
        raise UsageError(f"{' '.join(given)}: for depth models; {args.checkpoint} is a segmentation model (it writes "
                         "<name>_labels.png, <name>_classes.png and <name>_overlay.png)")
    kw = {"batch_size": args.batch_size, "multi_scale": args.multi_scale, "scale": args.test_resize}
    if args.crop:
        kw["crop"] = args.crop
    if args.stride:
        kw["stride"] = args.stride
    segmenter = Segmenter.from_loaded(loaded, **kw)
    print(f"vpd-jax predict: {args.checkpoint}, segmentation, {segmenter.describe()}", file=sys.stderr)
    s = segment_files(segmenter, args.input, out_dir, skip_existing=args.skip_existing, progress=args.progress)
    return _report(s, "segmented", args.output)


def _by_parent(predictor: Predictor):
    """``path -> predictor`` conditioned on the class named like the image's folder (the mean row otherwise,
    said once per folder)."""
    cache: dict[str, Predictor] = {}

    def pick(path: pathlib.Path) -> Predictor:
        folder = path.parent.name
        if folder not in cache:
            try:
                cache[folder] = predictor.for_scene(folder)
            except ValueError:
                print(f"note: folder {folder!r} names no class of the model's table; its images use the mean row",
                      file=sys.stderr)
                cache[folder] = predictor.for_scene(None)
        return cache[folder]

    return pick


def main(argv: Sequence[str] | None = None) -> int:
    """``predict.py`` / ``vpd-predict``: exit 0, 1 (nothing written, or a model that cannot be read) or 2."""
    return run_tool(predict, argv)
