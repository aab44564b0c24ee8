"""Shared defaults of every recipe: the official VPD NYUv2 480x480 recipe (wl-zhao/VPD depth/train.sh,
depth/train.py, depth/models_depth/optimizer.py, depth/utils_depth/criterion.py, depth/test.py,
depth/utils_depth/metrics.py).

Not run directly; ``nyu_480.py``, ``nyu_480_mmseg.py``, ``nyu_512.py`` and ``demo.py`` import it and override a
few fields. Override any field on the command line: ``--config.optimizer.max_lr=1e-4``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "depth"  # "depth" (VPDDepth) or "segmentation" (VPDSeg; configs/ade20k_512.py)
    c.seed = 0  # seeds the random init, the data order/augmentation and the step rng
    c.data_dir = "data"  # where `python -m vpd_jax.data.prepare` wrote the datasets
    c.dataset = "nyu_vpd/bts"  # prepared dataset name (nyu_vpd/bts, nyu_vpd/mmseg, nyu_vpd/synthetic, ...)
    c.train_split = "train"  # split to train on
    c.test_split = "test"  # split to evaluate on (both references select on the test set: wl-zhao/VPD depth/train.py,
    # mmsegmentation configs/vpd/vpd_sd_4xb8-25k_nyu-480x480.py save_best)
    c.class_rule = "official"  # class-table row of each image: NYU's file-name rules "official" (first substring) or
    # "mmseg" (prefix); "mean" (the table's mean row), "single" (row 0: a one-prompt table), "scene" (the image's
    # scene name, e.g. a KITTI drive or a folder, looked up in the table's class list through scene_map)
    c.scene_map = ""  # class_rule "scene": JSON {"scene": "class", "*": "class for the rest"} (default: same names)
    c.input_crop = "none"  # every image (train and test) first cropped to: "none" or "kb" (KITTI's 352x1216)
    c.worker_count = 0  # grain worker processes for decoding/augmentation (0 = in the main process)

    c.model = ml_collections.ConfigDict()
    c.model.size = "sd15"  # "sd15" (SD-1.5 UNet+VAE), "tiny" (VPDConfig.tiny) or "micro" (the demo's toy)
    c.model.max_depth = 10.0  # metres; depth = sigmoid * max_depth
    c.model.num_classes = 0  # scene classes (table rows less the mean row); 0: the class table's list, else NYU's 27
    c.model.dropout_ratio = 0.1  # segmentation: FPNHead dropout
    c.model.head_init = "official"  # depth-head init: "official" N(0, 0.001) or "mmseg" TruncNormal(0.02)
    c.model.dtype = "float32"  # compute dtype ("bfloat16" for speed; the references are fp32)
    c.model.param_dtype = "float32"  # parameter storage dtype
    c.model.matmul_precision = "default"  # fp32 dots/convs on GPUs: "default" (TF32 ok, fast) or "highest" (exact fp32)
    c.model.remat = False  # rematerialise UNet blocks in the backward pass (official use_checkpoint=True)
    c.model.attention_impl = ""  # "": auto (cuDNN fused for bf16 on GPUs, einsum on CPU); einsum|xla|cudnn|cudnn_or_xla
    c.model.init = "fast"  # random init: "fast" (seeded host fill by name) or "flax" (module initialisers)
    c.pretrained = ""  # SD weights for unet+vae: hub id, diffusers folder or CompVis .ckpt/.safetensors
    c.pretrained_vae = ""  # VAE weights alone (diffusers folder/file, CompVis file), replacing pretrained's VAE
    c.init_from = ""  # start from a whole VPD: official/mmseg .pth, converted folder, or a workdir (DIR, DIR:latest)
    c.class_embeddings = ""  # .npy (classes[+1], text_dim) CLIP scene table (python -m vpd_jax.tools.class_embeddings;
    # its .classes.json names the rows; without one: NYU's 27 scene classes in the official order)
    c.allow_random_init = False  # True: train without SD weights / a class table (experiments only; said loudly)

    c.aug = ml_collections.ConfigDict()
    c.aug.preset = "official_480"  # AugmentConfig preset: official_480, mmseg_480, mmseg_512 or none
    c.aug.crop_size = (480, 480)  # (h, w) random crop; overrides the preset's
    c.aug.cutdepth_units = 1000.0  # CutDepth pastes depth in these units per metre mod 256 (NYU mm; KITTI 256)

    c.train = ml_collections.ConfigDict()
    c.train.global_batch_size = 24  # images per update over all devices (official 3/GPU x 8)
    c.train.group_size = 3  # images per BatchNorm/SiLog group = the reference's per-GPU batch
    c.train.num_microbatches = 1  # gradient accumulation steps per update
    c.train.total_steps = 25225  # updates (official: 25 epochs x 1009)
    c.train.loss = "official"  # SiLog pooling: "official" (over a group) or "mmseg" (per image, then mean)
    c.train.silog_lambda = 0.5  # SiLog variance weight
    c.train.avg_non_ignore = False  # segmentation: cross-entropy mean over non-ignored pixels (mmseg default: all)
    c.train.bn_reduce = "mean"  # how groups' new BN running stats combine: "mean" or "first" (DDP rank 0)
    c.train.state_layout = "default"  # train state's device layouts: "default" (row-major) or "auto" (XLA picks; GPUs)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.schedule = "official"  # "official" (two-phase poly), "mmseg" (warm-up + poly), "mmcv_poly", "constant"
    c.optimizer.max_lr = 5e-4  # peak (official) / base (mmseg) / constant learning rate
    c.optimizer.min_lr = 3e-5  # floor of the official and mmcv_poly schedules
    c.optimizer.eta_min_ratio = 0.03  # mmseg schedule: floor / base lr (PolyLRRatio), so the floor follows max_lr
    c.optimizer.iters_per_epoch = 1009  # official schedule: updates per epoch
    c.optimizer.epochs = 25  # official schedule: epochs (warm-up is epochs // 2 of them)
    c.optimizer.warmup_steps = 12000  # mmseg schedule: end of the linear warm-up
    c.optimizer.decay_steps = 24000  # mmseg schedule: end of the poly decay
    c.optimizer.warmup_start_factor = 0.03  # mmseg schedule: first lr / base lr
    c.optimizer.warmup_ratio = 1e-6  # mmcv_poly schedule: first lr / regular lr
    c.optimizer.power = 1.0  # mmcv_poly schedule: poly power (to min_lr at train.total_steps)
    c.optimizer.weight_decay = 0.1  # AdamW decoupled weight decay
    c.optimizer.no_decay = "official"  # no decay on: "official" (1-D + biases), "mmseg" (biases), "mmcv_norm", "none"
    c.optimizer.unet_lr_mult = 0.01  # learning-rate multiplier of the UNet (both references 0.01)
    c.optimizer.b1 = 0.9  # Adam beta1
    c.optimizer.b2 = 0.999  # Adam beta2

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size (-1: what fsdp leaves)
    c.mesh.fsdp = 1  # devices that split the large parameter/optimizer tensors (FSDP)

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 1009  # evaluate the test split every this many updates and at the end; 0: end only; -1: never
    c.eval.tta = "official"  # test-time aug.: "official" (2 shift windows), "mmseg_slide_flip", "mmseg_512", "none"
    c.eval.flip = True  # average each window with its flipped prediction
    c.eval.shift_size = 2  # "official" TTA: square windows per image (VPD NYU 2; EVP KITTI 4)
    c.eval.batch_size = 8  # test images per forward call (per process)
    c.eval.clamp_pred = True  # official: inf -> 10, nan -> 1e-3 in the prediction before the metrics
    c.eval.crop = "eigen"  # metric crop: NYU "eigen" (scaled when not 480x640), KITTI "garg"/"eigen_kitti", "none"
    c.eval.crop_frame = "kb"  # KITTI crops as fractions of "kb" (the evaluated 352x1216; EVP) or "full" (BTS)
    c.eval.min_depth = 1e-3  # ground truth counted in (min_depth, max_depth) metres
    c.eval.max_depth = 10.0
    c.eval.num_pictures = 3  # test images drawn as image | GT | prediction at each evaluation
    c.eval.seg_scale = (2048, 512)  # segmentation: test resize (long, short edge; keep ratio), () for none
    c.eval.seg_crop = (512, 512)  # segmentation: sliding-window size
    c.eval.seg_stride = (341, 341)  # segmentation: sliding-window stride
    c.eval.seg_scales = (1.0,)  # segmentation: scale ratios averaged (0.5, 0.75, 1.0, 1.25, 1.5, 1.75: multi-scale)
    c.eval.seg_flip = False  # segmentation: also average the flipped image's probabilities
    c.eval.max_images = 0  # evaluate only the first N test images (0 = all)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1009  # save the full train state every this many updates (and at the end)
    c.checkpoint.keep = 2  # latest checkpoints kept; the best-by-RMSE weights are kept apart in best/
    c.checkpoint.async_save = True  # write checkpoints in a background thread

    c.log_every_steps = 50  # console + TensorBoard scalars every this many updates
    c.peak_flops_per_device = 989e12  # device peak FLOP/s for MFU (H100 SXM dense bf16: 989e12; V100 fp32 15.7e12)
    return c
