"""ADE20K semantic segmentation (150 classes) as VPD trains and evaluates it: class names, the
``ADEChallengeData2016`` reader and the generated rooms with labels, each item an example of the
``ade20k_vpd`` builder (``builder.py``).

Layout (wl-zhao/VPD segmentation/configs/_base_/datasets/ade20k_vpd.py; mmsegmentation mmseg/datasets/ade.py)::

    ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_NNNNNNNN.jpg
    ADEChallengeData2016/annotations/{training,validation}/<same stem>.png   (8-bit, 0 = other, 1..150 = classes)

Labels are stored as the model sees them, after mmseg's ``reduce_zero_label`` (mmseg/datasets/transforms/
loading.py ``LoadAnnotations``): 0 ("other") becomes 255 (ignored), class k becomes k-1, 255 stays 255. The label
PNG is read as mmseg reads it (pillow, unchanged: a grey PNG's values, a palette PNG's indices) and must be 8-bit,
single-channel and the image's size; anything else is a bad pair (one line naming the file; skipped, or
``--strict`` stops). The image file's bytes are stored unchanged when they decode to ``cv2.imread``'s pixels (every
colour JPEG), else as a PNG of those pixels (grey JPEGs), so reading gives what mmseg's ``LoadImageFromFile`` sees.

The stock TFDS ``scene_parse150`` is not a source: its ``annotation`` feature is the 2017 instance-segmentation
masks (``annotations_instance``: R = one of 100 instance categories, G = instance id; CSAILVision/placeschallenge
instancesegmentation/README.md), not the 150-class semantic maps VPD trains and is scored on.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from vpd_jax.data import synthetic
from vpd_jax.data.sources import BadInput, Item, _read

NUM_CLASSES = 150
IGNORE_INDEX = 255
ADE_SPLITS = {"train": "training", "validation": "validation"}  # our split -> ADEChallengeData2016 folder
ADE_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"

# mmsegmentation mmseg/datasets/ade.py ADE20KDataset.METAINFO['classes'], in order (0-based ids after
# reduce_zero_label). mmseg spells class 7 'bed ' with a trailing space; it is 'bed' here.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)
assert len(ADE20K_CLASSES) == NUM_CLASSES


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label`` on a uint8 map: 0 -> 255, k -> k-1 (1..255), 255 stays 255."""
    out = np.asarray(label, np.uint8).copy()
    out[out == 0] = 255
    out = out - np.uint8(1)
    out[out == 254] = 255
    return out


def decode_label_png(data: bytes, path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """The stored values of an 8-bit single-channel label PNG (pillow, as mmseg's ``LoadAnnotations`` reads it),
    checked against the image ``size`` (H, W)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            mode = im.mode
            arr = np.array(im) if mode in ("L", "P") else None
    except Exception:  # PIL raises assorted errors on a damaged file
        raise BadInput(f"{path}: corrupt or unreadable label map") from None
    if arr is None or arr.ndim != 2 or arr.dtype != np.uint8:
        raise BadInput(f"{path}: expected an 8-bit single-channel label PNG, got PIL mode {mode}")
    if size is not None and arr.shape != tuple(size):
        raise BadInput(f"{path}: label map is {arr.shape[0]}x{arr.shape[1]} but its image is {size[0]}x{size[1]}")
    return arr


def encode_label(label: np.ndarray) -> bytes:
    """A uint8 (H, W) label map as the PNG bytes the builder stores."""
    import cv2

    ok, enc = cv2.imencode(".png", np.ascontiguousarray(label, np.uint8))
    if not ok:
        raise ValueError("could not encode a label map as PNG")
    return enc.tobytes()


def make_example(image_bytes: bytes, label: np.ndarray, file_name: str) -> dict:
    """One ``ade20k_vpd`` example: image bytes, the reduced label (uint8 (H, W, 1) PNG) and the file name."""
    return {"image": image_bytes, "label": encode_label(label), "file_name": file_name}


def ade_pair_item(image_path: str, label_path: str, file_name: str) -> Item:
    from vpd_jax.data.folder import load_image

    def load():
        data, size = load_image(image_path)
        raw = decode_label_png(_read(label_path, "label map"), label_path, size)
        return make_example(data, reduce_zero_label(raw), file_name)

    return Item(file_name, load)


def ade_items(root: str, split: str) -> list[Item]:
    """``images/<folder>/*.jpg`` of ``root`` (``ADEChallengeData2016``) with ``annotations/<folder>/<stem>.png``,
    sorted by name (mmseg's scan order); ``split`` is ``train`` or ``validation``. An image without its label map
    becomes an item that fails with a message naming it."""
    if split not in ADE_SPLITS:
        raise ValueError(f"ADE20K split {split!r}: expected one of {tuple(ADE_SPLITS)}")
    folder = ADE_SPLITS[split]
    img_dir = os.path.join(root, "images", folder)
    ann_dir = os.path.join(root, "annotations", folder)
    if not os.path.isdir(img_dir):
        raise FileNotFoundError(f"{img_dir}: no such directory (expected ADEChallengeData2016/images/{folder})")
    items = []
    for name in sorted(os.listdir(img_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() != ".jpg":
            continue
        items.append(ade_pair_item(os.path.join(img_dir, name), os.path.join(ann_dir, stem + ".png"), name))
    return items


def synthetic_items(seed: int, num_images: int, height: int, width: int, split: str,
                    frames_per_scene: int = 4) -> Iterator[Item]:
    """Generated rooms (``synthetic.py``) with their ADE20K labels; PNG images, so the pixels are the rendered
    ones. ``split`` "train" or "validation" (the synthetic depth set's "test" rooms)."""
    gen_split = "train" if split == "train" else "test"
    for i in range(num_images):
        scene_index, frame = divmod(i, frames_per_scene)
        scene_dir, _ = synthetic.scene_dir_name(seed, scene_index, gen_split)
        name = f"{scene_dir}/rgb_{frame:05d}.png"

        def load(scene_index=scene_index, frame=frame, name=name):
            import cv2

            sc = synthetic.generate_scene(seed, scene_index, frame, height, width, gen_split)
            ok, enc = cv2.imencode(".png", np.ascontiguousarray(sc.image[..., ::-1]))
            return make_example(enc.tobytes(), sc.label, name)

        yield Item(name, load)


def decode_label(record_label) -> np.ndarray:
    """A stored label (TFDS decodes the PNG to (H, W, 1)) as uint8 (H, W)."""
    label = np.asarray(record_label)
    if label.ndim == 3:
        label = label[..., 0]
    return label.astype(np.uint8, copy=False)
