"""The PyTorch reference the tests compare against: VPD assembled from diffusers and torch.nn, never from our code.

* ``TorchHead`` and its parts: the official ``depth/models_depth/model.py`` neck (``encoder.layer1``,
  ``encoder.layer2``, ``encoder.out_layer``), ``Decoder`` and ``last_layer_depth``, with the official module
  names, so their ``state_dict`` is the released checkpoint's head; ``TorchTextAdapter`` (``TextAdapterDepth``).
* ``TorchVPD``: diffusers' PyTorch ``UNet2DConditionModel`` and ``AutoencoderKL`` with forward hooks on the up
  blocks for VPD's four maps, the head and the adapter, at any SD-structured config (``TINY``: levels 64 to 128 wide;
  ``WIDE``: every level at least 64 wide, so that each norm group holds more than one channel and every tensor
  moves the output). ``official_state`` / ``mmseg_state`` write it in the two released layouts.
* Helpers: ``randomize_`` (weights at scales that keep activations O(1)), layout conversions and ``maxdiff``.
* ``record_cross_attention``: VPD's attention store on a diffusers UNet (the official ``ca_forward`` as an
  attention processor on every ``attn2``), for the segmentation variant's cross-attention features.

Tests and benchmarks import this module; no test file imports another.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn as tnn

# ------------------------------------------------------------------------------------------- configs

# SD-1.5's structure (so the same CompVis key names) at toy widths: 4 levels, cross-attention in the first
# three, 2 layers per block, widths growing where SD's do and at least 64 (no norm group of one channel).
# VPDConfig.tiny().
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 96, 128, 128), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=2, cross_attention_dim=32, norm_num_groups=32,
)
# SD's x8 VAE structure (4 levels, 2 layers, a shortcut conv where the width grows) at toy widths.
TINY_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(16, 32, 64, 64), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=16,
)
TINY_HEAD = dict(text_dim=32, neck_features=128, deconv_filters=(8, 8, 8), decoder_features=16)

# The VAE too at least 64 wide with SD's 32 norm groups (no group is a single channel, so a conv bias before a
# norm, or a group's mean, is never invisible), and a wider context.
WIDE_UNET = dict(TINY_UNET, attention_head_dim=4, cross_attention_dim=64)
WIDE_VAE = dict(TINY_VAE, block_out_channels=(64, 64, 128, 128), norm_num_groups=32)
WIDE_HEAD = dict(text_dim=64, neck_features=256, deconv_filters=(16, 16, 16), decoder_features=32)
NUM_CLASSES = 27


def vpd_config(unet: dict, vae: dict, head: dict, **kw):
    """Our ``VPDConfig`` for a reference built from these dicts."""
    from vpd_jax.models.vpd import VPDConfig

    return VPDConfig.from_dict(dict(unet=unet, vae=vae, **head, **kw))


# ------------------------------------------------------------------------------------------- the head

class TorchNeck(tnn.Module):
    """The tail of the official ``VPDDepthEncoder`` (``layer1``, ``layer2``, ``out_layer``)."""

    def __init__(self, chans, out_dim):
        super().__init__()
        c0, c1 = chans[0], chans[1]
        self.layer1 = tnn.Sequential(tnn.Conv2d(c0, c0, 3, stride=2, padding=1), tnn.GroupNorm(16, c0),
                                     tnn.ReLU(), tnn.Conv2d(c0, c0, 3, stride=2, padding=1))
        self.layer2 = tnn.Sequential(tnn.Conv2d(c1, c1, 3, stride=2, padding=1))
        self.out_layer = tnn.Sequential(tnn.Conv2d(sum(chans), out_dim, 1), tnn.GroupNorm(16, out_dim), tnn.ReLU())

    def forward(self, feats):
        o11, o7, o4, o1 = feats
        x = torch.cat([self.layer1(o11), self.layer2(o7), o4, F.interpolate(o1, scale_factor=2)], dim=1)
        return self.out_layer(x)


class TorchDecoder(tnn.Module):
    """The official ``Decoder`` with 2x2 deconvs."""

    def __init__(self, in_dim, filters, out_dim):
        super().__init__()
        layers = []
        for f in filters:
            layers += [tnn.ConvTranspose2d(in_dim, f, 2, stride=2, padding=0, output_padding=0, bias=False),
                       tnn.BatchNorm2d(f), tnn.ReLU()]
            in_dim = f
        self.deconv_layers = tnn.Sequential(*layers)
        self.conv_layers = tnn.Sequential(tnn.Conv2d(in_dim, out_dim, 3, padding=1), tnn.BatchNorm2d(out_dim),
                                          tnn.ReLU())
        self.up = tnn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x):
        return self.up(self.up(self.conv_layers(self.deconv_layers(x))))


class TorchTextAdapter(tnn.Module):
    """Official ``TextAdapterDepth``: ``e + gamma * fc(e)``, fc = Linear, exact GELU, Linear."""

    def __init__(self, dim):
        super().__init__()
        self.fc = tnn.Sequential(tnn.Linear(dim, dim), tnn.GELU(), tnn.Linear(dim, dim))

    def forward(self, e, gamma):
        return e + gamma * self.fc(e)


class TorchHead(tnn.Module):
    """Neck + crop + decoder + depth head, named as in the official checkpoint (``encoder.layer1`` ...)."""

    def __init__(self, chans, neck_dim, filters, dec_dim, max_depth=10.0):
        super().__init__()
        self.encoder = tnn.Module()
        neck = TorchNeck(chans, neck_dim)
        self.encoder.layer1, self.encoder.layer2, self.encoder.out_layer = neck.layer1, neck.layer2, neck.out_layer
        self._neck = [neck]  # a plain list: not registered twice in the state dict
        self.decoder = TorchDecoder(neck_dim, filters, dec_dim)
        self.last_layer_depth = tnn.Sequential(tnn.Conv2d(dec_dim, dec_dim, 3, padding=1), tnn.ReLU(),
                                               tnn.Conv2d(dec_dim, 1, 3, padding=1))
        self.max_depth = max_depth

    def forward(self, feats, valid):
        x = self._neck[0](feats)[:, :, : valid[0], : valid[1]]
        return torch.sigmoid(self.last_layer_depth(self.decoder(x))) * self.max_depth


# ------------------------------------------------------------------------------------------- helpers

def randomize_(module: tnn.Module, seed: int) -> None:
    """Weights at scales that keep activations O(1), and BN running statistics far from (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (tnn.Conv2d, tnn.ConvTranspose2d, tnn.Linear)):
                fan_in = m.weight[0].numel() if not isinstance(m, tnn.ConvTranspose2d) else m.weight.shape[0]
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / np.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (tnn.GroupNorm, tnn.BatchNorm2d)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                if isinstance(m, tnn.BatchNorm2d):
                    m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                    m.num_batches_tracked.fill_(7)


