"""VPD augmentations: photometric ops against albumentations itself, CutDepth (both variants, uint8 wrap), flip,
crop, the 512 recipe's random resize, and determinism given a seed."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from vpd_jax.data import augment as ag

A = pytest.importorskip("albumentations")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    out = [rng.integers(0, 256, (31, 47, 3), dtype=np.uint8)]
    img = rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)
    img[:6, :6] = 128  # grey (S=0) pixels, which HSV keeps grey
    img[6:12, :6] = (0, 0, 0)
    img[12:18, :6] = (255, 255, 255)
    out.append(img)
    return out


def test_default_ranges_are_albumentations_defaults():
    bc = A.RandomBrightnessContrast()
    assert tuple(bc.brightness_limit) == ag.BRIGHTNESS_LIMIT
    assert tuple(bc.contrast_limit) == ag.CONTRAST_LIMIT
    assert bc.brightness_by_max is True and bc.p == ag.PHOTOMETRIC_P
    g = A.RandomGamma()
    assert tuple(g.gamma_limit) == ag.GAMMA_LIMIT and g.p == ag.PHOTOMETRIC_P
    h = A.HueSaturationValue()
    assert tuple(h.hue_shift_limit) == ag.HUE_SHIFT_LIMIT
    assert tuple(h.sat_shift_limit) == ag.SAT_SHIFT_LIMIT
    assert tuple(h.val_shift_limit) == ag.VAL_SHIFT_LIMIT
    assert h.p == ag.PHOTOMETRIC_P


def test_sampled_parameters_follow_albumentations_semantics(images):
    # albumentations' own sampler: alpha = 1 + U(contrast), beta = U(brightness) * 255, gamma = U(limit) / 100.
    img = images[0]
    bc = A.RandomBrightnessContrast(p=1.0)
    bc.set_random_seed(3)
    p = bc.get_params_dependent_on_data({}, {"image": img})
    assert 0.8 <= p["alpha"] <= 1.2 and -51.0 <= p["beta"] <= 51.0
    g = A.RandomGamma(p=1.0)
    g.set_random_seed(3)
    assert 0.8 <= g.get_params_dependent_on_data({}, {"image": img})["gamma"] <= 1.2
    # Ours, over many draws, cover the same ranges and fire with p=0.5 each.
    rng = np.random.default_rng(0)
    draws = [ag.sample_photometric(rng) for _ in range(4000)]
    ab = np.array([d.alpha_beta for d in draws if d.alpha_beta is not None])
    gm = np.array([d.gamma for d in draws if d.gamma is not None])
    hsv = np.array([d.hsv for d in draws if d.hsv is not None])
    for arr in (ab, gm, hsv):
        assert abs(len(arr) / 4000 - 0.5) < 0.04
    assert ab[:, 0].min() >= 0.8 and ab[:, 0].max() <= 1.2 and ab[:, 0].max() > 1.19
    assert ab[:, 1].min() >= -51 and ab[:, 1].max() <= 51 and ab[:, 1].min() < -50
    assert gm.min() >= 0.8 and gm.max() <= 1.2
    assert np.all(np.abs(hsv) <= [20, 30, 20]) and np.all(np.abs(hsv).max(0) > [19.9, 29.9, 19.9])


def test_photometric_ops_match_albumentations_pixel_for_pixel(images):
    rng = np.random.default_rng(1)
    bc, gm, hsv = A.RandomBrightnessContrast(p=1.0), A.RandomGamma(p=1.0), A.HueSaturationValue(p=1.0)
    for img in images:
        for _ in range(150):
            p = ag.sample_photometric(rng)
            a, b = 1.0 + rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2) * 255.0
            np.testing.assert_array_equal(ag.brightness_contrast(img, a, b), bc.apply(img, alpha=a, beta=b))
            gv = rng.uniform(80, 120) / 100.0
            np.testing.assert_array_equal(ag.gamma(img, gv), gm.apply(img, gamma=gv))
            h, s, v = rng.uniform(-20, 20), rng.uniform(-30, 30), rng.uniform(-20, 20)
            np.testing.assert_array_equal(ag.hue_saturation_value(img, h, s, v),
                                          hsv.apply(img, hue_shift=h, sat_shift=s, val_shift=v))
            # The composed chain equals albumentations' transforms applied in the same order.
            ref = img
            if p.alpha_beta is not None:
                ref = bc.apply(ref, alpha=p.alpha_beta[0], beta=p.alpha_beta[1])
            if p.gamma is not None:
                ref = gm.apply(ref, gamma=p.gamma)
            if p.hsv is not None:
                ref = hsv.apply(ref, hue_shift=p.hsv[0], sat_shift=p.hsv[1], val_shift=p.hsv[2])
            np.testing.assert_array_equal(ag.apply_photometric(img, p), ref)


def test_photometric_edge_values(images):
    img = images[1]
    hsv = A.HueSaturationValue(p=1.0)
    for h, s, v in [(0, 0, 0), (20, 0, 0), (0, -30, 0), (0, 0.7, -0.7), (-20, 30, 20), (19.999, -29.5, 19.5)]:
        np.testing.assert_array_equal(ag.hue_saturation_value(img, h, s, v),
                                      hsv.apply(img, hue_shift=h, sat_shift=s, val_shift=v))
    grey = img[:6, :6]
    assert (ag.hue_saturation_value(grey, 10, 30, 0) == grey).all()  # S=0 stays grey
    bc = A.RandomBrightnessContrast(p=1.0)
    for a, b in [(1.2, 51.0), (0.8, -51.0), (1.0, 0.0)]:
        np.testing.assert_array_equal(ag.brightness_contrast(img, a, b), bc.apply(img, alpha=a, beta=b))


def test_cutdepth_official_strip_and_uint8_wrap():
    depth = np.full((4, 40), 1.234, np.float32)
    depth[:, 10:] = np.float32(0.300)
    depth[0, :] = np.float32(9.999)
    image = np.full((4, 40, 3), 7, np.uint8)
    left, width = ag.cutdepth_strip_official(40, 0.2, 0.5)
    assert (left, width) == (8, int(max((40 - 0.2 * 40) * 0.5 * 0.75, 1)))  # l=int(aW), w=int((W-aW) b .75)
    out = ag.apply_cutdepth(image, depth, left, width, uint8_wrap=True)
    # 1234 mm -> 1234 % 256 = 210; 300 mm -> 44; 9999 mm -> 15, the reference's float->uint8 wrap.
    assert (out[1:, 8:10] == 1234 % 256).all() and (out[1:, 10:8 + width] == 300 % 256).all()
    assert (out[0, 8:8 + width] == 9999 % 256).all()
    assert (out[:, :8] == 7).all() and (out[:, 8 + width:] == 7).all()
    assert (out[..., 0] == out[..., 2]).all()
    # The reference's own statement (float32 millimetres assigned into the uint8 image) gives the same bytes.
    mm = np.round(depth * 1000).astype(np.float32)
    ref = image.copy()
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in range(3):
            ref[:, left:left + width, c] = mm[:, left:left + width]
    np.testing.assert_array_equal(out, ref)
    scaled = ag.apply_cutdepth(image, depth, left, width, uint8_wrap=False, max_depth=10.0)
    assert scaled[1, 8, 0] == int(1.234 / 10 * 255 + 0.5) and scaled[0, 8, 0] == 255
    assert ag.cutdepth_strip_official(40, 0.999, 0.0) == (39, 1)  # width is at least 1


def test_uint8_wrap_for_every_millimetre_value():
    """Stored depth is float32 metres (mm / 1000); the strip must still be the reference's byte of the integer
    millimetre value it read from the PNG, for every value a uint16 depth PNG of NYU can hold."""
    mm = np.arange(0, 20001, dtype=np.uint16)
    stored = mm.astype(np.float32) / np.float32(1000.0)  # how sources.py stores it
    ours = ag.depth_to_strip(stored[None], True, 10.0)[0]
    ref = np.zeros(mm.shape, np.uint8)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref[:] = mm.astype(np.float32)  # the reference: float32 mm into a uint8 array
    np.testing.assert_array_equal(ours, ref)


def test_cutdepth_mmseg_strip():
    assert ag.cutdepth_strip_mmseg(640, 0.5, 0.5) == (320, int(max(1, (640 - 320) * 0.75 * 0.5)))
    assert ag.cutdepth_strip_mmseg(640, 0.3337, 0.9) == (213, int((640 - 213) * 0.75 * 0.9))


def _example(h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    depth = rng.uniform(0.5, 9.5, (h, w)).astype(np.float32)
    return image, depth


def test_cutdepth_official_every_fourth_position_only():
    image, depth = _example()
    cfg = ag.AugmentConfig(crop_size=None, flip=False, photometric=False, cutdepth="official")
    fired = []
    for pos in range(12):
        out, _, params = ag.augment(image, depth, cfg, np.random.default_rng(pos), position=pos)
        fired.append(params["cutdepth"] is not None)
        assert (out != image).any() == fired[-1]
    assert fired == [p % 4 == 0 for p in range(12)]


def test_cutdepth_mmseg_rate_and_strip():
    image, depth = _example(8, 64)
    cfg = ag.AugmentConfig(crop_size=None, flip=False, photometric=False, cutdepth="mmseg")
    hits = 0
    for s in range(800):
        rng = np.random.default_rng(s)
        u1, u2, coin = rng.random(), rng.random(), rng.random()
        out, _, params = ag.augment(image, depth, cfg, np.random.default_rng(s), position=0)
        assert (params["cutdepth"] is not None) == (coin <= 0.25)
        if params["cutdepth"] is not None:
            hits += 1
            assert params["cutdepth"] == ag.cutdepth_strip_mmseg(64, u1, u2)
            left, width = params["cutdepth"]
            np.testing.assert_array_equal(out[:, left:left + width, 1],
                                          ag.depth_to_strip(depth[:, left:left + width], True, 10.0))
    assert 0.2 < hits / 800 < 0.3
    none = ag.AugmentConfig(crop_size=None, flip=False, photometric=False, cutdepth="none")
    assert all(ag.augment(image, depth, none, np.random.default_rng(s), 0)[2]["cutdepth"] is None
               for s in range(20))


def test_flip_and_crop_move_image_and_depth_together():
    image, depth = _example()
    cfg = ag.AugmentConfig(crop_size=(48, 40), cutdepth="none", photometric=False)
    flips = set()
    for s in range(40):
        out, d, params = ag.augment(image, depth, cfg, np.random.default_rng(s), position=1)
        top, left = params["crop"]
        assert top == 0 and 0 <= left <= 24 and out.shape == (48, 40, 3) and d.shape == (48, 40)
        src_i, src_d = (image[:, ::-1], depth[:, ::-1]) if params["flip"] else (image, depth)
        np.testing.assert_array_equal(out, src_i[:, left:left + 40])
        np.testing.assert_array_equal(d, src_d[:, left:left + 40])
        flips.add(params["flip"])
    assert flips == {True, False}


def test_random_resize_shapes_and_interpolation():
    # mmcv RandomResize((768,512), keep_ratio) on 480x640: the short side goes to int(512 r),
    # the long side rounds half up.
    assert ag.random_resize_shape(480, 640, 1.0, (768, 512)) == (512, 683)
    assert ag.random_resize_shape(480, 640, 0.8, (768, 512)) == (409, 545)  # int(768*.8), int(512*.8) first
    assert ag.random_resize_shape(480, 640, 1.5, (768, 512)) == (768, 1024)
    image, depth = _example(30, 40)
    depth[:, :20] = 0.0
    img2, dep2 = ag.resize(image, depth, (45, 60))
    assert img2.shape == (45, 60, 3) and dep2.shape == (45, 60)
    assert set(np.unique(dep2)) <= set(np.unique(depth))  # nearest: no invented depth values
    cfg = ag.AugmentConfig.mmseg_512()
    big_i, big_d = _example(480, 640, 2)
    shapes = set()
    for s in range(6):
        out, d, params = ag.augment(big_i, big_d, cfg, np.random.default_rng(s), position=0)
        assert out.shape == (512, 512, 3) and d.shape == (512, 512)
        shapes.add(params["resize"])
        h, w = params["resize"]
        if h < 512:  # ratio < 1: padded with black / invalid below the resized content
            assert (d[h:] == 0).all() and (out[h:] == 0).all()
    assert len(shapes) > 1


def test_augment_is_deterministic_given_seed_and_differs_across_seeds():
    image, depth = _example(48, 64, 5)
    for cfg in (ag.AugmentConfig(crop_size=(48, 48)), ag.AugmentConfig(crop_size=(32, 32), cutdepth="mmseg"),
                dataclasses.replace(ag.AugmentConfig.mmseg_512(), crop_size=(40, 40), resize_scale=(96, 64))):
        a = ag.augment(image, depth, cfg, np.random.default_rng([7, 3]), position=0)
        b = ag.augment(image, depth, cfg, np.random.default_rng([7, 3]), position=0)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        outs = {ag.augment(image, depth, cfg, np.random.default_rng([s]), 1)[0].tobytes() for s in range(8)}
        assert len(outs) > 4


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="cutdepth"):
        ag.AugmentConfig(cutdepth="sometimes")
    assert ag.AugmentConfig.official_480().cutdepth == "official"
    assert ag.AugmentConfig.mmseg_480().cutdepth == "mmseg"
    m = ag.AugmentConfig.mmseg_512()
    assert m.crop_size == (512, 512) and m.random_resize and m.resize_ratio_range == (0.8, 1.5)


def test_recipe_equals_the_reference_order_step_by_step():
    """CutDepth on the full image, then flip, then crop, then photometric (the references' order), rebuilt
    from the returned parameters; the implementation pastes the strip after the crop for speed."""
    image, depth = _example(48, 64, 9)
    for cfg in (ag.AugmentConfig(crop_size=(48, 40)), ag.AugmentConfig(crop_size=(40, 24), cutdepth="mmseg")):
        fired = 0
        for s in range(60):
            out, d, p = ag.augment(image, depth, cfg, np.random.default_rng(s), position=s)
            ref_i, ref_d = image, depth
            if p["cutdepth"] is not None:
                fired += 1
                ref_i = ag.apply_cutdepth(ref_i, ref_d, *p["cutdepth"])
            if p["flip"]:
                ref_i, ref_d = ref_i[:, ::-1], ref_d[:, ::-1]
            top, left = p["crop"]
            ch, cw = cfg.crop_size
            ref_i, ref_d = ref_i[top:top + ch, left:left + cw], ref_d[top:top + ch, left:left + cw]
            ref_i = ag.apply_photometric(np.ascontiguousarray(ref_i), p["photometric"])
            np.testing.assert_array_equal(out, ref_i)
            np.testing.assert_array_equal(d, ref_d)
        assert fired > 5
