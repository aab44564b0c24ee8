"""VPD's semantic-segmentation neck and head: mmsegmentation's ``FPN`` and ``FPNHead`` (Semantic FPN), in NHWC.

The official segmentation model (wl-zhao/VPD ``segmentation/models/vpd_seg.py``, config
``segmentation/configs/fpn_vpd_sd1-5_512x512_gpu8x2.py`` over ``_base_/models/fpn_r50.py``) feeds the four UNet
feature maps (320, 640 + 150, 1280 + 150 and 1280 channels, at strides 8, 16, 32 and 64 of the image: the
second and third carry the 150 class cross-attention maps) to

* ``FPN(in_channels=[320, 790, 1430, 1280], out_channels=256, num_outs=4)`` (mmseg/models/necks/fpn.py): a 1x1
  lateral conv per level (with bias, no norm, no activation), a top-down pass adding each coarser lateral,
  resized by *nearest* interpolation to the finer one's size (``F.interpolate(size=...)``, so odd sizes follow
  PyTorch's ``floor(i * in / out)`` index rule), then a 3x3 conv per level (with bias, no activation).
  Extra outputs (``num_outs`` above the number of inputs, ``add_extra_convs=False``) are
  ``F.max_pool2d(kernel 1, stride 2)`` of the last one, i.e. every other pixel.
* ``FPNHead(in_channels=[256] * 4, in_index=[0, 1, 2, 3], feature_strides=[4, 8, 16, 32], channels=256,
  dropout_ratio=0.1, num_classes=150, norm_cfg=SyncBN, align_corners=False)``
  (mmseg/models/decode_heads/fpn_head.py, decode_head.py): per level ``max(1, log2(stride / stride_0))``
  ``ConvModule``\\ s (3x3 conv without bias, BatchNorm, ReLU), each but level 0's followed by a bilinear x2
  ``Upsample`` (mmseg/models/utils/wrappers.py: ``F.interpolate(size=2 * input size, align_corners=False)``);
  the levels are summed, each resized bilinearly to level 0's size first (a no-op unless the sizes are odd),
  then ``Dropout2d(0.1)`` (whole channels) and ``conv_seg`` (1x1 conv with bias) -> logits at level 0's
  resolution. Only the ratios of the strides matter.

The segmentor (``encode_decode``) resizes the logits bilinearly to the image size (``resize_bilinear``), and
the training loss (``BaseDecodeHead.loss_by_feat``) resizes them to the label size and applies mmseg's
``CrossEntropyLoss`` (``decode_loss``).

Parameter names mirror mmseg's state-dict keys so that ``vpd_jax.weights.seg_checkpoint`` is a table:
``lateral_convs_{i}`` / ``fpn_convs_{i}`` (``lateral_convs.{i}.conv.*``), ``scale_heads_{i}_{j}/{conv,bn}``
(``scale_heads.{i}.{j}.{conv,bn}.*``; ``j`` is the index in mmseg's ``nn.Sequential``, where the upsamples
take every other slot), ``conv_seg``. BatchNorm is ``vpd_jax.models.head.BatchNorm`` (PyTorch's momentum 0.1,
eps 1e-5, unbiased running variance; running statistics in ``batch_stats``). The reference trains with SyncBN
over 8 GPUs x 2 images; here the statistics are those of the batch the call sees (docs/segmentation.md).
Initialisers are mmseg's: Xavier-uniform convs with zero bias in the neck (``FPN.init_cfg``), Kaiming-normal
(fan_out, ReLU) for the head's ConvModules, N(0, 0.01) for ``conv_seg``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vpd_jax.models.head import BatchNorm, upsample_bilinear_2x
from vpd_jax.models.layers import resize_bilinear, resize_nearest

Dtype = Any

# The official configuration (fpn_vpd_sd1-5_512x512_gpu8x2.py with its _base_ fpn_r50.py).
VPD_SEG_IN_CHANNELS = (320, 790, 1430, 1280)
ADE20K_CLASSES = 150
IGNORE_INDEX = 255

xavier_uniform = nn.initializers.xavier_uniform()  # mmengine XavierInit(distribution='uniform'), gain 1
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # mmcv kaiming_init defaults
normal_001 = nn.initializers.normal(stddev=0.01)


def _conv(features: int, kernel: int, *, use_bias: bool, kernel_init, name: str, dtype: Dtype,
          param_dtype: Dtype) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), use_bias=use_bias,
                   kernel_init=kernel_init, bias_init=nn.initializers.zeros, dtype=dtype, param_dtype=param_dtype,
                   name=name)


def head_lengths(feature_strides: Sequence[int]) -> list[int]:
    """ConvModules per level of ``FPNHead``: ``max(1, int(log2(s_i) - log2(s_0)))``."""
    s0 = feature_strides[0]
    if min(feature_strides) != s0:
        raise ValueError(f"FPNHead: the first stride must be the smallest, got {tuple(feature_strides)}")
    return [max(1, int(np.log2(s) - np.log2(s0))) for s in feature_strides]


def scale_head_layers(feature_strides: Sequence[int]) -> list[list[int]]:
    """Per level, the ``nn.Sequential`` indices of the ConvModules (0, 2, 4, ... where upsamples interleave)."""
    out = []
    for i, n in enumerate(head_lengths(feature_strides)):
        step = 2 if feature_strides[i] != feature_strides[0] else 1
        out.append([k * step for k in range(n)])
    return out


class ConvModule(nn.Module):
    """mmcv ``ConvModule(k, padding=k//2, norm_cfg=BN, act_cfg=ReLU)``: conv (no bias), BatchNorm, ReLU."""

    features: int
    kernel: int = 3
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _conv(self.features, self.kernel, use_bias=False, kernel_init=kaiming_fan_out, name="conv", **kw)(x)
        x = BatchNorm(self.momentum, self.epsilon, name="bn", **kw)(x, train)
        return nn.relu(x)


class FPN(nn.Module):
    """mmseg ``FPN`` with its defaults (no norm, no activation, nearest upsampling by size, no extra convs).

    ``inputs``: the levels finest first, NHWC, each with any spatial size. Returns ``num_outs`` maps of
    ``out_channels`` (``num_outs`` defaults to the number of inputs).
    """

    out_channels: int = 256
    num_outs: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        n = len(inputs)
        num_outs = n if self.num_outs is None else self.num_outs
        if num_outs < n:
            raise ValueError(f"FPN: num_outs {num_outs} is below the number of inputs {n}")
        kw = dict(kernel_init=xavier_uniform, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        laterals = [_conv(self.out_channels, 1, name=f"lateral_convs_{i}", **kw)(x) for i, x in enumerate(inputs)]
        for i in range(n - 1, 0, -1):
            finer = laterals[i - 1]
            laterals[i - 1] = finer + resize_nearest(laterals[i], finer.shape[1:3]).astype(finer.dtype)
        outs = [_conv(self.out_channels, 3, name=f"fpn_convs_{i}", **kw)(x) for i, x in enumerate(laterals)]
        for _ in range(num_outs - n):
            outs.append(outs[-1][:, ::2, ::2])  # F.max_pool2d(x, 1, stride=2)
        return tuple(outs)


class FPNHead(nn.Module):
    """mmseg ``FPNHead`` (Semantic FPN decode head): the neck's maps -> logits (B, h0, w0, num_classes).

    ``train``: BatchNorm on batch statistics (updating ``batch_stats``: pass ``mutable=["batch_stats"]``) and
    channel dropout (``Dropout2d``) at ``dropout_ratio``, which needs a ``'dropout'`` rng when the ratio is > 0.
    ``deterministic`` (default: ``not train``) switches the dropout alone, e.g. off in training mode.
    Logits are in ``dtype``; the caller resizes them (``resize_bilinear``) to the image or label size.
    """

    num_classes: int = ADE20K_CLASSES
    channels: int = 256
    feature_strides: Sequence[int] = (4, 8, 16, 32)
    in_index: Sequence[int] = (0, 1, 2, 3)
    dropout_ratio: float = 0.1
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: Sequence[jax.Array], train: bool = False,
                 deterministic: bool | None = None) -> jax.Array:
        if len(self.in_index) != len(self.feature_strides):
            raise ValueError(f"FPNHead: {len(self.in_index)} inputs selected for {len(self.feature_strides)} strides")
        xs = [inputs[i] for i in self.in_index]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        output = None
        for i, (x, layers) in enumerate(zip(xs, scale_head_layers(self.feature_strides), strict=True)):
            upsample = self.feature_strides[i] != self.feature_strides[0]
            for j in layers:
                x = ConvModule(self.channels, 3, self.momentum, self.epsilon, name=f"scale_heads_{i}_{j}", **kw)(
                    x, train)
                if upsample:
                    x = upsample_bilinear_2x(x)  # Upsample(scale_factor=2): size 2h x 2w, align_corners=False
            if output is None:
                output = x
            else:
                output = output + resize_bilinear(x, output.shape[1:3]).astype(output.dtype)
        if self.dropout_ratio > 0:
            output = nn.Dropout(self.dropout_ratio, broadcast_dims=(1, 2), name="dropout")(
                output, deterministic=(not train) if deterministic is None else deterministic)
        return _conv(self.num_classes, 1, use_bias=True, kernel_init=normal_001, name="conv_seg", **kw)(output)


class SemanticFPN(nn.Module):
    """``FPN`` (``neck``) then ``FPNHead`` (``decode_head``): the segmentor's head, as in a VPD checkpoint.

    Defaults are the official ADE20K model's. ``out_size``: resize the logits bilinearly to (H, W) (the image
    size, as ``EncoderDecoder.encode_decode``); by default they stay at the finest level's resolution.
    ``train`` / ``deterministic``: as ``FPNHead``'s.
    """

    num_classes: int = ADE20K_CLASSES
    neck_channels: int = 256
    channels: int = 256
    feature_strides: Sequence[int] = (4, 8, 16, 32)
    dropout_ratio: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], train: bool = False, out_size: tuple[int, int] | None = None,
                 deterministic: bool | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        outs = FPN(self.neck_channels, len(feats), name="neck", **kw)(feats)
        logits = FPNHead(self.num_classes, self.channels, tuple(self.feature_strides),
                         tuple(range(len(self.feature_strides))), self.dropout_ratio, name="decode_head", **kw)(
            outs, train, deterministic)
        if out_size is not None:
            logits = resize_bilinear(logits, tuple(out_size))
        return logits


