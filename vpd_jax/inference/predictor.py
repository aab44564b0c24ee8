"""``Predictor``: a VPD model ready for images of any size (see the package docstring for the modes)."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from vpd_jax.evaluation.tta import mmseg_window_starts, resize_bilinear, run_in_chunks, slide_flip_predict
from vpd_jax.inference.images import as_rgb
from vpd_jax.inference.segmenter import Segmenter
from vpd_jax.models.vpd import with_unknown_row
from vpd_jax.scenes import NYU_CLASSES, name_key, read_class_list
from vpd_jax.text import TextEncoder
from vpd_jax.weights.common import load_class_table
from vpd_jax.weights.loader import load_model

MODES = ("slide", "resize")
DEFAULT_CROP = 480  # the released NYU models' training crop (both repos)


def as_hw(size) -> tuple[int, int]:
    """``480`` or ``(352, 704)`` -> (height, width)."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def working_size(h: int, w: int, crop, mode: str) -> tuple[int, int]:
    """The (h, w) the image is brought to before windowing: in "slide" mode the image's own size when the
    ``crop`` (an int or (h, w)) fits inside it, else (and in "resize" mode always) the smallest scale at which it
    does, never below the crop (a 333-high image must reach 480, not 479)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    ch, cw = as_hw(crop)
    if mode == "slide" and h >= ch and w >= cw:
        return h, w
    f = max(ch / h, cw / w)
    return max(ch, int(h * f + 0.5)), max(cw, int(w * f + 0.5))


def with_table(variables, path: str | os.PathLike, text_dim: int) -> tuple[dict, list[str] | None]:
    """``variables`` with the class table of ``path`` (.npy; its ``.classes.json`` names the rows) and its names."""
    names = read_class_list(path)
    try:
        table = np.asarray(load_class_table(path), np.float32)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable class table ({e})") from None
    if table.ndim != 2 or table.shape[1] != text_dim:
        raise ValueError(f"{path}: class table of shape {table.shape}; this model takes (classes, {text_dim})")
    n = len(names) if names else (table.shape[0] if table.shape[0] == len(NYU_CLASSES) else table.shape[0] - 1)
    try:
        table = with_unknown_row(table, n)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return {**variables, "constants": {**variables["constants"], "class_embeddings": table}}, names


@dataclasses.dataclass(frozen=True)
class Scene:
    """The conditioning in words, for logs: ``kind`` is "class", "prompt" or "mean"."""

    kind: str
    value: str | int | None = None

    def __str__(self):
        if self.kind == "class":
            return f"scene class {self.value}"
        if self.kind == "prompt":
            return f"prompt {self.value!r}"
        return "mean of the scene embeddings (unknown scene)"


class Predictor:
    """A VPD model ready for images of any size; see the module docstring for the modes.

    ``model``: a ``VPDDepth``; ``variables``: its ``{params, batch_stats, constants}``; ``embedding``: the raw
    (text_dim,) scene embedding (None: the table's mean row); ``crop``: the training crop, the windows' size (an
    int for square ones, or (h, w)); ``stride``: window stride (int or (h, w); default a third of the crop);
    ``flip``: average each window with its mirror image; ``batch_size``: windows per forward call.
    """

    def __init__(self, model, variables, *, embedding=None, mode: str = "slide", crop=DEFAULT_CROP,
                 stride=None, flip: bool = True, batch_size: int = 4, scene: Scene | None = None,
                 class_names: Sequence[str] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        crop = as_hw(crop)
        if min(crop) < 1 or batch_size < 1:
            raise ValueError(f"crop ({crop}) and batch_size ({batch_size}) must be positive")
        self.model, self.config = model, model.config
        self.mode, self.crop, self.flip, self.batch_size = mode, crop, bool(flip), int(batch_size)
        self.stride = as_hw(stride) if stride else (max(1, crop[0] // 3), max(1, crop[1] // 3))
        self.class_names = list(class_names) if class_names is not None else None
        table = np.asarray(variables["constants"]["class_embeddings"], np.float32)
        self.table = table
        if embedding is None:
            embedding = table[-1]
        embedding = np.asarray(embedding, np.float32).reshape(-1)
        if embedding.shape != (self.config.text_dim,):
            raise ValueError(f"scene embedding of size {embedding.shape[0]}; this model takes "
                             f"{self.config.text_dim}")
        self.embedding = embedding
        self.scene = scene or Scene("mean")
        self.variables = jax.device_put(variables)
        self._embedding = jax.device_put(embedding)
        # One jit; XLA caches one executable per input shape (one per window shape here).
        self._forward = jax.jit(lambda v, x, e: model.apply(v, x, text_embeddings=e))

    # ----------------------------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(cls, src: str | os.PathLike, *, mode: str = "slide", scene: str | int | None = None,
                        prompt: str | None = None, clip: str | os.PathLike | None = None, batch_size: int = 4,
                        crop=None, stride=None, flip: bool = True, dtype: str | None = None,
                        class_embeddings: str | os.PathLike | None = None, **model_overrides) -> Predictor:
        """Load ``src`` (any source of ``vpd_jax.weights.loader.load_model``) and choose the conditioning. A
        segmentation checkpoint gives a ``vpd_jax.inference.segmenter.Segmenter`` (``predict`` -> class ids).

        ``scene``: a class name or row of the model's class table (NYU's 27 for the released models; a workdir
        trained on your own table knows its names); ``class_embeddings``: use this table (with its
        ``.classes.json`` names) instead of the checkpoint's; ``prompt`` (with ``clip``, CLIP ViT-L/14 weights: a
        local folder or a hub id for ``TextEncoder.from_pretrained``); none of them: the mean scene row.
        ``crop``: the training crop, int or (h, w) (default: the checkpoint's, else 480). ``dtype``: compute dtype
        override ("bfloat16" on accelerators).
        """
        if scene is not None and prompt is not None:
            raise ValueError("give a scene class or a prompt, not both")
        if dtype is not None:
            model_overrides["dtype"] = dtype
        loaded = load_model(src, overrides=model_overrides)
        if loaded.task == "segmentation":  # the same door for both tasks: class maps instead of depth
            if scene is not None or prompt is not None or class_embeddings is not None:
                raise ValueError(f"{src}: a segmentation model; scene, prompt and class_embeddings are for depth")
            kw = {"batch_size": batch_size}
            if crop:
                kw["crop"] = crop
            if stride:
                kw["stride"] = stride
            return Segmenter.from_loaded(loaded, **kw)
        return cls.from_loaded(loaded, mode=mode, scene=scene, prompt=prompt,
                               clip=clip, batch_size=batch_size, crop=crop, stride=stride, flip=flip,
                               class_embeddings=class_embeddings)

    @classmethod
    def from_loaded(cls, loaded, *, mode: str = "slide", scene: str | int | None = None, prompt: str | None = None,
                    clip: str | os.PathLike | None = None, batch_size: int = 4, crop=None, stride=None,
                    flip: bool = True, class_embeddings: str | os.PathLike | None = None) -> Predictor:
        """As :meth:`from_checkpoint`, for a model ``vpd_jax.weights.loader.load_model`` has read already."""
        if loaded.task != "depth":
            raise ValueError(f"{loaded.description}: a {loaded.task} model; Predictor is for depth (use "
                             "vpd_jax.inference.segmenter.Segmenter)")
        if scene is not None and prompt is not None:
            raise ValueError("give a scene class or a prompt, not both")
        model, variables, ckpt_crop, names = loaded.model, loaded.variables, loaded.crop, loaded.class_names
        if class_embeddings is not None:
            variables, names = with_table(variables, class_embeddings, model.config.text_dim)
        p = cls(model, variables, mode=mode, crop=crop or ckpt_crop or DEFAULT_CROP, stride=stride, flip=flip,
                batch_size=batch_size, class_names=names)
        if prompt is not None:
            if clip is None:
                raise ValueError("a text prompt needs CLIP weights: pass clip= (--clip SOURCE)")
            return p.with_embedding(TextEncoder.from_pretrained(clip).embed([prompt])[0], Scene("prompt", prompt))
        return p.for_scene(scene)

    def scene_row(self, scene: str | int | None) -> int:
        """The table row of ``scene``: a class name (compared as ``vpd_jax.scenes.name_key`` does) or row number;
        None / -1: the mean row (-1). ``ValueError`` naming the classes when there is no such class."""
        n = self.table.shape[0] - 1
        if scene is None or (isinstance(scene, (int, np.integer)) and scene in (-1, n)):
            return -1
        if isinstance(scene, (int, np.integer)):
            if not 0 <= scene < n:
                raise ValueError(f"scene row {scene}: this model's table has rows 0..{n - 1} (and -1, the mean)")
            return int(scene)
        if self.class_names is None:
            raise ValueError(f"scene {scene!r}: this model's {n} class rows have no names; give a row number")
        keys = [name_key(c) for c in self.class_names]
        if name_key(scene) not in keys:
            what = "NYU scene class" if n == len(NYU_CLASSES) and self.class_names == list(NYU_CLASSES) else "class"
            raise ValueError(f"unknown {what} {scene!r}; expected one of: {', '.join(self.class_names)}")
        return keys.index(name_key(scene))

    def for_scene(self, scene: str | int | None) -> Predictor:
        """A copy conditioned on the class ``scene`` of the table (see :meth:`scene_row`); None: the mean row."""
        row = self.scene_row(scene)
        if row < 0:
            return self.with_embedding(self.table[-1], Scene("mean"))
        label = f"{self.class_names[row]} ({row})" if self.class_names else str(row)
        return self.with_embedding(self.table[row], Scene("class", label))

    def with_embedding(self, embedding, scene: Scene) -> Predictor:
        """A copy conditioned on another raw (text_dim,) scene embedding; it shares this one's weights and
        compiled forward (the embedding is an argument of the jitted call), so switching scenes costs nothing."""
        embedding = np.asarray(embedding, np.float32).reshape(-1)
        if embedding.shape != (self.config.text_dim,):
            raise ValueError(f"scene embedding of size {embedding.shape[0]}; this model takes "
                             f"{self.config.text_dim}")
        q = copy.copy(self)
        q.embedding, q._embedding, q.scene = embedding, jax.device_put(embedding), scene
        return q

    # ----------------------------------------------------------------------------------- prediction
    def predict(self, image) -> np.ndarray:
        """(H, W, 3) uint8 image (gray and RGBA accepted) -> (H, W) float32 depth in metres."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Equal-size images, (B, H, W, 3) or a list of (H, W[, C]) -> (B, H, W) float32 metres."""
        if len({np.shape(im)[:2] for im in images}) > 1:
            raise ValueError("predict_batch: images differ in size; use predict() per image")
        batch = np.stack([as_rgb(im) for im in images])
        b, h, w, _ = batch.shape
        if b == 0:
            return np.zeros((0, h, w), np.float32)
        wh, ww = working_size(h, w, self.crop, self.mode)
        if (wh, ww) != (h, w):
            batch = self._resize(batch, (wh, ww))
        depth = self._slide(batch)
        if (wh, ww) != (h, w):
            depth = self._resize(depth, (h, w))
        return depth

    def forward(self, images) -> np.ndarray:
        """One plain forward pass at the images' own size (no windows, no flip): (B, H, W) metres."""
        return self._run(np.stack([as_rgb(im) for im in images]))

    @staticmethod
    def _resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return np.asarray(resize_bilinear(np.asarray(x, np.float32), size), np.float32)

    def _slide(self, batch: np.ndarray) -> np.ndarray:
        """Flip-averaged sliding windows over (B, H, W, 3) float images with H, W >= crop."""
        b, h, w, _ = batch.shape
        ch, cw = min(self.crop[0], h), min(self.crop[1], w)
        ys, xs = mmseg_window_starts(h, ch, self.stride[0]), mmseg_window_starts(w, cw, self.stride[1])
        # The evaluator's windows and merge; every window (and mirror) in one call that _run chunks.
        depth = slide_flip_predict(lambda rows, _: self._run(np.asarray(rows)), batch, np.zeros((b,), np.int32),
                                   crop=(ch, cw), y_starts=ys, x_starts=xs, flip=self.flip, one_call=True)
        return np.asarray(depth, np.float32)

    def _run(self, rows: np.ndarray) -> np.ndarray:
        """The jitted forward over ``rows`` in chunks of ``batch_size`` (last chunk padded: one shape, one compile)."""
        return run_in_chunks(lambda chunk: self._forward(self.variables, chunk, self._embedding), rows,
                             self.batch_size)
