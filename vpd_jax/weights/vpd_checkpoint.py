"""The released VPD depth checkpoints (official and mmsegmentation) as variables of our ``VPDDepth``.

Two PyTorch layouts are read (the modules of wl-zhao/VPD depth/models_depth/model.py and of mmsegmentation
mmseg/models/backbones/vpd.py + mmseg/models/decode_heads/vpd_depth_head.py):

* **official** (wl-zhao/VPD ``depth/``): ``{'model': state_dict}`` with ``encoder.{layer1,layer2,out_layer}``,
  ``encoder.{encoder_vq,unet,text_adapter,gamma,class_embeddings}``, ``decoder.*``, ``last_layer_depth.*``;
  CompVis names inside the VAE and the UNet; a 27-row class-embedding table. No VAE decoder, no UNet ``out``.
* **mmseg** (mmsegmentation 1.x ``VPD`` + ``VPDDepthHead``): ``{'state_dict': ...}`` with ``backbone.*`` and
  ``decode_head.{conv1,conv2,conv_aggregation,decoder,depth_pred_layer}``; a 28-row table (the 27 rows and
  their mean). Its VAE decoder, ``post_quant_conv`` and UNet ``out`` are present and knowingly skipped.

mmseg names are first renamed to the official ones (``MMSEG_RENAMES``: mmseg/models/backbones/vpd.py and
mmseg/models/decode_heads/vpd_depth_head.py against wl-zhao/VPD depth/models_depth/model.py), then one table
maps every official tensor to our tree: ``params`` (``unet``, ``vae``, ``head``, ``text_adapter``, ``gamma``),
``batch_stats`` (the BN running statistics) and ``constants/class_embeddings`` (always 28 rows: a 27-row table
gets its mean appended, which is what mmseg does; row 27 is the "unknown scene" row). The UNet and the VAE go
through the CompVis -> diffusers renames and the diffusers -> Flax layouts of ``vpd_jax.weights.diffusers``.
Every source tensor is either used or on the list of knowingly skipped ones; anything else fails the
conversion, naming the keys.

A converted checkpoint is a folder: ``config.json`` (the ``VPDConfig`` and where the weights came from) and
``variables/`` (an orbax PyTree checkpoint of ``{params, batch_stats, constants}``).
``vpd_jax.weights.loader.load_model``
reads that folder, or converts a PyTorch file on the fly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from vpd_jax.models.vpd import VPDConfig, VPDDepth, abstract_variables, with_unknown_row
from vpd_jax.weights import diffusers as dw
from vpd_jax.weights.common import (
    WeightsError,
    check_tree,
    conv_kernel,
    dense_kernel,
    flatten,
    orbax,
    read_tensors,
    unflatten,
)

FORMATS = ("official", "mmseg")

# ------------------------------------------------------------------------------------ single layers

# The tensors each kind of PyTorch layer holds; ``num_batches_tracked`` only matters for momentum=None BN.
LAYER_LEAVES: dict[str, tuple[str, ...]] = {
    "conv": ("weight", "bias"),
    "deconv": ("weight",),
    "norm": ("weight", "bias"),
    "bn": ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"),
    "dense": ("weight", "bias"),
}
SKIPPED_LEAVES = {"num_batches_tracked"}


def convert_layer(kind: str, tensors: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """One PyTorch layer's tensors (``{'weight': ..., 'bias': ...}``) -> (Flax params, Flax batch_stats).

    ``conv``: Conv2d -> ``kernel`` HWIO, ``bias``. ``deconv``: ConvTranspose2d (in, out, kh, kw) -> ``kernel``
    (kh, kw, in, out) of ``head.ConvTranspose2x2``. ``norm``: GroupNorm -> ``scale``, ``bias``. ``bn``:
    BatchNorm2d -> params ``scale``, ``bias`` and batch_stats ``mean``, ``var``. ``dense``: Linear.
    """
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    if kind == "conv":
        return {"kernel": f32(conv_kernel(tensors["weight"])), "bias": f32(tensors["bias"])}, {}
    if kind == "deconv":
        w = np.asarray(tensors["weight"])
        if w.ndim != 4 or w.shape[2:] != (2, 2):
            raise WeightsError(f"ConvTranspose2d weight of shape {w.shape}: only 2x2 kernels are supported")
        return {"kernel": f32(np.ascontiguousarray(np.transpose(w, (2, 3, 0, 1))))}, {}
    if kind == "norm":
        return {"scale": f32(tensors["weight"]), "bias": f32(tensors["bias"])}, {}
    if kind == "bn":
        return ({"scale": f32(tensors["weight"]), "bias": f32(tensors["bias"])},
                {"mean": f32(tensors["running_mean"]), "var": f32(tensors["running_var"])})
    if kind == "dense":
        return {"kernel": f32(dense_kernel(tensors["weight"])), "bias": f32(tensors["bias"])}, {}
    raise ValueError(f"unknown layer kind {kind!r}; expected one of {sorted(LAYER_LEAVES)}")


# --------------------------------------------------------------------------------- the head table

def head_layout(num_deconv: int = 3) -> list[tuple[str, str, str]]:
    """``(official module name, layer kind, our path)`` for every head layer (neck, decoder, depth head, adapter)."""
    rows = [
        ("encoder.layer1.0", "conv", "head/neck/layer1_conv_0"),
        ("encoder.layer1.1", "norm", "head/neck/layer1_norm"),
        ("encoder.layer1.3", "conv", "head/neck/layer1_conv_1"),
        ("encoder.layer2.0", "conv", "head/neck/layer2_conv"),
        ("encoder.out_layer.0", "conv", "head/neck/out_conv"),
        ("encoder.out_layer.1", "norm", "head/neck/out_norm"),
    ]
    for i in range(num_deconv):
        rows.append((f"decoder.deconv_layers.{3 * i}", "deconv", f"head/decoder/deconv_{i}"))
        rows.append((f"decoder.deconv_layers.{3 * i + 1}", "bn", f"head/decoder/deconv_bn_{i}"))
    rows += [
        ("decoder.conv_layers.0", "conv", "head/decoder/conv"),
        ("decoder.conv_layers.1", "bn", "head/decoder/conv_bn"),
        ("last_layer_depth.0", "conv", "head/depth/conv_0"),
        ("last_layer_depth.2", "conv", "head/depth/conv_1"),
        ("encoder.text_adapter.fc.0", "dense", "text_adapter/fc1"),
        ("encoder.text_adapter.fc.2", "dense", "text_adapter/fc2"),
    ]
    return rows


# mmseg -> official module-name prefixes (mmseg/models/backbones/vpd.py and
# mmseg/models/decode_heads/vpd_depth_head.py against wl-zhao/VPD depth/models_depth/model.py); the first match
# wins, so longer prefixes come first.
MMSEG_RENAMES: tuple[tuple[str, str], ...] = (
    ("decode_head.conv1.", "encoder.layer1."),
    ("decode_head.conv2.", "encoder.layer2.0."),
    ("decode_head.conv_aggregation.", "encoder.out_layer."),
    ("decode_head.decoder.", "decoder."),
    ("decode_head.depth_pred_layer.", "last_layer_depth."),
    ("backbone.", "encoder."),
)
UNET_PREFIX = "encoder.unet.unet.diffusion_model."
VAE_PREFIX = "encoder.encoder_vq."
# Official-name prefixes of tensors that exist in a checkpoint but are not part of VPD's depth network.
SKIPPED_PREFIXES: dict[str, str] = {
    UNET_PREFIX + "out.": "the UNet's output head (VPD taps decoder features, never the noise prediction)",
    VAE_PREFIX + "decoder.": "the VAE decoder (VPD only encodes)",
    VAE_PREFIX + "post_quant_conv.": "the VAE's post-quantisation conv (decoder side)",
    VAE_PREFIX + "loss.": "the VAE's training loss",
}
CLASS_EMBEDDINGS = "encoder.class_embeddings"
GAMMA = "encoder.gamma"


# ----------------------------------------------------------------------------------- reading a file

def unwrap_state_dict(obj: Any, what: str = "checkpoint") -> tuple[dict[str, Any], str | None]:
    """The flat state dict inside a loaded checkpoint and the format its wrapper suggests.

    ``{'model': sd}`` is the official wrapper, ``{'state_dict': sd, 'meta': ...}`` mmengine's; a bare state dict
    is accepted too. One leading ``module.`` (DDP) is removed, as the official ``test.py`` does.
    """
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{what}: expected a dict, found {type(obj).__name__}")
    hint = None
    if isinstance(obj.get("model"), Mapping):
        obj, hint = obj["model"], "official"
    elif isinstance(obj.get("state_dict"), Mapping):
        obj, hint = obj["state_dict"], "mmseg"
    state = {k: v for k, v in obj.items() if not isinstance(v, Mapping)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if not state:
        raise WeightsError(f"{what}: holds no tensors")
    return state, hint


def detect_format(state: Mapping[str, Any]) -> str | None:
    """``"official"``, ``"mmseg"`` or None, from the top-level key names."""
    if any(k.startswith("decode_head.") for k in state) and any(k.startswith("backbone.") for k in state):
        return "mmseg"
    if any(k.startswith("last_layer_depth.") for k in state) and any(k.startswith("encoder.") for k in state):
        return "official"
    return None


def to_official_names(state: Mapping[str, Any], fmt: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors under official names, official name -> name in the file). mmseg renames by ``MMSEG_RENAMES``
    (mmseg/models/backbones/vpd.py, mmseg/models/decode_heads/vpd_depth_head.py -> wl-zhao/VPD
    depth/models_depth/model.py)."""
    if fmt == "official":
        return dict(state), {k: k for k in state}
    if fmt != "mmseg":
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    out, origin = {}, {}
    for key, value in state.items():
        new = key
        for src, dst in MMSEG_RENAMES:
            if key.startswith(src):
                new = dst + key[len(src):]
                break
        out[new], origin[new] = value, key
    return out, origin


