"""The datasets' evaluation protocols (``vpd_jax.protocols``) against direct numpy statements of the published
definitions: KITTI's KB crop (cleinc/bts pytorch/bts_dataloader.py; Lavreniuk/EVP depth/dataset/kitti.py), the
Garg and Eigen crops as fractions (cleinc/bts pytorch/bts_eval.py over the full frame; vinvino02/GLPDepth and
Lavreniuk/EVP utils_depth/metrics.py over the KB-cropped frame), the 1e-3..80 m caps, and the evaluator using
them per image."""

from __future__ import annotations

import numpy as np
import pytest

from vpd_jax import protocols as P
from vpd_jax.evaluation import metrics as M
from vpd_jax.evaluation.evaluator import EvalSettings, Evaluator, metric_crop

# Image sizes of the KITTI raw drives (the four cameras' rectified sizes differ per calibration day).
KITTI_SIZES = [(375, 1242), (370, 1224), (374, 1238), (376, 1241)]


def published_kb_crop(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    top_margin = int(height - 352)
    left_margin = int((width - 1216) / 2)
    return image[top_margin:top_margin + 352, left_margin:left_margin + 1216]


def published_crop_mask(gt_height: int, gt_width: int, kind: str) -> np.ndarray:
    eval_mask = np.zeros((gt_height, gt_width), bool)
    if kind == "garg":
        eval_mask[int(0.40810811 * gt_height):int(0.99189189 * gt_height),
                  int(0.03594771 * gt_width):int(0.96405229 * gt_width)] = True
    else:
        eval_mask[int(0.3324324 * gt_height):int(0.91351351 * gt_height),
                  int(0.0359477 * gt_width):int(0.96405229 * gt_width)] = True
    return eval_mask


def box_mask(shape, box) -> np.ndarray:
    m = np.zeros(shape, bool)
    t, b, left, r = box
    m[t:b, left:r] = True
    return m


def test_constants_are_the_published_ones():
    assert P.KITTI_KB_CROP_SIZE == (352, 1216)
    assert (P.KITTI_MIN_DEPTH_EVAL, P.KITTI_MAX_DEPTH_EVAL, P.KITTI_MAX_DEPTH) == (1e-3, 80.0, 80.0)
    assert P.KITTI_DEPTH_SCALE == 256.0
    assert P.GARG_CROP_FRACTIONS == (0.40810811, 0.99189189, 0.03594771, 0.96405229)
    assert P.KITTI_EIGEN_CROP_FRACTIONS == (0.3324324, 0.91351351, 0.0359477, 0.96405229)
    # NYU's, unchanged, and the metrics module uses the same objects.
    assert (P.EIGEN_CROP, P.MIN_DEPTH_EVAL, P.MAX_DEPTH_EVAL) == ((45, 471, 41, 601), 1e-3, 10.0)
    assert M.EIGEN_CROP is P.EIGEN_CROP and M.MAX_DEPTH_EVAL is P.MAX_DEPTH_EVAL


@pytest.mark.parametrize("shape", KITTI_SIZES)
def test_kb_crop_is_the_published_one(shape):
    image = np.arange(shape[0] * shape[1]).reshape(shape)
    top, left = P.kb_crop_origin(*shape)
    np.testing.assert_array_equal(image[top:top + 352, left:left + 1216], published_kb_crop(image))
    with pytest.raises(ValueError, match="smaller than the 352x1216"):
        P.kb_crop_origin(351, 1242)


@pytest.mark.parametrize("kind", ["garg", "eigen_kitti"])
def test_kb_frame_crops_are_the_evp_masks(kind):
    # EVP/GLPDepth: the fractions of the KB-cropped 352x1216 ground truth.
    box = P.kitti_metric_box(kind, "kb", (375, 1242), P.kb_crop_origin(375, 1242), (352, 1216))
    np.testing.assert_array_equal(box_mask((352, 1216), box), published_crop_mask(352, 1216, kind))
    assert box == {"garg": (143, 349, 43, 1172), "eigen_kitti": (117, 321, 43, 1172)}[kind]


@pytest.mark.parametrize("shape", KITTI_SIZES)
@pytest.mark.parametrize("kind", ["garg", "eigen_kitti"])
def test_full_frame_crops_are_the_bts_masks(shape, kind):
    # BTS: the prediction is pasted into the uncropped frame and the fractions taken of the full ground truth.
    full = published_crop_mask(*shape, kind)
    top, left = P.kb_crop_origin(*shape)
    box = P.kitti_metric_box(kind, "full", shape, (top, left), (352, 1216))
    np.testing.assert_array_equal(box_mask((352, 1216), box), full[top:top + 352, left:left + 1216])
    assert full[top:top + 352, left:left + 1216].sum() == full.sum()  # nothing of the crop lies outside the KB crop


def bts_style_metrics(pred_kb, gt_full, kind, frame):
    """The reference procedure written out: paste the KB prediction into the full frame (BTS) or evaluate the
    KB-cropped ground truth (EVP), mask (1e-3, 80) and the fraction crop, RMSE and AbsRel per image."""
    h, w = gt_full.shape
    top, left = int(h - 352), int((w - 1216) / 2)
    if frame == "full":
        pred = np.zeros_like(gt_full)
        pred[top:top + 352, left:left + 1216] = pred_kb
        gt = gt_full
    else:
        pred, gt = pred_kb, gt_full[top:top + 352, left:left + 1216]
    valid = (gt > 1e-3) & (gt < 80) & published_crop_mask(*gt.shape, kind)
    p, g = pred[valid].astype(np.float64), gt[valid].astype(np.float64)
    return {"rmse": np.sqrt(np.mean((p - g) ** 2)), "abs_rel": np.mean(np.abs(p - g) / g)}


@pytest.mark.parametrize("frame", ["kb", "full"])
def test_evaluator_applies_the_kitti_protocol_per_image(frame):
    rng = np.random.default_rng(0)
    shapes = KITTI_SIZES[:2]
    gts = []
    for shape in shapes:  # sparse LiDAR-like ground truth, some beyond 80 m
        gt = np.where(rng.random(shape) < 0.15, rng.uniform(0.5, 95.0, shape), 0.0).astype(np.float32)
        gts.append(gt)
    preds = [rng.uniform(1.0, 79.0, (352, 1216)).astype(np.float32) for _ in shapes]
    batch = {"image": np.zeros((2, 352, 1216, 3), np.uint8), "class_id": np.zeros(2, np.int32),
             "depth": np.stack([published_kb_crop(g) for g in gts]), "valid": np.ones(2, bool),
             "origin": np.asarray([P.kb_crop_origin(*s) for s in shapes], np.int32),
             "full_shape": np.asarray(shapes, np.int32)}
    settings = EvalSettings(tta="none", flip=False, crop="garg", crop_frame=frame, min_depth=1e-3, max_depth=80.0,
                            num_pictures=0)
    out = Evaluator(None, settings).evaluate(None, [batch], predict=lambda im, c: np.stack(preds), progress=False)
    want = [bts_style_metrics(p, g, "garg", frame) for p, g in zip(preds, gts, strict=True)]
    assert out["num_images"] == 2
    for name in ("rmse", "abs_rel"):
        np.testing.assert_allclose(out["metrics"][name], np.mean([w[name] for w in want]), rtol=1e-12)


def test_nyu_crop_unchanged():
    assert metric_crop((480, 640), "eigen") == (45, 471, 41, 601)
    assert metric_crop((240, 320), "eigen") == (22, 236, 20, 300)  # round(45/2) = 22 (banker's), as before
    assert metric_crop((480, 640), "none") is None
