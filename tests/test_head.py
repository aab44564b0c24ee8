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

from reference.torch_vpd import TorchHead, TorchTextAdapter, maxdiff, nchw, nhwc, rand, randomize_, state_numpy
from vpd_jax.models import head as H
from vpd_jax.weights.common import flatten, unflatten
from vpd_jax.weights.vpd_checkpoint import convert_layer, head_layout

# Each comparison's bound is about 3x the largest error measured on the development CPU (fp32, absolute, in the
# layer's own units; see docs/fidelity.md): convs 2.4e-7, GroupNorm 7.2e-7, BatchNorm 4.8e-7, bilinear x2 1.2e-7,
# text adapter 2.9e-6, the whole head 2.9e-6 m (evaluation) and 1.5e-5 m (training-mode BatchNorm).


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
    assert maxdiff(got, want) < 1e-7


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 1)])
def test_conv_matches_torch(kernel, stride):
    """Against torch.nn.Conv2d run in float64 (PyTorch's own float32 conv is up to 3.7e-7 of the largest output
    from it, ours 1.8e-7): bound 5e-7 of the largest output."""
    tm = tnn.Conv2d(6, 7, kernel, stride=stride, padding=kernel // 2)
    randomize_(tm, 2)
    x = rand((2, 6, 5, 6), 3)  # odd and even sizes: stride-2 padding must be symmetric like PyTorch's
    params, _ = convert_layer("conv", state_numpy(tm))
    mod = H.conv(7, kernel, stride, name=None, kernel_init=H.normal_0001, dtype=jnp.float32, param_dtype=jnp.float32)
    got = jax.jit(mod.apply)({"params": params}, x)
    want = nhwc(tm.double()(nchw(np.asarray(x, np.float64))))
    assert got.shape == want.shape
    assert maxdiff(np.asarray(got, np.float64), want) < 5e-7 * np.abs(want).max()


def test_group_norm_matches_torch():
    tm = tnn.GroupNorm(16, 32)
    randomize_(tm, 4)
    x = rand((2, 5, 3, 32), 5, scale=3.0, offset=10.0)  # a large mean: a one-pass variance would lose digits
    params, _ = convert_layer("norm", state_numpy(tm))
    got = jax.jit(H.GroupNorm(16).apply)({"params": params}, x)
    assert maxdiff(got, nhwc(tm(nchw(x)))) < 2e-6


def test_batch_norm_eval_matches_torch():
    tm = tnn.BatchNorm2d(8)
    randomize_(tm, 6)
    tm.eval()
    x = rand((3, 4, 5, 8), 7, scale=2.0, offset=1.0)
    params, stats = convert_layer("bn", state_numpy(tm))
    got = jax.jit(functools.partial(H.BatchNorm().apply, train=False))({"params": params, "batch_stats": stats}, x)
    assert maxdiff(got, nhwc(tm(nchw(x)))) < 1.5e-6


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
        assert maxdiff(got, want) < 1.5e-6
    assert maxdiff(stats["mean"], tm.running_mean.numpy()) < 1.5e-7
    assert maxdiff(stats["var"], tm.running_var.numpy()) < 1.5e-6


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 1, 4, 2)])
def test_upsampling_matches_torch(shape):
    x = rand(shape, 11)
    want_near = nhwc(F.interpolate(nchw(x), scale_factor=2))
    got_near = H.resize_nearest(jnp.asarray(x), (2 * shape[1], 2 * shape[2]))
    assert maxdiff(got_near, want_near) == 0.0
    want_bil = nhwc(F.interpolate(nchw(x), scale_factor=2, mode="bilinear", align_corners=False))
    got_bil = jax.jit(H.upsample_bilinear_2x)(x)
    assert got_bil.shape == want_bil.shape
    assert maxdiff(got_bil, want_bil) < 4e-7


def test_text_adapter_matches_torch():
    tm = TorchTextAdapter(16)
    randomize_(tm, 12)
    gamma = rand((16,), 13)
    e = rand((3, 16), 14, scale=5.0)
    p1, _ = convert_layer("dense", state_numpy(tm.fc[0]))
    p2, _ = convert_layer("dense", state_numpy(tm.fc[2]))
    got = jax.jit(H.TextAdapter(16).apply)({"params": {"fc1": p1, "fc2": p2}}, e, gamma)
    want = tm(torch.from_numpy(e), torch.from_numpy(gamma)).detach().numpy()
    assert maxdiff(got, want) < 9e-6


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
    assert maxdiff(got, want) < 9e-6