# ----------------------------------------------------------------------------------- the conversion

@dataclasses.dataclass
class Conversion:
    """The result of converting a PyTorch VPD checkpoint.

    ``variables``: ``{params, batch_stats, constants}`` as host numpy arrays (fp32). ``skipped``: file key ->
    why it was not used. ``format``: the layout it was read as. ``task``: "depth" (``VPDConfig``) or
    "segmentation" (``VPDSegConfig``, ``vpd_jax.weights.vpd_seg_checkpoint``).
    """

    variables: dict[str, Any]
    config: Any  # VPDConfig or VPDSegConfig
    format: str
    skipped: dict[str, str]
    source: str = ""
    task: str = "depth"


def infer_config(state: Mapping[str, Any], fmt: str, base: Any = None, heads: Any = None) -> Any:
    """A ``VPDConfig`` for an official-named state dict: head sizes and the backbone read off the tensors.

    With ``base`` given, only checked against the tensors later (its UNet head counts, max_depth, dtypes, ...
    are kept; the class count is the file's table's); otherwise the SD UNet/VAE architecture is inferred as
    ``vpd_jax.weights.diffusers`` does for CompVis files (8 heads for a 768-wide context, i.e. SD 1.x).
    """
    if base is not None:
        if CLASS_EMBEDDINGS in state:  # the file's own table decides its class count
            rows = int(np.shape(state[CLASS_EMBEDDINGS])[0])
            return base.replace(num_classes=rows if fmt == "official" else rows - 1)
        return base
    try:
        filters, i = [], 0
        while f"decoder.deconv_layers.{3 * i}.weight" in state:
            filters.append(int(np.shape(state[f"decoder.deconv_layers.{3 * i}.weight"])[1]))
            i += 1
        rows = int(np.shape(state[CLASS_EMBEDDINGS])[0])
        kw = dict(
            text_dim=int(np.shape(state[GAMMA])[0]),
            num_classes=rows if fmt == "official" else rows - 1,
            neck_features=int(np.shape(state["encoder.out_layer.0.weight"])[0]),
            deconv_filters=tuple(filters),
            decoder_features=int(np.shape(state["decoder.conv_layers.0.weight"])[0]),
            head_init=fmt,
        )
    except KeyError as e:
        raise WeightsError(f"not a VPD depth checkpoint: {e.args[0]} is missing") from None
    unet = dw.infer_ldm_unet_config(
        {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}, "VPD checkpoint UNet",
        heads)
    vae = dw.infer_ldm_vae_config(
        {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}, "VPD checkpoint VAE")
    return VPDConfig(unet=unet, vae=vae, **kw)


