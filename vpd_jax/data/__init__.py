"""NYUv2/KITTI depth and ADE20K segmentation data: TFDS builders for the on-disk layouts VPD users have, synthetic
scenes, VPD's augmentations and grain loaders. Importing this package imports nothing heavy;
TensorFlow/TFDS/grain/cv2/h5py load on use.

* ``python -m vpd_jax.data.prepare --source {bts,mat,mmseg,synthetic,fastdepth} ... --data_dir DIR``
* ``vpd_jax.data.loader.make_train_loader`` / ``make_eval_loader``
* ``vpd_jax.data.augment.AugmentConfig``
* segmentation: ``--source {ade20k,synthetic_seg}``, ``vpd_jax.data.seg_loader.make_seg_train_loader`` /
  ``make_seg_eval_loader``, ``vpd_jax.data.seg_augment.SegAugmentConfig``, ``vpd_jax.data.segmentation``
* ``vpd_jax.data.catalog``: dataset names, ``prepared_datasets(data_dir)``, ``require`` (one-line errors)
"""

from vpd_jax.data.catalog import DatasetNotFoundError, dataset_names, prepared_datasets  # noqa: F401
