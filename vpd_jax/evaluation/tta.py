"""Test-time augmentation of the references (wl-zhao/VPD depth/test.py; mmsegmentation
mmseg/models/segmentors/depth_estimator.py, configs/vpd/vpd_sd_4xb8-25k_nyu-512x512.py), over any ``predict_fn``.

``predict_fn(images, class_ids) -> depth``: images (B, h, w, 3) NHWC, uint8 or float, exactly as the
caller's model wants them (this module never normalises); ``class_ids`` (B,); depth (B, h, w) in metres.
Every window is called at the same shape, so a jitted ``predict_fn`` compiles once. Everything here is
jnp with static loops, so the whole TTA can also be wrapped in ``jax.jit`` around a traceable predict_fn.

* Official VPD (``--shift_window_test --shift_size 2 --flip_test``): windows of the image height (480) at
  ``x = i * ((W - h) // (n - 1))``, i.e. 0 and 160 for 640 wide; each averaged with its flipped
  prediction (flipped back); summed into the canvas and divided by the overlap count.
* mmseg ``slide_flip`` (``DepthEstimator.slide_flip_inference``): the same with mmseg's window rule
  ``n = max(W - crop + stride - 1, 0) // stride + 1``, ``x2 = min(i * stride + crop, W)``,
  ``x1 = max(x2 - crop, 0)`` on both axes; for 480 crops at stride 160 on 480x640 it is the official one.
* mmseg 512 recipe: cv2-bilinear resize 480x640 -> 512x683 (mmcv ``rescale_size`` with scale (2048, 512)),
  slide_flip with 512 crops at stride 128 (x = 0, 128, 171), then bilinear back to 480x640.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from vpd_jax.models.layers import resize_bilinear  # defined with the model layers (the heads use it too)

PredictFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def official_window_starts(size: int, crop: int, shift_size: int = 2) -> list[int]:
    """Official ``shift_window_test`` offsets: ``i * ((size - crop) // (shift_size - 1))``."""
    if shift_size < 2:
        return [0]
    interval = (size - crop) // (shift_size - 1)
    return [i * interval for i in range(shift_size)]


def mmseg_window_starts(size: int, crop: int, stride: int) -> list[int]:
    """mmseg ``slide_flip_inference`` offsets; the last window is pulled back to end at the border."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    starts = []
    for i in range(n):
        end = min(i * stride + crop, size)
        starts.append(max(end - crop, 0))
    return starts


def mmcv_rescale_size(hw: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``rescale_size`` with keep_ratio: the (h, w) that fits long/short edges in ``scale``."""
    h, w = hw
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _flip_averaged(predict_fn: PredictFn, window, class_ids, flip: bool):
    if not flip:
        return predict_fn(window, class_ids)
    b = window.shape[0]
    both = predict_fn(jnp.concatenate([window, window[:, :, ::-1]], 0), jnp.concatenate([class_ids, class_ids], 0))
    return (both[:b] + both[b:, :, ::-1]) / 2.0


def slide_flip_predict(
    predict_fn: PredictFn,
    images,
    class_ids,
    *,
    crop: tuple[int, int],
    y_starts: Sequence[int],
    x_starts: Sequence[int],
    flip: bool = True,
    one_call: bool = False,
):
    """Windows at every (y, x) start, each flip-averaged, summed into a canvas and divided by overlap. Predictions
    are (B, h, w) depth or (B, h, w, C) logits.

    The one sliding-window implementation, for evaluation and for ``vpd_jax.inference.Predictor``. Per window,
    ``predict_fn`` sees the window and its mirror image as one batch (2B rows). ``one_call=True`` gives it every
    window at once instead (spot-major, then the mirrors: (2 x windows x B) rows), for a caller that batches
    and chunks on its own; the result is the same.
    """
    images = jnp.asarray(images)
    class_ids = jnp.asarray(class_ids)
    b, h, w = images.shape[:3]
    ch, cw = crop
    spots = [(y, x) for y in y_starts for x in x_starts]
    count = np.zeros((h, w), np.float32)
    for y, x in spots:
        count[y : y + ch, x : x + cw] += 1
    if (count == 0).any():
        raise ValueError("the windows do not cover the image")
    if one_call:
        rows = [images[:, y : y + ch, x : x + cw] for y, x in spots]
        rows += [r[:, :, ::-1] for r in rows] if flip else []
        n = len(spots)
        ids = jnp.concatenate([class_ids] * len(rows), 0)
        flat = jnp.asarray(predict_fn(jnp.concatenate(rows, 0), ids))
        per = flat.reshape(len(rows), b, ch, cw, *flat.shape[3:])
        preds = [(per[i] + per[n + i, :, :, ::-1]) / 2.0 if flip else per[i] for i in range(n)]
    else:
        preds = [_flip_averaged(predict_fn, images[:, y : y + ch, x : x + cw], class_ids, flip) for y, x in spots]
    trailing = tuple(preds[0].shape[3:])  # () for depth, (classes,) for logits
    canvas = jnp.zeros((b, h, w, *trailing), jnp.float32)
    for (y, x), pred in zip(spots, preds, strict=True):
        canvas = canvas.at[:, y : y + ch, x : x + cw].add(pred.astype(jnp.float32))
    return canvas / jnp.asarray(count).reshape(h, w, *(1,) * len(trailing))


def run_in_chunks(fn: Callable[[np.ndarray], Any], rows: np.ndarray, k: int) -> np.ndarray:
    """``fn`` over ``rows`` in chunks of ``k`` (the last chunk padded with copies of its last row, so a jitted
    ``fn`` sees one shape and compiles once), as one float32 array."""
    out = []
    for i in range(0, len(rows), k):
        chunk = rows[i : i + k]
        m = len(chunk)
        if m < k:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], k - m, 0)], 0)
        out.append(np.asarray(fn(chunk), np.float32)[:m])
    return np.concatenate(out, 0)