def perturb_(model: tnn.Module, seed: int, scale: float = 0.05) -> tnn.Module:
    """Adds N(0, scale) to every parameter (diffusers zero-initialises some projections) and sets eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def state_numpy(module: tnn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def rand(shape, seed, scale=1.0, offset=0.0):
    return (offset + scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def images(shape, seed) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ------------------------------------------------------------------------------------------- attention maps

class RecordingAttnProcessor:
    """A diffusers attention processor computing the official ``ca_forward`` (wl-zhao/VPD ``vpd/models.py``,
    ``register_attention_control``): explicit ``softmax(q k^T * scale)`` on ``(b h) n d`` tensors, the map
    averaged over heads (``rearrange(attn, '(b h) k c -> h b k c', h=h).mean(0)``, (B, queries, keys)) appended
    to ``store`` as ``(place, map)`` with ``place`` "down", "mid" or "up", and the usual output. The map is
    detached, as the official one is (recorded inside CompVis' checkpointed block, under ``torch.no_grad``)."""

    def __init__(self, place: str, store: list):
        self.place, self.store = place, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        assert attention_mask is None and attn.spatial_norm is None and attn.group_norm is None
        h, x = attn.heads, hidden_states
        context = x if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
        b = q.shape[0]
        # 'b n (h d) -> (b h) n d'
        q, k, v = (t.reshape(b, t.shape[1], h, -1).permute(0, 2, 1, 3).reshape(b * h, t.shape[1], -1)
                   for t in (q, k, v))
        sim = torch.einsum("bid,bjd->bij", q, k) * attn.scale
        probs = sim.softmax(dim=-1)
        self.store.append((self.place, probs.reshape(b, h, *probs.shape[1:]).permute(1, 0, 2, 3).mean(0).detach()))
        out = torch.einsum("bij,bjd->bid", probs, v)
        # '(b h) n d -> b n (h d)'
        out = out.reshape(b, h, out.shape[1], -1).permute(0, 2, 1, 3).reshape(b, out.shape[1], -1)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def record_cross_attention(unet) -> list:
    """Puts a ``RecordingAttnProcessor`` on every cross-attention (``attn2``) of a diffusers UNet; returns the
    list it appends ``(place, map)`` to, in call order (clear it between forwards)."""
    store: list = []
    places = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}
    procs = {name: RecordingAttnProcessor(places[name.split(".")[0]], store) if ".attn2." in name else proc
             for name, proc in unet.attn_processors.items()}
    unet.set_attn_processor(procs)
    return store


