"""Learning-rate schedules of the two references (wl-zhao/VPD depth/train.py; mmsegmentation
configs/_base_/schedules/schedule_25k.py) as optax schedules.

Indexing convention. An optax schedule is called with ``count``, the number of updates already applied:
the first update sees ``count = 0``. Each function below returns the learning rate the reference uses for
its update number ``count + 1``:

* official VPD (``depth/train.py``) increments ``global_step`` *before* computing the rate, so its first
  update uses ``global_step = 1``; here ``global_step = count + 1``.
* mmseg/mmengine schedulers run ``scheduler.step()`` once at construction and once *after* every
  iteration, so iteration ``i`` (0-based, the first is 0) uses the value for ``i``; here ``i = count``.
  mmengine's ``LinearLR`` / ``PolyLR`` use ``total_iters = end - begin - 1`` (11,999, not 12,000): the
  warm-up reaches the base rate at iteration 11,999 and the poly phase reaches the floor at 23,999.

The returned values are the *base* rate; parameter groups multiply them (see ``optimizer.py``), which is
what both references do (``lr * lr_scale``, mmengine's per-group ``initial_lr``).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

SCHEDULE_KINDS = ("official", "mmseg", "mmcv_poly", "constant")


def official_schedule(
    max_lr: float = 5e-4,
    min_lr: float = 3e-5,
    iters_per_epoch: int = 1009,
    epochs: int = 25,
    power: float = 0.9,
) -> optax.Schedule:
    """Official two-phase poly schedule: concave warm-up for ``epochs // 2`` epochs, then decay.

    With ``s = global_step / (iters_per_epoch * (epochs // 2))``:
    ``s < 1``: ``(max - min) * s**power + min``; else ``max(min, max - (max - min) * (s - 1)**power)``.
    Defaults give the peak at step 12,108 and the floor from step 24,216 on.
    """
    half = iters_per_epoch * (epochs // 2)

    def schedule(count):
        global_step = jnp.asarray(count, jnp.float32) + 1.0
        # Differences of exact integers before dividing: XLA turns x / c into x * (1 / c), and at the
        # corners (s = 1, s = 2) that rounding would leave the [0, 1] range of the power's base.
        warm = (max_lr - min_lr) * jnp.clip(global_step / half, 0.0, 1.0) ** power + min_lr
        past = jnp.clip((global_step - half) / half, 0.0, 1.0)
        # min + (max - min) * (1 - past**p) equals max(min, max - (max - min) * past**p) for past <= 1 and
        # avoids the float32 cancellation of max - (max - min) at the floor.
        decay = min_lr + (max_lr - min_lr) * (1.0 - past**power)
        return jnp.where(global_step < half, warm, decay)

    return schedule


def mmseg_schedule(
    base_lr: float = 1e-3,
    warmup_start_factor: float = 0.03,
    warmup_end: int = 12000,
    decay_end: int = 24000,
    eta_min_ratio: float = 0.03,
    power: float = 0.9,
) -> optax.Schedule:
    """mmseg ``schedule_25k``: LinearLR [0, warmup_end), PolyLRRatio [warmup_end, decay_end), then constant.

    ``i < warmup_end``: ``base * (f + (1 - f) * i / (warmup_end - 1))``;
    ``warmup_end <= i < decay_end``: ``m + (base - m) * (1 - k / T)**power`` with ``k = i - warmup_end``,
    ``T = decay_end - warmup_end - 1`` and ``m = eta_min_ratio * base``; after that ``m``.
    (These are the closed forms of mmengine's recursive updates; a one-update warm-up or decay, where mmengine
    divides by zero or never decays, starts at ``f * base`` and reaches ``m`` at ``decay_end``.)
    """
    # At least 1, so that a one-update warm-up or decay is a step, not 0/0 (NaN).
    warm_total = max(warmup_end - 1, 1)
    poly_total = max(decay_end - warmup_end - 1, 1)
    eta_min = eta_min_ratio * base_lr

    def schedule(count):
        i = jnp.asarray(count, jnp.float32)
        warm = base_lr * (warmup_start_factor + (1.0 - warmup_start_factor) * jnp.minimum(i, warm_total) / warm_total)
        k = jnp.clip(i - warmup_end, 0.0, poly_total)
        # (T - k) / T rather than 1 - k / T: the latter rounds below 0 at k = T under XLA (NaN power).
        poly = eta_min + (base_lr - eta_min) * ((poly_total - k) / poly_total) ** power
        return jnp.where(i < warmup_end, warm, jnp.where(i < decay_end, poly, eta_min))

    return schedule


def mmcv_poly_schedule(
    base_lr: float = 8e-5,
    total_steps: int = 80000,
    power: float = 1.0,
    min_lr: float = 0.0,
    warmup_steps: int = 1500,
    warmup_ratio: float = 1e-6,
) -> optax.Schedule:
    """mmcv 0.x ``PolyLrUpdaterHook`` with linear warm-up (``by_epoch=False``), the VPD segmentation schedule
    (wl-zhao/VPD segmentation/configs/fpn_vpd_sd1-5_512x512_gpu8x2.py; mmcv/runner/hooks/lr_updater.py).

    Iteration ``i = count`` (mmcv sets the rate before iteration ``i``, 0-based): ``poly(i) = (base - min) *
    (1 - i / total)**power + min``; while ``i < warmup_steps`` the warm-up scales that *regular* rate by
    ``1 - (1 - i / warmup_steps) * (1 - warmup_ratio)``.
    """

    def schedule(count):
        i = jnp.asarray(count, jnp.float32)
        coeff = jnp.clip((total_steps - i) / total_steps, 0.0, 1.0) ** power
        regular = (base_lr - min_lr) * coeff + min_lr
        if warmup_steps <= 0:
            return regular
        # 1 - (1 - i/W)(1 - r) rearranged: float32 would round 1 - (1 - 1e-6) to 1.19e-6 at i = 0.
        factor = warmup_ratio + (1.0 - warmup_ratio) * (i / warmup_steps)
        return jnp.where(i < warmup_steps, regular * factor, regular)

    return schedule


def make_schedule(kind: str, **kwargs) -> optax.Schedule:
    """A schedule by name: ``official``, ``mmseg``, ``mmcv_poly`` or ``constant`` (``value=``)."""
    if kind == "official":
        return official_schedule(**kwargs)
    if kind == "mmseg":
        return mmseg_schedule(**kwargs)
    if kind == "mmcv_poly":
        return mmcv_poly_schedule(**kwargs)
    if kind == "constant":
        return optax.constant_schedule(kwargs.pop("value"))
    raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULE_KINDS}")
