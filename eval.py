"""Evaluate VPD on the test split: RMSE/REL/... table on the console and a JSON file.

    python eval.py --config=configs/nyu_480.py --workdir=workdir/nyu_480 [--which=best|latest]
    python eval.py --config=configs/nyu_480.py --checkpoint=vpd_depth_480x480.pth   # official/mmseg file
    python eval.py --config=configs/nyu_480.py --checkpoint=converted_dir/           # vpd_jax.tools.convert
    [--save_predictions=DIR]  16-bit PNGs of depth x1000, like the official released predictions
All logic lives in ``vpd_jax.evaluate``.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # configs/ import their base from the repo root

from vpd_jax import cli, evaluate  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "a training workdir (its best or latest checkpoint)")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "which checkpoint of --workdir")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "a converted folder or an official/mmseg PyTorch file")
_SAVE = flags.DEFINE_string("save_predictions", None, "write 16-bit depth PNGs (mm) here")
_OUT = flags.DEFINE_string("output", None, "metrics JSON (default: <workdir>/eval_<which>.json or eval.json)")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    cli.setup_jax(_CONFIG.value)
    with cli.user_errors():
        evaluate.evaluate_main(_CONFIG.value, workdir=_WORKDIR.value, which=_WHICH.value,
                               checkpoint=_CHECKPOINT.value, save_predictions=_SAVE.value, output=_OUT.value)


if __name__ == "__main__":
    cli.run(main)
