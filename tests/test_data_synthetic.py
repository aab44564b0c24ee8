"""Synthetic scenes: exact metric depth through the NYU intrinsics, determinism, class tags, learnability."""

from __future__ import annotations

import numpy as np
import pytest

from vpd_jax import scenes
from vpd_jax.data import synthetic as syn


def test_intrinsics_scale_with_size():
    assert syn.intrinsics(480, 640) == pytest.approx((518.8579, 519.4696, 325.5824, 253.7362))
    fx, fy, cx, cy = syn.intrinsics(240, 320)
    assert (fx, fy) == pytest.approx((518.8579 / 2, 519.4696 / 2))
    assert (cx, cy) == pytest.approx(((325.5824 + 0.5) / 2 - 0.5, (253.7362 + 0.5) / 2 - 0.5))


def _empty_room(objects=()):
    mat = syn._Material(np.array([0.5, 0.5, 0.5]), np.array([0.2, 0.2, 0.2]), 1, 0.3, 0)
    return syn._Room(x0=-2.0, x1=3.0, z0=-1.0, z1=6.0, floor_y=0.0, ceil_y=-2.8, materials=[mat] * 6,
                     objects=list(objects), light=np.array([0.0, -2.6, 2.0]), light_power=5.0, ambient=0.2)


@pytest.mark.parametrize("size", [(48, 64), (96, 128)])
def test_depth_is_exact_camera_z_of_the_room_planes(size):
    h, w = size
    room = _empty_room()
    cam = np.array([0.5, -1.3, 0.0])
    _, depth = syn.render(room, np.eye(3), cam, h, w, np.random.default_rng(0))
    fx, fy, cx, cy = syn.intrinsics(h, w)
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    dx, dy = (xs - cx) / fx, (ys - cy) / fy  # ray direction with unit z: t = camera z
    cands = []
    for coord, comp, origin in ((0.0, dy, cam[1]), (-2.8, dy, cam[1]), (-2.0, dx, cam[0]), (3.0, dx, cam[0])):
        with np.errstate(divide="ignore"):
            t = (coord - origin) / comp
        cands.append(np.where(t > 0, t, np.inf))
    cands.append(np.full((h, w), 6.0 - cam[2]))  # back wall z = 6
    expected = np.min(cands, axis=0)
    expected = np.where(expected > syn.MAX_DEPTH, 0.0, expected)
    valid = depth > 0
    assert valid.mean() > 0.9  # grazing-angle dropouts only
    np.testing.assert_allclose(depth[valid], expected[valid], rtol=1e-6)


def test_sphere_depth_at_its_centre_pixel():
    h, w = 96, 128
    mat = syn._Material(np.array([0.9, 0.1, 0.1]), np.array([0.1, 0.1, 0.9]), 0, 0.2, 1)
    room = _empty_room([("sphere", (0.0, -0.4, 3.0, 0.4), mat)])
    cam = np.array([0.0, -0.4, 0.0])
    image, depth = syn.render(room, np.eye(3), cam, h, w, np.random.default_rng(0))
    fx, fy, cx, cy = syn.intrinsics(h, w)
    u, v = int(round(cx)), int(round(cy))
    # The ray through (u, v) is nearly the optical axis; exact hit z from the ray/sphere quadratic.
    d = np.array([(u - cx) / fx, (v - cy) / fy, 1.0])
    oc = cam - np.array([0.0, -0.4, 3.0])
    a, b, c = d @ d, 2 * d @ oc, oc @ oc - 0.16
    t = (-b - np.sqrt(b * b - 4 * a * c)) / (2 * a)
    assert depth[v, u] == pytest.approx(t, rel=1e-6)
    assert depth[v, u] == pytest.approx(2.6, abs=0.01)
    assert image[v, u, 0] > image[v, u, 2]  # the red material, not the grey wall


