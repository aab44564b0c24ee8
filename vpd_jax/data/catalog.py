"""Which datasets the loaders can read, where they live under a ``data_dir``, and the one-line error for a
missing one. Pure Python (no TensorFlow/TFDS import), so the trainer can check its config up front.

Fixed names (``DATASETS``) plus ``depth_folder/<name>``, any folder dataset prepared with ``--source folder``.
``TASKS`` says which are depth and which segmentation datasets."""

from __future__ import annotations

import json
import os
import re

from vpd_jax.errors import DatasetNotFoundError

# name -> (directory under data_dir, version, prepare command hint, split aliases)
DATASETS: dict[str, dict] = {
    "nyu_vpd/bts": {"path": "nyu_vpd/bts/1.0.0",
                    "prepare": "--source bts --bts_dir SYNC_DIR [--train_list LIST] "
                               "[--test_dir OFFICIAL_SPLITS/test | --mat LABELED.mat --splits splits.mat]"},
    "nyu_vpd/mat": {"path": "nyu_vpd/mat/1.0.0", "prepare": "--source mat --mat LABELED.mat --splits splits.mat"},
    "nyu_vpd/mmseg": {"path": "nyu_vpd/mmseg/1.0.0", "prepare": "--source mmseg --mmseg_dir data/nyu"},
    "nyu_vpd/synthetic": {"path": "nyu_vpd/synthetic/1.0.0",
                          "prepare": "--source synthetic --num_train 256 --num_test 64 --height 120 --width 160"},
    "nyu_depth_v2": {"path": "nyu_depth_v2/0.0.1", "prepare": "--source fastdepth --fastdepth_dir EXTRACTED_DIR",
                     "aliases": {"test": "validation"}},
    "kitti_vpd/eigen": {"path": "kitti_vpd/eigen/1.0.0",
                        "prepare": "--source kitti --kitti_raw RAW_DIR --kitti_depth DATA_DEPTH_ANNOTATED_DIR "
                                   "--train_list eigen_train_files_with_gt.txt "
                                   "--test_list eigen_test_files_with_gt.txt"},
    "ade20k_vpd/ade": {"path": "ade20k_vpd/ade/1.0.0", "prepare": "--source ade20k --ade_dir ADEChallengeData2016",
                       "aliases": {"test": "validation", "val": "validation"}, "task": "segmentation"},
    "ade20k_vpd/synthetic": {"path": "ade20k_vpd/synthetic/1.0.0",
                             "prepare": "--source synthetic_seg --num_train 256 --num_test 64 --height 120 "
                                        "--width 160",
                             "aliases": {"test": "validation", "val": "validation"}, "task": "segmentation"},
}
TASKS = ("depth", "segmentation")
FOLDER_PREFIX = "depth_folder/"
FOLDER_VERSION = "1.0.0"


def _entry(name: str) -> dict | None:
    if name in DATASETS:
        return DATASETS[name]
    if name.startswith(FOLDER_PREFIX) and re.fullmatch(r"[a-z0-9][a-z0-9_]*", name[len(FOLDER_PREFIX):]):
        n = name[len(FOLDER_PREFIX):]
        return {"path": f"{FOLDER_PREFIX}{n}/{FOLDER_VERSION}",
                "prepare": f"--source folder --name {n} --images 'DIR/**/*.jpg' --depths 'DIR/**/*.png' "
                           "--depth_scale 1000"}
    return None


def dataset_names() -> list[str]:
    return list(DATASETS)


def dataset_task(name: str) -> str:
    """``depth`` or ``segmentation``: what ``name``'s examples hold (unknown names: ``depth``)."""
    return (_entry(name) or {}).get("task", "depth")


def dataset_path(data_dir: str, name: str) -> str:
    entry = _entry(name)
    if entry is None:
        raise DatasetNotFoundError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}, "
                                   f"{FOLDER_PREFIX}<name> (a folder dataset)")
    return os.path.join(data_dir, entry["path"])


def _info(path: str) -> dict:
    with open(os.path.join(path, "dataset_info.json")) as f:
        return json.load(f)


def _splits(path: str) -> list[str]:
    return [s["name"] for s in _info(path).get("splits", [])]


def prepared_datasets(data_dir: str) -> dict[str, list[str]]:
    """``{name: [splits]}`` of every dataset prepared (finished) under ``data_dir``."""
    out = {}
    folders = os.path.join(data_dir, FOLDER_PREFIX)
    names = list(DATASETS)
    if os.path.isdir(folders):
        names += [FOLDER_PREFIX + n for n in sorted(os.listdir(folders))]
    for name in names:
        entry = _entry(name)
        if entry is None:
            continue
        path = os.path.join(data_dir, entry["path"])
        if os.path.isfile(os.path.join(path, "dataset_info.json")):
            out[name] = _splits(path)
    return out


def dataset_scenes(data_dir: str, name: str) -> dict[str, dict[str, int]] | None:
    """``{split: {scene name: examples}}`` recorded when ``name`` was prepared (None: not recorded)."""
    try:
        with open(os.path.join(dataset_path(data_dir, name), "scenes.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def resolve_split(name: str, split: str) -> str:
    return (_entry(name) or {}).get("aliases", {}).get(split, split)


def require(data_dir: str, name: str, split: str) -> tuple[str, str]:
    """``(dataset directory, TFDS split name)`` or :class:`DatasetNotFoundError` with the prepare command."""
    path = dataset_path(data_dir, name)
    entry = _entry(name)
    hint = f"python -m vpd_jax.data.prepare {entry['prepare']} --data_dir {data_dir}"
    if not os.path.isdir(data_dir):
        raise DatasetNotFoundError(f"data_dir {data_dir} does not exist; prepare a dataset with: {hint}")
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
        have = prepared_datasets(data_dir)
        have_s = f" (prepared there: {', '.join(have)})" if have else ""
        raise DatasetNotFoundError(f"no prepared dataset {name!r} under {data_dir}{have_s}; run {hint}")
    fmt = _info(path).get("fileFormat", "tfrecord")  # TFDS omits the field for its default, tfrecord
    if fmt != "array_record":
        raise DatasetNotFoundError(
            f"dataset {name!r} under {data_dir} is stored as {fmt}, but the grain loaders read array_record; "
            f"convert it with: tfds convert_format --dataset_version_dir {path} --out_file_format array_record "
            f"--out_dir NEW_DIR/{entry['path']} (then use data_dir NEW_DIR), or run {hint}")
    tfds_split = resolve_split(name, split)
    splits = _splits(path)
    if tfds_split not in splits:
        raise DatasetNotFoundError(f"dataset {name!r} under {data_dir} has no split {split!r} "
                                   f"(it has: {', '.join(splits)}); run {hint}")
    return path, tfds_split
