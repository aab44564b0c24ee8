"""Segmentation metrics: direct numpy formulas (confusion matrix), mmseg's IoUMetric, NaN and ignore rules,
the streaming accumulator and the class table."""

from __future__ import annotations

import numpy as np
import pytest

from vpd_jax.evaluation import segmentation as sm


def _pairs(seed, n=5, num_classes=7):
    rng = np.random.default_rng(seed)
    preds, labels = [], []
    for i in range(n):
        h, w = rng.integers(5, 30, 2)
        g = rng.integers(0, num_classes, (h, w))
        g[rng.random((h, w)) < 0.2] = 255
        p = np.where(rng.random((h, w)) < 0.6, g, rng.integers(0, num_classes, (h, w)))
        p[g == 255] = rng.integers(0, num_classes, int((g == 255).sum()))
        preds.append(p.astype(np.int64))
        labels.append(g.astype(np.uint8))
    return preds, labels


def _confusion(preds, labels, n):
    cm = np.zeros((n, n), np.int64)
    for p, g in zip(preds, labels):
        m = g != 255
        np.add.at(cm, (g[m].astype(int), p[m].astype(int)), 1)
    return cm


def test_against_a_confusion_matrix():
    n = 7
    preds, labels = _pairs(0, num_classes=n)
    preds = [np.where(p == 6, 5, p) for p in preds]  # class 6 never predicted ...
    labels = [np.where(g == 6, 255, g).astype(np.uint8) for g in labels]  # ... nor labelled: NaN
    res = sm.segmentation_metrics(preds, labels, n)
    cm = _confusion(preds, labels, n)
    tp = np.diag(cm).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (cm.sum(0) + cm.sum(1) - tp)
        acc = tp / cm.sum(1)
    np.testing.assert_allclose(res["IoU"], iou, equal_nan=True)
    np.testing.assert_allclose(res["Acc"], acc, equal_nan=True)
    assert np.isnan(res["IoU"][6]) and np.isnan(res["Acc"][6])
    assert res["mIoU"] == pytest.approx(np.nanmean(iou))
    assert res["mAcc"] == pytest.approx(np.nanmean(acc))
    assert res["aAcc"] == pytest.approx(tp.sum() / cm.sum())
    assert 0 <= res["mIoU"] <= 1 and 0 <= res["aAcc"] <= 1


def test_pooled_over_the_dataset_not_averaged_per_image():
    # Image 1: one pixel of class 0, right; image 2: 99 pixels of class 1, all wrong (predicted 0).
    preds = [np.zeros((1, 1), int), np.zeros((9, 11), int)]
    labels = [np.zeros((1, 1), np.uint8), np.ones((9, 11), np.uint8)]
    res = sm.segmentation_metrics(preds, labels, 2)
    assert res["aAcc"] == pytest.approx(1 / 100)
    np.testing.assert_allclose(res["IoU"], [1 / 100, 0.0])
    np.testing.assert_allclose(res["Acc"], [1.0, 0.0])


def test_predicted_but_absent_class_counts_zero_and_out_of_range_is_no_class():
    label = np.array([[0, 0, 255, 3]], np.uint8)
    pred = np.array([[0, 2, 2, 200]])  # 2 predicted but never labelled; 200 is in no class
    res = sm.segmentation_metrics([pred], [label], 4)
    np.testing.assert_allclose(res["IoU"], [0.5, np.nan, 0.0, 0.0], equal_nan=True)
    np.testing.assert_allclose(res["Acc"], [0.5, np.nan, np.nan, 0.0], equal_nan=True)
    assert res["aAcc"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="equal"):
        sm.segmentation_metrics([pred], [label.T], 4)


def test_matches_mmseg_iou_metric():
    torch = pytest.importorskip("torch")
    from reference.torch_training import import_mmseg

    import_mmseg()
    from mmseg.evaluation.metrics import IoUMetric

    n = 150
    rng = np.random.default_rng(1)
    preds, labels = [], []
    for _ in range(4):
        g = rng.integers(0, n, (40, 50)).astype(np.uint8)
        g[:5] = 255
        preds.append(np.where(rng.random(g.shape) < 0.5, g, rng.integers(0, n, g.shape)).astype(np.int64))
        labels.append(g)
    res = sm.segmentation_metrics(preds, labels, n)
    parts = [IoUMetric.intersect_and_union(torch.from_numpy(p), torch.from_numpy(g.astype(np.int64)), n, 255)
             for p, g in zip(preds, labels)]
    ours = [sm.intersect_and_union(p, g, n) for p, g in zip(preds, labels)]
    for theirs, mine in zip(parts, ours):
        for t, m in zip(theirs, mine):
            np.testing.assert_array_equal(t.numpy(), m)
    tot = [sum(x[k] for x in parts) for k in range(4)]
    ref = IoUMetric.total_area_to_metrics(*tot, metrics=["mIoU"])
    np.testing.assert_allclose(res["IoU"], ref["IoU"], rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(res["Acc"], ref["Acc"], rtol=1e-6, equal_nan=True)
    assert res["aAcc"] == pytest.approx(float(ref["aAcc"]), rel=1e-6)
    assert res["mIoU"] == pytest.approx(float(np.nanmean(ref["IoU"])), rel=1e-6)
    assert res["mAcc"] == pytest.approx(float(np.nanmean(ref["Acc"])), rel=1e-6)


def test_accumulator_streams_merges_and_tabulates():
    preds, labels = _pairs(2, n=6)
    whole = sm.segmentation_metrics(preds, labels, 7)
    a, b = sm.SegmentationAccumulator(7), sm.SegmentationAccumulator(7)
    for p, g in zip(preds[:3], labels[:3]):
        a.update(p, g)
    for p, g in zip(preds[3:], labels[3:]):
        b.update(p, g)
    a.merge(b)
    assert a.count == 6
    res = a.result()
    for k in ("aAcc", "mIoU", "mAcc"):
        assert res[k] == whole[k]
    c = sm.SegmentationAccumulator(7)
    c.add_state(a.state(), a.count)
    np.testing.assert_array_equal(c.result()["IoU"], whole["IoU"])
    # a batch of equal-sized maps
    d = sm.SegmentationAccumulator(7)
    d.update(np.stack([preds[0], preds[0]]), np.stack([labels[0], labels[0]]))
    assert d.count == 2
    names = [f"class {i}" for i in range(7)]
    table = sm.format_class_table(res, names)
    lines = table.splitlines()
    assert len(lines) == 7 + 4 and lines[2].startswith("class 0")
    assert f"{100 * res['IoU'][0]:.2f}" in lines[2]
    assert f"mIoU {100 * res['mIoU']:.2f}" in lines[-1]
    with pytest.raises(ValueError, match="6 class names for 7"):
        sm.format_class_table(res, names[:6])
    empty = sm.SegmentationAccumulator(3).result()
    assert np.isnan(empty["mIoU"]) and np.isnan(empty["aAcc"])
