"""``prepare --source folder``: any folder of image/depth pairs through the real CLI, read back with the loader and
compared with direct reads of the written files: pairing by relative path and by unique stem, every depth format
and --depth_scale / --invalid, unpaired and unreadable files, --strict, the val split, scenes, usage errors."""

from __future__ import annotations

import hashlib
import json
import os

import cv2
import numpy as np
import pytest

from vpd_jax.data import builder, catalog, folder, loader, prepare
from vpd_jax.data import testing as dt


def _read_all(data_dir, dataset, split):
    src = loader.open_source(str(data_dir), dataset, split)
    return [src[i] for i in range(len(src))]


def _names(rows):
    return [r["file_name"].decode() for r in rows]


def _expected_depth(path, scale, invalid=0.0):
    """The depth file's values, read directly, as metres: float32(value) / float32(scale), invalid -> 0."""
    vals = np.load(path) if str(path).endswith(".npy") else cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    with np.errstate(invalid="ignore"):
        out = vals.astype(np.float32) / np.float32(scale)
        bad = (vals == invalid) | (vals < 0) | ~np.isfinite(vals.astype(np.float64)) | ~np.isfinite(out)
    out[bad] = 0
    return out


def _run(args, data):
    return prepare.main(["--source", "folder", *args, "--data_dir", str(data)])


def _err_lines(err, prefix="skipped: "):
    return [ln for ln in err.splitlines() if ln.startswith(prefix)]


def test_nested_tree_pixels_depth_scenes_and_val_fraction(tmp_path, capsys):
    root = tmp_path / "src"
    pairs = dt.write_depth_folder(str(root), layout="nested", num_images=6)
    data = tmp_path / "data"
    args = ["--images", f"{root}/rgb/**/*.jpg", "--depths", f"{root}/depth/**/*.png", "--depth_scale", "1000",
            "--val_fraction", "0.34", "--name", "rooms"]
    assert _run(args, data) == 0
    out = capsys.readouterr().out
    assert out.strip() == (f"prepared depth_folder/rooms at {data}/depth_folder/rooms/1.0.0: train 4, val 2 examples;"
                           " skipped 0 (unpaired 0, unusable 0); use --config.dataset=depth_folder/rooms "
                           "--config.test_split=val")
    train, val = _read_all(data, "depth_folder/rooms", "train"), _read_all(data, "depth_folder/rooms", "val")
    rels = sorted(img[len("rgb/"):] for img, _ in pairs)
    # val: the round(0.34 * 6) = 2 pairs whose relative image paths have the smallest SHA-1; both splits sorted.
    want_val = sorted(sorted(rels, key=lambda r: hashlib.sha1(r.encode()).hexdigest())[:2])
    assert _names(val) == want_val
    assert _names(train) == [r for r in rels if r not in want_val]
    for r in train + val:
        rel = r["file_name"].decode()
        np.testing.assert_array_equal(r["image"], cv2.imread(str(root / "rgb" / rel))[..., ::-1])
        dep = root / "depth" / (os.path.splitext(rel)[0] + ".png")
        np.testing.assert_array_equal(r["depth"], _expected_depth(dep, 1000))
        assert (r["depth"][:4, :4] == 0).all() and (r["depth"] > 0).mean() > 0.9
        assert r["scene"].decode() == rel.split("/")[0]  # --scene_from parent (the default)
        assert r["class_id"] == builder.NO_CLASS and r["class_id_mmseg"] == builder.NO_CLASS
    # Deterministic: a second build elsewhere picks the same val pairs.
    assert _run(args, tmp_path / "again") == 0
    assert _names(_read_all(tmp_path / "again", "depth_folder/rooms", "val")) == want_val
    # The loaders read it like any dataset.
    (batch,) = list(loader.make_eval_loader(str(data), dataset="depth_folder/rooms", split="val", batch_size=2))
    assert batch["file_name"].tolist() == want_val and batch["depth"].dtype == np.float32
    np.testing.assert_array_equal(batch["image"][0], val[0]["image"])


@pytest.mark.parametrize("fmt,scale,invalid", [("png16", 256, 65535), ("png8", 25, 0), ("npy", 1, 0),
                                               ("tiff", 2.5, 0), ("tiff", 1, 7.25)])