# ------------------------------------------------------------------------------------------- the whole VPD

class TorchVPD:
    """VPD in PyTorch: diffusers UNet/VAE + the official-named head, with the general padding/crop rule."""

    def __init__(self, seed=0, unet: dict = TINY_UNET, vae: dict = TINY_VAE, head: dict = TINY_HEAD,
                 num_classes: int = NUM_CLASSES, depth_gain: float = 5.0):
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        self.unet_cfg, self.vae_cfg, self.head_cfg, self.num_classes = dict(unet), dict(vae), dict(head), num_classes
        text_dim = head["text_dim"]
        torch.manual_seed(seed)
        self.unet = perturb_(diffusers.UNet2DConditionModel(**unet), seed + 1)
        self.vae = perturb_(diffusers.AutoencoderKL(**vae), seed + 2)
        self.head = TorchHead(unet["block_out_channels"], head["neck_features"], head["deconv_filters"],
                              head["decoder_features"]).eval()
        randomize_(self.head, seed + 3)
        with torch.no_grad():
            self.head.last_layer_depth[2].weight.mul_(depth_gain)  # spread the depth over the sigmoid's range
        self.adapter = TorchTextAdapter(text_dim)
        randomize_(self.adapter, seed + 4)
        g = torch.Generator().manual_seed(seed + 5)
        self.gamma = tnn.Parameter(0.5 * torch.randn(text_dim, generator=g))  # far from 1e-4: the adapter matters
        self.table = 3.0 * torch.randn(num_classes, text_dim, generator=g)
        for p in self.vae.parameters():  # frozen in both references
            p.requires_grad_(False)

    def double(self) -> "TorchVPD":
        """A float64 copy: the same network without float32 rounding, to measure how far float32 results are."""
        import copy

        twin = copy.deepcopy(self)
        for m in (twin.unet, twin.vae, twin.head, twin.adapter):
            m.double()
        twin.gamma, twin.table = tnn.Parameter(twin.gamma.detach().double()), twin.table.double()
        return twin

    def train(self, mode: bool = True) -> "TorchVPD":
        """Training mode as in both references: BatchNorm on batch statistics; the VAE stays in eval mode."""
        for m in (self.unet, self.head, self.adapter):
            m.train(mode)
        self.vae.eval()
        return self

    def official_named_parameters(self):
        """``(name, parameter)`` under the official ``VPDDepth``'s names (CompVis names in the backbone, placed by
        diffusers' converter), as ``model.named_parameters()`` lists them."""
        out = [(k, p) for k, p in self.head.named_parameters()]
        out += [("encoder.text_adapter." + k, p) for k, p in self.adapter.named_parameters()]
        out.append(("encoder.gamma", self.gamma))
        d2l = _diffusers_names_from_ldm({k: None for k in ldm_unet_key_names(self.unet_cfg)}, self.unet_cfg)
        out += [("encoder.unet.unet.diffusion_model." + d2l[k], p) for k, p in self.unet.named_parameters()
                if not k.startswith(("conv_norm_out", "conv_out"))]
        out += [("encoder.encoder_vq." + k, p) for k, p in self.vae.named_parameters()]
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.gamma.dtype

    @property
    def config(self):
        """Our ``VPDConfig`` of this network."""
        return vpd_config(self.unet_cfg, self.vae_cfg, self.head_cfg)

    def __call__(self, images: np.ndarray, class_ids=None, text=None, threads: int = 1) -> np.ndarray:
        # One intra-op thread by default: the tiny tensors gain nothing from more, and on a busy 2-core
        # machine torch's spinning workers made a forward 20x slower.
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                return self.forward(images, class_ids, text).numpy()
        finally:
            torch.set_num_threads(old)

    def context(self, b, class_ids=None, text=None) -> torch.Tensor:
        """(B, 1, text_dim): a table row (or the mean row for -1) or a raw text embedding, through the adapter."""
        text_dim = self.head_cfg["text_dim"]
        if text is not None:
            e = torch.from_numpy(np.broadcast_to(text, (b, text_dim)).copy()).to(self.dtype)
        else:
            full = torch.cat([self.table, self.table.mean(0, keepdim=True)])
            ids = [self.num_classes if i < 0 else i for i in class_ids]
            e = full[ids]
        return self.adapter(e, self.gamma)[:, None, :]

    def features(self, latents: torch.Tensor, ctx: torch.Tensor) -> list[torch.Tensor]:
        """The UNet at t = 1; VPD's four maps [o11, o7, o4, o1] from forward hooks."""
        feats = {}
        taps = [self.unet.up_blocks[0].resnets[1], self.unet.up_blocks[1].attentions[1],
                self.unet.up_blocks[2].attentions[1], self.unet.up_blocks[3]]  # o1, o4, o7, o11
        handles = [m.register_forward_hook(lambda m, a, out, i=i: feats.__setitem__(
            i, out[0] if isinstance(out, tuple) else out)) for i, m in enumerate(taps)]
        try:
            self.unet(latents, torch.ones(latents.shape[0], dtype=torch.long), ctx)
        finally:
            for hd in handles:
                hd.remove()
        return [feats[3], feats[2], feats[1], feats[0]]

    def forward(self, images: np.ndarray, class_ids=None, text=None) -> torch.Tensor:
        """(B, H, W, 3) [0, 255] -> (B, H, W) metres, differentiable (the VAE under no_grad, as the references)."""
        b, h, w, _ = images.shape
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0
        ph, pw = 64 * math.ceil(h / 64), 64 * math.ceil(w / 64)
        padded = torch.zeros(b, 3, ph, pw, dtype=self.dtype)
        padded[:, :, :h, :w] = x
        with torch.no_grad():
            latents = self.vae.encode(padded).latent_dist.mode()
        feats = self.features(latents, self.context(b, class_ids, text))
        valid = (math.ceil(h / 32), math.ceil(w / 32))
        depth = self.head(feats, valid)
        return depth[:, 0, :h, :w]

    # ------------------------------------------------------------------------- checkpoint layouts
    def official_state(self) -> dict[str, np.ndarray]:
        """The official ``{'model': ...}`` state dict: no VAE decoder, no UNet ``out``; CompVis names inside the
        backbone, written by diffusers' own ldm -> diffusers key maps run backwards (``ldm_names``)."""
        sd = state_numpy(self.head)  # encoder.layer1/layer2/out_layer, decoder.*, last_layer_depth.*
        sd.update(state_numpy(self.adapter, "encoder.text_adapter."))
        sd["encoder.gamma"] = self.gamma.detach().numpy().copy()
        sd["encoder.class_embeddings"] = self.table.numpy().copy()
        unet = {k: v for k, v in state_numpy(self.unet).items() if not k.startswith(("conv_norm_out", "conv_out"))}
        sd.update({"encoder.unet.unet.diffusion_model." + k: v
                   for k, v in ldm_unet_state(unet, self.unet_cfg).items()})
        vae = state_numpy(self.vae)
        sd.update({"encoder.encoder_vq." + k: v for k, v in ldm_vae_encoder_state(vae, self.vae_cfg).items()})
        sd.update({"encoder.encoder_vq." + k: v for k, v in vae.items() if k.startswith("post_quant_conv.")})
        return sd

    def mmseg_state(self) -> dict[str, np.ndarray]:
        """The mmseg ``state_dict``: renamed, 28-row table, VAE decoder and UNet ``out`` present."""
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


