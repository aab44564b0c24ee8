"""VPD's cross-attention maps (the segmentation variant's extra features) against the official aggregation.

Reference: diffusers' PyTorch ``UNet2DConditionModel`` (``reference.torch_vpd.TorchVPD`` at ``WIDE_UNET``: SD-1.5's
structure, levels 64 to 128 wide, 4 heads) with ``record_cross_attention``, the official ``ca_forward`` of
wl-zhao/VPD ``vpd/models.py`` as an attention processor on every ``attn2``; the recorded maps are then filed,
averaged and concatenated onto the feature taps by ``_official_maps`` / ``_official_concat`` below, written from
``AttentionStore`` and ``UNetWrapper`` of that file. fp32, t = 1, a context of 7 tokens. Bounds as the largest
error relative to the reference's largest magnitude, about 3x the measured one on the 2-core development CPU:
maps 1.5e-6 (measured 3.9e-7 to 5.5e-7), concatenated features 5e-6 (measured 1.3e-6 to 1.9e-6, the
features' own error, as in tests/test_backbone.py); the maps' rows sum to 1 within 3e-7 (measured 1.0e-7).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from reference import torch_vpd as R  # noqa: E402
from vpd_jax.models.unet import (  # noqa: E402
    ATTENTION_MAP_LEVELS,
    UNet2DConditionModel,
    UNetConfig,
    concat_attention_maps,
)
from vpd_jax.weights.diffusers import unet_params_from_torch  # noqa: E402

MAP_TOL = 1.5e-6
FEAT_TOL = 5e-6
TOKENS = 7
# (latent height, width, batch): square at batch 1 and 4 (XLA:CPU reduces differently from batch 4 on), and a
# non-square size whose level-1 grid (17x24) has an odd side.
CASES = [(32, 32, 1), (32, 32, 4), (34, 48, 2)]


def _rel(ours, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def _grids(h, w, n):
    """The UNet's level grids: each downsampler (3x3, stride 2, padding 1) halves a side, rounding up."""
    out = [(h, w)]
    while len(out) < n:
        out.append(((out[-1][0] + 1) // 2, (out[-1][1] + 1) // 2))
    return out


def _official_maps(records, latent_hw, n_levels):
    """wl-zhao/VPD ``vpd/models.py``: ``AttentionStore.forward`` then ``UNetWrapper.process_attn`` with the
    defaults VPD's segmentation uses (``base_size=512``, ``max_attn_size=None``,
    ``attn_selector='up_cross+down_cross'``), written for any latent size: ``{level: (B, C, h, w)}``.

    Official: the store is ``AttentionStore(base_size=base_size // 8)``, so ``max_size = (base_size // 8) // 2``,
    and it keeps a map when ``attn.shape[1] <= max_size ** 2``; ``process_attn`` files each kept map under
    ``size = int(sqrt(queries))`` among ``base_size // 32``, ``// 16``, ``// 8`` and rearranges it
    ``'b (h w) c -> b c h w'``; each grid's maps are ``torch.stack(...).mean(0)``. For a square image of
    ``base_size`` pixels (a square power-of-two latent) that is what runs here, asserted below; a non-square
    latent gets the same rule with the grids' (h, w) in place of the square roots.
    """
    grids = _grids(*latent_hw, n_levels)
    if latent_hw[0] == latent_hw[1] and latent_hw[0] & (latent_hw[0] - 1) == 0:
        base_size = 8 * latent_hw[0]
        max_size = (base_size // 8) // 2
        assert max_size ** 2 == grids[1][0] * grids[1][1]
        assert [base_size // 16, base_size // 32] == [grids[1][0], grids[2][0]]
    max_queries = grids[1][0] * grids[1][1]
    # AttentionStore.forward: key f"{place_in_unet}_cross", kept if small enough ("avoid memory overhead").
    step_store = {"down_cross": [], "mid_cross": [], "up_cross": []}
    for place, attn in records:
        if attn.shape[1] <= max_queries:
            step_store[f"{place}_cross"].append(attn)
    # UNetWrapper.process_attn.
    attns = {grids[1]: [], grids[2]: [], grids[0]: []}
    for k in "up_cross+down_cross".split("+"):
        for up_attn in step_store[k]:
            size = next(g for g in grids if g[0] * g[1] == up_attn.shape[1])
            attns[size].append(up_attn.reshape(up_attn.shape[0], size[0], size[1], -1).permute(0, 3, 1, 2))
    assert not attns[grids[0]]  # the latent-size level is never kept (the official attn64 is None)
    return {1: torch.stack(attns[grids[1]]).mean(0), 2: torch.stack(attns[grids[2]]).mean(0)}


def _official_concat(feats, maps):
    """``UNetWrapper.forward``: ``out_list`` is deepest-first, ``out_list[1]`` (1/32) gets ``attn16``,
    ``out_list[2]`` (1/16) ``attn32``, and the list is returned reversed. ``feats``: [o11, o7, o4, o1], NCHW."""
    out_list = list(feats[::-1])
    out_list[1] = torch.cat([out_list[1], maps[2]], dim=1)
    out_list[2] = torch.cat([out_list[2], maps[1]], dim=1)
    return out_list[::-1]


@pytest.fixture(scope="module")
def models():
    ref = R.TorchVPD(seed=40, unet=R.WIDE_UNET, vae=R.WIDE_VAE, head=R.WIDE_HEAD)
    records = R.record_cross_attention(ref.unet)
    module = UNet2DConditionModel(UNetConfig.from_diffusers(ref.unet_cfg))
    params = unet_params_from_torch({k: v.numpy().copy() for k, v in ref.unet.state_dict().items()})
    for k in ("conv_norm_out", "conv_out"):
        params.pop(k)
    fn = jax.jit(lambda p, x, c: module.apply({"params": p}, x, 1, c, method="features", attn_maps=True))
    return ref, records, module, params, fn


def _inputs(h, w, b, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w, 4)).astype(np.float32)
    ctx = rng.standard_normal((b, TOKENS, R.WIDE_UNET["cross_attention_dim"])).astype(np.float32)
    return x, ctx


@pytest.fixture(scope="module")
def results(models):
    """Ours and the reference for every case, computed once."""
    ref, records, _, params, fn = models
    out = {}
    for h, w, b in CASES:
        x, ctx = _inputs(h, w, b, seed=h + w + b)
        records.clear()
        with torch.no_grad():
            feats = ref.features(R.nchw(x), torch.from_numpy(ctx))
        official = _official_maps(records, (h, w), len(ref.unet_cfg["block_out_channels"]))
        want = [R.nhwc(f) for f in _official_concat(feats, official)]
        got_feats, got_maps = fn(params, x, ctx)
        out[(h, w, b)] = dict(x=x, ctx=ctx, official={k: R.nhwc(v) for k, v in official.items()}, want=want,
                              plain=[R.nhwc(f) for f in feats], feats=got_feats, maps=got_maps)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_maps_match_the_official_aggregation(results, case):
    r = results[case]
    h, w, b = case
    grids = _grids(h, w, 4)
    assert ATTENTION_MAP_LEVELS == (1, 2)
    assert r["maps"][0] is None and r["maps"][3] is None
    for level in (1, 2):
        m = r["maps"][level]
        assert m.shape == (b, *grids[level], TOKENS) and m.dtype == jnp.float32
        err = _rel(m, r["official"][level])
        assert err < MAP_TOL, f"level {level}: relative error {err:.2e}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_concatenated_features_match_the_official(results, case):
    r = results[case]
    got = concat_attention_maps(r["feats"], r["maps"])
    widths = [c for c in R.WIDE_UNET["block_out_channels"]]
    assert [g.shape[-1] for g in got] == [widths[0], widths[1] + TOKENS, widths[2] + TOKENS, widths[3]]
    for level, (ours, want) in enumerate(zip(got, r["want"])):
        assert ours.shape == want.shape
        err = _rel(ours, want)
        assert err < FEAT_TOL, f"level {level}: relative error {err:.2e}"


def test_maps_sum_to_one_over_tokens(results):
    for r in results.values():
        for level in (1, 2):
            s = np.asarray(r["maps"][level], np.float64).sum(-1)
            np.testing.assert_allclose(s, 1.0, rtol=0, atol=3e-7)


def test_features_unchanged_when_maps_are_requested(models, results):
    """The layers that record a map compute their output as before: the features are bit for bit the same."""
    _, _, module, params, _ = models
    plain = jax.jit(lambda p, x, c: module.apply({"params": p}, x, 1, c, method="features"))
    for r in results.values():
        for a, b in zip(plain(params, r["x"], r["ctx"]), r["feats"]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------- gradients, remat, bad input

# Three levels, cross-attention everywhere: small enough for backward compiles, with maps at levels 1 and 2.
SMALL = UNetConfig(block_out_channels=(32, 32, 32), down_block_types=("CrossAttnDownBlock2D",) * 3,
                   up_block_types=("CrossAttnUpBlock2D",) * 3, layers_per_block=1, attention_head_dim=2,
                   cross_attention_dim=16)


def _small_params(module, x, ctx):
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, 1, ctx))["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.2).astype(np.float32), shapes)


def _small_inputs(seed, b=2, h=12, w=8):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((b, h, w, 4)).astype(np.float32), rng.standard_normal((b, 5, 16)).astype(np.float32)


@pytest.mark.parametrize("remat", [False, True])
def test_no_gradient_through_the_maps(remat):
    module = UNet2DConditionModel(SMALL, remat=remat, remat_policy="nothing_saveable" if remat else None)
    x, ctx = _small_inputs(1)
    params = _small_params(module, x, ctx)
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal(s).astype(np.float32) for s in [(2, 6, 4, 5), (2, 3, 2, 5)]]

    def maps_loss(p, c):
        _, maps = module.apply({"params": p}, x, 1, c, method="features", attn_maps=True)
        return jnp.sum(maps[1] * weights[0]) + jnp.sum(maps[2] * weights[1])

    gp, gc = jax.jit(jax.grad(maps_loss, argnums=(0, 1)))(params, ctx)
    assert not any(np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(gp))
    assert not np.any(np.asarray(gc))


def test_concatenated_maps_add_no_gradient():
    """Through the concatenated taps, the gradient is that of the features alone (the map channels add none).
    The two computations compile differently: measured 2.5e-7 apart relative to the largest gradient entry."""
    module = UNet2DConditionModel(SMALL)
    x, ctx = _small_inputs(2)
    params = _small_params(module, x, ctx)

    def loss(p, maps):
        feats = module.apply({"params": p}, x, 1, ctx, method="features", attn_maps=maps)
        feats = concat_attention_maps(*feats) if maps else feats
        return sum(jnp.mean(f[..., :32] ** 2) + jnp.mean(f[..., 32:]) if f.shape[-1] > 32 else jnp.mean(f ** 2)
                   for f in feats)

    g_maps = jax.tree_util.tree_leaves(jax.jit(jax.grad(lambda p: loss(p, True)))(params))
    g_plain = jax.tree_util.tree_leaves(jax.jit(jax.grad(lambda p: loss(p, False)))(params))
    scale = max(float(np.max(np.abs(g))) for g in g_plain)
    err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(g_maps, g_plain)) / scale
    assert err < 8e-7, err


def test_remat_gives_the_same_maps():
    module = UNet2DConditionModel(SMALL)
    x, ctx = _small_inputs(3, b=1, h=8, w=8)
    params = _small_params(module, x, ctx)
    run = lambda m: jax.jit(lambda p: m.apply({"params": p}, x, 1, ctx, method="features", attn_maps=True))  # noqa: E731
    a = run(module)(params)
    b = run(module.clone(remat=True))(params)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_levels_without_cross_attention_and_mismatched_maps_are_refused():
    # Level 2 is a plain DownBlock2D / UpBlock2D: it has no map to give.
    cfg = UNetConfig(block_out_channels=(32, 32, 32), down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2, layers_per_block=1,
                     attention_head_dim=2, cross_attention_dim=16)
    module = UNet2DConditionModel(cfg)
    x, ctx = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 5, 16))
    params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, 1, ctx))["params"]
    jax.eval_shape(lambda p: module.apply({"params": p}, x, 1, ctx, method="features"), params)  # fine without
    with pytest.raises(ValueError, match="level 2 .* no cross-attention"):
        jax.eval_shape(lambda p: module.apply({"params": p}, x, 1, ctx, method="features", attn_maps=True), params)
    feats = [jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 4, 4, 3))]
    with pytest.raises(ValueError, match="map of shape"):
        concat_attention_maps(feats, [None, jnp.zeros((1, 8, 8, 2))])
    with pytest.raises(ValueError, match="2 feature maps but 1"):
        concat_attention_maps(feats, [None])
    out = concat_attention_maps(feats, [None, jnp.ones((1, 4, 4, 2))])
    assert out[0] is feats[0] and out[1].shape == (1, 4, 4, 5)
