"""Segmentation end to end: synthetic rooms with semantic labels prepared through the CLI, ``configs/ade20k_512.py``
trained for a few updates on the micro model (150 class tokens, cross-attention maps into a Semantic FPN), its
evaluation (sliding windows, mIoU over the split) at the end of training and from ``eval.py``, single and
multi-scale + flip. Subprocesses share the repo's persistent compile cache (.jax_cache)."""

import json

import numpy as np
import pytest

from vpd_jax.data import prepare

SMALL = [
    "--config=configs/ade20k_512.py",
    "--config.model.size=micro",
    "--config.allow_random_init=True",
    "--config.aug.crop_size=(64,64)",
    "--config.aug.resize_scale=(128,64)",
    "--config.train.global_batch_size=4",
    "--config.train.group_size=4",
    "--config.train.total_steps=3",
    "--config.optimizer.warmup_steps=1",
    "--config.checkpoint.every_steps=3",
    "--config.checkpoint.async_save=False",
    "--config.eval.every_steps=0",
    "--config.eval.seg_scale=()",
    "--config.eval.seg_crop=(64,64)",
    "--config.eval.seg_stride=(43,43)",
    "--config.eval.num_pictures=2",
    "--config.log_every_steps=1",
]


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("seg")
    assert prepare.main(["--source", "synthetic_seg", "--num_train", "8", "--num_test", "3", "--height", "64",
                         "--width", "96", "--data_dir", str(d / "data")]) == 0
    return d


def test_segmentation_recipe_trains_and_evaluates(seg_data, run_script):
    data, wd = seg_data / "data", seg_data / "wd"
    p = run_script("train.py", *SMALL, f"--config.data_dir={data}", "--config.dataset=ade20k_vpd/synthetic",
                   f"--workdir={wd}")
    assert "aAcc" in p.stdout and "mIoU" in p.stdout
    final = json.loads((wd / "eval" / "step_3.json").read_text())
    assert final["num_images"] == 3 and len(final["IoU"]) == 150
    m = final["metrics"]
    assert 0 <= m["mIoU"] <= 1 and 0 <= m["aAcc"] <= 1
    assert (wd / "pictures" / "step_3.png").is_file()
    assert json.loads((wd / "classes.json").read_text())["classes"][:3] == ["wall", "building", "sky"]
    assert json.loads((wd / "config.json").read_text())["model"]["num_classes"] == 150

    out = seg_data / "eval.json"
    run_script("eval.py", *SMALL, f"--config.data_dir={data}", "--config.dataset=ade20k_vpd/synthetic",
               f"--workdir={wd}", "--which=latest", f"--output={out}")
    res = json.loads(out.read_text())
    assert res["num_images"] == 3 and res["scales"] == [1.0] and res["flip"] is False
    assert res["metrics"]["mIoU"] == pytest.approx(m["mIoU"], abs=1e-12)

    ms = seg_data / "eval_ms.json"
    run_script("eval.py", *SMALL, f"--config.data_dir={data}", "--config.dataset=ade20k_vpd/synthetic",
               f"--workdir={wd}", "--which=latest", f"--output={ms}", "--config.eval.seg_scales=(0.75,1.0,1.25)",
               "--config.eval.seg_flip=True")
    res_ms = json.loads(ms.read_text())
    assert res_ms["scales"] == [0.75, 1.0, 1.25] and res_ms["flip"] is True
    assert np.isfinite(res_ms["metrics"]["aAcc"])


def test_predict_writes_class_maps(seg_data, run_script, tmp_path):
    wd = seg_data / "wd"
    if not (wd / "config.json").exists():
        pytest.skip("needs the trained workdir of test_segmentation_recipe_trains_and_evaluates")
    from PIL import Image

    from vpd_jax.data import testing as dt
    from vpd_jax.inference.segmenter import Segmenter

    images = tmp_path / "in"
    dt.write_depth_folder(str(images), layout="flat", depth_format="npy", num_images=2, height=64, width=96)
    out = tmp_path / "out"
    p = run_script("predict.py", "--checkpoint", f"{wd}:latest", "--input", str(images), "--output", str(out),
                   "--crop", "64", "--stride", "43", "--test_resize", "none", "--no_progress")
    assert "done: 2 image(s) segmented (6 files)" in p.stderr
    seg = Segmenter.from_checkpoint(f"{wd}:latest", crop=64, stride=43, scale=None)
    from vpd_jax import Predictor

    assert isinstance(Predictor.from_checkpoint(f"{wd}:latest"), Segmenter)  # one door for both tasks
    for jpg in sorted(images.glob("*.jpg")):
        raw = np.asarray(Image.open(out / f"{jpg.stem}_labels.png"))
        pal = Image.open(out / f"{jpg.stem}_classes.png")
        assert pal.mode == "P" and np.array_equal(np.asarray(pal), raw)
        np.testing.assert_array_equal(raw, seg.predict(np.asarray(Image.open(jpg).convert("RGB"))))
        assert np.asarray(Image.open(out / f"{jpg.stem}_overlay.png")).shape == (64, 96, 3)
    bad = run_script("predict.py", "--checkpoint", f"{wd}:latest", "--input", str(images), "--output",
                     str(tmp_path / "x"), "--scene", "kitchen", check=False)
    assert bad.returncode == 2 and "for depth models" in bad.stderr
