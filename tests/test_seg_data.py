"""ADE20K data: class names against mmseg, the ADEChallengeData2016 layout through the real prepare CLI (read
back equal to cv2 reads with reduce_zero_label, and to mmseg's LoadAnnotations), bad files reported and skipped
(--strict stops), synthetic_seg, the catalog."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
from PIL import Image

from vpd_jax.data import catalog, loader, prepare, segmentation
from vpd_jax.data import testing as dt


def _read_all(data_dir, dataset, split):
    src = loader.open_source(data_dir, dataset, split)
    return [src[i] for i in range(len(src))]


def test_class_names_are_mmseg_ade20k_classes():
    pytest.importorskip("torch")
    from reference.torch_training import import_mmseg

    import_mmseg()
    from mmseg.datasets import ADE20KDataset

    theirs = ADE20KDataset.METAINFO["classes"]
    assert len(theirs) == segmentation.NUM_CLASSES == len(segmentation.ADE20K_CLASSES)
    assert tuple(c.strip() for c in theirs) == segmentation.ADE20K_CLASSES  # mmseg spells 'bed '


def test_reduce_zero_label_matches_mmseg_load_annotations(tmp_path):
    pytest.importorskip("torch")
    from reference.torch_training import import_mmseg

    import_mmseg()
    from mmseg.datasets.transforms import LoadAnnotations

    raw = np.arange(256, dtype=np.uint8).reshape(16, 16)
    grey, pal = tmp_path / "grey.png", tmp_path / "pal.png"
    Image.fromarray(raw, "L").save(grey)
    p = Image.fromarray(raw[::-1].copy(), "P")
    p.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
    p.save(pal)
    for path, values in ((grey, raw), (pal, raw[::-1])):
        ref = LoadAnnotations()({"seg_map_path": str(path), "reduce_zero_label": True, "seg_fields": []})
        ours = segmentation.reduce_zero_label(segmentation.decode_label_png(path.read_bytes(), str(path)))
        np.testing.assert_array_equal(ours, ref["gt_seg_map"])
        assert ours[values == 0].tolist() == [255] and ours[values == 255].tolist() == [255]
        assert ours[values == 151].tolist() == [150] and ours[values == 1].tolist() == [0]


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade") / "ADEChallengeData2016"
    names = dt.write_ade_tree(str(root), num_train=5, num_val=3)
    return root, names


def test_ade_tree_through_the_cli(ade, tmp_path, capsys):
    root, names = ade
    rc = prepare.main(["--source", "ade20k", "--ade_dir", str(root), "--data_dir", str(tmp_path)])
    assert rc == 0
    assert "prepared ade20k_vpd/ade at" in capsys.readouterr().out
    assert catalog.prepared_datasets(str(tmp_path))["ade20k_vpd/ade"] == ["train", "validation"]
    assert catalog.require(str(tmp_path), "ade20k_vpd/ade", "test")[1] == "validation"
    for split, folder in (("train", "training"), ("validation", "validation")):
        recs = _read_all(str(tmp_path), "ade20k_vpd/ade", split)
        assert [r["file_name"].decode() for r in recs] == sorted(names[split])
        sizes = set()
        for r in recs:
            stem = os.path.splitext(r["file_name"].decode())[0]
            img = cv2.imread(str(root / "images" / folder / f"{stem}.jpg"))[..., ::-1]
            raw = cv2.imread(str(root / "annotations" / folder / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(r["image"], img)
            label = segmentation.decode_label(r["label"])
            assert label.dtype == np.uint8 and label.shape == raw.shape
            expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
            np.testing.assert_array_equal(label, expected)
            assert (label == 255).any() and label[label != 255].max() < segmentation.NUM_CLASSES
            sizes.add(label.shape)
        assert len(sizes) > 1  # images of different sizes


def test_bad_ade_files_are_reported_and_skipped(ade, tmp_path, capsys):
    import shutil

    src, _ = ade
    root = tmp_path / "ADEChallengeData2016"
    shutil.copytree(src, root)
    ann = root / "annotations" / "training"
    img = root / "images" / "training"
    os.remove(ann / "ADE_train_00000001.png")  # missing label
    cv2.imwrite(str(ann / "ADE_train_00000002.png"), np.zeros((10, 10), np.uint8))  # wrong size
    cv2.imwrite(str(ann / "ADE_train_00000003.png"), np.zeros((40, 56, 3), np.uint8))  # colour
    (img / "ADE_train_00000004.jpg").write_bytes(b"not a jpeg")  # corrupt image
    cv2.imwrite(str(root / "annotations" / "validation" / "ADE_val_00000001.png"),
                np.zeros((40, 56), np.uint16))  # 16-bit
    data = tmp_path / "data"
    rc = prepare.main(["--source", "ade20k", "--ade_dir", str(root), "--data_dir", str(data)])
    assert rc == 0
    cap = capsys.readouterr()
    assert "train 1, validation 2 examples; skipped 5 bad pairs" in cap.out
    msgs = [ln[len("skipped: "):] for ln in cap.err.splitlines() if ln.startswith("skipped: ")]
    assert msgs[0] == f"label map {ann}/ADE_train_00000001.png does not exist"
    assert msgs[1] == f"{ann}/ADE_train_00000002.png: label map is 10x10 but its image is 48x40"  # sizes cycle
    assert msgs[2] == f"{ann}/ADE_train_00000003.png: expected an 8-bit single-channel label PNG, got PIL mode RGB"
    assert msgs[3] == f"{img}/ADE_train_00000004.jpg: corrupt or unreadable image"
    assert msgs[4].startswith(f"{root}/annotations/validation/ADE_val_00000001.png: expected an 8-bit")
    assert [r["file_name"].decode() for r in _read_all(str(data), "ade20k_vpd/ade", "train")] == \
        ["ADE_train_00000005.jpg"]
    # --strict stops at the first, leaving the earlier build in place.
    rc = prepare.main(["--source", "ade20k", "--ade_dir", str(root), "--data_dir", str(data), "--strict"])
    assert rc == 1
    assert "error (--strict): label map" in capsys.readouterr().err
    assert len(_read_all(str(data), "ade20k_vpd/ade", "train")) == 1
    # No ADE layout at all: one line, exit 1.
    assert prepare.main(["--source", "ade20k", "--ade_dir", str(tmp_path / "nope"), "--data_dir", str(data)]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_synthetic_seg(tmp_path, capsys):
    from vpd_jax.data import synthetic

    rc = prepare.main(["--source", "synthetic_seg", "--num_train", "3", "--num_test", "2", "--height", "30",
                       "--width", "40", "--seed", "7", "--data_dir", str(tmp_path)])
    assert rc == 0
    assert "train 3, validation 2 examples" in capsys.readouterr().out
    recs = _read_all(str(tmp_path), "ade20k_vpd/synthetic", "validation")
    for i, r in enumerate(recs):
        sc = synthetic.generate_scene(7, i // 4, i % 4, 30, 40, "test")
        np.testing.assert_array_equal(r["image"], sc.image)
        np.testing.assert_array_equal(segmentation.decode_label(r["label"]), sc.label)
        assert r["file_name"].decode() == f"{sc.scene_dir}/rgb_{i % 4:05d}.png"
    labels = np.concatenate([segmentation.decode_label(r["label"]).ravel() for r in recs])
    named = {segmentation.ADE20K_CLASSES[c] for c in np.unique(labels)}
    assert {"wall", "floor"} <= named and named <= set(synthetic.SURFACE_CLASSES)
    assert catalog.dataset_task("ade20k_vpd/synthetic") == "segmentation"
    assert catalog.dataset_task("nyu_vpd/bts") == "depth"


def test_synthetic_labels_follow_the_geometry():
    """Label edges are depth/surface edges: the floor is below the horizon, the ceiling above, and labels of
    one view are deterministic."""
    from vpd_jax.data import synthetic

    a = synthetic.generate_scene(1, 2, 0, 48, 64)
    b = synthetic.generate_scene(1, 2, 0, 48, 64)
    np.testing.assert_array_equal(a.label, b.label)
    rows_floor = np.nonzero((a.label == synthetic.SURFACE_CLASSES["floor"]).any(1))[0]
    rows_ceil = np.nonzero((a.label == synthetic.SURFACE_CLASSES["ceiling"]).any(1))[0]
    assert rows_floor.size and rows_floor.min() > 48 // 3
    if rows_ceil.size:
        assert rows_ceil.max() < rows_floor.min()
    # a room with one sphere: the sphere's pixels are 'ball', the rest room surfaces
    mat = synthetic._Material(np.array([0.9, 0.1, 0.1]), np.array([0.1, 0.1, 0.9]), 0, 0.2, 1)
    room = synthetic._Room(x0=-2.0, x1=3.0, z0=-1.0, z1=6.0, floor_y=0.0, ceil_y=-2.8, materials=[mat] * 6,
                           objects=[("sphere", (0.0, -0.4, 3.0, 0.4), mat)], light=np.array([0.0, -2.6, 2.0]),
                           light_power=5.0, ambient=0.2)
    _, depth, label = synthetic.render_with_labels(room, np.eye(3), np.array([0.0, -0.4, 0.0]), 48, 64,
                                                   np.random.default_rng(0))
    ball = label == synthetic.SURFACE_CLASSES["ball"]
    assert ball[24, 32] and 10 < ball.sum() < 400
    assert depth[ball].max() < depth[~ball & (depth > 0)].min() + 1e-6 or depth[ball].mean() < 3.0
