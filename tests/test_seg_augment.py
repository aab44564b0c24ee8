"""ADE20K augmentations against mmsegmentation's own transforms fed the very same random draws (exact uint8
equality), cat_max_ratio behaviour, determinism, and the grain loaders (exact resume, eval order and sizes)."""

from __future__ import annotations

import numpy as np
import pytest

from vpd_jax.data import prepare, seg_loader, segmentation
from vpd_jax.data import seg_augment as sa


class Recorder:
    """A numpy Generator that records every draw, so that the same values can be fed to mmseg."""

    def __init__(self, seed):
        self._rng = np.random.default_rng(seed)
        self.log = {"random": [], "integers": [], "uniform": []}

    def random(self):
        v = self._rng.random()
        self.log["random"].append(v)
        return v

    def integers(self, low, high):
        v = int(self._rng.integers(low, high))
        self.log["integers"].append((low, high, v))
        return v

    def uniform(self, low, high):
        v = float(self._rng.uniform(low, high))
        self.log["uniform"].append((low, high, v))
        return v


@pytest.fixture
def scripted_numpy(monkeypatch):
    """Replaces numpy's global draws (what mmseg/mmcv transforms use) by a script taken from a Recorder; every
    call's bounds are checked against ours, so the sampling semantics must match too."""

    def install(rec: Recorder):
        q = {k: list(v) for k, v in rec.log.items()}

        def random_sample(*a):
            assert not a
            return q["random"].pop(0)

        def randint(low, high=None):
            if high is None:
                low, high = 0, low
            lo, hi, v = q["integers"].pop(0)
            assert (lo, hi) == (low, high), ((lo, hi), (low, high))
            return v

        def uniform(low, high):
            lo, hi, v = q["uniform"].pop(0)
            assert (lo, hi) == (low, high), ((lo, hi), (low, high))
            return v

        def choice(options, p):  # mmcv RandomFlip: ['horizontal', None] with p [prob, 1 - prob]
            return options[0] if q["random"].pop(0) < p[0] else options[-1]

        for name, fn in (("random_sample", random_sample), ("randint", randint), ("uniform", uniform),
                         ("choice", choice)):
            monkeypatch.setattr(np.random, name, fn)
        return q

    return install


@pytest.fixture(scope="module")
def mm():
    pytest.importorskip("torch")
    from reference.torch_training import import_mmseg

    import_mmseg()
    from mmcv.transforms import Pad, RandomFlip, RandomResize
    from mmseg.datasets.transforms import PhotoMetricDistortion, RandomCrop

    return {"RandomResize": RandomResize, "RandomCrop": RandomCrop, "RandomFlip": RandomFlip,
            "PhotoMetricDistortion": PhotoMetricDistortion, "Pad": Pad}


