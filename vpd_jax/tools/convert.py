"""Convert a released PyTorch VPD checkpoint (depth or segmentation) into an orbax checkpoint of ``VPDDepth`` or
``VPDSeg``.

    python -m vpd_jax.tools.convert vpd_depth_480x480.pth --out ckpt/vpd_official
    python -m vpd_jax.tools.convert vpd_sd_4xb8-25k_nyu-480x480_20230908-66144bc4.pth --out ckpt/vpd_mmseg
    python -m vpd_jax.tools.convert vpd_seg_ade20k.pth --out ckpt/vpd_seg --crop 512

Reads the official (``{'model': ...}``) or the mmsegmentation (``{'state_dict': ...}``) checkpoint with
``torch.load(weights_only=True)`` (``--format auto`` tells them apart by their key names), maps every tensor
(the modules of wl-zhao/VPD depth/models_depth/model.py, mmsegmentation mmseg/models/backbones/vpd.py and
mmseg/models/decode_heads/vpd_depth_head.py), and writes ``OUT/config.json`` and ``OUT/variables/`` (params,
batch_stats, the class-embedding table). A tensor that maps nowhere fails the conversion, naming it; the
knowingly skipped ones (VAE decoder, ``post_quant_conv``, the UNet's ``out``, BN step counters) are counted in
the summary and in config.json.
``config.json`` also records the filename-to-class rule of the repo that trained the weights.

The task is told by the key names: the official segmentation checkpoint (wl-zhao/VPD
segmentation/models/vpd_seg.py: ``unet.unet.*``, ``encoder_vq.*``, mmseg ``neck.*``/``decode_head.*``) becomes a
``VPDSeg`` (``vpd_jax.weights.vpd_seg_checkpoint``; its ``sd_model`` noise-schedule buffers, the UNet's ``out``
and ``post_quant_conv`` are knowingly skipped), loaded back by ``vpd_jax.weights.loader.load_seg_model``.

The architecture is read off the tensors (an SD 1.x UNet: 8 heads for a 768-wide context). For anything else,
pass ``--config FILE.json`` holding a ``VPDConfig.to_dict()`` (``VPDSegConfig.to_dict()`` for segmentation).
``eval.py``/inference can also read the
``.pth`` directly (``vpd_jax.weights.loader.load_model``); converting once saves the time.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from collections.abc import Sequence

from vpd_jax.console import ArgumentParser, check_output_folder, run_tool
from vpd_jax.errors import UsageError
from vpd_jax.models.vpd import VPDConfig
from vpd_jax.models.vpd_seg import VPDSegConfig
from vpd_jax.weights import vpd_checkpoint as vc
from vpd_jax.weights import vpd_seg_checkpoint as vsc
from vpd_jax.weights.common import WeightsError, flatten


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m vpd_jax.tools.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="official or mmseg VPD depth checkpoint, or the official VPD segmentation "
                                    "checkpoint (.pth/.ckpt/.safetensors)")
    parser.add_argument("--out", required=True, help="output folder (must not hold a converted checkpoint yet)")
    parser.add_argument("--format", choices=("auto", "official", "mmseg"), default="auto",
                        help="depth checkpoint layout (default: detected from the key names; the segmentation "
                             "checkpoint has one layout, official)")
    parser.add_argument("--config", help="JSON file with a VPDConfig (or, for segmentation, a VPDSegConfig) dict, "
                                         "for a non-SD-1.5 architecture")
    parser.add_argument("--heads", help="the UNet's attention heads (N, or one per level: N,N,N,N) when its "
                                        "context is neither SD 1.x's 768 nor SD 2.x's 1024 wide")
    parser.add_argument("--max_depth", type=float, default=None,
                        help="depth range of the sigmoid output in metres (default 10, the NYUv2 models')")
    parser.add_argument("--crop", type=int, default=None,
                        help="the square training crop (480 for the released NYU models, 512 for mmseg's 512 "
                             "config); recorded so that predict.py/eval.py slide windows of that size")
    return parser


def convert(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.crop is not None and args.crop < 32:
        raise UsageError(f"--crop {args.crop}: expected the training crop in pixels (e.g. 480 or 512)")
    out = check_output_folder("--out", args.out)
    if (out / vc.VARIABLES_DIR).exists():
        raise UsageError(f"--out {out} already holds a converted checkpoint; choose another --out")
    raw_config = None
    if args.config:
        try:
            raw_config = json.loads(pathlib.Path(args.config).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--config {args.config}: {e}") from e
    heads = None
    if args.heads:
        try:
            heads = tuple(int(h) for h in args.heads.split(","))
        except ValueError:
            raise UsageError(f"--heads {args.heads}: expected a count or counts separated by commas") from None
        heads = heads[0] if len(heads) == 1 else heads
    t0 = time.time()
    state, _ = vc.read_checkpoint(args.src)
    if vsc.is_segmentation_state(state):
        if args.max_depth is not None:
            raise UsageError("--max_depth: the source is a segmentation checkpoint")
        if args.format == "mmseg":
            raise UsageError("--format mmseg: the source is the official segmentation checkpoint")
        conv = vsc.convert_state_dict(state, _config(args.config, raw_config, VPDSegConfig), what=str(args.src),
                                      heads=heads)
        return _save_and_report(args, out, conv, t0)
    conv = vc.convert_state_dict(state, _config(args.config, raw_config, VPDConfig), args.format, what=str(args.src),
                                 heads=heads)
    if args.max_depth is not None:
        conv.config = conv.config.replace(max_depth=args.max_depth)
    return _save_and_report(args, out, conv, t0)


def _config(path: str | None, raw, cls):
    if raw is None:
        return None
    try:
        return cls.from_dict(raw)
    except (ValueError, TypeError, AttributeError) as e:
        raise UsageError(f"--config {path}: not a {cls.__name__} ({e})") from e


def _save_and_report(args, out, conv: vc.Conversion, t0: float) -> int:
    try:
        vc.save_converted(conv, out, crop=args.crop)
    except WeightsError as e:
        raise UsageError(str(e)) from e

    n_params = sum(a.size for a in flatten(conv.variables["params"]).values())
    table = conv.variables["constants"]["class_embeddings"]
    seg = conv.task == vsc.TASK
    print(f"read {args.src} as the {conv.format} {'segmentation ' if seg else ''}layout")
    print(f"  params: {n_params / 1e6:.2f} M  (unet, vae, head, text_adapter, gamma)")
    if seg:
        print(f"  class embeddings: {table.shape[0]} rows x {table.shape[1]} (one context token per class)")
    else:
        print(f"  class embeddings: {table.shape[0]} rows x {table.shape[1]} (last row: mean, unknown scene)")
    for why, n in sorted(vc.summarise_skipped(conv.skipped).items()):
        print(f"  skipped {n} tensor(s): {why}")
    if not seg:
        print(f"  class rule of this checkpoint: {conv.format!r} (vpd_jax.scenes.class_id_for_file)")
    print(f"wrote {out}/{vc.CONFIG_FILE} and {out}/{vc.VARIABLES_DIR}/ in {time.time() - t0:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vpd_jax.tools.convert`` / ``vpd-convert``: exit 0, 1 (the source cannot be converted) or 2."""
    return run_tool(convert, argv)


if __name__ == "__main__":
    sys.exit(main())
