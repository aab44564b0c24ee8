"""Depth pictures and point clouds: PNG16 scale and invalid pixels, colormaps, panels, PLY geometry, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vpd_jax import visualize as vis


def _depth(h=30, w=40, seed=0):
    d = np.random.default_rng(seed).uniform(0.5, 9.5, (h, w)).astype(np.float32)
    d[0, 0], d[1, 1], d[2, 2] = 0.0, np.nan, -1.0
    return d


def test_png16_is_millimetres_with_zero_for_invalid(tmp_path):
    d = _depth()
    d[3, 3], d[4, 4], d[5, 5] = 70.0, 1e-4, 1.2344
    path = vis.save_depth_png16(tmp_path / "d.png", d)
    with Image.open(path) as im:
        assert im.mode == "I;16" and im.size == (40, 30)
        mm = np.asarray(im)
    assert mm[0, 0] == mm[1, 1] == mm[2, 2] == 0
    assert mm[3, 3] == 65535 and mm[4, 4] == 1 and mm[5, 5] == 1234
    ok = vis.valid_mask(d) & (d < 65) & (d > 1e-3)
    np.testing.assert_allclose(mm[ok] / 1000.0, d[ok], atol=5e-4 + 1e-6)
    back = vis.read_depth_png16(path)
    np.testing.assert_allclose(back[ok], d[ok], atol=5e-4 + 1e-6)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "x.npy"
    vis.save_npy(target, np.ones((2, 2)))
    with pytest.raises(RuntimeError), vis.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash")
    np.testing.assert_array_equal(np.load(target), np.ones((2, 2), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_colorize_range_cmap_and_invalid():
    d = _depth()
    rgb = vis.colorize(d, cmap="viridis")
    assert rgb.dtype == np.uint8 and rgb.shape == (30, 40, 3)
    assert (rgb[0, 0] == 0).all() and (rgb[1, 1] == 0).all()
    lut = vis._lut("viridis")
    ok = vis.valid_mask(d)
    near = np.unravel_index(np.argmin(np.where(ok, d, np.inf)), d.shape)
    far = np.unravel_index(np.argmax(np.where(ok, d, -np.inf)), d.shape)
    assert (rgb[near] == lut[0]).all() and (rgb[far] == lut[-1]).all()
    # Explicit limits clip.
    fixed = vis.colorize(np.full((2, 2), 20.0), vmin=0, vmax=10, cmap="turbo")
    assert (fixed == vis._lut("turbo")[-1]).all()
    with pytest.raises(ValueError, match="colormap"):
        vis.colorize(d, cmap="no-such-map")


def test_colormap_png_and_colorbar(tmp_path):
    d = _depth(60, 80)
    p = vis.save_colormap_png(tmp_path / "c.png", d)
    with Image.open(p) as im:
        assert im.size == (80, 60) and im.mode == "RGB"
    p = vis.save_colormap_png(tmp_path / "cb.png", d, colorbar=True)
    with Image.open(p) as im:
        a = np.asarray(im)
    assert a.shape[0] == 60 and a.shape[1] > 80
    np.testing.assert_array_equal(a[:, :80], vis.colorize(d))


def test_panel_shares_one_scale(tmp_path):
    img = np.random.default_rng(1).integers(0, 256, (30, 40, 3), np.uint8)
    gt = _depth(seed=2)
    pred = np.clip(gt, 0.1, None) * 1.1
    panel = vis.make_panel(img, gt, pred, colorbar=False)
    assert panel.shape == (30, 120, 3)
    np.testing.assert_array_equal(panel[:, :40], img)
    lo, hi = vis.depth_range(gt)
    np.testing.assert_array_equal(panel[:, 80:], vis.colorize(pred, lo, hi))
    p = vis.save_panel(tmp_path / "p.png", img[..., 0], gt, pred)  # grayscale image, with colour bar
    with Image.open(p) as im:
        assert im.size[1] == 30 and im.size[0] > 120
    assert vis.make_panel(img, None, pred, colorbar=False).shape == (30, 80, 3)


@pytest.mark.parametrize("binary", [True, False])
def test_ply_points_of_a_known_depth(tmp_path, binary):
    h, w = 48, 64
    d = np.full((h, w), 2.0, np.float32)
    d[10, 20] = 0.0
    d[11, 21] = np.nan
    d[5, 7] = 3.0
    img = np.zeros((h, w, 3), np.uint8)
    img[5, 7] = (10, 200, 30)
    intr = (50.0, 60.0, 31.5, 23.5)
    n = vis.write_ply(tmp_path / "c.ply", d, intr, img, binary=binary)
    v = vis.read_ply(tmp_path / "c.ply")
    assert n == len(v) == h * w - 2
    i = 5 * w + 7  # row-major order of valid pixels; (5, 7) precedes the two invalid ones
    assert v["x"][i] == pytest.approx((7 - 31.5) * 3.0 / 50.0, rel=1e-5)
    assert v["y"][i] == pytest.approx((5 - 23.5) * 3.0 / 60.0, rel=1e-5)
    assert v["z"][i] == pytest.approx(3.0)
    assert (v["red"][i], v["green"][i], v["blue"][i]) == (10, 200, 30)
    # Pixel (0, 0) at z = 2.
    assert (v["x"][0], v["y"][0]) == pytest.approx((-31.5 * 2 / 50, -23.5 * 2 / 60), rel=1e-5)


def test_nyu_intrinsics_scale_with_the_image():
    assert vis.scaled_intrinsics(480, 640) == pytest.approx(vis.NYU_INTRINSICS)
    fx, fy, cx, cy = vis.scaled_intrinsics(240, 320)
    assert (fx, fy) == pytest.approx((518.8579 / 2, 519.4696 / 2))
    assert (cx, cy) == pytest.approx(((325.5824 + 0.5) / 2 - 0.5, (253.7362 + 0.5) / 2 - 0.5))
    pts, ok = vis.depth_to_points(np.ones((480, 640), np.float32))
    assert ok.all() and pts.shape == (480 * 640, 3)
    v, u = 253, 325
    assert pts[v * 640 + u, 0] == pytest.approx((325 - 325.5824) / 518.8579, rel=1e-4)
