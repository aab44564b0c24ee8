"""The SD UNet and VAE encoder against diffusers' PyTorch models, through every weight format we read.

Reference: diffusers' PyTorch ``UNet2DConditionModel`` / ``AutoencoderKL`` (PyPI), tiny random weights
written by their own ``save_pretrained``. Bounds, fp32, as the largest error relative to the reference's largest
magnitude (about 3x what is measured on the 2-core development CPU): UNet output and feature maps 5e-6 (measured
1.3-1.9e-6 and 1.2-1.7e-6), VAE latents 8e-6 (measured 2.1-2.6e-6). diffusers' own Flax UNet, at 7.3-7.8e-5 on
the same weights (its GroupNorm eps and tanh GELU), fails them: the test says so.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()

from reference import torch_vpd as R  # noqa: E402
from vpd_jax.models.unet import UNetConfig  # noqa: E402
from vpd_jax.weights import diffusers as dw  # noqa: E402
from vpd_jax.weights.common import WeightsError, flatten  # noqa: E402

UNET_TOL = 5e-6
VAE_TOL = 8e-6


def _rel(ours, ref) -> float:
    """Largest error relative to the reference's largest magnitude."""
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))

# 3 levels, cross-attention and plain blocks mixed, 2 heads, 2 layers per block; every level at least 64 wide,
# so each of the 32 norm groups holds more than one channel and every tensor moves the output.
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 64, 128), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2, cross_attention_dim=24, norm_num_groups=32,
)
# SD 2.x style: linear projections, per-block head counts.
TINY_UNET_V2 = dict(TINY_UNET, use_linear_projection=True, attention_head_dim=(2, 4, 4))
TINY_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(64, 64, 128), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32,
)
LATENTS = [(16, 16), (16, 24), (15, 11)]  # square, non-square, not a multiple of 8


def _randomize(model, seed):
    """Non-trivial weights everywhere (diffusers zero-inits some projections)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_unet_dir(tmp_path_factory):
    """A pipeline-root folder: unet/ (safetensors), unet_bin/ (.bin), unet_flax/ (msgpack), vae/."""
    root = tmp_path_factory.mktemp("sd_tiny")
    torch.manual_seed(0)
    pt = _randomize(diffusers.UNet2DConditionModel(**TINY_UNET), 1)
    pt.save_pretrained(root / "unet")
    pt.save_pretrained(root / "unet_bin", safe_serialization=False)
    fx, fxp = diffusers.FlaxUNet2DConditionModel.from_pretrained(root / "unet_bin", from_pt=True)
    fx.save_pretrained(root / "unet_flax", params=fxp)
    vae = _randomize(diffusers.AutoencoderKL(**TINY_VAE), 2)
    vae.save_pretrained(root / "vae")
    return root, pt, vae


def test_diffusers_flax_unet_fails_the_bound(tiny_unet_dir):
    """The bound separates a PyTorch-exact port from diffusers' own Flax UNet (measured 7.3e-5 relative)."""
    root, pt, _ = tiny_unet_dir
    fx, fxp = diffusers.FlaxUNet2DConditionModel.from_pretrained(root / "unet_flax")
    x, t, ctx = _inputs(16, 16)
    ref, _ = _torch_unet(pt, x, t, ctx)
    out = fx.apply({"params": fxp}, jnp.asarray(x.transpose(0, 3, 1, 2)), jnp.asarray(t), jnp.asarray(ctx)).sample
    assert _rel(np.asarray(out).transpose(0, 2, 3, 1), ref) > 5 * UNET_TOL


def _inputs(h, w, seed=0, batch=2, ctx_dim=24):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, h, w, 4)).astype(np.float32)
    t = np.array([1, 500][:batch], np.int64)
    ctx = rng.standard_normal((batch, 3, ctx_dim)).astype(np.float32)
    return x, t, ctx