def test_depth_formats_scale_and_invalid(tmp_path, capsys, fmt, scale, invalid):
    root = tmp_path / "Flat Rooms!"
    pairs = dt.write_depth_folder(str(root), layout="flat", depth_format=fmt, num_images=3, depth_scale=scale,
                                  invalid=invalid)
    if fmt in ("npy", "tiff"):  # non-finite and negative values are invalid too
        path = root / pairs[0][1]
        vals = np.load(path) if fmt == "npy" else cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert vals.dtype == np.float32
        vals[10, 10:14] = [np.nan, np.inf, -np.inf, -2.0]
        np.save(path, vals) if fmt == "npy" else cv2.imwrite(str(path), vals)
    ext = os.path.splitext(pairs[0][1])[1]
    data = tmp_path / "data"
    # A plain folder for the images; the depth glob claims the PNG depth maps the folder would also hold.
    args = ["--images", str(root), "--depths", f"{root}/*{ext}", "--depth_scale", f"{scale}", "--val_fraction", "0"]
    if invalid:
        args += ["--invalid", f"{invalid}"]
    assert _run(args, data) == 0
    assert "train 3 examples; skipped 0" in capsys.readouterr().out
    assert catalog.prepared_datasets(str(data)) == {"depth_folder/flat_rooms": ["train"]}  # the default name
    rows = _read_all(data, "depth_folder/flat_rooms", "train")
    assert _names(rows) == sorted(img for img, _ in pairs)
    for r in rows:
        dep = root / (os.path.splitext(r["file_name"].decode())[0] + ext)
        want = _expected_depth(dep, scale, invalid)
        np.testing.assert_array_equal(r["depth"], want)
        assert (r["depth"][:4, :4] == 0).all() and (r["depth"] > 0).mean() > 0.9
        assert r["scene"].decode() == "Flat Rooms!"  # the parent folder's name
    if fmt in ("npy", "tiff"):
        assert (rows[0]["depth"][10, 10:14] == 0).all()


def _read_exr_channel(path, name):
    import OpenEXR

    with OpenEXR.File(str(path), separate_channels=True) as f:
        return np.asarray(f.channels()[name].pixels)


def test_exr_depth(tmp_path, capsys):
    root = tmp_path / "src"
    pairs = dt.write_depth_folder(str(root), layout="flat", depth_format="exr", num_images=3, depth_scale=1)
    # A multi-channel file (colour + Z) gives its Z channel; a damaged one is named and skipped.
    z_file = root / pairs[1][1]
    z = _read_exr_channel(z_file, "Z")
    dt.write_exr(str(z_file), {"R": np.ones_like(z), "G": np.ones_like(z), "B": np.ones_like(z), "Z": z})
    (root / pairs[2][1]).write_bytes(b"not an exr file")
    assert _run(["--images", f"{root}/*.jpg", "--depths", f"{root}/*.exr", "--depth_scale", "1",
                 "--val_fraction", "0", "--name", "exr"], tmp_path / "data") == 0
    err = capsys.readouterr().err
    assert f"{root / pairs[2][1]}: corrupt or unreadable EXR depth map" in err
    rows = _read_all(tmp_path / "data", "depth_folder/exr", "train")
    assert len(rows) == 2
    for r in rows:
        dep = root / (os.path.splitext(r["file_name"].decode())[0] + ".exr")
        vals = _read_exr_channel(dep, "Z")
        want = np.where(vals > 0, vals, 0).astype(np.float32)
        np.testing.assert_array_equal(r["depth"], want)
        assert (r["depth"][:4, :4] == 0).all() and (r["depth"] > 0).mean() > 0.9


