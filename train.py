"""Train VPD: ``python train.py --config=configs/nyu_480.py --workdir=workdir/nyu_480 [--config.x=y ...]``.

A workdir that holds a checkpoint resumes from it. All logic lives in ``vpd_jax.training.trainer``.
"""

import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, logs and TensorBoard events go here")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from vpd_jax.training import cli

    cli.setup_jax(_CONFIG.value)
    from vpd_jax.training import trainer

    with cli.user_errors():
        summary = trainer.train(_CONFIG.value, _WORKDIR.value)
    print(f"best test RMSE: {summary['best_rmse']:.4f}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, ".")  # configs/ import their base from the repo root
    from vpd_jax.training import cli

    cli.run(main)
