"""grain input pipelines over the prepared TFDS datasets (array_record), with no TensorFlow in the loop.

Training (:func:`make_train_loader`): one global stream, whatever the number of hosts: the split is shuffled
with ``seed`` (a new order every epoch), global batch ``s`` is stream positions ``[s*G, (s+1)*G)`` and host
``p`` of ``P`` takes its ``p``-th contiguous slice of ``G/P`` of them. Every example is augmented with a
generator keyed by ``(seed, global stream position)``. So the global batches are a pure function of (seed,
position), the same on 1 host or 64 (a multi-host run trains on exactly what a single-host run with the same
global batch does), and the iterator state saved with a checkpoint (``get_state()``, JSON bytes) resumes with
exactly the batches an uninterrupted run yields. With ``worker_count`` > 0 each worker batches its own slice of
the host's stream, so batch composition depends on the worker count, and a state restores only into a loader
with the same worker count; that is checked.

Evaluation (:func:`make_eval_loader`): every example of the split exactly once, in order, split into
``process_count`` contiguous blocks; each host pads its block to the same whole number of batches with
``valid=False`` examples, so all hosts run the same number of steps.

Before anything else every image (training and test) can be brought to one frame: ``input_crop="kb"`` is
KITTI's benchmark crop (352x1216, bottom rows, centred; ``vpd_jax.protocols``), which also makes KITTI's
slightly different image sizes batchable.

The class-embedding row of each example comes from a :class:`ClassRule`: NYU's two file-name rules (ids stored
at preparation), the mean row, row 0 of a one-prompt table, or the example's scene name (KITTI drive, folder
name) looked up in the table's class list.

Batches are dicts of numpy arrays: ``image`` uint8 (B,H,W,3), ``depth`` float32 (B,H,W) metres (0 = invalid),
``class_id`` int32 (B,), ``valid`` bool (B,); evaluation batches add ``file_name`` (str), ``origin`` int32
(B, 2) (where the evaluated frame starts in the original image) and ``full_shape`` int32 (B, 2) (the original
image's height and width).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from vpd_jax import protocols
from vpd_jax.data import catalog
from vpd_jax.data.augment import AugmentConfig, augment
from vpd_jax.errors import ConfigError
from vpd_jax.scenes import CLASS_RULES

INPUT_CROPS = ("none", "kb")
# NYU's stored file-name rules, then the rules for datasets without NYU scene classes.
ALL_CLASS_RULES = (*CLASS_RULES, "mean", "single", "scene")


def open_source(data_dir: str, dataset: str, split: str):
    """The random-access TFDS data source of ``dataset``/``split`` (raises a one-line error when missing)."""
    import tensorflow_datasets as tfds

    path, tfds_split = catalog.require(data_dir, dataset, split)
    return tfds.builder_from_directory(path).as_data_source(split=tfds_split)


@dataclasses.dataclass(frozen=True)
class ClassRule:
    """Which class-embedding row an example gets (picklable, for grain's workers).

    ``rule``: "official" / "mmseg" (NYU's file-name rules, their ids stored in the dataset), "mean" (the table's
    mean row, "unknown scene"), "single" (row 0 for every image: a one-prompt table), "scene" (the example's
    stored scene name, looked up in ``rows``; a scene without a row gets ``default``).
    """

    rule: str = "official"
    rows: tuple[tuple[str, int], ...] = ()  # "scene": scene name -> row
    default: int = -1  # "scene": the row of a scene not in ``rows`` (-1: the mean row)

    def __post_init__(self):
        if self.rule not in ALL_CLASS_RULES:
            raise ValueError(f"class_rule {self.rule!r} is not one of {ALL_CLASS_RULES}")

    def __call__(self, record: dict) -> int:
        if self.rule in CLASS_RULES:
            key = "class_id" if self.rule == "official" else "class_id_mmseg"
            return int(record.get(key, -1))  # -1 (no stored class): the mean row
        if self.rule == "mean":
            return -1
        if self.rule == "single":
            return 0
        scene = record.get("scene", b"")
        scene = scene.decode() if isinstance(scene, bytes) else str(scene)
        return dict(self.rows).get(scene, self.default)


def require_depth_dataset(dataset: str):
    """A segmentation dataset given to the depth loaders: one line naming the segmentation loaders."""
    if catalog.dataset_task(dataset) != "depth":
        raise ConfigError(f"dataset {dataset!r} holds {catalog.dataset_task(dataset)} labels, not depth; read it "
                          "with vpd_jax.data.seg_loader")


def _class_rule(class_rule) -> ClassRule:
    return class_rule if isinstance(class_rule, ClassRule) else ClassRule(str(class_rule))


def input_crop_origin(shape: tuple[int, int], input_crop: str) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the frame ``input_crop`` keeps of an image of ``shape``."""
    if input_crop == "none":
        return 0, 0, int(shape[0]), int(shape[1])
    if input_crop == "kb":
        top, left = protocols.kb_crop_origin(*shape)
        return top, left, *protocols.KITTI_KB_CROP_SIZE
    raise ValueError(f"input_crop {input_crop!r} is not one of {INPUT_CROPS}")


def decode_record(record: dict, class_rule: ClassRule | str = "official", input_crop: str = "none",
                  where: str = "") -> dict:
    """A stored example as numpy (the stock ``nyu_depth_v2`` has float16 depth and no scene label), brought to
    ``input_crop``'s frame."""
    depth = np.asarray(record["depth"])
    if depth.dtype != np.float32:
        depth = depth.astype(np.float32)
    image = np.asarray(record["image"])
    name = record.get("file_name", b"")
    name = name.decode() if isinstance(name, bytes) else str(name)
    full = image.shape[:2]
    try:
        top, left, h, w = input_crop_origin(full, input_crop)
    except ValueError as e:
        raise ValueError(f"{where or name}: {e}") from None
    if (top, left, h, w) != (0, 0, *full):
        image, depth = image[top:top + h, left:left + w], depth[top:top + h, left:left + w]
    return {"image": image, "depth": depth, "class_id": np.int32(_class_rule(class_rule)(record)), "file_name": name,
            "origin": np.asarray([top, left], np.int32), "full_shape": np.asarray(full, np.int32)}


@dataclasses.dataclass
class _TrainTransform:
    """Picklable per-example work for grain's worker processes: host position -> global position -> example."""

    source: Any
    order: Any  # grain MapDataset: global stream position -> example index (shuffled per epoch)
    aug: AugmentConfig
    seed: int
    process_index: int
    host_batch: int
    global_batch: int
    class_rule: ClassRule
    input_crop: str = "none"

    def global_position(self, k: int) -> int:
        step, r = divmod(int(k), self.host_batch)
        return step * self.global_batch + self.process_index * self.host_batch + r

    def __call__(self, k: int) -> dict:
        j = self.global_position(k)
        ex = decode_record(self.source[int(self.order[j])], self.class_rule, self.input_crop)
        rng = np.random.default_rng([self.seed, j])
        image, depth, _ = augment(ex["image"], ex["depth"], self.aug, rng, position=j % len(self.source))
        return {"image": image, "depth": depth, "class_id": ex["class_id"], "valid": np.bool_(True)}


# Fingerprint fields added over time, with the value that states saved before them implied.
FINGERPRINT_DEFAULTS = {"class_rows": [], "input_crop": "none"}


class TrainIterator:
    """grain iterator plus a fingerprint of the loader settings; state is JSON bytes (DataLoader-style, so
    grain's orbax ``CheckpointHandler`` can save it with the training checkpoint)."""

    def __init__(self, dataset, fingerprint: dict):
        self._dataset = dataset
        self._it = iter(dataset)
        self.fingerprint = fingerprint

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def get_state(self) -> bytes:
        return json.dumps({"fingerprint": self.fingerprint, "grain": self._it.get_state()}).encode()

    def set_state(self, state: bytes | str | dict):
        if isinstance(state, (bytes, bytearray)):
            state = state.decode()
        if isinstance(state, str):
            state = json.loads(state)
        saved = {**FINGERPRINT_DEFAULTS, **state.get("fingerprint", {})}  # states saved before a field existed
        if saved != {**FINGERPRINT_DEFAULTS, **self.fingerprint}:
            diff = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
            raise ValueError(f"loader state was saved with different settings (saved, now): {diff}")
        self._it.set_state(state["grain"])

    def start_prefetch(self):
        if hasattr(self._it, "start_prefetch"):
            self._it.start_prefetch()

    def close(self):
        if hasattr(self._it, "close"):
            self._it.close()


def global_stream(data_dir: str, dataset: str, split: str, *, global_batch_size: int, seed: int,
                  process_index: int, process_count: int, worker_count: int, num_epochs: int | None,
                  make_transform, read_threads: int = 2, worker_buffer_size: int = 2) -> tuple[Any, dict]:
    """The one global training stream (module docstring) of ``dataset``/``split``, as this host's batches:
    ``(grain iterable, fingerprint)``. ``make_transform(source, order, host_batch)`` gives the picklable
    per-example transform (host position -> augmented example); the fingerprint holds the stream's settings."""
    import grain

    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    batch = global_batch_size // process_count
    source = open_source(data_dir, dataset, split)
    n = len(source)
    if n < global_batch_size:
        raise ConfigError(f"train.global_batch_size={global_batch_size}: {dataset}/{split} has only {n} examples; "
                          "expected at most that many")
    order = grain.MapDataset.range(n).shuffle(seed=int(seed)).repeat(num_epochs)
    steps = len(order) // global_batch_size  # drop_remainder over the whole (global) stream
    ds = grain.MapDataset.range(steps * batch).map(make_transform(source, order, batch))
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * batch, 8)))
    ids = ids.batch(batch, drop_remainder=True)
    if worker_count > 0:
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                           per_worker_buffer_size=worker_buffer_size))
    fingerprint = {"dataset": dataset, "split": split, "num_examples": n, "global_batch_size": global_batch_size,
                   "seed": int(seed), "process_index": process_index, "process_count": process_count,
                   "worker_count": worker_count, "num_epochs": num_epochs}
    return ids, fingerprint


