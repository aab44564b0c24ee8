"""Your own data end to end: a folder of image/depth pairs (per-scene folders) prepared through the CLI, a converted
VPD checkpoint (NYU's 27-class table) fine-tuned on it with ``configs/finetune_folder.py`` and a table of the
folders' own scene classes (``class_rule="scene"``), evaluated by ``eval.py``, and run by ``predict.py`` with each
image's folder as its scene. The micro model stands in for SD-1.5; subprocesses share .jax_cache."""

import json

import numpy as np
import pytest

from vpd_jax.data import catalog, prepare
from vpd_jax.data import testing as dt
from vpd_jax.models.vpd import VPDConfig
from vpd_jax.weights.testing import save_micro_checkpoint

H, W = 64, 96


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    src = root / "rooms"
    dt.write_depth_folder(str(src), layout="nested", num_images=12, height=H, width=W, frames_per_scene=3)
    data = root / "data"
    assert prepare.main(["--source", "folder", "--images", f"{src}/rgb/**/*.jpg", "--depths", f"{src}/depth/**/*.png",
                         "--depth_scale", "1000", "--val_fraction", "0.25", "--name", "rooms",
                         "--data_dir", str(data)]) == 0
    scenes = sorted({s for split in catalog.dataset_scenes(str(data), "depth_folder/rooms").values() for s in split})
    table = root / "my_scenes.npy"
    np.save(table, np.random.default_rng(1).standard_normal((len(scenes), 32)).astype(np.float32))
    (root / "my_scenes.classes.json").write_text(json.dumps({"classes": scenes}))
    released = save_micro_checkpoint(root / "converted", seed=3, crop=64, config=VPDConfig.micro())
    return root, src, data, table, scenes, released


def test_fine_tune_a_converted_checkpoint_on_a_folder(folder, run_script):
    root, src, data, table, scenes, released = folder
    wd = root / "wd"
    args = ["--config=configs/finetune_folder.py", "--config.model.size=micro", f"--config.data_dir={data}",
            "--config.dataset=depth_folder/rooms", f"--config.class_embeddings={table}", "--config.class_rule=scene",
            "--config.aug.crop_size=(64,64)", "--config.train.global_batch_size=4", "--config.train.group_size=2",
            "--config.train.total_steps=2", "--config.optimizer.warmup_steps=1", "--config.optimizer.decay_steps=2",
            "--config.checkpoint.async_save=False", "--config.eval.num_pictures=1", "--config.log_every_steps=1"]
    p = run_script("train.py", *args, f"--config.init_from={released}", f"--workdir={wd}")
    assert f"weights, BatchNorm statistics and class table from {released}" in p.stdout
    assert f"class table replaced by {table}" in p.stdout
    classes = json.loads((wd / "classes.json").read_text())
    assert classes["classes"] == scenes and classes["class_rule"] == "scene"
    assert classes["scene_rows"] == {s: i for i, s in enumerate(scenes)}
    final = json.loads((wd / "eval" / "step_2.json").read_text())
    assert final["num_images"] == 3 and np.isfinite(final["metrics"]["rmse"])  # 25% of 12 in val

    e = run_script("eval.py", *args, f"--workdir={wd}", "--which=latest", f"--output={root / 'eval.json'}")
    res = json.loads((root / "eval.json").read_text())
    assert res["split"] == "val" and res["num_images"] == 3
    assert res["metrics"]["rmse"] == pytest.approx(final["metrics"]["rmse"], rel=1e-5), e.stdout

    out = root / "pred"
    p = run_script("predict.py", "--checkpoint", f"{wd}:latest", "--input", str(src / "rgb"), "--output", str(out),
             "--scene_from", "parent", "--npy", "--no_progress")
    assert "done: 12 image(s) written" in p.stderr and "note:" not in p.stderr
    assert len(list(out.rglob("*_depth.npy"))) == 12
    # One scene by name gives the depth its folder did (alone in its batch here: within the batch-invariance
    # bound, 1e-5 m, of the batched run; measured 1 ulp).
    scene = scenes[0]
    one = root / "one"
    first = sorted((src / "rgb" / scene).iterdir())[0]
    run_script("predict.py", "--checkpoint", f"{wd}:latest", "--input", str(first), "--output", str(one),
         "--scene", scene.replace("_", " ").upper(), "--npy", "--no_progress")
    a = np.load(next(one.rglob("*_depth.npy")))
    b = np.load(next(p for p in out.rglob("*_depth.npy") if p.name.startswith(first.stem) and scene in str(p)))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    mean = root / "mean"
    run_script("predict.py", "--checkpoint", f"{wd}:latest", "--input", str(first), "--output", str(mean), "--npy",
         "--no_progress")
    assert np.abs(np.load(next(mean.rglob("*_depth.npy"))) - a).max() > 1e-3  # the scene row matters
    bad = run_script("predict.py", "--checkpoint", f"{wd}:latest", "--input", str(first), "--output", str(root / "x"),
               "--scene", "kitchen", check=False)
    assert bad.returncode == 2 and "not a class of the model's table" in bad.stderr and scenes[0] in bad.stderr