def official_tta(
    predict_fn: PredictFn,
    images,
    class_ids,
    *,
    shift_window: bool = True,
    shift_size: int = 2,
    flip: bool = True,
):
    """Official VPD test: windows as wide as the image is high (480) at the shift offsets, flip-averaged.

    With ``shift_window=False`` the whole image is predicted at once (optionally flip-averaged).
    """
    h, w = jnp.shape(images)[1:3]
    if not shift_window:
        return slide_flip_predict(predict_fn, images, class_ids, crop=(h, w), y_starts=[0], x_starts=[0], flip=flip)
    if w < h:
        raise ValueError(f"shift-window test expects a landscape image, got {h}x{w}")
    xs = official_window_starts(w, h, shift_size)
    return slide_flip_predict(predict_fn, images, class_ids, crop=(h, h), y_starts=[0], x_starts=xs, flip=flip)


def mmseg_slide_flip(
    predict_fn: PredictFn,
    images,
    class_ids,
    *,
    crop: tuple[int, int] = (480, 480),
    stride: tuple[int, int] = (160, 160),
    flip: bool = True,
):
    """mmseg ``test_cfg=dict(mode='slide_flip', crop_size=crop, stride=stride)`` on the given images."""
    h, w = jnp.shape(images)[1:3]
    ys = mmseg_window_starts(h, crop[0], stride[0])
    xs = mmseg_window_starts(w, crop[1], stride[1])
    crop = (min(crop[0], h), min(crop[1], w))  # mmseg runs smaller images as one undersized window
    return slide_flip_predict(predict_fn, images, class_ids, crop=crop, y_starts=ys, x_starts=xs, flip=flip)


def mmseg_512_tta(
    predict_fn: PredictFn,
    images,
    class_ids,
    *,
    scale: tuple[int, int] = (2048, 512),
    crop: int = 512,
    stride: int = 128,
    flip: bool = True,
):
    """mmseg 512 recipe: resize (keep ratio) -> slide_flip 512/128 -> bilinear back to the input size."""
    h, w = jnp.shape(images)[1:3]
    resized = resize_bilinear(images, mmcv_rescale_size((h, w), scale))
    pred = mmseg_slide_flip(predict_fn, resized, class_ids, crop=(crop, crop), stride=(stride, stride), flip=flip)
    return resize_bilinear(pred, (h, w))
