"""The README's demo: a toy VPD (random SD-shaped UNet and VAE, 0.4M parameters) on the synthetic scenes.

Command:   make demo   (= .venv/bin/python demo.py: prepares demo_out/data, trains into demo_out/workdir, evaluates)
           or: python train.py --config=configs/demo.py --workdir=demo_out/workdir
Hardware:  2 CPU cores.
Time:      ~20 s to compile the step (cold cache), then ~0.25 s per update of 8 images at 120x120; `make demo`
           takes about 1.5 min in all.
Expected:  synthetic test split (not NYUv2): RMSE 0.978 m, REL 0.298 against the constant mean-training-depth
           baseline's 1.526 / 0.675 (36% and 56% lower; README "Results"). NYUv2 numbers need
           configs/nyu_480.py and real SD weights.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.data_dir = "demo_out/data"  # demo.py prepares the synthetic scenes here (git-ignored)
    c.dataset = "nyu_vpd/synthetic"
    c.model.size = "micro"  # the toy network (VPDConfig.micro)
    c.allow_random_init = True  # no SD weights or CLIP table here: a random toy, on purpose
    c.aug.preset = "official_480"  # CutDepth, flip, crop, photometric as the official recipe
    c.aug.crop_size = (120, 120)  # square crops of the 120x160 scenes, as 480x480 of 480x640
    c.train.global_batch_size = 8
    c.train.group_size = 4
    c.train.total_steps = 200
    c.optimizer.schedule = "mmseg"  # linear warm-up then poly decay, scaled down to the short run
    c.optimizer.max_lr = 2e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.decay_steps = 200
    c.optimizer.unet_lr_mult = 1.0  # a random UNet must learn at the full rate (0.01 is for SD weights)
    c.optimizer.weight_decay = 0.01
    c.eval.every_steps = 0  # evaluate at the end only
    c.eval.batch_size = 8
    c.eval.num_pictures = 4
    c.checkpoint.every_steps = 100
    c.log_every_steps = 10
    c.peak_flops_per_device = 50e9  # a rough 2-core CPU figure; MFU here is only illustrative
    return c