# ------------------------------------------------------------------------------------ CompVis (ldm) names

def _diffusers_names_from_ldm(ldm_keys: dict[str, np.ndarray], unet: dict) -> dict[str, str]:
    """diffusers name -> CompVis name, by running diffusers' own ``convert_ldm_unet_checkpoint`` on tensors
    that each carry their CompVis index: every output tensor says which input it came from."""
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_unet_checkpoint

    names = sorted(ldm_keys) + [f"out.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")]
    tagged = {"model.diffusion_model." + k: torch.full((1,), float(i), dtype=torch.float64)
              for i, k in enumerate(names)}
    config = {"layers_per_block": unet["layers_per_block"], "class_embed_type": None, "addition_embed_type": None}
    out = convert_ldm_unet_checkpoint(tagged, config)
    return {k: names[int(v.reshape(-1)[0])] for k, v in out.items()}


def ldm_unet_state(diffusers_state: dict[str, np.ndarray], unet: dict) -> dict[str, np.ndarray]:
    """A diffusers UNet state dict under CompVis names (``input_blocks.1.1.proj_in.weight`` ...).

    The CompVis names are those SD-1.x checkpoints have (``ldm_unet_key_names``); which diffusers tensor each
    one holds is decided by diffusers' ``convert_ldm_unet_checkpoint``, so our own key table is never used to
    write the files it is tested on.
    """
    ldm_names = ldm_unet_key_names(unet)
    d2l = _diffusers_names_from_ldm({k: None for k in ldm_names}, unet)
    missing = sorted(set(diffusers_state) - set(d2l))
    if missing:
        raise KeyError(f"no CompVis name for {missing[:5]}")
    return {d2l[k]: v for k, v in diffusers_state.items()}