def convert_state_dict(state: Mapping[str, Any], config: Any = None, fmt: str = "auto",
                       what: str = "checkpoint", heads: Any = None) -> Conversion:
    """A VPD state dict (official or mmseg names, numpy tensors) -> our variables and config.

    ``config``: the ``VPDConfig`` to convert into (default: inferred from the tensors, SD-1.5 heads). Every
    tensor must be used or be one of the knowingly skipped ones (VAE decoder, ``post_quant_conv``, UNet ``out``,
    BN ``num_batches_tracked``); otherwise one ``WeightsError`` names the first unmatched keys. The result is
    checked leaf by leaf against the model's variable shapes.
    """
    detected = detect_format(state)
    if fmt == "auto":
        if detected is None and any(k.startswith("unet.unet.diffusion_model.") for k in state):
            raise WeightsError(f"{what}: a VPD segmentation checkpoint, not a depth one (convert it with "
                               "python -m vpd_jax.tools.convert; vpd_jax.weights.loader.load_seg_model)")
        if detected is None:
            raise WeightsError(f"{what}: neither an official VPD nor an mmseg VPD depth checkpoint "
                               f"(no encoder.*/last_layer_depth.* nor backbone.*/decode_head.* keys); first keys: "
                               f"{', '.join(sorted(state)[:8])}")
        fmt = detected
    elif fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS + ('auto',)}")
    elif detected is not None and detected != fmt:
        raise WeightsError(f"{what}: asked to read it as {fmt}, but its keys are those of an {detected} checkpoint")
    named, origin = to_official_names(state, fmt)
    config = infer_config(named, fmt, config, heads)

    used: set[str] = set()
    skipped: dict[str, str] = {}
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    # Head layers, one PyTorch module at a time.
    missing = []
    for name, kind, path in head_layout(len(config.deconv_filters)):
        leaves = {}
        for leaf in LAYER_LEAVES[kind]:
            key = f"{name}.{leaf}"
            if key in named:
                used.add(key)
                if leaf in SKIPPED_LEAVES:
                    skipped[origin[key]] = "BatchNorm step counter (only used when momentum is None)"
                else:
                    leaves[leaf] = named[key]
            elif leaf not in SKIPPED_LEAVES:
                missing.append(key)
        if len(leaves) == len([x for x in LAYER_LEAVES[kind] if x not in SKIPPED_LEAVES]):
            p, s = convert_layer(kind, leaves)
            params.update({f"{path}/{k}": v for k, v in p.items()})
            stats.update({f"{path}/{k}": v for k, v in s.items()})
    for key in (GAMMA, CLASS_EMBEDDINGS):
        if key in named:
            used.add(key)
        else:
            missing.append(key)
    # Knowingly skipped parts of the backbone.
    for key in named:
        for prefix, why in SKIPPED_PREFIXES.items():
            if key.startswith(prefix):
                used.add(key)
                skipped[origin[key]] = why
                break

    leftover = sorted(k for k in named if k not in used and not k.startswith((UNET_PREFIX, VAE_PREFIX)))
    if leftover or missing:
        parts = []
        if leftover:
            parts.append(f"{len(leftover)} tensor(s) match no part of VPD: "
                         f"{', '.join(origin[k] for k in leftover[:12])}{_more(leftover)}")
        if missing:
            shown = _display(missing, origin, fmt)
            parts.append(f"{len(missing)} VPD tensor(s) missing: {', '.join(shown[:12])}{_more(missing)}")
        raise WeightsError(f"{what} (read as {fmt}): " + "; ".join(parts))
    params["gamma"] = np.asarray(named[GAMMA], np.float32)
    try:
        table = with_unknown_row(named[CLASS_EMBEDDINGS], config.num_classes)
    except ValueError as e:
        raise WeightsError(f"{what}: {origin[CLASS_EMBEDDINGS]}: {e}") from None

    # The SD backbone through the CompVis -> diffusers -> Flax maps (which fail on any unmatched key).
    unet = {k[len(UNET_PREFIX):]: v for k, v in named.items() if k.startswith(UNET_PREFIX) and k not in used}
    vae = {k[len(VAE_PREFIX):]: v for k, v in named.items() if k.startswith(VAE_PREFIX) and k not in used}
    if not unet:
        raise WeightsError(f"{what}: no UNet tensors ({_display([UNET_PREFIX + '*'], {}, fmt)[0]})")
    if not vae:
        raise WeightsError(f"{what}: no VAE tensors ({_display([VAE_PREFIX + '*'], {}, fmt)[0]})")
    unet_params = dw.unet_params_from_torch(
        dw.ldm_unet_to_diffusers(unet, config.unet, what=f"{what} (UNet, {_prefix(UNET_PREFIX, fmt)}*)"),
        config.unet)
    vae_params = dw.vae_params_from_torch(
        dw.ldm_vae_to_diffusers(vae, config.vae, what=f"{what} (VAE, {_prefix(VAE_PREFIX, fmt)}*)"))
    params.update({f"unet/{k}": v for k, v in flatten(unet_params).items()})
    params.update({f"vae/{k}": v for k, v in flatten(vae_params).items()})

    variables = {"params": unflatten(params), "batch_stats": unflatten(stats),
                 "constants": {"class_embeddings": table}}
    variables = _as_float32(variables)
    check_tree(abstract_variables(VPDDepth(config)), variables, f"{what} ({fmt} layout)")
    return Conversion(variables=variables, config=config, format=fmt, skipped=skipped, source=what)


