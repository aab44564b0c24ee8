"""VPD NYUv2, mmsegmentation's recipe (mmsegmentation configs/vpd/vpd_sd_4xb8-25k_nyu-480x480.py,
configs/_base_/schedules/schedule_25k.py).

Command:   python train.py --config=configs/nyu_480_mmseg.py --workdir=workdir/nyu_480_mmseg \
             --config.data_dir=data --config.pretrained=runwayml/stable-diffusion-v1-5 \
             --config.class_embeddings=class_embeddings.npy
Hardware:  4x8 A100 images in the reference (global batch 32, per-GPU BatchNorm over 8); any mesh with
           group_size=8, e.g. 4 or 8 GPUs, or fewer with num_microbatches.
Time:      25,000 updates; roughly a day on 4x A100 (not reported by mmseg).
Expected:  NYUv2 test: RMSE 0.253, REL 0.069, d1 0.964, log10 0.030 (mmseg 20230908-66144bc4).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.class_rule = "mmseg"
    c.model.head_init = "mmseg"
    c.aug.preset = "mmseg_480"
    c.train.global_batch_size = 32
    c.train.group_size = 8
    c.train.total_steps = 25000
    c.train.loss = "mmseg"
    c.train.bn_reduce = "first"
    c.optimizer.schedule = "mmseg"
    c.optimizer.max_lr = 1e-3
    c.optimizer.no_decay = "mmseg"
    c.eval.tta = "mmseg_slide_flip"
    c.eval.clamp_pred = False
    c.eval.every_steps = 1000
    c.checkpoint.every_steps = 1000
    return c
