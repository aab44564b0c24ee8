"""The whole VPDDepth against a PyTorch assembly of the same network, through our checkpoint converter.

Reference: diffusers' PyTorch ``UNet2DConditionModel`` and ``AutoencoderKL`` (tiny SD-shaped configs, random
weights) with forward hooks on the up blocks for VPD's four maps, and torch.nn layers named as in the official
checkpoint for the rest (``test_head.TorchHead``). Its state dict is written in the official layout (CompVis
names through the inverse key map) and converted by ``vpd_jax.weights.vpd_checkpoint``. fp32, depth in metres
within 1e-4 at a square and a non-square size that both need padding and the feature crop.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()

from test_head import TorchHead, TorchTextAdapter, randomize_, state_numpy  # noqa: E402

from vpd_jax.models.vpd import VPDConfig, VPDDepth, abstract_variables, with_class_embeddings  # noqa: E402
from vpd_jax.weights import diffusers as dw  # noqa: E402
from vpd_jax.weights.common import flatten  # noqa: E402
from vpd_jax.weights.vpd_checkpoint import convert_state_dict  # noqa: E402

TOL = 1e-4
# SD-1.5's structure (so the same CompVis key names) at toy widths: 4 levels, cross-attention in the first
# three, 2 layers per block, widths growing where SD's do.
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=2, cross_attention_dim=32, norm_num_groups=32,
)
# SD's x8 VAE structure (4 levels, 2 layers, a shortcut conv where the width grows) at toy widths.
TINY_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(16, 32, 64, 64), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=16,
)
TEXT_DIM, NECK, FILTERS, DEC, NUM_CLASSES = 32, 32, (8, 8, 8), 16, 27
CONFIG = VPDConfig.from_dict(dict(unet=TINY_UNET, vae=TINY_VAE, text_dim=TEXT_DIM, neck_features=NECK,
                                  deconv_filters=FILTERS, decoder_features=DEC))


# ------------------------------------------------------------------------------ the PyTorch assembly

class TorchVPD:
    """VPD in PyTorch: diffusers UNet/VAE + the official-named head, with the general padding/crop rule."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.unet = _perturb(diffusers.UNet2DConditionModel(**TINY_UNET), seed + 1)
        self.vae = _perturb(diffusers.AutoencoderKL(**TINY_VAE), seed + 2)
        self.head = TorchHead(TINY_UNET["block_out_channels"], NECK, FILTERS, DEC).eval()
        randomize_(self.head, seed + 3)
        with torch.no_grad():
            self.head.last_layer_depth[2].weight.mul_(5.0)  # spread the depth over the sigmoid's range
        self.adapter = TorchTextAdapter(TEXT_DIM)
        randomize_(self.adapter, seed + 4)
        g = torch.Generator().manual_seed(seed + 5)
        self.gamma = 0.5 * torch.randn(TEXT_DIM, generator=g)  # far from 1e-4, so the adapter matters
        self.table = 3.0 * torch.randn(NUM_CLASSES, TEXT_DIM, generator=g)

    def __call__(self, images: np.ndarray, class_ids=None, text=None) -> np.ndarray:
        # One intra-op thread: these tensors are tiny, and on a busy 2-core machine torch's spinning workers
        # made a forward 20x slower.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._forward(images, class_ids, text)
        finally:
            torch.set_num_threads(threads)

    @torch.no_grad()
    def _forward(self, images, class_ids, text):
        b, h, w, _ = images.shape
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        ph, pw = 64 * math.ceil(h / 64), 64 * math.ceil(w / 64)
        padded = torch.zeros(b, 3, ph, pw)
        padded[:, :, :h, :w] = x
        latents = self.vae.encode(padded).latent_dist.mode()
        if text is not None:
            e = torch.from_numpy(np.broadcast_to(text, (b, TEXT_DIM)).copy())
        else:
            full = torch.cat([self.table, self.table.mean(0, keepdim=True)])
            ids = [NUM_CLASSES if i < 0 else i for i in class_ids]
            e = full[ids]
        ctx = self.adapter(e, self.gamma)[:, None, :]
        feats = {}
        taps = [self.unet.up_blocks[0].resnets[1], self.unet.up_blocks[1].attentions[1],
                self.unet.up_blocks[2].attentions[1], self.unet.up_blocks[3]]  # o1, o4, o7, o11
        handles = [m.register_forward_hook(lambda m, a, out, i=i: feats.__setitem__(
            i, out[0] if isinstance(out, tuple) else out)) for i, m in enumerate(taps)]
        self.unet(latents, torch.ones(b, dtype=torch.long), ctx)
        for hd in handles:
            hd.remove()
        valid = (math.ceil(h / 32), math.ceil(w / 32))
        depth = self.head([feats[3], feats[2], feats[1], feats[0]], valid)
        return depth[:, 0, :h, :w].numpy()

    # ------------------------------------------------------------------------- checkpoint layouts
    def official_state(self) -> dict[str, np.ndarray]:
        """The official ``{'model': ...}`` state dict (spec §7.1): no VAE decoder, no UNet ``out``."""
        sd = state_numpy(self.head)  # encoder.layer1/layer2/out_layer, decoder.*, last_layer_depth.*
        sd.update(state_numpy(self.adapter, "encoder.text_adapter."))
        sd["encoder.gamma"] = self.gamma.numpy().copy()
        sd["encoder.class_embeddings"] = self.table.numpy().copy()
        unet = {k: v for k, v in state_numpy(self.unet).items() if not k.startswith(("conv_norm_out", "conv_out"))}
        ucfg = dw.UNetConfig.from_diffusers(TINY_UNET)
        sd.update({"encoder.unet.unet.diffusion_model." + k: v
                   for k, v in dw.diffusers_unet_to_ldm(unet, ucfg).items()})
        vae = state_numpy(self.vae)
        sd.update({"encoder.encoder_vq." + k: v for k, v in dw.diffusers_vae_to_ldm(vae).items()})
        sd.update({"encoder.encoder_vq." + k: v for k, v in vae.items() if k.startswith("post_quant_conv.")})
        return sd

    def mmseg_state(self) -> dict[str, np.ndarray]:
        """The mmseg ``state_dict`` (spec §7.2): renamed, 28-row table, VAE decoder and UNet ``out`` present."""
        renames = [("encoder.layer1.", "decode_head.conv1."), ("encoder.layer2.0.", "decode_head.conv2."),
                   ("encoder.out_layer.", "decode_head.conv_aggregation."), ("decoder.", "decode_head.decoder."),
                   ("last_layer_depth.", "decode_head.depth_pred_layer."), ("encoder.", "backbone.")]
        sd = {}
        for k, v in self.official_state().items():
            new = next((dst + k[len(src):] for src, dst in renames if k.startswith(src)), k)
            sd[new] = v
        sd["backbone.class_embeddings"] = np.concatenate([self.table.numpy(), self.table.numpy().mean(0)[None]])
        unet = state_numpy(self.unet)
        sd["backbone.unet.unet.diffusion_model.out.0.weight"] = unet["conv_norm_out.weight"]
        sd["backbone.unet.unet.diffusion_model.out.0.bias"] = unet["conv_norm_out.bias"]
        sd["backbone.unet.unet.diffusion_model.out.2.weight"] = unet["conv_out.weight"]
        sd["backbone.unet.unet.diffusion_model.out.2.bias"] = unet["conv_out.bias"]
        sd.update({"backbone.encoder_vq." + k: v for k, v in ldm_vae_decoder(state_numpy(self.vae)).items()})
        return sd


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)  # diffusers zero-inits some projections
    return model.eval()