def make_train_loader(data_dir: str, *, dataset: str = "nyu_vpd/bts", split: str = "train",
                      global_batch_size: int, seed: int, aug: AugmentConfig | None = None,
                      process_index: int = 0, process_count: int = 1, worker_count: int = 0,
                      num_epochs: int | None = None, class_rule: ClassRule | str = "official",
                      input_crop: str = "none", read_threads: int = 2, worker_buffer_size: int = 2) -> TrainIterator:
    """Infinite (or ``num_epochs``) stream of augmented training batches of ``global_batch_size //
    process_count`` examples for this host. ``worker_count`` > 0 runs the decoding and augmentation in that
    many processes (absl flags must be parsed in the main program, as grain requires)."""
    aug = aug if aug is not None else AugmentConfig()
    require_depth_dataset(dataset)
    rule = _class_rule(class_rule)
    if input_crop not in INPUT_CROPS:
        raise ConfigError(f"input_crop {input_crop!r} is not one of {INPUT_CROPS}")
    ids, fingerprint = global_stream(
        data_dir, dataset, split, global_batch_size=global_batch_size, seed=seed, process_index=process_index,
        process_count=process_count, worker_count=worker_count, num_epochs=num_epochs,
        read_threads=read_threads, worker_buffer_size=worker_buffer_size,
        make_transform=lambda source, order, batch: _TrainTransform(
            source, order, aug, int(seed), process_index, batch, global_batch_size, rule, input_crop))
    fingerprint.update(class_rule=rule.rule, class_rows=[list(r) for r in rule.rows], input_crop=input_crop,
                       aug=json.loads(json.dumps(dataclasses.asdict(aug))))
    return TrainIterator(ids, fingerprint)


