"""The NYUv2 scene classes that condition VPD, and the two filename-to-class rules.

The class order is the official ``depth/nyu_class_list.json`` of wl-zhao/VPD (mmsegmentation's
``NYUDataset.METAINFO['classes']`` has the same order); the rows of every class-embedding table follow it.
Row ``UNKNOWN_CLASS`` (27) is the mean of the 27 rows: mmseg's ``-1`` ("no scene label").

Two rules map an image's file name to a class id, and a checkpoint must be used with the rule of the repo
that trained it (wl-zhao/VPD depth/dataset/nyudepthv2.py; mmsegmentation mmseg/datasets/nyu.py):

* ``"official"``: the first class name that is a *substring* of ``<scene_dir>_<file>``; so ``study_room_*``
  maps to ``study``, ``office_kitchen_*`` to ``kitchen`` and ``nyu_office_*`` to ``office``. A name that
  matches nothing is an error, as in the reference's assert.
* ``"mmseg"``: the part of the base name before the first digit, less the separator before it
  (``study_room_0004_00012.jpg`` -> ``study_room``); a name that is not a class gives ``UNKNOWN_CLASS``.
"""

from __future__ import annotations

import json
import os
import pathlib

NYU_CLASSES: tuple[str, ...] = (
    "printer_room", "bathroom", "living_room", "study", "conference_room", "study_room", "kitchen",
    "home_office", "bedroom", "dinette", "playroom", "indoor_balcony", "laundry_room", "basement",
    "excercise_room", "foyer", "home_storage", "cafe", "furniture_store", "office_kitchen",
    "student_lounge", "dining_room", "reception_room", "computer_lab", "classroom", "office", "bookstore",
)
NUM_CLASSES = len(NYU_CLASSES)  # 27
UNKNOWN_CLASS = NUM_CLASSES  # row 27 of a 28-row table: the mean embedding
CLASS_RULES = ("official", "mmseg")


def class_id_from_name(name: str) -> int:
    """The id of an exact class name (``"kitchen"`` -> 6); raises ``ValueError`` naming the valid ones."""
    try:
        return NYU_CLASSES.index(name)
    except ValueError:
        raise ValueError(f"unknown NYU scene class {name!r}; expected one of: {', '.join(NYU_CLASSES)}") from None


def official_class_id(filename: str) -> int:
    """Official rule: first class that is a substring of ``filename`` (``<scene_dir>_<file>``)."""
    for i, cls in enumerate(NYU_CLASSES):
        if cls in filename:
            return i
    raise ValueError(f"{filename}: no NYU scene class is a substring of this name (official class rule)")


def mmseg_class_id(filename: str) -> int:
    """mmseg rule: the base name's prefix before its first digit (less one separator); unknown -> 27."""
    base = os.path.basename(filename)
    pos = next((i for i, ch in enumerate(base) if ch.isdigit()), None)
    if pos is None:
        return UNKNOWN_CLASS
    prefix = base[: pos - 1] if pos > 0 else ""
    return NYU_CLASSES.index(prefix) if prefix in NYU_CLASSES else UNKNOWN_CLASS


def class_id_for_file(filename: str, rule: str = "official") -> int:
    """Class id of an image by ``rule`` (``"official"`` or ``"mmseg"``); see the module docstring."""
    if rule == "official":
        return official_class_id(filename)
    if rule == "mmseg":
        return mmseg_class_id(filename)
    raise ValueError(f"class rule {rule!r} is not one of {CLASS_RULES}")


# --------------------------------------------------------------------------------------- your own classes
def class_list_path(table: str | os.PathLike) -> pathlib.Path:
    """The class list written next to a class table: ``my.npy`` -> ``my.classes.json``."""
    table = pathlib.Path(table)
    return table.with_name(table.stem + ".classes.json")


def read_class_list(table: str | os.PathLike) -> list[str] | None:
    """The row names of a class table from its ``.classes.json`` (None when it has none); ``ValueError`` (one
    line naming the file) when the file is not a list of names."""
    path = class_list_path(table)
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: unreadable class list ({e})") from None
    names = obj.get("classes") if isinstance(obj, dict) else obj
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"{path}: expected {{\"classes\": [names...]}} or a JSON list of class names")
    return names


def name_key(name: str) -> str:
    """How scene and class names are compared: case, ``_``/``-`` and repeated spaces do not matter
    (``Living_Room`` = ``living room``)."""
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())
