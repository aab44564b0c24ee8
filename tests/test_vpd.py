"""The whole VPDDepth against a PyTorch assembly of the same network, through our checkpoint converter.

Reference: ``reference.torch_vpd.TorchVPD``, diffusers' PyTorch ``UNet2DConditionModel`` and ``AutoencoderKL`` (tiny
SD-shaped configs, random weights) with forward hooks on the up blocks for VPD's four maps, and torch.nn layers
named as in the official checkpoint for the rest. Its state dict is written in the official layout (CompVis names
placed by diffusers' own key maps) and converted by ``vpd_jax.weights.vpd_checkpoint``. fp32, depth in metres, at
a square and a non-square size that both need padding and the feature crop (bounds below).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()

from reference import torch_vpd as R  # noqa: E402
from vpd_jax.models.vpd import VPDConfig, VPDDepth, abstract_variables, with_class_embeddings  # noqa: E402
from vpd_jax.weights.common import flatten  # noqa: E402
from vpd_jax.weights.vpd_checkpoint import convert_state_dict  # noqa: E402

# Bounds, metres (depths up to 10), about 3x the largest error measured on the development CPU: 1.6e-5 (96x96),
# 1.6e-5 (50x70), 5.0e-5 in training mode (batch-statistics BatchNorm); running statistics 1.2e-7.
SQUARE_TOL, NON_SQUARE_TOL, TRAIN_TOL, STATS_TOL = 5e-5, 5e-5, 1.5e-4, 4e-7
CONFIG = R.vpd_config(R.TINY_UNET, R.TINY_VAE, R.TINY_HEAD)
NUM_CLASSES = R.NUM_CLASSES
TEXT_DIM = R.TINY_HEAD["text_dim"]
_images = R.images


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def torch_vpd():
    return R.TorchVPD()


@pytest.fixture(scope="session")
def converted(torch_vpd):
    return convert_state_dict(torch_vpd.official_state(), CONFIG, what="tiny official")


@pytest.fixture(scope="session")
def apply_fn():
    model = VPDDepth(CONFIG)
    return jax.jit(lambda v, img, ids, text: model.apply(v, img, ids, text))


# ---------------------------------------------------------------------------------------------- tests

def test_tiny_config_is_the_documented_one():
    assert VPDConfig.tiny() == CONFIG
    assert CONFIG.pad_multiple == 64
    assert VPDConfig().padded_size(480, 480) == (512, 512) and VPDConfig().valid_size(480, 480) == (15, 15)
    assert VPDConfig().padded_size(480, 640) == (512, 640) and VPDConfig().valid_size(480, 640) == (15, 20)
    assert VPDConfig.from_dict(VPDConfig().to_dict()) == VPDConfig()


def test_depth_matches_pytorch_square_with_scene_ids(torch_vpd, converted, apply_fn):
    """96x96 pads to 128 and crops the 4x4 map to 3x3 (480 in 512 in miniature); -1 is the mean row."""
    ids = [3, -1]
    images = _images((2, 96, 96, 3), seed=0)
    want = torch_vpd(images, class_ids=ids)
    got = np.asarray(apply_fn(converted.variables, images, jnp.asarray(ids), None))
    assert got.shape == want.shape == (2, 96, 96)
    assert float(np.std(want)) > 0.1  # not two constant maps
    assert float(np.max(np.abs(got - want))) < SQUARE_TOL
    assert float(np.max(np.abs(got[0] - got[1]))) > 1e-3  # the scene token matters


def test_depth_matches_pytorch_non_square_with_free_text(torch_vpd, converted, apply_fn):
    """50x70 pads to 64x128; the 2x4 map is cropped to 2x3, decoded to 64x96 and cut to 50x70. A raw text
    embedding replaces the table row."""
    images = _images((1, 50, 70, 3), seed=1)
    text = np.random.default_rng(7).standard_normal(TEXT_DIM).astype(np.float32) * 3
    want = torch_vpd(images, text=text)
    got = np.asarray(apply_fn(converted.variables, images, None, jnp.asarray(text)))
    assert got.shape == want.shape == (1, 50, 70)
    assert float(np.std(want)) > 0.1
    assert float(np.max(np.abs(got - want))) < NON_SQUARE_TOL


def test_train_mode_matches_pytorch_and_freezes_the_vae(torch_vpd, converted):
    """BatchNorm on batch statistics with PyTorch's running-stat update; no gradient reaches the VAE."""
    model = VPDDepth(CONFIG)
    images = _images((2, 64, 64, 3), seed=2)
    ids = [0, 5]

    def forward(vae_params, variables):
        params = {**variables["params"], "vae": vae_params}
        depth, upd = model.apply({**variables, "params": params}, images, jnp.asarray(ids), train=True,
                                 mutable=["batch_stats"])
        return jnp.mean(depth), (depth, upd)

    grads, (got, upd) = jax.jit(jax.grad(forward, has_aux=True))(converted.variables["params"]["vae"],
                                                                   converted.variables)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))

    head = torch_vpd.head
    saved = {k: v.clone() for k, v in head.state_dict().items()}
    try:
        head.train()
        want = torch_vpd(images, class_ids=ids)
        want_stats = {k: v.numpy().copy() for k, v in head.state_dict().items() if "running" in k}
    finally:
        head.load_state_dict(saved)
        head.eval()
    assert float(np.max(np.abs(np.asarray(got) - want))) < TRAIN_TOL
    ours = flatten(upd["batch_stats"])
    for i, name in enumerate(["deconv_bn_0", "deconv_bn_1", "deconv_bn_2"]):
        for leaf, tleaf in (("mean", "running_mean"), ("var", "running_var")):
            ref = want_stats[f"decoder.deconv_layers.{3 * i + 1}.{tleaf}"]
            assert float(np.max(np.abs(np.asarray(ours[f"head/decoder/{name}/{leaf}"]) - ref))) < STATS_TOL
    for leaf, tleaf in (("mean", "running_mean"), ("var", "running_var")):
        ref = want_stats[f"decoder.conv_layers.1.{tleaf}"]
        assert float(np.max(np.abs(np.asarray(ours[f"head/decoder/conv_bn/{leaf}"]) - ref))) < STATS_TOL