def test_head_train_matches_torch(head_pair):
    tm, module, params, stats = head_pair
    tm_train = TorchHead(CHANS, NECK, FILTERS, DEC)
    tm_train.load_state_dict(tm.state_dict())
    tm_train.train()
    feats = head_feats((4, 4), 40)
    apply = jax.jit(lambda v, f: module.apply(v, f, (3, 3), train=True, mutable=["batch_stats"]))
    got, upd = apply({"params": params, "batch_stats": stats}, feats)
    want = nhwc(tm_train([nchw(f) for f in feats], (3, 3)))
    # Metres up to 10 through four batch-statistics BNs: a few fp32 ulps of the output (1.5e-5 measured).
    assert maxdiff(got, want) < 4.5e-5
    _, want_stats = convert_head_state(state_numpy(tm_train), len(FILTERS))
    got_flat, want_flat = flatten(upd["batch_stats"]), flatten(want_stats)
    assert got_flat.keys() == want_flat.keys()
    for k in want_flat:
        assert maxdiff(got_flat[k], want_flat[k]) < 4e-7, k


# -------------------------------------------------------------------------------------- initialisation

SD15_HEAD = dict(chans=(320, 640, 1280, 1280), neck=1536, filters=(32, 32, 32), dec=192, text=768)


def _official_initialised_head():
    """The official head as ``depth/models_depth/model.py`` initialises it: ``VPDDepthEncoder._init_weights``
    (timm's ``trunc_normal_(std=.02)``, equal to torch's with bounds +-2, and zero biases) on the neck, the
    ``Decoder.init_weights`` and ``last_layer_depth`` ``normal_init``s (mmcv's, now mmengine's), and the text
    adapter created afterwards with PyTorch's defaults."""
    from mmengine.model import constant_init, normal_init

    c = SD15_HEAD
    head = TorchHead(c["chans"], c["neck"], c["filters"], c["dec"])
    for m in (*head.encoder.layer1, *head.encoder.layer2, *head.encoder.out_layer):
        if isinstance(m, (tnn.Conv2d, tnn.Linear)):
            tnn.init.trunc_normal_(m.weight, std=0.02)
            tnn.init.constant_(m.bias, 0)
    for m in head.decoder.modules():
        if isinstance(m, tnn.Conv2d):
            normal_init(m, std=0.001, bias=0)
        elif isinstance(m, tnn.BatchNorm2d):
            constant_init(m, 1)
        elif isinstance(m, tnn.ConvTranspose2d):
            normal_init(m, std=0.001)
    for m in head.last_layer_depth.modules():
        if isinstance(m, tnn.Conv2d):
            normal_init(m, std=0.001, bias=0)
    state = {k: v.detach().numpy() for k, v in head.state_dict().items()}
    state.update({"encoder.text_adapter." + k: v.detach().numpy()
                  for k, v in TorchTextAdapter(c["text"]).state_dict().items()})
    return state


def _mmseg_initialised_head():
    """mmsegmentation's own ``VPDDepthHead`` after ``init_weights()`` (its init_cfg) under official names, and its
    ``TextAdapter`` (PyTorch's defaults)."""
    from reference import torch_training as T

    T.import_mmseg()
    from mmseg.models.backbones.vpd import TextAdapter
    from mmseg.models.decode_heads.vpd_depth_head import VPDDepthHead

    c = SD15_HEAD
    head = VPDDepthHead(in_channels=list(c["chans"]), embed_dim=c["dec"], feature_dim=c["neck"],
                        num_deconv_filters=c["filters"])
    head.init_weights()
    state = {}
    for k, v in head.state_dict().items():
        new = next((src + k[len(dst):] for src, dst in T.OFFICIAL_TO_MMSEG_HEAD if k.startswith(dst)), None)
        if new is not None:
            state[new] = v.detach().numpy()
    state.update({"encoder.text_adapter." + k: v.detach().numpy()
                  for k, v in TextAdapter(c["text"]).state_dict().items()})
    return state


