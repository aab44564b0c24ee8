"""VPD's ADE20K training augmentations in numpy/OpenCV, equal to mmsegmentation's transforms pixel for pixel for
the same random parameters, deterministic given a numpy Generator.

Pipeline (wl-zhao/VPD segmentation/configs/_base_/datasets/ade20k_vpd.py; mmsegmentation 1.2.2
mmseg/datasets/transforms/transforms.py and mmcv/transforms/processing.py):

1. RandomResize: scale (2048, 512) times a ratio drawn uniformly from [0.5, 2.0], keep ratio (mmcv
   ``imrescale``: the largest size fitting inside that (long, short) edge pair, rounded half up); bilinear image,
   nearest label.
2. RandomCrop 512x512 with ``cat_max_ratio`` 0.75: a crop whose most frequent class covers 75% or more of its
   labelled (not 255) pixels, or that holds a single class, is redrawn, up to 10 times (the 11th draw is kept).
   A smaller image gives a smaller crop.
3. RandomFlip (horizontal) with p = 0.5.
4. PhotoMetricDistortion: brightness (p 0.5, delta U(-32, 32)); then contrast (p 0.5, alpha U(0.5, 1.5)) either
   here (mode 1) or last (mode 0); saturation (p 0.5, alpha U(0.5, 1.5) on HSV's S); hue (p 0.5, integer delta in
   [-18, 17]: numpy's ``randint(-18, 18)``). Each op converts through float32 and truncates to uint8; saturation
   and hue each make their own RGB->HSV->RGB round trip, as mmseg does.
5. Pad to 512x512 at the bottom/right: image 0, label 255 (ignored).

The normalisation (mean = std = 127.5) is the model's. In the references the padding comes after it (VPD's
``Normalize`` precedes ``Pad``; mmseg 1.x pads in ``SegDataPreProcessor`` after normalising), so padded pixels are
0 in normalised space, i.e. mid-grey, not black: every example carries ``image_hw``, the unpadded size, and
:func:`normalize` shows the arithmetic (padding -> 0).

Images are RGB here (mmseg works on BGR; the HSV conversions are the same computation with the channels named
the other way round). Parameters are sampled (``sample_*``) separately from their application (``apply_*``), so a
test can feed the very values to mmseg's transforms.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from vpd_jax.data.augment import random_resize_shape

IGNORE_INDEX = 255


@dataclasses.dataclass
class SegAugmentConfig:
    """ADE20K training augmentation; the defaults are VPD's 512x512 recipe."""

    crop_size: tuple[int, int] | None = (512, 512)  # (h, w); None keeps the whole (resized) image, unpadded
    random_resize: bool = True
    scale: tuple[int, int] = (2048, 512)  # mmcv scale (long edge, short edge) at ratio 1
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75  # 1: no check
    crop_tries: int = 10
    flip_prob: float = 0.5
    photometric: bool = True
    brightness_delta: int = 32
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18
    ignore_index: int = IGNORE_INDEX
    pad_value: int = 0  # image padding (uint8); the label is padded with ignore_index

    def __post_init__(self):
        if self.crop_size is not None:
            self.crop_size = (int(self.crop_size[0]), int(self.crop_size[1]))
        self.scale = (int(self.scale[0]), int(self.scale[1]))
        self.ratio_range = (float(self.ratio_range[0]), float(self.ratio_range[1]))

    @classmethod
    def ade_512(cls) -> "SegAugmentConfig":
        return cls()

    @classmethod
    def none(cls, crop_size: tuple[int, int] | None = None) -> "SegAugmentConfig":
        return cls(crop_size=crop_size, random_resize=False, cat_max_ratio=1.0, flip_prob=0.0, photometric=False)


# --- geometry -----------------------------------------------------------------------------------------------

