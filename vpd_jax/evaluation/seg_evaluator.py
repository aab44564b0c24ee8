"""Segmentation evaluation: mmseg's sliding-window inference (and the multi-scale + flip test) over a
``forward(windows) -> logits`` function, and mIoU over a whole split (wl-zhao/VPD
``segmentation/configs/fpn_vpd_sd1-5_512x512_gpu8x2.py`` ``test_cfg=dict(mode='slide', crop_size=(512, 512),
stride=(341, 341))``; mmsegmentation 0.x ``EncoderDecoder.slide_inference``, ``inference``, ``aug_test``).

* Slide: windows of ``crop`` at mmseg's starts (``tta.mmseg_window_starts``: the last window pulled back to the
  border; an image smaller than the crop is one window of its own size), each window's **logits** summed into a
  canvas and divided by the overlap count; then resized bilinearly to the label's size.
* Single scale (the 53.7 mIoU figure): the label is the argmax of those logits.
* Multi-scale + flip (the 54.6 figure): for each scale ratio (mmseg's 0.5..1.75 of the test resize) and each of
  (plain, flipped), the slide logits of the rescaled image, flipped back, resized to the label's size, softmaxed;
  the probabilities are averaged and the argmax taken. The rescale is applied to the already test-resized image
  (``int(size * ratio + 0.5)``), where mmseg rescales the original to ``ratio x (2048, 512)``: the same size up to
  a pixel of rounding.

Metrics: ``vpd_jax.evaluation.segmentation`` (per-class areas summed over the split: aAcc, mIoU, mAcc, IoU).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np

from vpd_jax import visualize
from vpd_jax.evaluation.segmentation import SegmentationAccumulator
from vpd_jax.evaluation.tta import mmseg_window_starts, resize_bilinear, run_in_chunks, slide_flip_predict

MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmseg's ADE20K aug test img_ratios


@dataclasses.dataclass(frozen=True)
class SegEvalSettings:
    crop: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    scales: tuple[float, ...] = (1.0,)  # MULTI_SCALES (with flip=True) for the multi-scale test
    flip: bool = False
    windows_per_call: int = 4  # windows per forward call (the last call padded: one compiled shape)
    max_images: int = 0  # 0 = all
    num_pictures: int = 3

    def __post_init__(self):
        object.__setattr__(self, "crop", (int(self.crop[0]), int(self.crop[1])))
        object.__setattr__(self, "stride", (int(self.stride[0]), int(self.stride[1])))
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if min(self.crop) < 1 or min(self.stride) < 1 or self.windows_per_call < 1:
            raise ValueError(f"eval: crop {self.crop}, stride {self.stride} and windows_per_call "
                             f"{self.windows_per_call} must be positive")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"eval.seg_scales {self.scales}: expected positive ratios")

    @classmethod
    def from_config(cls, e) -> SegEvalSettings:
        return cls(crop=tuple(e.seg_crop), stride=tuple(e.seg_stride), scales=tuple(e.seg_scales),
                   flip=bool(e.seg_flip), windows_per_call=int(e.batch_size), max_images=int(e.max_images),
                   num_pictures=int(e.num_pictures))


def _resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, C) float -> (H, W, C), torch's bilinear (align_corners=False)."""
    if x.shape[:2] == tuple(size):
        return x
    return np.asarray(resize_bilinear(x[None].astype(np.float32), tuple(size)))[0]


def slide_logits(forward: Callable[[np.ndarray], np.ndarray], image: np.ndarray, crop: tuple[int, int],
                 stride: tuple[int, int], windows_per_call: int = 4) -> np.ndarray:
    """mmseg ``slide_inference`` over one (h, w, 3) image: (h, w, C) float32 logits averaged over the windows
    (``tta.slide_flip_predict`` without flips; the windows through ``forward`` in chunks)."""
    h, w = image.shape[:2]
    ch, cw = min(crop[0], h), min(crop[1], w)
    logits = slide_flip_predict(lambda rows, _: run_in_chunks(forward, np.asarray(rows), windows_per_call),
                                image[None], np.zeros((1,), np.int32), crop=(ch, cw),
                                y_starts=mmseg_window_starts(h, ch, stride[0]),
                                x_starts=mmseg_window_starts(w, cw, stride[1]), flip=False, one_call=True)
    return np.asarray(logits, np.float32)[0]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def predict_labels(forward: Callable[[np.ndarray], np.ndarray], image: np.ndarray, out_hw: tuple[int, int],
                   settings: SegEvalSettings = SegEvalSettings()) -> np.ndarray:
    """(H, W) int32 class map of one test-resized image, at the label's size ``out_hw``."""
    s = settings
    if s.scales == (1.0,) and not s.flip:
        return _resize(slide_logits(forward, image, s.crop, s.stride, s.windows_per_call), out_hw).argmax(-1).astype(
            np.int32)
    h, w = image.shape[:2]
    probs = None
    for ratio in s.scales:
        size = (max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5)))
        scaled = image if size == (h, w) else np.asarray(
            resize_bilinear(image[None].astype(np.float32), size))[0]
        for flip in ((False, True) if s.flip else (False,)):
            x = scaled[:, ::-1] if flip else scaled
            lg = slide_logits(forward, np.ascontiguousarray(x), s.crop, s.stride, s.windows_per_call)
            lg = lg[:, ::-1] if flip else lg
            p = _softmax(_resize(lg, out_hw))
            probs = p if probs is None else probs + p
    return probs.argmax(-1).astype(np.int32)


