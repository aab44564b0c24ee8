"""Converting official and mmseg VPD checkpoints: every key accounted for, files, the CLI and the loader.

The tiny checkpoints come from ``reference.torch_vpd.TorchVPD``, whose UNet and VAE have SD-1.5's block structure, so
their key *names* are exactly those of the released SD-1.5 checkpoints (checked against an SD-1.5-sized
model built on PyTorch's meta device, which allocates nothing).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from reference.torch_vpd import TINY_HEAD, TINY_UNET, TINY_VAE, TorchHead, TorchTextAdapter, TorchVPD, vpd_config  # noqa: E402
from vpd_jax.models.vpd import VPDConfig  # noqa: E402
from vpd_jax.tools import convert as convert_tool  # noqa: E402
from vpd_jax.weights import diffusers as dw  # noqa: E402
from vpd_jax.weights import vpd_checkpoint as vc  # noqa: E402
from vpd_jax.weights.common import WeightsError, flatten  # noqa: E402
from vpd_jax.weights.loader import load_model  # noqa: E402

CONFIG = vpd_config(TINY_UNET, TINY_VAE, TINY_HEAD)
BN_STEPS = "BatchNorm step counter (only used when momentum is None)"


@pytest.fixture(scope="session")
def tiny():
    return TorchVPD(seed=10)


@pytest.fixture(scope="session")
def official_state(tiny):
    return tiny.official_state()


@pytest.fixture(scope="session")
def mmseg_state(tiny):
    return tiny.mmseg_state()


@pytest.fixture(scope="session")
def official_conv(official_state):
    return vc.convert_state_dict(official_state, CONFIG, what="tiny official")


def sd15_official_shapes() -> dict[str, tuple[int, ...]]:
    """Key names and shapes of a released official checkpoint (the ``VPDDepth`` of wl-zhao/VPD
    depth/models_depth/model.py), from SD-1.5-sized modules on PyTorch's 'meta' device."""
    sd15_unet = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                     cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    sd15_vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**sd15_unet)
        vae = diffusers.AutoencoderKL(**sd15_vae)
        head = TorchHead((320, 640, 1280, 1280), 1536, (32, 32, 32), 192)
        adapter = TorchTextAdapter(768)
    # zero-stride arrays: the right shapes at no memory cost
    shaped = lambda sd: {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in sd.items()}  # noqa: E731
    out = shaped(head.state_dict())
    out.update({"encoder.text_adapter." + k: v for k, v in shaped(adapter.state_dict()).items()})
    out["encoder.gamma"] = np.broadcast_to(np.float32(0), (768,))
    out["encoder.class_embeddings"] = np.broadcast_to(np.float32(0), (27, 768))
    ucfg = dw.UNetConfig.from_diffusers(sd15_unet)
    unet_sd = {k: v for k, v in shaped(unet.state_dict()).items() if not k.startswith(("conv_norm_out", "conv_out"))}
    ldm_unet = dw.diffusers_unet_to_ldm(unet_sd, ucfg)
    out.update({"encoder.unet.unet.diffusion_model." + k: v for k, v in ldm_unet.items()})
    vae_sd = shaped(vae.state_dict())
    out.update({"encoder.encoder_vq." + k: v for k, v in dw.diffusers_vae_to_ldm(vae_sd).items()})
    out.update({"encoder.encoder_vq." + k: v for k, v in vae_sd.items() if k.startswith("post_quant_conv.")})
    return {k: tuple(np.shape(v)) for k, v in out.items()}


# ------------------------------------------------------------------------------------- key coverage

