"""Fine-tune a trained VPD (a released checkpoint, converted or not, or a workdir) on your own folder of
image/depth pairs.

Data:      python -m vpd_jax.data.prepare --source folder --images 'rooms/rgb/**/*.jpg' \
             --depths 'rooms/depth/**/*.png' --depth_scale 1000 --name my_rooms --data_dir data
           (pairs by relative path or stem, any size, a hashed 5% val split; docs/data.md).
Command:   python train.py --config=configs/finetune_folder.py --workdir=workdir/my_rooms \
             --config.init_from=vpd_depth_480x480.pth --config.dataset=depth_folder/my_rooms
           (init_from: the official or mmseg .pth, a folder from python -m vpd_jax.tools.convert, or a workdir).
           Then: python eval.py --config=configs/finetune_folder.py --config.dataset=depth_folder/my_rooms \
             --workdir=workdir/my_rooms; python predict.py --checkpoint workdir/my_rooms --input more/ --output out/
Scenes:    by default every image gets the class table's mean row (class_rule "mean": no labels needed). With scene
           names (the folder each image sits in, --scene_from at preparation), make a table of them and let each
           image find its row: python -m vpd_jax.tools.class_embeddings --clip CLIP --classes_file scenes.txt
           --out my_scenes.npy, then --config.class_embeddings=my_scenes.npy --config.class_rule=scene
           [--config.scene_map=map.json for names that differ: {"folder name": "class", "*": "class for the rest"}].
           The network keeps its weights; the table is replaced.
Settings:  the released NYU models' crop (480x480; --config.aug.crop_size=H,W for other image sizes, at most
           the images' own), their augmentations, and a short schedule: linear warm-up over 200 updates, poly decay
           to 2,000, at a fifth of VPD's peak rate (the network is trained already), batch 6 in BatchNorm groups of
           3. Outdoor or deeper scenes: --config.model.max_depth (metres; the NYU models' is 10) and
           --config.eval.max_depth.
Evaluation: the val split, every image as it is (eval.batch_size 1 allows mixed sizes), mmseg's sliding
           windows with flip, no metric crop (eval.crop "none": the Eigen crop is NYU's border), depth counted in
           (1e-3, max_depth).
Hardware:  one GPU with bf16 (--config.model.dtype=bfloat16) or remat, as for NYU; time grows with the updates.
Expected:  depends on your data; `make demo`'s synthetic rooms are the smallest example of the whole path.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.dataset = "depth_folder/mine"  # set to the name prepare printed
    c.test_split = "val"
    c.class_rule = "mean"
    c.aug.preset = "official_480"
    c.train.global_batch_size = 6
    c.train.group_size = 3
    c.train.total_steps = 2000
    c.optimizer.schedule = "mmseg"
    c.optimizer.max_lr = 1e-4
    c.optimizer.warmup_steps = 200
    c.optimizer.decay_steps = 2000
    c.eval.tta = "mmseg_slide_flip"
    c.eval.crop = "none"
    c.eval.batch_size = 1
    c.eval.every_steps = 500
    c.checkpoint.every_steps = 500
    return c
