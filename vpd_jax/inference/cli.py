"""``predict.py`` (``vpd-predict``): depth for your own images from the command line."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

from vpd_jax.console import ArgumentParser, check_output_folder, run_tool
from vpd_jax.errors import UsageError, UserError
from vpd_jax.inference.files import Outputs, gather_inputs, predict_files
from vpd_jax.inference.images import IMAGE_SUFFIXES
from vpd_jax.inference.predictor import MODES, Predictor
from vpd_jax.scenes import NYU_CLASSES, class_id_from_name


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(
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
    ap.add_argument("--skip_existing", action="store_true", help="skip images whose outputs all exist")
    ap.add_argument("--no_progress", dest="progress", action="store_false")
    return ap


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
    if args.scene is not None:
        try:
            class_id_from_name(args.scene)
        except ValueError as e:
            raise UsageError(f"--scene {args.scene}: {e}") from e
    for flag in ("crop", "stride", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: expected a positive number")
    # Before the model is loaded (minutes with SD-1.5 weights): where to write, and that there is something to read.
    out_dir = check_output_folder("--output", args.output)
    if not pathlib.Path(args.checkpoint).expanduser().exists():
        raise UserError(f"--checkpoint {args.checkpoint}: no such file or folder")
    if not gather_inputs(args.input, exclude=out_dir)[0]:
        raise UsageError(f"--input {' '.join(args.input)}: no images there (expected image files, folders holding "
                         f"{'/'.join(sorted(IMAGE_SUFFIXES))} files, or glob patterns)")
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


def main(argv: Sequence[str] | None = None) -> int:
    """``predict.py`` / ``vpd-predict``: exit 0, 1 (nothing written, or a model that cannot be read) or 2."""
    return run_tool(predict, argv)
