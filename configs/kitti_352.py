"""VPD on KITTI (Eigen split): VPD's network and optimizer with the KITTI protocol and settings of its successor
EVP (Lavreniuk/EVP depth/train.sh, depth/dataset/kitti.py, depth/test.py, depth/utils_depth/metrics.py), whose
backbone is VPD's. The VPD paper reports no KITTI result.

Data:      python -m vpd_jax.data.prepare --source kitti --kitti_raw KITTI_RAW --kitti_depth DATA_DEPTH_ANNOTATED \
             --train_list eigen_train_files_with_gt.txt --test_list eigen_test_files_with_gt.txt --data_dir data
           (the lists: cleinc/bts train_test_inputs/; 23,158 training images, 652 of the 697 test images have
           ground truth). docs/data.md says where each part comes from.
Scene:     python -m vpd_jax.tools.class_embeddings --clip openai/clip-vit-large-patch14 \
             --classes "street scene" --out kitti_scene.npy
           KITTI has no per-image scene label, so every image is conditioned on one prompt (class_rule "single",
           row 0 of this one-row table): that is what EVP does (class_id 0 for every KITTI image), and an indoor
           NYU table's mean row would condition a street on rooms. Other choices: a table of your own prompts with
           class_rule "scene" and a drive -> prompt map (--config.scene_map=map.json, {"2011_09_26_drive_0001_sync":
           "city street", "*": "road"}), or class_rule "mean" (the table's mean row).
Command:   python train.py --config=configs/kitti_352.py --workdir=workdir/kitti_352 --config.data_dir=data \
             --config.pretrained=runwayml/stable-diffusion-v1-5 --config.class_embeddings=kitti_scene.npy
Hardware:  EVP trained on 2 GPUs x 3 images; any mesh with the same global batch of 6 (group_size=3 keeps the
           per-GPU BatchNorm/SiLog groups), e.g. 1 GPU with --config.train.num_microbatches=2.
Time:      57,900 updates (15 epochs of 3,860). Not yet timed on a GPU.
Protocol:  every image KB-cropped to 352x1216 (input_crop "kb"), random 352x352 crops (EVP's --crop_h/--crop_w; the
           352x704 crop of other KITTI codebases: --config.aug.crop_size=352,704), flip, the photometric set and
           CutDepth (pasting depth in 1/256 m, as EVP's loader holds it then), max depth 80 m; test: 4 shifted
           352x352 windows + flip, depth counted in (1e-3, 80) m inside Garg's crop of the 352x1216 frame
           (--config.eval.crop=eigen_kitti for Eigen's; --config.eval.crop_frame=full for BTS' full-frame crops).
Targets:   no VPD figure exists. VPD's successors on this backbone report (their own networks, not this one):
           EVP RMSE 2.015, REL 0.048, d1 0.980; MetaPrompts RMSE 1.928, REL 0.047.
Not here:  EVP's own additions (its inverse multi-attentive refinement, layer-wise lr decay 0.9, drop path 0.3).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.dataset = "kitti_vpd/eigen"
    c.input_crop = "kb"
    c.class_rule = "single"
    c.model.max_depth = 80.0
    c.aug.preset = "official_480"  # CutDepth every 4th image, flip, photometric (the VPD/EVP loader)
    c.aug.crop_size = (352, 352)
    c.aug.cutdepth_units = 256.0
    c.train.global_batch_size = 6
    c.train.group_size = 3
    c.train.total_steps = 57900
    c.optimizer.max_lr = 3e-4
    c.optimizer.min_lr = 1e-7
    c.optimizer.epochs = 15
    c.optimizer.iters_per_epoch = 3860  # ceil(23,158 / 2 GPUs / 3 per GPU), as a padded DistributedSampler gives
    c.eval.shift_size = 4
    c.eval.crop = "garg"
    c.eval.crop_frame = "kb"
    c.eval.min_depth = 1e-3
    c.eval.max_depth = 80.0
    c.eval.every_steps = 3860
    c.checkpoint.every_steps = 3860
    return c
