"""Schedules against the reference formulas at their corner steps, and against a simulation of mmengine."""

import jax
import numpy as np
import pytest

from vpd_jax.training import schedules as S


def _official_ref(global_step, max_lr=5e-4, min_lr=3e-5, iters=1009, half_epoch=12):
    # depth/train.py, transcribed.
    if global_step < iters * half_epoch:
        return (max_lr - min_lr) * (global_step / iters / half_epoch) ** 0.9 + min_lr
    return max(min_lr, (min_lr - max_lr) * (global_step / iters / half_epoch - 1) ** 0.9 + max_lr)


def _evaluate(schedule, counts):
    return np.asarray(jax.jit(jax.vmap(schedule))(np.asarray(counts)))


def test_official_corner_steps():
    counts = [0, 1, 500, 12106, 12107, 12108, 18000, 24214, 24215, 24216, 25224, 30000]
    got = _evaluate(S.official_schedule(), counts)
    want = [_official_ref(c + 1) for c in counts]  # optax count 0 is the reference's global_step 1
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-10)
    assert got[counts.index(12107)] == pytest.approx(5e-4)  # global_step 12108: the peak
    assert got[counts.index(24215)] == pytest.approx(3e-5)  # global_step 24216: the floor
    assert got[-1] == pytest.approx(3e-5)
    assert got[0] > 3e-5 and got[0] < 4e-5  # concave start just above the floor


class _MMEngine:
    """A small re-statement of mmengine's recursive LinearLR / PolyLRRatio / ConstantLR(1) semantics."""

    def __init__(self, kind, begin, end, **kw):
        self.kind, self.begin, self.end, self.kw = kind, begin, end, kw
        self.total = end - begin - 1
        self.global_step, self.last_step = -1, -1

    def step(self, lr, base):
        self.global_step += 1
        if not self.begin <= self.global_step < self.end:
            return lr
        self.last_step += 1
        k, t = self.last_step, self.total
        if self.kind == "linear":
            f = self.kw["start"]
            return lr * f if k == 0 else lr * (1 + (1 - f) / (t * f + (k - 1) * (1 - f)))
        if self.kind == "poly":
            m = base * self.kw["ratio"]
            return lr if k == 0 else (lr - m) * (1 - 1 / (t - k + 1)) ** self.kw["power"] + m
        return lr  # ConstantLR(factor=1)


def _simulate_mmseg(n, base=1e-3, w=12000, d=24000, total=25000):
    scheds = [
        _MMEngine("linear", 0, w, start=0.03),
        _MMEngine("poly", w, d, ratio=0.03, power=0.9),
        _MMEngine("constant", d, total),
    ]
    lr = base
    for s in scheds:  # construction calls step() once
        lr = s.step(lr, base)
    out = []
    for _ in range(n):
        out.append(lr)  # the optimizer step of this iteration uses lr
        for s in scheds:
            lr = s.step(lr, base)
    return np.array(out)


def test_mmseg_matches_mmengine_recursion_small():
    ref = _simulate_mmseg(40, w=12, d=24, total=30)
    got = _evaluate(S.mmseg_schedule(warmup_end=12, decay_end=24), np.arange(40))
    np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.parametrize("w,d", [(1, 2), (1, 3), (2, 3), (2, 4)])
def test_mmseg_shortest_schedules_are_finite(w, d):
    # A one-update warm-up or decay was 0/0: NaN learning rates. Now: the warm-up starts at f * base, the peak is
    # base, the floor is reached at decay_end. (mmengine's PolyLR over a single step never decays at all.)
    got = _evaluate(S.mmseg_schedule(warmup_end=w, decay_end=d), np.arange(8))
    assert np.isfinite(got).all()
    assert got[0] == pytest.approx(3e-5) and got[w] == pytest.approx(1e-3) and got[d:] == pytest.approx(3e-5)
    if d - w >= 2 and w >= 2:
        np.testing.assert_allclose(got, _simulate_mmseg(8, w=w, d=d, total=8), rtol=1e-5)


def test_mmseg_corner_steps_full_length():
    ref = _simulate_mmseg(25000)
    counts = [0, 1, 6000, 11998, 11999, 12000, 12001, 18000, 23998, 23999, 24000, 24999]
    got = _evaluate(S.mmseg_schedule(), counts)
    np.testing.assert_allclose(got, ref[counts], rtol=1e-4)
    assert got[0] == pytest.approx(3e-5)
    assert got[counts.index(11999)] == pytest.approx(1e-3)
    assert got[counts.index(12000)] == pytest.approx(1e-3)
    assert got[counts.index(23999)] == pytest.approx(3e-5)
    assert got[-1] == pytest.approx(3e-5)
    # The spec's /12000 is close to, but not, the reference's /11999.
    assert got[counts.index(6000)] == pytest.approx(1e-3 * (0.03 + 0.97 * 6000 / 11999), rel=1e-6)


def test_make_schedule():
    assert float(S.make_schedule("constant", value=0.1)(5)) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        S.make_schedule("cosine")


def _mmcv_poly_ref(i, base=8e-5, total=80000, power=1.0, min_lr=0.0, warmup=1500, ratio=1e-6):
    # mmcv/runner/hooks/lr_updater.py, transcribed: PolyLrUpdaterHook.get_lr, then get_warmup_lr('linear') of the
    # regular rate while cur_iter < warmup_iters.
    regular = (base - min_lr) * (1 - i / total) ** power + min_lr
    if i >= warmup:
        return regular
    k = (1 - i / warmup) * (1 - ratio)
    return regular * (1 - k)


def test_mmcv_poly_with_linear_warmup():
    counts = [0, 1, 749, 1499, 1500, 1501, 40000, 79998, 79999]
    got = _evaluate(S.mmcv_poly_schedule(), counts)
    np.testing.assert_allclose(got, [_mmcv_poly_ref(c) for c in counts], rtol=2e-5, atol=1e-14)
    assert got[0] == pytest.approx(8e-5 * 1e-6, rel=1e-3)
    assert got[counts.index(1500)] == pytest.approx(8e-5 * (1 - 1500 / 80000), rel=1e-5)