def ldm_vae_decoder(vae_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The decoder half of a diffusers AutoencoderKL under CompVis names (decoder.up.{i}.block.{j}, ...)."""
    n = len(TINY_VAE["block_out_channels"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in vae_state.items():
        if not k.startswith("decoder."):
            continue
        parts = k.split(".")
        if parts[1] == "up_blocks":
            blk = f"decoder.up.{n - 1 - int(parts[2])}"
            rest = ".".join(parts[5:])
            new = (f"{blk}.block.{parts[4]}.{rest}".replace("conv_shortcut", "nin_shortcut")
                   if parts[3] == "resnets" else f"{blk}.upsample.{rest}")
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            new = f"decoder.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
        elif parts[1] == "mid_block":
            name = ".".join(parts[4:-1])
            new = f"decoder.mid.attn_1.{attn[name]}.{parts[-1]}"
            v = v[:, :, None, None] if v.ndim == 2 else v
        else:
            new = k.replace("conv_norm_out", "norm_out")
        out[new] = v
    return out


# ------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def torch_vpd():
    return TorchVPD()


@pytest.fixture(scope="session")
def converted(torch_vpd):
    return convert_state_dict(torch_vpd.official_state(), CONFIG, what="tiny official")


@pytest.fixture(scope="session")
def apply_fn():
    model = VPDDepth(CONFIG)
    return jax.jit(lambda v, img, ids, text: model.apply(v, img, ids, text))


def _images(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


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
    assert float(np.max(np.abs(got - want))) < TOL
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
    assert float(np.max(np.abs(got - want))) < TOL


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
    assert float(np.max(np.abs(np.asarray(got) - want))) < TOL
    ours = flatten(upd["batch_stats"])
    for i, name in enumerate(["deconv_bn_0", "deconv_bn_1", "deconv_bn_2"]):
        for leaf, tleaf in (("mean", "running_mean"), ("var", "running_var")):
            ref = want_stats[f"decoder.deconv_layers.{3 * i + 1}.{tleaf}"]
            assert float(np.max(np.abs(np.asarray(ours[f"head/decoder/{name}/{leaf}"]) - ref))) < TOL
    for leaf, tleaf in (("mean", "running_mean"), ("var", "running_var")):
        ref = want_stats[f"decoder.conv_layers.1.{tleaf}"]
        assert float(np.max(np.abs(np.asarray(ours[f"head/decoder/conv_bn/{leaf}"]) - ref))) < TOL


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
    """Spec §3: head + text adapter + gamma about 12.72 M; UNet 859.52 M with its unused ``out`` (11,524)."""
    v = abstract_variables(VPDDepth(VPDConfig()))
    count = lambda tree: sum(int(np.prod(s.shape)) for s in flatten(tree).values())  # noqa: E731
    p = v["params"]
    assert round((count(p["head"]) + count(p["text_adapter"]) + p["gamma"].size) / 1e6, 2) == 12.72
    assert round((count(p["unet"]) + 320 * 2 + 4 * 320 * 9 + 4) / 1e6, 2) == 859.52
    assert v["constants"]["class_embeddings"].shape == (28, 768)
    assert count(v["batch_stats"]) == 2 * (3 * 32 + 192)
