"""Reading a transformers CLIP checkpoint into ``vpd_jax.models.clip_text`` (the text tower only).

A source is one of
* a transformers folder with ``config.json`` and ``model.safetensors`` (or a sharded
  ``model.safetensors.index.json``), ``pytorch_model.bin`` or ``flax_model.msgpack``: a whole ``CLIPModel``
  (e.g. openai/clip-vit-large-patch14; its vision tower, projections and logit scale are skipped knowingly)
  or a ``CLIPTextModel`` (also a Stable Diffusion folder's ``text_encoder/``, with ``tokenizer/`` beside it);
* a weight file inside such a folder;
* a hub id such as ``openai/clip-vit-large-patch14`` (downloaded through huggingface_hub, or taken from its
  cache; offline with nothing cached is one clear ``WeightsError``).

Every tensor of the file is either converted or skipped by a named rule; anything else, and any missing
parameter or shape mismatch, fails with the names (``check_tree``). The tokenizer (transformers'
``CLIPTokenizer``) comes from the same folder when its files are there.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from vpd_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer, abstract_params
from vpd_jax.weights.common import (
    WeightsError,
    check_tree,
    dense_kernel,
    find_in_folder,
    flatten,
    flax_path,
    hub_download,
    looks_like_hub_id,
    read_tensors,
    unflatten,
)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "flax_model.msgpack")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
# A CLIPTextModel folder, or a Stable Diffusion pipeline folder whose text tower sits in text_encoder/.
SUBFOLDERS = (None, "text_encoder")
TOKENIZER_SUBFOLDERS = (None, "tokenizer")
CLIP_MODEL_TYPES = ("clip", "clip_text_model")

# Tensors of a CLIP checkpoint that the pooled text embedding does not use.
_SKIP_TORCH = re.compile(r"^(vision_model\.|visual_projection\.|text_projection\.|logit_scale$"
                         r"|text_model\.embeddings\.position_ids$)")
_SKIP_FLAX = re.compile(r"^(vision_model/|visual_projection/|text_projection/|logit_scale$)")


# ------------------------------------------------------------------------------------------- sources

def resolve_clip_source(source: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """``(config.json, weight file)`` of a local folder, a weight file in a folder, or a hub id."""
    src = str(source)
    if looks_like_hub_id(src):
        return _resolve_hub(src)
    path = pathlib.Path(src).expanduser()
    if path.is_file():
        config = path.parent / "config.json"
        if not config.is_file():
            raise WeightsError(f"{path}: no config.json beside this weight file; pass its transformers folder")
        return config, path
    if not path.is_dir():
        raise WeightsError(f"{path}: no such file or folder (and not a hub id of the form owner/name)")
    weights = find_in_folder(path, WEIGHT_FILES, SUBFOLDERS)
    config = weights.parent / "config.json"
    if not config.is_file():
        raise WeightsError(f"{weights.parent}: has {weights.name} but no config.json")
    return config, weights


def _resolve_hub(repo_id: str) -> tuple[pathlib.Path, pathlib.Path]:
    errors = []
    for sub in SUBFOLDERS:  # a CLIP repository, or a Stable Diffusion one with text_encoder/
        try:
            config = hub_download(repo_id, ["config.json"], subfolder=sub)
            break
        except WeightsError as e:
            # huggingface_hub reports "offline and not cached" as a missing entry (LocalEntryNotFoundError);
            # say what it means instead of claiming the repository lacks a config.
            if "LocalEntryNotFound" in str(e):
                raise WeightsError(
                    f"{repo_id}: not in the local Hugging Face cache and the hub cannot be reached (offline); "
                    f"pass a local transformers CLIP folder (config.json + model.safetensors) or run once with "
                    f"network access") from None
            if "not in the repository" not in str(e):
                raise
            errors.append(f"{sub + '/' if sub else ''}config.json")
    else:
        raise WeightsError(f"{repo_id}: not a transformers CLIP repository (none of {errors} exists)")
    weights = hub_download(repo_id, list(WEIGHT_FILES), subfolder=sub)
    if weights.name.endswith(".index.json"):
        for shard in sorted(set(json.loads(weights.read_text())["weight_map"].values())):
            hub_download(repo_id, [shard], subfolder=sub)
    for name in TOKENIZER_FILES:  # optional: a missing tokenizer only means no tokenizer
        try:
            hub_download(repo_id, [name], subfolder="tokenizer" if sub else None)
        except WeightsError:
            pass
    return config, weights


def read_clip_config(path: str | os.PathLike):
    """The ``CLIPTextConfig`` of a transformers ``config.json`` (CLIPModel or CLIPTextModel)."""
    path = pathlib.Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable JSON config ({e})") from None
    model_type = raw.get("model_type")
    if model_type is not None and model_type not in CLIP_MODEL_TYPES:
        raise WeightsError(f"{path}: model_type {model_type!r} is not a CLIP text model (expected one of "
                           f"{CLIP_MODEL_TYPES})")
    try:
        return CLIPTextConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{path}: unusable CLIP text config ({e})") from None


def _read_weight_file(path: pathlib.Path) -> dict[str, Any]:
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state: dict[str, Any] = {}
        for shard in shards:
            state.update(read_tensors(path.parent / shard))
        return state
    return read_tensors(path)


# ----------------------------------------------------------------------------------------- conversion

def params_from_torch_state(state: Mapping[str, Any], what: str = "state dict") -> dict:
    """transformers PyTorch names (``text_model.encoder.layers.0.mlp.fc1.weight``) to our Flax tree.

    Raises ``WeightsError`` naming tensors that are neither text-tower parameters nor knowingly skipped.
    """
    flat: dict[str, np.ndarray] = {}
    unknown = []
    for key, value in state.items():
        if _SKIP_TORCH.match(key):
            continue
        if not key.startswith("text_model."):
            unknown.append(key)
            continue
        *mod, leaf = key[len("text_model."):].split(".")
        v = np.asarray(value)
        path = flax_path(mod)
        if mod and mod[0] == "embeddings" and leaf == "weight":
            flat[f"{path}/embedding"] = v
        elif leaf == "weight":
            flat[f"{path}/{'kernel' if v.ndim == 2 else 'scale'}"] = dense_kernel(v) if v.ndim == 2 else v
        elif leaf == "bias":
            flat[f"{path}/bias"] = v
        else:
            unknown.append(key)
    _fail_on_unknown(unknown, flat, what)
    return unflatten(flat)


def params_from_flax_tree(tree: Mapping[str, Any], what: str = "msgpack") -> dict:
    """transformers Flax names (``text_model/encoder/layers/0/mlp/fc1/kernel``) to our Flax tree."""
    flat: dict[str, np.ndarray] = {}
    unknown = []
    for key, value in flatten(tree).items():
        if _SKIP_FLAX.match(key):
            continue
        if not key.startswith("text_model/"):
            unknown.append(key)
            continue
        # transformers' Flax layer collection names layers "0", "1", ...; ours are "layers_0", ...
        flat[re.sub(r"/layers/(\d+)/", r"/layers_\1/", key[len("text_model"):]).lstrip("/")] = np.asarray(value)
    _fail_on_unknown(unknown, flat, what)
    return unflatten(flat)


def _fail_on_unknown(unknown: list[str], converted: Mapping[str, Any], what: str) -> None:
    if not converted:
        first = ", ".join(sorted(unknown)[:8])
        raise WeightsError(f"{what}: no CLIP text-model weights in this file (no 'text_model' tensors); "
                           f"it holds {len(unknown)} other tensors, e.g. {first}")
    if unknown:
        more = f" (+{len(unknown) - 12} more)" if len(unknown) > 12 else ""
        raise WeightsError(f"{what}: {len(unknown)} tensors are not part of a CLIP model: "
                           f"{', '.join(sorted(unknown)[:12])}{more}")


# --------------------------------------------------------------------------------------------- loading

def load_clip_text(source: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None,
                   precision: Any = None, tokenizer: bool = True, use_fast: bool = False):
    """``(module, params, tokenizer_or_None)`` for a CLIP source (see the module docstring).

    ``dtype`` is the module's compute dtype and ``param_dtype`` the dtype the parameters are stored in (both
    float32 by default). The tokenizer is transformers' ``CLIPTokenizer`` (``use_fast`` for
    ``CLIPTokenizerFast``; the official recipe used the slow one), or None where the source has no
    tokenizer files or ``tokenizer=False``.
    """
    import jax
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    param_dtype = jnp.float32 if param_dtype is None else param_dtype
    config_path, weights_path = resolve_clip_source(source)
    config = read_clip_config(config_path)
    module = CLIPTextTransformer(config, dtype=dtype, param_dtype=param_dtype, precision=precision)

    raw = _read_weight_file(weights_path)
    what = str(weights_path)
    if weights_path.suffix == ".msgpack":
        params = params_from_flax_tree(raw, what)
    else:
        params = params_from_torch_state(raw, what)
    del raw
    check_tree(abstract_params(module), params, what)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=param_dtype), params)

    tok = load_clip_tokenizer(weights_path.parent, use_fast=use_fast) if tokenizer else None
    return module, params, tok


def load_clip_tokenizer(folder: str | os.PathLike, *, use_fast: bool = False):
    """transformers' ``CLIPTokenizer`` from ``folder`` (or its ``../tokenizer``, ``tokenizer/``); None if absent.

    transformers is imported only here, so the model and params load without it.
    """
    folder = pathlib.Path(folder)
    candidates = [folder / s if s else folder for s in TOKENIZER_SUBFOLDERS]
    candidates.append(folder.parent / "tokenizer")  # Stable Diffusion: text_encoder/ beside tokenizer/
    for base in candidates:
        has_bpe = (base / "vocab.json").is_file() and (base / "merges.txt").is_file()
        has_fast = (base / "tokenizer.json").is_file()
        if not (has_bpe or (use_fast and has_fast)):
            continue
        try:
            from transformers import CLIPTokenizer, CLIPTokenizerFast
        except ImportError as e:
            raise WeightsError(f"{base}: reading the CLIP tokenizer needs transformers ({e})") from None
        cls = CLIPTokenizerFast if use_fast else CLIPTokenizer
        try:
            return cls.from_pretrained(str(base))
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a broken folder
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WeightsError(f"{base}: could not load the CLIP tokenizer ({type(e).__name__}: {msg})") from e
    return None
