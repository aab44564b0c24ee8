"""depth_metrics against the formulas of wl-zhao/VPD depth/utils_depth/metrics.py written out directly, on
hand-made 480x640 cases."""

import math

import numpy as np
import pytest

from vpd_jax.evaluation import metrics as M


def _reference(pred, gt):
    """Direct transcription of the official cropping_img + eval_depth (without the inf/nan clamp)."""
    valid = (gt > 1e-3) & (gt < 10)
    crop = np.zeros_like(valid)
    crop[45:471, 41:601] = True
    m = valid & crop
    p, g = pred[m].astype(np.float64), gt[m].astype(np.float64)
    t = np.maximum(g / p, p / g)
    dl = np.log(p) - np.log(g)
    return {
        "d1": (t < 1.25).sum() / len(t),
        "d2": (t < 1.25**2).sum() / len(t),
        "d3": (t < 1.25**3).sum() / len(t),
        "abs_rel": np.mean(np.abs(p - g) / g),
        "sq_rel": np.mean((p - g) ** 2 / g),
        "rmse": np.sqrt(np.mean((p - g) ** 2)),
        "rmse_log": np.sqrt(np.mean(dl**2)),
        "log10": np.mean(np.abs(np.log10(p) - np.log10(g))),
        "silog": np.sqrt(np.mean(dl**2) - 0.5 * np.mean(dl) ** 2),
    }


def _case(seed=0):
    rng = np.random.default_rng(seed)
    gt = rng.uniform(0.5, 9.0, M.NYU_IMAGE_SHAPE).astype(np.float32)
    pred = (gt * rng.uniform(0.7, 1.4, gt.shape)).astype(np.float32)
    # Invalid ground truth of every kind, inside and outside the crop.
    gt[100:120, 100:300] = 0.0
    gt[200, 200:260] = 1e-3  # the bound itself is excluded (in float32, like 1 mm in the references)
    gt[300, 300:330] = 10.0  # likewise
    gt[310, 300:330] = 12.0
    gt[320, 300:330] = np.nan
    return pred, gt


def test_constants():
    assert M.NYU_IMAGE_SHAPE == (480, 640)
    assert M.EIGEN_CROP == (45, 471, 41, 601)
    assert (M.MIN_DEPTH_EVAL, M.MAX_DEPTH_EVAL) == (1e-3, 10.0)
    assert set(M.METRIC_NAMES) == {"d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog"}


def test_matches_direct_formulas():
    pred, gt = _case()
    got = M.depth_metrics(pred, gt)
    want = _reference(pred, gt)
    assert set(got) == set(M.METRIC_NAMES)
    for k in M.METRIC_NAMES:
        assert got[k] == pytest.approx(want[k], rel=1e-12), k


def test_pixels_outside_crop_and_invalid_pixels_are_ignored():
    pred, gt = _case(1)
    base = M.depth_metrics(pred, gt)
    bad = pred.copy()
    bad[:45] = 1e6  # rows above the crop
    bad[471:] = -5.0  # rows below
    bad[:, :41] = np.nan
    bad[:, 601:] = np.inf
    bad[100:120, 100:300] = 0.0  # under gt == 0
    bad[320, 300:330] = -1.0  # under gt == nan
    assert M.depth_metrics(bad, gt) == base
    # Moving one valid in-crop pixel changes the result.
    bad[45, 41] += 1.0
    assert M.depth_metrics(bad, gt)["rmse"] != base["rmse"]


def test_hand_computed_values():
    gt = np.zeros(M.NYU_IMAGE_SHAPE)
    pred = np.ones(M.NYU_IMAGE_SHAPE)
    gt[50, 50], pred[50, 50] = 2.0, 2.0  # exact
    gt[60, 60], pred[60, 60] = 1.0, 2.0  # ratio 2
    out = M.depth_metrics(pred, gt)
    assert out["d1"] == 0.5 and out["d2"] == 0.5 and out["d3"] == 0.5  # 2 > 1.25**3 = 1.953
    assert out["abs_rel"] == pytest.approx(0.5)
    assert out["sq_rel"] == pytest.approx(0.5)
    assert out["rmse"] == pytest.approx(math.sqrt(0.5))
    assert out["rmse_log"] == pytest.approx(math.sqrt(math.log(2) ** 2 / 2))
    assert out["log10"] == pytest.approx(math.log10(2) / 2)
    assert out["silog"] == pytest.approx(math.sqrt(math.log(2) ** 2 / 2 - 0.5 * (math.log(2) / 2) ** 2))


def test_official_clamp_option():
    pred, gt = _case(2)
    pred[200, 100] = np.inf
    pred[201, 100] = np.nan
    assert math.isnan(M.depth_metrics(pred, gt)["rmse"])
    fixed = pred.copy()
    fixed[200, 100] = 10.0
    fixed[201, 100] = 1e-3
    assert M.depth_metrics(pred, gt, clamp_pred=True) == M.depth_metrics(fixed, gt)


def test_empty_mask_and_shape_check():
    out = M.depth_metrics(np.ones(M.NYU_IMAGE_SHAPE), np.zeros(M.NYU_IMAGE_SHAPE))
    assert all(math.isnan(v) for v in out.values())
    with pytest.raises(ValueError):
        M.depth_metrics(np.ones((480, 640)), np.ones((480, 641)))


def test_accumulator_averages_over_images_not_pixels():
    cases = [_case(s) for s in range(3)]
    acc = M.MetricAccumulator()
    acc.update(np.stack([c[0] for c in cases[:2]]), np.stack([c[1] for c in cases[:2]]))
    other = M.MetricAccumulator()
    other.update(*cases[2])
    acc.merge(other)
    assert acc.count == 3
    per_image = [_reference(*c) for c in cases]
    for k in M.METRIC_NAMES:
        assert acc.result()[k] == pytest.approx(np.mean([r[k] for r in per_image]), rel=1e-12)
