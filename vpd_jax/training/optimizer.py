"""AdamW with parameter groups chosen by rules on the parameter path (wl-zhao/VPD depth/models_depth/optimizer.py,
depth/train.py; mmsegmentation configs/vpd/vpd_sd_4xb8-25k_nyu-480x480.py).

A parameter's path is its keys joined by ``/``, e.g. ``unet/down_blocks_0/resnets_0/conv1/kernel``.
Rules decide, per leaf:

* frozen (regexes, default the VAE): no update and no optimizer state (``optax.set_to_zero``);
* learning-rate multiplier (first matching regex wins, default 1.0): UNet x0.01 in both references;
* weight-decay exemption, by name:
  - ``"official"``: every 1-D parameter and every ``bias`` (VPD ``LDMOptimizerConstructor``);
  - ``"mmseg"``: only leaves named ``bias`` (``bias_decay_mult=0``); norm scales and gamma are decayed;
  - ``"none"``: everything decayed.

Each group is ``scale_by_adam -> add_decayed_weights -> scale_by_learning_rate(mult * schedule)``, which is
PyTorch's decoupled AdamW: ``p <- p - lr * (adam(g) + wd * p)`` with ``lr`` the group's rate.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import jax
import optax

NO_DECAY_RULES = ("official", "mmseg", "mmcv_norm", "none")
# "mmcv_norm": VPD segmentation's ``paramwise_cfg=dict(custom_keys={'unet': dict(lr_mult=0.1), ..., 'norm':
# dict(decay_mult=0.)})`` (wl-zhao/VPD segmentation/configs/fpn_vpd_sd1-5_512x512_gpu8x2.py). mmcv's
# DefaultOptimizerConstructor tries the keys longest first (alphabetical among equals: 'norm' before 'unet') and
# stops at the first that is a substring of the CompVis parameter name. The names holding "norm" are the UNet
# transformers' GroupNorm (``...1.norm``) and LayerNorms (``transformer_blocks.0.norm1..3``): those get no decay
# and the full rate (their 'unet' lr_mult is never reached). The ResBlocks' GroupNorms (``in_layers.0``,
# ``out_layers.0``) and the head's BatchNorms (``bn``) hold no "norm": decayed like every other weight and bias.
_MMCV_NORM = re.compile(r"^unet/.*attentions_\d+/(norm|transformer_blocks_\d+/norm[123])/(scale|bias)$")
FROZEN = "frozen"


@dataclasses.dataclass(frozen=True)
class ParamRules:
    """How parameter paths map to optimizer groups. Regexes are matched with ``re.search``."""

    lr_multipliers: tuple[tuple[str, float], ...] = ((r"^unet(/|$)", 0.01),)
    frozen: tuple[str, ...] = (r"^vae(/|$)",)
    no_decay: str = "official"

    def __post_init__(self):
        if self.no_decay not in NO_DECAY_RULES:
            raise ValueError(f"no_decay must be one of {NO_DECAY_RULES}, got {self.no_decay!r}")


def path_to_str(path: Sequence) -> str:
    """``('unet', 'conv_in', 'kernel')``-style jax key path -> ``'unet/conv_in/kernel'``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _label(mult: float, decay: bool) -> str:
    return f"lr_x{mult:g}/{'decay' if decay else 'no_decay'}"


def _leaf_label(path: str, leaf, rules: ParamRules) -> str:
    if any(re.search(rx, path) for rx in rules.frozen):
        return FROZEN
    name = path.rsplit("/", 1)[-1]
    if rules.no_decay == "mmcv_norm" and _MMCV_NORM.search(path):
        return _label(1.0, False)
    mult = next((m for rx, m in rules.lr_multipliers if re.search(rx, path)), 1.0)
    if rules.no_decay == "official":
        decay = not (len(leaf.shape) == 1 or name == "bias")
    elif rules.no_decay == "mmseg":
        decay = name != "bias"
    else:
        decay = True
    return _label(mult, decay)


def param_labels(params, rules: ParamRules = ParamRules()):
    """The group label of every leaf (works on arrays and on ``jax.ShapeDtypeStruct`` trees)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: _leaf_label(path_to_str(p), x, rules), params)


def describe_groups(params, rules: ParamRules = ParamRules()) -> dict[str, list[str]]:
    """``{label: [paths]}`` for logging which parameter went where."""
    out: dict[str, list[str]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        s = path_to_str(path)
        out.setdefault(_leaf_label(s, leaf, rules), []).append(s)
    return out


def adamw(
    schedule: optax.Schedule | float,
    *,
    weight_decay: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    rules: ParamRules = ParamRules(),
) -> optax.GradientTransformation:
    """AdamW over parameter groups. ``schedule`` gives the base rate by update count (see schedules.py)."""
    base = schedule if callable(schedule) else optax.constant_schedule(schedule)
    mults = {1.0, *(m for _, m in rules.lr_multipliers)}

    def group(mult: float, decay: bool) -> optax.GradientTransformation:
        # Bind mult now; a late-binding closure would give every group the last multiplier.
        def lr(count, mult=mult):
            return mult * base(count)

        parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
        if decay and weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay))
        parts.append(optax.scale_by_learning_rate(lr))
        return optax.chain(*parts)

    transforms: dict[str, optax.GradientTransformation] = {FROZEN: optax.set_to_zero()}
    for m in mults:
        for decay in (True, False):
            transforms[_label(m, decay)] = group(m, decay)
    return optax.multi_transform(transforms, lambda params: param_labels(params, rules))


def trainable_mask(params, rules: ParamRules = ParamRules()):
    """True for leaves that the optimizer updates (for gradient norms that ignore frozen parts)."""
    return jax.tree.map(lambda label: label != FROZEN, param_labels(params, rules))


def learning_rates(schedule: Callable, step, rules: ParamRules = ParamRules()) -> dict[str, jax.Array]:
    """Base and per-multiplier learning rates at ``step`` (for logging)."""
    base = schedule(step)
    out = {"lr": base}
    for rx, m in rules.lr_multipliers:
        out[f"lr_x{m:g}"] = m * base
    return out
