"""The evaluator shared by train-time evaluation and ``eval.py``: TTA, metrics, tables, files, pictures.

``Evaluator(model, settings).evaluate(variables, loader)`` runs the configured test-time augmentation
(``vpd_jax.evaluation.tta``) jitted once for the loader's batch shape, computes the metrics of wl-zhao/VPD
depth/utils_depth/metrics.py per image (``metrics.depth_metrics``) over the valid examples and averages them
over images. On several hosts each host predicts its block of the split and process 0 gathers all rows; every
host returns the result.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable

import jax
import numpy as np

from vpd_jax import parallel, protocols, visualize
from vpd_jax.evaluation import metrics as M
from vpd_jax.evaluation import tta as T

TTA_MODES = ("official", "mmseg_slide_flip", "mmseg_512", "none")
CROPS = ("eigen", *protocols.KITTI_CROPS, "none")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    tta: str = "official"  # see TTA_MODES
    flip: bool = True  # flip-average each window
    shift_size: int = 2  # official TTA: windows per image (VPD on NYU 2; EVP on KITTI 4)
    clamp_pred: bool = True  # official inf -> max, nan -> min before the metrics
    crop: str = "eigen"  # NYU's Eigen crop (scaled when not 480x640), KITTI's "garg" / "eigen_kitti", or none
    crop_frame: str = "kb"  # KITTI crops: fractions of the evaluated (KB-cropped) frame, or of the full image
    min_depth: float = protocols.MIN_DEPTH_EVAL  # ground truth counted in (min_depth, max_depth)
    max_depth: float = protocols.MAX_DEPTH_EVAL
    max_images: int = 0  # 0 = all
    num_pictures: int = 3  # (image, gt, prediction) triples returned for pictures

    def __post_init__(self):
        if self.tta not in TTA_MODES:
            raise ValueError(f"eval.tta {self.tta!r} is not one of {TTA_MODES}")
        if self.crop not in CROPS:
            raise ValueError(f"eval.crop {self.crop!r} is not one of {CROPS}")
        if self.crop_frame not in protocols.CROP_FRAMES:
            raise ValueError(f"eval.crop_frame {self.crop_frame!r} is not one of {protocols.CROP_FRAMES}")
        if not 0 <= self.min_depth < self.max_depth:
            raise ValueError(f"eval.min_depth {self.min_depth} and eval.max_depth {self.max_depth}: expected "
                             "0 <= min_depth < max_depth")
        if self.shift_size < 1:
            raise ValueError(f"eval.shift_size {self.shift_size}: expected a number of windows >= 1")

    @classmethod
    def from_config(cls, eval_cfg) -> EvalSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(eval_cfg).items() if k in names})


def metric_crop(shape: tuple[int, int], crop: str, *, frame: str = "kb", full_shape: tuple[int, int] | None = None,
                origin: tuple[int, int] = (0, 0)) -> tuple[int, int, int, int] | None:
    """The metric crop of an evaluated ``shape`` array: NYU's Eigen crop for 480x640 (the same fractions of the
    image for other sizes, e.g. the synthetic scenes); KITTI's "garg" / "eigen_kitti" crops of ``frame``
    (``vpd_jax.protocols.kitti_metric_box``; ``full_shape`` and ``origin`` locate the array in its image)."""
    if crop == "none":
        return None
    if crop in protocols.KITTI_CROPS:
        return protocols.kitti_metric_box(crop, frame, tuple(full_shape or shape), tuple(origin), tuple(shape))
    h, w = shape
    if (h, w) == M.NYU_IMAGE_SHAPE:
        return M.EIGEN_CROP
    top, bottom, left, right = M.EIGEN_CROP
    return (round(top * h / M.NYU_HEIGHT), round(bottom * h / M.NYU_HEIGHT),
            round(left * w / M.NYU_WIDTH), round(right * w / M.NYU_WIDTH))


def make_tta_fn(predict_fn: Callable, settings: EvalSettings) -> Callable:
    """``(images, class_ids) -> depth`` with the configured TTA around ``predict_fn``."""
    if settings.tta == "official":
        return lambda im, c: T.official_tta(predict_fn, im, c, shift_size=settings.shift_size, flip=settings.flip)
    if settings.tta == "mmseg_slide_flip":
        return lambda im, c: T.mmseg_slide_flip(predict_fn, im, c, flip=settings.flip)
    if settings.tta == "mmseg_512":
        return lambda im, c: T.mmseg_512_tta(predict_fn, im, c, flip=settings.flip)
    return lambda im, c: T.official_tta(predict_fn, im, c, shift_window=False, flip=settings.flip)


def model_predict_fn(model) -> Callable:
    """``(variables, images, class_ids) -> depth`` of a ``VPDDepth`` in eval mode, jit-traceable."""
    def predict(variables, images, class_ids):
        return model.apply(variables, images, class_ids, train=False)
    return predict


def _png_name(file_name: str, index: int) -> str:
    base = file_name.strip("/").replace("/", "_") if file_name else f"{index:05d}"
    return os.path.splitext(base)[0] + ".png"


class Evaluator:
    """``model=None`` evaluates only ``predict=`` callables (baselines) through the same pipeline."""

    def __init__(self, model, settings: EvalSettings = EvalSettings(), mesh=None):
        self.model = model
        self.settings = settings
        self.mesh = mesh
        if model is None:
            return
        predict = model_predict_fn(model)

        def run(variables, images, class_ids):
            return make_tta_fn(lambda im, c: predict(variables, im, c), settings)(images, class_ids)

        self._run = jax.jit(run)

    def _put(self, x):
        if self.mesh is None:
            return x
        n = parallel.num_batch_shards(self.mesh)
        if self.mesh.is_multi_process or x.shape[0] % n == 0:
            return parallel.shard_batch(x, self.mesh)
        return jax.device_put(x, parallel.replicated(self.mesh))

    def predict_batch(self, variables, images: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
        pred = self._run(variables, self._put(images), self._put(class_ids))
        if self.mesh is not None and self.mesh.is_multi_process:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(pred, tiled=True))
        return np.asarray(jax.device_get(pred))

    def evaluate(self, variables, loader: Iterable[dict], *, predict: Callable | None = None,
                 save_predictions: str | None = None, progress: bool = True, desc: str = "eval") -> dict:
        """Metrics over the loader's valid examples: ``{"metrics": {...}, "num_images", "seconds", "pictures"}``.

        ``predict(images, class_ids) -> depth`` replaces the model (e.g. a constant baseline), same pipeline.
        """
        s = self.settings
        acc = M.MetricAccumulator()
        pictures: list[dict] = []
        multi = self.mesh is not None and self.mesh.is_multi_process
        if save_predictions:
            os.makedirs(save_predictions, exist_ok=True)
        t0 = time.perf_counter()
        total = len(loader) if hasattr(loader, "__len__") else None
        bar = None
        if progress and jax.process_index() == 0:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
        batch_size = None
        index = 0
        for batch in loader:
            images, class_ids = np.asarray(batch["image"]), np.asarray(batch["class_id"], np.int32)
            gt, valid = np.asarray(batch["depth"]), np.asarray(batch["valid"], bool)
            names = list(batch.get("file_name", [""] * len(images)))
            n_rows = len(images)
            origins = np.asarray(batch.get("origin", np.zeros((n_rows, 2), np.int32)))
            full_shapes = np.asarray(batch.get("full_shape", np.tile(gt.shape[1:], (n_rows, 1))))
            batch_size = batch_size or len(images)
            if len(images) < batch_size:  # the last batch: pad so the jitted TTA never recompiles
                pad = batch_size - len(images)
                images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
                class_ids = np.concatenate([class_ids, np.full((pad,), -1, np.int32)])
            if predict is not None:
                pred = np.asarray(predict(images, class_ids))
            else:
                pred = self.predict_batch(variables, images, class_ids)
            if multi:
                from jax.experimental import multihost_utils

                gt = np.asarray(multihost_utils.process_allgather(gt))
                gt = gt.reshape(-1, *gt.shape[2:])
                valid = np.asarray(multihost_utils.process_allgather(valid)).reshape(-1)
                origins = np.asarray(multihost_utils.process_allgather(origins)).reshape(-1, 2)
                full_shapes = np.asarray(multihost_utils.process_allgather(full_shapes)).reshape(-1, 2)
                names = [""] * len(valid)
            pred = pred[: len(gt)]
            if jax.process_index() == 0:
                for i in np.flatnonzero(valid):
                    if s.max_images and acc.count >= s.max_images:
                        break
                    crop = metric_crop(gt.shape[1:], s.crop, frame=s.crop_frame, full_shape=tuple(full_shapes[i]),
                                       origin=tuple(origins[i]))
                    acc.add(M.depth_metrics(pred[i], gt[i], clamp_pred=s.clamp_pred, crop=crop,
                                            min_depth=s.min_depth, max_depth=s.max_depth))
                    if len(pictures) < s.num_pictures and not multi:
                        pictures.append({"image": images[i], "gt": gt[i], "pred": pred[i]})
                    if save_predictions:
                        visualize.save_depth_png16(os.path.join(save_predictions, _png_name(names[i], index + i)),
                                                   pred[i])
            index += len(gt)
            if bar is not None:
                bar.update(1)
            if s.max_images and acc.count >= s.max_images:
                break
        if bar is not None:
            bar.close()
        result = {"metrics": acc.result(), "num_images": acc.count, "seconds": time.perf_counter() - t0,
                  "pictures": pictures}
        if multi:
            from jax.experimental import multihost_utils

            vec = np.asarray([result["metrics"][k] for k in M.METRIC_NAMES] + [acc.count], np.float64)
            vec = np.asarray(multihost_utils.broadcast_one_to_all(vec))
            result["metrics"] = dict(zip(M.METRIC_NAMES, map(float, vec[:-1]), strict=True))
            result["num_images"] = int(vec[-1])
        return result


def format_table(rows: dict[str, dict[str, float]], names=M.METRIC_NAMES) -> str:
    """A console table: one row per entry of ``rows`` (``{label: metrics}``), one column per metric."""
    label_w = max(8, *(len(k) for k in rows))
    head = f"{'':<{label_w}} " + " ".join(f"{n:>9}" for n in names)
    lines = [head, "-" * len(head)]
    for label, m in rows.items():
        lines.append(f"{label:<{label_w}} " + " ".join(
            f"{m.get(n, math.nan):>9.4f}" for n in names))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- pictures
def picture_grid(pictures: list[dict]) -> np.ndarray:
    """Rows of image | ground truth | prediction (one depth scale per row, the GT's), uint8 RGB."""
    return np.concatenate([visualize.make_panel(p["image"], p["gt"], p["pred"]) for p in pictures], axis=0)


def save_picture(path: str, pictures: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    visualize.save_png(path, picture_grid(pictures))