def test_tiny_official_checkpoint_has_every_released_key(official_state):
    assert set(official_state) == set(sd15_official_shapes())
    for key in [  # spot checks of the keys of wl-zhao/VPD depth/models_depth/model.py
        "encoder.layer1.0.weight", "encoder.layer1.1.bias", "encoder.layer1.3.weight", "encoder.layer2.0.bias",
        "encoder.out_layer.0.weight", "encoder.out_layer.1.weight", "encoder.text_adapter.fc.2.bias",
        "decoder.deconv_layers.6.weight", "decoder.deconv_layers.7.num_batches_tracked",
        "decoder.conv_layers.1.running_var", "last_layer_depth.2.bias",
        "encoder.encoder_vq.encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.encoder_vq.encoder.down.2.downsample.conv.weight", "encoder.encoder_vq.encoder.mid.attn_1.q.weight",
        "encoder.encoder_vq.quant_conv.weight", "encoder.encoder_vq.post_quant_conv.weight",
        "encoder.unet.unet.diffusion_model.time_embed.2.weight",
        "encoder.unet.unet.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "encoder.unet.unet.diffusion_model.input_blocks.9.0.op.weight",
        "encoder.unet.unet.diffusion_model.output_blocks.2.1.conv.weight",
        "encoder.unet.unet.diffusion_model.output_blocks.5.2.conv.weight",
        "encoder.unet.unet.diffusion_model.output_blocks.11.1.proj_out.weight",
    ]:
        assert key in official_state, key
    assert not any(".decoder." in k and k.startswith("encoder.encoder_vq.") for k in official_state)
    assert not any(k.startswith("encoder.unet.unet.diffusion_model.out.") for k in official_state)
    assert official_state["encoder.class_embeddings"].shape[0] == 27


def test_official_converts_with_nothing_unmatched(official_state, official_conv):
    assert official_conv.format == "official"
    counts = vc.summarise_skipped(official_conv.skipped)
    assert counts == {BN_STEPS: 4, vc.SKIPPED_PREFIXES["encoder.encoder_vq.post_quant_conv."]: 2}
    n_used = len(official_state) - len(official_conv.skipped)
    n_leaves = len(flatten(official_conv.variables))
    # Every used tensor became exactly one leaf, except BN (4 tensors -> 2 params + 2 stats): one-to-one.
    assert n_used == n_leaves


def test_mmseg_converts_to_the_same_variables(mmseg_state, official_conv):
    assert any(k.startswith("backbone.encoder_vq.decoder.") for k in mmseg_state)
    assert "backbone.unet.unet.diffusion_model.out.2.weight" in mmseg_state
    assert mmseg_state["backbone.class_embeddings"].shape[0] == 28
    conv = vc.convert_state_dict(mmseg_state, CONFIG.replace(head_init="mmseg"), what="tiny mmseg")
    assert conv.format == "mmseg"
    counts = vc.summarise_skipped(conv.skipped)
    assert counts[vc.SKIPPED_PREFIXES["encoder.unet.unet.diffusion_model.out."]] == 4
    assert counts[vc.SKIPPED_PREFIXES["encoder.encoder_vq.decoder."]] == sum(
        k.startswith("backbone.encoder_vq.decoder.") for k in mmseg_state)
    assert counts[BN_STEPS] == 4
    a, b = flatten(conv.variables), flatten(official_conv.variables)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_mmseg_names_are_the_documented_renames(mmseg_state):
    expect = {"decode_head.conv1.0.weight", "decode_head.conv1.1.weight", "decode_head.conv1.3.bias",
              "decode_head.conv2.weight", "decode_head.conv_aggregation.0.weight",
              "decode_head.conv_aggregation.1.bias", "decode_head.decoder.deconv_layers.0.weight",
              "decode_head.decoder.deconv_layers.1.running_mean", "decode_head.decoder.conv_layers.0.weight",
              "decode_head.depth_pred_layer.2.weight", "backbone.text_adapter.fc.0.weight", "backbone.gamma",
              "backbone.encoder_vq.quant_conv.weight"}
    assert expect <= set(mmseg_state)
    assert not any(k.startswith(("encoder.", "decoder.", "last_layer_depth.")) for k in mmseg_state)


