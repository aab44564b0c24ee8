"""The whole VPDSeg against a PyTorch assembly of VPD's segmentation network, through our converter of the
released official segmentation checkpoint.

Reference: ``reference.torch_vpd_seg.TorchVPDSeg``: diffusers' PyTorch ``AutoencoderKL`` and
``UNet2DConditionModel`` (SD-1.5's block structure, every level at least 64 wide: ``WIDE_UNET``, ``WIDE_VAE``),
the official cross-attention maps (the official ``ca_forward`` as ``attn2`` processor, aggregated as wl-zhao/VPD
``vpd/models.py`` does), the official text adapter, mmsegmentation's own ``FPN`` and ``FPNHead`` (64 channels,
BN for SyncBN, evaluation mode), 7 classes, random weights. Its state dict is written in the released
checkpoint's layout (``official_state``: ``sd_model`` buffers and the UNet's ``out`` included) and converted by
``vpd_jax.weights.vpd_seg_checkpoint``. fp32, evaluation mode.

Logit errors relative to the reference's largest logit (16.6-20.8), measured on the 2-core development CPU, for
64x64 at batch 1, 64x64 at batch 4, 50x90 (padded to 64x128) at batch 2: against PyTorch in float64 3.1e-6,
3.5e-6, 4.1e-6; against PyTorch in float32 3.4e-6, 4.4e-6, 4.5e-6; for context, PyTorch's own float32 run is
2.4e-6, 2.2e-6, 3.0e-6 from its float64 run. Bound 1.4e-5, about 3x the largest. Labels (argmax over classes)
of the CLI-converted checkpoint on four 64x64 images: 0 of 16,384 pixels differ from the PyTorch float32
network's (2 pixels are ties within the allowance). About 35 s with a warm compile cache (65 s cold).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("mmseg")

from reference import torch_vpd_seg as RS  # noqa: E402
from reference.torch_vpd import images  # noqa: E402
from vpd_jax.models.vpd_seg import VPDSeg, abstract_variables  # noqa: E402
from vpd_jax.tools import convert as convert_tool  # noqa: E402
from vpd_jax.weights import vpd_checkpoint as vc  # noqa: E402
from vpd_jax.weights import vpd_seg_checkpoint as vsc  # noqa: E402
from vpd_jax.weights.common import WeightsError, flatten  # noqa: E402
from vpd_jax.weights.loader import load_model, load_seg_model  # noqa: E402

LOGIT_TOL = 1.4e-5
CLASSES = 7
HEADS = RS.WIDE_UNET["attention_head_dim"]  # 4 heads: a 64-wide context is not SD's, so the count is given
# (batch, height, width): 64x64 gives an 8x8 latent, so the maps come from the 4x4 and 2x2 grids; 50x90 pads to
# 64x128 (an 8x16 latent) and crops the logits back.
CASES = [(1, 64, 64), (4, 64, 64), (2, 50, 90)]


def _rel(ours, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def ref():
    return RS.TorchVPDSeg(seed=50, num_classes=CLASSES, channels=64)


@pytest.fixture(scope="module")
def state(ref):
    return ref.official_state()


@pytest.fixture(scope="module")
def conv(state):
    return vsc.convert_state_dict(state, heads=HEADS, what="tiny official segmentation")


@pytest.fixture(scope="module")
def apply_fn(conv):
    model = VPDSeg(conv.config)
    return jax.jit(lambda v, x: model.apply(v, x))


# ------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_logits_match_the_pytorch_assembly(ref, conv, apply_fn, case):
    b, h, w = case
    img = images((b, h, w, 3), seed=h + w + b)
    got = np.asarray(apply_fn(conv.variables, img)).transpose(0, 3, 1, 2)
    want = ref(img)
    exact = ref.double()(img)
    assert got.shape == want.shape == (b, CLASSES, h, w)
    assert len(np.unique(exact.argmax(1))) >= 3  # not a constant map
    err64, err32, torch32 = _rel(got, exact), _rel(got, want), _rel(want, exact)
    assert err64 < LOGIT_TOL, f"against float64 PyTorch: {err64:.2e} (PyTorch float32: {torch32:.2e})"
    assert err32 < LOGIT_TOL, f"against float32 PyTorch: {err32:.2e}"


def test_the_context_and_maps_matter(ref, conv, apply_fn):
    """Another order of the class table (the context) moves the logits far beyond the bound (measured 3.6e-3
    relative): the cross-attention path and the maps reach the output."""
    img = images((1, 64, 64, 3), seed=3)
    base = np.asarray(apply_fn(conv.variables, img))
    table = conv.variables["constants"]["class_embeddings"]
    other = {**conv.variables, "constants": {"class_embeddings": table[::-1].copy()}}
    moved = np.asarray(apply_fn(other, img))
    assert _rel(moved, base) > 100 * LOGIT_TOL


# -------------------------------------------------------------------------------------------- converter

def test_state_dict_has_the_released_layout(state, ref):
    """The keys of wl-zhao/VPD segmentation/models/vpd_seg.py's ``VPDSeg``: attribute names, CompVis names."""
    tops = {k.split(".")[0] for k in state}
    assert tops == {"encoder_vq", "unet", "sd_model", "class_embeddings", "gamma", "text_adapter", "neck",
                    "decode_head"}
    for key in ["encoder_vq.encoder.conv_in.weight", "encoder_vq.encoder.mid.attn_1.q.weight",
                "encoder_vq.quant_conv.weight", "encoder_vq.post_quant_conv.bias",
                "unet.unet.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "unet.unet.diffusion_model.output_blocks.11.1.proj_out.weight",
                "unet.unet.diffusion_model.out.2.weight", "sd_model.alphas_cumprod", "sd_model.scale_factor",
                "text_adapter.fc.0.weight", "text_adapter.fc.2.bias", "neck.lateral_convs.1.conv.weight",
                "decode_head.scale_heads.3.4.bn.running_var", "decode_head.conv_seg.weight"]:
        assert key in state, key
    assert not any(k.startswith("encoder_vq.decoder.") for k in state)  # deleted in VPDSeg.__init__
    assert state["class_embeddings"].shape == (CLASSES, 64)
    assert state["neck.lateral_convs.1.conv.weight"].shape[1] == 96 + CLASSES  # the maps widen levels 1 and 2
    assert state["neck.lateral_convs.2.conv.weight"].shape[1] == 128 + CLASSES
    assert vsc.SD_MODEL_BUFFERS == RS.SD_MODEL_BUFFERS


