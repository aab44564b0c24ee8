"""The segmentation neck and head (``vpd_jax.models.seg_head``) against mmsegmentation's own ``FPN``, ``FPNHead``
and ``CrossEntropyLoss``, with the same weights passed through ``vpd_jax.weights.seg_checkpoint``.

The reference trains with SyncBN; on one CPU process it is plain BatchNorm, so the reference head is built with
``norm_cfg=dict(type='BN')`` (same tensors, same keys). Tiny channel counts (64..96, 19 classes), every weight
and BN running statistic random (``randomize_``), four levels with the real stride ratios: 32/16/8/4 and an odd,
non-square pyramid 30x41 / 15x21 / 8x11 / 4x6, where the neck's nearest resize by size and the head's bilinear
resize after its x2 upsamples (30x42 -> 30x41) do not reduce to exact doublings.

Errors are relative to the largest reference value, against PyTorch in float64; the largest over the cases,
measured on the development CPU in fp32 (PyTorch's own fp32 error in brackets): logits in evaluation 5.8e-7
(4.7e-7), in training mode 8.2e-7 (8.9e-7), updated running statistics 1.1e-7, the head's loss 3.0e-8, input
gradients 1.3e-6 (9.8e-7), parameter gradients 4.0e-6 (8.0e-6; bias gradients, sums over every pixel, are the
worst), the loss alone 8.0e-7. Bounds are about 3x those.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reference.torch_training import import_mmseg
from reference.torch_vpd import maxdiff, nchw, nhwc, rand, randomize_
from vpd_jax.models import seg_head as S
from vpd_jax.weights.common import WeightsError, flatten
from vpd_jax.weights.seg_checkpoint import convert_seg_head

IN_CHANNELS = [64, 80, 96, 72]
CHANNELS = 64
CLASSES = 19
PYRAMIDS = {"square": [(32, 32), (16, 16), (8, 8), (4, 4)], "odd": [(30, 41), (15, 21), (8, 11), (4, 6)]}


def torch_modules(in_channels=IN_CHANNELS, channels=CHANNELS, classes=CLASSES, dropout=0.1, seed=0):
    """mmseg ``FPN`` + ``FPNHead`` as in fpn_vpd_sd1-5_512x512_gpu8x2.py (BN for SyncBN), random weights."""
    import_mmseg()
    from mmseg.models.decode_heads.fpn_head import FPNHead
    from mmseg.models.necks.fpn import FPN

    torch.manual_seed(seed)
    neck = FPN(list(in_channels), channels, 4)
    head = FPNHead(feature_strides=[4, 8, 16, 32], in_channels=[channels] * 4, in_index=[0, 1, 2, 3],
                   channels=channels, dropout_ratio=dropout, num_classes=classes,
                   norm_cfg=dict(type="BN", requires_grad=True), align_corners=False,
                   loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0))
    randomize_(neck, seed + 1)
    randomize_(head, seed + 2)
    return neck, head


def segmentor_state(neck, head) -> dict[str, np.ndarray]:
    state = {f"neck.{k}": v for k, v in neck.state_dict().items()}
    state.update({f"decode_head.{k}": v for k, v in head.state_dict().items()})
    return {k: v.detach().numpy().copy() for k, v in state.items()}


def flax_model(classes=CLASSES, channels=CHANNELS, dropout=0.1) -> S.SemanticFPN:
    return S.SemanticFPN(num_classes=classes, neck_channels=channels, channels=channels, dropout_ratio=dropout)


def inputs(pyramid: str, batch: int, seed: int = 10) -> list[np.ndarray]:
    return [rand((batch, *hw, c), seed + i) for i, (hw, c) in enumerate(zip(PYRAMIDS[pyramid], IN_CHANNELS))]


def converted(model, state, xs):
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), [jnp.asarray(x) for x in xs]))
    return convert_seg_head(state, abstract)


def torch64(neck, head, xs, train=False, requires_grad=False):
    """The reference in float64 on copies of the modules (the originals stay fp32, their statistics untouched)."""
    import copy

    n, h = copy.deepcopy(neck).double(), copy.deepcopy(head).double()
    n.train(train)
    h.train(train)
    ts = [nchw(x).double().requires_grad_(requires_grad) for x in xs]
    return n, h, ts, h(list(n(ts)))


@functools.lru_cache(maxsize=None)
def _apply(model):
    return jax.jit(model.apply, static_argnames=("train", "deterministic", "mutable", "out_size"))


def rel(a, b) -> float:
    return maxdiff(a, b) / float(np.abs(np.asarray(b, np.float64)).max())


# -------------------------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("pyramid", sorted(PYRAMIDS))
@pytest.mark.parametrize("batch", [1, 4])
def test_eval_logits_match_mmseg(pyramid, batch):
    neck, head = torch_modules()
    xs = inputs(pyramid, batch)
    model = flax_model()
    conv = converted(model, segmentor_state(neck, head), xs)
    got = np.asarray(_apply(model)(conv.variables, xs))
    _, _, _, want = torch64(neck, head, xs)
    want = nhwc(want)
    assert got.shape == want.shape == (batch, *PYRAMIDS[pyramid][0], CLASSES)
    assert rel(got, want) < 1.8e-6  # measured 5.8e-7


@pytest.mark.parametrize("pyramid", sorted(PYRAMIDS))
@pytest.mark.parametrize("batch", [1, 4])
def test_train_mode_logits_and_running_stats_match_mmseg(pyramid, batch):
    """BatchNorm on batch statistics and PyTorch's running-statistic update; dropout off (p=0 in the reference,
    ``deterministic=True`` here)."""
    neck, head = torch_modules(dropout=0.0)
    xs = inputs(pyramid, batch, seed=20)
    model = flax_model()
    conv = converted(model, segmentor_state(neck, head), xs)
    got, updates = _apply(model)(conv.variables, xs, train=True, deterministic=True, mutable=("batch_stats",))
    _, h, _, want = torch64(neck, head, xs, train=True)
    assert rel(np.asarray(got), nhwc(want)) < 2.5e-6  # measured 8.2e-7
    new_state = {f"decode_head.{k}": v.detach().float().numpy() for k, v in h.state_dict().items()}
    want_stats = convert_seg_head(new_state).batch_stats
    got_stats, want_flat = flatten(updates["batch_stats"]), flatten(want_stats)
    assert set(got_stats) == set(want_flat) and len(got_stats) == 2 * 7  # 7 ConvModules, mean and var each
    old = flatten(conv.batch_stats)
    for k in want_flat:
        assert maxdiff(old[k], want_flat[k]) > 1e-3, k  # the statistics did move
        assert rel(got_stats[k], want_flat[k]) < 3.5e-7, k  # measured 1.1e-7


def test_out_size_resizes_like_encode_decode():
    neck, head = torch_modules()
    xs = inputs("odd", 2)
    model = flax_model()
    conv = converted(model, segmentor_state(neck, head), xs)
    got = np.asarray(_apply(model)(conv.variables, xs, out_size=(240, 328)))
    _, _, _, want = torch64(neck, head, xs)
    want = nhwc(F.interpolate(want, size=(240, 328), mode="bilinear", align_corners=False))
    assert got.shape == (2, 240, 328, CLASSES)
    assert rel(got, want) < 1.8e-6  # measured 5.8e-7


def test_dropout_drops_whole_channels_at_the_rate():
    """``Dropout2d(0.1)``: per image and channel all pixels kept (x 1/0.9) or all zeroed."""
    neck, head = torch_modules()
    xs = inputs("odd", 4)
    model = flax_model()
    conv = converted(model, segmentor_state(neck, head), xs)

    def features(deterministic, seed):
        _, state = model.apply(conv.variables, xs, train=True, deterministic=deterministic,
                               rngs={"dropout": jax.random.PRNGKey(seed)},
                               mutable=["batch_stats", "intermediates"], capture_intermediates=True)
        return np.asarray(state["intermediates"]["decode_head"]["dropout"]["__call__"][0])

    kept = features(True, 0)
    dropped = features(False, 0)
    assert not np.array_equal(dropped, features(False, 1))
    ratio = np.where(np.abs(kept) > 1e-6, dropped / np.where(kept == 0, 1, kept), np.nan).astype(np.float64)
    per_channel = np.nanmean(ratio, axis=(1, 2))  # (B, C)
    assert np.allclose(np.nanmax(ratio, axis=(1, 2)), np.nanmin(ratio, axis=(1, 2)), atol=1e-5)
    assert np.all(np.isclose(per_channel, 0.0) | np.isclose(per_channel, 1 / 0.9, rtol=1e-5))
    frac = float(np.isclose(per_channel, 0.0).mean())
    assert 0.03 < frac < 0.2, frac  # 256 channels at p = 0.1
    with pytest.raises(Exception, match="dropout"):  # training with dropout needs its rng
        model.apply(conv.variables, xs, train=True, mutable=["batch_stats"])


# ----------------------------------------------------------------------------------------------------- loss

def _labels(shape, classes, seed, ignore_frac=0.2):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, shape).astype(np.int64)
    labels[rng.random(shape) < ignore_frac] = 255
    return labels


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_cross_entropy_matches_mmseg_and_torch(avg_non_ignore):
    import_mmseg()
    from mmseg.models.losses import CrossEntropyLoss

    logits = rand((3, 17, 23, CLASSES), 30, scale=3.0)
    labels = _labels((3, 17, 23), CLASSES, 31)
    got = float(S.cross_entropy_loss(logits, labels, avg_non_ignore=avg_non_ignore))
    lt, yt = nchw(logits).double(), torch.from_numpy(labels)
    mm = float(CrossEntropyLoss(avg_non_ignore=avg_non_ignore)(lt, yt, ignore_index=255))
    assert abs(got - mm) < 2.5e-6 * abs(mm)  # measured 8.0e-7 (five seeds)
    plain = float(F.cross_entropy(lt, yt, ignore_index=255))  # averages over the non-ignored pixels
    if avg_non_ignore:
        assert abs(got - plain) < 2.5e-6 * plain
    else:  # mmseg's default divides by every pixel: ~20% of them are ignored here
        assert abs(got / plain - (labels != 255).mean()) < 1e-6
    all_ignored = np.full_like(labels, 255)
    assert float(S.cross_entropy_loss(logits, all_ignored, avg_non_ignore=avg_non_ignore)) == 0.0


@pytest.mark.parametrize("pyramid", sorted(PYRAMIDS))
def test_loss_and_gradients_match_mmseg_autograd(pyramid):
    """``FPNHead.loss_by_feat`` (logits resized to the label size, CrossEntropyLoss) in training mode, dropout
    off: the loss, its gradient w.r.t. the four inputs and w.r.t. every parameter (mapped through the
    converter) against PyTorch float64 autograd."""
    import_mmseg()
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    neck, head = torch_modules(dropout=0.0)
    b = 2
    xs = inputs(pyramid, b, seed=40)
    h0, w0 = PYRAMIDS[pyramid][0]
    labels = _labels((b, 8 * h0, 8 * w0), CLASSES, 41)  # the image size: the finest level is at stride 8
    model = flax_model(dropout=0.0)
    conv = converted(model, segmentor_state(neck, head), xs)

    def loss_fn(params, xs):
        logits, _ = model.apply({"params": params, "batch_stats": conv.batch_stats}, xs, train=True,
                                mutable=["batch_stats"])
        return S.decode_loss(logits, labels)

    loss, (g_params, g_xs) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(conv.params, xs)

    n, h, ts, logits = torch64(neck, head, xs, train=True, requires_grad=True)
    samples = []
    for lab in labels:
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.from_numpy(lab)[None])
        samples.append(s)
    want = h.loss_by_feat(logits, samples)["loss_ce"]
    want.backward()
    assert abs(float(loss) - float(want.detach())) < 1e-7 * float(want.detach())  # measured 3.0e-8
    for g, t in zip(g_xs, ts, strict=True):
        assert rel(np.asarray(g), nhwc(t.grad)) < 4e-6  # measured 1.3e-6
    grads = {f"neck.{k}": p.grad for k, p in n.named_parameters()}
    grads.update({f"decode_head.{k}": p.grad for k, p in h.named_parameters()})
    want_g = flatten(convert_seg_head({k: v.detach().numpy() for k, v in grads.items()}).params)
    got_g = flatten(g_params)
    assert set(got_g) == set(want_g) == set(flatten(conv.params))
    for k in want_g:
        assert rel(np.asarray(got_g[k]), want_g[k]) < 1.2e-5, k  # measured 4.0e-6


# ------------------------------------------------------------------------------------------------ converter

def test_converter_reports_every_tensor():
    neck, head = torch_modules()
    state = segmentor_state(neck, head)
    state["backbone.gamma"] = np.ones(3, np.float32)  # a segmentor checkpoint's other tensors
    model = flax_model()
    conv = converted(model, state, inputs("square", 1))
    assert conv.unused == ["backbone.gamma"]
    assert sorted(conv.skipped) == sorted(k for k in state if k.endswith("num_batches_tracked"))
    assert len(conv.skipped) == 7
    assert set(conv.origin.values()) | set(conv.skipped) | set(conv.unused) == set(state)
    assert conv.origin["params/decode_head/scale_heads_3_4/conv/kernel"] == "decode_head.scale_heads.3.4.conv.weight"
    assert conv.origin["batch_stats/decode_head/scale_heads_2_2/bn/var"] == \
        "decode_head.scale_heads.2.2.bn.running_var"
    with pytest.raises(WeightsError, match="no place"):
        convert_seg_head({**state, "decode_head.conv_seg.extra": np.zeros(1)})
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), [jnp.asarray(x) for x in
                                                                          inputs("square", 1)]))
    missing = {k: v for k, v in state.items() if not k.startswith("neck.fpn_convs.2.")}
    with pytest.raises(WeightsError, match="missing params/neck/fpn_convs_2/kernel"):
        convert_seg_head(missing, abstract)
    with pytest.raises(WeightsError, match="shape"):
        convert_seg_head(state, jax.eval_shape(lambda: flax_model(classes=CLASSES + 1).init(
            jax.random.PRNGKey(0), [jnp.asarray(x) for x in inputs("square", 1)])))


def test_official_configuration_converts():
    """fpn_vpd_sd1-5_512x512_gpu8x2.py's sizes (320/790/1430/1280 -> 256 -> 150 classes): every mmseg tensor
    finds its place and shape in ``SemanticFPN()``'s defaults (shapes only, at a 512x512 image's features)."""
    import_mmseg()
    from mmseg.models.decode_heads.fpn_head import FPNHead
    from mmseg.models.necks.fpn import FPN

    neck = FPN(list(S.VPD_SEG_IN_CHANNELS), 256, 4)
    head = FPNHead(feature_strides=[4, 8, 16, 32], in_channels=[256] * 4, in_index=[0, 1, 2, 3], channels=256,
                   dropout_ratio=0.1, num_classes=150, norm_cfg=dict(type="BN", requires_grad=True),
                   align_corners=False)
    feats = [jax.ShapeDtypeStruct((2, s, s, c), jnp.float32) for s, c in zip((64, 32, 16, 8), S.VPD_SEG_IN_CHANNELS)]
    model = S.SemanticFPN()
    abstract = jax.eval_shape(functools.partial(model.init, jax.random.PRNGKey(0)), feats)
    out = jax.eval_shape(lambda v, f: model.apply(v, f, out_size=(512, 512)), abstract, feats)
    assert out.shape == (2, 512, 512, 150)
    conv = convert_seg_head(segmentor_state(neck, head), abstract)
    n_params = sum(v.size for v in flatten(conv.params).values())
    assert n_params == sum(p.numel() for p in [*neck.parameters(), *head.parameters()])


def test_initialisers_follow_mmseg():
    """Same init rules as mmseg (after ``init_weights``): per-tensor std within 15% of the reference's."""
    import_mmseg()
    from mmseg.models.decode_heads.fpn_head import FPNHead
    from mmseg.models.necks.fpn import FPN

    neck = FPN(list(IN_CHANNELS), 256, 4)
    head = FPNHead(feature_strides=[4, 8, 16, 32], in_channels=[256] * 4, in_index=[0, 1, 2, 3], channels=256,
                   dropout_ratio=0.1, num_classes=150, norm_cfg=dict(type="BN", requires_grad=True),
                   align_corners=False)
    torch.manual_seed(5)
    neck.init_weights()
    head.init_weights()
    state = segmentor_state(neck, head)
    xs = [np.zeros((1, s, s, c), np.float32) for s, c in zip((8, 4, 2, 1), IN_CHANNELS)]
    model = S.SemanticFPN()
    ours = jax.jit(model.init)(jax.random.PRNGKey(0), xs)
    conv = convert_seg_head(state)
    want, got = flatten(conv.variables), flatten(ours)
    assert set(want) == set(got)
    for k, w in want.items():
        g = np.asarray(got[k])
        if np.std(w) == 0:
            assert np.array_equal(g, w), k  # zero biases, unit BN scales, (0, 1) running statistics
        else:
            assert abs(np.std(g) / np.std(w) - 1) < 0.15, (k, np.std(g), np.std(w))