def ldm_unet_key_names(unet: dict) -> list[str]:
    """Every CompVis ``UNetModel`` key of an SD 1.x-structured UNet (output head excluded): its fixed layout."""
    ch = unet["block_out_channels"]
    layers = unet["layers_per_block"]
    cross = [t.startswith("CrossAttn") for t in unet["down_block_types"]]
    resnet = ["in_layers.0.weight", "in_layers.0.bias", "in_layers.2.weight", "in_layers.2.bias",
              "emb_layers.1.weight", "emb_layers.1.bias", "out_layers.0.weight", "out_layers.0.bias",
              "out_layers.3.weight", "out_layers.3.bias"]
    attn = ["norm.weight", "norm.bias", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias"] + [
        f"transformer_blocks.0.{k}" for k in (
            "attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight", "attn1.to_out.0.weight",
            "attn1.to_out.0.bias", "attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight",
            "attn2.to_out.0.weight", "attn2.to_out.0.bias", "ff.net.0.proj.weight", "ff.net.0.proj.bias",
            "ff.net.2.weight", "ff.net.2.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
            "norm3.weight", "norm3.bias")]
    keys = ["time_embed.0.weight", "time_embed.0.bias", "time_embed.2.weight", "time_embed.2.bias",
            "input_blocks.0.0.weight", "input_blocks.0.0.bias"]
    # input blocks: resnets (+ attention), a downsampler after every level but the last
    i, prev = 1, ch[0]
    for lvl, c in enumerate(ch):
        for _ in range(layers):
            keys += [f"input_blocks.{i}.0.{k}" for k in resnet]
            if prev != c:
                keys += [f"input_blocks.{i}.0.skip_connection.{k}" for k in ("weight", "bias")]
            if cross[lvl]:
                keys += [f"input_blocks.{i}.1.{k}" for k in attn]
            prev, i = c, i + 1
        if lvl < len(ch) - 1:
            keys += [f"input_blocks.{i}.0.op.{k}" for k in ("weight", "bias")]
            i += 1
    keys += [f"middle_block.0.{k}" for k in resnet] + [f"middle_block.1.{k}" for k in attn]
    keys += [f"middle_block.2.{k}" for k in resnet]
    # output blocks: layers + 1 resnets per level (all with a skip connection: the input is concatenated),
    # attention where the mirrored level has it, an upsampler after every level but the last
    i = 0
    up_cross = list(reversed(cross))
    for lvl in range(len(ch)):
        for j in range(layers + 1):
            keys += [f"output_blocks.{i}.0.{k}" for k in resnet]
            keys += [f"output_blocks.{i}.0.skip_connection.{k}" for k in ("weight", "bias")]
            if up_cross[lvl]:
                keys += [f"output_blocks.{i}.1.{k}" for k in attn]
            if j == layers and lvl < len(ch) - 1:
                keys += [f"output_blocks.{i}.{2 if up_cross[lvl] else 1}.conv.{k}" for k in ("weight", "bias")]
            i += 1
    return keys


