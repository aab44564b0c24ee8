"""Train VPD: ``python train.py --config=configs/nyu_480.py --workdir=workdir/nyu_480 [--config.x=y ...]``.

A workdir that holds a checkpoint resumes from it; ``--config.init_from=SOURCE`` seeds a new run from a trained
VPD. The same command is installed as ``vpd-train``; the logic lives in ``vpd_jax.cli`` and
``vpd_jax.training.trainer``.
"""

from vpd_jax.cli import train_main

if __name__ == "__main__":
    train_main()
