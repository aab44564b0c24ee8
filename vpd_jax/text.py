"""Scene conditioning: prompts and NYU scene classes to the 768-d CLIP embedding VPD's text adapter refines.

VPD conditions every image on one vector ``e`` (wl-zhao/VPD depth/models_depth/model.py, vpd/models.py,
depth/dump_nyu_text_embeddings.py): the pooled CLIP ViT-L/14 text embedding of its scene, averaged over the 80
ImageNet prompt templates; the model's text adapter turns it into the (B, 1, 768) context token
``e + gamma * MLP(e)``. This file provides

* ``TextEncoder``: CLIP weights + tokenizer, ``embed(prompts) -> (N, 768)`` pooled embeddings computed
  exactly as the official ``FrozenCLIPEmbedder`` (slow ``CLIPTokenizer``, ``padding="max_length"``,
  truncation, ``max_length=20``, input ids only, ``pooler_output``), so a free-text prompt such as
  "a photo of a garage" can replace a table row;
* ``class_embedding_table``: the official recipe for the (27, 768) NYU table (``python -m
  vpd_jax.tools.class_embeddings``), or a table of any class names; ``TEMPLATE_SETS`` names the template sets
  (``official``: the 80 ImageNet templates; ``single``: ``"a photo of a {}."``; ``author``: ``"a photo of a {}"``);
* ``scene_embedding``: a scene's row of a 27-row table or of mmseg's 28-row one (``with_unknown_row`` in
  ``vpd_jax.models.vpd`` appends the mean row, which stands for an unknown scene).

Only numpy is imported at module level; jax, the model and transformers are loaded when an encoder is made.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from vpd_jax.models.vpd import with_unknown_row
from vpd_jax.scenes import NUM_CLASSES, NYU_CLASSES, UNKNOWN_CLASS, class_id_from_name
from vpd_jax.weights.clip import load_clip_text, load_clip_tokenizer

# The 80 prompt templates of CLIP's ImageNet zero-shot notebook (openai/CLIP,
# notebooks/Prompt_Engineering_for_ImageNet.ipynb), in that order, as VPD's dump_nyu_text_embeddings.py uses
# them. The order matters only through float summation order of the mean.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)
assert len(IMAGENET_TEMPLATES) == 80

# CLIP's one-template baseline (the paper's default prompt), for a quick table or a comparison with the 80.
SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)
# The sentence the VPD author names for the class tables, segmentation's included (wl-zhao/VPD GitHub issue 22).
AUTHOR_TEMPLATE: tuple[str, ...] = ("a photo of a {}",)

# Template sets by name (``python -m vpd_jax.tools.class_embeddings --templates``).
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"official": IMAGENET_TEMPLATES, "single": SINGLE_TEMPLATE,
                                             "author": AUTHOR_TEMPLATE}

# VPD's FrozenCLIPEmbedder(max_length=20) for the class table; prompts longer than 18 tokens are truncated.
DEFAULT_MAX_LENGTH = 20


def class_prompt_name(name: str) -> str:
    """``"living_room"`` -> ``"living room"``, as the official dump script writes class names."""
    return name.replace("_", " ")


_POOLED = None


def _pooled(module, params, ids):
    # One jitted function for all encoders; the module (a hashable dataclass) is static, so encoders of
    # the same config share one compilation.
    global _POOLED
    if _POOLED is None:
        import jax

        _POOLED = jax.jit(lambda m, p, i: m.apply({"params": p}, i).pooler_output, static_argnums=0)
    return _POOLED(module, params, ids)


class TextEncoder:
    """A CLIP text tower with its tokenizer: prompts to pooled embeddings (float32 numpy).

    >>> enc = TextEncoder.from_pretrained("openai/clip-vit-large-patch14")  # or a local folder
    >>> e = enc.embed(["a photo of a garage"])  # (1, 768): a row to use in place of a class embedding
    """

    def __init__(self, module, params, tokenizer, *, max_length: int = DEFAULT_MAX_LENGTH,
                 batch_size: int = 80):
        if tokenizer is None:
            raise ValueError("TextEncoder needs a tokenizer: the CLIP source has no vocab.json/merges.txt "
                             "(pass tokenizer_source= to from_pretrained)")
        if max_length > module.config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds the model's max_position_embeddings "
                             f"{module.config.max_position_embeddings}")
        self.module = module
        self.params = params
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, tokenizer_source: str | os.PathLike | None = None,
                        max_length: int = DEFAULT_MAX_LENGTH, dtype: Any = None, use_fast: bool = False,
                        batch_size: int = 80) -> TextEncoder:
        """Load from a transformers CLIP folder, weight file or hub id (``vpd_jax.weights.clip``)."""
        module, params, tok = load_clip_text(source, dtype=dtype, tokenizer=tokenizer_source is None,
                                             use_fast=use_fast)
        if tokenizer_source is not None:
            tok = load_clip_tokenizer(tokenizer_source, use_fast=use_fast)
        return cls(module, params, tok, max_length=max_length, batch_size=batch_size)

    @property
    def dim(self) -> int:
        return self.module.config.hidden_size

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """(N, max_length) int32 ids: ``padding="max_length"``, ``truncation=True``, as the official recipe."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="np")
        return np.asarray(enc["input_ids"], dtype=np.int32)

    def embed_ids(self, ids: np.ndarray) -> np.ndarray:
        """Pooled embeddings (N, dim) of token ids, in fixed-size batches so one compilation serves all."""
        ids = np.asarray(ids, dtype=np.int32)
        n = ids.shape[0]
        bs = max(1, min(self.batch_size, n))
        out = []
        for start in range(0, n, bs):
            chunk = ids[start:start + bs]
            pad = bs - chunk.shape[0]
            if pad:  # repeat the last row rather than compile a second batch shape
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            pooled = np.asarray(_pooled(self.module, self.params, chunk), dtype=np.float32)
            out.append(pooled[: bs - pad])
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        """(N, dim) float32 pooled CLIP embeddings of ``prompts`` (not normalised, as VPD uses them)."""
        return self.embed_ids(self.tokenize(prompts))

    def embed_templates(self, name: str, templates: Sequence[str] = IMAGENET_TEMPLATES) -> np.ndarray:
        """(dim,) mean over ``templates`` of the pooled embedding of each template filled with ``name``."""
        emb = self.embed([t.format(name) for t in templates])
        return emb.mean(axis=0)


