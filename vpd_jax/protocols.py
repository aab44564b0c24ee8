"""The datasets' evaluation protocols as constants and boxes, defined once for the whole project.

NYUv2 (wl-zhao/VPD depth/utils_depth/metrics.py ``cropping_img``; mmsegmentation
mmseg/evaluation/metrics/depth_metric.py): 480x640 images, the Eigen crop rows 45:471 and columns 41:601, depth
counted in (1e-3, 10) m.

KITTI, Eigen split, as the KITTI depth codebases run it (cleinc/bts pytorch/bts_dataloader.py and
pytorch/bts_eval.py; vinvino02/GLPDepth code/dataset/kitti.py and code/utils/metrics.py; Lavreniuk/EVP
depth/dataset/kitti.py and depth/utils_depth/metrics.py):

* the KB crop (KITTI benchmark size): 352x1216 from the bottom rows, centred columns:
  ``top = int(H - 352)``, ``left = int((W - 1216) / 2)``; applied to the images (train and test) and the ground
  truth;
* depth predicted up to 80 m and counted in (1e-3, 80) m;
* the metric crop as fractions of the frame, each bound ``int(fraction * size)``: Garg's
  (rows 0.40810811-0.99189189, columns 0.03594771-0.96405229; the default) or Eigen's (rows 0.3324324-0.91351351,
  columns 0.0359477-0.96405229). BTS applies the fractions to the full frame (its prediction pasted back into the
  uncropped image); GLPDepth and EVP, whose figures are the VPD family's, to the KB-cropped 352x1216 frame.

Boxes are ``(top, bottom, left, right)``, half-open, in pixels. Pure Python; imported by the data loaders and
by the metrics alike.
"""

from __future__ import annotations

NYU_HEIGHT = 480
NYU_WIDTH = 640
NYU_IMAGE_SHAPE = (NYU_HEIGHT, NYU_WIDTH)
EIGEN_CROP = (45, 471, 41, 601)  # NYU's Eigen crop: rows 45:471, columns 41:601
MIN_DEPTH_EVAL = 1e-3
MAX_DEPTH_EVAL = 10.0

KITTI_KB_CROP_SIZE = (352, 1216)
KITTI_MAX_DEPTH = 80.0  # model.max_depth of the KITTI recipes
KITTI_MIN_DEPTH_EVAL = 1e-3
KITTI_MAX_DEPTH_EVAL = 80.0
KITTI_DEPTH_SCALE = 256.0  # annotated depth PNGs: metres = uint16 value / 256
GARG_CROP_FRACTIONS = (0.40810811, 0.99189189, 0.03594771, 0.96405229)
KITTI_EIGEN_CROP_FRACTIONS = (0.3324324, 0.91351351, 0.0359477, 0.96405229)
KITTI_CROPS = {"garg": GARG_CROP_FRACTIONS, "eigen_kitti": KITTI_EIGEN_CROP_FRACTIONS}
CROP_FRAMES = ("kb", "full")  # KITTI metric crop fractions of: the KB-cropped frame (EVP, GLPDepth) or the full


def kb_crop_origin(height: int, width: int) -> tuple[int, int]:
    """``(top, left)`` of the 352x1216 KB crop in a ``height x width`` KITTI frame."""
    h, w = KITTI_KB_CROP_SIZE
    if height < h or width < w:
        raise ValueError(f"a {height}x{width} image is smaller than the {h}x{w} KB crop")
    return int(height - h), int((width - w) / 2)


def fraction_box(shape: tuple[int, int], fractions: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` = ``int(fraction * size)`` of a ``(height, width)`` frame."""
    h, w = shape
    t, b, left, r = fractions
    return int(t * h), int(b * h), int(left * w), int(r * w)


def kitti_metric_box(crop: str, frame: str, full_shape: tuple[int, int],
                     origin: tuple[int, int] = (0, 0), shape: tuple[int, int] | None = None):
    """The KITTI metric crop ``crop`` ("garg", "eigen_kitti") in the coordinates of an evaluated array of
    ``shape`` that starts at ``origin`` of the original ``full_shape`` frame (the KB crop, or the frame itself).

    ``frame="kb"`` takes the fractions of the evaluated array (EVP, GLPDepth); ``"full"`` of the full frame (BTS),
    shifted by ``origin`` and clipped to the array.
    """
    if crop not in KITTI_CROPS:
        raise ValueError(f"KITTI metric crop {crop!r}: expected one of {tuple(KITTI_CROPS)}")
    if frame not in CROP_FRAMES:
        raise ValueError(f"KITTI crop frame {frame!r}: expected one of {CROP_FRAMES}")
    shape = tuple(shape or full_shape)
    if frame == "kb":
        return fraction_box(shape, KITTI_CROPS[crop])
    t, b, left, r = fraction_box(full_shape, KITTI_CROPS[crop])
    oy, ox = origin
    h, w = shape
    return (min(max(t - oy, 0), h), min(max(b - oy, 0), h), min(max(left - ox, 0), w), min(max(r - ox, 0), w))