def _torch_unet(pt, x, t, ctx, hooks=False):
    feats = {}
    handles = []
    if hooks:
        for i, blk in enumerate(pt.up_blocks):
            if blk.upsamplers is not None:
                mod = blk.attentions[1] if getattr(blk, "attentions", None) is not None else blk.resnets[1]
            else:
                mod = blk
            handles.append(mod.register_forward_hook(
                lambda m, a, out, i=i: feats.__setitem__(i, (out[0] if isinstance(out, tuple) else out))))
    with torch.no_grad():
        out = pt(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    for h in handles:
        h.remove()
    to_nhwc = lambda a: a.permute(0, 2, 3, 1).numpy()  # noqa: E731
    return to_nhwc(out), [to_nhwc(feats[i]) for i in sorted(feats)]


@pytest.fixture(scope="session")
def loaded_unets(tiny_unet_dir):
    root, _, _ = tiny_unet_dir
    return {fmt: dw.load_unet(str(root / sub)) for fmt, sub in
            (("safetensors", "unet"), ("bin", "unet_bin"), ("msgpack", "unet_flax"))}


@pytest.fixture(scope="session")
def unet_fns(loaded_unets):
    """One jitted forward and one jitted features function for every format (same module, same shapes):
    compiled once per input shape for the whole session."""
    module = loaded_unets["safetensors"][0]
    assert all(m == module for m, _ in loaded_unets.values())
    forward = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
    features = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c, method="features"))
    return forward, features


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "msgpack"])
@pytest.mark.parametrize("hw", LATENTS)
def test_unet_matches_pytorch(tiny_unet_dir, loaded_unets, unet_fns, fmt, hw):
    _, pt, _ = tiny_unet_dir
    _, params = loaded_unets[fmt]
    x, t, ctx = _inputs(*hw)
    ref, _ = _torch_unet(pt, x, t, ctx)
    ours = unet_fns[0](params, x, t, ctx)
    assert ours.shape == ref.shape
    err = _rel(ours, ref)
    assert err < UNET_TOL, f"{fmt} {hw}: relative error {err:.2e}"


def test_unet_formats_load_identical_params(loaded_unets):
    a = flatten(loaded_unets["safetensors"][1])
    for fmt in ("bin", "msgpack"):
        b = flatten(loaded_unets[fmt][1])
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=f"{fmt}: {k}")


@pytest.mark.parametrize("hw", [(16, 16), (15, 11)])
def test_unet_features_match_pytorch_hooks(tiny_unet_dir, loaded_unets, unet_fns, hw):
    _, pt, _ = tiny_unet_dir
    _, params = loaded_unets["safetensors"]
    x, t, ctx = _inputs(*hw, seed=3)
    _, ref_feats = _torch_unet(pt, x, t, ctx, hooks=True)
    feats = unet_fns[1](params, x, t, ctx)
    assert len(feats) == 3
    # (o_final, ..., o_first): ours is deepest-last, hooks were collected block 0 first.
    for ours, ref in zip(feats, ref_feats[::-1]):
        assert ours.shape == ref.shape
        assert _rel(ours, ref) < UNET_TOL


def test_features_skip_the_output_head(loaded_unets):
    module, params = loaded_unets["safetensors"]
    no_head = {k: v for k, v in params.items() if k not in ("conv_norm_out", "conv_out")}
    x, t, ctx = _inputs(16, 16)
    # Tracing is enough: a missing conv_out would fail while building the computation.
    feats = jax.eval_shape(lambda p: module.apply({"params": p}, x, t, ctx, method="features"), no_head)
    assert feats[0].shape == (2, 16, 16, 64)


def test_unet_sd2_style_linear_projection(tmp_path):
    torch.manual_seed(0)
    pt = _randomize(diffusers.UNet2DConditionModel(**TINY_UNET_V2), 5)
    pt.save_pretrained(tmp_path / "unet")
    module, params = dw.load_unet(str(tmp_path))
    assert module.config.use_linear_projection and module.config.heads == (2, 4, 4)
    x, t, ctx = _inputs(16, 24, seed=4)
    ref, _ = _torch_unet(pt, x, t, ctx)
    err = _rel(jax.jit(module.apply)({"params": params}, x, t, ctx), ref)
    assert err < UNET_TOL


