"""VPD for semantic segmentation (wl-zhao/VPD ``segmentation/models/vpd_seg.py``, ``vpd/models.py``).

The image goes through the frozen SD VAE encoder (posterior mean, no 0.18215 scaling), the UNet runs once at
t = 1 with a context of one token per class (the class-embedding table refined by the text adapter,
``x + gamma * MLP(x)``), and its four decoder taps, with the head-averaged cross-attention maps between pixels
and class tokens appended at the latent/2 and latent/4 levels (no gradient through the maps), go to a Semantic
FPN (mmseg's ``FPN`` + ``FPNHead``), whose logits are resized to the image.

Variables: ``params`` (``vae``, ``unet``, ``text_adapter``, ``gamma``, ``head/{neck,decode_head}``),
``batch_stats`` (the head's BatchNorm) and ``constants/class_embeddings`` (num_classes, text_dim): one row per
class, no mean row (every class is a token of the context).

Any input size: the normalised image is zero padded at the bottom and right to a multiple of 64 (as
``VPDDepth``), the logits are resized to the padded size and cropped back. ``valid_hw`` (B, 2) marks the image
inside a larger padded batch (the loaders pad with 0 in uint8): pixels outside it are set to 0 after
normalisation, as the references pad after normalising. At 512x512 the network is the official one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from vpd_jax.models.head import TextAdapter
from vpd_jax.models.seg_head import SemanticFPN
from vpd_jax.models.unet import UNet2DConditionModel, UNetConfig, concat_attention_maps
from vpd_jax.models.vae import VAEConfig, VAEEncoder
from vpd_jax.models.vpd import CONSTANTS, VPDConfig, backbone_kwargs

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class VPDSegConfig:
    """Everything that defines a ``VPDSeg``; defaults are the released ADE20K model (SD-1.5, 150 classes)."""

    num_classes: int = 150
    text_dim: int = 768  # CLIP embedding size = the UNet's cross_attention_dim
    neck_channels: int = 256  # FPN out_channels
    channels: int = 256  # FPNHead channels
    dropout_ratio: float = 0.1
    timestep: int = 1
    unet: UNetConfig = UNetConfig()
    vae: VAEConfig = VAEConfig()
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str | None = None
    remat: bool = False
    remat_policy: str | None = None

    def __post_init__(self):
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in _DTYPES:
                raise ValueError(f"VPDSegConfig.{f} {getattr(self, f)!r} is not one of {_DTYPES}")
        if self.unet.cross_attention_dim != self.text_dim:
            raise ValueError(f"VPDSegConfig: text_dim {self.text_dim} != UNet cross_attention_dim "
                             f"{self.unet.cross_attention_dim}")
        if len(self.unet.block_out_channels) != 4:
            raise ValueError("VPDSegConfig: the FPN takes one map from each of 4 UNet levels")

    @property
    def pad_multiple(self) -> int:
        return self.vae.downsample_factor * 2 ** (len(self.unet.block_out_channels) - 1)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    def architecture_size(self) -> str | None:
        """The preset name whose architecture this is (any class count), or None."""
        for name in ("sd15", "tiny", "micro"):
            if VPDSegConfig.preset(name, num_classes=self.num_classes).architecture() == self.architecture():
                return name
        return None

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        m = self.pad_multiple
        return -(-height // m) * m, -(-width // m) * m

    ARCHITECTURE_FIELDS = ("num_classes", "text_dim", "neck_channels", "channels", "unet", "vae")

    def architecture(self) -> dict[str, Any]:
        d = self.to_dict()
        return {k: d[k] for k in self.ARCHITECTURE_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["unet"], d["vae"] = self.unet.to_dict(), self.vae.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VPDSegConfig:
        return cls(**backbone_kwargs(cls, d))

    def replace(self, **kw) -> VPDSegConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_training(cls, model: Mapping[str, Any], num_classes: int) -> VPDSegConfig:
        """The ``VPDSegConfig`` of a training config's ``model`` section (``configs/base.py``) and class count."""
        return cls.preset(model["size"], num_classes=int(num_classes), dtype=model["dtype"],
                          param_dtype=model["param_dtype"], remat=bool(model["remat"]),
                          attention_impl=model.get("attention_impl") or None,
                          dropout_ratio=float(model.get("dropout_ratio", 0.1)))

    @classmethod
    def preset(cls, size: str, **kw) -> VPDSegConfig:
        """The backbone of ``VPDConfig.preset(size)`` ("sd15", "tiny", "micro") under the segmentation head;
        the small presets get a head as narrow as their necks. The micro UNet gets cross-attention in SD's three
        upper levels (the depth micro model has it only in the first), since the maps come from levels 1 and 2."""
        depth = VPDConfig.preset(size)
        unet = depth.unet
        if size == "micro":
            unet = dataclasses.replace(unet, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                       up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        base: dict[str, Any] = dict(unet=unet, vae=depth.vae, text_dim=depth.text_dim)
        if size != "sd15":
            base.update(neck_channels=depth.neck_features // 2, channels=depth.neck_features // 2)
        base.update(kw)
        return cls(**base)


class VPDSeg(nn.Module):
    """VPD segmentation: RGB (B, H, W, 3) in [0, 255] -> class logits (B, H, W, num_classes), float32.

    ``apply(variables, images, train=False, valid_hw=None, rngs={"dropout": key})`` (dropout only in training;
    ``mutable=["batch_stats"]`` with ``train=True``).
    """

    config: VPDSegConfig = VPDSegConfig()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, valid_hw: jax.Array | None = None) -> jax.Array:
        c = self.config
        dt, pdt = c.compute_dtype, c.params_dtype
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"VPDSeg: expected (B, H, W, 3) RGB images, got shape {images.shape}")
        b, h, w, _ = images.shape
        x = images.astype(jnp.float32) / 127.5 - 1.0  # mean = std = 127.5
        if valid_hw is not None:
            hw = jnp.asarray(valid_hw, jnp.int32)
            inside = ((jnp.arange(h)[None, :, None] < hw[:, 0, None, None])
                      & (jnp.arange(w)[None, None, :] < hw[:, 1, None, None]))
            x = jnp.where(inside[..., None], x, 0.0)
        ph, pw = c.padded_size(h, w)
        x = jnp.pad(x, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)))
        latents = jax.lax.stop_gradient(VAEEncoder(c.vae, dtype=dt, param_dtype=pdt, name="vae")(x))

        table = self.variable(CONSTANTS, "class_embeddings", jnp.zeros, (c.num_classes, c.text_dim), jnp.float32)
        gamma = self.param("gamma", lambda _, s, d: jnp.full(s, 1e-4, d), (c.text_dim,), pdt)
        tokens = TextAdapter(c.text_dim, dtype=dt, param_dtype=pdt, name="text_adapter")(table.value, gamma)
        # The class tokens are the same for every image. Under the train step's vmap over BatchNorm groups they would
        # not carry the vmapped axis, which JAX's cuDNN attention batching rule cannot take (it reshapes the keys to
        # the queries' batch: jax/_src/cudnn/fused_attention_stablehlo.py ``_dot_product_attention_fwd_batcher``).
        # An exact zero computed from the images gives the context the images' batch axes.
        zero = jax.lax.stop_gradient(images[:, :1, :1, 0].astype(dt) * 0)
        context = jnp.broadcast_to(tokens[None], (b, *tokens.shape)) + zero

        unet = UNet2DConditionModel(c.unet, dtype=dt, param_dtype=pdt, attention_impl=c.attention_impl,
                                    remat=c.remat, remat_policy=c.remat_policy, name="unet")
        t = jnp.full((b,), c.timestep, jnp.int32)
        feats, maps = unet.features(latents, t, context, attn_maps=True)
        feats = concat_attention_maps(feats, maps)
        head = SemanticFPN(c.num_classes, c.neck_channels, c.channels, dropout_ratio=c.dropout_ratio, dtype=dt,
                           param_dtype=pdt, name="head")
        logits = head(feats, train=train, out_size=(ph, pw))
        return logits[:, :h, :w].astype(jnp.float32)


def with_class_table(variables: Mapping[str, Any], table: Any) -> dict:
    """``variables`` with ``constants/class_embeddings`` set to the (num_classes, text_dim) ``table``."""
    out = dict(variables)
    out[CONSTANTS] = {**dict(variables.get(CONSTANTS, {})), "class_embeddings": jnp.asarray(table, jnp.float32)}
    return out


@functools.lru_cache(maxsize=8)
def _abstract(config: VPDSegConfig, image_shape: tuple[int, ...]) -> dict:
    images = jax.ShapeDtypeStruct(image_shape, jnp.uint8)
    return jax.eval_shape(VPDSeg(config).init, jax.random.key(0), images)


def abstract_variables(model: VPDSeg, image_shape=(1, 64, 64, 3)) -> dict:
    """Shapes and dtypes of ``model``'s variables without allocating them."""
    return jax.tree.map(lambda s: s, _abstract(model.config, tuple(image_shape)))
