"""``predict.py`` and ``vpd_jax.Predictor``: any size, outputs and their units, windows, scenes, the CLI.

The model is ``VPDConfig.tiny`` narrowed further (4 UNet levels of 32 channels, an 8-channel VAE, one layer per
block) with random weights drawn in numpy, saved with ``save_converted`` and trained crop 64. On 2 shared CPU
cores its one compile (windows of 64x64, 8 per call) takes ~40 s and a 64x64 window ~20 ms, so the sizes users
send (333x517, 480x640, 1024x768) run at their own resolution through the real model. Window placement
at the released models' 480 crop and stride 160 is checked against the evaluator's TTA with a cheap stand-in
model, which can afford every window.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vpd_jax import visualize as vis
from vpd_jax.evaluation import tta
from vpd_jax.inference import Outputs, Predictor, gather_inputs, load_image, predict_files, working_size
from vpd_jax.models.vpd import VPDConfig
from vpd_jax.weights.testing import micro_config, save_micro_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
CROP = 64
# (H, W) of an odd-sized photo, NYU's frame and a large photo; "1024x768" is a landscape 1024 wide.
SIZES = {"odd": (333, 517), "nyu": (480, 640), "big": (768, 1024)}


def rand_image(h, w, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    # Smooth content plus noise: a picture the windows disagree about a little, not pure noise.
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 100 * np.sin(xx / 23.0 + seed)[..., None] * np.cos(yy / 31.0)[..., None]
    img = base + rng.normal(0, 20, (h, w, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img if channels == 3 else img[..., 0]


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return save_micro_checkpoint(tmp_path_factory.mktemp("ckpt") / "micro")


@pytest.fixture(scope="session")
def predictor(ckpt_dir):
    return Predictor.from_checkpoint(ckpt_dir, crop=CROP, stride=CROP, batch_size=8)


def variant(p: Predictor, **kw) -> Predictor:
    """A copy with other settings that shares the compiled forward and the device weights."""
    q = copy.copy(p)
    for k, v in kw.items():
        setattr(q, k, v)
    return q


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    h, w = SIZES["odd"]
    # Stored sideways with EXIF orientation 6 ("rotate 90 clockwise to view"): displayed 333 high, 517 wide.
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(rand_image(h, w, 1), k=1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(d / "odd_exif.jpg", exif=exif, quality=100, subsampling=0)
    Image.fromarray(rand_image(*SIZES["nyu"], 2)).save(d / "nyu.png")
    (d / "sub").mkdir()
    Image.fromarray(rand_image(*SIZES["big"], 3)).save(d / "sub" / "big.webp", quality=90)
    Image.fromarray(rand_image(100, 150, 4, channels=1), mode="L").save(d / "gray.bmp")
    rgba = np.concatenate([rand_image(90, 120, 5), np.full((90, 120, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba, mode="RGBA").save(d / "sub" / "rgba.tiff")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (d / "notes.txt").write_text("not an image; ignored when the folder is searched")
    return d


EXPECTED = {  # output stem -> (H, W) as displayed
    "odd_exif": SIZES["odd"], "nyu": SIZES["nyu"], "sub/big": SIZES["big"], "gray": (100, 150),
    "sub/rgba": (90, 120),
}


# ------------------------------------------------------------------------------------- windows and sizes

class StandIn:
    """A cheap jittable "model" whose output depends on content and on position inside the window."""

    config = types.SimpleNamespace(text_dim=4)

    def apply(self, variables, x, text_embeddings=None):
        h, w = x.shape[1:3]
        pos = 0.003 * jnp.arange(w)[None, None, :] + 0.002 * jnp.arange(h)[None, :, None]
        return 1.0 + x.mean(-1) / 255.0 + pos + 0 * jnp.sum(text_embeddings)


def stand_in(**kw) -> Predictor:
    return Predictor(StandIn(), {"constants": {"class_embeddings": np.zeros((28, 4), np.float32)}}, **kw)


def stand_in_fn(images, class_ids):
    return StandIn().apply(None, jnp.asarray(images, jnp.float32), jnp.zeros(4))


@pytest.mark.parametrize("hw", [(480, 640), (768, 1024), (600, 480), (480, 480)])
def test_slide_windows_are_the_evaluators(hw):
    img = rand_image(*hw, seed=7)
    got = stand_in(crop=480, batch_size=3).predict(img)  # stride 480 // 3 = 160: the official 0 / 160 on 640
    want = tta.mmseg_slide_flip(stand_in_fn, img[None].astype(np.float32), np.zeros(1), crop=(480, 480),
                                stride=(160, 160))[0]
    assert got.shape == hw and got.dtype == np.float32
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-6, atol=1e-6)
    if hw == (480, 640):  # and the official shift-window test (wl-zhao/VPD depth/test.py)
        official = tta.official_tta(stand_in_fn, img[None].astype(np.float32), np.zeros(1))[0]
        np.testing.assert_allclose(got, np.asarray(official), rtol=1e-6, atol=1e-6)


def test_small_images_are_upscaled_to_the_crop_and_back():
    h, w = SIZES["odd"]
    img = rand_image(h, w, seed=8)
    assert working_size(h, w, 480, "slide") == (480, 745)
    got = stand_in(crop=480).predict(img)
    up = tta.resize_bilinear(img[None].astype(np.float32), (480, 745))
    want = tta.resize_bilinear(tta.mmseg_slide_flip(stand_in_fn, up, np.zeros(1), crop=(480, 480),
                                                    stride=(160, 160)), (h, w))[0]
    assert got.shape == (h, w)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)


def test_resize_mode_brings_the_short_side_to_the_crop():
    assert working_size(768, 1024, 480, "resize") == (480, 640)
    assert working_size(1024, 768, 480, "resize") == (640, 480)
    assert working_size(480, 640, 480, "resize") == (480, 640)
    assert working_size(200, 2000, 480, "resize") == (480, 4800)
    out = stand_in(crop=480, mode="resize").predict(rand_image(768, 1024))
    assert out.shape == (768, 1024)


def test_batch_of_equal_images_equals_one_by_one():
    p = stand_in(crop=96, batch_size=5)
    imgs = [rand_image(100, 230, seed=s) for s in range(3)]
    batch = p.predict_batch(imgs)
    for img, d in zip(imgs, batch, strict=True):
        np.testing.assert_allclose(d, p.predict(img), rtol=1e-6)
    with pytest.raises(ValueError, match="differ in size"):
        p.predict_batch([imgs[0], rand_image(50, 60)])


# ------------------------------------------------------------------------------------- the real model

def test_one_window_equals_a_direct_forward_pass(predictor):
    img = rand_image(CROP, CROP, seed=11)
    direct = predictor.forward([img, img[:, ::-1]])
    np.testing.assert_array_equal(variant(predictor, flip=False).predict(img), direct[0])
    np.testing.assert_allclose(predictor.predict(img), (direct[0] + direct[1][:, ::-1]) / 2, rtol=1e-6)
    # The conditioning is the table's mean row: what the model itself uses for class id None / -1.
    table = predictor.variables["constants"]["class_embeddings"]
    np.testing.assert_allclose(predictor.embedding, np.asarray(table)[-1])


def test_scene_class_selects_its_row(ckpt_dir, predictor):
    kitchen = Predictor.from_checkpoint(ckpt_dir, crop=CROP, stride=CROP, batch_size=8, scene="kitchen")
    table = np.asarray(predictor.variables["constants"]["class_embeddings"])
    np.testing.assert_array_equal(kitchen.embedding, table[6])
    # Predicting through the session predictor's compiled forward with the kitchen row (no second compile).
    img = rand_image(CROP, CROP + 10, seed=12)
    as_kitchen = variant(predictor, embedding=kitchen.embedding, _embedding=jnp.asarray(kitchen.embedding))
    assert np.abs(as_kitchen.predict(img) - predictor.predict(img)).max() > 1e-4
    with pytest.raises(ValueError, match="unknown NYU scene class"):
        Predictor.from_checkpoint(ckpt_dir, crop=CROP, scene="garage")
    with pytest.raises(ValueError, match="CLIP"):
        Predictor.from_checkpoint(ckpt_dir, crop=CROP, prompt="a photo of a garage")


def test_prompt_is_embedded_by_clip(ckpt_dir, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from reference.torch_clip import tiny_config, torch_text_model, write_tokenizer
    from vpd_jax.text import TextEncoder

    clip = tmp_path / "clip"
    vocab = write_tokenizer(clip)
    torch_text_model(tiny_config(vocab), seed=3).save_pretrained(clip)  # hidden size 32 = the model's text_dim
    p = Predictor.from_checkpoint(ckpt_dir, crop=CROP, prompt="a photo of a garage", clip=clip)
    want = TextEncoder.from_pretrained(clip).embed(["a photo of a garage"])[0]
    np.testing.assert_allclose(p.embedding, want, rtol=1e-6)
    assert "garage" in str(p.scene)


def test_gray_rgba_and_float_inputs(predictor):
    rgb = rand_image(70, 90, seed=13)
    want = predictor.predict(rgb[..., :1].repeat(3, -1))
    np.testing.assert_allclose(predictor.predict(rgb[..., 0]), want, rtol=1e-6)
    np.testing.assert_allclose(predictor.predict(rgb[..., :1]), want, rtol=1e-6)
    rgba = np.concatenate([rgb, np.zeros((70, 90, 1), np.uint8)], -1)
    np.testing.assert_allclose(predictor.predict(rgba), predictor.predict(rgb), rtol=1e-6)
    np.testing.assert_allclose(predictor.predict(rgb.astype(np.float32)), predictor.predict(rgb), rtol=1e-6)


@pytest.fixture(scope="session")
def written(predictor, images_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    warnings = []
    outputs = Outputs(png16=True, npy=True, color=True, colorbar=True, ply=True)
    summary = predict_files(predictor, [str(images_dir)], out, outputs, progress=False, log=warnings.append)
    return out, summary, warnings


def test_every_image_gets_its_outputs_at_its_size(written, images_dir):
    out, summary, warnings = written
    assert summary.written == len(EXPECTED) and summary.files == 4 * len(EXPECTED)
    assert [name for name, _ in summary.skipped] == [str(images_dir / "broken.jpg")]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0] and "\n" not in warnings[0]
    for stem, (h, w) in EXPECTED.items():
        with Image.open(out / f"{stem}_depth.png") as im:
            assert im.mode == "I;16" and im.size == (w, h), stem
            mm = np.asarray(im)
        depth = np.load(out / f"{stem}_depth.npy")
        assert depth.dtype == np.float32 and depth.shape == (h, w)
        assert np.isfinite(depth).all() and (depth > 0).all() and (depth < 10).all()
        assert depth.max() - depth.min() > 0.05, "the test model should give varied depth"
        # 1 mm units: the PNG is the .npy rounded to millimetres.
        assert np.abs(mm.astype(np.float64) / 1000 - depth).max() <= 0.0005 + 1e-6
        np.testing.assert_array_equal(mm, np.rint(depth.astype(np.float64) * 1000).astype(np.uint16))
        with Image.open(out / f"{stem}_depth_color.png") as im:
            assert im.mode == "RGB" and im.size[1] == h and im.size[0] > w  # with its colour bar
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert not leftovers, "temporary files left behind"


def test_point_cloud_has_every_valid_pixel_at_its_place(written, images_dir):
    out, _, _ = written
    h, w = SIZES["nyu"]
    depth = np.load(out / "nyu_depth.npy")
    v = vis.read_ply(out / "nyu.ply")
    assert len(v) == vis.valid_mask(depth).sum() == h * w
    fx, fy, cx, cy = vis.NYU_INTRINSICS  # 480x640: NYU's own
    for r, c in [(0, 0), (240, 320), (479, 639), (100, 500)]:
        i = r * w + c
        z = depth[r, c]
        assert v["z"][i] == pytest.approx(z)
        assert v["x"][i] == pytest.approx((c - cx) * z / fx, rel=1e-5, abs=1e-6)
        assert v["y"][i] == pytest.approx((r - cy) * z / fy, rel=1e-5, abs=1e-6)
    img = np.asarray(Image.open(images_dir / "nyu.png"))
    assert (v["red"][240 * w + 320], v["green"][240 * w + 320]) == tuple(img[240, 320, :2])


def test_exif_orientation_is_applied(images_dir):
    img = load_image(images_dir / "odd_exif.jpg")
    assert img.shape == (*SIZES["odd"], 3)
    ref = rand_image(*SIZES["odd"], 1).astype(np.float32)
    assert np.abs(img.astype(np.float32) - ref).mean() < 6  # JPEG loss only: upright, not rotated
    assert load_image(images_dir / "gray.bmp").shape == (100, 150, 3)
    assert load_image(images_dir / "sub" / "rgba.tiff").shape == (90, 120, 3)


def test_skip_existing_and_nothing_lost(predictor, written, images_dir):
    out, _, _ = written
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    outputs = Outputs(png16=True, npy=True, color=True, colorbar=True, ply=True)
    s = predict_files(predictor, [str(images_dir)], out, outputs, skip_existing=True, progress=False,
                      log=lambda m: None)
    assert s.existing == len(EXPECTED) and s.written == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_gather_inputs(tmp_path, images_dir):
    out = images_dir / "out_inside"  # an output folder inside the input folder is never read back
    out.mkdir(exist_ok=True)
    Image.fromarray(rand_image(8, 8)).save(out / "old_depth.png")
    files, missing = gather_inputs([str(images_dir), str(images_dir / "nyu.png"), str(images_dir / "*.bmp"),
                                    str(tmp_path / "nothing*.jpg")], exclude=out)
    stems = [str(s) for _, s in files]
    assert sorted(stems) == sorted(["broken", "gray", "nyu", "odd_exif", "sub/big", "sub/rgba"])
    assert missing == [str(tmp_path / "nothing*.jpg")]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        Image.fromarray(rand_image(8, 8)).save(tmp_path / d / "x.png")
    files, _ = gather_inputs([str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png")])
    assert [str(s) for _, s in files] == ["x", "x_1"]
    out.joinpath("old_depth.png").unlink()
    out.rmdir()


# ------------------------------------------------------------------------------------- entry points

def test_cli_end_to_end(ckpt_dir, images_dir, tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(ROOT / ".jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(ckpt_dir), "--output", str(out),
           "--input", str(images_dir / "gray.bmp"), str(images_dir / "sub" / "*.tiff"), str(images_dir / "broken.jpg"),
           "--crop", str(CROP), "--stride", str(CROP), "--batch_size", "8", "--mode", "resize", "--scene", "kitchen",
           "--png16", "--npy", "--colorbar", "--ply", "--fx", "100", "--fy", "100", "--cx", "45", "--cy", "40",
           "--no_progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kitchen" in r.stderr
    assert "2 image(s) written (8 files)" in r.stderr and "1 skipped" in r.stderr
    assert sum("broken.jpg" in line and "warning" in line for line in r.stderr.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}{suffix}" for s in ("gray", "rgba")
        for suffix in ("_depth.png", "_depth.npy", "_depth_color.png", ".ply"))
    d = np.load(out / "rgba_depth.npy")
    assert d.shape == (90, 120)
    v = vis.read_ply(out / "rgba.ply")
    assert len(v) == d.size
    assert v["x"][0] == pytest.approx((0 - 45) * d[0, 0] / 100, rel=1e-5)
    bad = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(ckpt_dir), "--output",
                          str(out), "--input", "x.png", "--fx", "1"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--fx --fy --cx --cy" in bad.stderr


def test_import_stays_light_and_exports_predictor():
    code = ("import sys, vpd_jax; assert 'jax' not in sys.modules, 'import vpd_jax pulled in jax'; "
            "from vpd_jax.inference import Predictor; assert vpd_jax.Predictor is Predictor; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_workdir_uses_its_best_or_latest_converted_checkpoint(ckpt_dir, tmp_path):
    import shutil

    from vpd_jax.weights.common import WeightsError
    from vpd_jax.weights.loader import find_converted, load_model

    wd = tmp_path / "workdir"
    for step in ("100", "300"):
        shutil.copytree(ckpt_dir, wd / step)
    (wd / "20").mkdir()  # a step folder that is not a converted checkpoint
    assert find_converted(wd) == wd / "300"
    shutil.copytree(ckpt_dir, wd / "best")
    assert find_converted(wd) == wd / "best"
    (wd / "config.json").write_text(json.dumps({"aug": {"crop_size": [96, 96]}}))
    loaded = load_model(wd)
    assert loaded.crop == 96 and loaded.model.config == micro_config()
    with pytest.raises(WeightsError, match="neither"):
        load_model(tmp_path / "workdir" / "20")


def test_converted_meta_is_ours(ckpt_dir):
    meta = json.loads((ckpt_dir / "config.json").read_text())
    assert VPDConfig.from_dict(meta["config"]) == micro_config()
