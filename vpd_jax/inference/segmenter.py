"""``Segmenter``: a VPD segmentation model ready for images of any size.

The reference test pipeline (wl-zhao/VPD segmentation/configs/_base_/datasets/ade20k_vpd.py and the model's
``test_cfg``): the image resized to fit (2048, 512) keeping its ratio (a short side of 512 for ordinary photos),
512x512 windows at stride 341 with their logits averaged where they overlap, the logits resized back to the
image and the argmax taken (``vpd_jax.evaluation.seg_evaluator``, the evaluator's own code); optionally the
multi-scale + flip test. One jitted forward per window shape.

    >>> from vpd_jax.inference.segmenter import Segmenter
    >>> s = Segmenter.from_checkpoint("ckpt/vpd_seg")      # converted folder, workdir or official .pth
    >>> labels = s.predict(image)                           # (H, W, 3) uint8 -> (H, W) int32 class ids
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np

from vpd_jax import visualize as vis
from vpd_jax.data.seg_augment import rescale_shape
from vpd_jax.data.segmentation import ADE20K_CLASSES
from vpd_jax.evaluation.seg_evaluator import MULTI_SCALES, SegEvalSettings, predict_labels
from vpd_jax.inference.images import as_rgb
from vpd_jax.models.vpd_seg import VPDSeg
from vpd_jax.weights.loader import LoadedModel, load_model

TEST_SCALE = (2048, 512)


class Segmenter:
    """``model``: a ``VPDSeg``; ``variables``: its ``{params, batch_stats, constants}``; ``scale``: the test resize
    (long, short edge; None: the image as it is); ``crop``/``stride``: the windows; ``multi_scale``: also the
    0.5-1.75 scales with flips (the second reported figure); ``batch_size``: windows per forward call."""

    def __init__(self, model: VPDSeg, variables, *, scale: tuple[int, int] | None = TEST_SCALE,
                 crop: int | tuple[int, int] = 512, stride: int | tuple[int, int] = 341, multi_scale: bool = False,
                 batch_size: int = 4, class_names: Sequence[str] | None = None):
        if not isinstance(model, VPDSeg):
            raise ValueError("Segmenter needs a segmentation model (VPDSeg); use Predictor for depth")
        crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
        stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
        self.model, self.config = model, model.config
        self.scale = tuple(scale) if scale else None
        self.settings = SegEvalSettings(crop=crop, stride=stride, scales=MULTI_SCALES if multi_scale else (1.0,),
                                        flip=multi_scale, windows_per_call=batch_size)
        n = self.config.num_classes
        self.class_names = list(class_names) if class_names is not None else (
            list(ADE20K_CLASSES) if n == len(ADE20K_CLASSES) else [str(i) for i in range(n)])
        self.palette = vis.class_palette(n)
        self.variables = jax.device_put(variables)
        apply = jax.jit(lambda v, x: model.apply(v, x))
        self._forward = lambda windows: apply(self.variables, windows)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, **kw) -> Segmenter:
        return cls(loaded.model, loaded.variables, class_names=loaded.class_names, **kw)

    @classmethod
    def from_checkpoint(cls, src: str | os.PathLike, *, dtype: str | None = None, **kw) -> Segmenter:
        loaded = load_model(src, overrides={"dtype": dtype} if dtype else None)
        return cls.from_loaded(loaded, **kw)

    def predict(self, image) -> np.ndarray:
        """(H, W, 3) uint8 image (gray and RGBA accepted) -> (H, W) int32 class ids."""
        image = as_rgb(image)
        h, w = image.shape[:2]
        x = image
        if self.scale is not None:
            size = rescale_shape(h, w, self.scale)
            if size != (h, w):  # as the evaluation loader (mmcv imrescale: cv2 bilinear)
                import cv2

                x = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        return predict_labels(self._forward, x, (h, w), self.settings)

    def describe(self) -> str:
        s = self.settings
        how = f"windows {s.crop[0]}x{s.crop[1]} stride {s.stride[0]}x{s.stride[1]}"
        if s.flip:
            how += ", scales " + ", ".join(f"{r:g}" for r in s.scales) + " + flip"
        return (f"{self.config.num_classes} classes, test resize {self.scale or 'none'}, {how}")
