"""TTA: window rules, bilinear resize semantics vs torch/cv2, and merged results vs hand computation."""

import jax
import numpy as np
import pytest

from vpd_jax.evaluation import tta


def test_window_starts():
    assert tta.official_window_starts(640, 480, 2) == [0, 160]
    assert tta.official_window_starts(640, 480, 3) == [0, 80, 160]
    assert tta.mmseg_window_starts(640, 480, 160) == [0, 160]
    assert tta.mmseg_window_starts(683, 512, 128) == [0, 128, 171]
    assert tta.mmseg_window_starts(512, 512, 128) == [0]
    assert tta.mmseg_window_starts(480, 512, 128) == [0]
    assert tta.mmcv_rescale_size((480, 640), (2048, 512)) == (512, 683)


@pytest.mark.parametrize("src,dst", [((480, 640), (512, 683)), ((512, 683), (480, 640)), ((7, 5), (3, 11))])
def test_resize_matches_torch_bilinear(src, dst):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(2, *src, 3)).astype(np.float32)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=dst, mode="bilinear", align_corners=False
    ).permute(0, 2, 3, 1).numpy()
    got = np.asarray(jax.jit(tta.resize_bilinear, static_argnums=1)(x, dst))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # (B, H, W) depth maps, as used for resizing predictions back.
    got2 = np.asarray(tta.resize_bilinear(x[..., 0], dst))
    np.testing.assert_allclose(got2, want[..., 0], rtol=1e-5, atol=1e-5)


def test_resize_matches_cv2_when_available():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    want_f = cv2.resize(img.astype(np.float32), (683, 512), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(np.asarray(tta.resize_bilinear(img[None].astype(np.float32), (512, 683)))[0], want_f,
                               atol=2e-2)  # cv2: double coordinates
    want_u8 = cv2.resize(img, (683, 512), interpolation=cv2.INTER_LINEAR)
    got_u8 = np.asarray(tta.resize_bilinear(img[None], (512, 683)))[0]
    assert got_u8.dtype == np.uint8
    assert np.abs(got_u8.astype(int) - want_u8.astype(int)).max() <= 1  # cv2 uses fixed point


def _toy_predict(images, class_ids):
    # Depends on the column inside the window and on the class, so flips and offsets are visible.
    images = np.asarray(images, np.float32)
    w = images.shape[2]
    return (images[..., 0] + 0.01 * np.arange(w, dtype=np.float32)
            + 0.5 * np.asarray(class_ids, np.float32)[:, None, None])


def _hand_merge(images, class_ids, crop, ys, xs, flip):
    b, h, w = images.shape[:3]
    canvas = np.zeros((b, h, w))
    count = np.zeros((h, w))
    for y in ys:
        for x in xs:
            win = images[:, y : y + crop[0], x : x + crop[1]]
            p = _toy_predict(win, class_ids)
            if flip:
                p = (p + _toy_predict(win[:, :, ::-1], class_ids)[:, :, ::-1]) / 2
            canvas[:, y : y + crop[0], x : x + crop[1]] += p
            count[y : y + crop[0], x : x + crop[1]] += 1
    return canvas / count


def _images(h=480, w=640, dtype=np.float32):
    rng = np.random.default_rng(2)
    return rng.uniform(0, 255, (2, h, w, 3)).astype(dtype), np.array([3, 7])


def test_official_tta_equals_hand_merge():
    images, cids = _images()
    got = np.asarray(tta.official_tta(_toy_predict, images, cids))
    want = _hand_merge(images, cids, (480, 480), [0], [0, 160], True)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Columns 160..479 are the mean of two windows; outside, one window.
    w0 = _toy_predict(images[:, :, :480], cids)
    np.testing.assert_allclose(
        got[:, :, :160],
        (w0[:, :, :160] + _toy_predict(images[:, :, :480, :][:, :, ::-1], cids)[:, :, ::-1][:, :, :160]) / 2, rtol=1e-6)
    # mmseg's slide_flip with 480/160 is the same computation.
    np.testing.assert_allclose(np.asarray(tta.mmseg_slide_flip(_toy_predict, images, cids)), got, rtol=1e-6)


def test_single_window_without_flip_is_the_direct_prediction():
    images, cids = _images(480, 480)
    direct = _toy_predict(images, cids)
    np.testing.assert_allclose(np.asarray(tta.official_tta(_toy_predict, images, cids, flip=False)), direct, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(tta.official_tta(_toy_predict, images, cids, shift_window=False, flip=False)), direct, rtol=1e-6
    )
    flipped = np.asarray(tta.official_tta(_toy_predict, images, cids, shift_window=False))
    np.testing.assert_allclose(flipped, images[..., 0] + 0.01 * 479 / 2 + 0.5 * cids[:, None, None], rtol=1e-6)


def test_mmseg_512_equals_hand_computation():
    torch = pytest.importorskip("torch")
    images, cids = _images()

    def resize(x, size):
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        t = t.permute(0, 3, 1, 2) if t.ndim == 4 else t[:, None]
        out = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
        return out.permute(0, 2, 3, 1).numpy() if x.ndim == 4 else out[:, 0].numpy()

    resized = resize(images, (512, 683))
    merged = _hand_merge(resized, cids, (512, 512), [0], [0, 128, 171], True)
    want = resize(merged, (480, 640))
    got = np.asarray(tta.mmseg_512_tta(_toy_predict, images, cids))
    assert got.shape == (2, 480, 640)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_predict_fn_sees_constant_window_shapes():
    seen = []

    def spy(images, class_ids):
        seen.append((images.shape, images.dtype))
        return np.asarray(images, np.float32)[..., 0]

    images, cids = _images(dtype=np.uint8)
    tta.official_tta(spy, images, cids)
    assert seen == [((4, 480, 480, 3), np.uint8)] * 2
