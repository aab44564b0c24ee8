"""train.py / eval.py end to end as subprocesses on tiny synthetic data (micro model, 64x96 scenes).

Resume: a run SIGKILLed after its first checkpoint and restarted (with ``train.state_layout=auto``) ends with
exactly the parameters of an uninterrupted run.
Errors: a missing data directory, a config typo, an incompatible checkpoint and a
non-finite loss each end in one ``error: ...`` line. Subprocesses share the repo's persistent compile cache
(.jax_cache), so after the first run the steps load instead of compiling.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vpd_jax.training.logging import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable
TOTAL = 6
COMMON = [
    "--config=configs/demo.py",
    "--config.pretrained_vae=",  # the demo's own autoencoder is made by demo.py; a random VAE here
    "--config.aug.preset=official_480",  # every augmentation, so that resuming exactly covers them too
    "--config.train.global_batch_size=4",
    "--config.train.group_size=2",
    "--config.aug.crop_size=(64,64)",
    f"--config.train.total_steps={TOTAL}",
    "--config.optimizer.warmup_steps=2",
    f"--config.optimizer.decay_steps={TOTAL}",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.async_save=False",
    "--config.eval.every_steps=0",
    "--config.eval.batch_size=2",
    "--config.eval.num_pictures=1",
    "--config.log_every_steps=1",
]


def _env():
    env = dict(os.environ)
    env.update(VPD_COMPILATION_CACHE=str(ROOT / ".jax_cache"), TF_CPP_MIN_LOG_LEVEL="3", USE_TF="0",
               JAX_PLATFORMS="cpu")
    return env


def _run(script, *args, check=True, timeout=600):
    p = subprocess.run([PY, script, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _error_lines(p):
    return [line for line in p.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    from vpd_jax.data import prepare

    assert prepare.main(["--source", "synthetic", "--num_train", "16", "--num_test", "4", "--height", "64",
                         "--width", "96", "--data_dir", str(d)]) == 0
    return str(d)


@pytest.fixture(scope="session")
def full_run(data_dir, tmp_path_factory):
    wd = tmp_path_factory.mktemp("full") / "wd"
    p = _run("train.py", *COMMON, f"--config.data_dir={data_dir}", f"--workdir={wd}")
    return wd, p


def _final_params(wd):
    import orbax.checkpoint as ocp

    root = pathlib.Path(wd) / "checkpoints"
    step = max(int(s.name) for s in root.iterdir() if s.name.isdigit())
    ckptr, path = ocp.PyTreeCheckpointer(), root / str(step) / "state"
    # As host numpy arrays, whatever devices (or processes) wrote the checkpoint.
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)  # orbax 0.12: StepMetadata -> the tree's metadata
    meta = getattr(meta, "tree", meta)
    import jax

    tree = ckptr.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta))
    return step, tree["params"], tree["opt_state"]


def test_train_runs_logs_and_checkpoints(full_run):
    wd, p = full_run
    assert "compiled the train step" in p.stdout
    assert f"step {TOTAL}/{TOTAL}" in p.stdout and "img/s" in p.stdout and "MFU" in p.stdout
    assert (wd / "eval" / f"step_{TOTAL}.json").exists() and (wd / "pictures" / f"step_{TOTAL}.png").exists()
    steps = sorted(int(s.name) for s in (wd / "checkpoints").iterdir() if s.name.isdigit())
    assert steps == [TOTAL - 2, TOTAL]  # keep=2
    assert any((wd / "best").iterdir())
    assert list((wd / "tb").iterdir())  # TensorBoard events
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, TOTAL + 1))
    assert all({"loss", "lr", "grad_norm"} <= set(r) for r in train)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [TOTAL] and evals[0]["rmse"] > 0


def test_killed_run_resumes_to_identical_params(full_run, data_dir, tmp_path):
    wd = tmp_path / "wd"
    args = [PY, "train.py", *COMMON, f"--config.data_dir={data_dir}", f"--workdir={wd}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = wd / "checkpoints" / "2"
    deadline = time.time() + 400
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [int(s.name) for s in (wd / "checkpoints").iterdir() if s.name.isdigit()]
    assert done and max(done) < TOTAL, f"the run finished before it was killed ({done})"
    # The restart also lets XLA pick the state's layouts (train.state_layout=auto): the restored state moves into
    # them and the result must not change (on a CPU XLA picks the default layouts; GPUs differ).
    p = _run("train.py", *COMMON, f"--config.data_dir={data_dir}", f"--workdir={wd}",
             "--config.train.state_layout=auto")
    assert "resumed from" in p.stdout
    step_a, params_a, opt_a = _final_params(full_run[0])
    step_b, params_b, opt_b = _final_params(wd)
    assert step_a == step_b == TOTAL
    import jax

    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(opt_a), jax.tree.leaves(opt_b), strict=True):
        np.testing.assert_array_equal(a, b)


def test_eval_cli_workdir_and_predictions(full_run, data_dir, tmp_path):
    wd, _ = full_run
    out = tmp_path / "m.json"
    preds = tmp_path / "preds"
    # A workdir named relative to the working folder (eval.py runs in the repository root), as users type it.
    rel = os.path.relpath(wd, ROOT)
    p = _run("eval.py", *COMMON, f"--config.data_dir={data_dir}", f"--workdir={rel}", "--which=latest",
             f"--output={out}", f"--save_predictions={preds}")
    assert "rmse" in p.stdout and "abs_rel" in p.stdout
    m = json.loads(out.read_text())
    assert m["num_images"] == 4 and np.isfinite(m["metrics"]["rmse"])
    pngs = sorted(preds.iterdir())
    assert len(pngs) == 4
    import cv2

    depth = cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED)
    assert depth.dtype == np.uint16 and depth.shape == (64, 96)
    # The end-of-training evaluation of the same weights gave the same numbers.
    train_eval = json.loads((wd / "eval" / f"step_{TOTAL}.json").read_text())["metrics"]
    assert m["metrics"]["rmse"] == pytest.approx(train_eval["rmse"], rel=1e-5)
    best = _run("eval.py", *COMMON, f"--config.data_dir={data_dir}", f"--workdir={wd}", "--which=best",
                f"--output={tmp_path / 'b.json'}")
    assert json.loads((tmp_path / "b.json").read_text())["metrics"]["rmse"] == pytest.approx(
        train_eval["rmse"], rel=1e-5), best.stdout


def test_missing_data_dir_is_one_error(tmp_path):
    p = _run("train.py", *COMMON, f"--config.data_dir={tmp_path / 'nothing'}", f"--workdir={tmp_path / 'wd'}",
             check=False)
    assert p.returncode == 1
    assert len(_error_lines(p)) == 1 and "does not exist" in _error_lines(p)[0]
    assert "Traceback" not in p.stderr


def test_config_typo_is_one_error(tmp_path):
    p = _run("train.py", *COMMON, "--config.train.totl_steps=3", f"--workdir={tmp_path / 'wd'}", check=False)
    assert p.returncode == 2
    assert len(_error_lines(p)) == 1 and "total_steps" in _error_lines(p)[0]
    assert "Traceback" not in p.stderr


def test_incompatible_checkpoint_is_one_error(full_run, data_dir):
    wd, _ = full_run
    for which in ("latest", "best"):
        p = _run("eval.py", *COMMON, f"--config.data_dir={data_dir}", "--config.model.size=tiny", f"--workdir={wd}",
                 f"--which={which}", check=False)
        assert p.returncode == 1, p.stderr[-2000:]
        assert len(_error_lines(p)) == 1 and "does not fit" in _error_lines(p)[0]
        assert "Traceback" not in p.stderr


def test_non_finite_loss_stops_with_message(data_dir, tmp_path):
    wd = tmp_path / "wd"
    p = _run("train.py", *COMMON, f"--config.data_dir={data_dir}", f"--workdir={wd}",
             "--config.optimizer.max_lr=1e30", check=False)
    assert p.returncode == 1, p.stderr[-2000:]
    err = _error_lines(p)
    assert len(err) == 1 and "non-finite" in err[0] and "stopped without saving" in err[0]
    assert "Traceback" not in p.stderr


def test_predictor_loads_a_training_workdir(full_run):
    wd, _ = full_run
    from vpd_jax import Predictor

    predictor = Predictor.from_checkpoint(str(wd))  # the best-by-RMSE weights, crop from the run's config
    assert predictor.crop == (64, 64)
    depth = predictor.predict(np.full((64, 96, 3), 128, np.uint8))
    assert depth.shape == (64, 96) and depth.dtype == np.float32 and np.all((depth > 0) & (depth < 10))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(full_run, data_dir, tmp_path):
    """train.py on 2 localhost processes (jax.distributed, CPU collectives, one device each) with the same
    global batch: each host reads its half of every global batch, and the final weights equal the
    single-process run's up to float reduction order."""
    wd = tmp_path / "wd"
    address = f"localhost:{_free_port()}"
    procs = []
    for pid in range(2):
        env = {**_env(), "VPD_COORDINATOR_ADDRESS": address, "VPD_NUM_PROCESSES": "2", "VPD_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen([PY, "train.py", *COMMON, f"--config.data_dir={data_dir}", f"--workdir={wd}"],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"process failed ({p.returncode}):\n{out[-2000:]}\n{err[-3000:]}"
    assert "2 processes" in outs[0][0] and f"step {TOTAL}/{TOTAL}" in outs[0][0]
    step_a, params_a, _ = _final_params(full_run[0])
    step_b, params_b, _ = _final_params(wd)
    assert step_a == step_b == TOTAL
    import jax

    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True)]
    # Same batches, same groups: only the all-reduce order differs, so the first updates agree to float32
    # rounding (measured: steps 1-2 bit for bit, step 3 to 2.5e-7), where another batch or group split would
    # already change the first loss (group-pooled SiLog). From there the demo recipe (a random UNet at the full
    # learning rate, reference init with the depth layer at N(0, 0.001)) amplifies rounding about 1000x per
    # update: Adam gives +-lr to elements whose gradient rounding alone decides. After 6 updates the typical
    # leaf differs by 1e-4 (measured median 9.4e-5 and 1.8e-4, largest 3.5e-3), against the ~lr (2e-3) per
    # update that a different batch moves every leaf by; the test RMSE agrees to 5e-7.
    losses = [[r["loss"] for r in read_metrics(str(d)) if r["kind"] == "train"] for d in (full_run[0], wd)]
    assert len(losses[0]) == len(losses[1]) == TOTAL
    np.testing.assert_allclose(losses[1][:3], losses[0][:3], rtol=1e-6, atol=0)
    assert np.median(diffs) < 5e-4 and max(diffs) < 1e-2, sorted(diffs)[-5:]
    evals = [json.loads((d / "eval" / f"step_{TOTAL}.json").read_text()) for d in (full_run[0], wd)]
    assert abs(evals[0]["metrics"]["rmse"] - evals[1]["metrics"]["rmse"]) < 1e-4


