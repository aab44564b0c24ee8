"""VPD semantic segmentation on ADE20K, the official recipe (wl-zhao/VPD segmentation/configs/
fpn_vpd_sd1-5_512x512_gpu8x2.py and its _base_ files, segmentation/models/vpd_seg.py, vpd/models.py).

Data:      python -m vpd_jax.data.prepare --source ade20k --ade_dir ADEChallengeData2016 --data_dir data
           (http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip: 20,210 train / 2,000 val)
Classes:   python -m vpd_jax.tools.class_embeddings --clip openai/clip-vit-large-patch14 --dataset ade20k \
             --templates author --out ade20k_class_embeddings.npy
           (or the table inside the released checkpoint; which sentences it was made from, "a photo of a {}" or
           the 80-template mean, the sources do not say)
Command:   python train.py --config=configs/ade20k_512.py --workdir=workdir/ade20k_512 --config.data_dir=data \
             --config.pretrained=runwayml/stable-diffusion-v1-5 --config.class_embeddings=ade20k_class_embeddings.npy
Evaluate:  python eval.py --workdir=workdir/ade20k_512   (single scale; --config.eval.seg_scales=0.5,0.75,1.0,1.25,
           1.5,1.75 --config.eval.seg_flip=True for the multi-scale + flip figure)
Hardware:  the paper used 8 GPUs x 2 images, SyncBN over all 16 (train.group_size=16 here, whatever the mesh);
           fp32 with the UNet's gradient checkpointing (--config.model.remat=True). Memory per device: see
           docs/benchmarks.md (AOT table).
Time:      80,000 updates; not yet run here (needs GPUs and SD weights).
Recipe:    random resize of (2048, 512) by 0.5-2.0, 512 crops with cat_max_ratio 0.75, flip, photometric distortion,
           mean = std = 127.5; AdamW lr 8e-5, weight decay 1e-3 (the repository's value since 2023-07-29; 5e-3
           before), UNet lr x0.1, VAE frozen, no decay on normalisation layers; linear warm-up over 1,500 updates
           from 1e-6 of the rate, then poly power 1 to 0; cross-entropy (ignore 255, mmseg's mean over all pixels).
           Test: resize to (2048, 512) keeping the ratio, 512 windows at stride 341.
Expected:  ADE20K val mIoU 53.7 single scale, 54.6 multi-scale + flip (paper, SD-1.5); users report 53.1.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.task = "segmentation"
    c.dataset = "ade20k_vpd/ade"
    c.train_split = "train"
    c.test_split = "validation"
    c.model.num_classes = 0  # the class table's list, else ADE20K's 150
    c.aug.preset = "ade_512"
    c.aug.crop_size = (512, 512)
    c.aug.resize_scale = (2048, 512)
    c.train.global_batch_size = 16
    c.train.group_size = 16  # SyncBN over the 16 images of an update
    c.train.total_steps = 80000
    c.optimizer.schedule = "mmcv_poly"
    c.optimizer.max_lr = 8e-5
    c.optimizer.min_lr = 0.0
    c.optimizer.power = 1.0
    c.optimizer.warmup_steps = 1500
    c.optimizer.warmup_ratio = 1e-6
    c.optimizer.weight_decay = 1e-3
    c.optimizer.unet_lr_mult = 0.1
    c.optimizer.no_decay = "mmcv_norm"  # transformer norms: no decay, full rate (mmcv key order)
    c.eval.every_steps = 8000
    c.eval.batch_size = 4  # windows per forward call
    c.eval.num_pictures = 3
    c.checkpoint.every_steps = 8000
    return c
