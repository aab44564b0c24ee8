"""Small Flax layers shared by the UNet, the VAE encoder and the VPD head, with PyTorch's numerics.

Normalisations compute their statistics in float32 whatever the compute dtype, with a two-pass variance (as
PyTorch and CompVis' ``GroupNorm32`` do; GroupNorm's is shifted and summed in two stages so that it does not
depend on the batch size); GroupNorm over bf16/fp16 activations uses a one-pass variance instead
(``_group_stats``). Their gradients are written out (``custom_vjp``). Resizes follow
``torch.nn.functional.interpolate`` index rules. Parameter names (``scale``, ``bias``, ``kernel``) are Flax's,
so diffusers' Flax weight files load unchanged.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any


# Elements per first-stage partial sum of ``pixel_sum`` (pixels x the inner axes summed with them).
SUM_BLOCK = 512


def _pixel_block(m: int, inner: int) -> int | None:
    """Pixels per first-stage block of ``pixel_sum`` for ``m`` pixels of ``inner`` elements each: a divisor of
    ``m`` near ``SUM_BLOCK / inner`` (0: none, pad ``m`` to a multiple of it; None: one reduction is exact
    enough)."""
    if m * inner <= 4 * SUM_BLOCK:
        return None
    t = max(1, SUM_BLOCK // inner)
    for b in (*range(t, 2 * t + 1), *range(t - 1, max(1, t // 4) - 1, -1)):
        if m % b == 0 and b < m:
            return b
    return 0


def pixel_sum(v: jax.Array, inner_axes: tuple[int, ...] = ()) -> jax.Array:
    """Sum of ``v`` (N, M, ...) over axis 1 (an image's M pixels) and ``inner_axes``, accurate at any batch size.

    XLA:CPU lowers a large reduction one way for batches of 1-3 and another from 4 on, where a float32 sum of an
    image's pixels drifts by up to 1e-5 relative (a GroupNorm output by 1e-4 at SD's VAE resolution). Two
    stages, partial sums over blocks of about ``SUM_BLOCK`` elements and then over the blocks, with an
    optimisation barrier between them so that XLA cannot fold them back into one reduction, keep it within
    float32 rounding (1e-7) at every batch size (tests/test_layers.py). On GPUs the second stage reduces a
    tensor a few hundred times smaller than the first.
    """
    n, m = v.shape[:2]
    inner = int(np.prod([v.shape[a] for a in inner_axes], dtype=np.int64))
    b = _pixel_block(m, inner)
    if b is None:
        return jnp.sum(v, axis=(1, *inner_axes))
    if b == 0:  # no divisor near the block size (a large prime pixel count): zeros do not change the sum
        b = max(1, SUM_BLOCK // inner)
        v = jnp.pad(v, [(0, 0), (0, (-m) % b)] + [(0, 0)] * (v.ndim - 2))
        m = v.shape[1]
    part = jnp.sum(v.reshape(n, m // b, b, *v.shape[2:]), axis=(2, *(a + 1 for a in inner_axes)))
    return jnp.sum(jax.lax.optimization_barrier(part), axis=1)


def _group_stats(x: jax.Array, num_groups: int, epsilon: float):
    """Per (image, group) statistics of ``x`` (N, ..., C) in float32: ``(shift, offset, rstd)``, each (N, 1, G, 1),
    such that the normalised value is ``((x - shift) - offset) * rstd``.

    float32 inputs: a shifted two-pass computation. ``shift`` is the group mean (``pixel_sum``); a second pass
    over ``d = x - shift`` gives ``offset = mean(d)``, which corrects the rounding of ``shift``, and the variance
    ``mean(d^2) - offset^2``. ``x - shift`` is exact for the values near the mean, so the result is the float64
    one up to float32 rounding of the output (1e-6 at every batch size, with group means 50 standard deviations
    from zero; a plain two-pass ``x - mean`` inherits the mean's rounding, 1e-5 there). Same passes over ``x``
    as PyTorch's two-pass statistics.

    Half-precision inputs (bf16 training) get a one-pass variance, ``mean(x^2) - mean^2`` accumulated in float32
    (``offset`` 0): XLA computes both sums in the kernel that produces ``x`` and never reads ``x`` again for its
    statistics. The cancellation error, about ``2^-24 (mean/std)^2`` relative, stays below bf16's own rounding
    (``2^-8``) unless a group's mean is more than ~100 standard deviations from zero.
    """
    n, c = x.shape[0], x.shape[-1]
    g = x.astype(jnp.float32).reshape(n, -1, num_groups, c // num_groups)
    count = g.shape[1] * g.shape[3]

    def group_mean(v):
        return (pixel_sum(v, (3,)) / count)[:, None, :, None]

    if jnp.dtype(x.dtype).itemsize < 4:
        mean = jnp.mean(g, axis=(1, 3), keepdims=True)
        var = jnp.maximum(jnp.mean(jnp.square(g), axis=(1, 3), keepdims=True) - jnp.square(mean), 0.0)
        return mean, jnp.zeros_like(mean), jax.lax.rsqrt(var + epsilon)
    shift = group_mean(g)
    d = g - shift
    offset = group_mean(d)
    var = jnp.maximum(group_mean(jnp.square(d)) - jnp.square(offset), 0.0)
    return shift, offset, jax.lax.rsqrt(var + epsilon)


def _group_xhat(x: jax.Array, shift: jax.Array, offset: jax.Array, rstd: jax.Array) -> jax.Array:
    """The normalised ``x`` in float32, shaped (N, M, C) with M the pixels of one image."""
    n, c = x.shape[0], x.shape[-1]
    g = x.astype(jnp.float32).reshape(n, -1, shift.shape[2], c // shift.shape[2])
    return (((g - shift) - offset) * rstd).reshape(n, -1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float, dtype) -> jax.Array:
    """``torch.nn.functional.group_norm`` over N...C: float32 statistics (``_group_stats``), output in ``dtype``.

    The gradient is written out (``custom_vjp``) rather than differentiated through the statistics: one
    reduction over the pixels gives, per image and channel, ``sum(dy * xhat)`` and ``sum(dy)``, from which come
    the scale and bias gradients and the two per-group terms of ``dx``; a second kernel forms ``dx``.
    Mathematically the same gradient (float32 rounding apart; within 1e-5 of PyTorch's float64 autograd,
    tests/test_layers.py). On an H100 (deviceless XLA:GPU) one GroupNorm + SiLU at SD's 64x64x320 moves 40%
    fewer bytes than its autodiff (0.29 vs 0.49 GiB at batch 8). For float32 inputs the pixel sums of both
    directions are ``pixel_sum``'s, so neither depends on the batch size.
    """
    return _group_norm_fwd(x, scale, bias, num_groups, epsilon, dtype)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon, dtype):
    shift, offset, rstd = _group_stats(x, num_groups, epsilon)
    y = _group_xhat(x, shift, offset, rstd) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.reshape(x.shape).astype(dtype), (x, shift, offset, rstd, scale, bias)


def _group_norm_bwd(num_groups, epsilon, dtype, res, dy):
    del epsilon, dtype
    x, shift, offset, rstd, scale, bias = res
    n, c = x.shape[0], x.shape[-1]
    cg = c // num_groups
    count = (x.size // (n * c)) * cg  # elements per (image, group)
    s = scale.astype(jnp.float32)
    dyf = dy.astype(jnp.float32).reshape(n, -1, c)
    xhat = _group_xhat(x, shift, offset, rstd)
    if jnp.dtype(x.dtype).itemsize < 4:  # half precision: one fused reduction, as fast as it gets
        a, b = jnp.sum(dyf * xhat, axis=1), jnp.sum(dyf, axis=1)  # (N, C)
    else:
        a, b = pixel_sum(dyf * xhat), pixel_sum(dyf)
    mean_dxhat_xhat = jnp.sum((a * s).reshape(n, num_groups, cg), axis=-1)[:, None, :, None] / count
    mean_dxhat = jnp.sum((b * s).reshape(n, num_groups, cg), axis=-1)[:, None, :, None] / count
    dxhat = (dyf * s).reshape(n, -1, num_groups, cg)
    dx = rstd * (dxhat - mean_dxhat - xhat.reshape(dxhat.shape) * mean_dxhat_xhat)
    return dx.reshape(x.shape).astype(x.dtype), jnp.sum(a, 0).astype(scale.dtype), jnp.sum(b, 0).astype(bias.dtype)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def _ln_stats(x: jax.Array, epsilon: float):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return mean, jax.lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype) -> jax.Array:
    """``torch.nn.functional.layer_norm`` over the last axis: float32 statistics (two-pass), output in ``dtype``.

    Like ``group_norm``, the gradient is written out: one row reduction for ``dx``'s two terms, one column
    reduction for the scale and bias gradients.
    """
    return _layer_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
    mean, rstd = _ln_stats(x, epsilon)
    y = (x.astype(jnp.float32) - mean) * rstd
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(epsilon, dtype, res, dy):
    del epsilon, dtype
    x, mean, rstd, scale, bias = res
    dyf = dy.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dxhat = dyf * scale.astype(jnp.float32)
    dx = rstd * (dxhat - jnp.mean(dxhat, axis=-1, keepdims=True)
                 - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
    axes = tuple(range(x.ndim - 1))
    return (dx.astype(x.dtype), jnp.sum(dyf * xhat, axis=axes).astype(scale.dtype),
            jnp.sum(dyf, axis=axes).astype(bias.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class GroupNorm(nn.Module):
    """``torch.nn.GroupNorm`` over NHWC (or N...C) inputs; statistics in float32 (two-pass for float32 inputs)."""

    num_groups: int
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        return group_norm(x, scale, bias, self.num_groups, float(self.epsilon), jnp.dtype(self.dtype))


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm`` over the last axis; float32 statistics, two-pass variance."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        return layer_norm(x, scale, bias, float(self.epsilon), jnp.dtype(self.dtype))


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of PyTorch's ``mode='nearest'`` resize: ``min(floor(i * in/out), in-1)`` in float32."""
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """NHWC nearest-neighbour resize with PyTorch's index rule (an exact x2 is a repeat)."""
    h, w = x.shape[1], x.shape[2]
    oh, ow = size
    if (oh, ow) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if oh != h:
        x = jnp.take(x, jnp.asarray(nearest_indices(h, oh)), axis=1)
    if ow != w:
        x = jnp.take(x, jnp.asarray(nearest_indices(w, ow)), axis=2)
    return x


def _axis_taps(in_size: int, out_size: int):
    # Half-pixel centres (align_corners=False), negative source clamped to 0, upper tap clamped to the
    # last pixel: torch F.interpolate(mode="bilinear", align_corners=False, antialias=False) and cv2
    # INTER_LINEAR agree on this, for up- and down-sampling alike (neither antialiases). The source
    # coordinate is rounded like torch's CPU kernel: float32 scale, one fused multiply-add, float32
    # result. At x ~ 600 other roundings move the weights by up to 1e-4 (measured against torch 2.13).
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    dst = np.arange(out_size, dtype=np.float64)
    src = np.maximum((scale * (dst + 0.5) - 0.5).astype(np.float32), np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return i0, i1, w1


def resize_bilinear(x, size: tuple[int, int], *, axes: tuple[int, int] = (1, 2)):
    """Bilinear resize of two axes (default: H, W of NHWC or of (B, H, W)) to ``size = (h, w)``.

    Matches ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` on float input. uint8
    input returns uint8 rounded to nearest, like cv2's fixed-point INTER_LINEAR (which can differ by 1).
    """
    x = jnp.asarray(x)
    is_uint8 = x.dtype == jnp.uint8
    y = x.astype(jnp.float32) if is_uint8 or not jnp.issubdtype(x.dtype, jnp.floating) else x
    for axis, out in zip(axes, size, strict=True):
        in_size = y.shape[axis]
        if in_size == out:
            continue
        i0, i1, w1 = _axis_taps(in_size, out)
        shape = [1] * y.ndim
        shape[axis] = out
        w1 = jnp.asarray(w1, y.dtype).reshape(shape)
        y = jnp.take(y, i0, axis=axis) * (1 - w1) + jnp.take(y, i1, axis=axis) * w1
    if is_uint8:
        y = jnp.clip(jnp.round(y), 0, 255).astype(jnp.uint8)
    return y


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """diffusers' ``get_timestep_embedding``: sinusoids of ``timesteps`` (B,) -> (B, dim) in float32."""
    half = dim // 2
    # float32 throughout, in torch's order of operations, so the frequencies match bit for bit.
    exponent = np.float32(-np.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - freq_shift)
    freqs = jnp.exp(jnp.asarray(exponent, jnp.float32))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


ATTENTION_IMPLS = (None, "einsum", "xla", "cudnn", "cudnn_or_xla")
_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """A fallback is logged once per process (as a warning) when it is taken (at trace time)."""
    if message not in _SAID:
        _SAID.add(message)
        logging.getLogger("vpd_jax").warning(message)


def attention(q, k, v, *, scale: float, impl: str | None = None):
    """Softmax attention over (B, T, N, H) inputs; logits and softmax in float32.

    ``impl``: ``"xla"``/``"cudnn"`` call ``jax.nn.dot_product_attention`` with that implementation;
    ``"cudnn_or_xla"`` takes cuDNN's fused kernel where it accepts the shape (head dim <= 128: SD-1.5's 1280-wide
    levels have 160) and XLA's elsewhere, which is what ``None`` does for bf16/fp16 on GPUs (and what a
    deviceless GPU compile on a CPU host must ask for by name, benchmarks/memory_aot.py --target);
    ``"einsum"`` is a head-major formulation that XLA's CPU backend runs about twice as fast as
    ``jax.nn.dot_product_attention``'s XLA path (benchmarks/bench_unet.py). ``None`` picks ``"einsum"`` on CPU,
    cuDNN's fused attention on GPUs for bf16/fp16 inputs (``jax.nn.dot_product_attention``'s own default is XLA,
    which materialises the (B, N, T, T) logits: 0.207 s against 0.138 s per bf16 train step on an H100,
    benchmarks/bench_train_step.py), and XLA otherwise. A single key takes an exact shortcut (below).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {impl!r} is not one of {ATTENTION_IMPLS}")
    if k.shape[1] == 1:
        # One key (VPD's one-token text context): the softmax over it is exactly 1, so every query gets that
        # key's value, bit for bit what the full computation gives; no logits, and no kernel that refuses
        # a length-1 key sequence (cuDNN's fused attention does).
        return jnp.broadcast_to(v, (*q.shape[:-1], v.shape[-1])).astype(q.dtype)
    if impl is None:
        backend = jax.default_backend()
        if backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            impl = "cudnn_or_xla"  # cuDNN's fused flash attention: 1.5x the whole bf16 train step on an H100
        else:
            impl = "einsum" if backend == "cpu" else "xla"
    if impl == "cudnn_or_xla":
        try:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError) as e:  # a shape, cuDNN version or host it refuses
            _say_once(f"attention: cuDNN's fused kernel does not take q{tuple(q.shape)} {q.dtype} "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); XLA's attention "
                      "runs there instead")
            impl = "xla"
    if impl != "einsum":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)
    dtype = q.dtype
    qh, kh, vh = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # (B, N, T, H)
    logits = jnp.einsum("bnth,bnsh->bnts", qh, kh, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bnts,bnsh->bnth", probs, vh, preferred_element_type=jnp.float32).astype(dtype)
    return jnp.swapaxes(out, 1, 2)


def attention_map(q, k, *, scale: float):
    """The attention probabilities of (B, T, N, H) queries over (B, S, N, H) keys, averaged over the N heads:
    (B, T, S) float32, each row summing to 1.

    The explicit softmax of ``attention``'s ``"einsum"`` formulation (float32 logits), for the layers whose maps
    are wanted (VPD's cross-attention features); ``attention`` itself still computes the layer's output with
    whatever kernel it picks, so asking for the map never changes the output. Where the output is computed by the
    ``"einsum"`` path (CPU), XLA computes the shared logits once. The mean over heads is that of
    ``vpd/models.py`` of wl-zhao/VPD (``rearrange(attn, '(b h) k c -> h b k c', h=h).mean(0)``).
    """
    if k.shape[1] == 1:  # softmax over a single key: exactly 1 (as ``attention``'s shortcut)
        return jnp.ones((q.shape[0], q.shape[1], 1), jnp.float32)
    qh, kh = (jnp.swapaxes(a, 1, 2) for a in (q, k))  # (B, N, T, H)
    logits = jnp.einsum("bnth,bnsh->bnts", qh, kh, preferred_element_type=jnp.float32) * scale
    return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1)