def _scene(i, h=48, w=64):
    from vpd_jax.data import synthetic

    sc = synthetic.generate_scene(0, i, 0, h, w)
    label = sc.label.copy()
    label[: h // 5] = 255
    return sc.image, label


def _mm_pipeline(mm, cfg: sa.SegAugmentConfig):
    return [mm["RandomResize"](scale=cfg.scale, ratio_range=cfg.ratio_range, keep_ratio=True),
            mm["RandomCrop"](crop_size=cfg.crop_size, cat_max_ratio=cfg.cat_max_ratio),
            mm["RandomFlip"](prob=cfg.flip_prob, direction="horizontal"),
            mm["PhotoMetricDistortion"](),
            mm["Pad"](size=cfg.crop_size[::-1], pad_val=dict(img=0, seg=255))]


@pytest.mark.parametrize("cfg", [sa.SegAugmentConfig(), sa.SegAugmentConfig(crop_size=(96, 80), scale=(160, 64))],
                         ids=["ade_512", "small"])
def test_whole_pipeline_equals_mmseg_for_the_same_draws(mm, scripted_numpy, cfg):
    modes = set()
    for seed in range(10):
        image, label = _scene(seed % 4)
        rec = Recorder(seed)
        out_img, out_lab, params = sa.seg_augment(image, label, cfg, rec)
        modes.add(params["photometric"].mode)
        q = scripted_numpy(rec)
        results = {"img": np.ascontiguousarray(image[..., ::-1]), "gt_seg_map": label.copy(),
                   "seg_fields": ["gt_seg_map"], "img_shape": image.shape[:2], "ori_shape": image.shape[:2]}
        for t in _mm_pipeline(mm, cfg):
            results = t(results)
        assert all(not v for v in q.values()), q  # mmseg consumed exactly our draws
        np.testing.assert_array_equal(out_img, results["img"][..., ::-1])
        np.testing.assert_array_equal(out_lab, results["gt_seg_map"])
        assert out_img.shape == (*cfg.crop_size, 3) and out_lab.shape == cfg.crop_size
        h, w = params["image_hw"]
        assert (out_lab[h:] == 255).all() and (out_lab[:, w:] == 255).all() and (out_img[h:] == 0).all()
    assert modes == {0, 1}


def test_photometric_equals_mmseg_for_every_branch(mm, monkeypatch):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    img[:4, :4] = 128  # grey, black and white pixels
    img[4:8, :4] = 0
    img[8:12, :4] = 255
    pmd = mm["PhotoMetricDistortion"]()
    cases = [sa.PhotoParams(b, m, c, s, h) for b in (None, -31.7, 20.25) for m in (0, 1) for c in (None, 0.55, 1.49)
             for s in (None, 0.5, 1.3) for h in (None, -18, 17, 5)]
    for p in cases:
        ints = [int(p.brightness is not None), p.mode]
        unis = [] if p.brightness is None else [p.brightness]
        if p.mode == 1:
            ints.append(int(p.contrast is not None))
            unis += [] if p.contrast is None else [p.contrast]
        ints.append(int(p.saturation is not None))
        unis += [] if p.saturation is None else [p.saturation]
        ints.append(int(p.hue is not None))
        ints += [] if p.hue is None else [p.hue]
        if p.mode == 0:
            ints.append(int(p.contrast is not None))
            unis += [] if p.contrast is None else [p.contrast]
        monkeypatch.setattr(np.random, "randint", lambda *a, q=ints: q.pop(0))
        monkeypatch.setattr(np.random, "uniform", lambda *a, q=unis: q.pop(0))
        ref = pmd({"img": np.ascontiguousarray(img[..., ::-1])})["img"][..., ::-1]
        assert not ints and not unis
        np.testing.assert_array_equal(sa.apply_photometric(img, p), ref, err_msg=str(p))


def test_sampled_photometric_ranges():
    rng = np.random.default_rng(0)
    draws = [sa.sample_photometric(rng) for _ in range(3000)]
    b = np.array([d.brightness for d in draws if d.brightness is not None])
    c = np.array([d.contrast for d in draws if d.contrast is not None])
    h = np.array([d.hue for d in draws if d.hue is not None])
    assert abs(len(b) / 3000 - 0.5) < 0.04 and abs(len(c) / 3000 - 0.5) < 0.04
    assert -32 <= b.min() and b.max() <= 32 and 0.5 <= c.min() and c.max() <= 1.5
    assert h.min() == -18 and h.max() == 17  # numpy randint(-18, 18), as mmseg draws it
    assert abs(np.mean([d.mode for d in draws]) - 0.5) < 0.04


def test_cat_max_ratio_redraws_dominated_crops():
    label = np.zeros((40, 40), np.uint8)  # class 0 everywhere ...
    label[:, 30:] = 1  # ... but a strip of class 1 on the right
    label[:20, :20] = 255  # ignored pixels do not count
    rng = np.random.default_rng(0)
    accepted = redrawn = 0
    for _ in range(200):
        top, left, drawn = sa.sample_crop(rng, label, (10, 10), 0.75)
        crop = label[top:top + 10, left:left + 10]
        if sa.crop_ok(crop, 0.75):
            accepted += 1
            redrawn += len(drawn) > 1
        else:
            assert len(drawn) == 11  # gave up after 10 redraws: the 11th crop is kept
    assert accepted > 150 and redrawn > 100
    # ignore_index excluded: 60 of class 0 + 40 ignored is one class (rejected); 2 classes at 60/40 pass.
    crop = np.full((10, 10), 255, np.uint8)
    crop[:6] = 0
    assert not sa.crop_ok(crop, 0.75)
    crop[6:] = 1
    assert sa.crop_ok(crop, 0.75)
    crop[:8] = 0
    assert not sa.crop_ok(crop, 0.75)  # 80% >= 75%
    crop = np.zeros((4, 4), np.uint8)
    crop[3] = 1
    assert not sa.crop_ok(crop, 0.75)  # exactly 75%: mmseg needs strictly less
    # cat_max_ratio 1: a single draw, whatever the content
    assert len(sa.sample_crop(rng, np.zeros((40, 40), np.uint8), (10, 10), 1.0)[2]) == 1


def test_deterministic_and_normalize():
    image, label = _scene(1)
    cfg = sa.SegAugmentConfig(crop_size=(64, 64), scale=(256, 64))
    a = sa.seg_augment(image, label, cfg, np.random.default_rng(5))
    b = sa.seg_augment(image, label, cfg, np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    x = sa.normalize(np.full((2, 4, 5, 3), 255, np.uint8), np.array([[2, 3], [4, 5]]))
    assert x[0, :2, :3].min() == 1.0 and (x[0, 2:] == 0).all() and (x[0, :, 3:] == 0).all() and x[1].min() == 1.0
    assert sa.rescale_shape(512, 683, (2048, 512)) == (512, 683)
    assert sa.rescale_shape(300, 400, (2048, 512)) == (512, 683)
    assert sa.rescale_shape(100, 1000, (2048, 512)) == (205, 2048)  # long side bound


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("segdata")
    rc = prepare.main(["--source", "synthetic_seg", "--num_train", "6", "--num_test", "3", "--height", "40",
                       "--width", "56", "--frames_per_scene", "2", "--data_dir", str(d)])
    assert rc == 0
    return str(d)


def test_train_loader_resumes_exactly(seg_data):
    aug = sa.SegAugmentConfig(crop_size=(32, 32), scale=(128, 32))
    kw = dict(dataset="ade20k_vpd/synthetic", global_batch_size=2, seed=3, aug=aug, read_threads=1)
    it = seg_loader.make_seg_train_loader(seg_data, **kw)
    first = next(it)
    state = it.get_state()
    rest = [next(it) for _ in range(4)]  # crosses the epoch boundary (3 steps per epoch)
    assert first["image"].shape == (2, 32, 32, 3) and first["label"].shape == (2, 32, 32)
    assert first["image_hw"].shape == (2, 2) and first["valid"].all()
    it2 = seg_loader.make_seg_train_loader(seg_data, **kw)
    it2.set_state(state)
    for a in rest:
        b = next(it2)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other = seg_loader.make_seg_train_loader(seg_data, **{**kw, "seed": 4})
    with pytest.raises(ValueError, match="different settings"):
        other.set_state(state)
    assert set(np.unique(np.concatenate([r["label"] for r in rest]))) <= {0, 3, 5, 24, 41, 42, 119, 255}


def test_eval_loader_every_example_once_resized_with_original_labels(seg_data):
    from vpd_jax.data import loader

    try:
        import mmcv
    except ImportError:
        mmcv = None

    src = loader.open_source(seg_data, "ade20k_vpd/synthetic", "validation")
    stored = [seg_loader.decode_seg_record(src[i]) for i in range(len(src))]
    one = list(seg_loader.make_seg_eval_loader(seg_data, dataset="ade20k_vpd/synthetic", read_threads=1))
    assert len(one) == 3
    for batch, ex in zip(one, stored):
        assert batch["image"].shape == (1, 512, 717, 3)  # 40x56 -> short side 512, 56 * 12.8 = 716.8 -> 717
        if mmcv is not None:  # VPD's test Resize((2048, 512), keep_ratio=True)
            ref = mmcv.imrescale(ex["image"][..., ::-1], (2048, 512), interpolation="bilinear")[..., ::-1]
            np.testing.assert_array_equal(batch["image"][0], ref)
        np.testing.assert_array_equal(batch["label"][0], ex["label"])
        assert batch["file_name"][0] == ex["file_name"] and batch["valid"].all()
    # Two hosts, batch 2: contiguous blocks, padded with invalid slots.
    got = []
    for p in range(2):
        ld = seg_loader.make_seg_eval_loader(seg_data, dataset="ade20k_vpd/synthetic", batch_size=2,
                                             process_index=p, process_count=2, pad_shape=(512, 2048),
                                             read_threads=1)
        batches = list(ld)
        assert len(batches) == ld.num_batches == 1
        for b in batches:
            assert b["image"].shape == (2, 512, 2048, 3)
            got += [str(n) for n, v in zip(b["file_name"], b["valid"]) if v]
            np.testing.assert_array_equal(b["label_hw"][b["valid"]], [[40, 56]] * int(b["valid"].sum()))
    assert got == [e["file_name"] for e in stored]
    with pytest.raises(Exception, match="not a segmentation dataset"):
        seg_loader.make_seg_eval_loader(seg_data, dataset="nyu_vpd/synthetic")


def test_synthetic_labels_are_named_ade_classes():
    from vpd_jax.data import synthetic

    for name, idx in synthetic.SURFACE_CLASSES.items():
        assert segmentation.ADE20K_CLASSES[idx] == name


def test_depth_loaders_refuse_segmentation_datasets(seg_data):
    from vpd_jax.data import loader

    with pytest.raises(Exception, match="holds segmentation labels, not depth"):
        loader.make_eval_loader(seg_data, dataset="ade20k_vpd/synthetic", split="validation", batch_size=1)
