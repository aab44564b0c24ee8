"""Preparing KITTI (Eigen split) through the real CLI from generated trees in the layout of the KITTI depth
codebases: raw drives + data_depth_annotated (train/ and val/, or moved up as BTS reads them) + the
BTS-format lists; what is stored (against cv2 reads of the files), the lines without ground truth counted and left
out, bad lines and missing images skipped, --strict, usage errors; the generated tree itself at full size."""

from __future__ import annotations

import os
import shutil

import cv2
import numpy as np
import pytest

from vpd_jax.data import builder, catalog, kitti, loader, prepare, sources
from vpd_jax.data import testing as dt

H, W = 24, 80


def _read_all(data_dir, split):
    src = loader.open_source(str(data_dir), "kitti_vpd/eigen", split)
    return [src[i] for i in range(len(src))]


def _check_split(records, tree, expected):
    """Every record equals what the reference loaders read from the listed files, in list order."""
    assert [r["file_name"].decode() for r in records] == [img for img, _ in expected]
    for r, (img, dep) in zip(records, expected):
        np.testing.assert_array_equal(r["image"], cv2.imread(os.path.join(tree.raw, img))[..., ::-1])
        ref = cv2.imread(dep, cv2.IMREAD_UNCHANGED)
        assert ref.dtype == np.uint16 and r["depth"].dtype == np.float32
        np.testing.assert_array_equal(r["depth"], ref / 256.0)
        assert r["scene"].decode() == img.split("/")[1]
        assert r["class_id"] == builder.NO_CLASS and r["class_id_mmseg"] == builder.NO_CLASS


def _kitti_args(tree, data_dir, *extra, depth=None):
    return ["--source", "kitti", "--kitti_raw", tree.raw, "--kitti_depth", depth or tree.depth,
            "--data_dir", str(data_dir), *extra]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    # The second day's drive (the test list's) is a little smaller, as real KITTI days differ in size.
    return dt.write_kitti_tree(str(tmp_path_factory.mktemp("kitti")), H, W, frames_per_drive=3, seed=0,
                               other_size=(H - 2, W - 6))


def test_eigen_split_through_the_cli(tree, tmp_path, capsys):
    rc = prepare.main(_kitti_args(tree, tmp_path, "--train_list", tree.train_list, "--test_list", tree.test_list))
    assert rc == 0
    cap = capsys.readouterr()
    assert (f"prepared kitti_vpd/eigen at {tmp_path}/kitti_vpd/eigen/1.0.0: "
            "train 6 examples (2 listed without ground truth, 2 whose depth file is missing: left out), "
            "test 3 examples (1 listed without ground truth, 1 whose depth file is missing: left out); "
            "skipped 0 bad pairs") in cap.out
    assert (len(tree.train), len(tree.test)) == (6, 3)
    assert tree.no_gt == {"train": 2, "test": 1} and tree.depth_missing == {"train": 2, "test": 1}
    # The depth files missing on disk are named, one line each; the None lines are only counted.
    missing = [ln for ln in cap.err.splitlines() if ln.startswith("no ground truth: ")]
    assert len(missing) == 3
    for line in missing:
        assert "/proj_depth/groundtruth/image_02/0000000001.png is in none of" in line
        assert f"{tree.depth}/train" in line and f"{tree.depth}/val" in line
    assert any(ln.startswith(f"no ground truth: {tree.test_list}:") for ln in missing)
    assert "skipped:" not in cap.err
    _check_split(_read_all(tmp_path, "train"), tree, tree.train)
    test = _read_all(tmp_path, "test")
    _check_split(test, tree, tree.test)
    assert {r["image"].shape for r in test} == {(H - 2, W - 6, 3)}  # any size is accepted
    # The list's order is kept, and it is not sorted order.
    assert [img for img, _ in tree.train] != sorted(img for img, _ in tree.train)
    assert catalog.prepared_datasets(str(tmp_path)) == {"kitti_vpd/eigen": ["train", "test"]}


