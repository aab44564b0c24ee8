"""The README's `make demo`: synthetic scenes -> train the demo config -> evaluate -> compare with baselines.

1. prepares 256 train / 32 test synthetic scenes (120x160) under demo_out/data (once per scene generator);
2. trains the toy VAE as an autoencoder of the training images into demo_out/vae (the part SD's pretrained VAE
   plays in VPD; vpd_jax/training/autoencoder.py), then trains configs/demo.py into demo_out/workdir. Results
   are reused only when the code and config that produced them are today's (demo_out/fingerprint.txt);
   otherwise both are trained again from scratch;
3. evaluates the last checkpoint with eval.py's code (same TTA and metrics);
4. evaluates, through the same pipeline, two baselines fitted on the training split: constant depths (the mean
   and the median of the valid training depths) and the luminance fit (log depth linear in the log brightness of
   8x8 blocks: the flash-lit rooms' strongest simple cue; vpd_jax/evaluation/baselines.py);
5. prints the metrics of all of them and writes demo_out/demo.png (image | ground truth | prediction).
"""

import hashlib
import os
import pathlib
import shutil
import sys
import time

import numpy as np
from absl import logging as absl_logging

ROOT = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # configs/ import their base from the repo root

from configs import demo as demo_config  # noqa: E402
from vpd_jax import build, cli, evaluate  # noqa: E402
from vpd_jax.data import catalog, prepare, synthetic  # noqa: E402
from vpd_jax.data.loader import make_eval_loader, open_source  # noqa: E402
from vpd_jax.evaluation import baselines  # noqa: E402
from vpd_jax.evaluation import evaluator as E  # noqa: E402
from vpd_jax.training import trainer  # noqa: E402
from vpd_jax.training.autoencoder import train_autoencoder  # noqa: E402
from vpd_jax.weights.diffusers import save_vae_encoder  # noqa: E402

OUT = "demo_out"
AUTOENCODER_STEPS = 250


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def fingerprint(cfg) -> str:
    """A hash of the demo config and every source file that decides the trained model."""
    h = hashlib.sha256(cfg.to_json(sort_keys=True).encode())
    for p in sorted([*ROOT.glob("vpd_jax/**/*.py"), *ROOT.glob("configs/*.py"), ROOT / "demo.py"]):
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def main() -> int:
    absl_logging.set_verbosity(absl_logging.WARNING)
    cfg = demo_config.get_config()
    cli.setup_jax(cfg)

    t0 = time.perf_counter()
    workdir = os.path.join(OUT, "workdir")
    stamp = os.path.join(cfg.data_dir, "synthetic_generator_version.txt")
    if os.path.isdir(cfg.data_dir) and _read(stamp) != str(synthetic.GENERATOR_VERSION):
        print(f"== {cfg.data_dir} holds scenes of an older generator: preparing them again", flush=True)
        shutil.rmtree(cfg.data_dir)
    try:
        catalog.require(cfg.data_dir, cfg.dataset, "test")
    except catalog.DatasetNotFoundError:
        print("== preparing the synthetic scenes", flush=True)
        shutil.rmtree(workdir, ignore_errors=True)
        rc = prepare.main(["--source", "synthetic", "--num_train", "256", "--num_test", "32", "--height", "120",
                           "--width", "160", "--data_dir", cfg.data_dir])
        if rc:
            return rc
        with open(stamp, "w") as f:
            f.write(str(synthetic.GENERATOR_VERSION))
    key = fingerprint(cfg)
    key_file = os.path.join(OUT, "fingerprint.txt")
    if _read(key_file) != key:
        for old in (workdir, cfg.pretrained_vae):
            if os.path.isdir(old):
                print(f"== {old} was made by other code or another config: training again from scratch", flush=True)
                shutil.rmtree(old)
    os.makedirs(OUT, exist_ok=True)
    with open(key_file, "w") as f:
        f.write(key)

    if not os.path.isdir(cfg.pretrained_vae):
        print(f"== training the toy VAE as an autoencoder of the training images -> {cfg.pretrained_vae}", flush=True)
        source = open_source(cfg.data_dir, cfg.dataset, cfg.train_split)
        images = np.stack([np.asarray(source[i]["image"]) for i in range(len(source))])
        vae_cfg = build.model_config(cfg).vae
        params, l1 = train_autoencoder(vae_cfg, images, steps=AUTOENCODER_STEPS, seed=cfg.seed,
                                       log=lambda m: print(m, flush=True))
        save_vae_encoder(cfg.pretrained_vae, vae_cfg, params)

    print("== training configs/demo.py", flush=True)
    with cli.user_errors():
        summary = trainer.train(cfg, workdir)
    t_train = time.perf_counter() - t0

    print("== evaluating the saved checkpoint (eval.py --workdir, latest)", flush=True)
    with cli.user_errors():
        res = evaluate.evaluate_main(cfg, workdir=workdir, which="latest", output=os.path.join(OUT, "eval.json"))

    # The baselines, fitted on the training split, evaluated through the same pipeline.
    source = open_source(cfg.data_dir, cfg.dataset, cfg.train_split)
    train = [source[i] for i in range(len(source))]
    depths = np.concatenate([np.asarray(s["depth"], np.float64).ravel() for s in train])
    mean, median = float(depths[depths > 0].mean()), float(np.median(depths[depths > 0]))
    fit = baselines.LuminanceFit.fit(train)
    rows = {"trained demo model": res["metrics"]}
    for label, predict in ((f"constant {mean:.2f} m (mean)", baselines.constant_depth(mean)),
                           (f"constant {median:.2f} m (median)", baselines.constant_depth(median)),
                           ("luminance fit (8x8 blocks)", fit.predict)):
        loader = make_eval_loader(cfg.data_dir, dataset=cfg.dataset, split=cfg.test_split,
                                  batch_size=cfg.eval.batch_size)
        rows[label] = E.Evaluator(None, E.EvalSettings.from_config(cfg.eval)).evaluate(
            None, loader, predict=predict, progress=False)["metrics"]

    m = rows.pop("trained demo model")
    print()
    print(E.format_table({"trained demo model": m, **rows}, names=("rmse", "abs_rel", "d1", "log10")))
    best_rmse = min(r["rmse"] for r in rows.values())
    best_rel = min(r["abs_rel"] for r in rows.values())
    print(f"\nagainst the best baseline: RMSE {m['rmse']:.3f} vs {best_rmse:.3f} m "
          f"({100 * (1 - m['rmse'] / best_rmse):.0f}% lower), REL {m['abs_rel']:.3f} vs {best_rel:.3f} "
          f"({100 * (1 - m['abs_rel'] / best_rel):.0f}% lower)")
    if res.get("pictures"):
        E.save_picture(os.path.join(OUT, "demo.png"), res["pictures"])
        print(f"wrote {OUT}/demo.png (image | ground truth | prediction)")
    print(f"total {time.perf_counter() - t0:.0f}s (training run {t_train:.0f}s, status: {summary['status']})")
    if not (m["rmse"] < best_rmse and m["abs_rel"] < best_rel):
        print("error: the trained model does not beat the baselines", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