def test_stem_pairing_unpaired_and_unreadable_files(tmp_path, capsys):
    root = tmp_path / "src"
    pairs = dt.write_depth_folder(str(root), layout="stems", num_images=6, image_format="png")
    img0, img1, img2, img3 = (root / p[0] for p in pairs[:4])
    # Grey and RGBA images are stored as what cv2.imread gives.
    grey = cv2.imread(str(img2), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(img2), grey)
    rgba = cv2.cvtColor(cv2.imread(str(img3)), cv2.COLOR_BGR2BGRA)
    rgba[..., 3] = 90
    cv2.imwrite(str(img3), rgba)
    img0.write_bytes(b"not an image")  # unreadable
    cv2.imwrite(str(root / pairs[1][1]), np.ones((10, 12), np.uint16))  # depth of the wrong size
    lonely = root / "rgb" / "extra" / "lonely.png"
    os.makedirs(lonely.parent)
    cv2.imwrite(str(lonely), grey)  # an image without depth
    orphan = root / "depth" / "orphan.png"
    cv2.imwrite(str(orphan), np.ones((48, 64), np.uint16))  # a depth map without image
    data = tmp_path / "data"
    assert _run(["--images", f"{root}/rgb/**/*.png", "--depths", f"{root}/depth", "--depth_scale", "1000",
                 "--val_fraction", "0", "--name", "stems"], data) == 0
    cap = capsys.readouterr()
    assert "train 4 examples; skipped 4 (unpaired 2, unusable 2)" in cap.out
    msgs = _err_lines(cap.err)
    assert len(msgs) == 4
    assert f"skipped: {lonely}: image with no depth map" in msgs[0]
    assert f"skipped: {orphan}: depth map with no image" in msgs[1]
    assert any(f"{img0}: corrupt or unreadable image" in m for m in msgs[2:])
    assert any(f"{root / pairs[1][1]}: depth map is 10x12 but its image {img1} is 48x64" in m for m in msgs[2:])
    rows = _read_all(data, "depth_folder/stems", "train")
    assert _names(rows) == sorted(p[0][len("rgb/"):] for p in pairs[2:])
    for r in rows:
        rel = r["file_name"].decode()
        np.testing.assert_array_equal(r["image"], cv2.imread(str(root / "rgb" / rel))[..., ::-1])
        dep = root / "depth" / (os.path.basename(os.path.splitext(rel)[0]) + ".png")
        np.testing.assert_array_equal(r["depth"], _expected_depth(dep, 1000))
    by_name = {r["file_name"].decode(): r for r in rows}
    np.testing.assert_array_equal(by_name[pairs[2][0][4:]]["image"], np.repeat(grey[..., None], 3, axis=2))


def test_ambiguous_stems_do_not_pair(tmp_path, capsys):
    root = tmp_path / "src"
    pairs = dt.write_depth_folder(str(root), layout="nested", num_images=6)
    assert pairs[1][0].endswith("/frame_001.jpg") and pairs[4][0].endswith("/frame_001.jpg")
    (root / pairs[1][1]).unlink()
    moved = root / "depth" / "moved" / "frame_001.png"  # a unique depth stem, but two images have it
    os.makedirs(moved.parent)
    (root / pairs[4][1]).rename(moved)
    assert _run(["--images", f"{root}/rgb/**/*.jpg", "--depths", f"{root}/depth/**/*.png", "--depth_scale", "1000",
                 "--name", "amb"], tmp_path / "data") == 0
    cap = capsys.readouterr()
    assert "train 3, val 1 examples; skipped 3 (unpaired 3, unusable 0)" in cap.out
    msgs = _err_lines(cap.err)
    shared = "its stem 'frame_001' is not unique (2 images, 1 depth file)"
    assert msgs == sorted(f"skipped: {root / img}: image with no depth map (no {img[4:-4]}.* under {root / 'depth'}; "
                          f"{shared})" for img in (pairs[1][0], pairs[4][0])) + [
        f"skipped: {moved}: depth map with no image (no moved/frame_001.* under {root / 'rgb'}; {shared})"]


def test_strict_stops_with_nothing_written(tmp_path, capsys):
    root = tmp_path / "src"
    pairs = dt.write_depth_folder(str(root), layout="nested", num_images=4)
    args = ["--images", f"{root}/rgb/**/*.jpg", "--depths", f"{root}/depth/**/*.png", "--depth_scale", "1000",
            "--strict"]
    (root / pairs[2][1]).unlink()
    data = tmp_path / "data"
    assert _run(args, data) == 1
    err = capsys.readouterr().err
    assert f"error (--strict): {root / pairs[2][0]}: image with no depth map" in err
    assert not data.exists() or os.listdir(data) == []
    cv2.imwrite(str(root / pairs[2][1]), np.ones((48, 64), np.uint16))
    (root / pairs[3][0]).write_bytes(b"")  # found while building
    assert _run(args, data) == 1
    err = capsys.readouterr().err
    assert f"error (--strict): {root / pairs[3][0]}: corrupt or unreadable image" in err
    assert os.listdir(data) == []


