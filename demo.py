"""The README's `make demo`: synthetic scenes -> train the demo config -> evaluate -> compare with a baseline.

1. prepares 256 train / 32 test synthetic scenes (120x160) under demo_out/data (once);
2. trains configs/demo.py into demo_out/workdir (a finished workdir is reused: `rm -rf demo_out` to redo);
3. evaluates the last checkpoint with eval.py's code (same TTA and metrics);
4. evaluates, through the same pipeline, the baseline that predicts for every test image the mean depth of
   the training set (one constant: the mean over all valid training pixels);
5. prints RMSE and REL of both and writes demo_out/demo.png (image | ground truth | prediction).
"""

import os
import shutil
import sys
import time

OUT = "demo_out"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    from configs import demo as demo_config
    from vpd_jax.training import cli

    cfg = demo_config.get_config()
    cli.setup_jax(cfg)
    import numpy as np

    from vpd_jax.data import catalog
    from vpd_jax.data import prepare
    from vpd_jax.data import synthetic
    from vpd_jax.data.loader import make_eval_loader, open_source
    from vpd_jax.evaluation import evaluator as E
    from vpd_jax.training import trainer

    t0 = time.perf_counter()
    workdir = os.path.join(OUT, "workdir")
    stamp = os.path.join(cfg.data_dir, "synthetic_generator_version.txt")
    stale = os.path.isdir(cfg.data_dir) and _read(stamp) != str(synthetic.GENERATOR_VERSION)
    if stale:  # scenes (and a model trained on them) from an older generator: redo both
        print(f"== {cfg.data_dir} holds scenes of an older generator: preparing them again", flush=True)
        shutil.rmtree(cfg.data_dir)
        shutil.rmtree(workdir, ignore_errors=True)
    try:
        catalog.require(cfg.data_dir, cfg.dataset, "test")
    except catalog.DatasetNotFoundError:
        print("== preparing the synthetic scenes", flush=True)
        rc = prepare.main(["--source", "synthetic", "--num_train", "256", "--num_test", "32", "--height", "120",
                           "--width", "160", "--data_dir", cfg.data_dir])
        if rc:
            return rc
        with open(stamp, "w") as f:
            f.write(str(synthetic.GENERATOR_VERSION))

    print("== training configs/demo.py", flush=True)
    with cli.user_errors():
        summary = trainer.train(cfg, workdir)
    t_train = time.perf_counter() - t0

    print("== evaluating the saved checkpoint (eval.py --workdir, latest)", flush=True)
    with cli.user_errors():
        res = E.evaluate_main(cfg, workdir=workdir, which="latest", output=os.path.join(OUT, "eval.json"))

    # The baseline: one constant, the mean of every valid training depth pixel.
    source = open_source(cfg.data_dir, cfg.dataset, cfg.train_split)
    total, count = 0.0, 0
    for i in range(len(source)):
        d = np.asarray(source[i]["depth"], np.float64)
        total, count = total + d[d > 0].sum(), count + int((d > 0).sum())
    mean_depth = total / count
    loader = make_eval_loader(cfg.data_dir, dataset=cfg.dataset, split=cfg.test_split, batch_size=cfg.eval.batch_size)
    baseline = E.Evaluator(None, E.EvalSettings.from_config(cfg.eval)).evaluate(None, loader, predict=lambda im, c: np.full(im.shape[:3], mean_depth, np.float32),
                             progress=False)

    m, b = res["metrics"], baseline["metrics"]
    print()
    print(E.format_table({"trained demo model": m, f"baseline {mean_depth:.2f} m": b},
                         names=("rmse", "abs_rel", "d1", "log10")))
    print(f"\nRMSE {m['rmse']:.3f} vs {b['rmse']:.3f} m ({100 * (1 - m['rmse'] / b['rmse']):.0f}% lower); "
          f"REL {m['abs_rel']:.3f} vs {b['abs_rel']:.3f} ({100 * (1 - m['abs_rel'] / b['abs_rel']):.0f}% lower)")
    if res.get("pictures"):
        E.save_picture(os.path.join(OUT, "demo.png"), res["pictures"])
        print(f"wrote {OUT}/demo.png (image | ground truth | prediction)")
    print(f"total {time.perf_counter() - t0:.0f}s (training run {t_train:.0f}s, status: {summary['status']})")
    if not (m["rmse"] < b["rmse"] and m["abs_rel"] < b["abs_rel"]):
        print("error: the trained model does not beat the baseline", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
