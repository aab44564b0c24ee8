"""Semantic segmentation metrics as mmsegmentation computes them (mmseg/evaluation/metrics/iou_metric.py
``IoUMetric``: ``intersect_and_union`` per image, ``total_area_to_metrics`` over the dataset).

Per image, pixels whose label is ``ignore_index`` are dropped; over the rest, per class c: intersection = pixels
predicted c and labelled c, prediction area = pixels predicted c, label area = pixels labelled c, union =
prediction area + label area - intersection (values outside [0, num_classes) are counted in no class). These
are summed over the whole dataset, then

* ``aAcc`` = sum(intersection) / sum(label area): the pixel accuracy;
* ``IoU[c]`` = intersection / union (NaN for a class in neither prediction nor label), ``mIoU`` = nanmean(IoU);
* ``Acc[c]`` = intersection / label area (NaN for a class absent from the labels), ``mAcc`` = nanmean(Acc).

Values are fractions in [0, 1] (mmseg reports percentages rounded to 2 decimals). Areas are counted exactly in
int64; mmseg sums float32 histograms, exact only up to 2**24 pixels per class (a relative difference around
1e-7 on the full ADE20K validation set).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

IGNORE_INDEX = 255


def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(intersection, union, prediction area, label area)`` per class, int64 (num_classes,), for one image."""
    pred = np.asarray(pred)
    label = np.asarray(label)
    if pred.shape != label.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and label {label.shape} must be equal (H, W) arrays")
    mask = label != ignore_index
    p = pred[mask].astype(np.int64)
    g = label[mask].astype(np.int64)

    def hist(v):
        v = v[(v >= 0) & (v < num_classes)]
        return np.bincount(v, minlength=num_classes).astype(np.int64)

    inter = hist(p[p == g])
    area_pred = hist(p)
    area_label = hist(g)
    return inter, area_pred + area_label - inter, area_pred, area_label


def areas_to_metrics(intersect: np.ndarray, union: np.ndarray, area_label: np.ndarray) -> dict:
    """mmseg ``total_area_to_metrics`` (mIoU) on summed areas, as fractions."""
    intersect = np.asarray(intersect, np.float64)
    union = np.asarray(union, np.float64)
    area_label = np.asarray(area_label, np.float64)
    total = area_label.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union
        acc = intersect / area_label
        a_acc = intersect.sum() / total if total > 0 else math.nan
    with warnings.catch_warnings():  # nanmean of all-NaN: NaN, without the warning
        warnings.simplefilter("ignore", RuntimeWarning)
        m_iou = float(np.nanmean(iou)) if iou.size else math.nan
        m_acc = float(np.nanmean(acc)) if acc.size else math.nan
    return {"aAcc": float(a_acc), "mIoU": m_iou, "mAcc": m_acc, "IoU": iou, "Acc": acc}


class SegmentationAccumulator:
    """Streaming evaluation: :meth:`update` per image (or batch), :meth:`merge` across hosts, :meth:`result`."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.intersect = np.zeros(self.num_classes, np.int64)
        self.union = np.zeros(self.num_classes, np.int64)
        self.area_pred = np.zeros(self.num_classes, np.int64)
        self.area_label = np.zeros(self.num_classes, np.int64)
        self.count = 0

    def update(self, pred: np.ndarray, label: np.ndarray) -> None:
        """Adds one image (H, W), or a batch (B, H, W) of equal-sized ones."""
        pred = np.asarray(pred)
        label = np.asarray(label)
        if pred.ndim == 2:
            pred, label = pred[None], label[None]
        for p, g in zip(pred, label, strict=True):
            i, u, ap, al = intersect_and_union(p, g, self.num_classes, self.ignore_index)
            self.intersect += i
            self.union += u
            self.area_pred += ap
            self.area_label += al
            self.count += 1

    def merge(self, other: SegmentationAccumulator) -> None:
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError("cannot merge accumulators with different num_classes / ignore_index")
        self.intersect += other.intersect
        self.union += other.union
        self.area_pred += other.area_pred
        self.area_label += other.area_label
        self.count += other.count

    def state(self) -> np.ndarray:
        """(4, num_classes) int64: intersection, union, prediction and label areas (to all-reduce across hosts)."""
        return np.stack([self.intersect, self.union, self.area_pred, self.area_label])

    def add_state(self, state: np.ndarray, count: int = 0) -> None:
        state = np.asarray(state, np.int64)
        self.intersect += state[0]
        self.union += state[1]
        self.area_pred += state[2]
        self.area_label += state[3]
        self.count += int(count)

    def result(self) -> dict:
        """``aAcc``, ``mIoU``, ``mAcc`` (floats) and per-class ``IoU``, ``Acc`` (float64 arrays, NaN where
        undefined)."""
        return areas_to_metrics(self.intersect, self.union, self.area_label)


def segmentation_metrics(preds: Iterable[np.ndarray], labels: Iterable[np.ndarray], num_classes: int,
                         ignore_index: int = IGNORE_INDEX) -> dict:
    """mmseg's ``aAcc``, ``mIoU``, ``mAcc`` (fractions) and per-class ``IoU``/``Acc`` over a dataset of (H, W)
    integer prediction/label pairs (each pair the same size; pairs may differ)."""
    acc = SegmentationAccumulator(num_classes, ignore_index)
    for p, g in zip(preds, labels, strict=True):
        acc.update(np.asarray(p), np.asarray(g))
    return acc.result()


def format_class_table(result: dict, class_names: Sequence[str] | None = None, digits: int = 2) -> str:
    """A plain-text table, one row per class: name, IoU and Acc in percent (``nan`` where undefined), then the
    summary row, like mmseg's log."""
    iou = np.asarray(result["IoU"])
    acc = np.asarray(result.get("Acc", np.full_like(iou, np.nan)))
    names = list(class_names) if class_names is not None else [str(i) for i in range(iou.size)]
    if len(names) != iou.size:
        raise ValueError(f"{len(names)} class names for {iou.size} classes")
    width = max([len("Class"), *(len(n) for n in names)])

    def pct(v):
        return "nan" if not np.isfinite(v) else f"{100 * v:.{digits}f}"

    lines = [f"{'Class':<{width}}  {'IoU':>7}  {'Acc':>7}", "-" * (width + 18)]
    lines += [f"{n:<{width}}  {pct(i):>7}  {pct(a):>7}" for n, i, a in zip(names, iou, acc)]
    lines.append("-" * (width + 18))
    lines.append(f"aAcc {pct(result['aAcc'])}  mIoU {pct(result['mIoU'])}  mAcc {pct(result['mAcc'])}")
    return "\n".join(lines)
