#!/usr/bin/env python
"""Depth for your own images at their own size: 16-bit PNGs, .npy, colour pictures, point clouds.

    python predict.py --checkpoint checkpoints/vpd_nyu --input photos/ --output depth/ --npy --colorbar --ply

See ``python predict.py --help`` and ``vpd_jax/inference/`` (the logic, and the ``Predictor`` Python API).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("USE_TF", "0")  # transformers (for --prompt) must not pull in TensorFlow

from vpd_jax.inference.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
