"""The full SD-1.5 UNet (random weights, 860M parameters) against diffusers' PyTorch model at a 64x64 latent.

Slow (about two minutes on 2 CPU cores: PyTorch init, one compile, one forward each) but kept in CI: it is
the only test that exercises the real architecture's widths, head counts and attention sizes.
"""

from __future__ import annotations

import gc

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from vpd_jax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from vpd_jax.weights.common import check_tree  # noqa: E402
from vpd_jax.weights.diffusers import unet_param_shapes, unet_params_from_torch  # noqa: E402


@pytest.mark.slow
def test_sd15_unet_forward_matches_pytorch():
    diffusers.utils.logging.set_verbosity_error()
    cfg = UNetConfig()
    torch.manual_seed(0)
    pt = diffusers.UNet2DConditionModel(
        block_out_channels=cfg.block_out_channels, down_block_types=cfg.down_block_types,
        up_block_types=cfg.up_block_types, cross_attention_dim=768, attention_head_dim=8).eval()
    assert pt.config.norm_eps == 1e-5 and pt.config.flip_sin_to_cos and pt.config.freq_shift == 0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 64, 64, 4)).astype(np.float32)
    t = np.ones((1,), np.int64)
    ctx = rng.standard_normal((1, 1, 768)).astype(np.float32)
    with torch.inference_mode():
        ref = pt(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    ref = ref.permute(0, 2, 3, 1).numpy()
    params = unet_params_from_torch({k: v.numpy().copy() for k, v in pt.state_dict().items()})
    del pt
    gc.collect()
    module = UNet2DConditionModel(cfg)
    check_tree(unet_param_shapes(module), params, "SD-1.5 UNet")
    ours = np.asarray(jax.jit(module.apply)({"params": params}, x, t, ctx))
    err = float(np.max(np.abs(ours - ref)))
    rel = err / float(np.max(np.abs(ref)))
    # Measured 2.0e-6 absolute, 1.4e-6 relative to the output's largest magnitude (development CPU).
    assert rel < 4e-6, f"max abs error {err:.2e} (relative {rel:.2e})"
