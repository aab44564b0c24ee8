"""PyTorch trainers of the two VPD depth recipes, built from the references, never from our code.

* ``train_official``: wl-zhao/VPD ``depth/train.py`` as it runs on one GPU: AdamW parameter groups by the rule of
  ``depth/models_depth/optimizer.py`` (``LDMOptimizerConstructor``) over the official PyTorch parameter names (no
  weight decay for 1-D tensors and names ending in ``.bias``; learning rate x0.01 for every name containing
  ``unet``; the VAE has ``requires_grad=False``), the two-phase power-0.9 learning rate computed inside the
  loop from ``global_step`` incremented before use (so the first update sees 1), ``SiLogLoss`` of
  ``depth/utils_depth/criterion.py`` pooled over the batch on ``target > 0`` with lambda 0.5, BatchNorm in train
  mode (momentum 0.1).
* ``train_mmseg``: mmsegmentation 1.2.2's own modules where they run without the ``ldm`` package: the real
  ``VPDDepthHead`` (its ``loss_by_feat``: per-image SiLog), ``TextAdapter``, the ``optim_wrapper`` and
  ``param_scheduler`` of ``configs/vpd/vpd_sd_4xb8-25k_nyu-480x480.py`` built by mmseg's
  ``ForceDefaultOptimWrapperConstructor`` and mmengine's ``LinearLR`` / mmseg's ``PolyLRRatio`` / ``ConstantLR``
  (begin/end rescaled to a short run), stepped once per iteration as mmengine's ``ParamSchedulerHook`` does.

The backbone of both is diffusers' PyTorch UNet and VAE (``reference.torch_vpd.TorchVPD``). ``MISTAKES`` are seeded
errors a parity test must catch.
"""

from __future__ import annotations

import importlib.machinery
import logging
import pathlib
import sys
import types

import numpy as np
import torch
from torch import nn as tnn

from reference.torch_vpd import TorchVPD

# Seeded mistakes of the official recipe (each must make a parity test fail).
MISTAKES = ("wrong_decay_rule", "no_unet_lr_scale", "frozen_text_adapter", "schedule_off_by_one")


def _batch_tensors(batch, dtype=torch.float32):
    depth = torch.from_numpy(np.asarray(batch["depth"], np.float32)).to(dtype)
    return np.asarray(batch["image"]), depth, [int(c) for c in np.asarray(batch["class_id"])]


# ----------------------------------------------------------------------------------------------- official

def official_silog(pred: torch.Tensor, target: torch.Tensor, lambd: float = 0.5) -> torch.Tensor:
    """``depth/utils_depth/criterion.py`` ``SiLogLoss``: pooled over every valid pixel of the batch."""
    valid_mask = (target > 0).detach()
    diff_log = torch.log(target[valid_mask]) - torch.log(pred[valid_mask])
    return torch.sqrt(torch.pow(diff_log, 2).mean() - lambd * torch.pow(diff_log.mean(), 2))


def official_param_groups(named_parameters, base_lr: float, weight_decay: float, mistake: str | None = None):
    """``LDMOptimizerConstructor.add_params`` over ``model.named_parameters()``."""
    groups: dict[str, dict] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue  # frozen weights
        if mistake == "wrong_decay_rule":
            no_decay = name.endswith(".bias")
        else:
            no_decay = len(param.shape) == 1 or name.endswith(".bias")
        group_name, this_wd = ("no_decay", 0.0) if no_decay else ("decay", weight_decay)
        layer_id = 0 if ("unet" in name or "cond_stage_model" in name) else 1
        group_name = f"layer_{layer_id}_{group_name}"
        if group_name not in groups:
            scale = 0.01 if layer_id == 0 and mistake != "no_unet_lr_scale" else 1.0
            groups[group_name] = {"weight_decay": this_wd, "params": [], "param_names": [], "lr_scale": scale,
                                  "group_name": group_name, "lr": scale * base_lr}
        groups[group_name]["params"].append(param)
        groups[group_name]["param_names"].append(name)
    return list(groups.values())


def official_lr(global_step: int, iterations: int, half_epoch: int, max_lr: float, min_lr: float) -> float:
    """``depth/train.py``'s rate for ``global_step`` (1-based)."""
    if global_step < iterations * half_epoch:
        return (max_lr - min_lr) * (global_step / iterations / half_epoch) ** 0.9 + min_lr
    return max(min_lr, (min_lr - max_lr) * (global_step / iterations / half_epoch - 1) ** 0.9 + max_lr)


