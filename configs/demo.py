"""The README's demo: a toy VPD (SD-shaped UNet and VAE, 0.4M parameters) on the synthetic rooms.

Command:   make demo   (= .venv/bin/python demo.py: prepares demo_out/data, trains the toy VAE as an autoencoder
           into demo_out/vae, trains this config into demo_out/workdir, evaluates against the baselines)
           or, once demo_out/vae exists: python train.py --config=configs/demo.py --workdir=demo_out/workdir
Hardware:  2 CPU cores.
Time:      about 4 minutes in all on the 2-core development machine: 1.5 for the autoencoder, 2 for 400 updates
           of 8 images at 120x120 (after about 20 s of compiling), the rest for data and evaluation.
Expected:  synthetic test split (not NYUv2), against the best baseline fitted on the training split (README
           "Results"). NYUv2 numbers need configs/nyu_480.py and real SD weights.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.data_dir = "demo_out/data"  # demo.py prepares the synthetic scenes here (git-ignored)
    c.dataset = "nyu_vpd/synthetic"
    c.model.size = "micro"  # the toy network (VPDConfig.micro)
    c.allow_random_init = True  # no SD weights or CLIP table here: a random toy, on purpose
    # Random crops only: the rooms are lit by a flash on the camera, so brightness is a depth cue that the
    # official photometric augmentation (and CutDepth's pasted strips) would scramble (measured: 0.838 m RMSE
    # with it, 0.762 without, 400 updates).
    c.aug.preset = "none"
    c.aug.crop_size = (120, 120)  # square crops of the 120x160 scenes, as 480x480 of 480x640
    # SD's VAE is pretrained; a random frozen one loses the picture's brightness (its latents then predict no
    # better than a constant), so demo.py first trains this toy VAE as an autoencoder of the training images.
    c.pretrained_vae = "demo_out/vae"
    c.train.global_batch_size = 8
    c.train.group_size = 4
    c.train.total_steps = 400
    c.optimizer.schedule = "mmseg"  # linear warm-up then poly decay, scaled down to the short run
    c.optimizer.max_lr = 2e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.decay_steps = 400
    c.optimizer.unet_lr_mult = 1.0  # a random UNet must learn at the full rate (0.01 is for SD weights)
    c.optimizer.weight_decay = 0.01
    c.eval.every_steps = 0  # evaluate at the end only
    c.eval.batch_size = 8
    c.eval.num_pictures = 4
    c.checkpoint.every_steps = 200
    c.log_every_steps = 10
    c.peak_flops_per_device = 50e9  # a rough 2-core CPU figure; MFU here is only illustrative
    return c
