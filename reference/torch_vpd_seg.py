"""The PyTorch VPD segmentation network the tests compare against, assembled from diffusers, torch.nn and
mmsegmentation, never from our code.

``TorchVPDSeg`` follows wl-zhao/VPD ``segmentation/models/vpd_seg.py`` (``VPDSeg.extract_feat`` and
``encode_decode``) and ``vpd/models.py`` (``UNetWrapper``, ``AttentionStore``, ``TextAdapter``):

* the image ``x / 127.5 - 1`` through diffusers' ``AutoencoderKL`` encoder, posterior mean (``latents.mode()``),
  no 0.18215 scaling;
* the context: the class-embedding table (one row per class) through the text adapter,
  ``texts + gamma * fc(texts)`` with ``fc = Linear, GELU, Linear``, repeated over the batch;
* diffusers' ``UNet2DConditionModel`` at t = 1 with that context; VPD's four decoder taps from forward hooks (the
  outputs of CompVis ``output_blocks`` 1, 4, 7 and 11, as ``register_hier_output`` returns them); every ``attn2``
  map recorded by the official ``ca_forward`` (``reference.torch_vpd.record_cross_attention``), then filed,
  averaged and concatenated onto the taps as ``AttentionStore`` / ``UNetWrapper.process_attn`` /
  ``UNetWrapper.forward`` do (``official_attention_maps``, ``official_concat`` below);
* mmsegmentation's own ``FPN`` (``out_channels``, ``num_outs=4``) and ``FPNHead`` (``feature_strides=[4, 8, 16,
  32]``, BN in place of the SyncBN of training, evaluation mode, ``align_corners=False``), as configured by
  ``segmentation/configs/fpn_vpd_sd1-5_512x512_gpu8x2.py`` (in channels: the taps' widths, the middle two plus
  one map channel per class);
* the logits resized bilinearly (``align_corners=False``) to the image, as ``encode_decode`` does.

Images whose sides are not multiples of 64 are zero padded (after normalisation) at the bottom and right to the
next multiple and the logits cropped back: the rule of ``reference.torch_vpd.TorchVPD``; at multiples of 64
(the official 512 crops) nothing is padded.

``official_state()`` writes the network in the released checkpoint's layout: the ``VPDSeg`` module's
``state_dict`` (``encoder_vq.*``, ``unet.unet.diffusion_model.*`` under CompVis names placed by diffusers' own
converters, ``sd_model.*`` noise-schedule buffers, ``class_embeddings``, ``gamma``, ``text_adapter.*``,
``neck.*``, ``decode_head.*``), including the tensors the network never uses (``sd_model``'s buffers, the
UNet's ``out``, the VAE's ``post_quant_conv``).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn as tnn

from reference.torch_training import import_mmseg
from reference.torch_vpd import (
    WIDE_UNET,
    WIDE_VAE,
    TorchTextAdapter,
    ldm_unet_state,
    ldm_vae_encoder_state,
    perturb_,
    randomize_,
    record_cross_attention,
    state_numpy,
)

# The buffers of CompVis ``LatentDiffusion`` that stay in ``VPDSeg.sd_model`` once its model, first stage and
# text encoder are removed: ``DDPM.register_schedule`` (ldm/models/diffusion/ddpm.py of CompVis/stable-diffusion;
# ``lvlb_weights`` is not persistent) and ``LatentDiffusion.__init__``'s ``scale_factor``.
SD_MODEL_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "scale_factor",
)


def sd_model_buffers(timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012
                     ) -> dict[str, np.ndarray]:
    """The values of ``SD_MODEL_BUFFERS`` for SD 1.x's v1-inference.yaml ("linear" schedule), float32."""
    betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - prev) / (1.0 - ac)
    out = dict(
        betas=betas, alphas_cumprod=ac, alphas_cumprod_prev=prev, sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac), log_one_minus_alphas_cumprod=np.log(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
        posterior_variance=post_var, posterior_log_variance_clipped=np.log(np.maximum(post_var, 1e-20)),
        posterior_mean_coef1=betas * np.sqrt(prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - prev) * np.sqrt(alphas) / (1.0 - ac),
        scale_factor=np.array(0.18215),
    )
    assert tuple(out) == SD_MODEL_BUFFERS
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