# ---------------------------------------------------------------------------------------------------- loss

def cross_entropy_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX, *,
                       avg_non_ignore: bool = False) -> jax.Array:
    """mmseg ``CrossEntropyLoss(use_sigmoid=False, loss_weight=1.0)`` on logits (B, H, W, C) and labels (B, H, W).

    Per pixel ``-log_softmax(logits)[label]`` in float32, 0 where ``label == ignore_index``; the sum is divided
    by ``avg_factor + eps`` (float32 eps, mmseg/models/losses/utils.py ``weight_reduce_loss``), with
    ``avg_factor`` the number of pixels, ignored ones included, when ``avg_non_ignore`` is false (mmseg's
    default in 0.x and 1.x, and what the VPD config uses), or the number of non-ignored pixels when it is true
    (then it equals ``F.cross_entropy(..., ignore_index=...)``, except that all-ignored labels give 0, not NaN).
    Labels other than ``ignore_index`` must lie in ``[0, C)`` (PyTorch raises; here they are clipped).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    labels = jnp.asarray(labels)
    valid = labels != ignore_index
    safe = jnp.clip(jnp.where(valid, labels, 0), 0, logits.shape[-1] - 1).astype(jnp.int32)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(valid, nll, 0.0))
    count = jnp.sum(valid).astype(jnp.float32) if avg_non_ignore else jnp.float32(labels.size)
    return total / (count + jnp.finfo(jnp.float32).eps)


def decode_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX, *,
                avg_non_ignore: bool = False) -> jax.Array:
    """``BaseDecodeHead.loss_by_feat``: logits resized bilinearly (align_corners=False) to the labels' (H, W),
    then ``cross_entropy_loss``."""
    logits = resize_bilinear(logits, tuple(labels.shape[1:3]))
    return cross_entropy_loss(logits, labels, ignore_index, avg_non_ignore=avg_non_ignore)
