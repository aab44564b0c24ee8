"""The encoder half of Stable Diffusion's ``AutoencoderKL`` in Flax linen: image -> posterior mean.

VPD encodes with ``encode(x).mode()``, i.e. the mean of the diagonal Gaussian, and does **not** multiply by
the 0.18215 scaling factor (wl-zhao/VPD depth/models_depth/model.py; mmsegmentation
mmseg/models/backbones/vpd.py), so neither does this module. Numerics follow PyTorch/CompVis:
GroupNorm epsilon 1e-6 with float32 two-pass statistics, the asymmetric (0, 1, 0, 1) padding before each
stride-2 downsampling conv, and a single-head mid-block attention with biased q/k/v projections.

Parameter names are those of diffusers' ``FlaxAutoencoderKL`` (``encoder/down_blocks_0/resnets_0/conv1``,
``encoder/mid_block/attentions_0/{group_norm,query,key,value,proj_attn}``, ``quant_conv``), so its msgpack
weights load unchanged. ``apply(v, images)`` takes NHWC images in [-1, 1] and returns NHWC latents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from vpd_jax.models.blocks import Downsample2D, ResnetBlock2D
from vpd_jax.models.layers import GroupNorm, attention

Dtype = Any

_IGNORED_KEYS = {
    "_class_name", "_diffusers_version", "_name_or_path", "sample_size", "scaling_factor", "shift_factor",
    "latents_mean", "latents_std", "force_upcast", "up_block_types", "out_channels", "use_post_quant_conv",
    "act_fn",
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKL`` encoder settings; defaults are SD v1.5's VAE."""

    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
            raise ValueError(f"VAEConfig: only DownEncoderBlock2D is supported, got {self.down_block_types}")
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError("VAEConfig: down_block_types and block_out_channels differ in length")

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> VAEConfig:
        """From an ``AutoencoderKL`` ``config.json`` dict; unknown settings raise one error naming them."""
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"VAE config.json: act_fn={config['act_fn']!r} is not supported (only 'silu')")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if k not in fields and k not in _IGNORED_KEYS and not k.startswith("_"))
        if unknown:
            raise ValueError(f"VAE config.json: unknown setting(s) {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class _AttentionBlock(nn.Module):
    """Single-head self-attention over all positions (CompVis ``AttnBlock``), scale C**-0.5."""

    groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        y = GroupNorm(self.groups, 1e-6, name="group_norm", **kw)(x).reshape(b, h * w, 1, c)
        q = nn.Dense(c, name="query", **kw)(y)
        k = nn.Dense(c, name="key", **kw)(y)
        v = nn.Dense(c, name="value", **kw)(y)
        out = attention(q, k, v, scale=c ** -0.5)
        return nn.Dense(c, name="proj_attn", **kw)(out.reshape(b, h * w, c)).reshape(b, h, w, c) + x


class _DownEncoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, 1e-6, name=f"resnets_{i}", **kw)(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, compvis_pad=True, name="downsamplers_0", **kw)(x)
        return x


class _MidBlock(nn.Module):
    channels: int
    groups: int
    add_attention: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(self.channels, self.groups, 1e-6, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = _AttentionBlock(self.groups, name="attentions_0", **kw)(x)
        return ResnetBlock2D(self.channels, self.groups, 1e-6, name="resnets_1", **kw)(x)


class _Encoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans, n = cfg.block_out_channels, len(cfg.block_out_channels)
        x = nn.Conv(chans[0], (3, 3), padding=((1, 1), (1, 1)), name="conv_in", **kw)(x)
        for i in range(n):
            x = _DownEncoderBlock(chans[i], cfg.layers_per_block, cfg.norm_num_groups, i < n - 1,
                                  name=f"down_blocks_{i}", **kw)(x)
        x = _MidBlock(chans[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, 1e-6, name="conv_norm_out", **kw)(x))
        return nn.Conv(2 * cfg.latent_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv_out", **kw)(x)


class VAEEncoder(nn.Module):
    """SD VAE encoder + ``quant_conv``; returns the posterior mean (no 0.18215 scaling).

    Attributes:
      config: the architecture (``VAEConfig.from_diffusers(config_json)``).
      dtype: compute dtype; param_dtype: parameter dtype.
    """

    config: VAEConfig = VAEConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
            raise ValueError(f"VAE encoder: expected NHWC images with {cfg.in_channels} channels, got {images.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        moments = _Encoder(cfg, name="encoder", **kw)(images.astype(self.dtype))
        if cfg.use_quant_conv:
            moments = nn.Conv(2 * cfg.latent_channels, (1, 1), padding="VALID", name="quant_conv", **kw)(moments)
        return moments[..., : cfg.latent_channels]


def init_params(module: VAEEncoder, rng: jax.Array, image_shape=(1, 16, 16, 3)):
    """Random parameters for ``module`` (jitted init on a small dummy image)."""
    return jax.jit(module.init)(rng, jnp.zeros(image_shape, module.dtype))["params"]


# ------------------------------------------------------------------------------- the decoder half

class _Upsample(nn.Module):
    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
        return nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                       param_dtype=self.param_dtype, name="conv")(x)


class VAEDecoder(nn.Module):
    """``post_quant_conv`` + the decoder of diffusers' ``AutoencoderKL`` (its Flax parameter names): latents
    (B, h, w, latent_channels) -> images in [-1, 1] (B, 8h, 8w, 3) for SD's x8 layout. VPD never decodes; this
    half only serves to train a small autoencoder from scratch (the demo's stand-in for SD's pretrained VAE)."""

    config: VAEConfig = VAEConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans = tuple(reversed(cfg.block_out_channels))
        if cfg.use_quant_conv:
            z = nn.Conv(cfg.latent_channels, (1, 1), padding="VALID", name="post_quant_conv", **kw)(z)
        x = nn.Conv(chans[0], (3, 3), padding=((1, 1), (1, 1)), name="decoder_conv_in", **kw)(z)
        x = _MidBlock(chans[0], cfg.norm_num_groups, cfg.mid_block_add_attention, name="decoder_mid_block", **kw)(x)
        for i, c in enumerate(chans):
            for j in range(cfg.layers_per_block + 1):
                x = ResnetBlock2D(c, cfg.norm_num_groups, 1e-6, name=f"decoder_up_blocks_{i}_resnets_{j}", **kw)(x)
            if i < len(chans) - 1:
                x = _Upsample(c, name=f"decoder_up_blocks_{i}_upsamplers_0", **kw)(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, 1e-6, name="decoder_conv_norm_out", **kw)(x))
        return nn.Conv(cfg.in_channels, (3, 3), padding=((1, 1), (1, 1)), name="decoder_conv_out", **kw)(x)