def rescale_shape(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``imrescale``'s output (h, w) for an integer (long edge, short edge) ``scale``."""
    return random_resize_shape(height, width, 1.0, scale)


def sample_resize_scale(rng: np.random.Generator, scale: tuple[int, int], ratio_range: tuple[float, float]):
    """mmcv ``RandomResize._random_sample_ratio``: ratio = U[0,1) * (max - min) + min; scale truncated to ints."""
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    return int(scale[0] * ratio), int(scale[1] * ratio)


def resize(image: np.ndarray, label: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear image, nearest label (mmcv ``imresize`` with cv2)."""
    import cv2

    h, w = shape
    return (cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR),
            cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST))


def crop_ok(label_crop: np.ndarray, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX) -> bool:
    """mmseg ``RandomCrop``'s test: more than one labelled class, the largest under ``cat_max_ratio``."""
    labels, cnt = np.unique(label_crop, return_counts=True)
    cnt = cnt[labels != ignore_index]
    return len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio


def sample_crop(rng: np.random.Generator, label: np.ndarray, crop_size: tuple[int, int], cat_max_ratio: float,
                tries: int = 10, ignore_index: int = IGNORE_INDEX) -> tuple[int, int, list[tuple[int, int]]]:
    """(top, left, every offset drawn): mmseg ``RandomCrop.crop_bbox`` (offsets uniform in [0, margin], drawn
    top then left; redrawn while :func:`crop_ok` fails, at most ``tries`` times)."""
    h, w = label.shape[:2]
    ch, cw = crop_size

    def draw():
        return int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1))

    drawn = [draw()]
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            top, left = drawn[-1]
            if crop_ok(label[top:top + ch, left:left + cw], cat_max_ratio, ignore_index):
                break
            drawn.append(draw())
    top, left = drawn[-1]
    return top, left, drawn


def crop(image: np.ndarray, label: np.ndarray, top: int, left: int, size: tuple[int, int]):
    ch, cw = size
    return image[top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]