def test_val_list(tmp_path, capsys):
    root = tmp_path / "src"
    pairs = dt.write_depth_folder(str(root), layout="stems", num_images=6)
    rels = [img[len("rgb/"):] for img, _ in pairs]
    lst = tmp_path / "val.txt"
    stem = os.path.splitext(os.path.basename(rels[4]))[0]
    lst.write_text(f"{rels[0]}\n./{os.path.splitext(rels[2])[0]}\n\n# a comment\n{stem}\nno_such_image\n")
    data = tmp_path / "data"
    assert _run(["--images", f"{root}/rgb/**/*.jpg", "--depths", f"{root}/depth/*.png", "--depth_scale", "1000",
                 "--val_list", str(lst), "--name", "listed"], data) == 0
    cap = capsys.readouterr()
    assert "train 3, val 3 examples; skipped 0" in cap.out
    assert f"1 names in {lst} match no image/depth pair" in cap.out
    assert f"warning: {lst}:6: 'no_such_image' matches no image/depth pair" in cap.err
    assert _names(_read_all(data, "depth_folder/listed", "val")) == sorted([rels[0], rels[2], rels[4]])
    assert _names(_read_all(data, "depth_folder/listed", "train")) == sorted([rels[1], rels[3], rels[5]])
    assert _run(["--images", f"{root}/rgb/**/*.jpg", "--depths", f"{root}/depth/*.png", "--depth_scale", "1000",
                 "--val_list", str(lst), "--name", "listed", "--strict"], tmp_path / "strict") == 1
    assert f"error (--strict): {lst}:6: 'no_such_image' matches no image/depth pair" in capsys.readouterr().err
    assert not (tmp_path / "strict").exists() or os.listdir(tmp_path / "strict") == []


def test_scene_from_none_and_files(tmp_path, capsys):
    root = tmp_path / "src"
    pairs = dt.write_depth_folder(str(root), layout="nested", num_images=7)
    rels = [img[len("rgb/"):] for img, _ in pairs]
    scenes = sorted({r.split("/")[0] for r in rels})
    base = ["--images", f"{root}/rgb/**/*.jpg", "--depths", f"{root}/depth/**/*.png", "--depth_scale", "1000",
            "--val_fraction", "0"]
    assert _run([*base, "--scene_from", "none", "--name", "none"], tmp_path / "d1") == 0
    assert {r["scene"] for r in _read_all(tmp_path / "d1", "depth_folder/none", "train")} == {b""}
    # A folder name, a relative file path and a stem; the most specific entry wins. The last scene has no entry.
    text = tmp_path / "scenes.txt"
    text.write_text(f"# key scene\n{scenes[0]} living room\n{rels[1]}   the special one \n"
                    f"{scenes[1]}/frame_002 corner\n")
    capsys.readouterr()
    assert _run([*base, "--scene_from", str(text), "--name", "text"], tmp_path / "d2") == 0
    out = capsys.readouterr().out

    def want(rel):
        if rel == rels[1]:
            return "the special one"
        if rel.startswith(f"{scenes[1]}/frame_002"):
            return "corner"
        return "living room" if rel.startswith(scenes[0] + "/") else ""

    missing = [r for r in rels if want(r) == ""]
    assert 0 < len(missing) < len(rels)
    assert f"{len(missing)} images have no scene in {text}; they will use the mean row" in out

    rows = _read_all(tmp_path / "d2", "depth_folder/text", "train")
    assert {r["file_name"].decode(): r["scene"].decode() for r in rows} == {r: want(r) for r in rels}
    js = tmp_path / "scenes.json"
    js.write_text(json.dumps({f"{scenes[0]}/": "a", scenes[1]: "b", scenes[2]: "c", rels[0]: "first"}))
    assert _run([*base, "--scene_from", str(js), "--name", "js"], tmp_path / "d3") == 0
    assert "have no scene" not in capsys.readouterr().out
    rows = _read_all(tmp_path / "d3", "depth_folder/js", "train")
    got = {r["file_name"].decode(): r["scene"].decode() for r in rows}
    assert got == {r: "first" if r == rels[0] else "abc"[scenes.index(r.split("/")[0])] for r in rels}