def test_vae_encoder_matches_pytorch(tiny_unet_dir):
    root, _, vae = tiny_unet_dir
    module, params = dw.load_vae_encoder(str(root))  # the pipeline root: finds vae/
    rng = np.random.default_rng(0)
    for h, w in [(32, 48), (30, 22)]:  # non-square, and odd sizes through the asymmetric padding
        img = rng.uniform(-1, 1, (2, h, w, 3)).astype(np.float32)
        with torch.no_grad():
            ref = vae.encode(torch.from_numpy(img).permute(0, 3, 1, 2)).latent_dist.mode().permute(0, 2, 3, 1)
        ours = jax.jit(module.apply)({"params": params}, img)
        assert ours.shape == tuple(ref.shape)
        assert _rel(ours, ref.numpy()) < VAE_TOL, (h, w)


def _ldm_file(tmp_path, pt_unet, vae, suffix, extra=None):
    """A CompVis single file whose tensors are placed by diffusers' own ldm -> diffusers converters (never by
    our key tables, so a swapped pair of same-shaped tensors in them fails the comparison)."""
    state = {}
    unet_sd = {k: v.numpy() for k, v in pt_unet.state_dict().items()}
    head = {f"out.{i}.{w}": unet_sd.pop(f"{n}.{w}") for i, n in ((0, "conv_norm_out"), (2, "conv_out"))
            for w in ("weight", "bias")}
    for k, v in {**R.ldm_unet_state(unet_sd, dict(pt_unet.config)), **head}.items():
        state[dw.LDM_UNET_PREFIX + k] = v
    vae_sd = {k: v.numpy() for k, v in vae.state_dict().items()}
    for k, v in R.ldm_vae_encoder_state(vae_sd, dict(vae.config)).items():
        state[dw.LDM_VAE_PREFIX + k] = v
    state.update(extra or {})
    path = tmp_path / f"sd{suffix}"
    if suffix == ".safetensors":
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                    "global_step": 1}, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_compvis_single_file_loads_same_params(tiny_unet_dir, loaded_unets, tmp_path, suffix):
    root, pt, vae = tiny_unet_dir
    # Other components of a full SD checkpoint are skipped knowingly.
    extra = {"cond_stage_model.transformer.x.weight": np.zeros((2, 2), np.float32),
             "alphas_cumprod": np.zeros((10,), np.float32)}
    path = _ldm_file(tmp_path, pt, vae, suffix, extra)
    ucfg = UNetConfig.from_diffusers(pt.config)
    _, params = dw.load_unet(str(path), config=ucfg)
    ref = flatten(loaded_unets["safetensors"][1])
    got = flatten(params)
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    _, vparams = dw.load_vae_encoder(str(path))  # VAE architecture read off the tensors
    _, vref = dw.load_vae_encoder(str(root / "vae"))
    for k, v in flatten(vref).items():
        np.testing.assert_array_equal(flatten(vparams)[k], v, err_msg=k)


def test_compvis_architecture_inferred_for_sd_like_names(tiny_unet_dir, tmp_path):
    _, pt, vae = tiny_unet_dir
    path = _ldm_file(tmp_path, pt, vae, ".safetensors")
    from vpd_jax.weights.common import read_tensors
    sub = {k[len(dw.LDM_UNET_PREFIX):]: v for k, v in read_tensors(path).items() if k.startswith(dw.LDM_UNET_PREFIX)}
    cfg = dw.infer_ldm_unet_config(sub, "x", heads=2)
    want = UNetConfig.from_diffusers(pt.config)
    for f in ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
              "cross_attention_dim", "use_linear_projection", "in_channels", "out_channels", "attention_head_dim"):
        assert getattr(cfg, f) == getattr(want, f), f