def test_architecture_is_inferred_when_no_config_is_given(official_state):
    named, _ = vc.to_official_names(official_state, "official")
    # A 32-wide context is not SD's: the head count must be given (one error otherwise).
    with pytest.raises(WeightsError, match="head counts cannot be read off the tensors"):
        vc.infer_config(named, "official")
    inferred = vc.infer_config(named, "official", heads=2)
    assert inferred.unet.block_out_channels == CONFIG.unet.block_out_channels
    # group counts cannot be read off tensors: SD's 32 is assumed
    assert inferred.vae == dataclasses.replace(CONFIG.vae, norm_num_groups=32)
    assert (inferred.text_dim, inferred.neck_features, inferred.deconv_filters, inferred.decoder_features) == (
        CONFIG.text_dim, CONFIG.neck_features, CONFIG.deconv_filters, CONFIG.decoder_features)


def test_sd15_sized_checkpoint_infers_the_default_config():
    shapes = sd15_official_shapes()
    assert shapes["decoder.deconv_layers.0.weight"] == (1536, 32, 2, 2)  # wl-zhao/VPD depth/models_depth/model.py
    assert shapes["encoder.out_layer.0.weight"] == (1536, 3520, 1, 1)
    state = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    assert vc.infer_config(state, "official") == VPDConfig()


# ------------------------------------------------------------------------------------------- failures

def test_stable_diffusion_checkpoint_is_not_a_vpd_checkpoint(official_state):
    sd = {"model.diffusion_model." + k[len("encoder.unet.unet.diffusion_model."):]: v
          for k, v in official_state.items() if k.startswith("encoder.unet.")}
    sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = np.ones(4, np.float32)
    with pytest.raises(WeightsError, match=r"neither an official VPD nor an mmseg.*cond_stage_model"):
        vc.convert_state_dict(sd, CONFIG)


@pytest.mark.parametrize("extra,named", [
    ("encoder.refine.0.weight", "encoder.refine.0.weight"),
    ("decoder.deconv_layers.9.weight", "decoder.deconv_layers.9.weight"),
    # inside the backbone the name is given relative to its prefix, which the message states
    ("encoder.unet.unet.diffusion_model.input_blocks.12.0.in_layers.0.weight", "input_blocks.12.0.in_layers.0.weight"),
    # a well-formed VAE name of a block the model does not have: reported at its converted place
    ("encoder.encoder_vq.encoder.down.0.block.5.conv1.weight", "vae/encoder/down_blocks_0/resnets_5/conv1"),
])
def test_unmatched_tensor_fails_by_name(official_state, extra, named):
    state = dict(official_state)
    state[extra] = np.zeros((4, 4, 3, 3), np.float32)
    with pytest.raises(WeightsError, match=named.replace(".", r"\.")):
        vc.convert_state_dict(state, CONFIG)


def test_segmentation_head_fails_by_name(mmseg_state):
    state = {k: v for k, v in mmseg_state.items() if not k.startswith("decode_head.depth_pred_layer.")}
    state["decode_head.conv_seg.weight"] = np.zeros((150, 16, 1, 1), np.float32)
    with pytest.raises(WeightsError) as err:
        vc.convert_state_dict(state, CONFIG)
    msg = str(err.value)
    assert "decode_head.conv_seg.weight" in msg and "decode_head.depth_pred_layer.0.weight" in msg


def test_missing_and_misshapen_tensors_fail_by_name(official_state):
    state = {k: v for k, v in official_state.items() if k != "encoder.gamma"}
    with pytest.raises(WeightsError, match=r"missing: encoder\.gamma"):
        vc.convert_state_dict(state, CONFIG)
    state = dict(official_state)
    state["last_layer_depth.0.weight"] = np.zeros((16, 16, 1, 1), np.float32)
    with pytest.raises(WeightsError, match=r"head/depth/conv_0/kernel"):
        vc.convert_state_dict(state, CONFIG)


def test_format_mismatch_is_reported(official_state):
    with pytest.raises(WeightsError, match="official checkpoint"):
        vc.convert_state_dict(official_state, CONFIG, fmt="mmseg")