def _damage(step_dir: pathlib.Path, how: str) -> None:
    """Truncate (or delete) the array files of a checkpoint, as a failing disk or an interrupted copy does."""
    data = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data, f"no array files under {step_dir}"
    for p in data:
        if how == "truncate":
            with open(p, "r+b") as f:
                f.truncate(p.stat().st_size // 2)
        else:
            p.unlink()


def test_a_damaged_checkpoint_is_set_aside_and_the_run_resumes_from_the_older(full_run, data_dir, tmp_path):
    """The newest checkpoint's arrays truncated: resuming says so in one line, sets it aside under damaged/, and
    continues from the older checkpoint to exactly the uninterrupted run's parameters. eval.py --which=latest
    passes over a damaged newest checkpoint (deleted arrays) the same way, changing nothing."""
    wd = tmp_path / "wd"
    first = [a for a in COMMON if not a.startswith("--config.train.total_steps")] + ["--config.train.total_steps=4"]
    _run("train.py", *first, f"--config.data_dir={data_dir}", f"--workdir={wd}")
    _damage(wd / "checkpoints" / "4", "truncate")
    p = _run("train.py", *COMMON, f"--config.data_dir={data_dir}", f"--workdir={wd}")
    lines = [line for line in p.stdout.splitlines() if " is damaged" in line]
    assert len(lines) == 1 and "checkpoint 4 is damaged" in lines[0] and "set aside" in lines[0], p.stdout
    assert f"resumed from {wd}/checkpoints/2" in p.stdout and "Traceback" not in p.stderr
    assert (wd / "damaged" / "checkpoints_4" / "state").is_dir()
    step_a, params_a, _ = _final_params(full_run[0])
    step_b, params_b, _ = _final_params(wd)
    assert step_a == step_b == TOTAL
    import jax

    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(a, b)

    _damage(wd / "checkpoints" / str(TOTAL), "delete")
    before = sorted(str(x) for x in wd.rglob("*"))
    e = _run("eval.py", f"--workdir={wd}", "--which=latest", f"--output={tmp_path / 'm.json'}")
    source = json.loads((tmp_path / "m.json").read_text())["source"]
    assert "(latest, step 4; passed over:" in source and f"checkpoints/{TOTAL} is damaged" in source, source
    assert "Traceback" not in e.stderr
    assert sorted(str(x) for x in wd.rglob("*") if x.name != "m.json") == before
