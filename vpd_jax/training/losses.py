"""SiLog depth losses: the official batch-pooled form (wl-zhao/VPD depth/utils_depth/criterion.py) and mmseg's
per-image form (mmsegmentation mmseg/models/losses/silog_loss.py).

Both are written with masks rather than boolean indexing so they trace under ``jit`` with static shapes.
Invalid pixels are replaced by a neutral value *before* the log, so they contribute neither to the value
nor (as NaN) to the gradient.
"""

from __future__ import annotations

import jax.numpy as jnp

SILOG_KINDS = ("official", "mmseg")


def _safe_sqrt(x, tiny=1e-30):
    # sqrt'(0) is infinite, and 0 * inf = NaN would poison every gradient when the loss is exactly 0
    # (prediction equal to the target, or no valid pixel). The value changes only below 1e-15.
    return jnp.sqrt(jnp.where(x > tiny, x, tiny))


def silog_official(pred, target, *, lambd: float = 0.5, mask=None):
    """Official VPD ``SiLogLoss``: one value pooled over every valid pixel of the whole batch.

    ``valid = target > 0``; ``d = log(target) - log(pred)``; ``sqrt(mean(d^2) - lambd * mean(d)^2)``.
    No clamp and no max-depth mask, as in the reference. ``mask`` (optional) is and-ed with ``valid``.

    Pooling is over whatever batch this is called on: the reference pools over one GPU's 3 images and
    averages the gradients over GPUs; the train step reproduces that by calling the loss per group.
    """
    pred = jnp.asarray(pred)
    target = jnp.asarray(target, pred.dtype)
    valid = target > 0
    if mask is not None:
        valid = valid & mask
    d = jnp.where(valid, jnp.log(jnp.where(valid, target, 1)) - jnp.log(jnp.where(valid, pred, 1)), 0)
    n = jnp.maximum(jnp.sum(valid), 1).astype(d.dtype)
    mean_d = jnp.sum(d) / n
    mean_d2 = jnp.sum(d * d) / n
    return _safe_sqrt(mean_d2 - lambd * mean_d**2)


def silog_mmseg(pred, target, *, lambd: float = 0.5, eps: float = 1e-6, mask=None):
    """mmseg ``SiLogLoss(eps=1e-6)``: SiLog per image (leading axis), then the mean over the batch.

    ``d = log(clamp(target, eps)) - log(clamp(pred, eps))``; ``valid = (target > eps) & ~isnan(d)``;
    sums over valid pixels divided by ``max(n, eps)``. (mmseg hard-codes lambda 0.5; it is a parameter here.)
    """
    pred = jnp.asarray(pred)
    target = jnp.asarray(target, pred.dtype)
    b = pred.shape[0]
    pred = pred.reshape(b, -1)
    target = target.reshape(b, -1)
    valid = target > eps
    if mask is not None:
        valid = valid & mask.reshape(b, -1)
    # Neutral values where invalid keep NaN out of the gradient; NaN predictions stay excluded as in mmseg.
    t = jnp.where(valid, jnp.maximum(target, eps), 1)
    p = jnp.where(valid, jnp.maximum(pred, eps), 1)
    d = jnp.log(t) - jnp.log(p)
    valid = valid & ~jnp.isnan(d)
    d = jnp.where(valid, d, 0)
    n = jnp.maximum(jnp.sum(valid, axis=1).astype(d.dtype), eps)
    mean_d2 = jnp.sum(d * d, axis=1) / n
    mean_d = jnp.sum(d, axis=1) / n
    return jnp.mean(_safe_sqrt(mean_d2 - lambd * mean_d**2))


def silog_loss(pred, target, kind: str = "official", **kwargs):
    """SiLog by name: ``"official"`` (batch-pooled) or ``"mmseg"`` (per image, then mean).

    ``pred`` and ``target`` are depths in metres with a leading batch axis, e.g. (B, H, W).
    """
    if kind == "official":
        return silog_official(pred, target, **kwargs)
    if kind == "mmseg":
        return silog_mmseg(pred, target, **kwargs)
    raise ValueError(f"unknown SiLog kind {kind!r}; expected one of {SILOG_KINDS}")