def _ours(method: str, head_init: str) -> dict[str, np.ndarray]:
    """Our fresh head, text adapter, gamma and BatchNorm statistics at SD-1.5's head sizes, by ``model.init``."""
    from vpd_jax.training.initialize import fill_random

    c = SD15_HEAD
    module = H.VPDHead(neck_features=c["neck"], deconv_filters=c["filters"], decoder_features=c["dec"],
                       head_init=head_init)
    feats = [jnp.zeros((1, 8, 8, c["chans"][0])), jnp.zeros((1, 4, 4, c["chans"][1])),
             jnp.zeros((1, 2, 2, c["chans"][2])), jnp.zeros((1, 1, 1, c["chans"][3]))]
    adapter = H.TextAdapter(c["text"])
    if method == "flax":
        v = jax.jit(lambda r: module.init(r, feats, (2, 2)))(jax.random.key(3))
        a = adapter.init(jax.random.key(4), jnp.zeros((1, c["text"])), jnp.zeros((c["text"],)))
    else:
        v = jax.eval_shape(lambda: module.init(jax.random.key(3), feats, (2, 2)))
        a = jax.eval_shape(lambda: adapter.init(jax.random.key(4), jnp.zeros((1, c["text"])), jnp.zeros(c["text"])))
        tree = fill_random({"params": {"head": v["params"], "text_adapter": a["params"]},
                            "batch_stats": {"head": v["batch_stats"]}}, seed=3, head_init=head_init)
        v = {"params": tree["params"]["head"], "batch_stats": tree["batch_stats"]["head"]}
        a = {"params": tree["params"]["text_adapter"]}
    out = {f"params/head/{k}": np.asarray(x) for k, x in flatten(v["params"]).items()}
    out.update({f"batch_stats/head/{k}": np.asarray(x) for k, x in flatten(v["batch_stats"]).items()})
    out.update({f"params/text_adapter/{k}": np.asarray(x) for k, x in flatten(a["params"]).items()})
    return out


def _reference_by_our_names(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference's tensors under our names (the converter's table), layouts aside: values only matter."""
    out = {}
    for name, kind, path in head_layout(3):
        for leaf, ours in (("weight", "kernel" if kind in ("conv", "deconv", "dense") else "scale"),
                           ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var")):
            if f"{name}.{leaf}" in state:
                coll = "batch_stats" if leaf.startswith("running") else "params"
                out[f"{coll}/{path}/{ours}"] = state[f"{name}.{leaf}"]
    return out


@pytest.mark.parametrize("method", ["fast", "flax"])
@pytest.mark.parametrize("head_init", ["official", "mmseg"])
def test_initialisation_follows_the_references(method, head_init):
    """Every fresh tensor against the reference module's own initialiser, tensor by tensor: the mean within
    5 standard errors, the standard deviation within 5% (2% for tensors of 10,000 values or more), the largest
    magnitude at the reference's bound (uniform, to within 6/n) or at 2.5-7 standard deviations (normal),
    constants equal.
    Also: gamma starts at 1e-4 in both references."""
    pytest.importorskip("mmengine")
    ref = _reference_by_our_names(_official_initialised_head() if head_init == "official"
                                  else _mmseg_initialised_head())
    ours = _ours(method, head_init)
    assert set(ours) == set(ref)
    for k, want in ref.items():
        got, want = np.asarray(ours[k], np.float64).ravel(), np.asarray(want, np.float64).ravel()
        assert got.size == want.size, k
        if np.all(want == want[0]):
            np.testing.assert_array_equal(got, want, err_msg=k)
            continue
        sd = want.std()
        assert abs(got.mean() - want.mean()) < 5 * sd / np.sqrt(got.size), k
        assert abs(got.std() / sd - 1) < (0.02 if got.size >= 10_000 else 0.05 + 5 / np.sqrt(got.size)), k
        n, bound = got.size, np.abs(want).max()
        if bound < 2.1 * sd:  # U(-b, b): the largest magnitude is sqrt(3) = 1.73 standard deviations
            # The bound from the reference's largest magnitude (n / (n + 1) of b on average, short of it by more
            # than 6 b / n with probability e^-6); ours must reach as close and never beyond.
            b = bound * (n + 1) / n
            assert b * (1 - 6 / n) < np.abs(got).max() <= b * (1 + 6 / n), k
        else:
            assert 2.5 * sd < np.abs(got).max() < 7 * sd, k
