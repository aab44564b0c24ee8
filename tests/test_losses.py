"""SiLog (both poolings) against direct numpy transcriptions of the references, with invalid pixels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpd_jax.training.losses import silog_loss


def _official_np(pred, target, lambd=0.5):
    valid = target > 0
    d = np.log(target[valid].astype(np.float64)) - np.log(pred[valid].astype(np.float64))
    return np.sqrt(np.mean(d**2) - lambd * np.mean(d) ** 2)


def _mmseg_np(pred, target, eps=1e-6):
    out = []
    for p, t in zip(pred.reshape(len(pred), -1), target.reshape(len(target), -1)):
        with np.errstate(invalid="ignore"):
            d = np.log(np.maximum(t, eps).astype(np.float64)) - np.log(np.maximum(p, eps).astype(np.float64))
        v = (t > eps) & ~np.isnan(d)
        n = max(v.sum(), eps)
        out.append(np.sqrt((d[v] ** 2).sum() / n - 0.5 * (d[v].sum() / n) ** 2))
    return np.mean(out)


def _case(seed=0):
    rng = np.random.default_rng(seed)
    target = rng.uniform(0.3, 9.5, (3, 16, 20)).astype(np.float32)
    pred = np.clip(target * rng.uniform(0.6, 1.5, target.shape), 1e-3, 10 - 1e-3).astype(np.float32)
    target[0, :4] = 0.0  # missing depth
    target[1, 5, 3:9] = 5e-7  # valid for official (> 0), invalid for mmseg (<= eps)
    target[2] = 0.0
    target[2, 0, 0] = 2.0  # one valid pixel in this image
    return pred, target


silog = jax.jit(silog_loss, static_argnames="kind")


def test_official_matches_numpy():
    pred, target = _case()
    np.testing.assert_allclose(silog(pred, target, kind="official"), _official_np(pred, target), rtol=2e-5)


def test_mmseg_matches_numpy():
    pred, target = _case()
    np.testing.assert_allclose(silog(pred, target, kind="mmseg"), _mmseg_np(pred, target), rtol=2e-5)


def test_poolings_differ_and_ignore_invalid_predictions():
    pred, target = _case(1)
    a, b = silog(pred, target, kind="official"), silog(pred, target, kind="mmseg")
    assert abs(float(a) - float(b)) > 1e-4
    noisy = pred.copy()
    noisy[0, :4] = np.nan  # only where target == 0
    np.testing.assert_allclose(silog(noisy, target, kind="official"), a, rtol=1e-6)
    np.testing.assert_allclose(silog(noisy, target, kind="mmseg"), b, rtol=1e-6)


def test_image_without_valid_pixels_counts_as_zero_in_mmseg():
    pred, target = _case(2)
    target[1] = 0.0
    np.testing.assert_allclose(silog(pred, target, kind="mmseg"), _mmseg_np(pred, target), rtol=2e-5)


@pytest.mark.parametrize("kind", ["official", "mmseg"])
def test_gradients_finite_even_at_zero_loss(kind):
    pred, target = _case(3)
    grad = jax.jit(jax.grad(lambda p, t: silog_loss(p, t, kind=kind)))
    g = grad(jnp.asarray(pred), jnp.asarray(target))
    assert bool(jnp.all(jnp.isfinite(g)))
    assert bool(jnp.all(g[0, :4] == 0))  # no gradient through invalid pixels
    g0 = grad(jnp.asarray(target) + 0.0, jnp.asarray(target))  # pred == target: loss 0
    assert bool(jnp.all(jnp.isfinite(g0)))
    assert float(silog(jnp.ones((2, 3)), jnp.zeros((2, 3)), kind=kind)) == pytest.approx(0.0, abs=1e-12)


def test_unknown_kind():
    with pytest.raises(ValueError):
        silog_loss(jnp.ones((1, 2)), jnp.ones((1, 2)), kind="nope")