@dataclasses.dataclass
class _EvalTransform:
    source: Any
    start: int
    end: int
    pad: dict
    class_rule: ClassRule
    input_crop: str = "none"

    def __call__(self, i: int) -> dict:
        k = self.start + int(i)
        if k >= self.end:
            return dict(self.pad)
        ex = decode_record(self.source[k], self.class_rule, self.input_crop)
        ex["valid"] = np.bool_(True)
        return ex


class EvalLoader:
    """Re-iterable: each ``iter()`` yields this host's ``num_batches`` batches in order."""

    def __init__(self, dataset, num_batches: int, num_examples: int, total_examples: int, start: int):
        self._dataset = dataset
        self.num_batches = num_batches
        self.num_examples = num_examples  # real (valid) examples on this host
        self.total_examples = total_examples  # in the split, over all hosts
        self.start = start  # index of this host's first example in the split

    def __iter__(self):
        return iter(self._dataset)

    def __len__(self) -> int:
        return self.num_batches


def host_block(n: int, batch_size: int, process_index: int, process_count: int) -> tuple[int, int, int]:
    """``(start, end, num_batches)``: host ``process_index``'s contiguous block of an ``n``-example split, and the
    batches every host runs (the same number on all, the short blocks padded)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    per_host = math.ceil(n / process_count)
    start = min(n, process_index * per_host)
    end = min(n, start + per_host)
    return start, end, max(1, math.ceil(per_host / batch_size))


def make_eval_loader(data_dir: str, *, dataset: str = "nyu_vpd/bts", split: str = "test", batch_size: int,
                     process_index: int = 0, process_count: int = 1, class_rule: ClassRule | str = "official",
                     input_crop: str = "none", read_threads: int = 2) -> EvalLoader:
    """Every example of ``split`` exactly once, in order; host ``p`` gets the p-th contiguous block."""
    import grain

    require_depth_dataset(dataset)
    source = open_source(data_dir, dataset, split)
    n = len(source)
    start, end, num_batches = host_block(n, batch_size, process_index, process_count)
    rule = _class_rule(class_rule)
    if input_crop not in INPUT_CROPS:
        raise ConfigError(f"input_crop {input_crop!r} is not one of {INPUT_CROPS}")
    first = decode_record(source[0], rule, input_crop)
    pad = {"image": np.zeros_like(first["image"]), "depth": np.zeros_like(first["depth"]),
           "class_id": np.int32(-1), "file_name": "", "origin": np.zeros(2, np.int32),
           "full_shape": np.asarray(first["depth"].shape, np.int32), "valid": np.bool_(False)}
    transform = _EvalTransform(source, start, end, pad, rule, input_crop)
    ds = grain.MapDataset.range(num_batches * batch_size).map(transform)
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * batch_size))
    ids = ids.batch(batch_size, drop_remainder=False)
    return EvalLoader(ids, num_batches, end - start, n, start)