def test_depth_moved_up_as_bts_instructs(tree, tmp_path, capsys):
    # BTS reads <drive>/proj_depth/... under --gt_path data_depth_annotated/: the drives sit in the folder itself.
    moved = tmp_path / "data_depth_annotated"
    for sub in ("train", "val"):
        for drive in os.listdir(os.path.join(tree.depth, sub)):
            shutil.copytree(os.path.join(tree.depth, sub, drive), moved / drive)
    data = tmp_path / "data"
    assert prepare.main(_kitti_args(tree, data, "--test_list", tree.test_list, depth=str(moved))) == 0
    out = capsys.readouterr().out
    assert "test 3 examples (1 listed without ground truth, 1 whose depth file is missing: left out)" in out
    expected = [(img, str(moved / os.path.relpath(dep, os.path.join(tree.depth, "val")))) for img, dep in tree.test]
    _check_split(_read_all(data, "test"), tree, expected)
    assert catalog.prepared_datasets(str(data)) == {"kitti_vpd/eigen": ["test"]}


def test_bad_lines_and_missing_images_are_skipped_and_strict_stops(tree, tmp_path, capsys):
    lst = tmp_path / "eigen_test.txt"
    good = open(tree.test_list).read().splitlines()
    img0, dep0 = tree.test[0]
    drive = img0.split("/")[1]
    depth_rel = os.path.relpath(dep0, os.path.join(tree.depth, "val"))
    gone = img0.replace("0000000", "0000009")  # an image that is not there, with a depth map that is
    bad = [f"{img0} {depth_rel}",  # no focal: accepted (focal is optional), but a duplicate of line 1's image
           "only_one_column.png",
           f"{img0} {depth_rel} f=721",
           f"{drive}/{os.path.basename(img0)} {depth_rel} 718.3351",  # no <date>/<drive>/ in the image path
           f"{gone} {depth_rel} 718.3351"]
    lst.write_text("\n".join(good + bad) + "\n")
    n = len(good)
    data = tmp_path / "data"
    assert prepare.main(_kitti_args(tree, data, "--test_list", str(lst))) == 0
    cap = capsys.readouterr()
    assert "test 3 examples (1 listed without ground truth, 1 whose depth file is missing: left out); " \
           "skipped 5 bad pairs" in cap.out
    msgs = [ln for ln in cap.err.splitlines() if ln.startswith("skipped: ")]
    assert len(msgs) == 5
    assert img0 in msgs[0] and "listed more than once" in msgs[0]
    assert f"{lst}:{n + 2}: expected '<image path> <depth path or None> <focal>'" in msgs[1]
    assert f"{lst}:{n + 3}: focal length 'f=721' is not a number" in msgs[2]
    assert f"{lst}:{n + 4}: image path" in msgs[3] and "is not <date>/<drive>/" in msgs[3]
    assert msgs[4] == f"skipped: {lst}:{n + 5}: image {os.path.join(tree.raw, gone)} does not exist"
    _check_split(_read_all(data, "test"), tree, tree.test)

    # --strict: the first bad pair stops the build, exit 1, nothing written.
    data2 = tmp_path / "data2"
    assert prepare.main(_kitti_args(tree, data2, "--test_list", str(lst), "--strict")) == 1
    err = capsys.readouterr().err
    assert "error (--strict)" in err and "listed more than once" in err
    assert not (data2 / "kitti_vpd").exists()
    assert not [p for p in os.listdir(data2) if p.startswith(".staging")]