@pytest.mark.parametrize("args,message", [
    (["--depths", "D", "--depth_scale", "1"], "--source folder needs --images"),
    (["--images", "I", "--depths", "D"], "--source folder needs --depth_scale"),
    (["--images", "I", "--depths", "D", "--depth_scale", "0"], "--depth_scale 0: expected a positive number"),
    (["--images", "I", "--depths", "D", "--depth_scale", "1", "--val_fraction", "0.1", "--val_list", "v"],
     "either --val_fraction or --val_list, not both"),
    (["--images", "I", "--depths", "D", "--depth_scale", "1", "--val_fraction", "1"],
     "--val_fraction 1: expected a fraction in [0, 1)"),
    (["--images", "I", "--depths", "D", "--depth_scale", "1", "--val_fraction", "-0.1"],
     "--val_fraction -0.1: expected a fraction in [0, 1)"),
    (["--images", "I", "--depths", "D", "--depth_scale", "1", "--name", "My Rooms"], "--name 'My Rooms': expected"),
    (["--images", "a.jpg", "b.jpg", "c.jpg", "--depths", "D", "--depth_scale", "1"],
     "2 extra paths (b.jpg, ...): did the shell expand a glob? Quote it"),
])
def test_usage_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        prepare.main(["--source", "folder", *args, "--data_dir", str(tmp_path / "d")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not (tmp_path / "d").exists()


def test_input_errors_are_one_line(tmp_path, capsys):
    root = tmp_path / "src"
    dt.write_depth_folder(str(root), layout="flat", num_images=2)
    d = tmp_path / "d"
    cases = [
        (["--images", f"{root}/*.jpeg", "--depths", f"{root}/*.png"], 2, f"--images '{root}/*.jpeg': matches no files"),
        (["--images", f"{root}/*", "--depths", f"{root}/*.png"], 2, "matched by both --images"),
        (["--images", str(root / "nope"), "--depths", str(root)], 2, "nope: no such file or folder"),
        (["--images", f"{root}/*.jpg", "--depths", f"{root}/*.png", "--scene_from", str(root / "s.json")], 1,
         "s.json: no such file"),
        (["--images", f"{root}/*.jpg", "--depths", f"{root}/*.png", "--val_list", str(root / "v.txt")], 1,
         "v.txt: no such file (--val_list)"),
    ]
    (root / "bad.txt").write_text("only_a_key\n")
    cases.append((["--images", f"{root}/*.jpg", "--depths", f"{root}/*.png", "--scene_from", str(root / "bad.txt")],
                  2, "bad.txt:1: expected '<image path, stem or folder> <scene name>'"))
    for args, rc, message in cases:
        assert _run([*args, "--depth_scale", "1000"], d) == rc, args
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, (args, err)
    assert not (d / "depth_folder").exists()


def test_images_stored_as_cv2_imread_sees_them(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "src"
    pairs = dt.write_depth_folder(str(root), layout="flat", num_images=2, image_format="jpg")
    jpg = root / pairs[0][0]
    data, size = folder.load_image(str(jpg))
    assert data == jpg.read_bytes() and size == (48, 64)  # an ordinary 8-bit RGB file: its own bytes
    # A JPEG with an EXIF rotation: cv2.imread turns it upright (64x48), so that is what is stored (as PNG).
    rotated = root / pairs[1][0]
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(cv2.imread(str(rotated))[..., ::-1]).save(rotated, exif=exif.tobytes())
    upright = cv2.imread(str(rotated))
    assert upright.shape == (64, 48, 3)
    cv2.imwrite(str(root / pairs[1][1]), np.full((64, 48), 1500, np.uint16))
    data, size = folder.load_image(str(rotated))
    assert data.startswith(b"\x89PNG") and size == (64, 48)
    assert _run(["--images", f"{root}/*.jpg", "--depths", f"{root}/*.png", "--depth_scale", "1000",
                 "--val_fraction", "0", "--name", "exif"], tmp_path / "data") == 0
    rows = {r["file_name"].decode(): r for r in _read_all(tmp_path / "data", "depth_folder/exif", "train")}
    np.testing.assert_array_equal(rows[pairs[1][0]]["image"], upright[..., ::-1])
    np.testing.assert_array_equal(rows[pairs[1][0]]["depth"], np.full((64, 48), 1.5, np.float32))
    np.testing.assert_array_equal(rows[pairs[0][0]]["image"], cv2.imread(str(jpg))[..., ::-1])
