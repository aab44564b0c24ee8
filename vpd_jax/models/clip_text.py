"""The CLIP text transformer (as in transformers' ``CLIPTextModel``) in Flax linen.

VPD conditions its UNet on the *pooled* CLIP ViT-L/14 text embedding of a scene prompt (wl-zhao/VPD
depth/dump_nyu_text_embeddings.py with ``FrozenCLIPEmbedder`` of vpd/models.py): the final-layer-normed hidden
state at the end-of-text token. This module must stay numerically equal to
transformers' PyTorch ``CLIPTextModel`` (the class the official ``FrozenCLIPEmbedder`` uses), including its
pooling rule, so that a class-embedding table computed here equals the one the reference computes.

The parameter tree mirrors the PyTorch names (``embeddings/token_embedding``, ``encoder/layers_3/self_attn/
q_proj``, ``final_layer_norm``) so the reader in ``vpd_jax.weights.clip`` is a plain renaming. Imports only
jax, flax and numpy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# transformers keeps this pooling rule for configs written before its PR #24773, where ``eos_token_id`` was
# wrongly 2 (openai/clip-vit-large-patch14 is one): the pooled token is the one with the *largest id*, which is
# the end-of-text token as long as no tokens were added to the vocabulary.
LEGACY_EOS_TOKEN_ID = 2

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers ``CLIPTextConfig`` that change the computation.

    Defaults are transformers' ``CLIPTextConfig`` defaults, so a partial ``config.json`` means the same here
    as there. ``vit_l14()`` is openai/clip-vit-large-patch14, the encoder VPD uses.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; expected one of {ACTIVATIONS}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
        """From a ``CLIPTextModel`` config dict, or a ``CLIPModel`` one (its ``text_config``).

        As transformers does, ``text_config_dict`` (older CLIPModel configs) wins over ``text_config``.
        Fields that do not change the computation (dropout, projection_dim, ...) are ignored.
        """
        if "text_config" in d or "text_config_dict" in d:
            merged = dict(d.get("text_config") or {})
            merged.update(d.get("text_config_dict") or {})
            d = merged
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    @classmethod
    def vit_l14(cls) -> CLIPTextConfig:
        """openai/clip-vit-large-patch14's text tower, with its hub config's legacy ``eos_token_id``."""
        return cls(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                   layer_norm_eps=1e-5, eos_token_id=LEGACY_EOS_TOKEN_ID)


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # (B, T, hidden): after final_layer_norm
    pooler_output: jax.Array  # (B, hidden): last_hidden_state at the pooled (end-of-text) token


def activation(name: str, x: jax.Array) -> jax.Array:
    """transformers' ``ACT2FN[name]``: "gelu" is the exact erf form, "quick_gelu" OpenAI's sigmoid form."""
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unsupported activation {name!r}; expected one of {ACTIVATIONS}")


def pooled_token_index(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """The position transformers pools at, per sequence.

    With ``eos_token_id == 2`` (legacy configs): the first position of the largest id. Otherwise: the first
    position of ``eos_token_id`` (padding may also be end-of-text, hence *first*), 0 if there is none.
    """
    ids = input_ids.astype(jnp.int32)
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


def _layer_norm(cfg: CLIPTextConfig, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch.nn.LayerNorm; Flax's default E[x^2]-E[x]^2 costs ~1e-6 of parity.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False, name=name)


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        seq_len = input_ids.shape[-1]
        if seq_len > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        init = nn.initializers.normal(0.02)
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                       embedding_init=init, name="token_embedding")
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                       param_dtype=self.param_dtype, embedding_init=init, name="position_embedding")
        return tok(input_ids) + pos(jnp.arange(seq_len))[None]


class CLIPAttention(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """``mask``: boolean (B or 1, 1, T, T), True where a query may attend to a key."""
        cfg = self.config
        b, t, d = x.shape
        heads = cfg.num_attention_heads
        head_dim = d // heads

        def proj(name):
            return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                            name=name)

        q = proj("q_proj")(x).reshape(b, t, heads, head_dim)
        k = proj("k_proj")(x).reshape(b, t, heads, head_dim)
        v = proj("v_proj")(x).reshape(b, t, heads, head_dim)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision) * (head_dim ** -0.5)
        # Softmax in fp32 even for a bf16 compute dtype; a masked key gets the most negative finite score as
        # transformers adds finfo.min, so a row always has its first (start-of-text) key to attend to.
        scores = scores.astype(jnp.float32)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=self.precision).reshape(b, t, d)
        return proj("out_proj")(out)


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = nn.Dense(cfg.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype,
                     precision=self.precision, name="fc1")(x)
        x = activation(cfg.hidden_act, x)
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                        precision=self.precision, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        ln = dict(cfg=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + CLIPAttention(**kw, name="self_attn")(_layer_norm(**ln, name="layer_norm1")(x), mask)
        return x + CLIPMLP(**kw, name="mlp")(_layer_norm(**ln, name="layer_norm2")(x))


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, self.param_dtype, self.precision,
                                 name=f"layers_{i}")(x, mask)
        return x


class CLIPTextTransformer(nn.Module):
    """transformers' ``CLIPTextModel`` forward: token ids to (last_hidden_state, pooler_output).

    ``dtype`` is the compute dtype and ``param_dtype`` the parameters' dtype (a bf16 compute over fp32
    params is fine for inference; attention softmax and LayerNorm statistics stay in fp32). ``precision``
    is passed to every matmul (e.g. ``"highest"`` to keep fp32 on GPUs that would use TF32).
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        """``input_ids`` (B, T) ints; ``attention_mask`` (B, T), 1 for real tokens, optional.

        The official VPD recipe passes no attention mask (padding is end-of-text and comes after the pooled
        token, so the causal mask already hides it from the pooled output); with a mask, the hidden states
        at padded positions match transformers' with that mask too.
        """
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        t = input_ids.shape[-1]
        x = CLIPTextEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(input_ids)
        mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
        if attention_mask is not None:
            mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, :]
        x = CLIPEncoder(cfg, self.dtype, self.param_dtype, self.precision, name="encoder")(x, mask)
        x = _layer_norm(cfg, self.dtype, self.param_dtype, name="final_layer_norm")(x)
        idx = pooled_token_index(input_ids, cfg.eos_token_id)
        pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last_hidden_state=x, pooler_output=pooled)


def abstract_params(module: CLIPTextTransformer, seq_len: int = 1) -> dict:
    """The parameter tree's shapes and dtypes, without allocating it (for checking a weight file)."""
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda i: module.init(jax.random.PRNGKey(0), i), ids)["params"]


def num_params(params: Mapping[str, Any]) -> int:
    return int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(params)))
