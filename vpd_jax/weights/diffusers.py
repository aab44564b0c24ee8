"""Stable Diffusion UNet and VAE-encoder weights from the files users have, as Flax param trees.

``load_unet(source)`` and ``load_vae_encoder(source)`` return ``(module, params)``; ``source`` is any of

* a diffusers model folder: the pipeline root (with ``unet/`` and ``vae/``) or the component folder itself,
  holding ``config.json`` and ``diffusion_flax_model.msgpack``, ``diffusion_pytorch_model.safetensors`` or
  ``diffusion_pytorch_model.bin``;
* a CompVis/LDM single file (``v1-5-pruned-emaonly.ckpt`` or ``.safetensors``; keys
  ``model.diffusion_model.*`` and ``first_stage_model.*``), whose architecture is read off the tensors;
* a component weight file on its own (``.../unet/diffusion_pytorch_model.safetensors``), next to its config;
* a Hugging Face hub id such as ``runwayml/stable-diffusion-v1-5`` (through huggingface_hub).

The CompVis-to-diffusers key map and the PyTorch-to-Flax layout conversion are ours (following diffusers
src/diffusers/pipelines/stable_diffusion/convert_from_ckpt.py and src/diffusers/models/modeling_flax_pytorch_utils.py).
Every tensor is accounted for: inside the UNet or VAE part of a file, a key that maps nowhere, a missing key or a
shape mismatch fails with one ``WeightsError`` naming them. Known-unused tensors are skipped knowingly: the
VAE decoder and ``post_quant_conv``; other components of a single file (the text encoder, schedule buffers).

Params come back as host numpy arrays (place them with ``jax.device_put`` and your shardings); source
tensors are released as they are converted, so peak host memory stays near twice the fp32 size.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vpd_jax.models.unet import UNet2DConditionModel, UNetConfig
from vpd_jax.models.vae import VAEConfig, VAEEncoder
from vpd_jax.weights.common import (
    WeightsError,
    check_tree,
    find_in_folder,
    flatten,
    hub_download,
    looks_like_hub_id,
    read_tensors,
    torch_module_to_flax,
    unflatten,
)

WEIGHT_FILES = ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."

# ------------------------------------------------------------------------------ CompVis <-> diffusers

_RES_LDM_TO_DIFF = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RES_DIFF_TO_LDM = {v: k for k, v in _RES_LDM_TO_DIFF.items()}


def _unet_module_map(cfg: UNetConfig) -> list[tuple[str, str, bool]]:
    """(ldm module prefix, diffusers module prefix, is_resblock) for every module of the UNet."""
    m: list[tuple[str, str, bool]] = [
        ("time_embed.0", "time_embedding.linear_1", False), ("time_embed.2", "time_embedding.linear_2", False),
        ("input_blocks.0.0", "conv_in", False), ("out.0", "conv_norm_out", False), ("out.2", "conv_out", False),
    ]
    n, per = len(cfg.block_out_channels), cfg.layers_per_block
    for b in range(n):
        attn = cfg.down_block_types[b] == "CrossAttnDownBlock2D"
        for j in range(per):
            i = 1 + b * (per + 1) + j
            m.append((f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{j}", True))
            if attn:
                m.append((f"input_blocks.{i}.1", f"down_blocks.{b}.attentions.{j}", False))
        if b < n - 1:
            m.append((f"input_blocks.{(b + 1) * (per + 1)}.0.op", f"down_blocks.{b}.downsamplers.0.conv", False))
    m += [("middle_block.0", "mid_block.resnets.0", True), ("middle_block.1", "mid_block.attentions.0", False),
          ("middle_block.2", "mid_block.resnets.1", True)]
    for b in range(n):
        attn = cfg.up_block_types[b] == "CrossAttnUpBlock2D"
        for j in range(per + 1):
            i = b * (per + 1) + j
            m.append((f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{j}", True))
            if attn:
                m.append((f"output_blocks.{i}.1", f"up_blocks.{b}.attentions.{j}", False))
        if b < n - 1:
            last = b * (per + 1) + per
            m.append((f"output_blocks.{last}.{2 if attn else 1}.conv", f"up_blocks.{b}.upsamplers.0.conv", False))
    return m


def _rename(state: Mapping[str, Any], module_map, *, res_map, what: str) -> dict[str, Any]:
    """Rename module prefixes by ``module_map`` ([(src, dst, is_res)]); unmatched keys fail by name."""
    # Longest prefixes first, so "input_blocks.1.1" wins over "input_blocks.1".
    ordered = sorted(module_map, key=lambda t: -len(t[0]))

    def new_name(key: str) -> str | None:
        for src, dst, is_res in ordered:
            if key.startswith(src + "."):
                rest = key[len(src) + 1:]
                if is_res:
                    sub = next((s for s in res_map if rest.startswith(s + ".")), None)
                    if sub is None:
                        return None
                    rest = res_map[sub] + rest[len(sub):]
                return f"{dst}.{rest}"
        return None

    out: dict[str, Any] = {}
    unmatched = []
    for key in list(state):
        name = new_name(key)
        if name is None:
            unmatched.append(key)
        else:
            out[name] = state[key]
    if unmatched:
        raise WeightsError(f"{what}: {len(unmatched)} tensor(s) match no module of the configured UNet: "
                           f"{', '.join(sorted(unmatched)[:12])}")
    return out


def ldm_unet_to_diffusers(state: Mapping[str, Any], cfg: UNetConfig = UNetConfig(), what: str = "UNet") -> dict:
    """CompVis UNet keys (prefix ``model.diffusion_model.`` already removed) -> diffusers PyTorch keys."""
    return _rename(state, _unet_module_map(cfg), res_map=_RES_LDM_TO_DIFF, what=what)


def diffusers_unet_to_ldm(state: Mapping[str, Any], cfg: UNetConfig = UNetConfig(), what: str = "UNet") -> dict:
    """The inverse of ``ldm_unet_to_diffusers`` (used to write CompVis files in tests and tools)."""
    inverse = [(d, s, r) for s, d, r in _unet_module_map(cfg)]
    return _rename(state, inverse, res_map=_RES_DIFF_TO_LDM, what=what)


_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def ldm_vae_to_diffusers(state: Mapping[str, Any], cfg: VAEConfig = VAEConfig(),
                         what: str = "VAE") -> dict[str, Any]:
    """CompVis VAE keys (prefix ``first_stage_model.`` removed) -> diffusers keys of the encoder part.

    The decoder, ``post_quant_conv`` and training-only ``loss.*`` tensors are skipped knowingly; any other key
    that maps nowhere fails by name.
    """
    out: dict[str, Any] = {}
    unmatched = []
    for key, value in state.items():
        if key.startswith(("decoder.", "post_quant_conv.", "loss.")):
            continue
        new = None
        if key.startswith(("encoder.conv_in.", "encoder.conv_out.", "quant_conv.")):
            new = key
        elif key.startswith("encoder.norm_out."):
            new = "encoder.conv_norm_out." + key[len("encoder.norm_out."):]
        elif mt := re.match(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)$", key):
            rest = mt.group(3).replace("nin_shortcut", "conv_shortcut")
            new = f"encoder.down_blocks.{mt.group(1)}.resnets.{mt.group(2)}.{rest}"
        elif mt := re.match(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)$", key):
            new = f"encoder.down_blocks.{mt.group(1)}.downsamplers.0.conv.{mt.group(2)}"
        elif mt := re.match(r"encoder\.mid\.block_([12])\.(.+)$", key):
            rest = mt.group(2).replace("nin_shortcut", "conv_shortcut")
            new = f"encoder.mid_block.resnets.{int(mt.group(1)) - 1}.{rest}"
        elif (mt := re.match(r"encoder\.mid\.attn_1\.(\w+)\.(weight|bias)$", key)) and mt.group(1) in _VAE_ATTN:
            new = f"encoder.mid_block.attentions.0.{_VAE_ATTN[mt.group(1)]}.{mt.group(2)}"
            if mt.group(1) != "norm" and np.ndim(value) == 4:
                value = value[:, :, 0, 0]
        if new is None:
            unmatched.append(key)
        else:
            out[new] = value
    if unmatched:
        raise WeightsError(f"{what}: {len(unmatched)} tensor(s) match no part of the VAE encoder: "
                           f"{', '.join(sorted(unmatched)[:12])}")
    return out


def diffusers_vae_to_ldm(state: Mapping[str, Any]) -> dict[str, Any]:
    """Encoder-part diffusers VAE keys -> CompVis keys (attention weights as 1x1 convs), for tests/tools."""
    inv_attn = {v: k for k, v in _VAE_ATTN.items()}
    out = {}
    for key, value in state.items():
        if key.startswith(("decoder.", "post_quant_conv.")):
            continue
        new = key.replace("encoder.conv_norm_out.", "encoder.norm_out.")
        if mt := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
            new = (f"encoder.down.{mt.group(1)}.block.{mt.group(2)}."
                   f"{mt.group(3).replace('conv_shortcut', 'nin_shortcut')}")
        elif mt := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", key):
            new = f"encoder.down.{mt.group(1)}.downsample.conv.{mt.group(2)}"
        elif mt := re.match(r"encoder\.mid_block\.resnets\.(\d)\.(.+)$", key):
            new = f"encoder.mid.block_{int(mt.group(1)) + 1}.{mt.group(2).replace('conv_shortcut', 'nin_shortcut')}"
        elif mt := re.match(r"encoder\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)$", key):
            new = f"encoder.mid.attn_1.{inv_attn[mt.group(1)]}.{mt.group(2)}"
            if mt.group(1) != "group_norm" and np.ndim(value) == 2:
                value = value[:, :, None, None]
        out[new] = value
    return out


# ----------------------------------------------------------------------- diffusers PyTorch -> Flax

def unet_params_from_torch(state: dict[str, Any], cfg: UNetConfig | None = None) -> dict:
    """diffusers PyTorch UNet state dict -> Flax params (names as diffusers' Flax UNet). Consumes ``state``."""
    del cfg  # the layout rules do not depend on it: 1x1-conv and linear projections convert by rank
    return torch_module_to_flax(state, consume=True)


_VAE_FLAX_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}


