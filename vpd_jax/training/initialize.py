"""Initial model variables for training: random (fast host fill or flax ``init``) and real SD weights.

Shapes always come from ``jax.eval_shape`` (``abstract_variables``), never from a device allocation.

* ``fill_random``: a seeded numpy fill of those shapes by parameter name (kernels scaled normal with std
  1/sqrt(fan_in), biases 0, norm scales 1, BatchNorm var 1, ``gamma`` 1e-4, the head's decoder and depth convs
  N(0, 0.001) as the official init). It takes seconds for any model size, while compiling flax's ``init`` of
  the SD-structured UNet takes minutes on a CPU (2.5 min for the tiny config on 2 busy cores).
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

from vpd_jax.training.optimizer import path_to_str

INIT_METHODS = ("fast", "flax")


def _leaf(path: str, shape: tuple[int, ...], dtype, rng: np.random.Generator, head_std: float) -> np.ndarray:
    name = path.rsplit("/", 1)[-1]
    collection = path.split("/", 1)[0]
    if collection == "constants":
        return np.zeros(shape, dtype)
    if collection == "batch_stats":
        return (np.ones if name == "var" else np.zeros)(shape, dtype)
    if name == "gamma":
        return np.full(shape, 1e-4, dtype)
    if name == "scale":
        return np.ones(shape, dtype)
    if name == "bias" or len(shape) <= 1:
        return np.zeros(shape, dtype)
    if "/head/decoder/" in path or "/head/depth/" in path:
        std = head_std
    elif "/head/neck/" in path:
        std = 0.02
    else:
        std = 1.0 / math.sqrt(max(1, math.prod(shape[:-1])))
    x = rng.standard_normal(shape, dtype=np.float32)
    return (np.clip(x, -2.0, 2.0) * std).astype(dtype)


def fill_random(abstract: Any, seed: int, head_init: str = "official") -> Any:
    """Host numpy variables with the shapes/dtypes of ``abstract`` (see module docstring)."""
    rng = np.random.default_rng([int(seed), 0x5D])
    head_std = 0.001 if head_init == "official" else 0.02
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = [_leaf(path_to_str(p), tuple(x.shape), np.dtype(x.dtype), rng, head_std) for p, x in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def flax_init(model, seed: int, image_shape=(1, 64, 64, 3)) -> Any:
    from vpd_jax.models.vpd import init_variables

    return jax.tree.map(np.asarray, init_variables(model, jax.random.PRNGKey(int(seed)), image_shape))


def random_variables(model, seed: int, method: str = "fast") -> Any:
    from vpd_jax.models.vpd import abstract_variables

    if method == "fast":
        return fill_random(abstract_variables(model), seed, model.config.head_init)
    if method == "flax":
        return flax_init(model, seed)
    raise ValueError(f"model init method {method!r} is not one of {INIT_METHODS}")


def with_pretrained(variables: dict, model, source: str) -> dict:
    """``variables`` with ``params/unet`` and ``params/vae`` read from ``source`` (checked against the model)."""
    from vpd_jax.weights.common import check_tree
    from vpd_jax.weights.diffusers import load_unet, load_vae_encoder

    cfg = model.config
    _, unet = load_unet(source, config=cfg.unet, param_dtype=cfg.params_dtype, keep_output_head=False)
    _, vae = load_vae_encoder(source, config=cfg.vae, param_dtype=cfg.params_dtype)
    params = dict(variables["params"])
    check_tree(params["unet"], unet, f"{source} (UNet vs model)")
    check_tree(params["vae"], vae, f"{source} (VAE vs model)")
    params["unet"], params["vae"] = unet, vae
    return {**variables, "params": params}
