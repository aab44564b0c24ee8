"""Compute the NYU scene-class embedding table with the official VPD recipe.

    python -m vpd_jax.tools.class_embeddings --clip openai/clip-vit-large-patch14 --out nyu_class_embeddings.npy

Recipe (wl-zhao/VPD ``depth/dump_nyu_text_embeddings.py`` with ``FrozenCLIPEmbedder`` of ``vpd/models.py``): for
each class of ``vpd_jax.scenes.NYU_CLASSES`` in order, ``_`` becomes a space, the 80 CLIP ImageNet templates are
filled in, tokenized with ``padding="max_length", truncation=True, max_length=20``, encoded by the CLIP text
model, and the pooled outputs are averaged (no normalisation). Result: float32 (27, 768), or (28, 768) with
``--with_mean`` (mmseg's table, last row = unknown scene).

Your own scenes, in the order given (one row each, ``_`` -> space as above)::

    python -m vpd_jax.tools.class_embeddings --clip CLIP --out my.npy --classes kitchen,garage,"parking lot"
    python -m vpd_jax.tools.class_embeddings --clip CLIP --out my.npy --classes_file classes.txt

``--classes`` takes comma-separated names (a value ending in ``.json`` is read as a file, as before);
``--classes_file`` a text file with one name per line (blank lines and lines starting with ``#`` are skipped), a
JSON list of names, or a ``.classes.json`` written by this tool. ``--dataset ade20k`` takes ADE20K's 150 classes
(segmentation) instead of NYU's 27. ``--templates author`` uses only ``"a photo of a {}"``, the sentence VPD's
author names for the class tables (wl-zhao/VPD GitHub issue 22; which the released segmentation table used, one
sentence or the 80-template mean, the sources do not say). ``--templates single`` uses only CLIP's
"a photo of a {}." instead of the 80. Next to the table, ``<out stem>.classes.json`` records the rows' classes
in order and the recipe (``{"classes": [...], "templates": ..., "with_mean": ..., "max_length": ...}``).

To *reproduce* a released checkpoint, use the table shipped with it: the official table was generated in a
filesystem-dependent class order and regenerating it is reported to differ slightly (wl-zhao/VPD GitHub issue 56).

The output format follows the suffix: ``.npy``; ``.safetensors`` (tensor ``class_embeddings``); ``.pth`` /
``.pt`` (a bare tensor, like the official ``nyu_class_embeddings.pth``, loadable with
``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from vpd_jax.console import ArgumentParser, check_output_file, run_tool
from vpd_jax.data.segmentation import ADE20K_CLASSES
from vpd_jax.errors import UsageError
from vpd_jax.files import atomic_path, write_json
from vpd_jax.scenes import NYU_CLASSES, class_list_path
from vpd_jax.text import DEFAULT_MAX_LENGTH, TEMPLATE_SETS, TextEncoder, class_embedding_table, class_prompt_name
from vpd_jax.weights.common import CLASS_TABLE_KEY as SAFETENSORS_KEY
from vpd_jax.weights.common import WeightsError, load_class_table

load_table = load_class_table  # the reader of every format this tool writes

OUT_SUFFIXES = (".npy", ".safetensors", ".pth", ".pt")


def save_table(table: np.ndarray, out: str | pathlib.Path) -> pathlib.Path:
    """``table`` as float32 into ``out`` (format by suffix), atomically: whole or not at all."""
    out = pathlib.Path(out)
    if out.suffix not in OUT_SUFFIXES:
        raise UsageError(f"--out {out}: unknown suffix {out.suffix!r}; use .npy, .safetensors, .pth or .pt")
    table = np.ascontiguousarray(table, dtype=np.float32)
    with atomic_path(out) as tmp:  # tmp keeps the suffix, so np.save adds none
        if out.suffix == ".npy":
            np.save(tmp, table)
        elif out.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file({SAFETENSORS_KEY: table}, str(tmp))
        else:
            import torch

            torch.save(torch.from_numpy(table.copy()), str(tmp))
    return out


def classes_path(out: str | pathlib.Path) -> pathlib.Path:
    """The class list written next to a table: ``my.npy`` -> ``my.classes.json``."""
    return class_list_path(out)


def check_class_names(names: Sequence[str], flag: str, labels: Sequence[str] | None = None) -> list[str]:
    """``names`` stripped, or a ``UsageError`` naming the first empty or repeated one.

    Two names are the same class when their prompts are (``living_room`` and ``living room``). ``labels`` say
    where each name came from (``"line 3"``; default ``"entry N"``).
    """
    labels = list(labels) if labels is not None else [f"entry {i + 1}" for i in range(len(names))]
    out, seen = [], {}
    for name, label in zip(names, labels):
        if not isinstance(name, str):
            raise UsageError(f"{flag}: {label} is {name!r}, not a class name (a string)")
        name = name.strip()
        if not name:
            raise UsageError(f"{flag}: {label} is empty; give a class name")
        key = " ".join(class_prompt_name(name).split())
        if key in seen:
            raise UsageError(f"{flag}: {label} {name!r} repeats {seen[key]}; each class once")
        seen[key] = f"{label} {name!r}"
        out.append(name)
    if not out:
        raise UsageError(f"{flag}: no class names")
    return out


def parse_classes(value: str) -> list[str]:
    """``--classes kitchen,garage,"parking lot"``: comma-separated names (double quotes may hold a comma)."""
    flag = f"--classes {value}"
    try:
        rows = list(csv.reader([value], skipinitialspace=True)) if value.strip() else [[]]
    except csv.Error as e:
        raise UsageError(f"{flag}: {e}") from e
    return check_class_names(rows[0] if rows else [], flag)


def read_classes_file(path: str | os.PathLike, flag: str = "--classes_file") -> list[str]:
    """Class names from a text file (one a line; blank and ``#`` lines skipped), a JSON list, or a
    ``.classes.json`` written by this tool."""
    flag = f"{flag} {path}"
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag}: {e}") from e
    if str(path).endswith(".json"):
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise UsageError(f"{flag}: not JSON ({e})") from e
        if isinstance(obj, dict) and "classes" in obj:  # a .classes.json written next to a table
            obj = obj["classes"]
        if not isinstance(obj, list):
            raise UsageError(f"{flag}: expected a JSON list of class names")
        return check_class_names(obj, flag)
    names, labels = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.strip().startswith("#"):
            names.append(line)
            labels.append(f"line {i}")
    return check_class_names(names, flag, labels)


def class_names_from_args(args) -> list[str]:
    """The classes of ``--classes`` or ``--classes_file``; without either, ``--dataset``'s (NYU's 27 scene
    classes, or ADE20K's 150 in the official order)."""
    if args.classes is not None and args.classes_file is not None:
        raise UsageError("give --classes or --classes_file, not both")
    if args.classes_file is not None:
        return read_classes_file(args.classes_file)
    if args.classes is not None:
        if args.classes.strip().endswith(".json"):  # the older form: --classes FILE.json
            return read_classes_file(args.classes.strip(), flag="--classes")
        if pathlib.Path(args.classes).suffix and pathlib.Path(args.classes).is_file():
            raise UsageError(f"--classes {args.classes}: is a file; --classes takes names (kitchen,garage), "
                             f"use --classes_file {args.classes}")
        return parse_classes(args.classes)
    return list(ADE20K_CLASSES) if getattr(args, "dataset", "nyu") == "ade20k" else list(NYU_CLASSES)


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
    ap.add_argument("--dataset", choices=("nyu", "ade20k"), default="nyu",
                    help="the classes when neither --classes nor --classes_file is given: NYU's 27 scene classes "
                         "(depth) or ADE20K's 150 (segmentation) (default: %(default)s)")
    ap.add_argument("--with_mean", action="store_true",
                    help="append the mean row: the (28, 768) table of mmseg, row 27 = unknown scene")
    ap.add_argument("--classes", default=None, metavar="NAMES",
                    help='comma-separated class names instead of the official 27: kitchen,garage,"parking lot" '
                         "(a value ending in .json is read as a file, like --classes_file)")
    ap.add_argument("--classes_file", default=None, metavar="FILE",
                    help="class names instead of the official 27: a text file, one a line (blank lines and # "
                         "lines skipped), a JSON list (e.g. nyu_class_list.json) or a .classes.json of this tool")
    ap.add_argument("--templates", choices=sorted(TEMPLATE_SETS), default="official",
                    help='prompt templates averaged per class: official = the 80 CLIP ImageNet templates (the '
                         'depth recipe), single = "a photo of a {}." alone, author = "a photo of a {}" (the '
                         "sentence VPD's author names for the tables)")
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
    sidecar = classes_path(args.out)
    check_output_file("--out (its class list)", sidecar)
    # transformers would otherwise import TensorFlow (installed for the data pipeline) for nothing.
    os.environ.setdefault("USE_TF", "0")

    classes = class_names_from_args(args)
    templates = TEMPLATE_SETS[args.templates]

    t0 = time.time()
    try:
        enc = TextEncoder.from_pretrained(args.clip, tokenizer_source=args.tokenizer, max_length=args.max_length,
                                          use_fast=args.fast_tokenizer, batch_size=len(templates))
    except WeightsError:
        raise
    except ValueError as e:  # the tokenizer's or transformers' own complaint about the folder
        raise WeightsError(f"--clip {args.clip}: {e}") from e
    print(f"loaded CLIP text model from {args.clip} ({time.time() - t0:.1f}s)", file=sys.stderr)
    progress = None if args.no_progress else _progress("class embeddings")
    table = class_embedding_table(enc, classes, templates=templates, with_mean=args.with_mean, progress=progress)
    out = save_table(table, args.out)
    write_json(sidecar, {"classes": classes, "templates": args.templates, "with_mean": args.with_mean,
                         "max_length": args.max_length})
    n_templates = f"{len(templates)} template{'s' if len(templates) > 1 else ''}"
    print(f"wrote {out}: {table.shape} float32 ({len(classes)} classes x {n_templates} "
          f"({args.templates}), max_length {args.max_length}{', + mean row' if args.with_mean else ''}); "
          f"rows' classes in {sidecar}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vpd_jax.tools.class_embeddings`` / ``vpd-class-embeddings``: exit 0, 1 or 2."""
    return run_tool(embed_classes, argv)


if __name__ == "__main__":
    sys.exit(main())
