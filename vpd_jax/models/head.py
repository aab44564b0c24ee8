"""VPD's task head around the Stable Diffusion backbone: neck, decoder, depth head and text adapter.

Layer for layer the network of the official ``depth/models_depth/model.py`` (``VPDDepthEncoder`` tail,
``Decoder``, ``last_layer_depth``) and of mmsegmentation's ``VPDDepthHead``
(mmseg/models/decode_heads/vpd_depth_head.py), in NHWC:

* ``Neck``: o11 -> conv3x3 s2, GroupNorm(16), ReLU, conv3x3 s2; o7 -> conv3x3 s2; o1 -> nearest x2, concatenated
  after o4; all four concatenated (o11, o7, o4, o1) -> conv1x1 -> GroupNorm(16) -> ReLU.
* ``Decoder``: 3 x [ConvTranspose 2x2 s2 (no bias), BatchNorm, ReLU], conv3x3, BatchNorm, ReLU, 2 x bilinear x2.
* ``DepthHead``: conv3x3, ReLU, conv3x3 -> 1, ``sigmoid * max_depth``.
* ``TextAdapter``: ``e + gamma * fc2(gelu(fc1(e)))`` with the exact (erf) GELU.

Numerics follow PyTorch, so a converted checkpoint evaluates as it did in PyTorch: norms are computed in fp32
with a two-pass variance; BatchNorm keeps PyTorch's momentum 0.1 and *unbiased* running variance (the running
statistics live in Flax's ``batch_stats`` collection as ``mean``/``var``); 3x3 convs pad 1 on every side
(Flax's ``"SAME"`` would pad stride-2 convs asymmetrically); upsampling is written out elementwise rather than
with ``jax.image.resize``, whose weight-matrix contraction would run at reduced matmul precision on
accelerators. ``dtype`` is the compute dtype and ``param_dtype`` the storage dtype of the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vpd_jax.models.layers import GroupNorm, resize_nearest

Dtype = Any
HEAD_INITS = ("official", "mmseg")


# ------------------------------------------------------------------------------------------- initialisers

def trunc_normal_init(std: float = 0.02, bound: float = 2.0):
    """timm/mmengine ``trunc_normal_(std=std, a=-bound, b=bound)``: the bounds are absolute values, not sigmas.

    At std 0.02 the ±2 bounds sit 100 sigmas out, so this is a plain normal in practice. Flax's own
    ``truncated_normal`` is not this: it truncates at ±2 sigma and rescales the std.
    """

    def init(key, shape, dtype=jnp.float32):
        z = jax.random.truncated_normal(key, -bound / std, bound / std, shape, jnp.float32)
        return (z * std).astype(dtype)

    return init


def torch_linear_bias_init(fan_in: int):
    """PyTorch's default ``Linear``/``Conv`` bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


# PyTorch's default Linear weight init, kaiming_uniform(a=sqrt(5)), is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
normal_0001 = nn.initializers.normal(stddev=0.001)


# ------------------------------------------------------------------------------------------------ layers