def ldm_vae_encoder_state(vae_state: dict[str, np.ndarray], vae: dict) -> dict[str, np.ndarray]:
    """The encoder half (and ``quant_conv``) of a diffusers AutoencoderKL under CompVis names, the mapping decided
    by diffusers' own ``convert_ldm_vae_checkpoint`` (tagged tensors, as for the UNet)."""
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_vae_checkpoint

    names = ldm_vae_key_names(vae)
    tagged = {"first_stage_model." + k: torch.full((1,), float(i), dtype=torch.float64) for i, k in enumerate(names)}
    out = convert_ldm_vae_checkpoint(tagged, {"block_out_channels": vae["block_out_channels"]})
    d2l = {k: names[int(v.reshape(-1)[0])] for k, v in out.items() if k.startswith(("encoder.", "quant_conv."))}
    result = {}
    for k, v in vae_state.items():
        if k.startswith(("encoder.", "quant_conv.")):
            ldm = d2l[k]
            # CompVis holds the mid-block attention projections as 1x1 convs
            result[ldm] = v[:, :, None, None] if (".attn_1." in ldm and v.ndim == 2) else v
    return result


def ldm_vae_key_names(vae: dict) -> list[str]:
    """Every CompVis ``AutoencoderKL`` key of the encoder side, plus a decoder stub that diffusers' converter
    reads (it converts both halves)."""
    ch = vae["block_out_channels"]
    layers = vae["layers_per_block"]
    res = ["norm1.weight", "norm1.bias", "conv1.weight", "conv1.bias", "norm2.weight", "norm2.bias",
           "conv2.weight", "conv2.bias"]
    attn = [f"{p}.{w}" for p in ("norm", "q", "k", "v", "proj_out") for w in ("weight", "bias")]
    keys = []
    for side in ("encoder", "decoder"):
        keys += [f"{side}.conv_in.weight", f"{side}.conv_in.bias", f"{side}.conv_out.weight", f"{side}.conv_out.bias",
                 f"{side}.norm_out.weight", f"{side}.norm_out.bias"]
        keys += [f"{side}.mid.block_{i}.{k}" for i in (1, 2) for k in res]
        keys += [f"{side}.mid.attn_1.{k}" for k in attn]
    prev = ch[0]
    for lvl, c in enumerate(ch):
        for j in range(layers):
            keys += [f"encoder.down.{lvl}.block.{j}.{k}" for k in res]
            if prev != c:
                keys += [f"encoder.down.{lvl}.block.{j}.nin_shortcut.{k}" for k in ("weight", "bias")]
            prev = c
        if lvl < len(ch) - 1:
            keys += [f"encoder.down.{lvl}.downsample.conv.{k}" for k in ("weight", "bias")]
    for lvl in range(len(ch)):  # decoder stub: diffusers' converter expects its blocks
        for j in range(layers + 1):
            keys += [f"decoder.up.{lvl}.block.{j}.{k}" for k in res]
        if lvl > 0:
            keys += [f"decoder.up.{lvl}.upsample.conv.{k}" for k in ("weight", "bias")]
    keys += [f"{q}.{w}" for q in ("quant_conv", "post_quant_conv") for w in ("weight", "bias")]
    return keys


def ldm_vae_decoder(vae_state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The decoder half of a diffusers AutoencoderKL under CompVis names (decoder.up.{i}.block.{j}, ...); only
    knowingly skipped by our converter, so the names alone matter."""
    n = len([k for k in vae_state if k.startswith("decoder.up_blocks.") and k.endswith(".resnets.0.conv1.weight")])
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