# ------------------------------------------------------------------------------- the official aggregation

def level_grids(h: int, w: int, n: int) -> list[tuple[int, int]]:
    """The UNet's level grids from the latent's: each downsampler (3x3, stride 2, padding 1) halves a side,
    rounding up."""
    out = [(h, w)]
    while len(out) < n:
        out.append(((out[-1][0] + 1) // 2, (out[-1][1] + 1) // 2))
    return out


def official_attention_maps(records, latent_hw, n_levels: int) -> dict[int, torch.Tensor]:
    """wl-zhao/VPD ``vpd/models.py``: ``AttentionStore.forward`` then ``UNetWrapper.process_attn`` with the
    arguments VPD's segmentation uses (``base_size=512``, ``max_attn_size=None``,
    ``attn_selector='up_cross+down_cross'``) -> ``{1: (B, C, h1, w1), 2: (B, C, h2, w2)}``.

    ``records``: ``(place, map)`` in call order, each map ``(B, queries, tokens)`` averaged over heads, as
    ``reference.torch_vpd.record_cross_attention`` appends them.

    Official: the store is ``AttentionStore(base_size=base_size // 8)``, so ``max_size = base_size // 16``; it
    keeps a map under ``f"{place}_cross"`` when ``attn.shape[1] <= max_size ** 2``; ``process_attn`` goes over
    ``up_cross`` then ``down_cross`` (never ``mid_cross``), files each map under ``size = int(sqrt(queries))``
    among ``base_size // 32``, ``// 16`` and ``// 8``, rearranges it ``'b (h w) c -> b c h w'``, and averages each
    grid's maps with ``torch.stack(...).mean(0)``; the ``base_size // 8`` grid never receives one (``attn64`` is
    None). The official code runs at ``base_size`` pixels, the training crop: here ``base_size`` is 8x the latent
    side, which for a square latent is exactly that code; for a non-square latent the same rule holds with the
    grids' (h, w) in place of the square roots.
    """
    grids = level_grids(*latent_hw, n_levels)
    max_queries = grids[1][0] * grids[1][1]
    if latent_hw[0] == latent_hw[1]:
        base_size = 8 * latent_hw[0]
        assert (base_size // 16) ** 2 == max_queries
    step_store = {"down_cross": [], "mid_cross": [], "up_cross": []}
    for place, attn in records:  # AttentionStore.forward ("avoid memory overhead")
        if attn.shape[1] <= max_queries:
            step_store[f"{place}_cross"].append(attn)
    attns = {grids[2]: [], grids[1]: [], grids[0]: []}
    for k in "up_cross+down_cross".split("+"):  # UNetWrapper.process_attn
        for up_attn in step_store[k]:
            size = next(g for g in grids if g[0] * g[1] == up_attn.shape[1])
            attns[size].append(up_attn.reshape(up_attn.shape[0], size[0], size[1], -1).permute(0, 3, 1, 2))
    assert not attns[grids[0]]  # attn64 is None
    return {1: torch.stack(attns[grids[1]]).mean(0), 2: torch.stack(attns[grids[2]]).mean(0)}


def official_concat(feats, maps) -> list[torch.Tensor]:
    """``UNetWrapper.forward``: ``out_list`` is deepest first; ``out_list[1]`` (latent/8) gets ``attn16`` (the
    level-2 maps), ``out_list[2]`` (latent/4) ``attn32`` (level 1), and the list is returned reversed.
    ``feats``: [o11, o7, o4, o1], NCHW."""
    out_list = list(feats[::-1])
    out_list[1] = torch.cat([out_list[1], maps[2]], dim=1)
    out_list[2] = torch.cat([out_list[2], maps[1]], dim=1)
    return out_list[::-1]


# ------------------------------------------------------------------------------------------- the network

class TorchVPDSeg:
    """VPD segmentation in PyTorch (see the module docstring); random weights at O(1) activation scales."""

    def __init__(self, seed: int = 0, unet: dict = WIDE_UNET, vae: dict = WIDE_VAE, num_classes: int = 7,
                 channels: int = 64, dropout_ratio: float = 0.1):
        import diffusers

        import_mmseg()
        from mmseg.models.decode_heads.fpn_head import FPNHead
        from mmseg.models.necks.fpn import FPN

        diffusers.utils.logging.set_verbosity_error()
        self.unet_cfg, self.vae_cfg = dict(unet), dict(vae)
        self.num_classes, self.channels, self.dropout_ratio = num_classes, channels, dropout_ratio
        text_dim = unet["cross_attention_dim"]
        torch.manual_seed(seed)
        self.unet = perturb_(diffusers.UNet2DConditionModel(**unet), seed + 1)
        self.records = record_cross_attention(self.unet)
        self.vae = perturb_(diffusers.AutoencoderKL(**vae), seed + 2)
        c = list(unet["block_out_channels"])
        self.neck = FPN([c[0], c[1] + num_classes, c[2] + num_classes, c[3]], channels, 4)
        self.head = FPNHead(feature_strides=[4, 8, 16, 32], in_channels=[channels] * 4, in_index=[0, 1, 2, 3],
                            channels=channels, dropout_ratio=dropout_ratio, num_classes=num_classes,
                            norm_cfg=dict(type="BN", requires_grad=True), align_corners=False,
                            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0))
        randomize_(self.neck, seed + 3)
        randomize_(self.head, seed + 4)
        self.neck.eval()
        self.head.eval()
        self.adapter = TorchTextAdapter(text_dim)  # fc.0, fc.2: the official TextAdapter's names
        randomize_(self.adapter, seed + 5)
        g = torch.Generator().manual_seed(seed + 6)
        self.gamma = tnn.Parameter(0.5 * torch.randn(text_dim, generator=g))  # far from 1e-4: the adapter matters
        self.table = 3.0 * torch.randn(num_classes, text_dim, generator=g)

    def double(self) -> TorchVPDSeg:
        """A float64 copy (the same network without float32 rounding)."""
        twin = copy.deepcopy(self)
        for m in (twin.unet, twin.vae, twin.neck, twin.head, twin.adapter):
            m.double()
        twin.records = record_cross_attention(twin.unet)
        twin.gamma, twin.table = tnn.Parameter(twin.gamma.detach().double()), twin.table.double()
        return twin

    @property
    def dtype(self) -> torch.dtype:
        return self.gamma.dtype

    @property
    def config(self):
        """Our ``VPDSegConfig`` of this network."""
        from vpd_jax.models.vpd_seg import VPDSegConfig

        return VPDSegConfig.from_dict(dict(unet=self.unet_cfg, vae=self.vae_cfg, num_classes=self.num_classes,
                                           text_dim=self.unet_cfg["cross_attention_dim"],
                                           neck_channels=self.channels, channels=self.channels,
                                           dropout_ratio=self.dropout_ratio))

    def __call__(self, images: np.ndarray, threads: int = 1) -> np.ndarray:
        """(B, H, W, 3) uint8 -> logits (B, num_classes, H, W) as a numpy array (evaluation)."""
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                return self.forward(images).numpy()
        finally:
            torch.set_num_threads(old)

    def context(self, b: int) -> torch.Tensor:
        """``TextAdapter.forward``: ``texts + gamma * fc(texts)``, ``repeat(texts, 'n c -> b n c', b=bs)``."""
        texts = self.adapter(self.table, self.gamma)
        return texts[None].expand(b, *texts.shape)

    def features(self, latents: torch.Tensor, ctx: torch.Tensor) -> list[torch.Tensor]:
        """The UNet at t = 1: VPD's taps [o11, o7, o4, o1] with the official attention maps concatenated."""
        feats = {}
        taps = [self.unet.up_blocks[0].resnets[1], self.unet.up_blocks[1].attentions[1],
                self.unet.up_blocks[2].attentions[1], self.unet.up_blocks[3]]  # o1, o4, o7, o11
        handles = [m.register_forward_hook(lambda m, a, out, i=i: feats.__setitem__(
            i, out[0] if isinstance(out, tuple) else out)) for i, m in enumerate(taps)]
        self.records.clear()  # AttentionStore.reset at every UNetWrapper.forward
        try:
            self.unet(latents, torch.ones(latents.shape[0], dtype=torch.long), ctx)
        finally:
            for hd in handles:
                hd.remove()
        maps = official_attention_maps(self.records, tuple(latents.shape[2:]),
                                       len(self.unet_cfg["block_out_channels"]))
        self.records.clear()
        return official_concat([feats[3], feats[2], feats[1], feats[0]], maps)

    def forward(self, images: np.ndarray) -> torch.Tensor:
        """``VPDSeg.encode_decode`` on (B, H, W, 3) [0, 255] -> (B, num_classes, H, W) logits."""
        b, h, w, _ = images.shape
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0
        ph, pw = 64 * math.ceil(h / 64), 64 * math.ceil(w / 64)
        padded = torch.zeros(b, 3, ph, pw, dtype=self.dtype)
        padded[:, :, :h, :w] = x
        with torch.no_grad():
            latents = self.vae.encode(padded).latent_dist.mode()
        feats = self.features(latents, self.context(b))
        out = self.head(list(self.neck(feats)))
        out = F.interpolate(out, size=(ph, pw), mode="bilinear", align_corners=False)
        return out[:, :, :h, :w]

    # ----------------------------------------------------------------------------- the released layout
    def official_state(self) -> dict[str, np.ndarray]:
        """``VPDSeg.state_dict()`` of wl-zhao/VPD ``segmentation/models/vpd_seg.py``: ``encoder_vq`` (the
        AutoencoderKL without its deleted decoder: encoder, ``quant_conv``, ``post_quant_conv``), ``unet.unet``
        (``UNetWrapper(sd_model.model)``: ``diffusion_model`` with its ``out``), ``sd_model``'s buffers, then
        ``class_embeddings``, ``gamma``, ``text_adapter``, ``neck``, ``decode_head``; CompVis names placed by
        diffusers' own converters (``reference.torch_vpd.ldm_unet_state`` / ``ldm_vae_encoder_state``)."""
        vae = state_numpy(self.vae)
        sd = {"encoder_vq." + k: v for k, v in ldm_vae_encoder_state(vae, self.vae_cfg).items()}
        sd.update({"encoder_vq." + k: v for k, v in vae.items() if k.startswith("post_quant_conv.")})
        unet = state_numpy(self.unet)
        body = {k: v for k, v in unet.items() if not k.startswith(("conv_norm_out", "conv_out"))}
        prefix = "unet.unet.diffusion_model."
        sd.update({prefix + k: v for k, v in ldm_unet_state(body, self.unet_cfg).items()})
        for ldm, ours in (("out.0", "conv_norm_out"), ("out.2", "conv_out")):  # CompVis UNetModel.out
            for leaf in ("weight", "bias"):
                sd[f"{prefix}{ldm}.{leaf}"] = unet[f"{ours}.{leaf}"]
        sd.update({"sd_model." + k: v for k, v in sd_model_buffers().items()})
        sd["class_embeddings"] = self.table.detach().numpy().copy()
        sd["gamma"] = self.gamma.detach().numpy().copy()
        sd.update(state_numpy(self.adapter, "text_adapter."))
        sd.update(state_numpy(self.neck, "neck."))
        sd.update(state_numpy(self.head, "decode_head."))
        return sd
