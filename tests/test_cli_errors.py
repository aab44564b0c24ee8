"""Every door answers bad input in one line: each entry point, run as a user would (a subprocess), with mistakes
that fail before any compilation. Exit code 2 for a bad command or config value, 1 for a failure the user can
fix (a missing file, an unreadable checkpoint); no traceback; at most three lines on stderr; the message names
the bad thing."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from vpd_jax.data import prepare

    d = tmp_path_factory.mktemp("data")
    assert prepare.main(["--source", "synthetic", "--num_train", "8", "--num_test", "2", "--height", "64",
                         "--width", "64", "--data_dir", str(d)]) == 0
    return str(d)


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("places")
    (root / "a_file").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "table.npy").mkdir()
    (root / "classes.txt").write_text("# only a comment\n")
    return root


# (name, command after the interpreter, exit code, text the error line must hold); {data}, {tmp} filled in.
CASES = [
    ("train: no such recipe", ["train.py", "--config=configs/nope.py", "--workdir={tmp}/wd"], 2, "configs/nope.py"),
    ("train: negative step count", ["train.py", "--config=configs/demo.py", "--workdir={tmp}/wd",
                                    "--config.data_dir={data}", "--config.train.total_steps=-1"], 2,
     "train.total_steps=-1"),
    ("train: zero learning rate and batch", ["train.py", "--config=configs/demo.py", "--workdir={tmp}/wd",
                                             "--config.data_dir={data}", "--config.optimizer.max_lr=0",
                                             "--config.train.global_batch_size=0"], 2, "optimizer.max_lr=0"),
    ("train: a crop larger than the images", ["train.py", "--config=configs/demo.py", "--workdir={tmp}/wd",
                                              "--config.data_dir={data}", "--config.aug.crop_size=(96,96)"], 2,
     "aug.crop_size"),
    ("train: a batch larger than the dataset", ["train.py", "--config=configs/demo.py", "--workdir={tmp}/wd",
                                                "--config.data_dir={data}", "--config.train.global_batch_size=16",
                                                "--config.train.group_size=4"], 2, "global_batch_size=16"),
    ("train: workdir is a file", ["train.py", "--config=configs/demo.py", "--workdir={tmp}/a_file",
                                  "--config.data_dir={data}"], 2, "a_file"),
    ("train: no workdir", ["train.py", "--config=configs/demo.py"], 2, "workdir"),
    ("train: not a number", ["train.py", "--config=configs/demo.py", "--workdir={tmp}/wd",
                             "--config.train.total_steps=many"], 2, "total_steps"),
    ("eval: workdir without a run", ["eval.py", "--workdir={tmp}/empty"], 2, "config.json"),
    ("eval: nothing to evaluate", ["eval.py"], 2, "--config"),
    ("eval: which is bogus", ["eval.py", "--config=configs/demo.py", "--workdir={tmp}/wd", "--which=bogus"], 2,
     "bogus"),
    ("eval: missing checkpoint", ["eval.py", "--config=configs/demo.py", "--config.data_dir={data}",
                                  "--checkpoint={tmp}/missing.pth"], 1, "missing.pth"),
    ("eval: output under a file", ["eval.py", "--config=configs/demo.py", "--config.data_dir={data}",
                                   "--checkpoint={tmp}/missing.pth", "--output={tmp}/a_file/m.json"], 2, "a_file"),
    ("predict: missing checkpoint", ["predict.py", "--checkpoint", "{tmp}/missing", "--input", "photo.jpg",
                                     "--output", "{tmp}/out"], 1, "missing"),
    ("predict: no output", ["predict.py", "--checkpoint", "{tmp}/missing", "--input", "photo.jpg"], 2,
     "--output"),
    ("predict: zero batch", ["predict.py", "--checkpoint", "{tmp}/missing", "--input", "photo.jpg", "--output",
                             "{tmp}/out", "--batch_size", "0"], 2, "--batch_size 0"),
    ("predict: unknown scene", ["predict.py", "--checkpoint", "{tmp}/missing", "--input", "photo.jpg",
                                "--output", "{tmp}/out", "--scene", "garage"], 2, "garage"),
    ("predict: output is a file", ["predict.py", "--checkpoint", "{tmp}/missing", "--input", "photo.jpg",
                                   "--output", "{tmp}/a_file"], 2, "a_file"),
    ("predict: a folder without images", ["predict.py", "--checkpoint", "{tmp}/empty", "--input", "{tmp}/empty",
                                          "--output", "{tmp}/out"], 2, "no images"),
    ("convert: out is a file", ["-m", "vpd_jax.tools.convert", "{tmp}/missing.pth", "--out", "{tmp}/a_file"], 2,
     "a_file"),
    ("convert: missing file", ["-m", "vpd_jax.tools.convert", "{tmp}/missing.pth", "--out", "{tmp}/c"], 1,
     "missing.pth"),
    ("convert: bad crop", ["-m", "vpd_jax.tools.convert", "{tmp}/missing.pth", "--out", "{tmp}/c", "--crop", "7"],
     2, "--crop 7"),
    ("class_embeddings: unknown suffix", ["-m", "vpd_jax.tools.class_embeddings", "--clip", "{tmp}/clip",
                                          "--out", "{tmp}/t.txt"], 2, "t.txt"),
    ("class_embeddings: missing CLIP", ["-m", "vpd_jax.tools.class_embeddings", "--clip", "{tmp}/clip",
                                        "--out", "{tmp}/t.npy"], 1, "clip"),
    ("class_embeddings: out is a folder", ["-m", "vpd_jax.tools.class_embeddings", "--clip", "{tmp}/clip",
                                           "--out", "{tmp}/table.npy"], 2, "table.npy"),
    ("class_embeddings: empty class name", ["-m", "vpd_jax.tools.class_embeddings", "--clip", "{tmp}/clip",
                                            "--out", "{tmp}/t.npy", "--classes", "kitchen,,garage"], 2, "entry 2"),
    ("class_embeddings: duplicate class", ["-m", "vpd_jax.tools.class_embeddings", "--clip", "{tmp}/clip",
                                           "--out", "{tmp}/t.npy", "--classes", "kitchen,garage,kitchen"], 2,
     "'kitchen' repeats entry 1"),
    ("class_embeddings: a file to --classes", ["-m", "vpd_jax.tools.class_embeddings", "--clip", "{tmp}/clip",
                                               "--out", "{tmp}/t.npy", "--classes", "{tmp}/classes.txt"], 2,
     "use --classes_file"),
    ("class_embeddings: no class names", ["-m", "vpd_jax.tools.class_embeddings", "--clip", "{tmp}/clip",
                                          "--out", "{tmp}/t.npy", "--classes_file", "{tmp}/classes.txt"], 2,
     "no class names"),
    ("prepare: data_dir under a file", ["-m", "vpd_jax.data.prepare", "--source", "synthetic", "--data_dir",
                                        "{tmp}/a_file/d"], 2, "a_file"),
    ("prepare: missing flag", ["-m", "vpd_jax.data.prepare", "--source", "bts", "--data_dir", "{tmp}/d"], 2,
     "--bts_dir"),
    ("prepare: missing tree", ["-m", "vpd_jax.data.prepare", "--source", "bts", "--bts_dir", "{tmp}/nyu",
                               "--data_dir", "{tmp}/d"], 1, "nyu"),
    ("prepare: unknown source", ["-m", "vpd_jax.data.prepare", "--source", "nope", "--data_dir", "{tmp}/d"], 2,
     "nope"),
]


@pytest.mark.parametrize("name,args,code,needle", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line(name, args, code, needle, data_dir, places):
    args = [a.format(data=data_dir, tmp=places) for a in args]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", USE_TF="0", JAX_PLATFORMS="cpu",
               VPD_COMPILATION_CACHE=str(ROOT / ".jax_cache"))
    env.pop("VPD_DEBUG", None)
    p = subprocess.run([PY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == code, f"{name}: exit {p.returncode}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert 1 <= len(lines) <= 3, p.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], lines
    assert not (places / "wd").exists() or not any((places / "wd").iterdir()), "a failed start wrote the workdir"
