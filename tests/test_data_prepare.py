"""Preparing datasets from every on-disk layout (generated here at tiny sizes): BTS tree and list, the official
test tree, the labeled .mat + splits.mat, mmseg, synthetic (through the real CLI), the stock FastDepth build;
bad input (one-line messages, skip counts, --strict, nothing lost); the official lists when present."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from vpd_jax import scenes
from vpd_jax.data import catalog, loader, prepare, sources
from vpd_jax.data import testing as dt

H, W = 48, 64


def _read_all(data_dir, dataset, split):
    src = loader.open_source(data_dir, dataset, split)
    return [src[i] for i in range(len(src))]


@pytest.fixture(scope="module")
def bts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bts")
    sync = root / "sync"
    pairs = dt.write_bts_tree(str(sync), 6, H, W, seed=0)
    test_pairs = dt.write_bts_tree(str(root / "official_splits" / "test"), 3, H, W, seed=0, split="test")
    return root, sync, pairs, test_pairs


def test_bts_tree_and_official_test_tree(bts, tmp_path, capsys):
    root, sync, pairs, test_pairs = bts
    rc = prepare.main(["--source", "bts", "--bts_dir", str(sync), "--test_dir", str(root / "official_splits/test"),
                       "--data_dir", str(tmp_path), "--image_size", f"{H}x{W}"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "train 6, test 3 examples; skipped 0 bad pairs" in out
    train = _read_all(str(tmp_path), "nyu_vpd/bts", "train")
    assert [r["file_name"].decode() for r in train] == sorted(p[0] for p in pairs)
    for r in train:
        rgb = r["file_name"].decode()
        dep = rgb.replace("rgb_", "sync_depth_").replace(".jpg", ".png")
        ref_img = cv2.imread(str(sync / rgb))[..., ::-1]  # the reference's cv2.imread + BGR->RGB
        np.testing.assert_array_equal(r["image"], ref_img)
        mm = cv2.imread(str(sync / dep), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(r["depth"], mm.astype(np.float32) / 1000)
        scene_dir, base = rgb.split("/")
        assert r["scene"].decode() == scene_dir
        assert r["class_id"] == scenes.class_id_for_file(f"{scene_dir}_{base}", "official")
        flat = f"{scene_dir}_{base[4:]}"
        assert r["class_id_mmseg"] == scenes.class_id_for_file(flat, "mmseg")
    test = _read_all(str(tmp_path), "nyu_vpd/bts", "test")
    assert [r["file_name"].decode() for r in test] == sorted(p[0] for p in test_pairs)


def test_bts_list_with_bad_lines(bts, tmp_path, capsys):
    root, sync, pairs, _ = bts
    lst = tmp_path / "train_list.txt"
    chosen = [pairs[4], pairs[1], pairs[2]]
    dt.write_bts_list(str(lst), chosen)
    with open(lst, "a") as f:
        f.write("/kitchen_0099/rgb_00001.jpg /kitchen_0099/sync_depth_00001.png 518.8579\n")  # points nowhere
        f.write("only_one_column.jpg\n")
        f.write(f"/{pairs[4][0]} /{pairs[4][1]}\n")  # duplicate
    data = tmp_path / "data"
    rc = prepare.main(["--source", "bts", "--bts_dir", str(sync), "--train_list", str(lst),
                       "--data_dir", str(data), "--image_size", f"{H}x{W}"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "train 3 examples; skipped 3 bad pairs" in cap.out
    msgs = [ln for ln in cap.err.splitlines() if ln.startswith("skipped: ")]
    assert len(msgs) == 3
    assert f"{lst}:4: image {sync}/kitchen_0099/rgb_00001.jpg does not exist" in msgs[0]
    assert f"{lst}:5: expected" in msgs[1]
    assert "listed more than once" in msgs[2] and pairs[4][0] in msgs[2]
    train = _read_all(str(data), "nyu_vpd/bts", "train")
    assert [r["file_name"].decode() for r in train] == [p[0] for p in chosen]  # list order kept


def test_bad_pairs_are_skipped_with_one_line_each_and_strict_stops(tmp_path, capsys):
    sync = tmp_path / "sync"
    pairs = dt.write_bts_tree(str(sync), 6, H, W, seed=1)
    (sync / pairs[0][1]).unlink()  # missing depth
    (sync / pairs[1][0]).write_bytes(b"not a jpeg at all")  # corrupt image
    cv2.imwrite(str(sync / pairs[2][1]), np.zeros((10, 12), np.uint16))  # wrong-size depth
    os.makedirs(sync / "garage_0001")
    cv2.imwrite(str(sync / "garage_0001/rgb_00001.jpg"), np.zeros((H, W, 3), np.uint8))
    cv2.imwrite(str(sync / "garage_0001/sync_depth_00001.png"), np.ones((H, W), np.uint16))  # unknown scene
    cv2.imwrite(str(sync / pairs[3][0]), np.zeros((H + 2, W, 3), np.uint8))  # image of the wrong size
    data = tmp_path / "data"
    rc = prepare.main(["--source", "bts", "--bts_dir", str(sync), "--data_dir", str(data),
                       "--image_size", f"{H}x{W}"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "train 2 examples; skipped 5 bad pairs" in cap.out
    msgs = sorted(ln for ln in cap.err.splitlines() if ln.startswith("skipped: "))
    assert len(msgs) == 5
    expect = [("garage_0001/rgb_00001.jpg", "unknown scene name"),
              (pairs[0][1], "does not exist"), (pairs[1][0], "corrupt or unreadable image"),
              (pairs[2][1], "depth map is 10x12 but its image is 48x64"), (pairs[3][0], "image is 50x64")]
    for path, what in expect:
        assert any(path in m and what in m for m in msgs), (path, what, msgs)
    before = _read_all(str(data), "nyu_vpd/bts", "train")
    info = (data / "nyu_vpd/bts/1.0.0/dataset_info.json").read_text()

    # --strict: stops at the first bad pair, exit 1, and the dataset prepared above is untouched.
    rc = prepare.main(["--source", "bts", "--bts_dir", str(sync), "--data_dir", str(data),
                       "--image_size", f"{H}x{W}", "--strict"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "error (--strict)" in err and "nothing under" in err
    assert (data / "nyu_vpd/bts/1.0.0/dataset_info.json").read_text() == info
    after = _read_all(str(data), "nyu_vpd/bts", "train")
    assert [r["file_name"] for r in after] == [r["file_name"] for r in before]
    assert not [p for p in os.listdir(data) if p.startswith(".staging")]


def test_labeled_mat_and_splits(tmp_path, capsys):
    types = ["bathroom", "kitchen", "office_kitchen", "study_room", "garage", "bedroom"]
    arrays = dt.write_labeled_mat(str(tmp_path / "labeled.mat"), types, seed=0)
    dt.write_splits(str(tmp_path / "splits.mat"), train_idx=[0, 5], test_idx=[1, 2, 3, 4])
    for fmt in ("png", "jpeg"):
        data = tmp_path / f"data_{fmt}"
        rc = prepare.main(["--source", "mat", "--mat", str(tmp_path / "labeled.mat"), "--splits",
                           str(tmp_path / "splits.mat"), "--data_dir", str(data), "--mat_image_format", fmt])
        assert rc == 0
        cap = capsys.readouterr()
        assert "train 2, test 3 examples; skipped 1 bad pairs" in cap.out
        assert "garage/rgb_00004.jpg" in cap.err and "unknown scene name" in cap.err
        test = _read_all(str(data), "nyu_vpd/mat", "test")
        assert [r["file_name"].decode() for r in test] == ["kitchen/rgb_00001.jpg", "office_kitchen/rgb_00002.jpg",
                                                          "study_room/rgb_00003.jpg"]
        # office_kitchen -> kitchen (6) and study_room -> study (3) officially; mmseg keeps them (19, 5).
        assert [int(r["class_id"]) for r in test] == [6, 6, 3]
        assert [int(r["class_id_mmseg"]) for r in test] == [6, 19, 5]
        for r, i in zip(test, (1, 2, 3)):
            # rawDepths * 1000 truncated to uint16 mm, as the official extraction writes it.
            mm = (arrays["rawDepths"][i] * np.float32(1000.0)).astype(np.uint16)
            np.testing.assert_array_equal(r["depth"], mm.astype(np.float32) / 1000)
            img = r["image"]
            inner, ref = img[7:474, 7:632].astype(int), arrays["images"][i][7:474, 7:632].astype(int)
            if fmt == "png":  # lossless: the black border and the pixels inside it exactly
                assert (img[:7] == 0).all() and (img[474:] == 0).all() and (img[:, :7] == 0).all()
                assert (img[:, 632:] == 0).all()
                np.testing.assert_array_equal(inner, ref)
            else:
                bordered = np.zeros((480, 640, 3), np.uint8)
                bordered[7:474, 7:632] = arrays["images"][i][7:474, 7:632]
                ok, enc = cv2.imencode(".jpg", bordered[..., ::-1])  # cv2.imwrite's default quality 95
                np.testing.assert_array_equal(img, cv2.imdecode(enc, cv2.IMREAD_COLOR)[..., ::-1])
                assert np.abs(inner - ref).mean() < 10  # lossy, but this image (others differ by ~80)


def test_mmseg_layout(bts, tmp_path):
    root, sync, pairs, test_pairs = bts
    mm = tmp_path / "nyu"
    names = dt.write_mmseg(str(mm), "train", str(sync), pairs[:4])
    dt.write_mmseg(str(mm), "test", str(root / "official_splits/test"), test_pairs)
    data = tmp_path / "data"
    assert prepare.main(["--source", "mmseg", "--mmseg_dir", str(mm), "--data_dir", str(data),
                         "--image_size", f"{H}x{W}"]) == 0
    train = _read_all(str(data), "nyu_vpd/mmseg", "train")
    assert [r["file_name"].decode() for r in train] == sorted(names)
    for r in train:
        name = r["file_name"].decode()
        assert r["class_id_mmseg"] == scenes.class_id_for_file(name, "mmseg")
        assert r["class_id"] == scenes.class_id_for_file(name, "official")
        np.testing.assert_array_equal(r["image"], cv2.imread(str(mm / "images/train" / name))[..., ::-1])
    assert len(_read_all(str(data), "nyu_vpd/mmseg", "test")) == 3


def test_synthetic_through_the_cli(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    res = subprocess.run([sys.executable, "-m", "vpd_jax.data.prepare", "--source", "synthetic", "--num_train", "5",
                          "--num_test", "2", "--height", "24", "--width", "32", "--data_dir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "train 5, test 2 examples; skipped 0 bad pairs" in res.stdout
    assert "synthetic/train" in res.stderr and "5/5" in res.stderr  # the progress bar
    info = json.loads((tmp_path / "nyu_vpd/synthetic/1.0.0/dataset_info.json").read_text())
    assert info["fileFormat"] == "array_record"
    r = _read_all(str(tmp_path), "nyu_vpd/synthetic", "train")[0]
    assert r["image"].shape == (24, 32, 3) and r["depth"].shape == (24, 32) and r["depth"].dtype == np.float32
    bad = subprocess.run([sys.executable, "-m", "vpd_jax.data.prepare", "--source", "mat", "--data_dir",
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "--source mat needs --mat and --splits" in bad.stderr


def test_stock_fastdepth_build(tmp_path):
    dt.write_fastdepth(str(tmp_path / "src"), {"kitchen_0001": 2, "office_0003": 1}, num_val=2)
    data = tmp_path / "data"
    assert prepare.main(["--source", "fastdepth", "--fastdepth_dir", str(tmp_path / "src"),
                         "--data_dir", str(data)]) == 0
    ev = loader.make_eval_loader(str(data), dataset="nyu_depth_v2", split="test", batch_size=4)
    (batch,) = list(ev)
    assert batch["valid"].tolist() == [True, True, False, False]
    assert batch["depth"].dtype == np.float32 and batch["image"].shape == (4, 480, 640, 3)
    assert (batch["class_id"] == -1).all()  # no scene label: the class table's mean row
    import h5py

    with h5py.File(tmp_path / "src/nyudepthv2/val/official/00001.h5") as f:
        ref = f["depth"][:].astype(np.float16).astype(np.float32)
    assert any(np.array_equal(batch["depth"][i], ref) for i in range(2))
    assert len(loader.open_source(str(data), "nyu_depth_v2", "train")) == 3


def test_missing_inputs_give_one_line_errors(tmp_path, capsys):
    assert prepare.main(["--source", "bts", "--bts_dir", str(tmp_path / "nope"), "--data_dir",
                         str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope: no such directory" in err
    assert prepare.main(["--source", "mat", "--mat", str(tmp_path / "x.mat"), "--splits", str(tmp_path / "s.mat"),
                         "--data_dir", str(tmp_path / "d")]) == 1
    assert "x.mat: no such file" in capsys.readouterr().err
    assert not (tmp_path / "d" / "nyu_vpd").exists()


def test_official_lists_parse_and_resolve_classes(reference_dir, tmp_path):
    train = (reference_dir / "nyu_train_list.txt").read_text().splitlines()
    test = (reference_dir / "nyu_test_list.txt").read_text().splitlines()
    assert len(train) == 24231 and len(test) == 654
    seen = set()
    for n, line in enumerate(train + test, 1):
        scene_dir, rgb, dep = sources.parse_list_line(line, f"line {n}")
        base = os.path.basename(rgb)
        official, mmseg = sources.class_names(scene_dir, base)
        cid, cid_mm = sources.class_ids(official, mmseg, f"line {n}")
        assert 0 <= cid < scenes.NUM_CLASSES and 0 <= cid_mm <= scenes.UNKNOWN_CLASS
        seen.add(rgb)
    assert len(seen) == 24231 + 654  # no duplicate pairs
    classes = json.loads((reference_dir / "nyu_class_list.json").read_text())
    assert tuple(classes) == scenes.NYU_CLASSES
    ids = [sources.class_ids(*sources.class_names(*os.path.split(ln.split()[0].lstrip("/"))), "t") for ln in test]
    assert sum(1 for c in ids if c == (6, 19)) == 4  # office_kitchen: kitchen officially, itself in mmseg
    assert sum(1 for c in ids if c == (3, 5)) == 2  # study_room
    # Against a tree that lacks the files, every line fails with a message naming the list line and file.
    items = sources.bts_list_items(str(tmp_path), str(reference_dir / "nyu_test_list.txt"))
    assert len(items) == 654
    with pytest.raises(sources.BadInput, match=r"nyu_test_list.txt:1: image .*bathroom/rgb_00045.jpg does not"):
        items[0].load()


def test_bts_train_with_mat_test_split(bts, tmp_path, capsys):
    _, sync, pairs, _ = bts
    dt.write_labeled_mat(str(tmp_path / "labeled.mat"), ["bedroom", "bathroom", "kitchen"], seed=1)
    dt.write_splits(str(tmp_path / "splits.mat"), train_idx=[1], test_idx=[0, 2])
    data = tmp_path / "data"
    assert prepare.main(["--source", "bts", "--bts_dir", str(sync), "--mat", str(tmp_path / "labeled.mat"),
                         "--splits", str(tmp_path / "splits.mat"), "--data_dir", str(data),
                         "--image_size", "any"]) == 0
    assert "train 6, test 2 examples" in capsys.readouterr().out
    test = _read_all(str(data), "nyu_vpd/bts", "test")
    assert [r["file_name"].decode() for r in test] == ["bedroom/rgb_00000.jpg", "kitchen/rgb_00002.jpg"]
    assert catalog.prepared_datasets(str(data)) == {"nyu_vpd/bts": ["train", "test"]}
    with pytest.raises(SystemExit):
        prepare.parse_args(["--source", "bts", "--bts_dir", "x", "--mat", "m", "--data_dir", "d"])


def test_a_split_with_no_usable_pairs_fails_without_writing(tmp_path, capsys):
    sync = tmp_path / "sync"
    pairs = dt.write_bts_tree(str(sync), 2, H, W, seed=2)
    for _, dep in pairs:
        (sync / dep).unlink()
    assert prepare.main(["--source", "bts", "--bts_dir", str(sync), "--data_dir", str(tmp_path / "d"),
                         "--image_size", "any"]) == 1
    err = capsys.readouterr().err
    assert "error: split 'train' has no usable image/depth pairs (2 skipped)" in err
    assert not (tmp_path / "d" / "nyu_vpd").exists()
