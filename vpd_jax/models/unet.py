"""The Stable Diffusion UNet (diffusers' ``UNet2DConditionModel``, SD 1.x / 2.x family) in Flax linen.

What it must stay compatible with:

* **Names**: the parameter tree is exactly that of diffusers' ``FlaxUNet2DConditionModel``
  (``down_blocks_0/resnets_0/conv1/kernel``, ``.../attentions_0/transformer_blocks_0/attn1/to_q/kernel``,
  ``up_blocks_1/upsamplers_0/conv``, ...), so a ``diffusion_flax_model.msgpack`` loads with no renaming.
* **Numerics**: PyTorch diffusers / CompVis, not diffusers-Flax: Transformer2D GroupNorm epsilon 1e-6, exact
  (erf) GELU in GEGLU, float32 two-pass normalisation statistics, PyTorch's nearest-resize index rule.
* **Sizes**: any latent height and width, as in PyTorch diffusers: each upsampler resizes to the size of the
  skip connection it meets, so 60x60 or 37x53 latents work.
* **Layout**: NHWC in and out. ``apply(v, sample, t, ctx)`` equals diffusers' ``.sample``;
  ``apply(v, sample, t, ctx, method="features")`` returns VPD's four maps ``(o11, o7, o4, o1)`` and does not
  compute the output head; with ``attn_maps=True`` it also returns the cross-attention maps of VPD's
  segmentation (``concat_attention_maps`` puts them on the taps; docs/backbone.md).

``attention_head_dim`` keeps diffusers' legacy meaning for this family: it is the number of heads per block
(8 for SD 1.x, ``[5, 10, 20, 20]`` for SD 2.x); a block's head size is its channels divided by that.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from vpd_jax.models.blocks import Downsample2D, ResnetBlock2D
from vpd_jax.models.layers import GroupNorm, LayerNorm, attention, attention_map, resize_nearest, timestep_embedding

Dtype = Any

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
# Keys of a diffusers config.json that do not change the network (or are checked separately).
_IGNORED_KEYS = {
    "_class_name", "_diffusers_version", "_name_or_path", "sample_size", "dropout", "act_fn",
    "num_attention_heads", "dual_cross_attention", "resnet_time_scale_shift", "time_embedding_type",
    "class_embed_type", "addition_embed_type", "num_class_embeds", "encoder_hid_dim", "encoder_hid_dim_type",
    "time_cond_proj_dim", "conv_in_kernel", "conv_out_kernel", "projection_class_embeddings_input_dim",
    "timestep_post_act", "time_embedding_dim", "time_embedding_act_fn", "class_embeddings_concat",
    "mid_block_only_cross_attention", "cross_attention_norm", "addition_time_embed_dim",
    "addition_embed_type_num_heads", "attention_type", "reverse_transformer_layers_per_block",
    "resnet_skip_time_act", "resnet_out_scale_factor", "mid_block_scale_factor", "downsample_padding",
    "split_head_dim", "use_memory_efficient_attention", "dtype",  # diffusers-Flax performance switches
}
# Values those keys must have for the network to be the one built here (None: anything).
_REQUIRED_VALUES = {
    "act_fn": "silu", "num_attention_heads": None, "dual_cross_attention": False,
    "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "class_embed_type": None,
    "addition_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "timestep_post_act": None, "time_embedding_dim": None,
    "attention_type": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "mid_block_scale_factor": 1, "downsample_padding": 1, "cross_attention_norm": None,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The diffusers ``UNet2DConditionModel`` settings this port supports; defaults are SD v1.5."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8  # legacy name: heads per block
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    only_cross_attention: bool | tuple[bool, ...] = False
    upcast_attention: bool = False  # only changes low-precision compute: scores are float32 here anyway
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    center_input_sample: bool = False

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNetConfig: {n} block_out_channels but {len(self.down_block_types)} down and "
                             f"{len(self.up_block_types)} up block types")
        for t in self.down_block_types:
            if t not in _DOWN_TYPES:
                raise ValueError(f"UNetConfig: down block type {t!r} is not supported (only {_DOWN_TYPES})")
        for t in self.up_block_types:
            if t not in _UP_TYPES:
                raise ValueError(f"UNetConfig: up block type {t!r} is not supported (only {_UP_TYPES})")
        if self.mid_block_type not in ("UNetMidBlock2DCrossAttn", None):
            raise ValueError(f"UNetConfig: mid block type {self.mid_block_type!r} is not supported")

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> UNetConfig:
        """From a diffusers ``config.json`` dict; unsupported features raise one error naming them."""
        bad = [f"{k}={config[k]!r}" for k, want in _REQUIRED_VALUES.items()
               if want is not None and k in config and config[k] != want]
        bad += [f"{k}={config[k]!r}" for k, want in _REQUIRED_VALUES.items()
                if want is None and config.get(k) is not None]
        if bad:
            raise ValueError("UNet config.json: unsupported setting(s) for the SD 1.x/2.x UNet: " + ", ".join(bad))
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if k not in fields and k not in _IGNORED_KEYS and not k.startswith("_"))
        if unknown:
            raise ValueError(f"UNet config.json: unknown setting(s) {unknown}")
        kw = {}
        for k, v in config.items():
            if k in fields:
                kw[k] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def per_block(self, value) -> tuple:
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * len(self.block_out_channels)

    @property
    def heads(self) -> tuple[int, ...]:
        return self.per_block(self.attention_head_dim)


def _remat(cls, enabled: bool, policy: str | None):
    """``nn.remat`` of a block class, with a named ``jax.checkpoint_policies`` policy; names are unchanged."""
    if not enabled:
        return cls
    pol = getattr(jax.checkpoint_policies, policy) if policy else None
    return nn.remat(cls, policy=pol)


# ------------------------------------------------------------------------------------------- blocks

class Attention(nn.Module):
    """Multi-head attention with diffusers' names (``to_q``, ``to_k``, ``to_v``, ``to_out_0``).

    ``return_map``: also return the attention probabilities averaged over heads, (B, T, S) float32 without
    gradient (``layers.attention_map``); the output is computed exactly as without it.
    """

    query_dim: int
    heads: int
    dim_head: int
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    return_map: bool = False

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        inner = self.heads * self.dim_head
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        q = dense(inner, use_bias=False, name="to_q")(x)
        k = dense(inner, use_bias=False, name="to_k")(context)
        v = dense(inner, use_bias=False, name="to_v")(context)
        b, t, s = x.shape[0], x.shape[1], context.shape[1]
        q = q.reshape(b, t, self.heads, self.dim_head)
        k = k.reshape(b, s, self.heads, self.dim_head)
        v = v.reshape(b, s, self.heads, self.dim_head)
        out = attention(q, k, v, scale=self.dim_head ** -0.5, impl=self.attention_impl)
        out = dense(self.query_dim, name="to_out_0")(out.reshape(b, t, inner))
        if not self.return_map:
            return out
        # No gradient through the map, as in the official training, which records it inside CompVis'
        # checkpointed transformer block (ldm/modules/diffusionmodules/util.py: the forward runs under no_grad).
        return out, jax.lax.stop_gradient(attention_map(q, k, scale=self.dim_head ** -0.5))


class GEGLU(nn.Module):
    inner_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(2 * self.inner_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = GEGLU(self.dim * self.mult, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """``cross_attn_map``: return ``(x, map)``, ``map`` the head-averaged probabilities of ``attn2`` (B, T, S)."""

    dim: int
    heads: int
    dim_head: int
    only_cross_attention: bool = False
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    cross_attn_map: bool = False

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = functools.partial(Attention, self.dim, self.heads, self.dim_head, self.attention_impl, **kw)
        h = LayerNorm(1e-5, name="norm1", **kw)(x)
        x = x + attn(name="attn1")(h, context if self.only_cross_attention else None)
        h = LayerNorm(1e-5, name="norm2", **kw)(x)
        if self.cross_attn_map:
            a, amap = attn(name="attn2", return_map=True)(h, context)
            x = x + a
        else:
            x = x + attn(name="attn2")(h, context)
        h = LayerNorm(1e-5, name="norm3", **kw)(x)
        x = x + FeedForward(self.dim, name="ff", **kw)(h)
        return (x, amap) if self.cross_attn_map else x


class Transformer2DModel(nn.Module):
    """diffusers ``Transformer2DModel`` for continuous NHWC input (GroupNorm eps 1e-6, as PyTorch).

    ``cross_attn_maps``: return ``(out, maps)``, one (B, H, W, S) cross-attention map per transformer block.
    """

    in_channels: int
    heads: int
    dim_head: int
    depth: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    attention_impl: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    cross_attn_maps: bool = False

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wid, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        h = GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            h = nn.Dense(inner, name="proj_in", **kw)(h.reshape(b, hgt * wid, c))
        else:
            h = nn.Conv(inner, (1, 1), padding="VALID", name="proj_in", **kw)(h).reshape(b, hgt * wid, inner)
        maps = []
        for i in range(self.depth):
            h = BasicTransformerBlock(inner, self.heads, self.dim_head, self.only_cross_attention,
                                      self.attention_impl, cross_attn_map=self.cross_attn_maps,
                                      name=f"transformer_blocks_{i}", **kw)(h, context)
            if self.cross_attn_maps:
                h, amap = h
                # (B, h*w, S), queries in row-major pixel order -> (B, h, w, S): the official
                # rearrange(attn, 'b (h w) c -> b c h w') in NHWC.
                maps.append(amap.reshape(b, hgt, wid, amap.shape[-1]))
        if self.use_linear_projection:
            h = nn.Dense(c, name="proj_out", **kw)(h).reshape(b, hgt, wid, c)
        else:
            h = nn.Conv(c, (1, 1), padding="VALID", name="proj_out", **kw)(h.reshape(b, hgt, wid, inner))
        return (h + residual, tuple(maps)) if self.cross_attn_maps else h + residual


class Upsample2D(nn.Module):
    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size):
        x = resize_nearest(x, size)
        return nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                       param_dtype=self.param_dtype, name="conv")(x)


@dataclasses.dataclass(frozen=True)
class _BlockOptions:
    """What every block needs besides its own shape: numerics, attention backend, remat."""

    groups: int
    eps: float
    attention_impl: str | None
    use_linear_projection: bool
    remat: bool
    remat_policy: str | None


class DownBlock(nn.Module):
    """``CrossAttnDownBlock2D`` (with ``heads``) or ``DownBlock2D`` (``heads=0``)."""

    out_channels: int
    num_layers: int
    heads: int
    depth: int
    only_cross_attention: bool
    add_downsample: bool
    opts: _BlockOptions
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, attn_maps: bool = False):
        """``(x, states)``; with ``attn_maps``, ``(x, states, maps)``: every cross-attention map, in order."""
        o, kw = self.opts, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res_cls = _remat(ResnetBlock2D, o.remat, o.remat_policy)
        attn_cls = _remat(Transformer2DModel, o.remat, o.remat_policy)
        states, maps = [], []
        for i in range(self.num_layers):
            x = res_cls(self.out_channels, o.groups, o.eps, name=f"resnets_{i}", **kw)(x, temb)
            if self.heads:
                x = attn_cls(self.out_channels, self.heads, self.out_channels // self.heads, self.depth, o.groups,
                             o.use_linear_projection, self.only_cross_attention, o.attention_impl,
                             cross_attn_maps=attn_maps, name=f"attentions_{i}", **kw)(x, context)
                if attn_maps:
                    x, m = x
                    maps.extend(m)
            states.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, name="downsamplers_0", **kw)(x)
            states.append(x)
        return (x, states, maps) if attn_maps else (x, states)


class UpBlock(nn.Module):
    """``CrossAttnUpBlock2D`` (with ``heads``) or ``UpBlock2D``; also returns every layer's output."""

    out_channels: int
    num_layers: int
    heads: int
    depth: int
    only_cross_attention: bool
    add_upsample: bool
    opts: _BlockOptions
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size, attn_maps: bool = False):
        """``(x, layer_outputs)``; with ``attn_maps``, ``(x, layer_outputs, maps)`` (cross-attention maps)."""
        o, kw = self.opts, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res_cls = _remat(ResnetBlock2D, o.remat, o.remat_policy)
        attn_cls = _remat(Transformer2DModel, o.remat, o.remat_policy)
        layer_outputs, maps = [], []
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = res_cls(self.out_channels, o.groups, o.eps, name=f"resnets_{i}", **kw)(x, temb)
            if self.heads:
                x = attn_cls(self.out_channels, self.heads, self.out_channels // self.heads, self.depth, o.groups,
                             o.use_linear_projection, self.only_cross_attention, o.attention_impl,
                             cross_attn_maps=attn_maps, name=f"attentions_{i}", **kw)(x, context)
                if attn_maps:
                    x, m = x
                    maps.extend(m)
            layer_outputs.append(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x, upsample_size)
        return (x, layer_outputs, maps) if attn_maps else (x, layer_outputs)


class MidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn``: resnet, then (attention, resnet) pairs."""

    channels: int
    heads: int
    depth: int
    opts: _BlockOptions
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        o, kw = self.opts, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res_cls = _remat(ResnetBlock2D, o.remat, o.remat_policy)
        attn_cls = _remat(Transformer2DModel, o.remat, o.remat_policy)
        x = res_cls(self.channels, o.groups, o.eps, name="resnets_0", **kw)(x, temb)
        x = attn_cls(self.channels, self.heads, self.channels // self.heads, self.depth, o.groups,
                     o.use_linear_projection, False, o.attention_impl, name="attentions_0", **kw)(x, context)
        return res_cls(self.channels, o.groups, o.eps, name="resnets_1", **kw)(x, temb)


# ---------------------------------------------------------------------------------------------- model

class UNet2DConditionModel(nn.Module):
    """The SD UNet. ``__call__`` gives the noise prediction; ``features`` gives VPD's four decoder maps.

    Attributes:
      config: the architecture (``UNetConfig.from_diffusers(config_json)``).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); normalisation statistics and attention softmax stay fp32.
      param_dtype: dtype of the parameters (float32 for training).
      attention_impl: ``None`` (einsum on CPU; on GPUs cuDNN's fused kernel for bf16/fp16 where it takes the
        shape, XLA otherwise), ``"einsum"``, ``"xla"``, ``"cudnn"`` or ``"cudnn_or_xla"``; see ``attention``.
      remat: rematerialise each ResNet and Transformer block in the backward pass (saves activation memory).
      remat_policy: name of a ``jax.checkpoint_policies`` policy for the remat (None: save nothing).
    """

    config: UNetConfig = UNetConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool = False
    remat_policy: str | None = None

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        opts = _BlockOptions(cfg.norm_num_groups, cfg.norm_eps, self.attention_impl, cfg.use_linear_projection,
                             self.remat, self.remat_policy)
        chans, n = cfg.block_out_channels, len(cfg.block_out_channels)
        heads, depth = cfg.heads, cfg.per_block(cfg.transformer_layers_per_block)
        only_cross = cfg.per_block(cfg.only_cross_attention)
        self.conv_in = nn.Conv(chans[0], (3, 3), padding=((1, 1), (1, 1)), **kw)
        self.time_embedding = _TimestepEmbedding(chans[0] * 4, **kw)
        self.down_blocks = [
            DownBlock(chans[i], cfg.layers_per_block,
                      heads[i] if cfg.down_block_types[i] == "CrossAttnDownBlock2D" else 0,
                      depth[i], only_cross[i], i < n - 1, opts, **kw)
            for i in range(n)
        ]
        self.mid_block = (MidBlock(chans[-1], heads[-1], depth[-1], opts, **kw)
                          if cfg.mid_block_type else None)
        rheads, rdepth, rcross = heads[::-1], depth[::-1], only_cross[::-1]
        self.up_blocks = [
            UpBlock(chans[::-1][i], cfg.layers_per_block + 1,
                    rheads[i] if cfg.up_block_types[i] == "CrossAttnUpBlock2D" else 0,
                    rdepth[i], rcross[i], i < n - 1, opts, **kw)
            for i in range(n)
        ]
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, **kw)
        self.conv_out = nn.Conv(cfg.out_channels, (3, 3), padding=((1, 1), (1, 1)), **kw)

    def _run(self, sample, timesteps, encoder_hidden_states, map_levels: tuple[int, ...] = ()):
        """``(x, features, maps)``: ``maps`` has one entry per level, the cross-attention maps of the levels in
        ``map_levels`` aggregated by ``_aggregate_maps`` (None at the others); empty when none is asked for."""
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"UNet: expected NHWC latents with {cfg.in_channels} channels, got {sample.shape}")
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        t = timestep_embedding(timesteps, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                               freq_shift=cfg.freq_shift)
        temb = self.time_embedding(t.astype(self.dtype))
        context = encoder_hidden_states.astype(self.dtype)
        x = self.conv_in(sample.astype(self.dtype))
        skips = [x]
        n = len(self.down_blocks)
        down_maps, up_maps = {}, {}
        for level, block in enumerate(self.down_blocks):
            if level in map_levels:
                x, states, down_maps[level] = block(x, temb, context, attn_maps=True)
            else:
                x, states = block(x, temb, context)
            skips.extend(states)
        if self.mid_block is not None:
            x = self.mid_block(x, temb, context)
        features = []
        for i, block in enumerate(self.up_blocks):
            n_layers = block.num_layers
            block_skips, skips = skips[-n_layers:], skips[:-n_layers]
            up_size = skips[-1].shape[1:3] if skips else None
            if n - 1 - i in map_levels:  # up block i works at level n - 1 - i
                x, layer_outputs, up_maps[n - 1 - i] = block(x, block_skips, temb, context, up_size, attn_maps=True)
            else:
                x, layer_outputs = block(x, block_skips, temb, context, up_size)
            # VPD taps ldm output_blocks[1], [4], [7] (second layer of each non-final up block) and [11].
            features.append(layer_outputs[min(1, n_layers - 1)] if block.add_upsample else x)
        maps = _aggregate_maps(n, map_levels, down_maps, up_maps) if map_levels else ()
        return x, features, maps

    def __call__(self, sample, timesteps, encoder_hidden_states):
        x, _, _ = self._run(sample, timesteps, encoder_hidden_states)
        x = nn.silu(self.conv_norm_out(x))
        return self.conv_out(x)

    def features(self, sample, timesteps, encoder_hidden_states, attn_maps: bool = False):
        """VPD's maps ``(o11, o7, o4, o1)``: 1/8, 1/16, 1/32 and 1/64 of the image for SD 1.5.

        ``attn_maps=True`` returns ``(features, maps)``: ``maps`` is aligned with ``features`` (one entry per
        level, latent grid first) and holds, at the levels in ``ATTENTION_MAP_LEVELS`` (the latent/2 and latent/4
        grids), the cross-attention maps between pixels and context tokens that VPD's segmentation uses, each
        (B, h, w, tokens) float32 without gradient, and None at the other levels (``_aggregate_maps``;
        docs/backbone.md). ``concat_attention_maps(features, maps)`` gives the official feature taps. The
        features are the same values as without the maps: the recording layers compute their output as before.
        """
        if not attn_maps:
            _, feats, _ = self._run(sample, timesteps, encoder_hidden_states)
            return tuple(feats[::-1])
        _, feats, maps = self._run(sample, timesteps, encoder_hidden_states, ATTENTION_MAP_LEVELS)
        return tuple(feats[::-1]), maps


# The UNet levels (0: the latent grid) whose cross-attention maps VPD's segmentation uses.
ATTENTION_MAP_LEVELS = (1, 2)


def _aggregate_maps(n_levels: int, map_levels, down_maps, up_maps) -> tuple:
    """Per level, the mean of its up-block then down-block cross-attention maps (None at the other levels).

    wl-zhao/VPD ``vpd/models.py`` (``AttentionStore``, ``UNetWrapper.process_attn``, ``attn_selector=
    'up_cross+down_cross'``): every ``attn2`` map of the down and up blocks (not the mid block, not
    self-attention), averaged over heads, is filed by its grid, and the maps of each grid are averaged with
    ``torch.stack(maps).mean(0)``, the up maps listed before the down maps. The official store keeps maps of at
    most (base_size / 16)^2 queries and files them under grids fixed by ``base_size=512``, so it runs only on
    512x512 images, where it keeps exactly the 32x32 and 16x16 grids: levels 1 and 2. Here the levels are chosen
    by index, so any input size works and a 512x512 image gets the official maps.
    """
    maps = []
    for level in range(n_levels):
        if level not in map_levels:
            maps.append(None)
            continue
        found = up_maps.get(level, []) + down_maps.get(level, [])
        if not found:
            raise ValueError(f"UNet: attention maps of level {level} were asked for, but its blocks have no "
                             "cross-attention")
        maps.append(jnp.mean(jnp.stack(found), axis=0))
    return tuple(maps)


def concat_attention_maps(features: Sequence[jax.Array], maps: Sequence[jax.Array | None]) -> tuple:
    """VPD's segmentation inputs: each feature map with its level's cross-attention map appended on the channel
    axis (in the feature dtype), as ``UNetWrapper.forward`` of wl-zhao/VPD ``vpd/models.py`` does (``out_list[1]``
    and ``out_list[2]``, the 1/32 and 1/16 maps); levels without a map pass through unchanged. For SD 1.5 and
    150 classes the channels become (320, 640 + 150, 1280 + 150, 1280).

    ``features``, ``maps``: as ``UNet2DConditionModel.features(..., attn_maps=True)`` returns them.
    """
    if len(features) != len(maps):
        raise ValueError(f"concat_attention_maps: {len(features)} feature maps but {len(maps)} map entries")
    out = []
    for f, m in zip(features, maps):
        if m is None:
            out.append(f)
            continue
        if m.shape[:3] != f.shape[:3]:
            raise ValueError(f"concat_attention_maps: a map of shape {m.shape} for features of shape {f.shape}")
        out.append(jnp.concatenate([f, m.astype(f.dtype)], axis=-1))
    return tuple(out)


class _TimestepEmbedding(nn.Module):
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t):
        h = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(t)
        return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(nn.silu(h))


def init_params(module: UNet2DConditionModel, rng: jax.Array, sample_shape: Sequence[int] = (1, 8, 8, 4),
                context_len: int = 1):
    """Random parameters for ``module`` (jitted init on small dummy inputs)."""
    cfg = module.config
    sample = jnp.zeros(sample_shape, module.dtype)
    ctx = jnp.zeros((sample_shape[0], context_len, cfg.cross_attention_dim), module.dtype)
    return jax.jit(module.init)(rng, sample, jnp.ones((sample_shape[0],), jnp.int32), ctx)["params"]
