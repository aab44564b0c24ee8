"""The VPD head parts against torch.nn with the same weights, passed through our checkpoint converter."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn
from torch_reference import TorchHead, TorchTextAdapter, maxdiff, nchw, nhwc, rand, randomize_, state_numpy

from vpd_jax.models import head as H
from vpd_jax.weights.common import flatten, unflatten
from vpd_jax.weights.vpd_checkpoint import convert_layer, head_layout

TOL = 1e-5


def convert_head_state(state: dict[str, np.ndarray], num_deconv: int) -> tuple[dict, dict]:
    """Official-named head tensors -> (params, batch_stats) through the converter's own table."""
    params, stats = {}, {}
    for name, kind, path in head_layout(num_deconv):
        if not path.startswith("head/"):
            continue
        leaves = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        p, s = convert_layer(kind, leaves)
        sub = path[len("head/"):]
        params.update({f"{sub}/{k}": v for k, v in p.items()})
        stats.update({f"{sub}/{k}": v for k, v in s.items()})
    return unflatten(params), unflatten(stats)


# --------------------------------------------------------------------------------------- single layers

def test_conv_transpose_2x2_matches_torch():
    tm = tnn.ConvTranspose2d(12, 5, 2, stride=2, bias=False)
    randomize_(tm, 0)
    x = rand((2, 3, 4, 12), 1)
    params, _ = convert_layer("deconv", {"weight": tm.weight.detach().numpy()})
    got = jax.jit(H.ConvTranspose2x2(5).apply)({"params": params}, x)
    want = nhwc(tm(nchw(x)))
    assert got.shape == want.shape == (2, 6, 8, 5)
    assert maxdiff(got, want) < TOL


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 1)])
def test_conv_matches_torch(kernel, stride):
    tm = tnn.Conv2d(6, 7, kernel, stride=stride, padding=kernel // 2)
    randomize_(tm, 2)
    x = rand((2, 6, 5, 6), 3)  # odd and even sizes: stride-2 padding must be symmetric like PyTorch's
    params, _ = convert_layer("conv", state_numpy(tm))
    mod = H.conv(7, kernel, stride, name=None, kernel_init=H.normal_0001, dtype=jnp.float32, param_dtype=jnp.float32)
    got = jax.jit(mod.apply)({"params": params}, x)
    want = nhwc(tm(nchw(x)))
    assert got.shape == want.shape
    assert maxdiff(got, want) < TOL


def test_group_norm_matches_torch():
    tm = tnn.GroupNorm(16, 32)
    randomize_(tm, 4)
    x = rand((2, 5, 3, 32), 5, scale=3.0, offset=10.0)  # a large mean: a one-pass variance would lose digits
    params, _ = convert_layer("norm", state_numpy(tm))
    got = jax.jit(H.GroupNorm(16).apply)({"params": params}, x)
    assert maxdiff(got, nhwc(tm(nchw(x)))) < TOL


def test_batch_norm_eval_matches_torch():
    tm = tnn.BatchNorm2d(8)
    randomize_(tm, 6)
    tm.eval()
    x = rand((3, 4, 5, 8), 7, scale=2.0, offset=1.0)
    params, stats = convert_layer("bn", state_numpy(tm))
    got = jax.jit(functools.partial(H.BatchNorm().apply, train=False))({"params": params, "batch_stats": stats}, x)
    assert maxdiff(got, nhwc(tm(nchw(x)))) < TOL


def test_batch_norm_train_matches_torch_including_running_stats():
    tm = tnn.BatchNorm2d(8)
    randomize_(tm, 8)
    tm.train()
    params, stats = convert_layer("bn", state_numpy(tm))
    step = jax.jit(lambda v, x: H.BatchNorm().apply(v, x, train=True, mutable=["batch_stats"]))
    for i in range(3):  # the running statistics compound over steps
        x = rand((3, 4, 5, 8), 10 + i, scale=2.0, offset=1.0)
        got, upd = step({"params": params, "batch_stats": stats}, x)
        stats = upd["batch_stats"]
        want = nhwc(tm(nchw(x)))
        assert maxdiff(got, want) < TOL
    assert maxdiff(stats["mean"], tm.running_mean.numpy()) < TOL
    assert maxdiff(stats["var"], tm.running_var.numpy()) < TOL


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 1, 4, 2)])
def test_upsampling_matches_torch(shape):
    x = rand(shape, 11)
    want_near = nhwc(F.interpolate(nchw(x), scale_factor=2))
    got_near = H.resize_nearest(jnp.asarray(x), (2 * shape[1], 2 * shape[2]))
    assert maxdiff(got_near, want_near) == 0.0
    want_bil = nhwc(F.interpolate(nchw(x), scale_factor=2, mode="bilinear", align_corners=False))
    got_bil = jax.jit(H.upsample_bilinear_2x)(x)
    assert got_bil.shape == want_bil.shape
    assert maxdiff(got_bil, want_bil) < TOL


