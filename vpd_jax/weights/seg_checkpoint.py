"""mmsegmentation's ``FPN`` neck and ``FPNHead`` decode head (a VPD segmentation checkpoint) as variables of
``vpd_jax.models.seg_head.SemanticFPN``.

The PyTorch keys (mmseg/models/necks/fpn.py, mmseg/models/decode_heads/fpn_head.py, mmcv ``ConvModule``) and
their places in our tree (``params`` / ``batch_stats``):

* ``neck.lateral_convs.{i}.conv.{weight,bias}`` -> ``neck/lateral_convs_{i}/{kernel,bias}``
* ``neck.fpn_convs.{i}.conv.{weight,bias}`` -> ``neck/fpn_convs_{i}/{kernel,bias}``
* ``decode_head.scale_heads.{i}.{j}.conv.weight`` -> ``decode_head/scale_heads_{i}_{j}/conv/kernel`` (no bias)
* ``decode_head.scale_heads.{i}.{j}.bn.{weight,bias}`` -> ``.../bn/{scale,bias}``;
  ``bn.{running_mean,running_var}`` -> batch_stats ``.../bn/{mean,var}``; ``bn.num_batches_tracked`` skipped
  (it only matters for BatchNorm with ``momentum=None``)
* ``decode_head.conv_seg.{weight,bias}`` -> ``decode_head/conv_seg/{kernel,bias}``

Conv weights go OIHW -> HWIO. Keys outside ``neck.`` and ``decode_head.`` (the backbone's) are returned as
``unused`` for the backbone's converter; an unknown key under those prefixes, or a missing one, is an error.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from vpd_jax.weights.common import WeightsError, _tree_to_numpy, conv_kernel, flatten, unflatten

NECK, HEAD = "neck.", "decode_head."
SKIPPED_LEAVES = {"num_batches_tracked": "BatchNorm step counter (unused with momentum 0.1)"}

_PATTERNS = [
    (re.compile(r"neck\.(lateral|fpn)_convs\.(\d+)\.conv\.(weight|bias)$"), "neck_conv"),
    (re.compile(r"decode_head\.scale_heads\.(\d+)\.(\d+)\.conv\.weight$"), "head_conv"),
    (re.compile(r"decode_head\.scale_heads\.(\d+)\.(\d+)\.bn\.(weight|bias|running_mean|running_var)$"), "head_bn"),
    (re.compile(r"decode_head\.conv_seg\.(weight|bias)$"), "conv_seg"),
]
_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"), "running_mean": ("batch_stats", "mean"),
       "running_var": ("batch_stats", "var")}


@dataclasses.dataclass
class SegHeadConversion:
    """``params`` / ``batch_stats`` trees (``{'neck': ..., 'decode_head': ...}``), the source key of every leaf
    (``origin``: our path -> PyTorch key), the knowingly skipped keys with the reason, and the keys left to
    others (``unused``: not under ``neck.`` / ``decode_head.``)."""

    params: dict[str, Any]
    batch_stats: dict[str, Any]
    origin: dict[str, str]
    skipped: dict[str, str]
    unused: list[str]

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def _place(key: str, value: np.ndarray) -> tuple[str, str, np.ndarray] | None:
    """(collection, our path, array) for one mmseg key, or None if the key is not a known neck/head tensor."""
    for pattern, kind in _PATTERNS:
        m = pattern.match(key)
        if m is None:
            continue
        if kind == "neck_conv":
            which, i, leaf = m.groups()
            arr = conv_kernel(value) if leaf == "weight" else value
            return "params", f"neck/{which}_convs_{i}/{'kernel' if leaf == 'weight' else 'bias'}", arr
        if kind == "head_conv":
            i, j = m.groups()
            return "params", f"decode_head/scale_heads_{i}_{j}/conv/kernel", conv_kernel(value)
        if kind == "head_bn":
            i, j, leaf = m.groups()
            coll, name = _BN[leaf]
            return coll, f"decode_head/scale_heads_{i}_{j}/bn/{name}", value
        leaf = m.group(1)
        arr = conv_kernel(value) if leaf == "weight" else value
        return "params", f"decode_head/conv_seg/{'kernel' if leaf == 'weight' else 'bias'}", arr
    return None


def convert_seg_head(state: Mapping[str, Any], expected: Mapping[str, Any] | None = None) -> SegHeadConversion:
    """A PyTorch state dict holding ``neck.*`` (mmseg ``FPN``) and ``decode_head.*`` (``FPNHead``) tensors ->
    ``SegHeadConversion``. Values may be torch tensors or arrays; they are read as float32.

    ``expected``: optionally the variables (or their ``jax.eval_shape``) of a ``SemanticFPN``; every leaf of its
    ``params`` and ``batch_stats`` must then be converted, with the same shape.
    """
    state = _tree_to_numpy(dict(state))
    flat: dict[str, dict[str, np.ndarray]] = {"params": {}, "batch_stats": {}}
    origin: dict[str, str] = {}
    skipped: dict[str, str] = {}
    unused: list[str] = []
    unknown: list[str] = []
    for key in sorted(state):
        if not key.startswith((NECK, HEAD)):
            unused.append(key)
            continue
        leaf = key.rsplit(".", 1)[-1]
        if leaf in SKIPPED_LEAVES:
            skipped[key] = SKIPPED_LEAVES[leaf]
            continue
        placed = _place(key, np.asarray(state[key]))
        if placed is None:
            unknown.append(key)
            continue
        coll, path, arr = placed
        flat[coll][path] = np.ascontiguousarray(np.asarray(arr, np.float32))
        origin[f"{coll}/{path}"] = key
    if unknown:
        raise WeightsError(f"{len(unknown)} neck/decode_head tensors have no place in SemanticFPN: "
                           f"{', '.join(unknown[:12])}{' ...' if len(unknown) > 12 else ''}")
    if expected is not None:
        _check_against(expected, flat)
    return SegHeadConversion(unflatten(flat["params"]), unflatten(flat["batch_stats"]), origin, skipped, unused)


def _check_against(expected: Mapping[str, Any], flat: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    problems = []
    for coll in ("params", "batch_stats"):
        want = flatten(dict(expected.get(coll, {})))
        got = flat[coll]
        problems += [f"missing {coll}/{k}" for k in sorted(set(want) - set(got))]
        problems += [f"unexpected {coll}/{k}" for k in sorted(set(got) - set(want))]
        problems += [f"{coll}/{k}: shape {tuple(got[k].shape)}, expected {tuple(want[k].shape)}"
                     for k in sorted(set(want) & set(got)) if tuple(got[k].shape) != tuple(want[k].shape)]
    if problems:
        raise WeightsError(f"the checkpoint does not fit the SemanticFPN: {'; '.join(problems[:12])}"
                           f"{' ...' if len(problems) > 12 else ''}")