def class_embedding_table(encoder: TextEncoder, class_names: Iterable[str] = NYU_CLASSES, *,
                          templates: Sequence[str] = IMAGENET_TEMPLATES, with_mean: bool = False,
                          progress: Callable[[Iterable], Iterable] | None = None) -> np.ndarray:
    """The official recipe: (C, dim) rows in class order, each the template mean of its name (``_`` -> space).

    ``with_mean`` appends the mean of the rows (mmseg's 28-row table, row 27 = unknown scene). ``progress``
    wraps the class iterator (e.g. ``tqdm.tqdm``).
    """
    names = list(class_names)
    it = progress(names) if progress is not None else names
    rows = [encoder.embed_templates(class_prompt_name(n), templates) for n in it]
    table = np.stack(rows).astype(np.float32)
    return with_unknown_row(table, len(table)) if with_mean else table


def scene_embedding(table: np.ndarray, scene: int | str | None, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """The (D,) embedding of one scene in a ``num_classes``- or ``num_classes + 1``-row table.

    ``scene`` is a class id, a class name (``"kitchen"``), or None / -1 / ``UNKNOWN_CLASS`` for an unknown
    scene, which gives the mean row (the last row of a table that has it, else the mean of the rows).
    """
    table = np.asarray(table)
    if table.ndim != 2 or table.shape[0] not in (num_classes, num_classes + 1):
        raise ValueError(f"expected a ({num_classes} or {num_classes + 1}, D) class-embedding table, "
                         f"got shape {table.shape}")
    if isinstance(scene, str):
        scene = class_id_from_name(scene)
    if scene is None or scene in (-1, UNKNOWN_CLASS):
        return table[num_classes] if table.shape[0] > num_classes else table.mean(axis=0)
    if not 0 <= int(scene) < num_classes:
        raise ValueError(f"scene id {scene} is out of range [0, {num_classes}) (use -1 for unknown)")
    return table[int(scene)]


def scene_embeddings(table: np.ndarray, scenes: Sequence[int | str | None]) -> np.ndarray:
    """(B, D) rows for a batch of scenes (``scene_embedding`` for each)."""
    return np.stack([scene_embedding(table, s) for s in scenes])