def pad(image: np.ndarray, label: np.ndarray, size: tuple[int, int], pad_value: int = 0,
        ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """mmcv ``impad`` to ``size`` at the bottom/right: image ``pad_value``, label ``ignore_index``."""
    h, w = label.shape
    ch, cw = size
    if (h, w) == (ch, cw):
        return image, label
    out_img = np.full((max(ch, h), max(cw, w), image.shape[2]), pad_value, image.dtype)
    out_lab = np.full((max(ch, h), max(cw, w)), ignore_index, label.dtype)
    out_img[:h, :w] = image
    out_lab[:h, :w] = label
    return out_img, out_lab


# --- photometric (mmseg PhotoMetricDistortion) -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PhotoParams:
    """Sampled parameters; ``None``: that op's coin came up 0. ``mode`` 1: contrast second, 0: contrast last."""

    brightness: float | None
    mode: int
    contrast: float | None
    saturation: float | None
    hue: int | None


def sample_photometric(rng: np.random.Generator, cfg: SegAugmentConfig | None = None) -> PhotoParams:
    """Draws in mmseg's order: brightness coin[, delta], mode, contrast coin[, alpha] (mode 1), saturation
    coin[, alpha], hue coin[, delta], contrast coin[, alpha] (mode 0)."""
    cfg = cfg or SegAugmentConfig()

    def coin():
        return bool(rng.integers(0, 2))

    b = c = s = hue = None
    if coin():
        b = float(rng.uniform(-cfg.brightness_delta, cfg.brightness_delta))
    mode = int(rng.integers(0, 2))
    if mode == 1 and coin():
        c = float(rng.uniform(*cfg.contrast_range))
    if coin():
        s = float(rng.uniform(*cfg.saturation_range))
    if coin():
        hue = int(rng.integers(-cfg.hue_delta, cfg.hue_delta))  # numpy randint: high exclusive, as mmseg's
    if mode == 0 and coin():
        c = float(rng.uniform(*cfg.contrast_range))
    return PhotoParams(b, mode, c, s, hue)


def convert_table(alpha: float = 1, beta: float = 0) -> np.ndarray:
    """``PhotoMetricDistortion.convert`` as a uint8 table: float32(v) * alpha + beta, clipped, truncated."""
    t = np.arange(256, dtype=np.uint8).astype(np.float32) * alpha + beta
    return np.clip(t, 0, 255).astype(np.uint8)


def _lut(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.LUT(np.ascontiguousarray(image), table)


def _hsv_op(image: np.ndarray, channel: int, table: np.ndarray) -> np.ndarray:
    import cv2

    hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)
    hsv[..., channel] = _lut(hsv[..., channel], table)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def apply_photometric(image: np.ndarray, p: PhotoParams) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion.transform`` for the parameters ``p`` (uint8 RGB in, uint8 RGB out)."""
    if p.brightness is not None:
        image = _lut(image, convert_table(beta=p.brightness))
    if p.mode == 1 and p.contrast is not None:
        image = _lut(image, convert_table(alpha=p.contrast))
    if p.saturation is not None:
        image = _hsv_op(image, 1, convert_table(alpha=p.saturation))
    if p.hue is not None:
        image = _hsv_op(image, 0, ((np.arange(256) + p.hue) % 180).astype(np.uint8))
    if p.mode == 0 and p.contrast is not None:
        image = _lut(image, convert_table(alpha=p.contrast))
    return image


# --- the whole recipe ---------------------------------------------------------------------------------------

def seg_augment(image: np.ndarray, label: np.ndarray, cfg: SegAugmentConfig,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Applies ``cfg`` to one example (uint8 RGB (H,W,3), uint8 label (H,W)). Returns (image, label, params);
    ``params["image_hw"]`` is the size before padding."""
    params: dict[str, Any] = {}
    if cfg.random_resize:
        scale = sample_resize_scale(rng, cfg.scale, cfg.ratio_range)
        shape = rescale_shape(*label.shape, scale)
        image, label = resize(image, label, shape)
        params["resize"] = shape
    if cfg.crop_size is not None:
        top, left, drawn = sample_crop(rng, label, cfg.crop_size, cfg.cat_max_ratio, cfg.crop_tries,
                                       cfg.ignore_index)
        image, label = crop(image, label, top, left, cfg.crop_size)
        params["crop"] = (top, left)
        params["crop_draws"] = len(drawn)
    flip = bool(rng.random() < cfg.flip_prob)
    if flip:
        image, label = image[:, ::-1], label[:, ::-1]
    params["flip"] = flip
    image = np.ascontiguousarray(image)
    label = np.ascontiguousarray(label)
    if cfg.photometric:
        pp = sample_photometric(rng, cfg)
        image = apply_photometric(image, pp)
        params["photometric"] = pp
    params["image_hw"] = label.shape
    if cfg.crop_size is not None:
        image, label = pad(image, label, cfg.crop_size, cfg.pad_value, cfg.ignore_index)
    return image, label, params


def normalize(image: np.ndarray, image_hw: tuple[int, int] | None = None, mean: float = 127.5,
              std: float = 127.5) -> np.ndarray:
    """The references' input: float32 (x - mean) / std, and 0 outside the unpadded ``image_hw`` (their padding
    comes after the normalisation). Works on (H,W,3) or a batch (B,H,W,3) with ``image_hw`` (B,2)."""
    x = (np.asarray(image, np.float32) - np.float32(mean)) / np.float32(std)
    if image_hw is None:
        return x
    hw = np.asarray(image_hw).reshape(-1, 2)
    xb = x.reshape((-1,) + x.shape[-3:])
    rows = np.arange(xb.shape[1])[None, :, None] < hw[:, 0, None, None]
    cols = np.arange(xb.shape[2])[None, None, :] < hw[:, 1, None, None]
    return np.where((rows & cols)[..., None], xb, np.float32(0)).reshape(x.shape)
