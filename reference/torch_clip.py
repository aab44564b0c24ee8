"""transformers' PyTorch CLIP text model at toy sizes, and a real CLIP BPE tokenizer written from scratch.

No CLIP weights can be downloaded in CI: the tests write tiny random ``CLIPTextModel``s with transformers' own
classes and a vocabulary trained here on the prompt templates and NYU class names.
"""

from __future__ import annotations

import collections
import json
import pathlib

import torch
import transformers

from vpd_jax.scenes import NYU_CLASSES
from vpd_jax.text import IMAGENET_TEMPLATES


def write_tokenizer(folder: pathlib.Path, num_merges: int = 160) -> int:
    """A real CLIP BPE vocabulary trained on the templates and class names; returns its size."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    text = " ".join(t.format(n.replace("_", " ")) for t in IMAGENET_TEMPLATES for n in NYU_CLASSES[:6])
    words = collections.Counter(text.replace(".", " . ").replace(",", " , ").split())
    # CLIP's BPE marks the last symbol of a word with </w>.
    corpus = {tuple(w[:-1]) + (w[-1] + "</w>",): c for w, c in words.items()}
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, c in corpus.items():
            for a, b in zip(word, word[1:]):
                pairs[a, b] += c
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merges.append((a, b))
        new = {}
        for word, c in corpus.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new[tuple(out)] = c
        corpus = new
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [a + b for a, b in merges]
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    # The first line of merges.txt is a version header that CLIPTokenizer skips.
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return len(tokens)


def tiny_config(vocab_size: int, **kw) -> dict:
    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=24, hidden_act="quick_gelu", layer_norm_eps=1e-5,
               bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=1)
    cfg.update(kw)
    return cfg


def torch_text_model(cfg: dict, seed: int):
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).eval()
    with torch.no_grad():  # random LayerNorm affine too, so a scale/bias mix-up cannot pass
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model
