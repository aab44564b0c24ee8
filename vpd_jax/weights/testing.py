"""A tiny random VPD checkpoint for tests of the things around the model (the app, the command line).

``micro_config`` narrows ``VPDConfig.tiny`` further (4 UNet levels of 32 channels, an 8-channel VAE, one layer
per block); ``random_variables`` fills it with fan-in scaled random weights drawn in numpy (jax.random's first
call compiles for seconds on CPU); ``save_micro_checkpoint`` writes it as a converted checkpoint folder that
``Predictor.from_checkpoint`` and every command read (tests/test_predict.py and tests/test_app.py use it).
"""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np

from vpd_jax.models.unet import UNetConfig
from vpd_jax.models.vae import VAEConfig
from vpd_jax.models.vpd import VPDConfig, VPDDepth, abstract_variables, with_class_embeddings
from vpd_jax.weights import vpd_checkpoint as vc


def micro_config() -> VPDConfig:
    unet = UNetConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1, attention_head_dim=2,
                      cross_attention_dim=32, norm_num_groups=8)
    vae = VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    return VPDConfig.tiny(unet=unet, vae=vae)


def random_variables(cfg: VPDConfig, seed: int = 0) -> dict:
    """Fan-in scaled random weights; the depth head's last conv scaled up so that depth spreads over metres."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name in ("scale", "var"):
            return np.ones(s.shape, np.float32)
        if name in ("bias", "mean"):
            return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
        if name == "kernel":
            return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
        return (0.5 * rng.standard_normal(s.shape)).astype(np.float32)

    v = jax.tree_util.tree_map_with_path(fill, abstract_variables(VPDDepth(cfg)))
    v["params"]["head"]["depth"]["conv_1"]["kernel"] *= 20
    table = rng.standard_normal((27, cfg.text_dim)).astype(np.float32) * 3
    return with_class_embeddings(v, table)


def save_micro_checkpoint(out_dir: str | os.PathLike, seed: int = 0, crop: int | None = None,
                          config: VPDConfig | None = None) -> pathlib.Path:
    """The micro model (or ``config``'s) with random weights as a converted checkpoint folder at ``out_dir`` (must
    not exist), as ``python -m vpd_jax.tools.convert`` writes one for a released checkpoint."""
    cfg = config or micro_config()
    conv = vc.Conversion(variables=random_variables(cfg, seed), config=cfg, format="official", skipped={},
                         source="vpd_jax.weights.testing micro model")
    return vc.save_converted(conv, out_dir, crop=crop)
