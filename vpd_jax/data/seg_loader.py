"""grain input pipelines over the prepared segmentation datasets (``ade20k_vpd/*``), no TensorFlow in the loop.

Training (:func:`make_seg_train_loader`): the depth loader's structure (``loader.py``): one global stream
shuffled with ``seed`` per epoch, global batch ``s`` = stream positions ``[s*G, (s+1)*G)``, host ``p`` taking its
contiguous slice, every example augmented (``seg_augment.py``) with a generator keyed by ``(seed, global
position)``; the iterator state (JSON bytes) resumes exactly. Batches: ``image`` uint8 (B, h, w, 3) (the crop
size; padding 0), ``label`` uint8 (B, h, w) (0..149, 255 = ignore, also the padding), ``image_hw`` int32 (B, 2)
(the unpadded size: the references pad after normalising, so the model should zero the normalised image
outside it; ``seg_augment.normalize``), ``valid`` bool (B,).

Evaluation (:func:`make_seg_eval_loader`): every example exactly once, in order, hosts taking contiguous blocks
padded to the same number of batches with ``valid=False`` examples. Each image is resized as VPD's test pipeline
does (mmcv ``imrescale`` to fit (2048, 512), keep ratio, bilinear: short side 512 for ordinary aspect ratios);
the label stays at its original size, where the metric is computed (the model resizes its logits back). Sizes
vary, so a batch pads ``image`` (with 0) to its largest image, or to a fixed ``pad_shape``, and ``label`` (with
255) to its largest label; ``image_hw`` and ``label_hw`` give each example's true sizes, ``file_name`` its name.
``batch_size=1`` (the default) gives every image at its own size.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from vpd_jax.data import catalog
from vpd_jax.data.loader import TrainIterator, global_stream, host_block, open_source
from vpd_jax.data.seg_augment import IGNORE_INDEX, SegAugmentConfig, rescale_shape, seg_augment
from vpd_jax.data.segmentation import decode_label
from vpd_jax.errors import ConfigError

TEST_SCALE = (2048, 512)  # VPD's test Resize img_scale (long edge, short edge)


def _check_task(dataset: str):
    if catalog.dataset_task(dataset) != "segmentation":
        raise ConfigError(f"dataset {dataset!r} is not a segmentation dataset (expected one of "
                          f"{[n for n in catalog.DATASETS if catalog.dataset_task(n) == 'segmentation']})")


def decode_seg_record(record: dict) -> dict:
    """A stored example as numpy: ``image`` uint8 (H, W, 3), ``label`` uint8 (H, W), ``file_name`` str."""
    name = record.get("file_name", b"")
    name = name.decode() if isinstance(name, bytes) else str(name)
    return {"image": np.asarray(record["image"]), "label": decode_label(record["label"]), "file_name": name}


@dataclasses.dataclass
class _SegTrainTransform:
    """Picklable per-example work: host position -> global stream position -> augmented example."""

    source: Any
    order: Any
    aug: SegAugmentConfig
    seed: int
    process_index: int
    host_batch: int
    global_batch: int

    def global_position(self, k: int) -> int:
        step, r = divmod(int(k), self.host_batch)
        return step * self.global_batch + self.process_index * self.host_batch + r

    def __call__(self, k: int) -> dict:
        j = self.global_position(k)
        ex = decode_seg_record(self.source[int(self.order[j])])
        rng = np.random.default_rng([self.seed, j])
        image, label, params = seg_augment(ex["image"], ex["label"], self.aug, rng)
        return {"image": image, "label": label, "image_hw": np.asarray(params["image_hw"], np.int32),
                "valid": np.bool_(True)}


def make_seg_train_loader(data_dir: str, *, dataset: str = "ade20k_vpd/ade", split: str = "train",
                          global_batch_size: int, seed: int, aug: SegAugmentConfig | None = None,
                          process_index: int = 0, process_count: int = 1, worker_count: int = 0,
                          num_epochs: int | None = None, read_threads: int = 2,
                          worker_buffer_size: int = 2) -> TrainIterator:
    """Infinite (or ``num_epochs``) stream of augmented batches of ``global_batch_size // process_count``
    examples for this host; ``aug`` defaults to VPD's 512 recipe (its ``crop_size`` must not be None: batches
    need one shape)."""
    _check_task(dataset)
    aug = aug if aug is not None else SegAugmentConfig()
    if aug.crop_size is None:
        raise ConfigError("SegAugmentConfig.crop_size=None: training batches need one image size")
    ids, fingerprint = global_stream(
        data_dir, dataset, split, global_batch_size=global_batch_size, seed=seed, process_index=process_index,
        process_count=process_count, worker_count=worker_count, num_epochs=num_epochs,
        read_threads=read_threads, worker_buffer_size=worker_buffer_size,
        make_transform=lambda source, order, batch: _SegTrainTransform(
            source, order, aug, int(seed), process_index, batch, global_batch_size))
    fingerprint["aug"] = json.loads(json.dumps(dataclasses.asdict(aug)))
    return TrainIterator(ids, fingerprint)


@dataclasses.dataclass
class _SegEvalTransform:
    source: Any
    start: int
    end: int
    scale: tuple[int, int] | None

    def __call__(self, i: int) -> dict:
        import cv2

        k = self.start + int(i)
        if k >= self.end:
            return {}  # a padding slot (grain drops None elements, so not None)
        ex = decode_seg_record(self.source[k])
        image = ex["image"]
        if self.scale is not None:
            h, w = rescale_shape(*image.shape[:2], self.scale)
            if (h, w) != image.shape[:2]:
                image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
        return {"image": image, "label": ex["label"], "file_name": ex["file_name"]}


def collate_eval(examples: list[dict], pad_shape: tuple[int, int] | None = None) -> dict:
    """One eval batch from examples (``{}``: a padding slot): images padded with 0 to ``pad_shape`` or the largest
    image, labels with 255 to the largest label."""
    real = [e for e in examples if e]
    if not real:
        raise ValueError("an eval batch needs at least one real example")
    ih = max(e["image"].shape[0] for e in real)
    iw = max(e["image"].shape[1] for e in real)
    if pad_shape is not None:
        if ih > pad_shape[0] or iw > pad_shape[1]:
            big = next(e for e in real if e["image"].shape[0] > pad_shape[0] or e["image"].shape[1] > pad_shape[1])
            raise ValueError(f"{big['file_name']}: resized image {big['image'].shape[:2]} does not fit "
                             f"pad_shape {tuple(pad_shape)}")
        ih, iw = pad_shape
    lh = max(e["label"].shape[0] for e in real)
    lw = max(e["label"].shape[1] for e in real)
    b = len(examples)
    out = {"image": np.zeros((b, ih, iw, 3), np.uint8), "label": np.full((b, lh, lw), IGNORE_INDEX, np.uint8),
           "image_hw": np.zeros((b, 2), np.int32), "label_hw": np.zeros((b, 2), np.int32),
           "file_name": np.array([""] * b, dtype=object), "valid": np.zeros(b, bool)}
    for j, e in enumerate(examples):
        if not e:
            continue
        h, w = e["image"].shape[:2]
        out["image"][j, :h, :w] = e["image"]
        out["image_hw"][j] = (h, w)
        h, w = e["label"].shape
        out["label"][j, :h, :w] = e["label"]
        out["label_hw"][j] = (h, w)
        out["file_name"][j] = e["file_name"]
        out["valid"][j] = True
    return out


class SegEvalLoader:
    """Re-iterable: each ``iter()`` yields this host's ``num_batches`` batches in order."""

    def __init__(self, dataset, num_batches: int, batch_size: int, num_examples: int, total_examples: int,
                 start: int, pad_shape: tuple[int, int] | None):
        self._dataset = dataset
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.num_examples = num_examples  # real (valid) examples on this host
        self.total_examples = total_examples
        self.start = start
        self.pad_shape = pad_shape

    def __iter__(self):
        it = iter(self._dataset)
        for _ in range(self.num_batches):
            examples = [next(it) for _ in range(self.batch_size)]
            if not any(examples):  # a host with no examples left: one padding-only batch shape
                yield self._empty()
                continue
            yield collate_eval(examples, self.pad_shape)

    def _empty(self) -> dict:
        ih, iw = self.pad_shape or (1, 1)
        b = self.batch_size
        return {"image": np.zeros((b, ih, iw, 3), np.uint8), "label": np.full((b, 1, 1), IGNORE_INDEX, np.uint8),
                "image_hw": np.zeros((b, 2), np.int32), "label_hw": np.zeros((b, 2), np.int32),
                "file_name": np.array([""] * b, dtype=object), "valid": np.zeros(b, bool)}

    def __len__(self) -> int:
        return self.num_batches


def make_seg_eval_loader(data_dir: str, *, dataset: str = "ade20k_vpd/ade", split: str = "validation",
                         batch_size: int = 1, process_index: int = 0, process_count: int = 1,
                         scale: tuple[int, int] | None = TEST_SCALE, pad_shape: tuple[int, int] | None = None,
                         read_threads: int = 2) -> SegEvalLoader:
    """Every example of ``split`` once, in order; host ``p`` gets the p-th contiguous block. ``scale``: the test
    resize (None: original size)."""
    import grain

    _check_task(dataset)
    source = open_source(data_dir, dataset, split)
    n = len(source)
    start, end, num_batches = host_block(n, batch_size, process_index, process_count)
    transform = _SegEvalTransform(source, start, end, tuple(scale) if scale is not None else None)
    ds = grain.MapDataset.range(num_batches * batch_size).map(transform)
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * batch_size))
    return SegEvalLoader(ids, num_batches, batch_size, end - start, n, start,
                         tuple(pad_shape) if pad_shape is not None else None)
