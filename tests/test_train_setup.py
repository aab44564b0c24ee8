"""What ``train`` checks before it trains: missing weights, conflicting sources, architectures, and a workdir
that a failed start leaves exactly as it was. In-process and before any compilation of the step."""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import pytest

from vpd_jax import build, parallel
from vpd_jax.models.vpd import VPDConfig, VPDDepth
from vpd_jax.training import checkpoint as C
from vpd_jax.training import step as S
from vpd_jax.training import trainer
from vpd_jax.training.checkpoint import CheckpointError
from vpd_jax.training.initialize import random_variables
from vpd_jax.weights import vpd_checkpoint as vc

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import demo, nyu_480  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from vpd_jax.data import prepare

    d = tmp_path_factory.mktemp("data")
    assert prepare.main(["--source", "synthetic", "--num_train", "8", "--num_test", "2", "--height", "64",
                         "--width", "64", "--data_dir", str(d)]) == 0
    return str(d)


def _nyu(data_dir, **model):
    cfg = nyu_480.get_config()
    cfg.data_dir, cfg.dataset = data_dir, "nyu_vpd/synthetic"
    cfg.aug.crop_size = (64, 64)
    cfg.train.global_batch_size, cfg.train.group_size = 2, 2
    for k, v in model.items():
        cfg.model[k] = v
    return cfg


def _listing(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"") for p in sorted(root.rglob("*"))}


def test_the_nyu_recipe_refuses_to_start_without_sd_weights_or_a_class_table(data_dir, tmp_path):
    cfg = _nyu(data_dir, size="micro")
    with pytest.raises(build.ConfigError) as e:
        trainer.train(cfg, str(tmp_path / "wd"))
    msg = str(e.value)
    assert "--config.pretrained" in msg and "--config.class_embeddings" in msg and "allow_random_init" in msg
    assert "\n" not in msg
    assert not (tmp_path / "wd").exists()  # nothing written before the checks pass
    table = tmp_path / "table.npy"
    np.save(table, np.zeros((27, 32), np.float32))
    cfg.class_embeddings = str(table)
    with pytest.raises(build.ConfigError, match=r"--config\.pretrained .*not given") as e:
        trainer.train(cfg, str(tmp_path / "wd"))
    assert "class_embeddings" not in str(e.value)


def test_init_from_conflicts_and_architectures_are_one_error(data_dir, tmp_path):
    micro = VPDConfig.micro()
    conv = vc.Conversion(variables=random_variables(VPDDepth(micro), 0), config=micro, format="official",
                         skipped={}, source="micro")
    src = vc.save_converted(conv, tmp_path / "micro")
    cfg = _nyu(data_dir, size="micro")
    cfg.init_from, cfg.pretrained = str(src), "runwayml/stable-diffusion-v1-5"
    with pytest.raises(build.ConfigError, match="not both"):
        trainer.train(cfg, str(tmp_path / "wd"))
    cfg = _nyu(data_dir, size="tiny")
    cfg.init_from = str(src)
    with pytest.raises(build.ConfigError, match=r"architecture \(micro\).*model\.size=micro"):
        trainer.train(cfg, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


def test_a_failed_resume_leaves_the_workdir_as_it_was(data_dir, tmp_path):
    """A workdir holding a micro model's checkpoint, resumed with a tiny config: one error, not one byte
    changed (config.json is written only after the restore succeeds)."""
    cfg = demo.get_config()
    cfg.data_dir = data_dir
    model = VPDDepth(build.model_config(cfg))
    tx, _, _ = build.build_optimizer(cfg)
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    state, _ = S.create_train_state_from_variables(random_variables(model, 0), tx, mesh, 0)
    wd = tmp_path / "wd"
    ck = C.Checkpointer(str(wd), keep=2, async_save=False)
    ck.save(state, {"class_embeddings": np.zeros((28, 32), np.float32)}, None, {"step": 0}, force=True)
    ck.close()
    (wd / "config.json").write_text(cfg.to_json(indent=2))
    before = _listing(wd)
    tiny = demo.get_config()
    tiny.data_dir, tiny.model.size = data_dir, "tiny"
    tiny.aug.crop_size = (64, 64)
    with pytest.raises(CheckpointError, match="does not fit"):
        trainer.train(tiny, str(wd))
    assert _listing(wd) == before


def test_a_workdir_that_is_a_file_is_one_error(data_dir, tmp_path):
    f = tmp_path / "wd"
    f.write_text("not a folder")
    with pytest.raises(build.ConfigError, match="not a folder"):
        trainer.train(_nyu(data_dir, size="micro"), str(f))


def test_a_short_run_of_the_demo_recipe_lowers_the_loss(data_dir, tmp_path):
    """40 updates of the toy model on 64x64 rooms: the last 8 losses average well below the first 8."""
    from vpd_jax.training.logging import read_metrics

    cfg = demo.get_config()
    cfg.data_dir, cfg.pretrained_vae = data_dir, ""
    cfg.aug.crop_size = (64, 64)
    cfg.train.global_batch_size, cfg.train.group_size, cfg.train.total_steps = 4, 2, 40
    cfg.optimizer.warmup_steps, cfg.optimizer.decay_steps = 4, 40
    cfg.eval.every_steps, cfg.checkpoint.every_steps, cfg.log_every_steps = -1, 40, 1
    cfg.checkpoint.async_save = False
    trainer.train(cfg, str(tmp_path / "wd"))
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "wd")) if r["kind"] == "train"]
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses


def test_the_toy_autoencoder_learns_and_round_trips(data_dir, tmp_path):
    """The demo's stand-in for SD's pretrained VAE: its reconstruction error falls, and the saved encoder (a
    diffusers Flax folder) loads back into the VPD's VAE unchanged."""
    from vpd_jax.data.loader import open_source
    from vpd_jax.training.autoencoder import train_autoencoder
    from vpd_jax.weights.common import flatten
    from vpd_jax.weights.diffusers import load_vae_encoder, save_vae_encoder

    source = open_source(data_dir, "nyu_vpd/synthetic", "train")
    images = np.stack([np.asarray(source[i]["image"]) for i in range(len(source))])
    vae = VPDConfig.micro().vae
    logged = []
    params, last = train_autoencoder(vae, images, steps=30, batch_size=4, crop=32, log=logged.append)
    first = float(logged[0].rsplit(" ", 1)[-1])
    assert last < 0.8 * first, logged
    out = save_vae_encoder(tmp_path / "vae", vae, params)
    module, loaded = load_vae_encoder(str(out))
    assert module.config == vae
    for k, v in flatten(params).items():
        np.testing.assert_array_equal(flatten(loaded)[k], v, err_msg=k)


def _short_demo(data_dir, total=4):
    cfg = demo.get_config()
    cfg.data_dir, cfg.pretrained_vae = data_dir, ""
    cfg.aug.crop_size = (64, 64)
    cfg.train.global_batch_size, cfg.train.group_size, cfg.train.total_steps = 4, 2, total
    cfg.optimizer.warmup_steps, cfg.optimizer.decay_steps = 2, total
    cfg.eval.every_steps, cfg.checkpoint.every_steps, cfg.log_every_steps = -1, 2, 1
    cfg.checkpoint.async_save = False
    return cfg


def test_a_full_disk_while_saving_is_one_line_and_the_run_resumes_after(data_dir, tmp_path, monkeypatch, capsys):
    """A save that fails with ENOSPC at step 4: one error naming the checkpoint, the cause and the newest intact
    checkpoint (2), the traceback in workdir/errors.log; checkpoint 2 restores, and rerunning the same
    command once the space is back resumes from it and finishes."""
    import errno

    cfg = _short_demo(data_dir)
    wd = tmp_path / "wd"
    real_save = C.Checkpointer.save

    def full_disk(self, state, *args, **kwargs):
        if int(jax.device_get(state.step)) == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(wd / "checkpoints" / "4"))
        return real_save(self, state, *args, **kwargs)

    monkeypatch.setattr(C.Checkpointer, "save", full_disk)
    with pytest.raises(CheckpointError) as e:
        trainer.train(cfg, str(wd))
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and "checkpoint 4" in msg, msg
    assert "newest intact checkpoint is step 2" in msg and "rerun the same command" in msg, msg
    assert "Traceback" in (wd / "errors.log").read_text()
    assert C.latest_step(str(wd)) == 2
    monkeypatch.setattr(C.Checkpointer, "save", real_save)  # space freed
    capsys.readouterr()
    summary = trainer.train(cfg, str(wd))
    assert "resumed from" in capsys.readouterr().out
    assert summary["step"] == 4 and C.latest_step(str(wd)) == 4


def test_an_interrupted_run_says_so_without_an_infinite_rmse(data_dir, tmp_path, capsys):
    cfg = _short_demo(data_dir, total=2)
    summary = trainer.train(cfg, str(tmp_path / "wd"))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary["status"] == "finished" and "no evaluation yet" in last and "inf" not in last, last
