"""The segmentation test pipeline (``vpd_jax.evaluation.seg_evaluator``) against mmsegmentation 0.x's
``EncoderDecoder.slide_inference`` and ``aug_test`` written out in numpy, with a stand-in network whose logits
depend on the position inside each window (so the overlap averaging and the window placement both matter)."""

from __future__ import annotations

import numpy as np
import pytest

from vpd_jax.evaluation.seg_evaluator import SegEvalSettings, predict_labels, slide_logits

C = 5


def window_net(windows: np.ndarray) -> np.ndarray:
    """(n, h, w, 3) -> (n, h, w, C): colour mixes plus a ramp over the window's own rows and columns."""
    x = np.asarray(windows, np.float64)
    n, h, w, _ = x.shape
    ramp = np.arange(h)[:, None] * 0.07 + np.arange(w)[None, :] * 0.05
    mix = np.stack([x[..., 0] - x[..., 1], x[..., 1] * 0.5, x[..., 2] - 60, (x[..., 0] + x[..., 2]) * 0.25,
                    x.mean(-1) * 0.1], axis=-1)
    return (mix / 50.0 + ramp[None, :, :, None] * np.arange(1, C + 1)).astype(np.float32)


def mmseg_slide(img: np.ndarray, crop, stride) -> np.ndarray:
    # mmseg/models/segmentors/encoder_decoder.py slide_inference (0.x), transcribed for one HWC image.
    h_stride, w_stride = stride
    h_crop, w_crop = crop
    h_img, w_img = img.shape[:2]
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = np.zeros((h_img, w_img, C))
    count = np.zeros((h_img, w_img, 1))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            preds[y1:y2, x1:x2] += window_net(img[None, y1:y2, x1:x2])[0]
            count[y1:y2, x1:x2] += 1
    return preds / count


@pytest.mark.parametrize("shape", [(70, 100), (20, 25), (32, 96)])
@pytest.mark.parametrize("k", [1, 3])
def test_slide_logits_are_mmsegs_slide_inference(shape, k):
    img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    got = slide_logits(window_net, img, (32, 32), (21, 21), windows_per_call=k)
    np.testing.assert_allclose(got, mmseg_slide(img, (32, 32), (21, 21)), rtol=0, atol=2e-6)


def test_multi_scale_flip_averages_softmax_over_every_pass():
    import torch

    img = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    s = SegEvalSettings(crop=(32, 32), stride=(21, 21), scales=(0.75, 1.0, 1.25), flip=True, windows_per_call=2)
    out_hw = (50, 70)
    probs = 0
    for ratio in s.scales:  # aug_test: each scale and flip, slide logits resized to the output, softmax, mean
        size = (int(40 * ratio + 0.5), int(60 * ratio + 0.5))
        scaled = torch.nn.functional.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float(), size,
                                                 mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
        for flip in (False, True):
            x = scaled[:, ::-1] if flip else scaled
            lg = mmseg_slide(np.ascontiguousarray(x), s.crop, s.stride)
            lg = lg[:, ::-1] if flip else lg
            lg = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(lg)).permute(2, 0, 1)[None],
                                                 out_hw, mode="bilinear", align_corners=False)[0]
            probs = probs + torch.softmax(lg, 0).permute(1, 2, 0).numpy()
    want = probs.argmax(-1)
    got = predict_labels(window_net, img, out_hw, s)
    top2 = np.sort(probs, -1)[..., -2:]
    ties = (top2[..., 1] - top2[..., 0]) < 1e-4
    assert ((got != want) & ~ties).sum() == 0 and (got == want).mean() > 0.99