def test_every_tensor_is_used_or_knowingly_skipped(state, conv, ref):
    assert conv.task == "segmentation" and conv.format == "official"
    assert conv.config == ref.config  # the architecture read off the tensors (heads given)
    sd_model = sorted(k for k in state if k.startswith("sd_model."))
    out = sorted(k for k in state if k.startswith("unet.unet.diffusion_model.out."))
    assert len(sd_model) == 13 and len(out) == 4
    for k in sd_model:
        assert conv.skipped[k] == vsc.SD_MODEL_REASON
    for k in out:
        assert "output head" in conv.skipped[k]
    assert {k for k in conv.skipped if k.startswith("encoder_vq.")} == {"encoder_vq.post_quant_conv.weight",
                                                                       "encoder_vq.post_quant_conv.bias"}
    bn_steps = [k for k in state if k.endswith("num_batches_tracked")]
    assert set(conv.skipped) == set(sd_model) | set(out) | set(bn_steps) | {
        "encoder_vq.post_quant_conv.weight", "encoder_vq.post_quant_conv.bias"}
    # every used tensor became one leaf, except BN (4 tensors -> 2 params + 2 stats)
    assert len(state) - len(conv.skipped) == len(flatten(conv.variables))
    table = conv.variables["constants"]["class_embeddings"]
    np.testing.assert_array_equal(table, state["class_embeddings"])  # one row per class, no mean row
    shapes = jax.tree.map(lambda s: s.shape, abstract_variables(VPDSeg(conv.config)))
    assert jax.tree.map(np.shape, conv.variables) == shapes


@pytest.mark.parametrize("extra,named", [
    ("sd_model.model_ema.decay", r"sd_model\.model_ema\.decay"),
    ("auxiliary_head.conv_seg.weight", r"auxiliary_head\.conv_seg\.weight"),
    ("neck.extra_convs.0.conv.weight", r"neck\.extra_convs\.0\.conv\.weight"),
    # inside the UNet the name is given relative to its prefix, which the message states
    ("unet.unet.diffusion_model.label_emb.0.weight", r"label_emb\.0\.weight"),
])
def test_an_unknown_key_fails_by_name(state, extra, named):
    bad = dict(state)
    bad[extra] = np.zeros((4, 4, 1, 1), np.float32)
    with pytest.raises(WeightsError, match=named):
        vsc.convert_state_dict(bad, heads=HEADS)


def test_a_missing_tensor_fails_by_name(state):
    bad = {k: v for k, v in state.items() if k != "text_adapter.fc.2.bias"}
    with pytest.raises(WeightsError, match=r"missing: text_adapter\.fc\.2\.bias"):
        vsc.convert_state_dict(bad, heads=HEADS)


def test_the_depth_converter_points_to_segmentation(state):
    with pytest.raises(WeightsError, match="segmentation checkpoint"):
        vc.convert_state_dict(state)


# ---------------------------------------------------------------------------------- CLI and the loader

