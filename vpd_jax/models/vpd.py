"""``VPDDepth``: the whole VPD depth network, an RGB image to metric depth (wl-zhao/VPD depth/models_depth/model.py,
vpd/models.py; mmsegmentation mmseg/models/backbones/vpd.py, mmseg/models/decode_heads/vpd_depth_head.py).

image [0, 255] -> x/127.5 - 1 -> zero pad bottom/right -> frozen VAE encoder (posterior mean, no 0.18215)
-> UNet once at t = 1 with one context token ``e + gamma * MLP(e)`` -> decoder maps (o11, o7, o4, o1)
-> neck -> crop to the image's part of the stride-32 map -> decoder -> head -> sigmoid * max_depth
-> crop to the input's height and width.

Variables (``model.init`` / a converted checkpoint):

* ``params``: ``unet`` (diffusers' Flax UNet names, no ``conv_norm_out``/``conv_out``: VPD never runs the
  UNet's output head), ``vae`` (``encoder/...``, ``quant_conv``), ``head`` (``neck``, ``decoder``, ``depth``),
  ``text_adapter`` (``fc1``, ``fc2``) and ``gamma``.
* ``batch_stats``: the decoder's BatchNorm running statistics (``head/decoder/*_bn*/{mean,var}``).
* ``constants``: ``class_embeddings``, the (num_classes + 1, text_dim) table of CLIP scene embeddings whose
  last row is the mean of the others ("unknown scene", mmseg's -1). It is a variable collection, not a
  module attribute, so it travels with every checkpoint, never reaches the optimizer, and can be swapped
  without recompiling. ``init`` fills it with zeros: put the real table in with ``with_class_embeddings``.

The VAE is frozen by a ``stop_gradient`` on its output, so its parameters get zero gradients; an optimizer
must still leave them alone (no weight decay), as both references do (``requires_grad=False`` / lr_mult 0).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vpd_jax.models.head import HEAD_INITS, TextAdapter, VPDHead
from vpd_jax.models.unet import UNet2DConditionModel, UNetConfig
from vpd_jax.models.vae import VAEConfig, VAEEncoder

CONSTANTS = "constants"
# The decoder brings the stride-32 map back to full resolution (3 deconvs x8, 2 bilinear x4).
HEAD_STRIDE = 32
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class VPDConfig:
    """Everything that defines a ``VPDDepth``; defaults are the released NYUv2 model (SD-1.5, 480 crops).

    JSON/ml_collections friendly through ``to_dict``/``from_dict`` (``unet``/``vae`` as diffusers-style dicts).
    """

    max_depth: float = 10.0  # metres; depth = sigmoid(logit) * max_depth
    head_init: str = "official"  # depth-head conv init: "official" N(0, 0.001) or "mmseg" TruncNormal(0.02)
    text_dim: int = 768  # CLIP embedding size = the UNet's cross_attention_dim
    num_classes: int = 27  # scene classes; the embedding table has one more row (their mean, "unknown")
    neck_features: int = 1536  # fused map channels (official embed_dim * 8)
    neck_groups: int = 16  # GroupNorm groups in the neck
    deconv_filters: tuple[int, ...] = (32, 32, 32)  # one 2x2 stride-2 deconv per entry
    decoder_features: int = 192  # channels after the decoder's 3x3 conv (official embed_dim)
    timestep: int = 1  # the single diffusion timestep the UNet sees (the code's 1, not the paper's 0)
    unet: UNetConfig = UNetConfig()
    vae: VAEConfig = VAEConfig()
    dtype: str = "float32"  # compute dtype; norms, softmax and the final sigmoid stay fp32
    param_dtype: str = "float32"  # parameter storage dtype
    attention_impl: str | None = None  # None (auto), "einsum", "xla", "cudnn", "cudnn_or_xla": layers.attention
    remat: bool = False  # rematerialise UNet blocks in the backward pass
    remat_policy: str | None = None  # a jax.checkpoint_policies name for that remat

    def __post_init__(self):
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"VPDConfig.head_init {self.head_init!r} is not one of {HEAD_INITS}")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in _DTYPES:
                raise ValueError(f"VPDConfig.{f} {getattr(self, f)!r} is not one of {_DTYPES}")
        if len(self.unet.block_out_channels) != 4:
            raise ValueError("VPDConfig: the neck takes one map from each of 4 UNet levels; the UNet has "
                             f"{len(self.unet.block_out_channels)}")
        if self.vae.downsample_factor * 4 != HEAD_STRIDE:
            raise ValueError(f"VPDConfig: the head needs o4 at stride {HEAD_STRIDE}, i.e. a VAE that downsamples "
                             f"x8; this VAE downsamples x{self.vae.downsample_factor}")
        if self.unet.cross_attention_dim != self.text_dim:
            raise ValueError(f"VPDConfig: text_dim {self.text_dim} != UNet cross_attention_dim "
                             f"{self.unet.cross_attention_dim}")
        object.__setattr__(self, "deconv_filters", tuple(self.deconv_filters))

    # ------------------------------------------------------------------------------------- geometry
    @property
    def pad_multiple(self) -> int:
        """Height and width are padded up to a multiple of this: VAE factor x 2^(UNet downsamplings) = 64."""
        return self.vae.downsample_factor * 2 ** (len(self.unet.block_out_channels) - 1)

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        m = self.pad_multiple
        return -(-height // m) * m, -(-width // m) * m

    def valid_size(self, height: int, width: int) -> tuple[int, int]:
        """Rows and columns of the stride-32 map that the image (not the padding) reaches: ceil(H/32), ceil(W/32)."""
        return math.ceil(height / HEAD_STRIDE), math.ceil(width / HEAD_STRIDE)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    # ------------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["deconv_filters"] = list(self.deconv_filters)
        d["unet"], d["vae"] = self.unet.to_dict(), self.vae.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VPDConfig:
        """From ``to_dict`` output (or a ConfigDict's ``to_dict()``); ``unet``/``vae`` may be diffusers configs."""
        kw = backbone_kwargs(cls, d)
        if "deconv_filters" in kw:
            kw["deconv_filters"] = tuple(kw["deconv_filters"])
        return cls(**kw)

    def replace(self, **kw) -> VPDConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def tiny(cls, **kw) -> VPDConfig:
        """SD-1.5's exact block structure (same CompVis key names) at toy widths, for tests and CPU smoke runs.

        The UNet's widths grow where SD-1.5's do (so the same keys) and every level is at least 64 wide: each of
        SD's 32 norm groups holds more than one channel, and every trained tensor moves the output (a conv bias
        before a one-channel group would not). The neck is 8x the decoder's width, as SD-1.5's 1536 = 8 x 192
        (mmseg's ``VPDDepthHead`` requires it).
        """
        unet = UNetConfig(block_out_channels=(64, 96, 128, 128), attention_head_dim=2, cross_attention_dim=32,
                          norm_num_groups=32)
        vae = VAEConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=2, norm_num_groups=16)
        base = dict(text_dim=32, neck_features=128, deconv_filters=(8, 8, 8), decoder_features=16, unet=unet,
                    vae=vae)
        base.update(kw)
        return cls(**base)

    @classmethod
    def micro(cls, **kw) -> VPDConfig:
        """The demo's toy: SD's layout (4 UNet levels, VAE x8) with one resnet per level and one cross-attention
        block down and up; compiles in about a minute on 2 CPU cores."""
        unet = UNetConfig(block_out_channels=(16, 32, 32, 32),
                          down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * 3,
                          up_block_types=("UpBlock2D",) * 3 + ("CrossAttnUpBlock2D",), mid_block_type=None,
                          layers_per_block=1, attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8)
        vae = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
                        mid_block_add_attention=False)
        base = dict(unet=unet, vae=vae, neck_features=32)
        base.update(kw)
        return cls.tiny(**base)

    @classmethod
    def preset(cls, size: str, **kw) -> VPDConfig:
        """A named architecture: ``"sd15"`` (the released models), ``"tiny"`` or ``"micro"``; ``kw`` overrides."""
        if size not in PRESETS:
            raise ValueError(f"model size {size!r} is not one of {PRESETS}")
        return cls(**kw) if size == "sd15" else getattr(cls, size)(**kw)

    @classmethod
    def from_training(cls, model: Mapping[str, Any]) -> VPDConfig:
        """The ``VPDConfig`` of a training config's ``model`` section (``configs/base.py``)."""
        return cls.preset(
            model["size"], max_depth=float(model["max_depth"]), head_init=model["head_init"], dtype=model["dtype"],
            param_dtype=model["param_dtype"], remat=bool(model["remat"]),
            attention_impl=model.get("attention_impl") or None, num_classes=int(model.get("num_classes") or 27))

    # Fields that decide the variables' shapes (the rest: numerics, memory, output range).
    ARCHITECTURE_FIELDS = ("unet", "vae", "text_dim", "num_classes", "neck_features", "neck_groups",
                           "deconv_filters", "decoder_features")

    def architecture(self) -> dict[str, Any]:
        """The fields that decide the variables, as a JSON-friendly dict (two configs with equal architectures
        can exchange weights)."""
        d = self.to_dict()
        return {k: d[k] for k in self.ARCHITECTURE_FIELDS}

    def architecture_size(self) -> str | None:
        """The preset name whose architecture this is, or None."""
        for name in PRESETS:
            if VPDConfig.preset(name).architecture() == self.architecture():
                return name
        return None


