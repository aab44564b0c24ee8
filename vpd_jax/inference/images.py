"""Images in, as the model takes them: files (any PIL format, EXIF orientation) and arrays (gray, RGBA, 16-bit)."""

from __future__ import annotations

import os

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def as_rgb(image) -> np.ndarray:
    """(H, W) gray, (H, W, 1|3|4) -> (H, W, 3) float32 in [0, 255]. Alpha is dropped; uint16 is scaled by 1/257.

    uint8 and float images are taken as [0, 255] (the model's input range), other integer types must fit it.
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.stack([a, a, a], axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"image: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    a = a[..., :3]
    if a.dtype == np.uint16:
        return a.astype(np.float32) / np.float32(257.0)
    if a.dtype == np.bool_:
        return a.astype(np.float32) * 255
    return a.astype(np.float32)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, EXIF orientation applied; gray, palette, RGBA and 16-bit handled.

    Raises ``OSError`` / ``ValueError`` (from PIL) for files that are not readable images.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.asarray(im).astype(np.float64)
            top = 65535.0 if a.max(initial=0) > 255 else 255.0
            return np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8)[..., None].repeat(3, -1)
        if im.mode == "F":
            a = np.asarray(im, np.float32)
            return np.clip(np.rint(a), 0, 255).astype(np.uint8)[..., None].repeat(3, -1)
        return np.asarray(im.convert("RGB"))