@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory, state):
    """The official file as mmcv writes it (``meta``, ``state_dict``), converted by the CLI as a user would."""
    root = tmp_path_factory.mktemp("seg")
    pth = root / "vpd_seg.pth"
    meta = {"mmseg_version": "0.30.0", "CLASSES": tuple(f"class{i}" for i in range(CLASSES)), "iter": 80000}
    torch.save({"meta": meta, "state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}},
               pth)
    return root, pth


def test_cli_writes_a_folder_that_loads_back_the_same_variables(cli_folder, conv, capsys):
    root, pth = cli_folder
    out = root / "converted"
    assert convert_tool.main([str(pth), "--out", str(out), "--heads", str(HEADS), "--crop", "512"]) == 0
    printed = capsys.readouterr().out
    assert "official segmentation layout" in printed
    assert "skipped 13 tensor(s): the latent-diffusion wrapper's noise-schedule buffers" in printed
    assert "skipped 4 tensor(s): the UNet's output head" in printed
    meta = json.loads((out / "config.json").read_text())
    assert meta["task"] == "segmentation" and meta["crop"] == 512 and "class_rule" not in meta["source"]
    loaded = load_seg_model(out)
    assert loaded.kind == "converted" and loaded.config == conv.config and loaded.crop == 512
    a, b = flatten(loaded.variables), flatten(conv.variables)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    on_the_fly = load_seg_model(pth, heads=HEADS, overrides={"remat": True})
    assert on_the_fly.kind == "pytorch" and on_the_fly.config == conv.config.replace(remat=True)
    assert on_the_fly.skipped == conv.skipped
    # the one door (predict.py, eval.py, init_from) reads the folder as a segmentation model
    door = load_model(out)
    assert door.task == "segmentation" and door.config == conv.config and door.class_names is None
    for k, v in flatten(door.variables).items():
        np.testing.assert_array_equal(v, b[k], err_msg=k)
    assert convert_tool.main([str(pth), "--out", str(root / "never"), "--max_depth", "10"]) == 2


def test_converted_checkpoint_predicts_the_same_labels(cli_folder, ref, apply_fn, capsys):
    """Four images through the CLI-converted folder: argmax labels against the PyTorch float32 network. A pixel
    may differ only where the reference's two best classes tie within float error (3x the bound; 2 pixels do);
    measured: 0 of 16,384 pixels differ."""
    root, pth = cli_folder
    out = root / "labels"
    assert convert_tool.main([str(pth), "--out", str(out), "--heads", str(HEADS)]) == 0
    loaded = load_seg_model(out)
    img = images((4, 64, 64, 3), seed=77)
    got = np.asarray(apply_fn(loaded.variables, img)).transpose(0, 3, 1, 2)
    want = ref(img)
    top2 = np.sort(want, axis=1)[:, -2:]
    ties = (top2[:, 1] - top2[:, 0]) <= 3 * LOGIT_TOL * np.abs(want).max()
    differ = got.argmax(1) != want.argmax(1)
    assert len(np.unique(want.argmax(1))) >= 3
    assert not np.any(differ & ~ties), f"{int(differ.sum())} of {differ.size} labels differ outside ties"
    assert int(differ.sum()) <= int(ties.sum()) and int(ties.sum()) < differ.size // 100


def test_sd15_sized_checkpoint_infers_the_released_config():
    """Key names and shapes of the released ADE20K checkpoint (SD-1.5 modules on PyTorch's 'meta' device, mmseg's
    FPN with the config's ``in_channels=[320, 790, 1430, 1280]``, 150 x 768 table) give ``VPDSegConfig()``."""
    from reference.torch_training import import_mmseg
    from vpd_jax.models.vpd_seg import VPDSegConfig
    from vpd_jax.weights import diffusers as dw

    import_mmseg()
    from mmseg.models.decode_heads.fpn_head import FPNHead
    from mmseg.models.necks.fpn import FPN

    sd15_unet = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                     cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**sd15_unet)
        neck = FPN([320, 790, 1430, 1280], 256, 4)
        head = FPNHead(feature_strides=[4, 8, 16, 32], in_channels=[256] * 4, in_index=[0, 1, 2, 3], channels=256,
                       dropout_ratio=0.1, num_classes=150, norm_cfg=dict(type="BN"), align_corners=False)
    shaped = lambda sd: {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in sd.items()}  # noqa: E731
    body = {k: v for k, v in shaped(unet.state_dict()).items() if not k.startswith(("conv_norm_out", "conv_out"))}
    state = {"unet.unet.diffusion_model." + k: v
             for k, v in dw.diffusers_unet_to_ldm(body, dw.UNetConfig.from_diffusers(sd15_unet)).items()}
    state.update({"neck." + k: v for k, v in shaped(neck.state_dict()).items()})
    state.update({"decode_head." + k: v for k, v in shaped(head.state_dict()).items()})
    # the SD VAE encoder's CompVis names (the SD-1.5 widths)
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                      latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4)
    state.update({"encoder_vq." + k: v for k, v in dw.diffusers_vae_to_ldm(shaped(vae.state_dict())).items()})
    state["class_embeddings"] = np.broadcast_to(np.float32(0), (150, 768))
    assert vsc.infer_config(state) == VPDSegConfig()
    head_params = sum(int(np.prod(v.shape)) for k, v in state.items()
                      if k.startswith(("neck.", "decode_head.")) and "running" not in k and "num_batches" not in k)
    assert head_params == 7_510_166  # docs/segmentation.md