def test_scenes_are_deterministic_sized_and_tagged():
    a = syn.generate_scene(3, 2, 1, 48, 64)
    b = syn.generate_scene(3, 2, 1, 48, 64)
    c = syn.generate_scene(4, 2, 1, 48, 64)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.depth, b.depth)
    assert not np.array_equal(a.depth, c.depth)
    assert a.image.shape == (48, 64, 3) and a.image.dtype == np.uint8
    assert a.depth.shape == (48, 64) and a.depth.dtype == np.float32
    assert a.scene_dir.startswith(a.scene_class + "_") and a.scene_class in scenes.NYU_CLASSES
    for rule in scenes.CLASS_RULES:
        cid = scenes.class_id_for_file(f"{a.scene_dir}_rgb_00001.png", rule)
        assert 0 <= cid < scenes.NUM_CLASSES
    # Train and test rooms differ; views of one room share its class.
    assert syn.scene_dir_name(0, 0, "train")[0] != syn.scene_dir_name(0, 0, "test")[0]
    views = [syn.generate_scene(0, 5, f, 24, 32) for f in range(3)]
    assert len({v.scene_dir for v in views}) == 1
    assert not np.array_equal(views[0].depth, views[1].depth)


def test_image_carries_the_depth_structure():
    """Depth discontinuities (occlusion boundaries, room corners) show up as image edges, and the images vary
    in lighting and materials: the image is informative about depth, not noise laid over it."""
    h, w = 96, 128
    ratios = []
    for i in range(6):
        sc = syn.generate_scene(1, i, 0, h, w)
        g = sc.image.astype(np.float64).mean(-1)
        img_grad = np.hypot(*np.gradient(g))
        dep_grad = np.hypot(*np.gradient(sc.depth.astype(np.float64)))
        valid = sc.depth > 0
        valid = valid & np.roll(valid, 1, 0) & np.roll(valid, -1, 0) & np.roll(valid, 1, 1) & np.roll(valid, -1, 1)
        edges = valid & (dep_grad > 0.15)  # jumps of more than 15 cm between neighbouring pixels
        assert edges.any()
        ratios.append(img_grad[edges].mean() / img_grad[valid].mean())
    assert np.median(ratios) > 1.5
    # A shuffled pairing of images and depths shows no such alignment (the test can tell).
    sc_a, sc_b = syn.generate_scene(1, 0, 0, h, w), syn.generate_scene(1, 3, 0, h, w)
    g = sc_a.image.astype(np.float64).mean(-1)
    dep_grad = np.hypot(*np.gradient(sc_b.depth.astype(np.float64)))
    edges = (sc_b.depth > 0) & (dep_grad > 0.15) & (dep_grad < 5)
    img_grad = np.hypot(*np.gradient(g))
    assert img_grad[edges].mean() / img_grad.mean() < 1.5
    train = [syn.generate_scene(1, i, 0, 24, 32) for i in range(12)]
    all_depth = np.concatenate([s.depth.ravel() for s in train])
    assert (all_depth > 0).mean() > 0.9 and all_depth.max() <= syn.MAX_DEPTH
    assert np.std([s.image.mean() for s in train]) > 5  # lighting and materials vary


def _pooled_log_luminance_and_depth(split: str, n: int, h: int = 48, w: int = 64, pool: int = 8):
    x, y = [], []
    for i in range(n):
        sc = syn.generate_scene(2, i // 4, i % 4, h, w, split)
        g = sc.image.astype(np.float64).mean(-1).reshape(h // pool, pool, w // pool, pool).mean((1, 3))
        d = sc.depth.astype(np.float64).reshape(h // pool, pool, w // pool, pool)
        full = (d > 0).all((1, 3))
        x.append(np.log(g[full] / 255.0 + 1e-3))
        y.append(d.mean((1, 3))[full])
    return np.concatenate(x), np.concatenate(y)


def test_brightness_is_a_depth_cue_a_linear_fit_can_read():
    """The flash makes brightness fall off with distance: a two-parameter fit of log depth on the log luminance
    of 8x8 blocks (what survives the VAE's downsampling) beats the constant mean depth on unseen rooms by a wide
    margin. With the ceiling light alone (the generator before the flash) this fit did no better than the
    constant (RMSE 1.52 vs 1.51 m at 120x160)."""
    x, y = _pooled_log_luminance_and_depth("train", 48)
    xt, yt = _pooled_log_luminance_and_depth("test", 24)
    slope, icpt = np.polyfit(x, np.log(y), 1)
    assert slope < -0.8  # darker is farther (irradiance ~ 1/d^2, encoded with gamma 2.2: about -0.9)
    rmse_fit = np.sqrt(np.mean((np.exp(icpt + slope * xt) - yt) ** 2))
    rmse_const = np.sqrt(np.mean((y.mean() - yt) ** 2))
    assert rmse_fit < 0.75 * rmse_const, (rmse_fit, rmse_const)