def conv(features: int, kernel: int, stride: int = 1, *, name: str, kernel_init, dtype: Dtype,
         param_dtype: Dtype) -> nn.Conv:
    """A PyTorch ``Conv2d(k, stride, padding=k//2)`` with bias, as a Flax conv with explicit symmetric padding."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=True, kernel_init=kernel_init, bias_init=nn.initializers.zeros, dtype=dtype,
                   param_dtype=param_dtype, name=name)


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d`` in both modes, over every axis but the last (channels).

    Training normalises with the biased batch variance and updates the running statistics as PyTorch does:
    ``r = (1 - momentum) * r + momentum * batch_stat`` with the *unbiased* variance for ``var``. Evaluation
    normalises with the running statistics. The statistics are fp32 in the ``batch_stats`` collection
    (``mean``, ``var``), so ``apply(..., mutable=["batch_stats"])`` is needed when ``train`` is true. The
    batch is whatever this call sees (per-device under ``jit``): neither reference syncs BN across GPUs.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        xf = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = xf.mean(axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            if not self.is_initializing():
                n = int(np.prod([x.shape[a] for a in axes]))
                # PyTorch raises for n == 1 in training; keep the update finite instead.
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
                ra_var.value = (1.0 - m) * ra_var.value + m * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class ConvTranspose2x2(nn.Module):
    """``torch.nn.ConvTranspose2d(k=2, stride=2, padding=0, bias=False)``.

    With kernel == stride the output windows do not overlap, so the layer is one contraction and a reshape:
    ``y[b, 2i+a, 2j+c, o] = sum_ch x[b, i, j, ch] * W[ch, o, a, c]``. The kernel is stored as
    ``(a, c, ch, o)`` (Flax's HWIO), i.e. PyTorch's ``(in, out, kh, kw)`` transposed by ``(2, 3, 0, 1)``.
    """

    features: int
    kernel_init: Any = normal_0001
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, cin = x.shape
        kernel = self.param("kernel", self.kernel_init, (2, 2, cin, self.features), self.param_dtype)
        y = jnp.einsum("bijk,acko->biajco", x.astype(self.dtype), kernel.astype(self.dtype))
        return y.reshape(b, 2 * h, 2 * w, self.features)


def _bilinear_2x_axis(x: jax.Array, axis: int) -> jax.Array:
    # align_corners=False at scale 2: output 2i samples input i - 1/4, output 2i+1 samples i + 1/4, and
    # PyTorch clamps the source coordinate at the borders, i.e. edge replication.
    n = x.shape[axis]
    prev = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis),
                            jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis),
                           jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)
    even = 0.25 * prev + 0.75 * x
    odd = 0.75 * x + 0.25 * nxt
    out = jnp.stack([even, odd], axis=axis + 1)
    return out.reshape(*x.shape[:axis], 2 * n, *x.shape[axis + 1:])


def upsample_bilinear_2x(x: jax.Array) -> jax.Array:
    """``nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False)`` in NHWC."""
    return _bilinear_2x_axis(_bilinear_2x_axis(x, 1), 2)


# ----------------------------------------------------------------------------------------------- modules

class Neck(nn.Module):
    """Fuses the UNet features (o11, o7, o4, o1) at strides (8, 16, 32, 64) into one map at stride 32.

    Official ``encoder.{layer1, layer2, out_layer}``; mmseg ``decode_head.{conv1, conv2, conv_aggregation}``.
    The fused channel count is the sum of the four inputs' (3520 for SD-1.5).
    """

    features: int = 1536
    num_groups: int = 16
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, o11: jax.Array, o7: jax.Array, o4: jax.Array, o1: jax.Array) -> jax.Array:
        kw = dict(kernel_init=trunc_normal_init(0.02), dtype=self.dtype, param_dtype=self.param_dtype)
        c11, c7 = o11.shape[-1], o7.shape[-1]
        x = conv(c11, 3, 2, name="layer1_conv_0", **kw)(o11)
        x = GroupNorm(self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype, name="layer1_norm")(x)
        x = nn.relu(x)
        x = conv(c11, 3, 2, name="layer1_conv_1", **kw)(x)
        y = conv(c7, 3, 2, name="layer2_conv", **kw)(o7)
        up = resize_nearest(o1, (2 * o1.shape[1], 2 * o1.shape[2]))
        shapes = {x.shape[1:3], y.shape[1:3], o4.shape[1:3], up.shape[1:3]}
        if len(shapes) != 1:
            raise ValueError(f"Neck: feature maps do not meet at stride 32 (spatial sizes {sorted(shapes)}); "
                             f"pad the image to the UNet's multiple first")
        z = jnp.concatenate([x.astype(self.dtype), y.astype(self.dtype), o4.astype(self.dtype),
                             up.astype(self.dtype)], axis=-1)
        z = conv(self.features, 1, 1, name="out_conv", **kw)(z)
        z = GroupNorm(self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype, name="out_norm")(z)
        return nn.relu(z)


class Decoder(nn.Module):
    """Official ``decoder`` / mmseg ``decode_head.decoder``: upsamples the stride-32 map x32 to full resolution."""

    filters: Sequence[int] = (32, 32, 32)
    features: int = 192
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i, f in enumerate(self.filters):
            x = ConvTranspose2x2(f, name=f"deconv_{i}", **kw)(x)
            x = nn.relu(BatchNorm(name=f"deconv_bn_{i}", **kw)(x, train))
        x = conv(self.features, 3, 1, name="conv", kernel_init=normal_0001, **kw)(x)
        x = nn.relu(BatchNorm(name="conv_bn", **kw)(x, train))
        return upsample_bilinear_2x(upsample_bilinear_2x(x))


class DepthHead(nn.Module):
    """Official ``last_layer_depth`` / mmseg ``depth_pred_layer``, then ``sigmoid * max_depth`` (fp32, NHW1).

    ``init`` picks the reference's initialisation of its two convs: ``"official"`` N(0, 0.001), ``"mmseg"``
    TruncNormal(0.02) (mmseg's head-wide init, which its decoder but not this layer overrides).
    """

    max_depth: float = 10.0
    init: str = "official"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.init not in HEAD_INITS:
            raise ValueError(f"DepthHead.init {self.init!r} is not one of {HEAD_INITS}")
        k_init = normal_0001 if self.init == "official" else trunc_normal_init(0.02)
        kw = dict(kernel_init=k_init, dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv(x.shape[-1], 3, 1, name="conv_0", **kw)(x)
        x = conv(1, 3, 1, name="conv_1", **kw)(nn.relu(x))
        return jax.nn.sigmoid(x.astype(jnp.float32)) * self.max_depth


class VPDHead(nn.Module):
    """Neck, crop to the valid region, decoder and depth head: UNet features -> depth (B, h, w, 1) in metres.

    ``valid`` is the (rows, cols) of the stride-32 map that cover the unpadded image; the rest (the padding)
    is dropped before the decoder, as the references' ``[:-1, :-1]`` / ``fmap_border`` do for 480 in 512.
    """

    neck_features: int = 1536
    neck_groups: int = 16
    deconv_filters: Sequence[int] = (32, 32, 32)
    decoder_features: int = 192
    max_depth: float = 10.0
    head_init: str = "official"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], valid: tuple[int, int] | None = None,
                 train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Neck(self.neck_features, self.neck_groups, name="neck", **kw)(*feats)
        if valid is not None:
            x = x[:, : valid[0], : valid[1]]
        x = Decoder(tuple(self.deconv_filters), self.decoder_features, name="decoder", **kw)(x, train)
        return DepthHead(self.max_depth, self.head_init, name="depth", **kw)(x)


class TextAdapter(nn.Module):
    """Official ``TextAdapterDepth``: ``e + gamma * fc2(gelu(fc1(e)))``, exact GELU, PyTorch default init.

    ``gamma`` is passed in because both references keep it outside the adapter (``encoder.gamma``).
    """

    features: int = 768
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, e: jax.Array, gamma: jax.Array) -> jax.Array:
        d = e.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=torch_linear_kernel_init)
        h = nn.Dense(self.features, bias_init=torch_linear_bias_init(d), name="fc1", **kw)(e)
        h = nn.gelu(h, approximate=False)
        h = nn.Dense(d, bias_init=torch_linear_bias_init(self.features), name="fc2", **kw)(h)
        return (e.astype(self.dtype) + gamma.astype(self.dtype) * h).astype(self.dtype)
