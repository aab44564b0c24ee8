"""GroupNorm / LayerNorm: forward and the written-out gradients against PyTorch's autograd (float64 reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpd_jax.models.layers import group_norm, layer_norm

torch = pytest.importorskip("torch")


def _inputs(shape, c, offset, seed=0):
    rng = np.random.default_rng(seed)
    x = (offset + rng.standard_normal(shape) * rng.uniform(0.05, 3.0, size=(shape[0],) + (1,) * (len(shape) - 1)))
    scale = 1.0 + 0.3 * rng.standard_normal(c)
    bias = 0.2 * rng.standard_normal(c)
    w = rng.standard_normal(shape)  # the loss sum(w * silu(norm(x))) gives every output its own gradient
    return [a.astype(np.float32) for a in (x, scale, bias, w)]


def _torch_grads(fn, x, scale, bias, w):
    t = [torch.tensor(a, dtype=torch.float64, requires_grad=i < 3) for i, a in enumerate((x, scale, bias, w))]
    y = fn(*t[:3])
    (t[3] * torch.nn.functional.silu(y)).sum().backward()
    return y.detach().numpy(), [a.grad.numpy() for a in t[:3]]


def _jax_grads(fn, x, scale, bias, w):
    def loss(x, s, b):
        return jnp.sum(jnp.asarray(w) * jax.nn.silu(fn(x, s, b)))

    return np.asarray(fn(x, scale, bias)), [np.asarray(g) for g in jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)]


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("shape,groups,offset",
                         [((2, 6, 5, 32), 8, 0.0), ((3, 7, 12), 4, 5.0), ((1, 4, 4, 64), 32, -2.0)])
def test_group_norm_and_its_gradient_match_torch(shape, groups, offset):
    x, scale, bias, w = _inputs(shape, shape[-1], offset)

    def ours(x, s, b):
        return group_norm(x, s, b, groups, 1e-6, jnp.dtype(jnp.float32))

    def ref(x, s, b):  # torch is NC...: move the channels to axis 1 and back
        perm = (0, x.ndim - 1, *range(1, x.ndim - 1))
        inv = np.argsort(perm)
        y = torch.nn.functional.group_norm(x.permute(*perm), groups, s, b, eps=1e-6)
        return y.permute(*inv)

    y, grads = _jax_grads(ours, x, scale, bias, w)
    y_ref, grads_ref = _torch_grads(ref, x, scale, bias, w)
    assert _rel(y, y_ref) < 2e-6
    for name, g, g_ref in zip(("x", "scale", "bias"), grads, grads_ref):
        assert _rel(g, g_ref) < 1e-5, name


@pytest.mark.parametrize("shape,offset", [((2, 9, 48), 0.0), ((4, 40), 3.0)])
def test_layer_norm_and_its_gradient_match_torch(shape, offset):
    x, scale, bias, w = _inputs(shape, shape[-1], offset, seed=1)

    def ours(x, s, b):
        return layer_norm(x, s, b, 1e-5, jnp.dtype(jnp.float32))

    def ref(x, s, b):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), s, b, eps=1e-5)

    y, grads = _jax_grads(ours, x, scale, bias, w)
    y_ref, grads_ref = _torch_grads(ref, x, scale, bias, w)
    assert _rel(y, y_ref) < 2e-6
    for name, g, g_ref in zip(("x", "scale", "bias"), grads, grads_ref):
        assert _rel(g, g_ref) < 1e-5, name


def test_bf16_activations_keep_their_dtype_and_fp32_statistics():
    x, scale, bias, w = _inputs((2, 4, 4, 16), 16, 1.0, seed=2)
    xb = jnp.asarray(x, jnp.bfloat16)

    def loss(x, s, b):
        return jnp.sum(jnp.asarray(w) * group_norm(x, s, b, 4, 1e-5, jnp.dtype(jnp.bfloat16)).astype(jnp.float32))

    gx, gs, gb = jax.grad(loss, argnums=(0, 1, 2))(xb, scale, bias)
    assert gx.dtype == jnp.bfloat16 and gs.dtype == gb.dtype == jnp.float32
    ref = jax.grad(loss, argnums=(0, 1, 2))(xb.astype(jnp.float32), scale, bias)
    assert _rel(np.asarray(gs), np.asarray(ref[1])) < 2e-2  # bf16 output rounding only
    assert jax.jit(jax.vmap(jax.grad(loss), in_axes=(0, None, None)))(xb[None], scale, bias).shape == (1, 2, 4, 4, 16)


@pytest.mark.parametrize("offset", [0.0, 8.0, 100.0])
def test_bf16_one_pass_statistics_stay_within_bf16_rounding(offset):
    """bf16 inputs take a one-pass variance (mean(x^2) - mean^2 in float32); against the two-pass float32 result
    on the same bf16 values the outputs differ by less than bf16 rounding, even with a group's mean ~40 standard
    deviations from zero (offset 100: 3e-4 relative; 2^-9 allowed)."""
    x, scale, bias, _ = _inputs((2, 16, 16, 64), 64, offset, seed=3)
    xb = jnp.asarray(x, jnp.bfloat16)
    y = group_norm(xb, scale, bias, 8, 1e-6, jnp.dtype(jnp.float32))
    two_pass = group_norm(xb.astype(jnp.float32), scale, bias, 8, 1e-6, jnp.dtype(jnp.float32))
    assert _rel(np.asarray(y), np.asarray(two_pass)) < 2**-9


# ---------------------------------------------------------------------------- batch-invariant statistics

def _group_norm_f64(x, scale, bias, groups, eps):
    """``torch.nn.GroupNorm`` as a float64 NumPy statement, over N...C."""
    n, c = x.shape[0], x.shape[-1]
    g = x.astype(np.float64).reshape(n, -1, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = np.square(g - mean).mean(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


# (H, W, C), groups, batch sizes, offsets: SD-1.5's VAE levels (1.3 M values per group at 512x640 with 128
# channels, kept here at 32 channels and 8 groups: the same 4 channels per group), the UNet's levels, an odd
# size; batches 1 to 16 where the arrays stay small enough for a quick float64 reference.
GROUP_NORM_GRID = [
    ((512, 640, 32), 8, (1, 4), (50.0,)),
    ((256, 256, 64), 32, (2, 8), (6.0,)),
    ((128, 128, 512), 32, (4,), (6.0, 50.0)),
    ((64, 64, 320), 32, (1, 2, 4, 8, 16), (6.0, 50.0)),
    ((32, 32, 640), 32, (1, 16), (50.0,)),
    ((16, 16, 1280), 32, (4, 16), (6.0, 50.0)),
    ((61, 67, 64), 32, (1, 4, 8), (6.0, 50.0)),
]


@pytest.mark.parametrize("hwc,groups,batches,offsets", GROUP_NORM_GRID)
def test_float32_group_norm_is_exact_at_every_batch_size(hwc, groups, batches, offsets):
    """Inputs whose group means sit 6 and 50 standard deviations from zero (a conv with a bias). XLA:CPU reduces
    differently from batch 4 on; a plain float32 sum then missed by up to 1.1e-3 here (1.2e-6 at batch 1).
    Measured now: at most 1.7e-6 anywhere, float32 rounding of outputs up to ~12."""
    c = hwc[-1]
    rng = np.random.default_rng(c)
    scale = (1 + 0.3 * rng.standard_normal(c)).astype(np.float32)
    bias = (0.2 * rng.standard_normal(c)).astype(np.float32)
    fn = jax.jit(lambda x, s, b: group_norm(x, s, b, groups, 1e-6, jnp.dtype(jnp.float32)))
    for offset in offsets:
        for n in batches:
            x = rng.standard_normal((n, *hwc), dtype=np.float32)
            x += np.float32(offset)
            err = float(np.max(np.abs(np.asarray(fn(x, scale, bias)) - _group_norm_f64(x, scale, bias, groups, 1e-6))))
            assert err < 5e-6, f"offset {offset}, batch {n}: {err:.2e}"


@pytest.mark.parametrize("offset", [6.0, 50.0])
def test_float32_group_norm_gradient_is_exact_at_every_batch_size(offset):
    """The written-out gradient's pixel sums as well: against PyTorch's float64 autograd at batch 1, 4 and 8 the
    relative error is at most 1.1e-6 (a plain float32 sum: up to 3.7e-4 at batch 8)."""
    for n, hwc in ((1, (256, 256, 64)), (4, (256, 256, 64)), (8, (128, 128, 64))):
        x, scale, bias, w = _inputs((n, *hwc), hwc[-1], offset, seed=n)

        def ours(x, s, b):
            return group_norm(x, s, b, 32, 1e-6, jnp.dtype(jnp.float32))

        def ref(x, s, b):
            return torch.nn.functional.group_norm(x.permute(0, 3, 1, 2), 32, s, b, eps=1e-6).permute(0, 2, 3, 1)

        _, grads = _jax_grads(jax.jit(ours), x, scale, bias, w)
        _, grads_ref = _torch_grads(ref, x, scale, bias, w)
        for name, g, g_ref in zip(("x", "scale", "bias"), grads, grads_ref):
            assert _rel(g, g_ref) < 4e-6, f"batch {n}, d{name}: {_rel(g, g_ref):.2e}"


@pytest.mark.parametrize("m,inner", [(4096, 1), (4096, 10), (262144, 2), (165, 40), (4099, 16), (2 * 4099, 1)])
def test_pixel_sum_equals_the_float64_sum(m, inner):
    """Every block layout (a divisor near the block size, padding for a prime pixel count, one stage when small)."""
    from vpd_jax.models.layers import pixel_sum

    x = (5.0 + np.random.default_rng(m).standard_normal((4, m, 3, inner))).astype(np.float32)
    got = np.asarray(jax.jit(lambda v: pixel_sum(v, (3,)))(x))
    want = x.astype(np.float64).sum(axis=(1, 3))
    assert got.shape == (4, 3)
    assert float(np.max(np.abs(got / want - 1))) < 3e-7
