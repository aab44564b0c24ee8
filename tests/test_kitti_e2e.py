"""KITTI end to end: a generated KITTI tree (raw drives, sparse annotated depth, Eigen lists) prepared through the
CLI, ``configs/kitti_352.py`` trained for a few updates on the micro model with a one-prompt class table, and
evaluated by ``eval.py`` with the KITTI protocol (KB crop, Garg crop, 1e-3..80 m, 4 shifted windows + flip).
Subprocesses share the repo's persistent compile cache (.jax_cache)."""

import json

import numpy as np
import pytest

from vpd_jax.data import prepare
from vpd_jax.data import testing as dt

SMALL = [
    "--config=configs/kitti_352.py",
    "--config.model.size=micro",
    "--config.allow_random_init=True",
    "--config.train.global_batch_size=2",
    "--config.train.group_size=2",
    "--config.train.total_steps=2",
    "--config.optimizer.iters_per_epoch=1",
    "--config.optimizer.epochs=2",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.async_save=False",
    "--config.eval.every_steps=0",
    "--config.eval.batch_size=1",
    "--config.eval.num_pictures=1",
    "--config.log_every_steps=1",
]


@pytest.fixture(scope="module")
def kitti(tmp_path_factory):
    root = tmp_path_factory.mktemp("kitti")
    tree = dt.write_kitti_tree(str(root / "src"), frames_per_drive=2, other_size=(370, 1224))
    data = root / "data"
    assert prepare.main(["--source", "kitti", "--kitti_raw", tree.raw, "--kitti_depth", tree.depth,
                         "--train_list", tree.train_list, "--test_list", tree.test_list,
                         "--data_dir", str(data)]) == 0
    table = root / "kitti_scene.npy"
    np.save(table, np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32))
    (root / "kitti_scene.classes.json").write_text(json.dumps({"classes": ["street scene"]}))
    return root, tree, data, table


def test_kitti_recipe_trains_and_evaluates(kitti, run_script):
    root, tree, data, table = kitti
    wd = root / "wd"
    args = [*SMALL, f"--config.data_dir={data}", f"--config.class_embeddings={table}"]
    p = run_script("train.py", *args, f"--workdir={wd}")
    final = json.loads((wd / "eval" / "step_2.json").read_text())
    assert final["num_images"] == len(tree.test)
    assert np.isfinite(final["metrics"]["rmse"]) and final["metrics"]["rmse"] > 0
    classes = json.loads((wd / "classes.json").read_text())
    assert classes["classes"] == ["street scene"] and classes["class_rule"] == "single"
    assert json.loads((wd / "config.json").read_text())["model"]["num_classes"] == 1
    # The test list's lines with ground truth: images of 370x1224 (the second day), KB-cropped like the rest.
    assert f"on {len(tree.test)} images" in p.stdout

    out = root / "eval.json"
    e = run_script("eval.py", *args, f"--workdir={wd}", "--which=latest", f"--output={out}")
    res = json.loads(out.read_text())
    assert res["num_images"] == len(tree.test) and res["dataset"] == "kitti_vpd/eigen"
    for k in ("rmse", "abs_rel", "d1"):
        assert np.isfinite(res["metrics"][k])
    assert res["metrics"]["rmse"] == pytest.approx(final["metrics"]["rmse"], rel=1e-5)
    assert "error" not in e.stderr.lower()


def test_a_scene_without_a_row_is_one_error(kitti, run_script):
    root, _, data, table = kitti
    p = run_script("train.py", *SMALL, f"--config.data_dir={data}", f"--config.class_embeddings={table}",
             "--config.class_rule=scene", f"--workdir={root / 'wd_bad'}", check=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode != 0 and len(errors) == 1, p.stderr[-2000:]
    assert "2011_09_26_drive_0002_sync" in errors[0] and "scene_map" in errors[0]
    mapping = root / "map.json"
    mapping.write_text(json.dumps({"*": "street_scene"}))
    from configs import kitti_352
    from vpd_jax import build

    cfg = kitti_352.get_config()
    cfg.data_dir, cfg.class_embeddings, cfg.class_rule, cfg.scene_map = str(data), str(table), "scene", str(mapping)
    rule = build.class_rule(cfg)
    assert rule.rule == "scene" and rule.default == 0