def vae_params_from_torch(state: dict[str, Any]) -> dict:
    """diffusers PyTorch AutoencoderKL state dict -> Flax encoder params; decoder skipped. Consumes ``state``."""
    enc = {}
    for k in list(state):
        v = state.pop(k)
        if k.startswith(("decoder.", "post_quant_conv.")):
            continue
        if ".mid_block.attentions.0." in k and np.ndim(v) == 4 and not k.endswith(("group_norm.weight",)):
            v = v[:, :, 0, 0]  # very old diffusers files stored the attention projections as 1x1 convs
        enc[k] = v
    flat = flatten(torch_module_to_flax(enc))
    renamed = {}
    for k, v in flat.items():
        parts = k.split("/")
        renamed["/".join(_VAE_FLAX_ATTN.get(p, p) for p in parts)] = v
    return unflatten(renamed)


# ------------------------------------------------------------------------------------- resolving

def _read_config(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not a readable config.json ({e})") from None


def _component_files(source: str, component: str) -> tuple[pathlib.Path | None, pathlib.Path]:
    """(config.json or None, weight file) for a diffusers component, or (None, single file)."""
    p = pathlib.Path(source).expanduser()
    if p.is_file():
        cfg = p.parent / "config.json"
        return (cfg if cfg.is_file() and p.name in WEIGHT_FILES else None), p
    if p.is_dir():
        sub = component if (p / component).is_dir() else None
        weights = find_in_folder(p, WEIGHT_FILES, [sub] if sub else [None])
        cfg = weights.parent / "config.json"
        if not cfg.is_file():
            raise WeightsError(f"{weights.parent}: has {weights.name} but no config.json")
        return cfg, weights
    if looks_like_hub_id(source):
        cfg = hub_download(source, ["config.json"], subfolder=component)
        weights = hub_download(source, list(WEIGHT_FILES[1:]) + [WEIGHT_FILES[0]], subfolder=component)
        return cfg, weights
    raise WeightsError(f"{source}: no such file or folder, and not a Hugging Face hub id (owner/name)")


def _read_component(weights: pathlib.Path) -> dict[str, Any]:
    tensors = read_tensors(weights)
    if weights.suffix in (".ckpt", ".pth", ".pt", ".bin") and isinstance(tensors.get("state_dict"), Mapping):
        tensors = dict(tensors["state_dict"])
    if not isinstance(tensors, Mapping) or not tensors:
        raise WeightsError(f"{weights}: holds no tensors")
    return tensors


def _is_ldm(tensors: Mapping[str, Any]) -> bool:
    return any(k.startswith((LDM_UNET_PREFIX, LDM_VAE_PREFIX)) for k in tensors)


def infer_ldm_unet_config(state: Mapping[str, Any], what: str, heads: int | tuple[int, ...] | None = None
                          ) -> UNetConfig:
    """An SD 1.x/2.x UNet config read off CompVis tensors (prefix removed).

    Head counts are not in the tensors: a 768-wide context is SD 1.x (8 heads), a 1024-wide one SD 2.x (64-wide
    heads); any other width needs ``heads`` (a count, or one per level), else one error says so.
    """
    try:
        in_ch = state["input_blocks.0.0.weight"].shape[1]
        ctx = state["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
        linear = np.ndim(state["input_blocks.1.1.proj_in.weight"]) == 2
    except KeyError as e:
        raise WeightsError(f"{what}: not a Stable Diffusion UNet (missing {e.args[0]})") from None
    out_ch = state["out.2.weight"].shape[0] if "out.2.weight" in state else 4
    first_down = next((i for i in range(1, 64) if f"input_blocks.{i}.0.op.weight" in state), None)
    last_block = max(int(k.split(".")[1]) for k in state if k.startswith("input_blocks."))
    per = (first_down - 1) if first_down else last_block
    n = (last_block + 1) // (per + 1)
    chans = [state[f"input_blocks.{1 + b * (per + 1)}.0.out_layers.3.weight"].shape[0] for b in range(n)]
    downs = tuple("CrossAttnDownBlock2D" if f"input_blocks.{1 + b * (per + 1)}.1.proj_in.weight" in state
                  else "DownBlock2D" for b in range(len(chans)))
    ups = tuple("CrossAttnUpBlock2D" if f"output_blocks.{b * (per + 1)}.1.proj_in.weight" in state
                else "UpBlock2D" for b in range(len(chans)))
    if heads is None:
        if ctx not in (768, 1024):
            raise WeightsError(
                f"{what}: attention head counts cannot be read off the tensors, and a context width of {ctx} is "
                f"neither SD 1.x's (768: 8 heads) nor SD 2.x's (1024: 64-wide heads); give the head count "
                f"(heads=N, or --heads N) or the UNet's diffusers config")
        # SD 1.x: 8 heads everywhere; SD 2.x (context 1024): 64-channel heads.
        heads = 8 if ctx == 768 else tuple(c // 64 for c in chans)
    elif isinstance(heads, (tuple, list)):
        if len(heads) != len(chans):
            raise WeightsError(f"{what}: {len(heads)} head counts for a UNet of {len(chans)} levels")
        heads = tuple(int(h) for h in heads)
    bad = [c for c, h in zip(chans, heads if isinstance(heads, tuple) else [heads] * len(chans), strict=True)
           if h < 1 or c % h]
    if bad:
        raise WeightsError(f"{what}: {heads} attention heads do not divide the level widths {bad}")
    return UNetConfig(in_channels=in_ch, out_channels=out_ch, block_out_channels=tuple(chans),
                      down_block_types=downs, up_block_types=ups, layers_per_block=per, attention_head_dim=heads,
                      cross_attention_dim=ctx, use_linear_projection=linear)


def _component_state(source: str, component: str, prefix: str, config, config_cls, infer, to_diffusers):
    """(config, diffusers-PyTorch-named state or Flax tree, is_flax) of a UNet or VAE source.

    ``prefix``: the component's key prefix in CompVis single files; ``infer(sub, what)`` reads its config off
    the tensors; ``to_diffusers(sub, cfg, what=...)`` renames CompVis keys to diffusers ones.
    """
    cfg_path, weights = _component_files(source, component)
    tensors = _read_component(weights)
    if weights.suffix == ".msgpack":
        # A full AutoencoderKL msgpack also holds the decoder, which VPD never uses.
        tensors = {k: v for k, v in tensors.items() if k not in ("decoder", "post_quant_conv")}
        return config or config_cls.from_diffusers(_read_config(cfg_path)), tensors, True
    if _is_ldm(tensors):
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        del tensors
        if not sub:
            raise WeightsError(f"{weights}: a CompVis checkpoint without {component} tensors ({prefix}*)")
        cfg = config or infer(sub, str(weights))
        return cfg, to_diffusers(sub, cfg, what=str(weights)), False
    if config is None and cfg_path is None:
        raise WeightsError(f"{weights}: neither a CompVis checkpoint (no {prefix}* keys) nor a diffusers "
                           f"component file with a config.json beside it")
    return config or config_cls.from_diffusers(_read_config(cfg_path)), tensors, False


def load_unet(source: str, *, config: UNetConfig | None = None, heads: int | tuple[int, ...] | None = None,
              dtype=jnp.float32, param_dtype=jnp.float32, attention_impl: str | None = None, remat: bool = False,
              remat_policy: str | None = None, keep_output_head: bool = True):
    """``(UNet2DConditionModel, params)`` from a diffusers folder/file, a CompVis file or a hub id.

    ``config`` overrides the architecture otherwise read from ``config.json`` or, for CompVis files, off the
    tensors. Head counts cannot be read off tensors: SD 1.x's 8 heads (768-wide context) and SD 2.x's 64-wide
    heads (1024) are known; other CompVis UNets need ``heads`` (a count or one per level) or ``config``.
    ``keep_output_head=False`` drops ``conv_norm_out``/``conv_out`` (VPD's ``features`` path never uses them;
    CompVis files converted by VPD lack them). Params are host numpy arrays of ``param_dtype``.
    """
    cfg, state, is_flax = _component_state(source, "unet", LDM_UNET_PREFIX, config, UNetConfig,
                                           lambda sub, what: infer_ldm_unet_config(sub, what, heads),
                                           ldm_unet_to_diffusers)
    module = UNet2DConditionModel(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                  remat=remat, remat_policy=remat_policy)
    params = state if is_flax else unet_params_from_torch(state, cfg)
    expected = unet_param_shapes(module)
    has_head = "conv_out" in params
    if not has_head or not keep_output_head:
        expected = {k: v for k, v in expected.items() if k not in ("conv_norm_out", "conv_out")}
        params = {k: v for k, v in params.items() if k not in ("conv_norm_out", "conv_out")}
    check_tree(expected, params, f"{source} (UNet)")
    return module, _cast(params, param_dtype)


def unet_param_shapes(module: UNet2DConditionModel) -> dict:
    """The UNet's parameter shapes (no allocation)."""
    c = module.config
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, c.in_channels)),
                                              jnp.ones((1,)), jnp.zeros((1, 1, c.cross_attention_dim))))["params"]


