"""VPD NYUv2, the official recipe (wl-zhao/VPD depth/train.sh, depth/train.py,
depth/models_depth/optimizer.py, depth/utils_depth/criterion.py, depth/test.py, depth/utils_depth/metrics.py).

Command:   python train.py --config=configs/nyu_480.py --workdir=workdir/nyu_480 \
             --config.data_dir=data --config.pretrained=runwayml/stable-diffusion-v1-5 \
             --config.class_embeddings=class_embeddings.npy
Hardware:  the paper used 8x V100 (3 images each, fp32); here any mesh with the same global batch of 24
           (group_size=3 keeps the per-GPU BatchNorm/SiLog semantics), e.g. 8 GPUs or 1 GPU with
           --config.train.num_microbatches=8. Memory per device at 3 images (XLA:GPU, H100; README): fp32
           33.5 GiB, 17.2 with --config.model.remat=True (the official use_checkpoint=True; use it on 24-32 GB
           cards), bf16 (--config.model.dtype=bfloat16) 15.0 GiB.
Time:      ~12 h on 8x V100 (the authors in wl-zhao/VPD GitHub issue 29); 25,225 updates.
Expected:  NYUv2 test (654 images, shift-window + flip TTA): RMSE 0.254, REL 0.069, d1 0.964, log10 0.030.
"""

from configs import base


def get_config():
    return base.get_config()
