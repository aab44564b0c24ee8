"""VPD NYUv2, mmsegmentation's 512 recipe (mmsegmentation configs/vpd/vpd_sd_4xb8-25k_nyu-512x512.py,
configs/_base_/datasets/nyu_512x512.py).

Random resize (scale (768, 512), ratio 0.8-1.5) and 512x512 crops for training; evaluation resizes 480x640 to
512x683, slides 512 windows at stride 128 with flips and resizes the prediction back.

Command:   python train.py --config=configs/nyu_512.py --workdir=workdir/nyu_512 \
             --config.data_dir=data --config.pretrained=runwayml/stable-diffusion-v1-5 \
             --config.class_embeddings=class_embeddings.npy
Hardware:  as nyu_480_mmseg (global batch 32, group 8).
Time:      25,000 updates.
Expected:  NYUv2 test: RMSE 0.258, REL 0.072, d1 0.963, log10 0.031 (mmseg 20230918-60cefcff).
"""

from configs import nyu_480_mmseg


def get_config():
    c = nyu_480_mmseg.get_config()
    c.aug.preset = "mmseg_512"
    c.aug.crop_size = (512, 512)
    c.eval.tta = "mmseg_512"
    return c
