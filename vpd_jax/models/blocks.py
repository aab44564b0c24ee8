"""The blocks the UNet and the VAE share, as diffusers shares them, under diffusers' Flax parameter names."""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from vpd_jax.models.layers import GroupNorm

Dtype = Any


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (``time_embedding_norm='default'``, output scale 1). Called without a time
    embedding it is the VAE's block (no ``time_emb_proj``; the VAE uses ``eps=1e-6``)."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = functools.partial(nn.Conv, self.out_channels, (3, 3), padding=((1, 1), (1, 1)), **kw)
        h = conv(name="conv1")(nn.silu(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x)))
        if temb is not None:
            t = nn.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = conv(name="conv2")(nn.silu(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h)))
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), padding="VALID", name="conv_shortcut", **kw)(x)
        return x + h


class Downsample2D(nn.Module):
    """A stride-2 3x3 convolution: padded by one on every side (the UNet's), or ``compvis_pad`` on the right and
    bottom only (the VAE encoder's, as CompVis and diffusers' ``padding=0`` + ``F.pad(0, 1, 0, 1)``)."""

    channels: int
    compvis_pad: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = ((0, 1), (0, 1)) if self.compvis_pad else ((1, 1), (1, 1))
        return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="conv")(x)
