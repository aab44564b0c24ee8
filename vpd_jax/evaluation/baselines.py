"""Reference predictors a trained model must beat, as ``predict(images, class_ids) -> depth`` functions that the
``Evaluator`` runs through the same pipeline as a model.

* ``constant_depth``: one depth for every pixel of every image: the mean of the training split's valid depths
  (the best constant for RMSE).
* ``LuminanceFit``: depth from brightness alone. log depth = a + b * log luminance of 8x8 blocks, fitted by least
  squares on the training split, applied per block and upsampled bilinearly. In the synthetic rooms (lit by a
  flash on the camera, irradiance ~ 1/d^2) this is the strongest cue that survives an 8x downsampling; on real
  photos it is weak.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np

BLOCK = 8


def mean_depth(samples: Iterable[dict]) -> float:
    """The mean of every valid (> 0) depth pixel of ``samples`` (dicts with a ``depth`` map in metres)."""
    total, count = 0.0, 0
    for s in samples:
        d = np.asarray(s["depth"], np.float64)
        total, count = total + float(d[d > 0].sum()), count + int((d > 0).sum())
    if count == 0:
        raise ValueError("no valid depth pixel in the samples")
    return total / count


def constant_depth(value: float) -> Callable:
    """``predict`` giving ``value`` metres everywhere."""

    def predict(images, class_ids):
        del class_ids
        return np.full(np.shape(images)[:3], value, np.float32)

    return predict


def _block_luminance(image: np.ndarray) -> np.ndarray:
    """Mean luminance (0-1) of each whole 8x8 block of an (H, W, 3) uint8 image: (H // 8, W // 8)."""
    h, w = image.shape[0] // BLOCK * BLOCK, image.shape[1] // BLOCK * BLOCK
    g = np.asarray(image[:h, :w], np.float64).mean(-1) / 255.0
    return g.reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK).mean((1, 3))


@dataclasses.dataclass(frozen=True)
class LuminanceFit:
    """log depth = ``intercept`` + ``slope`` * log(block luminance + 1e-3)."""

    slope: float
    intercept: float

    @classmethod
    def fit(cls, samples: Iterable[dict]) -> LuminanceFit:
        """Least squares over the blocks of ``samples`` (dicts with ``image`` and ``depth``) whose 64 depth pixels
        are all valid."""
        xs, ys = [], []
        for s in samples:
            lum = _block_luminance(np.asarray(s["image"]))
            d = np.asarray(s["depth"], np.float64)
            hb, wb = lum.shape
            d = d[: hb * BLOCK, : wb * BLOCK].reshape(hb, BLOCK, wb, BLOCK)
            valid = (d > 0).all((1, 3))
            xs.append(np.log(lum[valid] + 1e-3))
            ys.append(np.log(d.mean((1, 3))[valid]))
        x, y = np.concatenate(xs), np.concatenate(ys)
        if x.size < 2:
            raise ValueError("too few valid blocks to fit")
        slope, intercept = np.polyfit(x, y, 1)
        return cls(float(slope), float(intercept))

    def predict(self, images, class_ids=None) -> np.ndarray:
        """(B, H, W, 3) images -> (B, H, W) metres."""
        import cv2

        del class_ids
        out = []
        for image in np.asarray(images):
            h, w = image.shape[:2]
            depth = np.exp(self.intercept + self.slope * np.log(_block_luminance(image) + 1e-3)).astype(np.float32)
            out.append(cv2.resize(depth, (w, h), interpolation=cv2.INTER_LINEAR))
        return np.stack(out)
