"""The released VPD segmentation checkpoint (ADE20K, Semantic FPN) as variables of our ``VPDSeg``.

The file is mmcv's checkpoint of wl-zhao/VPD ``segmentation/models/vpd_seg.py`` (``VPDSeg``):
``{'meta': ..., 'state_dict': ..., 'optimizer': ...}`` (only ``state_dict`` is read), whose keys follow the
module's attributes:

| PyTorch key | ours |
|---|---|
| ``encoder_vq.encoder.*``, ``encoder_vq.quant_conv.*`` (CompVis ``AutoencoderKL``) | ``params/vae/...`` |
| ``unet.unet.diffusion_model.*`` (``UNetWrapper(sd_model.model)``, CompVis ``UNetModel``) | ``params/unet/...`` |
| ``text_adapter.fc.{0,2}.{weight,bias}`` (``TextAdapter``) | ``params/text_adapter/{fc1,fc2}/{kernel,bias}`` |
| ``gamma`` | ``params/gamma`` |
| ``class_embeddings`` (num_classes, 768), a buffer | ``constants/class_embeddings`` (one row per class) |
| ``neck.*``, ``decode_head.*`` (mmseg ``FPN``, ``FPNHead``) | ``params/head/...``, ``batch_stats/head/...`` |

Knowingly skipped (``SKIPPED_PREFIXES``, ``SD_MODEL_BUFFERS``): the UNet's output head ``out.*`` (VPD taps
decoder features), the VAE's ``post_quant_conv`` (decoder side; the decoder itself was deleted), the
latent-diffusion wrapper's noise-schedule buffers ``sd_model.*`` (the UNet runs at one fixed t) and BatchNorm step
counters. Any other key fails the conversion by name, as does a missing tensor or a wrong shape.

The UNet and the VAE go through the CompVis -> diffusers -> Flax maps of ``vpd_jax.weights.diffusers``, the
neck and head through ``vpd_jax.weights.seg_checkpoint.convert_seg_head``. A converted segmentation
checkpoint is a folder like a depth one (``config.json`` with ``"task": "segmentation"`` and a ``VPDSegConfig``,
``variables/``); ``vpd_jax.weights.loader.load_seg_model`` reads it, or converts a ``.pth`` on the fly.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from vpd_jax.models.vpd_seg import VPDSeg, VPDSegConfig, abstract_variables
from vpd_jax.weights import diffusers as dw
from vpd_jax.weights import vpd_checkpoint as vc
from vpd_jax.weights.common import WeightsError, _tree_to_numpy, check_tree, dense_kernel, flatten, orbax, unflatten
from vpd_jax.weights.seg_checkpoint import convert_seg_head

TASK = "segmentation"
FORMAT = "official"
UNET_PREFIX = "unet.unet.diffusion_model."
VAE_PREFIX = "encoder_vq."
CLASS_EMBEDDINGS = "class_embeddings"
GAMMA = "gamma"
ADAPTER = {"text_adapter.fc.0": "fc1", "text_adapter.fc.2": "fc2"}
SD_MODEL = "sd_model."
# CompVis ``LatentDiffusion`` buffers left in ``VPDSeg.sd_model`` (ldm/models/diffusion/ddpm.py of
# CompVis/stable-diffusion: ``DDPM.register_schedule`` and ``LatentDiffusion.__init__``'s ``scale_factor``).
SD_MODEL_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "scale_factor",
)
SD_MODEL_REASON = ("the latent-diffusion wrapper's noise-schedule buffers (sd_model; VPD runs the UNet once at a "
                   "fixed t and encodes without the 0.18215 scale)")
SKIPPED_PREFIXES: dict[str, str] = {
    UNET_PREFIX + "out.": "the UNet's output head (VPD taps decoder features, never the noise prediction)",
    VAE_PREFIX + "post_quant_conv.": "the VAE's post-quantisation conv (decoder side)",
    VAE_PREFIX + "decoder.": "the VAE decoder (VPD only encodes)",
}


def is_segmentation_state(state: Mapping[str, Any]) -> bool:
    """The official segmentation layout: the UNet under ``unet.unet.`` and an mmseg ``decode_head.conv_seg``."""
    return (any(k.startswith(UNET_PREFIX) for k in state)
            and any(k.startswith("decode_head.conv_seg.") for k in state))


def infer_config(state: Mapping[str, Any], base: VPDSegConfig | None = None, heads: Any = None) -> VPDSegConfig:
    """A ``VPDSegConfig`` read off the tensors (head sizes, class count, SD UNet/VAE as ``vpd_jax.weights.diffusers``
    infers them from CompVis names: 8 heads for a 768-wide context); with ``base``, its class count only is
    taken from the table (everything else is checked against the tensors later)."""
    try:
        rows, text_dim = (int(n) for n in np.shape(state[CLASS_EMBEDDINGS]))
        if base is not None:
            return base.replace(num_classes=rows)
        neck = int(np.shape(state["neck.lateral_convs.0.conv.weight"])[0])
        channels = int(np.shape(state["decode_head.conv_seg.weight"])[1])
    except (KeyError, ValueError) as e:
        raise WeightsError(f"not a VPD segmentation checkpoint: {e.args[0]} is missing or misshapen") from None
    unet = dw.infer_ldm_unet_config(
        {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}, "VPD checkpoint UNet",
        heads)
    vae = dw.infer_ldm_vae_config(
        {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}, "VPD checkpoint VAE")
    try:
        return VPDSegConfig(num_classes=rows, text_dim=text_dim, neck_channels=neck, channels=channels, unet=unet,
                            vae=vae)
    except ValueError as e:
        raise WeightsError(f"not a VPD segmentation network: {e}") from None


def convert_state_dict(state: Mapping[str, Any], config: VPDSegConfig | None = None,
                       what: str = "checkpoint", heads: Any = None) -> vc.Conversion:
    """The official VPD segmentation state dict (numpy or torch tensors) -> ``Conversion`` (``task`` =
    "segmentation", ``format`` = "official", ``config`` a ``VPDSegConfig``, ``skipped``: key -> reason).

    ``config``: the architecture to convert into (default: read off the tensors). Every tensor is used or
    knowingly skipped; anything else is one ``WeightsError`` naming the keys; the result is checked leaf by leaf
    against the model's variables.
    """
    if not is_segmentation_state(state):
        raise WeightsError(f"{what}: not a VPD segmentation checkpoint (no {UNET_PREFIX}* and "
                           f"decode_head.conv_seg.* keys); first keys: {', '.join(sorted(state)[:8])}")
    state = {k: np.asarray(v) for k, v in _tree_to_numpy(dict(state)).items()}
    config = infer_config(state, config, heads)
    skipped: dict[str, str] = {}
    used: set[str] = set()

    # Knowingly skipped tensors.
    for key in state:
        if key.startswith(SD_MODEL) and key[len(SD_MODEL):] in SD_MODEL_BUFFERS:
            skipped[key] = SD_MODEL_REASON
        for prefix, why in SKIPPED_PREFIXES.items():
            if key.startswith(prefix):
                skipped[key] = why
    used |= set(skipped)

    # Neck and decode head (mmseg names; unknown keys under neck./decode_head. fail there, by name).
    head = convert_seg_head({k: v for k, v in state.items() if k.startswith(("neck.", "decode_head."))})
    for key, why in head.skipped.items():
        skipped[key] = why
    used |= set(head.origin.values()) | set(head.skipped)

    # Text adapter, gamma, class table.
    params: dict[str, Any] = {f"head/{k}": v for k, v in flatten(head.params).items()}
    missing = []
    for name, ours in ADAPTER.items():
        for leaf in ("weight", "bias"):
            key = f"{name}.{leaf}"
            if key not in state:
                missing.append(key)
                continue
            used.add(key)
            v = np.asarray(state[key], np.float32)
            params[f"text_adapter/{ours}/{'kernel' if leaf == 'weight' else 'bias'}"] = (
                dense_kernel(v) if leaf == "weight" else v)
    for key in (GAMMA, CLASS_EMBEDDINGS):
        if key in state:
            used.add(key)
        else:
            missing.append(key)

    backbone = (UNET_PREFIX, VAE_PREFIX)
    leftover = sorted(k for k in state if k not in used and not k.startswith(backbone))
    if leftover or missing:
        parts = []
        if leftover:
            parts.append(f"{len(leftover)} tensor(s) match no part of VPD segmentation: "
                         f"{', '.join(leftover[:12])}{_more(leftover)}")
        if missing:
            parts.append(f"{len(missing)} VPD segmentation tensor(s) missing: {', '.join(missing[:12])}"
                         f"{_more(missing)}")
        raise WeightsError(f"{what}: " + "; ".join(parts))
    params["gamma"] = np.asarray(state[GAMMA], np.float32)
    table = np.asarray(state[CLASS_EMBEDDINGS], np.float32)

    unet = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX) and k not in used}
    vae = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX) and k not in used}
    if not vae:
        raise WeightsError(f"{what}: no VAE tensors ({VAE_PREFIX}*)")
    unet_params = dw.unet_params_from_torch(
        dw.ldm_unet_to_diffusers(unet, config.unet, what=f"{what} (UNet, {UNET_PREFIX}*)"), config.unet)
    vae_params = dw.vae_params_from_torch(
        dw.ldm_vae_to_diffusers(vae, config.vae, what=f"{what} (VAE, {VAE_PREFIX}*)"))
    params.update({f"unet/{k}": v for k, v in flatten(unet_params).items()})
    params.update({f"vae/{k}": v for k, v in flatten(vae_params).items()})

    variables = {"params": unflatten(params), "batch_stats": {"head": head.batch_stats},
                 "constants": {"class_embeddings": table}}
    variables = vc._as_float32(variables)
    check_tree(abstract_variables(VPDSeg(config)), variables, f"{what} (official segmentation layout)")
    return vc.Conversion(variables=variables, config=config, format=FORMAT, skipped=skipped, source=what,
                         task=TASK)


def _more(items) -> str:
    return f" (+{len(items) - 12} more)" if len(items) > 12 else ""


def convert_file(path, config: VPDSegConfig | None = None, heads: Any = None) -> vc.Conversion:
    """Read (``torch.load(weights_only=True)``) and convert the released segmentation checkpoint."""
    state, _ = vc.read_checkpoint(path)
    return convert_state_dict(state, config, what=str(path), heads=heads)


def is_segmentation_dir(path) -> bool:
    """A folder written by ``save_converted`` for a segmentation conversion."""
    if not vc.is_converted_dir(path):
        return False
    return vc.read_converted_meta(path).get("task") == TASK


def load_converted(path) -> tuple[dict[str, Any], VPDSegConfig]:
    """``(variables, VPDSegConfig)`` of a converted segmentation folder (host numpy arrays)."""
    ocp = orbax()

    p = pathlib.Path(path).expanduser()
    if not vc.is_converted_dir(p):
        raise WeightsError(f"{p}: not a converted VPD checkpoint (expected {vc.CONFIG_FILE} and {vc.VARIABLES_DIR}/)")
    meta = vc.read_converted_meta(p)
    if meta.get("task") != TASK:
        raise WeightsError(f"{p}: a converted {meta.get('task', 'depth')} checkpoint, not a segmentation one")
    try:
        cfg = VPDSegConfig.from_dict(meta["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise WeightsError(f"{p / vc.CONFIG_FILE}: not a VPD segmentation config ({e})") from None
    target = abstract_variables(VPDSeg(cfg))
    try:
        variables = ocp.StandardCheckpointer().restore(p.resolve() / vc.VARIABLES_DIR, target)
    except (ValueError, KeyError) as e:
        raise WeightsError(f"{p}: {vc.VARIABLES_DIR}/ does not fit the model of its {vc.CONFIG_FILE} ({e})") from None
    return vc._tree_map(np.asarray, variables), cfg