def test_variables_layout(converted):
    v = converted.variables
    assert set(v) == {"params", "batch_stats", "constants"}
    assert set(v["params"]) == {"unet", "vae", "head", "text_adapter", "gamma"}
    assert set(v["params"]["head"]) == {"neck", "decoder", "depth"}
    assert "conv_out" not in v["params"]["unet"] and "conv_norm_out" not in v["params"]["unet"]
    table = v["constants"]["class_embeddings"]
    assert table.shape == (NUM_CLASSES + 1, TEXT_DIM)
    np.testing.assert_allclose(table[-1], table[:-1].mean(0), rtol=1e-6)
    shapes = jax.tree.map(lambda s: s.shape, abstract_variables(VPDDepth(CONFIG)))
    assert jax.tree.map(np.shape, v) == shapes


def test_init_gives_the_documented_variables():
    v = abstract_variables(VPDDepth(CONFIG))
    assert set(v) == {"params", "batch_stats", "constants"}
    assert v["constants"]["class_embeddings"].shape == (NUM_CLASSES + 1, TEXT_DIM)
    table = np.arange(NUM_CLASSES * TEXT_DIM, dtype=np.float32).reshape(NUM_CLASSES, TEXT_DIM)
    filled = with_class_embeddings({"params": {}}, table)["constants"]["class_embeddings"]
    np.testing.assert_array_equal(filled[:-1], table)
    np.testing.assert_allclose(filled[-1], table.mean(0))


def test_sd15_model_has_the_reference_parameter_counts():
    """Head + text adapter + gamma about 12.72 M (wl-zhao/VPD depth/models_depth/model.py, vpd/models.py); UNet
    859.52 M with its unused ``out`` (11,524) (the training log quoted in wl-zhao/VPD GitHub issue 61)."""
    v = abstract_variables(VPDDepth(VPDConfig()))
    count = lambda tree: sum(int(np.prod(s.shape)) for s in flatten(tree).values())  # noqa: E731
    p = v["params"]
    assert round((count(p["head"]) + count(p["text_adapter"]) + p["gamma"].size) / 1e6, 2) == 12.72
    assert round((count(p["unet"]) + 320 * 2 + 4 * 320 * 9 + 4) / 1e6, 2) == 859.52
    assert v["constants"]["class_embeddings"].shape == (28, 768)
    assert count(v["batch_stats"]) == 2 * (3 * 32 + 192)


# ------------------------------------------------------------------- the same depth at any batch size

@pytest.fixture(scope="session")
def wide_checkpoint(tmp_path_factory):
    """An official-layout .pth of the WIDE reference (every UNet and VAE level at least 64 wide), converted with
    ``python -m vpd_jax.tools.convert`` as a user would; returns (reference, converted folder)."""
    from vpd_jax.tools import convert as convert_tool

    ref = R.TorchVPD(seed=30, unet=R.WIDE_UNET, vae=R.WIDE_VAE, head=R.WIDE_HEAD, depth_gain=1.0)
    root = tmp_path_factory.mktemp("wide")
    pth = root / "vpd_wide.pth"
    torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ref.official_state().items()}},
               pth)
    (root / "wide.json").write_text(__import__("json").dumps(ref.config.to_dict()))
    assert convert_tool.main([str(pth), "--out", str(root / "converted"), "--config", str(root / "wide.json")]) == 0
    return ref, root / "converted"


def test_predictor_depth_does_not_depend_on_the_batch_size(wide_checkpoint):
    """A 320x320 image (one window at a 320 crop; the VAE's first level then holds 102,400 pixels per image)
    through ``Predictor`` at batch sizes 1, 4 and 8, and the flip-averaged ``predict`` at the default 4, against
    the PyTorch network. The reference runs in float64: this network's float32 PyTorch result is itself 3.5e-6 m
    from it. Before the float32 GroupNorm statistics were summed in two stages, batches 4 and 8 were 2.2e-5 m off
    here (6.7e-4 m at 480x480), batch 1 5.1e-6; measured now: at most 5.4e-6 m at every batch size."""
    from vpd_jax.inference import Predictor

    ref, converted = wide_checkpoint
    image = R.images((320, 320, 3), seed=31)
    exact = ref.double()
    want = exact(image[None], class_ids=[-1], threads=2)[0]
    assert float(np.std(want)) > 0.1
    assert float(np.max(np.abs(ref(image[None], class_ids=[-1], threads=2)[0] - want))) < 1e-5  # PyTorch float32
    for batch_size in (1, 4, 8):
        p = Predictor.from_checkpoint(converted, batch_size=batch_size, crop=320)
        err = float(np.max(np.abs(p.forward([image])[0] - want)))
        assert err < 1e-5, f"batch_size {batch_size}: {err:.2e} m"
        if batch_size == 4:
            want_flip = exact(image[None, :, ::-1], class_ids=[-1], threads=2)[0, :, ::-1]
            err = float(np.max(np.abs(p.predict(image) - (want + want_flip) / 2)))
            assert err < 1e-5, f"predict at batch_size 4: {err:.2e} m"