def _more(items) -> str:
    return f" (+{len(items) - 12} more)" if len(items) > 12 else ""


def _prefix(official_prefix: str, fmt: str) -> str:
    if fmt == "mmseg" and official_prefix.startswith("encoder."):
        return "backbone." + official_prefix[len("encoder."):]
    return official_prefix


def _display(keys, origin: Mapping[str, str], fmt: str) -> list[str]:
    """Names as the file has (or would have) them."""
    out = []
    for k in keys:
        if k in origin:
            out.append(origin[k])
            continue
        name = k
        if fmt == "mmseg":
            for src, dst in MMSEG_RENAMES:
                if k.startswith(dst):
                    name = src + k[len(dst):]
                    break
        out.append(name)
    return out


def _as_float32(tree):
    if isinstance(tree, Mapping):
        return {k: _as_float32(v) for k, v in tree.items()}
    a = np.asarray(tree)
    return a.astype(np.float32) if a.dtype != np.float32 else a


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], str | None]:
    """A PyTorch VPD checkpoint file (read with ``weights_only=True``) -> (flat state dict, format hint)."""
    return unwrap_state_dict(read_tensors(path), str(path))


def convert_file(path: str | os.PathLike, config: Any = None, fmt: str = "auto", heads: Any = None) -> Conversion:
    """Read and convert a released checkpoint (``.pth``/``.ckpt``/``.safetensors``)."""
    state, _ = read_checkpoint(path)
    return convert_state_dict(state, config, fmt, what=str(path), heads=heads)