# ---------------------------------------------------------------------------- files, CLI and the loader

@pytest.fixture(scope="session")
def checkpoint_files(tmp_path_factory, official_state, mmseg_state):
    root = tmp_path_factory.mktemp("vpd_ckpts")
    to_t = lambda sd: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}  # noqa: E731
    official = root / "vpd_depth_480x480.pth"
    torch.save({"model": to_t(official_state)}, official)
    mmseg = root / "vpd_sd_nyu.pth"
    torch.save({"meta": {"epoch": 1, "mmseg_version": "1.2.2"}, "state_dict": to_t(mmseg_state)}, mmseg)
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps(CONFIG.to_dict()))
    return root, official, mmseg, cfg


def _assert_same(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_cli_writes_a_loadable_checkpoint(checkpoint_files, official_conv, capsys):
    root, official, mmseg, cfg = checkpoint_files
    out = root / "converted"
    assert convert_tool.main([str(official), "--out", str(out), "--config", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert "official layout" in printed and "skipped 4 tensor(s)" in printed
    meta = json.loads((out / "config.json").read_text())
    assert meta["source"]["format"] == meta["source"]["class_rule"] == "official"
    loaded = load_model(out)
    assert loaded.config == CONFIG and loaded.model.config == CONFIG and loaded.kind == "converted"
    _assert_same(loaded.variables, official_conv.variables)
    assert loaded.class_embeddings.shape == (28, CONFIG.text_dim)
    # an existing checkpoint is never overwritten
    assert convert_tool.main([str(official), "--out", str(out), "--config", str(cfg)]) == 2


def test_loader_converts_pytorch_files_on_the_fly(checkpoint_files, official_conv):
    _, official, mmseg, _ = checkpoint_files
    for path, cfg in ((official, CONFIG), (mmseg, CONFIG.replace(head_init="mmseg"))):
        loaded = load_model(path, config=cfg, overrides={"remat": True})
        assert loaded.config == cfg.replace(remat=True) and loaded.kind == "pytorch"
        _assert_same(loaded.variables, official_conv.variables)


def test_cli_reports_a_foreign_checkpoint(checkpoint_files, capsys):
    root, *_ = checkpoint_files
    bad = root / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(4, 3, 7, 7), "fc.bias": torch.zeros(10)}}, bad)
    assert convert_tool.main([str(bad), "--out", str(root / "never")]) == 1
    err = capsys.readouterr().err
    assert "conv1.weight" in err and "fc.bias" in err
    assert not (root / "never").exists()


def test_cli_records_the_training_crop_for_inference(checkpoint_files, capsys):
    root, official, _, cfg = checkpoint_files
    out = root / "converted_512"
    assert convert_tool.main([str(official), "--out", str(out), "--config", str(cfg), "--crop", "512"]) == 0
    assert json.loads((out / "config.json").read_text())["crop"] == 512
    assert load_model(out).crop == 512  # predict.py / Predictor then slide 512 windows without --crop
    assert convert_tool.main([str(official), "--out", str(root / "never"), "--crop", "7"]) == 2
    assert "--crop 7" in capsys.readouterr().err


def test_an_interrupted_conversion_leaves_nothing_that_looks_finished(checkpoint_files, official_conv, monkeypatch,
                                                                       tmp_path):
    """The checkpoint is written into a hidden sibling folder and renamed when complete: a conversion killed
    while writing leaves no ``--out`` folder, and its leftovers are removed by the next attempt."""
    import orbax.checkpoint as ocp

    out = tmp_path / "converted"
    (tmp_path / ".converted.partial-999").mkdir()  # what a killed process left behind
    real_save = ocp.StandardCheckpointer.save

    def killed(self, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        vc.save_converted(official_conv, out)
    assert not out.exists() and not vc.is_converted_dir(out)
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", real_save)
    vc.save_converted(official_conv, out)
    assert vc.is_converted_dir(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(WeightsError, match="not an empty folder"):
        vc.save_converted(official_conv, tmp_path / "busy")
