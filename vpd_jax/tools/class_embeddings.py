"""Compute the NYU scene-class embedding table with the official VPD recipe.

    python -m vpd_jax.tools.class_embeddings --clip openai/clip-vit-large-patch14 --out nyu_class_embeddings.npy

Recipe (wl-zhao/VPD ``depth/dump_nyu_text_embeddings.py`` with ``FrozenCLIPEmbedder`` of ``vpd/models.py``): for
each class of ``vpd_jax.scenes.NYU_CLASSES`` in order, ``_`` becomes a space, the 80 CLIP ImageNet templates are
filled in, tokenized with ``padding="max_length", truncation=True, max_length=20``, encoded by the CLIP text
model, and the pooled outputs are averaged (no normalisation). Result: float32 (27, 768), or (28, 768) with
``--with_mean`` (mmseg's table, last row = unknown scene).

To *reproduce* a released checkpoint, use the table shipped with it: the official table was generated in a
filesystem-dependent class order and regenerating it is reported to differ slightly (wl-zhao/VPD GitHub issue 56).

The output format follows the suffix: ``.npy``; ``.safetensors`` (tensor ``class_embeddings``); ``.pth`` /
``.pt`` (a bare tensor, like the official ``nyu_class_embeddings.pth``, loadable with
``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from vpd_jax.console import ArgumentParser, check_output_file, run_tool
from vpd_jax.errors import UsageError
from vpd_jax.scenes import NYU_CLASSES
from vpd_jax.text import DEFAULT_MAX_LENGTH, IMAGENET_TEMPLATES, TextEncoder, class_embedding_table
from vpd_jax.weights.common import WeightsError, read_torch

SAFETENSORS_KEY = "class_embeddings"
OUT_SUFFIXES = (".npy", ".safetensors", ".pth", ".pt")


def save_table(table: np.ndarray, out: str | pathlib.Path) -> pathlib.Path:
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = np.ascontiguousarray(table, dtype=np.float32)
    if out.suffix == ".npy":
        np.save(out, table)
    elif out.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({SAFETENSORS_KEY: table}, str(out))
    elif out.suffix in (".pth", ".pt"):
        import torch

        torch.save(torch.from_numpy(table.copy()), str(out))
    else:
        raise SystemExit(f"--out {out}: unknown suffix {out.suffix!r}; use .npy, .safetensors, .pth or .pt")
    return out


def load_table(path: str | pathlib.Path) -> np.ndarray:
    """Read a table written by this tool, or the official ``nyu_class_embeddings.pth`` (weights only)."""
    path = pathlib.Path(path)
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        return tensors[SAFETENSORS_KEY] if SAFETENSORS_KEY in tensors else next(iter(tensors.values()))

    obj = read_torch(path)
    if isinstance(obj, dict):  # tolerate {'class_embeddings': tensor}-style files
        obj = obj.get(SAFETENSORS_KEY, next(iter(obj.values())))
    return np.asarray(obj)


def _progress(total_desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return lambda it: it
    return lambda it: tqdm(it, desc=total_desc, unit="class", file=sys.stderr)


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m vpd_jax.tools.class_embeddings", description=__doc__)
    ap.add_argument("--clip", required=True,
                    help="transformers CLIP folder, weight file in one, or hub id (openai/clip-vit-large-patch14)")
    ap.add_argument("--out", required=True, help="output file: .npy, .safetensors, .pth or .pt")
    ap.add_argument("--with_mean", action="store_true",
                    help="append the mean row: the (28, 768) table of mmseg, row 27 = unknown scene")
    ap.add_argument("--classes", default=None,
                    help="JSON list of class names to use instead of the official 27 (e.g. nyu_class_list.json)")
    ap.add_argument("--tokenizer", default=None, help="folder of the tokenizer, if not the CLIP source's")
    ap.add_argument("--max_length", type=int, default=DEFAULT_MAX_LENGTH,
                    help="tokenizer max_length (official: 20)")
    ap.add_argument("--fast_tokenizer", action="store_true",
                    help="use CLIPTokenizerFast (the official recipe used the slow CLIPTokenizer)")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    return ap


def embed_classes(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if pathlib.Path(args.out).suffix not in OUT_SUFFIXES:  # before minutes of encoding, not after
        raise UsageError(f"--out {args.out}: unknown suffix; use one of {', '.join(OUT_SUFFIXES)}")
    check_output_file("--out", args.out)
    # transformers would otherwise import TensorFlow (installed for the data pipeline) for nothing.
    os.environ.setdefault("USE_TF", "0")

    classes = list(NYU_CLASSES)
    if args.classes:
        try:
            classes = json.loads(pathlib.Path(args.classes).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--classes {args.classes}: {e}") from e
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise UsageError(f"--classes {args.classes}: expected a JSON list of strings")

    t0 = time.time()
    try:
        enc = TextEncoder.from_pretrained(args.clip, tokenizer_source=args.tokenizer, max_length=args.max_length,
                                          use_fast=args.fast_tokenizer, batch_size=len(IMAGENET_TEMPLATES))
    except WeightsError:
        raise
    except ValueError as e:  # the tokenizer's or transformers' own complaint about the folder
        raise WeightsError(f"--clip {args.clip}: {e}") from e
    print(f"loaded CLIP text model from {args.clip} ({time.time() - t0:.1f}s)", file=sys.stderr)
    progress = None if args.no_progress else _progress("class embeddings")
    table = class_embedding_table(enc, classes, with_mean=args.with_mean, progress=progress)
    out = save_table(table, args.out)
    print(f"wrote {out}: {table.shape} float32 ({len(classes)} classes x {len(IMAGENET_TEMPLATES)} templates, "
          f"max_length {args.max_length}{', + mean row' if args.with_mean else ''})", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vpd_jax.tools.class_embeddings`` / ``vpd-class-embeddings``: exit 0, 1 or 2."""
    return run_tool(embed_classes, argv)


if __name__ == "__main__":
    sys.exit(main())
