"""NYUv2 depth metrics (wl-zhao/VPD depth/utils_depth/metrics.py, mmsegmentation
mmseg/evaluation/metrics/depth_metric.py), computed per image in numpy and averaged over images.

Must stay numerically compatible with the official VPD ``utils_depth/metrics.py`` (``cropping_img`` +
``eval_depth``) and mmseg's ``DepthMetric``: same mask, same formulas, per-image values averaged over images
(not pooled over pixels). The datasets' evaluation constants live in ``vpd_jax.protocols``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

# The datasets' evaluation constants live in vpd_jax.protocols (the data loaders need them too).
from vpd_jax.protocols import (  # noqa: E402,F401
    EIGEN_CROP,
    MAX_DEPTH_EVAL,
    MIN_DEPTH_EVAL,
    NYU_HEIGHT,
    NYU_IMAGE_SHAPE,
    NYU_WIDTH,
)

METRIC_NAMES = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")
# Metrics where larger is better; the rest are errors. Used for "best checkpoint" logic and tables.
HIGHER_IS_BETTER = frozenset({"d1", "d2", "d3"})


def eval_mask(
    gt: np.ndarray,
    *,
    min_depth: float = MIN_DEPTH_EVAL,
    max_depth: float = MAX_DEPTH_EVAL,
    crop: tuple[int, int, int, int] | None = EIGEN_CROP,
) -> np.ndarray:
    """Boolean mask of the pixels that count: ``min_depth < gt < max_depth`` inside ``crop``."""
    gt = np.asarray(gt)
    # NaN compares False, so NaN ground truth is excluded like in both references.
    mask = (gt > min_depth) & (gt < max_depth)
    if crop is not None:
        top, bottom, left, right = crop
        if bottom > gt.shape[-2] or right > gt.shape[-1]:
            raise ValueError(f"crop {crop} does not fit a depth map of shape {gt.shape}")
        window = np.zeros(gt.shape[-2:], dtype=bool)
        window[top:bottom, left:right] = True
        mask &= window
    return mask


def depth_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    clamp_pred: bool = False,
    min_depth: float = MIN_DEPTH_EVAL,
    max_depth: float = MAX_DEPTH_EVAL,
    crop: tuple[int, int, int, int] | None = EIGEN_CROP,
) -> dict[str, float]:
    """The nine metrics of wl-zhao/VPD depth/utils_depth/metrics.py for one image.

    Args:
      pred: predicted depth in metres, shape (H, W) (480x640 for NYU).
      gt: ground-truth depth in metres, same shape.
      clamp_pred: official VPD's ``cropping_img``: ``inf -> max_depth`` and ``nan -> min_depth`` in the
        prediction before masking. mmseg does not do this; off by default so a broken model shows NaN.
      min_depth, max_depth, crop: the evaluation mask; defaults are the NYU constants above.

    Returns:
      ``{name: float}`` for the names in ``METRIC_NAMES``; NaN everywhere if no pixel is valid.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must be equal (H, W) arrays")
    if clamp_pred:
        # In the prediction's own dtype, as the official code does on its float32 tensor.
        pred = np.where(np.isinf(pred), max_depth, pred)
        pred = np.where(np.isnan(pred), min_depth, pred)
    # The mask is taken in the ground truth's own dtype: float32 1 mm equals float32(1e-3) and is excluded
    # by the references, but would pass the bound after a cast to float64.
    mask = eval_mask(gt, min_depth=min_depth, max_depth=max_depth, crop=crop)
    # The statistics themselves in float64 (the references use float32; differences are ~1e-7 relative).
    pred = pred.astype(np.float64)
    gt = gt.astype(np.float64)
    p = pred[mask]
    g = gt[mask]
    if p.size == 0:
        return {name: math.nan for name in METRIC_NAMES}

    # Errors are local here (a negative prediction gives NaN logs), as in the references.
    with np.errstate(divide="ignore", invalid="ignore"):
        thresh = np.maximum(g / p, p / g)
        diff = p - g
        diff_log = np.log(p) - np.log(g)
        out = {
            "d1": np.mean(thresh < 1.25),
            "d2": np.mean(thresh < 1.25**2),
            "d3": np.mean(thresh < 1.25**3),
            "abs_rel": np.mean(np.abs(diff) / g),
            "sq_rel": np.mean(diff**2 / g),
            "rmse": np.sqrt(np.mean(diff**2)),
            "rmse_log": np.sqrt(np.mean(diff_log**2)),
            "log10": np.mean(np.abs(np.log10(p) - np.log10(g))),
            "silog": np.sqrt(np.mean(diff_log**2) - 0.5 * np.mean(diff_log) ** 2),
        }
    return {k: float(v) for k, v in out.items()}


class MetricAccumulator:
    """Averages per-image metric dicts over images (the references' reported number)."""

    def __init__(self, names: tuple[str, ...] = METRIC_NAMES):
        self.names = tuple(names)
        self._sums = dict.fromkeys(self.names, 0.0)
        self.count = 0

    def add(self, metrics: Mapping[str, float]) -> None:
        for name in self.names:
            self._sums[name] += float(metrics[name])
        self.count += 1

    def update(self, pred: np.ndarray, gt: np.ndarray, **kwargs) -> dict[str, float]:
        """Adds one image (or a batch: leading axis) and returns the last image's metrics."""
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.ndim == 2:
            pred, gt = pred[None], gt[None]
        last = {}
        for p, g in zip(pred, gt, strict=True):
            last = depth_metrics(p, g, **kwargs)
            self.add(last)
        return last

    def merge(self, other: MetricAccumulator) -> None:
        """Folds in another accumulator (e.g. one per host) so the mean stays over all images."""
        for name in self.names:
            self._sums[name] += other._sums[name]
        self.count += other.count

    def result(self) -> dict[str, float]:
        if self.count == 0:
            return {name: math.nan for name in self.names}
        return {name: self._sums[name] / self.count for name in self.names}
