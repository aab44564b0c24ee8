"""Initial model variables for training: random (fast host fill or flax ``init``) and real SD weights.

Shapes always come from ``jax.eval_shape`` (``abstract_variables``), never from a device allocation.

* ``fill_random``: a seeded numpy fill of those shapes by parameter name, with the distributions of the
  references: the neck ``trunc_normal_(std=.02)`` and zero biases (official ``_init_weights``), the decoder's
  convs N(0, 0.001), the depth head N(0, 0.001) (official) or TruncNormal(0.02) (mmseg), norms and BatchNorm
  scale 1 / bias 0, running statistics (0, 1), the text adapter PyTorch's default ``Linear`` init
  (U(+-1/sqrt(fan_in)) for weights and biases), ``gamma`` 1e-4; a UNet/VAE without pretrained weights gets
  diffusers' PyTorch defaults (the same uniform rule for convs and linears, norms 1/0). It takes seconds for
  any model size, while compiling flax's ``init`` of the SD-structured UNet takes minutes on a CPU.
* ``flax_init``: ``model.init`` exactly (the modules' own initialisers), jitted.
* ``with_pretrained``: the ``unet`` and ``vae`` subtrees replaced by real Stable Diffusion weights read by
  ``vpd_jax.weights.diffusers`` (hub id, diffusers folder or CompVis single file); the head, text adapter and
  gamma keep their random init, as in both references.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from vpd_jax.models.vpd import abstract_variables, init_variables
from vpd_jax.training.optimizer import path_to_str
from vpd_jax.weights.common import check_tree
from vpd_jax.weights.diffusers import load_unet, load_vae_encoder

INIT_METHODS = ("fast", "flax")


def _torch_default(shape, rng: np.random.Generator) -> np.ndarray:
    """PyTorch's default ``Conv2d``/``Linear`` init, ``kaiming_uniform(a=sqrt(5))``: U(+-1/sqrt(fan_in)); fan_in
    of a Flax kernel (HWIO or (in, out)) is the product of all axes but the last."""
    bound = 1.0 / math.sqrt(max(1, math.prod(shape[:-1])))
    return rng.uniform(-bound, bound, shape)


def _leaf(path: str, shape: tuple[int, ...], dtype, rng: np.random.Generator, head_init: str,
          fan_in: dict[str, int]) -> np.ndarray:
    name = path.rsplit("/", 1)[-1]
    module = path.rsplit("/", 1)[0]
    collection = path.split("/", 1)[0]
    if collection == "constants":
        return np.zeros(shape, dtype)
    if collection == "batch_stats":
        return (np.ones if name == "var" else np.zeros)(shape, dtype)
    if name == "gamma":
        return np.full(shape, 1e-4, dtype)
    if name == "scale":  # GroupNorm, LayerNorm, BatchNorm weights
        return np.ones(shape, dtype)
    if "/text_adapter/" in f"/{path}":  # created after the official _init_weights: PyTorch's defaults
        if name == "kernel":
            return _torch_default(shape, rng).astype(dtype)
        bound = 1.0 / math.sqrt(fan_in[module])
        return rng.uniform(-bound, bound, shape).astype(dtype)
    if "/head/" in f"/{path}":
        if name == "bias":
            return np.zeros(shape, dtype)
        if "/head/depth/" in path and head_init == "mmseg":
            std = 0.02  # mmseg: the head's TruncNormal(0.02), which its decoder, not this layer, overrides
        elif "/head/decoder/" in path or "/head/depth/" in path:
            return (rng.standard_normal(shape) * 0.001).astype(dtype)  # N(0, 0.001)
        else:
            std = 0.02  # the neck: trunc_normal_(std=.02) with bounds +-2 (absolute)
        return np.clip(rng.standard_normal(shape) * std, -2.0, 2.0).astype(dtype)
    # The Stable Diffusion backbone without pretrained weights: diffusers' PyTorch modules' defaults.
    if name == "bias":
        bound = 1.0 / math.sqrt(fan_in[module]) if module in fan_in else 0.0
        return rng.uniform(-bound, bound, shape).astype(dtype)
    if len(shape) <= 1:
        return np.zeros(shape, dtype)
    return _torch_default(shape, rng).astype(dtype)


def fill_random(abstract: Any, seed: int, head_init: str = "official") -> Any:
    """Host numpy variables with the shapes/dtypes of ``abstract`` (see module docstring)."""
    rng = np.random.default_rng([int(seed), 0x5D])
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    paths = [path_to_str(p) for p, _ in flat]
    # A layer's bias bound comes from its kernel's fan-in (PyTorch: 1/sqrt(fan_in) of the same layer).
    fan_in = {p.rsplit("/", 1)[0]: max(1, math.prod(x.shape[:-1])) for p, (_, x) in zip(paths, flat, strict=True)
              if p.endswith("/kernel")}
    leaves = [_leaf(p, tuple(x.shape), np.dtype(x.dtype), rng, head_init, fan_in)
              for p, (_, x) in zip(paths, flat, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def flax_init(model, seed: int, image_shape=(1, 64, 64, 3)) -> Any:
    return jax.tree.map(np.asarray, init_variables(model, jax.random.PRNGKey(int(seed)), image_shape))


def random_variables(model, seed: int, method: str = "fast") -> Any:
    if method == "fast":
        return fill_random(abstract_variables(model), seed, model.config.head_init)
    if method == "flax":
        return flax_init(model, seed)
    raise ValueError(f"model init method {method!r} is not one of {INIT_METHODS}")


def with_pretrained(variables: dict, model, source: str) -> dict:
    """``variables`` with ``params/unet`` and ``params/vae`` read from ``source`` (checked against the model)."""
    cfg = model.config
    _, unet = load_unet(source, config=cfg.unet, param_dtype=cfg.params_dtype, keep_output_head=False)
    _, vae = load_vae_encoder(source, config=cfg.vae, param_dtype=cfg.params_dtype)
    params = dict(variables["params"])
    check_tree(params["unet"], unet, f"{source} (UNet vs model)")
    check_tree(params["vae"], vae, f"{source} (VAE vs model)")
    params["unet"], params["vae"] = unet, vae
    return {**variables, "params": params}


def with_pretrained_vae(variables: dict, model, source: str) -> dict:
    """``variables`` with ``params/vae`` read from ``source`` alone (checked against the model)."""
    cfg = model.config
    _, vae = load_vae_encoder(source, config=cfg.vae, param_dtype=cfg.params_dtype)
    params = dict(variables["params"])
    check_tree(params["vae"], vae, f"{source} (VAE vs model)")
    params["vae"] = vae
    return {**variables, "params": params}
