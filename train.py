"""Train VPD: ``python train.py --config=configs/nyu_480.py --workdir=workdir/nyu_480 [--config.x=y ...]``.

A workdir that holds a checkpoint resumes from it; ``--config.init_from=SOURCE`` seeds a new run from a trained
VPD. All logic lives in ``vpd_jax.training.trainer``.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # configs/ import their base from the repo root

from vpd_jax import cli  # noqa: E402
from vpd_jax.training import trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, logs and TensorBoard events go here")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    cli.setup_jax(_CONFIG.value)
    with cli.user_errors():
        summary = trainer.train(_CONFIG.value, _WORKDIR.value)
    print(f"best test RMSE: {summary['best_rmse']:.4f}", flush=True)


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