def infer_ldm_vae_config(state: Mapping[str, Any], what: str) -> VAEConfig:
    """The SD VAE encoder config read off CompVis tensors (prefix removed)."""
    try:
        chans = []
        while f"encoder.down.{len(chans)}.block.0.conv1.weight" in state:
            chans.append(state[f"encoder.down.{len(chans)}.block.0.conv1.weight"].shape[0])
        per = sum(1 for j in range(16) if f"encoder.down.0.block.{j}.conv1.weight" in state)
        in_ch = state["encoder.conv_in.weight"].shape[1]
        latent = state["encoder.conv_out.weight"].shape[0] // 2
    except KeyError as e:
        raise WeightsError(f"{what}: not a Stable Diffusion VAE (missing {e.args[0]})") from None
    if not chans:
        raise WeightsError(f"{what}: not a Stable Diffusion VAE (no encoder.down.* blocks)")
    return VAEConfig(in_channels=in_ch, latent_channels=latent, block_out_channels=tuple(chans),
                     down_block_types=("DownEncoderBlock2D",) * len(chans), layers_per_block=per,
                     use_quant_conv="quant_conv.weight" in state,
                     mid_block_add_attention="encoder.mid.attn_1.q.weight" in state)


def load_vae_encoder(source: str, *, config: VAEConfig | None = None, dtype=jnp.float32, param_dtype=jnp.float32):
    """``(VAEEncoder, params)`` from a diffusers folder/file, a CompVis file or a hub id (decoder skipped)."""
    cfg, state, is_flax = _component_state(source, "vae", LDM_VAE_PREFIX, config, VAEConfig,
                                           infer_ldm_vae_config, ldm_vae_to_diffusers)
    module = VAEEncoder(cfg, dtype=dtype, param_dtype=param_dtype)
    params = state if is_flax else vae_params_from_torch(state)
    check_tree(vae_param_shapes(module), params, f"{source} (VAE encoder)")
    return module, _cast(params, param_dtype)


def save_vae_encoder(folder: str | os.PathLike, config: VAEConfig, params: Mapping[str, Any]) -> pathlib.Path:
    """Write an encoder as a diffusers Flax ``AutoencoderKL`` folder (``config.json`` +
    ``diffusion_flax_model.msgpack``, encoder and ``quant_conv`` only) that ``load_vae_encoder`` reads; atomic."""
    import shutil

    from flax import serialization

    out = pathlib.Path(folder).expanduser().resolve()
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"_class_name": "AutoencoderKL", **config.to_dict(),
            "up_block_types": ["UpDecoderBlock2D"] * len(config.block_out_channels), "act_fn": "silu"}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    tree = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), dict(params))
    (tmp / "diffusion_flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def vae_param_shapes(module: VAEEncoder) -> dict:
    c = module.config
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, c.in_channels))))["params"]


def _cast(tree, dtype):
    dt = np.dtype(dtype)
    return jax.tree_util.tree_map(lambda a: a if np.asarray(a).dtype == dt else np.asarray(a).astype(dt), tree)