def test_sd15_ldm_key_map_is_the_documented_one():
    m = {s: d for s, d, _ in dw._unet_module_map(UNetConfig())}
    assert m["input_blocks.3.0.op"] == "down_blocks.0.downsamplers.0.conv"
    assert m["input_blocks.11.0"] == "down_blocks.3.resnets.1"
    assert m["output_blocks.2.1.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert m["output_blocks.5.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert m["output_blocks.8.2.conv"] == "up_blocks.2.upsamplers.0.conv"
    assert m["output_blocks.11.1"] == "up_blocks.3.attentions.2"
    assert m["middle_block.1"] == "mid_block.attentions.0"
    assert not any(s.startswith("output_blocks.11.2") for s in m)


# ---------------------------------------------------------------------------------------- bad input

def test_folder_without_weights(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="no weight file found"):
        dw.load_unet(str(tmp_path))


def test_truncated_safetensors(tiny_unet_dir, tmp_path):
    root, _, _ = tiny_unet_dir
    (tmp_path / "unet").mkdir()
    data = (root / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "unet" / "config.json").write_text((root / "unet" / "config.json").read_text())
    with pytest.raises(WeightsError, match="safetensors"):
        dw.load_unet(str(tmp_path))


def test_checkpoint_of_another_architecture(tiny_unet_dir, tmp_path):
    root, _, _ = tiny_unet_dir
    # The tiny UNet's weights under the SD 2.x-style config: every projection has the wrong rank.
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(
        (root / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    import json
    (tmp_path / "unet" / "config.json").write_text(json.dumps(dict(TINY_UNET, block_out_channels=[32, 64, 128])))
    with pytest.raises(WeightsError, match="shape mismatch"):
        dw.load_unet(str(tmp_path))
    # A ResNet classifier's state dict is neither CompVis nor diffusers.
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, tmp_path / "resnet.pth")
    with pytest.raises(WeightsError, match="neither a CompVis checkpoint"):
        dw.load_unet(str(tmp_path / "resnet.pth"))
    # A CompVis file whose UNet has blocks this architecture does not.
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
                               "model.diffusion_model.bogus.weight": torch.zeros(3)}}, tmp_path / "odd.ckpt")
    with pytest.raises(WeightsError, match="bogus"):
        dw.load_unet(str(tmp_path / "odd.ckpt"), config=UNetConfig.from_diffusers(TINY_UNET))


class _Evil:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path("/tmp/vpd_jax_pwned"),))


def test_pickle_needing_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": _Evil()}}, path)
    pathlib.Path("/tmp/vpd_jax_pwned").unlink(missing_ok=True)
    with pytest.raises(WeightsError, match="refused to unpickle"):
        dw.load_unet(str(path))
    assert not pathlib.Path("/tmp/vpd_jax_pwned").exists()


def test_hub_id_offline_gives_one_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match="Hugging Face hub"):
        dw.load_unet("runwayml/stable-diffusion-v1-5")


def test_bf16_compute_over_fp32_params(loaded_unets, unet_fns):
    module, params = loaded_unets["safetensors"]
    x, t, ctx = _inputs(16, 16)
    ref = unet_fns[0](params, x, t, ctx)
    bf = module.clone(dtype=jnp.bfloat16)
    out = jax.jit(bf.apply)({"params": params}, x, t, ctx)
    assert out.dtype == jnp.bfloat16
    rel = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    assert rel < 0.05


def test_remat_gives_same_gradients():
    # A two-level UNet keeps the two backward compiles short; remat wraps every ResNet and Transformer block.
    from vpd_jax.models.unet import UNet2DConditionModel
    cfg = UNetConfig(block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
                     cross_attention_dim=24)
    module = UNet2DConditionModel(cfg)
    x, t, ctx = _inputs(8, 8, batch=1)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, t, ctx))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.1).astype(np.float32), shapes)

    def loss(m):
        return lambda p: jnp.mean(m.apply({"params": p}, x, t, ctx, method="features")[0] ** 2)

    g0 = jax.jit(jax.grad(loss(module)))(params)
    g1 = jax.jit(jax.grad(loss(module.clone(remat=True, remat_policy="nothing_saveable"))))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_cudnn_attention_matches_einsum_on_gpu():
    from vpd_jax.models.layers import attention
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 4096, 8, 40)), jnp.bfloat16) for _ in range(3))
    ref = attention(q, k, v, scale=40 ** -0.5, impl="einsum").astype(jnp.float32)
    out = jax.jit(lambda a, b, c: attention(a, b, c, scale=40 ** -0.5, impl="cudnn"))(q, k, v).astype(jnp.float32)
    assert float(jnp.max(jnp.abs(out - ref))) < 2e-2
    # One key (VPD's cross-attention): cuDNN refuses a length-1 key sequence, so this runs only via the shortcut.
    one = jax.jit(lambda a, b, c: attention(a, b, c, scale=40 ** -0.5, impl="cudnn"))(q, k[:, :1], v[:, :1])
    np.testing.assert_array_equal(np.asarray(one, np.float32),
                                  np.broadcast_to(np.asarray(v[:, :1], np.float32), q.shape))
    # Head dim 160 (SD-1.5's 1280-wide levels): cuDNN refuses it, "cudnn_or_xla" (the GPU default) runs XLA's.
    q, k, v = (jnp.asarray(rng.standard_normal((2, 256, 8, 160)), jnp.bfloat16) for _ in range(3))
    with pytest.raises((NotImplementedError, ValueError)):
        attention(q, k, v, scale=160 ** -0.5, impl="cudnn")
    np.testing.assert_array_equal(np.asarray(attention(q, k, v, scale=160 ** -0.5, impl="cudnn_or_xla"), np.float32),
                                  np.asarray(attention(q, k, v, scale=160 ** -0.5, impl="xla"), np.float32))