def test_text_adapter_matches_torch():
    tm = TorchTextAdapter(16)
    randomize_(tm, 12)
    gamma = rand((16,), 13)
    e = rand((3, 16), 14, scale=5.0)
    p1, _ = convert_layer("dense", state_numpy(tm.fc[0]))
    p2, _ = convert_layer("dense", state_numpy(tm.fc[2]))
    got = jax.jit(H.TextAdapter(16).apply)({"params": {"fc1": p1, "fc2": p2}}, e, gamma)
    want = tm(torch.from_numpy(e), torch.from_numpy(gamma)).detach().numpy()
    assert maxdiff(got, want) < TOL


# ------------------------------------------------------------------------------------- the whole head

CHANS, NECK, FILTERS, DEC = (32, 32, 64, 64), 32, (8, 8, 8), 16


@pytest.fixture(scope="session")
def head_pair():
    tm = TorchHead(CHANS, NECK, FILTERS, DEC)
    randomize_(tm, 20)
    with torch.no_grad():  # spread the depth over the sigmoid's range
        tm.last_layer_depth[2].weight.mul_(5.0)
    params, stats = convert_head_state(state_numpy(tm), len(FILTERS))
    module = H.VPDHead(neck_features=NECK, deconv_filters=FILTERS, decoder_features=DEC)
    return tm, module, params, stats


def head_feats(o4_hw, seed):
    h, w = o4_hw
    return [rand((2, 4 * h, 4 * w, CHANS[0]), seed), rand((2, 2 * h, 2 * w, CHANS[1]), seed + 1),
            rand((2, h, w, CHANS[2]), seed + 2), rand((2, h // 2, w // 2, CHANS[3]), seed + 3)]


@pytest.mark.parametrize("o4_hw,valid", [((4, 4), (3, 3)), ((4, 6), (3, 5)), ((2, 4), (2, 4))])
def test_head_eval_matches_torch(head_pair, o4_hw, valid):
    tm, module, params, stats = head_pair
    tm.eval()
    feats = head_feats(o4_hw, 30)
    apply = jax.jit(functools.partial(module.apply, train=False), static_argnums=2)
    got = apply({"params": params, "batch_stats": stats}, feats, valid)
    want = nhwc(tm([nchw(f) for f in feats], valid))
    assert got.shape == want.shape == (2, 32 * valid[0], 32 * valid[1], 1)
    assert float(np.std(want)) > 0.1  # the comparison is not between two constants
    assert maxdiff(got, want) < TOL


def test_head_train_matches_torch(head_pair):
    tm, module, params, stats = head_pair
    tm_train = TorchHead(CHANS, NECK, FILTERS, DEC)
    tm_train.load_state_dict(tm.state_dict())
    tm_train.train()
    feats = head_feats((4, 4), 40)
    apply = jax.jit(lambda v, f: module.apply(v, f, (3, 3), train=True, mutable=["batch_stats"]))
    got, upd = apply({"params": params, "batch_stats": stats}, feats)
    want = nhwc(tm_train([nchw(f) for f in feats], (3, 3)))
    # Metres up to 10 through four batch-statistics BNs: a few fp32 ulps of the output (~2e-6 relative).
    assert maxdiff(got, want) < 2 * TOL
    _, want_stats = convert_head_state(state_numpy(tm_train), len(FILTERS))
    got_flat, want_flat = flatten(upd["batch_stats"]), flatten(want_stats)
    assert got_flat.keys() == want_flat.keys()
    for k in want_flat:
        assert maxdiff(got_flat[k], want_flat[k]) < TOL, k


# -------------------------------------------------------------------------------------- initialisation

def test_initialisation_follows_the_references():
    feats = head_feats((4, 4), 50)
    for init in H.HEAD_INITS:
        module = H.VPDHead(neck_features=256, deconv_filters=FILTERS, decoder_features=64, head_init=init)
        v = jax.jit(lambda r, f, m=module: m.init(r, f, (3, 3)))(jax.random.key(0), feats)
        p = flatten(v["params"])
        assert abs(np.std(p["neck/out_conv/kernel"]) - 0.02) < 2e-3
        assert abs(np.std(p["decoder/deconv_0/kernel"]) - 0.001) < 2e-4
        assert abs(np.std(p["decoder/conv/kernel"]) - 0.001) < 2e-4
        want_head = 0.001 if init == "official" else 0.02
        assert abs(np.std(p["depth/conv_0/kernel"]) - want_head) < 0.1 * want_head
        for k, a in p.items():
            if k.endswith("bias"):
                assert not np.any(a), k
            if k.endswith("scale"):
                assert np.all(a == 1), k
        s = flatten(v["batch_stats"])
        assert all(not np.any(a) for k, a in s.items() if k.endswith("mean"))
        assert all(np.all(a == 1) for k, a in s.items() if k.endswith("var"))
    # PyTorch's default Linear init: U(+-1/sqrt(fan_in)) for weights and biases.
    v = H.TextAdapter(768).init(jax.random.key(1), jnp.zeros((1, 768)), jnp.zeros((768,)))["params"]
    bound = 1 / np.sqrt(768)
    for layer in ("fc1", "fc2"):
        for leaf in ("kernel", "bias"):
            a = np.asarray(v[layer][leaf])
            assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