def test_a_depth_map_of_the_wrong_size_or_type_is_a_bad_pair(tree, tmp_path, capsys):
    img0, dep0 = tree.test[0]
    img1, dep1 = tree.test[1]
    depth_root = tmp_path / "depth"
    shutil.copytree(os.path.join(tree.depth, "val"), depth_root)
    small = depth_root / os.path.relpath(dep0, os.path.join(tree.depth, "val"))
    cv2.imwrite(str(small), np.ones((H - 4, W - 6), np.uint16))
    rgb = depth_root / os.path.relpath(dep1, os.path.join(tree.depth, "val"))
    cv2.imwrite(str(rgb), np.ones((H - 2, W - 6, 3), np.uint8))
    data = tmp_path / "data"
    assert prepare.main(_kitti_args(tree, data, "--test_list", tree.test_list, depth=str(depth_root))) == 0
    cap = capsys.readouterr()
    assert "test 1 examples" in cap.out and "skipped 2 bad pairs" in cap.out
    assert f"skipped: {small}: depth map is {H - 4}x{W - 6} but its image is {H - 2}x{W - 6}" in cap.err
    assert f"skipped: {rgb}: expected a 16-bit single-channel depth PNG" in cap.err


def test_usage_and_missing_input_errors(tree, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prepare.main(_kitti_args(tree, tmp_path / "d"))
    assert e.value.code == 2
    assert "--source kitti needs --train_list and/or --test_list" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        prepare.main(["--source", "kitti", "--test_list", tree.test_list, "--data_dir", str(tmp_path / "d")])
    assert e.value.code == 2
    assert "--source kitti needs --kitti_raw and --kitti_depth" in capsys.readouterr().err
    cases = [(_kitti_args(tree, tmp_path / "d", "--test_list", str(tmp_path / "nope.txt")),
              "nope.txt: no such file (--test_list)"),
             (_kitti_args(tree, tmp_path / "d", "--test_list", tree.test_list, depth=str(tmp_path / "nodepth")),
              "nodepth: no such directory (--kitti_depth"),
             (_kitti_args(tree, tmp_path / "d", "--test_list", tree.test_list, depth=str(tmp_path)),
              "none of its 4 listed depth maps is under")]
    for argv, what in cases:
        assert prepare.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and what in err, err
    assert not (tmp_path / "d" / "kitti_vpd").exists()


def test_the_real_list_format():
    # Lines of cleinc/bts train_test_inputs/eigen_test_files_with_gt.txt, verbatim.
    line = ("2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png "
            "2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png 721.5377")
    e = kitti.parse_eigen_line(line, "l:1")
    assert (e.image, e.drive, e.focal) == ("2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png",
                                           "2011_09_26_drive_0002_sync", 721.5377)
    assert e.depth == "2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png"
    e = kitti.parse_eigen_line("2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000075.png None 721.5377",
                               "l:2")
    assert e.depth is None
    with pytest.raises(sources.BadInput, match=r"^l:3: expected"):
        kitti.parse_eigen_line("a b c d", "l:3")


def test_generated_tree_at_full_size(tmp_path):
    tree = dt.write_kitti_tree(str(tmp_path), frames_per_drive=1, seed=3)
    assert len(tree.train) == 2 and len(tree.test) == 1
    for img, dep in tree.train + tree.test:
        image = cv2.imread(os.path.join(tree.raw, img))
        gt = cv2.imread(dep, cv2.IMREAD_UNCHANGED)
        assert image.shape == (375, 1242, 3) and gt.shape == (375, 1242) and gt.dtype == np.uint16
        valid = gt > 0
        assert 0.05 < valid.mean() < 0.2  # sparse, like the projected LiDAR
        assert not valid[: int(0.3 * 375)].any()  # nothing above the LiDAR's field of view
        metres = gt[valid] / 256.0
        assert metres.min() >= 1.0 and metres.max() <= 80.0
        # The road: depth falls toward the bottom rows.
        rows = [np.median(gt[r - 10:r][valid[r - 10:r]]) for r in (250, 300, 375)]
        assert rows[0] > rows[1] > rows[2]
        assert image.std() > 20  # not a flat picture
    # Deterministic from the seed.
    again = dt.write_kitti_tree(str(tmp_path / "again"), frames_per_drive=1, seed=3)
    img, dep = tree.test[0]
    assert open(os.path.join(tree.raw, img), "rb").read() == open(os.path.join(again.raw, img), "rb").read()
    assert open(dep, "rb").read() == open(again.test[0][1], "rb").read()