def test_attention_implementations_agree_on_cpu():
    from vpd_jax.models.layers import attention
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 50, 2, 8)).astype(np.float32) for _ in range(3))
    a = attention(q, k, v, scale=8 ** -0.5, impl="einsum")
    b = attention(q, k, v, scale=8 ** -0.5, impl="xla")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # No cuDNN on a CPU host: "cudnn_or_xla" is XLA's attention, bit for bit; "cudnn" itself fails loudly.
    c = attention(q, k, v, scale=8 ** -0.5, impl="cudnn_or_xla")
    np.testing.assert_array_equal(np.asarray(c), np.asarray(b))
    with pytest.raises(RuntimeError):
        attention(q, k, v, scale=8 ** -0.5, impl="cudnn")
    with pytest.raises(ValueError, match="not one of"):
        attention(q, k, v, scale=1.0, impl="flash")


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_attention_over_one_key_is_that_value_exactly(dtype):
    """VPD's one-token context: softmax over one key is exactly 1, so the shortcut equals the formula."""
    from vpd_jax.models.layers import attention
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 30, 2, 8)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((2, 1, 2, 8)), dtype) for _ in range(2))
    want = np.broadcast_to(np.asarray(v, np.float32), (2, 30, 2, 8))  # the formula: probs == 1 exactly
    for impl in (None, "einsum", "xla"):
        out = attention(q, k, v, scale=8 ** -0.5, impl=impl)
        assert out.dtype == q.dtype and out.shape == (2, 30, 2, 8)
        np.testing.assert_array_equal(np.asarray(out, np.float32), want)
    # Gradients: none reach q or k (d softmax / d logit of a single entry is 0); v gets the sum over queries.
    gq, gk, gv = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, scale=1.0).astype(jnp.float32) ** 2),
                          argnums=(0, 1, 2))(q, k, v)
    assert not np.any(np.asarray(gq, np.float32)) and not np.any(np.asarray(gk, np.float32))
    np.testing.assert_allclose(np.asarray(gv, np.float32), 60 * np.asarray(v, np.float32),
                               rtol=1e-6 if dtype == np.float32 else 5e-2)  # bf16: a 30-term bf16 sum


def test_compvis_unet_of_unknown_head_count_needs_it_given(tiny_unet_dir, loaded_unets, tmp_path):
    """A 24-wide context is neither SD 1.x's nor SD 2.x's: one error asks for the head count; with it, the file
    loads the same parameters as the diffusers folder."""
    _, pt, vae = tiny_unet_dir
    path = _ldm_file(tmp_path, pt, vae, ".safetensors")
    with pytest.raises(WeightsError, match=r"head counts cannot be read off the tensors.*context width of 24"):
        dw.load_unet(str(path))
    with pytest.raises(WeightsError, match="do not divide"):
        dw.load_unet(str(path), heads=5)
    _, params = dw.load_unet(str(path), heads=2)
    ref = flatten(loaded_unets["safetensors"][1])
    got = flatten(params)
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