def train_official(ref: TorchVPD, batches, *, max_lr: float, min_lr: float, iterations: int, epochs: int,
                   weight_decay: float = 0.1, mistake: str | None = None, threads: int = 2) -> list[float]:
    """Trains ``ref`` in place on ``batches`` as ``depth/train.py``; returns the loss of every update."""
    if mistake == "frozen_text_adapter":
        for p in ref.adapter.parameters():
            p.requires_grad_(False)
    groups = official_param_groups(ref.official_named_parameters(), max_lr, weight_decay, mistake)
    optimizer = torch.optim.AdamW(groups, lr=max_lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    half_epoch = epochs // 2
    global_step = 0
    losses = []
    ref.train()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in batches:
            if mistake != "schedule_off_by_one":
                global_step += 1
            current_lr = official_lr(global_step, iterations, half_epoch, max_lr, min_lr)
            if mistake == "schedule_off_by_one":
                global_step += 1
            for group in optimizer.param_groups:
                group["lr"] = current_lr * group["lr_scale"]
            images, depth, class_ids = _batch_tensors(batch, ref.dtype)
            preds = ref.forward(images, class_ids)
            optimizer.zero_grad()
            loss = official_silog(preds, depth)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(old_threads)
        ref.train(False)
    return losses


# -------------------------------------------------------------------------------------------------- mmseg

def import_mmseg():
    """mmseg's modules: ``mmseg.models`` imports mmcv's compiled ops module, which mmcv-lite lacks; a stand-in
    whose every op raises is registered first (none of the modules used here calls one)."""
    if "mmcv._ext" not in sys.modules:
        stub = types.ModuleType("mmcv._ext")

        def __getattr__(name):
            if name.startswith("__"):
                raise AttributeError(name)

            def op(*args, **kwargs):
                raise RuntimeError(f"mmcv._ext stand-in: the compiled op {name} was called")

            return op

        stub.__getattr__ = __getattr__
        stub.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)  # no loader: "mmcv-full not installed"
        sys.modules["mmcv._ext"] = stub
    import mmseg
    import mmseg.models  # noqa: F401  (registers the modules)
    from mmengine.logging import MMLogger

    MMLogger.get_current_instance().setLevel(logging.WARNING)  # one INFO line per parameter otherwise
    return mmseg


def mmseg_config(name: str = "vpd_sd_4xb8-25k_nyu-480x480.py"):
    """One of mmseg's own VPD configs (shipped in the package's ``.mim/configs``), parsed, nothing built."""
    from mmengine.config import Config

    mmseg = import_mmseg()
    return Config.fromfile(str(pathlib.Path(mmseg.__file__).parent / ".mim" / "configs" / "vpd" / name))


OFFICIAL_TO_MMSEG_HEAD = (("encoder.layer1.", "conv1."), ("encoder.layer2.0.", "conv2."),
                          ("encoder.out_layer.", "conv_aggregation."), ("decoder.", "decoder."),
                          ("last_layer_depth.", "depth_pred_layer."))