# ----------------------------------------------------------------------------------- saving / loading

CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"


def save_converted(conv: Conversion, out_dir: str | os.PathLike, crop: int | None = None) -> pathlib.Path:
    """Write ``out_dir/config.json`` and ``out_dir/variables`` (orbax), atomically: everything goes into a
    temporary sibling folder that is renamed to ``out_dir`` when complete, so an interrupted conversion never
    leaves a folder that looks finished (its leftovers are removed by the next attempt). Refuses to overwrite a
    checkpoint or a non-empty folder.

    ``crop``: the square crop the model was trained at (480 or 512), recorded for inference's windows."""
    import shutil

    ocp = orbax()

    out = pathlib.Path(out_dir).expanduser().resolve()
    if (out / VARIABLES_DIR).exists():
        raise WeightsError(f"{out}: already holds a converted checkpoint ({VARIABLES_DIR}/); choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WeightsError(f"{out}: exists and is not an empty folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # an earlier conversion that was interrupted
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    meta = {
        "config": conv.config.to_dict(),
        "source": {"file": conv.source, "format": conv.format,
                   # the filename-to-class rule that the source repo trained with (wl-zhao/VPD
                   # depth/dataset/nyudepthv2.py or mmsegmentation mmseg/datasets/nyu.py)
                   "class_rule": conv.format,
                   "skipped": summarise_skipped(conv.skipped)},
    }
    if conv.task != "depth":  # a depth folder's config.json stays as it was (no "task": depth is implied)
        meta["task"] = conv.task
        del meta["source"]["class_rule"]
    if crop:
        meta["crop"] = int(crop)
    try:
        tmp.mkdir()
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / VARIABLES_DIR, conv.variables)
        ckptr.wait_until_finished()
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def summarise_skipped(skipped: Mapping[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for why in skipped.values():
        counts[why] = counts.get(why, 0) + 1
    return counts


def is_converted_dir(path: str | os.PathLike) -> bool:
    p = pathlib.Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file() and (p / VARIABLES_DIR).exists()


def read_converted_meta(path: str | os.PathLike) -> dict[str, Any]:
    try:
        return json.loads((pathlib.Path(path) / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: unreadable {CONFIG_FILE} ({e})") from None


def load_converted(path: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """``(variables, VPDConfig)`` of a folder written by ``save_converted`` (host numpy arrays).

    The model's own shapes are the restore target, so a checkpoint of another architecture fails by leaf.
    """
    ocp = orbax()

    p = pathlib.Path(path).expanduser()
    if not is_converted_dir(p):
        raise WeightsError(f"{p}: not a converted VPD checkpoint (expected {CONFIG_FILE} and {VARIABLES_DIR}/)")
    meta = read_converted_meta(p)
    if meta.get("task", "depth") != "depth":
        raise WeightsError(f"{p}: a converted {meta['task']} checkpoint, not a depth one "
                           "(vpd_jax.weights.loader.load_seg_model reads it)")
    try:
        cfg = VPDConfig.from_dict(meta["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise WeightsError(f"{p / CONFIG_FILE}: not a VPD model config ({e})") from None
    target = abstract_variables(VPDDepth(cfg))
    try:
        variables = ocp.StandardCheckpointer().restore(p.resolve() / VARIABLES_DIR, target)
    except (ValueError, KeyError) as e:
        raise WeightsError(f"{p}: {VARIABLES_DIR}/ does not fit the model of its {CONFIG_FILE} ({e})") from None
    return _tree_map(np.asarray, variables), cfg


def check_shapes(abstract: Mapping[str, Any], variables: Mapping[str, Any], what: str) -> None:
    """One ``WeightsError`` naming every leaf of ``variables`` missing, unexpected or mis-shaped for ``abstract``."""
    check_tree(abstract, variables, what)


def _tree_map(fn: Callable, tree):
    if isinstance(tree, Mapping):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    return fn(tree)