class SegEvaluator:
    """``evaluate(variables, loader)``: the split's metrics with the model's forward jitted once per window
    shape. ``model=None`` evaluates ``predict=`` callables only (``(image, out_hw) -> labels``)."""

    def __init__(self, model, settings: SegEvalSettings = SegEvalSettings(), num_classes: int | None = None):
        self.model = model
        self.settings = settings
        self.num_classes = num_classes or (model.config.num_classes if model is not None else None)
        if model is not None:
            self._apply = jax.jit(lambda v, x: model.apply(v, x))

    def forward(self, variables) -> Callable[[np.ndarray], np.ndarray]:
        return lambda windows: self._apply(variables, windows)

    def evaluate(self, variables, loader: Iterable[dict], *, predict: Callable | None = None, progress: bool = True,
                 desc: str = "eval", save_predictions: str | None = None) -> dict:
        s = self.settings
        acc = SegmentationAccumulator(self.num_classes)
        pictures: list[dict] = []
        forward = self.forward(variables) if predict is None else None
        t0 = time.perf_counter()
        bar = None
        if progress and jax.process_index() == 0:
            from tqdm import tqdm

            bar = tqdm(total=len(loader) if hasattr(loader, "__len__") else None, desc=desc, unit="batch",
                       leave=False, dynamic_ncols=True)
        done = False
        for batch in loader:
            for i in np.flatnonzero(np.asarray(batch["valid"], bool)):
                ih, iw = (int(v) for v in batch["image_hw"][i])
                lh, lw = (int(v) for v in batch["label_hw"][i])
                image = np.asarray(batch["image"][i, :ih, :iw])
                label = np.asarray(batch["label"][i, :lh, :lw])
                pred = (predict(image, (lh, lw)) if predict is not None
                        else predict_labels(forward, image, (lh, lw), s))
                acc.update(pred, label)
                if save_predictions:
                    _save_label_png(save_predictions, str(batch["file_name"][i]), pred)
                if len(pictures) < s.num_pictures:
                    pictures.append({"image": image, "label": label, "pred": pred})
                if s.max_images and acc.count >= s.max_images:
                    done = True
                    break
            if bar is not None:
                bar.update(1)
            if done:
                break
        if bar is not None:
            bar.close()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            states = np.asarray(multihost_utils.process_allgather(acc.state()))
            counts = np.asarray(multihost_utils.process_allgather(np.asarray([acc.count], np.int64)))
            total = SegmentationAccumulator(self.num_classes)
            for st, c in zip(states.reshape(-1, *acc.state().shape), counts.reshape(-1), strict=True):
                total.add_state(st, int(c))
            acc = total
        res = acc.result()
        metrics = {k: res[k] for k in ("aAcc", "mIoU", "mAcc")}
        return {"metrics": metrics, "IoU": res["IoU"], "Acc": res["Acc"], "num_images": acc.count,
                "seconds": time.perf_counter() - t0, "pictures": pictures}


def _save_label_png(folder: str, file_name: str, pred: np.ndarray) -> None:
    base = os.path.splitext(file_name.strip("/").replace("/", "_") or "image")[0]
    visualize.save_label_png(os.path.join(folder, base + ".png"), pred)


def format_summary(metrics: dict, names: Sequence[str] = ("aAcc", "mIoU", "mAcc")) -> str:
    """One console line of the summary metrics in percent."""
    return "  ".join(f"{n} {100 * metrics[n]:.2f}" for n in names)


def picture_grid(pictures: list[dict], num_classes: int) -> np.ndarray:
    """Rows of image | ground truth | prediction (class colours; ignored pixels black), uint8 RGB, each row at its
    image's width (pictures padded to the widest)."""
    palette = visualize.class_palette(num_classes)
    rows = []
    for p in pictures:
        h, w = p["label"].shape
        image = np.asarray(resize_bilinear(p["image"][None].astype(np.float32), (h, w)))[0]
        rows.append(np.concatenate([np.clip(np.round(image), 0, 255).astype(np.uint8),
                                    visualize.colorize_labels(p["label"], palette),
                                    visualize.colorize_labels(p["pred"], palette)], axis=1))
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
