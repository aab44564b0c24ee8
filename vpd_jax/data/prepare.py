"""Prepare a depth dataset (NYUv2, KITTI, or any folder of image/depth pairs) or ADE20K for the loaders:
``python -m vpd_jax.data.prepare --source ... --data_dir DIR``.

Sources (see ``sources.py`` and ``folder.py`` for the layouts):

* ``bts``: the BTS ``sync`` training tree (``--bts_dir``; every pair, or those of ``--train_list``), plus the
  654-image test split from ``--test_dir official_splits/test`` (optionally ``--test_list``) or from
  ``--mat`` + ``--splits``. Writes ``nyu_vpd/bts`` (splits train[, test]).
* ``mat``: ``--mat nyu_depth_v2_labeled.mat --splits splits.mat``: the official 795/654 split. ``nyu_vpd/mat``.
* ``mmseg``: ``--mmseg_dir data/nyu`` (``images/{train,test}``, ``annotations/{train,test}``). ``nyu_vpd/mmseg``.
* ``synthetic``: generated scenes (``--num_train/--num_test/--height/--width/--seed``). ``nyu_vpd/synthetic``.
* ``fastdepth``: the stock TFDS ``nyu_depth_v2`` from an extracted FastDepth tarball (``--fastdepth_dir``).
* ``kitti``: KITTI raw drives (``--kitti_raw``) with the annotated depth maps (``--kitti_depth``), the pairs of the
  Eigen-split lists ``--train_list`` and/or ``--test_list`` (see ``kitti.py``). ``kitti_vpd/eigen``. Lines without
  ground truth (``None``, or a depth file found nowhere) are counted and left out, not skipped as bad pairs.
* ``folder``: any folder of image/depth pairs (``folder.py``): ``--images 'DIR/**/*.jpg' --depths
  'DIR/**/*.png' --depth_scale 1000`` [``--invalid 0``] [``--val_fraction 0.05`` | ``--val_list FILE``]
  [``--scene_from parent|none|FILE``] [``--name NAME``]. Any image size. Writes ``depth_folder/<name>``
  (splits train[, val]).
* ``ade20k``: ``--ade_dir ADEChallengeData2016`` (``images/{training,validation}/*.jpg`` with
  ``annotations/{training,validation}/*.png``; ``segmentation.py``), labels stored after ``reduce_zero_label``.
  Writes ``ade20k_vpd/ade`` (splits train, validation).
* ``synthetic_seg``: generated rooms with per-pixel ADE20K labels (``--num_train/--num_test/--height/--width/
  --seed/--frames_per_scene``; ``--num_test`` rooms make the validation split). ``ade20k_vpd/synthetic``.

Bad pairs are reported one line each and skipped; the run ends with the count (``--strict`` stops at the
first instead). A dataset already under ``--data_dir`` is replaced only when the new build has finished.
Exit status: 0 on success, 1 on a strict stop or unusable input, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

from absl import logging

from vpd_jax.console import ArgumentParser, check_output_folder, run_tool, say_error
from vpd_jax.data import builder, folder, kitti, segmentation, sources
from vpd_jax.errors import UsageError

SEG_SOURCES = {"ade20k": "ade", "synthetic_seg": "synthetic"}  # --source -> ade20k_vpd config


def _size(text: str) -> tuple[int, int] | None:
    if text.lower() in ("any", "none"):
        return None
    try:
        h, w = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW, e.g. 480x640, or 'any'") from None
    return h, w


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m vpd_jax.data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True,
                   choices=[*builder.SOURCES, "fastdepth", "kitti", "folder", "ade20k", "synthetic_seg"])
    p.add_argument("--data_dir", required=True, help="where prepared datasets live (the loaders' data_dir)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad pair instead of skipping it")
    p.add_argument("--image_size", type=_size, default=(480, 640),
                   help="required HxW of every NYU image (default 480x640; 'any' accepts any size); KITTI and "
                        "folder images are read at any size")
    g = p.add_argument_group("bts and kitti")
    g.add_argument("--train_list", help="bts: BTS-format list of the training pairs (default: every pair found); "
                                        "kitti: the Eigen training list (eigen_train_files_with_gt.txt)")
    g.add_argument("--test_list", help="bts: BTS-format list of the test pairs under --test_dir; kitti: the Eigen "
                                       "test list (eigen_test_files_with_gt.txt)")
    g = p.add_argument_group("bts")
    g.add_argument("--bts_dir", help="BTS sync tree: <scene_dir>/rgb_NNNNN.jpg + sync_depth_NNNNN.png")
    g.add_argument("--test_dir", help="official_splits/test tree (same layout) for the test split")
    g = p.add_argument_group("mat")
    g.add_argument("--mat", help="nyu_depth_v2_labeled.mat")
    g.add_argument("--splits", help="splits.mat (trainNdxs/testNdxs)")
    g.add_argument("--mat_image_format", choices=("jpeg", "png"), default="jpeg",
                   help="jpeg (default) reproduces the official extraction's files; png keeps the exact pixels")
    g = p.add_argument_group("mmseg")
    g.add_argument("--mmseg_dir", help="mmseg data root holding images/ and annotations/")
    g = p.add_argument_group("ade20k")
    g.add_argument("--ade_dir", help="ADEChallengeData2016: images/{training,validation}/*.jpg and "
                                     "annotations/{training,validation}/*.png")
    g = p.add_argument_group("synthetic and synthetic_seg")
    g.add_argument("--num_train", type=int, default=256)
    g.add_argument("--num_test", type=int, default=64)
    g.add_argument("--height", type=int, default=120)
    g.add_argument("--width", type=int, default=160)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--frames_per_scene", type=int, default=4)
    g = p.add_argument_group("fastdepth")
    g.add_argument("--fastdepth_dir", help="extracted nyudepthv2.tar.gz (holds nyudepthv2/train and /val)")
    g = p.add_argument_group("kitti")
    g.add_argument("--kitti_raw", help="KITTI raw data: <date>/<drive>/image_02/data/<frame>.png")
    g.add_argument("--kitti_depth", help="extracted data_depth_annotated: {train,val}/<drive>/proj_depth/"
                                         "groundtruth/image_02/<frame>.png (or their contents moved up into it)")
    g = p.add_argument_group("folder", "any folder of image/depth pairs, written as depth_folder/<name>")
    g.add_argument("--images", help="glob of the images, quoted ('DIR/**/*.jpg'), or a folder")
    g.add_argument("--depths", help="glob of the depth maps, quoted ('DIR/**/*.png'), or a folder")
    g.add_argument("--depth_scale", type=float,
                   help="stored depth value per metre: 1000 for millimetre PNGs, 256 for KITTI's, 1 for metres")
    g.add_argument("--invalid", type=float, default=0.0,
                   help="stored value meaning 'no depth' (default 0); negative and non-finite values are too")
    g.add_argument("--val_fraction", type=float,
                   help=f"share of the pairs for the val split (default {folder.DEFAULT_VAL_FRACTION}; 0: none)")
    g.add_argument("--val_list", help="file of the val images, one relative path or stem a line")
    g.add_argument("--scene_from", default="parent",
                   help="parent (the image's folder name, default), none, or a JSON / '<key> <scene>' file")
    g.add_argument("--name", help="dataset name (default: the images' root folder name)")
    args, extra = p.parse_known_args(argv)
    if extra:
        if args.source == "folder" and not any(e.startswith("-") for e in extra):
            p.error(f"{len(extra)} extra paths ({extra[0]}, ...): did the shell expand a glob? Quote it: "
                    "--images 'DIR/**/*.jpg'")
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    need = {"bts": ["bts_dir"], "mat": ["mat", "splits"], "mmseg": ["mmseg_dir"], "synthetic": [],
            "fastdepth": ["fastdepth_dir"], "kitti": ["kitti_raw", "kitti_depth"],
            "folder": ["images", "depths", "depth_scale"], "ade20k": ["ade_dir"], "synthetic_seg": []}[args.source]
    missing = [f"--{k}" for k in need if getattr(args, k) is None]
    if missing:
        p.error(f"--source {args.source} needs {' and '.join(missing)}")
    if args.source == "folder":
        _check_folder_args(p, args)
    if args.source == "bts" and args.test_dir and args.mat:
        p.error("give the test split either as --test_dir or as --mat/--splits, not both")
    if args.source == "bts" and bool(args.mat) != bool(args.splits):
        p.error("--mat and --splits go together")
    if args.source == "kitti" and not (args.train_list or args.test_list):
        p.error("--source kitti needs --train_list and/or --test_list (the Eigen split lists)")
    return args


def _check_folder_args(p: argparse.ArgumentParser, args):
    if not (math.isfinite(args.depth_scale) and args.depth_scale > 0):
        p.error(f"--depth_scale {args.depth_scale:g}: expected a positive number (stored value per metre)")
    if args.val_fraction is not None and args.val_list is not None:
        p.error("give either --val_fraction or --val_list, not both")
    if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
        p.error(f"--val_fraction {args.val_fraction:g}: expected a fraction in [0, 1)")
    if args.name is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_]*", args.name):
        p.error(f"--name {args.name!r}: expected lower-case letters, digits and _ (e.g. my_rooms)")


def _check_file(path: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file ({what})")


def _check_dir(path: str, what: str):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory ({what})")


def kitti_split_plan(args) -> tuple[dict, dict, dict[str, kitti.EigenList]]:
    """(split -> callable returning Items, split -> count, split -> the parsed list with its left-out lines)."""
    _check_dir(args.kitti_raw, "--kitti_raw, the KITTI raw drives")
    _check_dir(args.kitti_depth, "--kitti_depth, the annotated depth maps")
    plan, sizes, lists = {}, {}, {}
    for split, list_file, flag in (("train", args.train_list, "--train_list"), ("test", args.test_list,
                                                                                "--test_list")):
        if not list_file:
            continue
        _check_file(list_file, flag)
        lst = kitti.eigen_items(args.kitti_raw, args.kitti_depth, list_file)
        if not lst.items and lst.depth_missing:
            raise ValueError(f"{list_file}: none of its {len(lst.depth_missing)} listed depth maps is under "
                             f"{args.kitti_depth} (or its train/ and val/); expected the extracted "
                             "data_depth_annotated folder as --kitti_depth")
        plan[split], sizes[split], lists[split] = (lambda items=lst.items: items), len(lst.items), lst
    return plan, sizes, lists


def split_plan(args) -> tuple[dict, dict]:
    """(split -> callable returning Items, split -> expected count for the progress bar)."""
    size = args.image_size
    plan, sizes = {}, {}
    if args.source == "bts":
        if args.train_list:
            _check_file(args.train_list, "--train_list")
            train = sources.bts_list_items(args.bts_dir, args.train_list, size)
        else:
            train = sources.bts_tree_items(args.bts_dir, size)
        plan["train"], sizes["train"] = (lambda: train), len(train)
        if args.test_dir:
            if args.test_list:
                _check_file(args.test_list, "--test_list")
                test = sources.bts_list_items(args.test_dir, args.test_list, size)
            else:
                test = sources.bts_tree_items(args.test_dir, size)
            plan["test"], sizes["test"] = (lambda: test), len(test)
        elif args.mat:
            _check_file(args.mat, "--mat")
            idx = sources.read_splits(args.splits)
            plan["test"] = lambda: sources.mat_items(args.mat, args.splits, "test", args.mat_image_format)
            sizes["test"] = len(idx["test"])
    elif args.source == "mat":
        _check_file(args.mat, "--mat")
        idx = sources.read_splits(args.splits)
        for split in ("train", "test"):
            plan[split] = (lambda s=split: sources.mat_items(args.mat, args.splits, s, args.mat_image_format))
            sizes[split] = len(idx[split])
    elif args.source == "mmseg":
        for split in ("train", "test"):
            if os.path.isdir(os.path.join(args.mmseg_dir, "images", split)):
                items = sources.mmseg_items(args.mmseg_dir, split, size)
                plan[split], sizes[split] = (lambda items=items: items), len(items)
        if not plan:
            raise FileNotFoundError(f"{args.mmseg_dir}: no images/train or images/test directory (mmseg layout)")
    elif args.source == "synthetic":
        for split, n in (("train", args.num_train), ("test", args.num_test)):
            if n > 0:
                plan[split] = (lambda s=split, n=n: sources.synthetic_items(
                    args.seed, n, args.height, args.width, s, args.frames_per_scene))
                sizes[split] = n
    elif args.source == "kitti":
        plan, sizes, _ = kitti_split_plan(args)
    elif args.source == "ade20k":
        _check_dir(args.ade_dir, "--ade_dir, the extracted ADEChallengeData2016")
        for split in segmentation.ADE_SPLITS:
            folder_name = segmentation.ADE_SPLITS[split]
            if os.path.isdir(os.path.join(args.ade_dir, "images", folder_name)):
                items = segmentation.ade_items(args.ade_dir, split)
                plan[split], sizes[split] = (lambda items=items: items), len(items)
        if not plan:
            raise FileNotFoundError(f"{args.ade_dir}: no images/training or images/validation directory "
                                    "(expected the extracted ADEChallengeData2016)")
    elif args.source == "synthetic_seg":
        for split, n in (("train", args.num_train), ("validation", args.num_test)):
            if n > 0:
                plan[split] = (lambda s=split, n=n: segmentation.synthetic_items(
                    args.seed, n, args.height, args.width, s, args.frames_per_scene))
                sizes[split] = n
    return plan, sizes


def prepare_folder(args) -> int:
    """``--source folder``: pair, split and build ``depth_folder/<name>``; prints the summary line."""
    report = builder.PrepareReport(strict=args.strict)
    try:
        fp = folder.plan(args.images, args.depths, name=args.name, val_fraction=args.val_fraction,
                         val_list=args.val_list, scene_from=args.scene_from, report=report)
        unpaired = len(report.skipped)
        plan, sizes = fp.split_items(args.depth_scale, args.invalid)
        path = builder.build_dataset(args.data_dir, builder.FOLDER_NAME, fp.name, plan, sizes, report)
    except (builder.StrictStop, sources.BadInput) as e:
        if not args.strict:
            raise
        print(f"error (--strict): {e}; nothing under {args.data_dir} was changed", file=sys.stderr)
        return 1
    dataset = f"{builder.FOLDER_NAME}/{fp.name}"
    written = ", ".join(f"{k} {v}" for k, v in report.written.items())
    unusable = len(report.skipped) - unpaired
    hint = f"--config.dataset={dataset}" + (" --config.test_split=val" if "val" in report.written else "")
    print(f"prepared {dataset} at {path}: {written} examples; skipped {len(report.skipped)} (unpaired {unpaired}, "
          f"unusable {unusable}); use {hint}")
    if fp.unmatched_val_names:
        print(f"{fp.unmatched_val_names} names in {args.val_list} match no image/depth pair")
    if fp.no_scene:
        print(f"{fp.no_scene} images have no scene in {args.scene_from}; they will use the mean row")
    return 0


def prepare(argv=None) -> int:
    args = parse_args(argv)
    check_output_folder("--data_dir", args.data_dir)
    # TFDS' INFO lines name the staging directory, which would only confuse; our bars and summary say it all.
    logging.set_verbosity(logging.WARNING)
    try:
        if args.source == "folder":
            return prepare_folder(args)
        if args.source == "fastdepth":
            path = builder.build_stock_nyu_depth_v2(args.data_dir, args.fastdepth_dir)
            print(f"prepared nyu_depth_v2 at {path}")
            return 0
        report = builder.PrepareReport(strict=args.strict)
        lists = {}
        if args.source == "kitti":
            plan, sizes, lists = kitti_split_plan(args)
            for lst in lists.values():
                for line in lst.depth_missing:  # an incomplete download: say which files
                    report.log(f"no ground truth: {line}")
            name, config = builder.KITTI_NAME, "eigen"
        else:
            plan, sizes = split_plan(args)
            if args.source in SEG_SOURCES:
                name, config = builder.SEG_NAME, SEG_SOURCES[args.source]
            else:
                name, config = builder.NAME, args.source
        path = builder.build_dataset(args.data_dir, name, config, plan, sizes, report)
    except builder.StrictStop as e:
        print(f"error (--strict): {e}; nothing under {args.data_dir} was changed", file=sys.stderr)
        return 1
    except UsageError:
        raise  # run_tool: one line, exit 2
    except (ValueError, sources.BadInput) as e:  # a missing file is reported by run_tool
        say_error(e)
        return 1
    if lists:
        written = ", ".join(f"{k} {v} examples ({len(lists[k].no_gt)} listed without ground truth, "
                            f"{len(lists[k].depth_missing)} whose depth file is missing: left out)"
                            for k, v in report.written.items())
    else:
        written = ", ".join(f"{k} {v}" for k, v in report.written.items()) + " examples"
    print(f"prepared {name}/{config} at {path}: {written}; skipped {len(report.skipped)} bad pairs")
    return 0


def main(argv=None) -> int:
    """``python -m vpd_jax.data.prepare`` / ``vpd-prepare``: exit 0, 1 (unreadable or missing input) or 2."""
    return run_tool(prepare, argv)


if __name__ == "__main__":
    sys.exit(main())
