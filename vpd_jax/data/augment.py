"""VPD's training augmentations (wl-zhao/VPD depth/dataset/base_dataset.py, depth/dataset/nyudepthv2.py;
mmsegmentation mmseg/datasets/transforms/transforms.py, configs/_base_/datasets/nyu.py and nyu_512x512.py) in
numpy/OpenCV, deterministic given a numpy Generator.

Order, as in both references: CutDepth on the full image -> horizontal flip -> (512 recipe only) random
resize -> random crop -> brightness/contrast -> gamma -> hue/saturation/value. The photometric ops reproduce
albumentations 2.0.8 (the version the tests compare against) pixel for pixel for the same parameters, with its
default ranges, each applied with p=0.5. Parameters are sampled separately from their application so that a
test can feed the very same values to albumentations.

Inputs: ``image`` uint8 (H,W,3) RGB and ``depth`` float32 (H,W) in metres, 0 = invalid.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

CUTDEPTH_MODES = ("official", "mmseg", "none")

# albumentations 2.0.8 defaults (RandomBrightnessContrast, RandomGamma, HueSaturationValue); the tests assert
# these against the installed library, so a version bump that changes them fails loudly.
BRIGHTNESS_LIMIT = (-0.2, 0.2)
CONTRAST_LIMIT = (-0.2, 0.2)
GAMMA_LIMIT = (80.0, 120.0)
HUE_SHIFT_LIMIT = (-20.0, 20.0)
SAT_SHIFT_LIMIT = (-30.0, 30.0)
VAL_SHIFT_LIMIT = (-20.0, 20.0)
PHOTOMETRIC_P = 0.5


@dataclasses.dataclass
class AugmentConfig:
    """Training augmentation settings; the defaults are the official 480x480 recipe."""

    crop_size: tuple[int, int] | None = (480, 480)  # (h, w) of the random crop; None keeps the full image
    cutdepth: str = "official"  # "official" (every 4th sample), "mmseg" (Bernoulli 0.25) or "none"
    cutdepth_uint8_wrap: bool = True  # paste the stored depth units mod 256, as the references do by accident
    cutdepth_units: float = 1000.0  # stored depth units per metre at the paste: NYU mm (1000), KITTI 1/256 m (256)
    cutdepth_every: int = 4  # official: samples whose position in the epoch is a multiple of this
    cutdepth_prob: float = 0.25  # mmseg RandomDepthMix prob
    cutdepth_scale_ratio: float = 0.75  # strip width factor (official 0.75; mmseg mix_scale_ratio 0.75)
    flip: bool = True  # horizontal flip with p=0.5
    photometric: bool = True  # brightness/contrast, gamma, HSV with albumentations defaults, each p=0.5
    random_resize: bool = False  # mmseg 512 recipe: RandomResize(scale, ratio_range, keep_ratio) before the crop
    resize_scale: tuple[int, int] = (768, 512)  # mmcv scale (long edge, short edge) at ratio 1
    resize_ratio_range: tuple[float, float] = (0.8, 1.5)
    max_depth: float = 10.0  # only for the non-wrapping CutDepth, which maps [0, max_depth] m to [0, 255]

    def __post_init__(self):
        if self.cutdepth not in CUTDEPTH_MODES:
            raise ValueError(f"AugmentConfig.cutdepth={self.cutdepth!r}; expected one of {CUTDEPTH_MODES}")
        if self.crop_size is not None:
            self.crop_size = (int(self.crop_size[0]), int(self.crop_size[1]))

    @classmethod
    def official_480(cls) -> "AugmentConfig":
        return cls()

    @classmethod
    def mmseg_480(cls) -> "AugmentConfig":
        return cls(cutdepth="mmseg")

    @classmethod
    def mmseg_512(cls) -> "AugmentConfig":
        return cls(crop_size=(512, 512), cutdepth="mmseg", random_resize=True)

    @classmethod
    def none(cls, crop_size: tuple[int, int] | None = None) -> "AugmentConfig":
        return cls(crop_size=crop_size, cutdepth="none", flip=False, photometric=False)


# --- CutDepth -----------------------------------------------------------------------------------------------

def cutdepth_strip_official(width: int, alpha: float, beta: float, ratio: float = 0.75) -> tuple[int, int]:
    """Official ``base_dataset.py``: l = int(alpha W), w = int(max((W - alpha W) beta ratio, 1))."""
    left = int(alpha * width)
    return left, int(max((width - alpha * width) * beta * ratio, 1))


def cutdepth_strip_mmseg(width: int, u1: float, u2: float, ratio: float = 0.75) -> tuple[int, int]:
    """mmseg ``RandomDepthMix``: left = int(W u1), width = int(max(1, (W - left) ratio u2))."""
    left = int(width * u1)
    return left, int(max(1, (width - left) * ratio * u2))


def depth_to_strip(depth: np.ndarray, uint8_wrap: bool, max_depth: float, units: float = 1000.0) -> np.ndarray:
    """The uint8 values CutDepth pastes for ``depth`` (metres); ``units`` per metre as the reference stores them
    when it pastes (NYU: mm; KITTI: the PNG's 1/256 m, since GLPDepth/EVP divide by 256 after augmenting)."""
    if uint8_wrap:
        # The references write float stored units into a uint8 array; on x86 numpy that truncates to an integer
        # and keeps the low byte. The small epsilon turns 1.234 m stored as float32 back into 1234 mm exactly.
        mm = np.floor(depth.astype(np.float64) * units + 1e-3).astype(np.int64)
        return (mm % 256).astype(np.uint8)
    return np.clip(depth / max_depth * 255.0 + 0.5, 0, 255).astype(np.uint8)


def apply_cutdepth(image: np.ndarray, depth: np.ndarray, left: int, width: int, uint8_wrap: bool = True,
                   max_depth: float = 10.0, units: float = 1000.0) -> np.ndarray:
    """Image with columns [left, left+width) of every channel replaced by the depth strip."""
    out = image.copy()
    strip = depth_to_strip(depth[:, left:left + width], uint8_wrap, max_depth, units)
    out[:, left:left + width, :] = strip[..., None]
    return out


# --- geometry -----------------------------------------------------------------------------------------------

def random_resize_shape(height: int, width: int, ratio: float, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``RandomResize(keep_ratio=True)`` output (h, w): fit inside scale*ratio, rounding half up."""
    long_edge, short_edge = int(scale[0] * ratio), int(scale[1] * ratio)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize(image: np.ndarray, depth: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear for the image, nearest for depth (mmseg ``Resize`` on img and seg_fields)."""
    import cv2

    h, w = shape
    return (cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR),
            cv2.resize(depth, (w, h), interpolation=cv2.INTER_NEAREST))


def crop(image: np.ndarray, depth: np.ndarray, top: int, left: int, size: tuple[int, int]):
    """Crop ``size`` at (top, left); a smaller image (512 recipe, ratio < 1) gives a smaller crop, as mmseg's
    ``RandomCrop`` does. :func:`pad_to` then brings it to ``size``."""
    ch, cw = size
    return image[top:top + ch, left:left + cw], depth[top:top + ch, left:left + cw]


def pad_to(image: np.ndarray, depth: np.ndarray, size: tuple[int, int]):
    """Zero-pads at the bottom/right to ``size`` (depth 0 = invalid), so that batches keep one shape. Done
    after the photometric ops so that the padding stays exactly black."""
    ch, cw = size
    if image.shape[:2] == (ch, cw):
        return image, depth
    pad_img = np.zeros((ch, cw, image.shape[2]), image.dtype)
    pad_dep = np.zeros((ch, cw), depth.dtype)
    pad_img[:image.shape[0], :image.shape[1]] = image
    pad_dep[:depth.shape[0], :depth.shape[1]] = depth
    return pad_img, pad_dep


# --- photometric (albumentations 2.0.8 semantics for uint8) --------------------------------------------------

def _lut(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.LUT(image, table)


def brightness_contrast_table(alpha: float, beta: float) -> np.ndarray:
    """``RandomBrightnessContrast.apply``'s uint8 table: clip(i * alpha + beta) in float32, truncated.

    ``alpha`` = 1 + contrast draw; ``beta`` = brightness draw * 255 (brightness_by_max=True)."""
    table = np.arange(256, dtype=np.float32) * alpha + beta
    return np.clip(table, 0, 255).astype(np.uint8)


def gamma_table(gamma_value: float) -> np.ndarray:
    """``RandomGamma.apply``'s uint8 table (``gamma`` = draw / 100): (i/255)^gamma * 255, truncated."""
    # Built from an arange with step 1/255 (not i/255) because that is the bit pattern albumentations
    # truncates; the two differ in the last ulp, which flips a few entries by one.
    table = (np.arange(0, 256.0 / 255, 1.0 / 255) ** gamma_value) * 255
    return table[:256].astype(np.uint8)


def brightness_contrast(image: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    return _lut(image, brightness_contrast_table(alpha, beta))


def gamma(image: np.ndarray, gamma_value: float) -> np.ndarray:
    return _lut(image, gamma_table(gamma_value))


def hue_saturation_value(image: np.ndarray, hue_shift: float, sat_shift: float, val_shift: float) -> np.ndarray:
    """``HueSaturationValue.apply`` on RGB uint8: OpenCV HSV (H in [0,180)); hue shifted mod 180, saturation
    and value shifted by int(shift) with saturation at 0/255, and S=0 (grey) pixels kept grey. Each channel
    change is a 256-entry table, which is exactly the per-pixel arithmetic albumentations does."""
    import cv2

    if hue_shift == 0 and sat_shift == 0 and val_shift == 0:
        return image
    hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_RGB2HSV))
    i = np.arange(256, dtype=np.int16)
    if hue_shift != 0:
        hue = _lut(hue, np.mod(i + hue_shift, 180).astype(np.uint8))
    if sat_shift != 0:
        table = np.clip(i + int(sat_shift), 0, 255).astype(np.uint8)
        table[0] = 0  # grey pixels stay grey
        sat = _lut(sat, table)
    if val_shift != 0:
        val = _lut(val, np.clip(i + int(val_shift), 0, 255).astype(np.uint8))
    return cv2.cvtColor(cv2.merge([hue, sat, val]), cv2.COLOR_HSV2RGB)


@dataclasses.dataclass(frozen=True)
class PhotometricParams:
    """Sampled parameters; ``None`` means that op is skipped (its p=0.5 coin came up tails)."""

    alpha_beta: tuple[float, float] | None
    gamma: float | None
    hsv: tuple[float, float, float] | None


def sample_photometric(rng: np.random.Generator) -> PhotometricParams:
    def coin():
        return rng.random() < PHOTOMETRIC_P

    ab = gm = hsv = None
    if coin():
        ab = (1.0 + rng.uniform(*CONTRAST_LIMIT), rng.uniform(*BRIGHTNESS_LIMIT) * 255.0)
    if coin():
        gm = rng.uniform(*GAMMA_LIMIT) / 100.0
    if coin():
        hsv = (rng.uniform(*HUE_SHIFT_LIMIT), rng.uniform(*SAT_SHIFT_LIMIT), rng.uniform(*VAL_SHIFT_LIMIT))
    return PhotometricParams(ab, gm, hsv)


def apply_photometric(image: np.ndarray, p: PhotometricParams) -> np.ndarray:
    # Brightness/contrast and gamma are both per-value tables: composing them first makes one pass, with
    # results identical to applying them one after the other.
    table = None
    if p.alpha_beta is not None:
        table = brightness_contrast_table(*p.alpha_beta)
    if p.gamma is not None:
        g = gamma_table(p.gamma)
        table = g if table is None else g[table]
    if table is not None:
        image = _lut(image, table)
    if p.hsv is not None:
        image = hue_saturation_value(image, *p.hsv)
    return image


# --- the whole recipe ---------------------------------------------------------------------------------------

def augment(image: np.ndarray, depth: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator,
            position: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Applies ``cfg`` to one example. ``position`` is the sample's index within its epoch of the global
    stream (the same whatever the host count): the official CutDepth fires on every ``cutdepth_every``-th one
    (the reference's per-worker counter, made independent of worker and host counts so that results do not
    depend on them). Returns (image, depth, params)."""
    params: dict[str, Any] = {}
    h, w = depth.shape
    strip = None
    # Draws are made in a fixed order whether or not an op fires, so one switch does not shift the others.
    u1, u2 = rng.random(), rng.random()
    if cfg.cutdepth == "official" and position % cfg.cutdepth_every == 0:
        strip = cutdepth_strip_official(w, u1, u2, cfg.cutdepth_scale_ratio)
    elif cfg.cutdepth == "mmseg" and rng.random() <= cfg.cutdepth_prob:
        strip = cutdepth_strip_mmseg(w, u1, u2, cfg.cutdepth_scale_ratio)
    # Without a resize the strip can be pasted after flip and crop, on the copy the crop makes anyway, instead
    # of copying the full image first; the pixels are the same because the strip takes each column's own depth.
    early = strip is not None and cfg.random_resize
    if early:
        image = apply_cutdepth(image, depth, *strip, uint8_wrap=cfg.cutdepth_uint8_wrap, max_depth=cfg.max_depth,
                               units=cfg.cutdepth_units)
    params["cutdepth"] = strip

    flip = bool(cfg.flip and rng.random() < 0.5)
    if flip:
        image, depth = image[:, ::-1], depth[:, ::-1]
    params["flip"] = flip

    if cfg.random_resize:
        ratio = rng.uniform(*cfg.resize_ratio_range)
        shape = random_resize_shape(h, w, ratio, cfg.resize_scale)
        image, depth = resize(np.ascontiguousarray(image), np.ascontiguousarray(depth), shape)
        params["resize"] = shape
        h, w = shape

    left = 0
    if cfg.crop_size is not None:
        ch, cw = cfg.crop_size
        top = int(rng.integers(0, max(h - ch, 0) + 1))
        left = int(rng.integers(0, max(w - cw, 0) + 1))
        image, depth = crop(image, depth, top, left, cfg.crop_size)
        params["crop"] = (top, left)

    if strip is not None and not early:
        image = np.array(image)  # the crop's own copy
        lo, width = strip
        hi = lo + width
        if flip:  # original column c sits at flipped column w-1-c
            lo, hi = w - hi, w - lo
        j0, j1 = max(lo - left, 0), min(hi - left, image.shape[1])
        if j1 > j0:
            image[:, j0:j1] = depth_to_strip(depth[:, j0:j1], cfg.cutdepth_uint8_wrap, cfg.max_depth,
                                             cfg.cutdepth_units)[..., None]
    image = np.ascontiguousarray(image)
    depth = np.ascontiguousarray(depth)
    if cfg.photometric:
        pp = sample_photometric(rng)
        image = apply_photometric(image, pp)
        params["photometric"] = pp
    if cfg.crop_size is not None:
        image, depth = pad_to(image, depth, cfg.crop_size)
    return image, depth, params
