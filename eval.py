"""Evaluate VPD on the test split: RMSE/REL/... table on the console and a JSON file.

    python eval.py --workdir=workdir/nyu_480 [--which=best|latest]          # the run's own config
    python eval.py --config=configs/nyu_480.py --workdir=workdir/nyu_480     # or another config's settings
    python eval.py --config=configs/nyu_480.py --checkpoint=vpd_depth_480x480.pth   # official/mmseg file
    python eval.py --config=configs/nyu_480.py --checkpoint=converted_dir/           # vpd_jax.tools.convert
    [--save_predictions=DIR]  16-bit PNGs of depth x1000, like the official released predictions

The same command is installed as ``vpd-eval``; the logic lives in ``vpd_jax.cli`` and ``vpd_jax.evaluate``.
"""

from vpd_jax.cli import eval_main

if __name__ == "__main__":
    eval_main()