PRESETS = ("sd15", "tiny", "micro")


def backbone_kwargs(cls, d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` as keyword arguments of the config dataclass ``cls``: unknown fields are one error, and ``unet`` /
    ``vae`` given as dicts (ours or diffusers' configs) become ``UNetConfig`` / ``VAEConfig``."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}")
    kw = dict(d)
    if isinstance(kw.get("unet"), Mapping):
        kw["unet"] = UNetConfig.from_diffusers(kw["unet"])
    if isinstance(kw.get("vae"), Mapping):
        kw["vae"] = VAEConfig.from_diffusers(kw["vae"])
    return kw


class VPDDepth(nn.Module):
    """VPD: image -> metric depth (B, H, W) in metres, for any H, W (wl-zhao/VPD depth/models_depth/model.py).

    Sizes: the normalised image is zero padded at the bottom and right to ``config.padded_size(H, W)``, the
    next multiple of 64 (the VAE's x8 times the UNet's three x2 downsamplings, so every UNet level and every
    neck branch meets on one grid; 480 -> 512 as in both references, 640 stays 640). After the neck the
    stride-32 map is cropped to ``ceil(H/32) x ceil(W/32)`` (16x16 -> 15x15 for 480, as the references'
    ``[:-1, :-1]``), the decoder brings it to ``32 * ceil(H/32)`` and the output is cropped to H x W.

    Call ``apply(variables, images, class_ids=None, text_embeddings=None, train=False)``:

    * ``images``: (B, H, W, 3) RGB, uint8 or float in [0, 255].
    * ``class_ids``: (B,) rows of the class-embedding table; None or a negative id selects the last row
      (the mean, "unknown scene"), as mmseg's -1 does.
    * ``text_embeddings``: (B, text_dim) or (text_dim,) raw CLIP embeddings (e.g. of a free-text prompt) used
      instead of the table; they go through the text adapter like table rows.
    * ``train``: BatchNorm uses batch statistics and updates ``batch_stats`` (pass ``mutable=["batch_stats"]``).
    """

    config: VPDConfig = VPDConfig()

    @nn.compact
    def __call__(self, images: jax.Array, class_ids: jax.Array | None = None,
                 text_embeddings: jax.Array | None = None, train: bool = False) -> jax.Array:
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"VPDDepth: expected (B, H, W, 3) RGB images, got shape {images.shape}")
        b, h, w, _ = images.shape

        # Zero is mid-grey after normalisation; padding after it is what both references do.
        x = images.astype(jnp.float32) / 127.5 - 1.0
        ph, pw = c.padded_size(h, w)
        x = jnp.pad(x, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)))
        latents = jax.lax.stop_gradient(VAEEncoder(c.vae, dtype=dt, param_dtype=pdt, name="vae")(x))

        # Declared lazily so that free-text inference needs no table in the variables; init always makes it.
        if text_embeddings is None or self.is_initializing():
            table = self.variable(CONSTANTS, "class_embeddings", jnp.zeros, (c.num_classes + 1, c.text_dim),
                                  jnp.float32)
        if text_embeddings is not None:
            e = jnp.broadcast_to(jnp.asarray(text_embeddings, jnp.float32), (b, c.text_dim))
        else:
            ids = jnp.full((b,), -1, jnp.int32) if class_ids is None else jnp.asarray(class_ids, jnp.int32)
            ids = jnp.where(ids < 0, c.num_classes, ids)
            e = jnp.take(table.value, ids, axis=0, mode="clip")
        gamma = self.param("gamma", lambda _, s, d: jnp.full(s, 1e-4, d), (c.text_dim,), pdt)
        context = TextAdapter(c.text_dim, dtype=dt, param_dtype=pdt, name="text_adapter")(e, gamma)[:, None, :]

        unet = UNet2DConditionModel(c.unet, dtype=dt, param_dtype=pdt, attention_impl=c.attention_impl,
                                    remat=c.remat, remat_policy=c.remat_policy, name="unet")
        t = jnp.full((b,), c.timestep, jnp.int32)
        feats = unet.features(latents, t, context)

        head = VPDHead(neck_features=c.neck_features, neck_groups=c.neck_groups, deconv_filters=c.deconv_filters,
                       decoder_features=c.decoder_features, max_depth=c.max_depth, head_init=c.head_init,
                       dtype=dt, param_dtype=pdt, name="head")
        depth = head(feats, c.valid_size(h, w), train)
        return depth[:, :h, :w, 0]


def with_class_embeddings(variables: Mapping[str, Any], table: Any, num_classes: int | None = None) -> dict:
    """``variables`` with ``constants/class_embeddings`` set to ``table``.

    A (num_classes, D) table (the official 27 rows) gets its mean appended as the "unknown" row, exactly as
    mmseg builds its 28-row buffer; a (num_classes + 1, D) table is taken as is.
    """
    t = np.asarray(table, np.float32)
    t = with_unknown_row(t, num_classes)
    out = dict(variables)
    out[CONSTANTS] = {**dict(variables.get(CONSTANTS, {})), "class_embeddings": t}
    return out


def with_unknown_row(table: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Append the mean row to a (num_classes, D) table; a table that already has it is returned unchanged."""
    t = np.asarray(table, np.float32)
    if t.ndim != 2:
        raise ValueError(f"class embeddings: expected a (classes, dim) table, got shape {t.shape}")
    n = num_classes if num_classes is not None else 27
    if t.shape[0] == n:
        return np.concatenate([t, t.mean(axis=0, keepdims=True)], axis=0)
    if t.shape[0] == n + 1:
        return t
    raise ValueError(f"class embeddings: {t.shape[0]} rows, expected {n} or {n + 1}")


def init_variables(model: VPDDepth, rng: jax.Array, image_shape=(1, 64, 64, 3)) -> dict:
    """Random variables of ``model`` (jitted init on a small dummy batch); the class table is zeros."""
    images = jnp.zeros(image_shape, jnp.uint8)
    return jax.jit(model.init)(rng, images)


def abstract_variables(model: VPDDepth, image_shape=(1, 64, 64, 3)) -> dict:
    """Shapes and dtypes of ``model``'s variables without allocating them (``jax.eval_shape`` of the init)."""
    return jax.tree.map(lambda s: s, _abstract_variables(model.config, tuple(image_shape)))  # a fresh dict


@functools.lru_cache(maxsize=8)
def _abstract_variables(config: VPDConfig, image_shape: tuple[int, ...]) -> dict:
    # Tracing the full SD init takes seconds; converters and loaders ask for the same shapes repeatedly.
    images = jax.ShapeDtypeStruct(image_shape, jnp.uint8)
    return jax.eval_shape(VPDDepth(config).init, jax.random.key(0), images)