class MMSegVPD(tnn.Module):
    """mmseg's ``DepthEstimator`` around the VPD backbone: ``backbone.{unet, encoder_vq, text_adapter, gamma,
    class_embeddings}`` and mmseg's ``VPDDepthHead`` as ``decode_head``, with the weights of ``ref``."""

    def __init__(self, ref: TorchVPD, pad: int, fmap_border: int):
        super().__init__()
        import_mmseg()
        from mmseg.models.backbones.vpd import TextAdapter
        from mmseg.models.decode_heads.vpd_depth_head import VPDDepthHead

        self.ref, self.pad = ref, pad
        h = ref.head_cfg
        self.backbone = tnn.Module()
        self.backbone.unet = ref.unet
        self.backbone.encoder_vq = ref.vae
        self.backbone.text_adapter = TextAdapter(text_dim=h["text_dim"])
        self.backbone.text_adapter.load_state_dict(ref.adapter.state_dict())
        self.backbone.gamma = tnn.Parameter(ref.gamma.detach().clone())
        table = ref.table.clone()
        self.backbone.register_buffer("class_embeddings", torch.cat([table, table.mean(0, keepdim=True)]))
        assert h["neck_features"] == 8 * h["decoder_features"], "mmseg's head needs feature_dim = 8 * embed_dim"
        self.decode_head = VPDDepthHead(max_depth=10.0, in_channels=list(ref.unet_cfg["block_out_channels"]),
                                        embed_dim=h["decoder_features"], feature_dim=h["neck_features"],
                                        num_deconv_layers=len(h["deconv_filters"]),
                                        num_deconv_filters=tuple(h["deconv_filters"]), fmap_border=fmap_border)
        state = {}
        for k, v in ref.head.state_dict().items():
            new = next((dst + k[len(src):] for src, dst in OFFICIAL_TO_MMSEG_HEAD if k.startswith(src)), None)
            assert new is not None, k
            state[new] = v
        missing, unexpected = self.decode_head.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith("loss_decode") for k in missing), (missing, unexpected)
        self.decode_head.to(ref.dtype)
        self.backbone.text_adapter.to(ref.dtype)

    def loss(self, batch) -> torch.Tensor:
        """``DepthEstimator.loss``: the backbone (``VPD.forward`` with ``class_embed_select``), the head's
        ``loss_by_feat`` on ``SegDataSample``s holding ``gt_depth_map``."""
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample

        images, depth, class_ids = _batch_tensors(batch, self.ref.dtype)
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.ref.dtype)
        x = (x - 127.5) / 127.5  # SegDataPreProcessor(mean=std=127.5)
        b = x.shape[0]
        emb = self.backbone.class_embeddings[class_ids]
        ctx = self.backbone.text_adapter(emb, self.backbone.gamma).unsqueeze(1)
        x = torch.nn.functional.pad(x, (0, self.pad - x.shape[-1], 0, self.pad - x.shape[-2]), value=0)
        with torch.no_grad():
            latents = self.backbone.encoder_vq.encode(x).latent_dist.mode()
        feats = self.ref.features(latents, ctx)
        pred = self.decode_head(feats)
        samples = []
        for i in range(b):
            s = SegDataSample()
            s.gt_depth_map = PixelData(data=depth[i][None])
            samples.append(s)
        losses = self.decode_head.loss_by_feat(pred, samples)
        return sum(losses.values())

    def export(self) -> TorchVPD:
        """``ref`` with this module's trained head, adapter and gamma copied back (official names)."""
        inverse = [(dst, src) for src, dst in OFFICIAL_TO_MMSEG_HEAD]
        state = {}
        for k, v in self.decode_head.state_dict().items():
            new = next((dst + k[len(src):] for src, dst in inverse if k.startswith(src)), None)
            if new is not None:
                state[new] = v
        self.ref.head.load_state_dict(state)
        self.ref.adapter.load_state_dict(self.backbone.text_adapter.state_dict())
        with torch.no_grad():
            self.ref.gamma.copy_(self.backbone.gamma)
        return self.ref


def train_mmseg(ref: TorchVPD, batches, *, pad: int, fmap_border: int, warmup_end: int, decay_end: int,
                total: int, max_lr: float | None = None) -> list[float]:
    """Trains ``ref`` in place with mmseg's recipe (its config's optimizer, schedulers and loss; ``max_lr``
    replaces the configured rate); returns the loss of every update."""
    from mmseg.engine.optimizers import ForceDefaultOptimWrapperConstructor

    cfg = mmseg_config()
    model = MMSegVPD(ref, pad, fmap_border)
    wrapper_cfg = cfg.optim_wrapper.to_dict()
    assert wrapper_cfg.pop("constructor") == "ForceDefaultOptimWrapperConstructor"
    paramwise_cfg = wrapper_cfg.pop("paramwise_cfg")
    if max_lr is not None:
        wrapper_cfg["optimizer"]["lr"] = max_lr
    wrapper = ForceDefaultOptimWrapperConstructor(wrapper_cfg, paramwise_cfg)(model)
    # The 25k schedule's boundaries (12000, 24000, 25000) moved to this run's, everything else as configured.
    ends = {12000: warmup_end, 24000: decay_end, 25000: total}
    schedulers = []
    for sched in cfg.param_scheduler:
        sched = dict(sched)
        kind = sched.pop("type")
        sched["begin"], sched["end"] = ends.get(sched["begin"], sched["begin"]), ends[sched["end"]]
        schedulers.append(_scheduler(kind)(optimizer=wrapper, **sched))
    losses = []
    ref.train()
    model.decode_head.train()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for batch in batches:
            loss = model.loss(batch)
            wrapper.update_params(loss)
            for s in schedulers:  # ParamSchedulerHook.after_train_iter
                s.step()
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(old_threads)
        ref.train(False)
    model.export()
    return losses


def _scheduler(kind: str):
    from mmengine.optim.scheduler import ConstantLR, LinearLR
    from mmseg.engine.schedulers import PolyLRRatio

    return {"LinearLR": LinearLR, "PolyLRRatio": PolyLRRatio, "ConstantLR": ConstantLR}[kind]
