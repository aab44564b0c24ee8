"""The CLIP text port against transformers' PyTorch CLIPTextModel, its reader, and the class-embedding tool.

Everything runs on tiny random models written in the real transformers formats, with a BPE tokenizer written
here (vocab.json + merges.txt), since no CLIP weights can be downloaded in CI.
"""

from __future__ import annotations

import hashlib
import json
import os

# transformers otherwise imports TensorFlow (installed for the data pipeline) at first use: ~5 s for nothing.
os.environ.setdefault("USE_TF", "0")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from reference.torch_clip import tiny_config, torch_text_model, write_tokenizer  # noqa: E402
from vpd_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer, pooled_token_index  # noqa: E402
from vpd_jax.models.vpd import with_unknown_row  # noqa: E402
from vpd_jax.scenes import NYU_CLASSES  # noqa: E402
from vpd_jax.text import (  # noqa: E402
    IMAGENET_TEMPLATES,
    TextEncoder,
    scene_embedding,
)
from vpd_jax.weights.clip import load_clip_text  # noqa: E402
from vpd_jax.weights.common import WeightsError  # noqa: E402

# Bounds: about 3x the largest error measured on the development CPU (fp32, absolute): pooled and hidden states
# 2.0e-6 (tiny), 4.4e-6 at ViT-L/14 size, the class-embedding table 7.2e-7 (docs/fidelity.md).
MAX_LEN = 20
PROMPTS = ["a photo of a garage", "a bad photo of a living room.", "kitchen",
           "itap of my home office, a very long prompt that is certainly cut at twenty tokens by truncation"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Folders of one tiny random CLIPTextModel in safetensors, .bin and Flax msgpack, with a tokenizer."""
    root = tmp_path_factory.mktemp("clip")
    vocab = write_tokenizer(root / "tok")
    model = torch_text_model(tiny_config(vocab), seed=0)
    dirs = {}
    for name, safe in (("safetensors", True), ("bin", False)):
        d = root / name
        model.save_pretrained(d, safe_serialization=safe)
        for f in ("vocab.json", "merges.txt"):
            (d / f).write_bytes((root / "tok" / f).read_bytes())
        dirs[name] = d
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(root / "tok"))
    return dict(root=root, dirs=dirs, model=model, tokenizer=tokenizer, vocab=vocab)


@pytest.fixture(scope="session")
def loaded(tiny):
    module, params, tok = load_clip_text(tiny["dirs"]["safetensors"])
    return module, params, tok


@pytest.fixture(scope="session")
def jit_apply():
    cache = {}

    def apply(module, params, ids, mask=None):
        key = (module, mask is None)
        if key not in cache:
            cache[key] = jax.jit(lambda p, i, m=None: module.apply({"params": p}, i, m))
        return cache[key](params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))

    return apply


def _torch_forward(model, ids, mask=None):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long),
                    attention_mask=None if mask is None else torch.as_tensor(np.asarray(mask)))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------------------------- tests

def test_tokenizer_files_work_offline(tiny):
    tok = tiny["tokenizer"]
    ids = tok(PROMPTS, padding="max_length", truncation=True, max_length=MAX_LEN)["input_ids"]
    assert all(len(r) == MAX_LEN for r in ids)
    assert ids[0][0] == tiny["vocab"] - 2 and tiny["vocab"] - 1 in ids[0]  # <|startoftext|> ... <|endoftext|>
    assert tok.decode(ids[0], skip_special_tokens=True).strip() == PROMPTS[0]  # no unknown bytes
    fast = transformers.CLIPTokenizerFast.from_pretrained(str(tiny["root"] / "tok"))
    assert fast(PROMPTS, padding="max_length", truncation=True, max_length=MAX_LEN)["input_ids"] == ids


def test_matches_pytorch(tiny, loaded, jit_apply):
    module, params, tok = loaded
    assert isinstance(tok, transformers.CLIPTokenizer)
    enc = tok(PROMPTS, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="np")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    # As the official FrozenCLIPEmbedder: input ids only; and with the padding mask too.
    for m in (None, mask):
        ref_h, ref_p = _torch_forward(tiny["model"], ids, m)
        out = jit_apply(module, params, ids, m)
        err_h, err_p = _max_err(out.last_hidden_state, ref_h), _max_err(out.pooler_output, ref_p)
        print(f"mask={m is not None}: last_hidden_state max err {err_h:.2e}, pooler_output {err_p:.2e}")
        assert err_h < 6e-6 and err_p < 6e-6


def test_bin_and_msgpack_give_same_params(tiny, loaded, tmp_path_factory):
    _, params, _ = loaded
    _, params_bin, _ = load_clip_text(tiny["dirs"]["bin"], tokenizer=False)
    flax_dir = tmp_path_factory.mktemp("clip_flax")
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        fm = transformers.FlaxCLIPTextModel.from_pretrained(str(tiny["dirs"]["bin"]), from_pt=True)
    fm.save_pretrained(flax_dir)
    assert (flax_dir / "flax_model.msgpack").is_file()
    _, params_flax, tok = load_clip_text(flax_dir)
    assert tok is None  # no tokenizer files in that folder
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for other in (params_bin, params_flax):
        assert jax.tree_util.tree_structure(other) == jax.tree_util.tree_structure(params)
        for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(other)):
            assert _max_err(a, b) == 0.0, jax.tree_util.keystr(path)


@pytest.mark.parametrize("variant", ["gelu", "legacy_eos"])
def test_variants_match_pytorch(tiny, tmp_path_factory, jit_apply, variant):
    """Exact GELU, and the legacy ``eos_token_id == 2`` pooling (argmax of the ids)."""
    kw = {"gelu": dict(hidden_act="gelu"), "legacy_eos": dict(eos_token_id=2)}[variant]
    model = torch_text_model(tiny_config(tiny["vocab"], **kw), seed=1)
    d = tmp_path_factory.mktemp(f"clip_{variant}")
    model.save_pretrained(d)
    module, params, _ = load_clip_text(d)
    assert module.config.hidden_act == model.config.hidden_act
    assert module.config.eos_token_id == model.config.eos_token_id
    rng = np.random.default_rng(0)
    ids = rng.integers(0, tiny["vocab"] - 2, size=(3, 9))
    ids[:2, 5] = tiny["vocab"] - 1  # rows 0, 1 have an end-of-text token; row 2 none
    ids[0, 7] = tiny["vocab"] - 1
    ref_h, ref_p = _torch_forward(model, ids)
    out = jit_apply(module, params, ids)
    assert _max_err(out.last_hidden_state, ref_h) < 5e-6
    assert _max_err(out.pooler_output, ref_p) < 5e-6


def test_bf16_compute_over_fp32_params(tiny, loaded, jit_apply):
    module, params, _ = loaded
    ids = tiny["tokenizer"](PROMPTS, padding="max_length", truncation=True, max_length=MAX_LEN,
                            return_tensors="np")["input_ids"]
    ref = jit_apply(module, params, ids).pooler_output
    bf16 = module.clone(dtype=jnp.bfloat16)
    out = jit_apply(bf16, params, ids).pooler_output
    assert out.dtype == jnp.bfloat16
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
    assert _max_err(out, ref) < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_pooling_rules():
    ids = jnp.array([[5, 9, 3, 9, 1], [5, 4, 3, 2, 7]])
    np.testing.assert_array_equal(pooled_token_index(ids, 9), [1, 0])  # first eos; none -> 0
    np.testing.assert_array_equal(pooled_token_index(ids, 2), [1, 4])  # legacy: first largest id


def test_full_clip_model_folder(tmp_path_factory, tiny, jit_apply):
    """A CLIPModel folder: ``text_model.`` keys are read, vision tower / projections / logit scale skipped."""
    text_cfg = tiny_config(tiny["vocab"])
    vision_cfg = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      image_size=8, patch_size=4)
    torch.manual_seed(2)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text_cfg, vision_config=vision_cfg,
                                                           projection_dim=8)).eval()
    d = tmp_path_factory.mktemp("clip_full")
    model.save_pretrained(d)
    module, params, _ = load_clip_text(d, tokenizer=False)
    ids = tiny["tokenizer"](PROMPTS[:2], padding="max_length", truncation=True, max_length=MAX_LEN,
                            return_tensors="np")["input_ids"]
    ref_h, ref_p = _torch_forward(model.text_model, ids)
    out = jit_apply(module, params, ids)
    assert _max_err(out.pooler_output, ref_p) < 3e-6 and _max_err(out.last_hidden_state, ref_h) < 3e-6


def test_bad_sources(tmp_path, tiny):
    def one_line_error(src, match):
        with pytest.raises(WeightsError, match=match) as e:
            load_clip_text(src)
        assert "\n" not in str(e.value)

    src = tiny["dirs"]["safetensors"]
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_bytes((src / "config.json").read_bytes())
    one_line_error(empty, "no weight file found")
    one_line_error(tmp_path / "missing", "no such file or folder")

    # Weights of another architecture under a CLIP config.
    from safetensors.numpy import save_file

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_bytes((src / "config.json").read_bytes())
    save_file({"conv_in.weight": np.zeros((4, 4, 3, 3), np.float32), "conv_in.bias": np.zeros(4, np.float32)},
              str(other / "model.safetensors"))
    one_line_error(other, "no CLIP text-model weights.*conv_in.bias")

    # A config of another model type.
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (bert / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    one_line_error(bert, "model_type 'bert' is not a CLIP text model")

    # A CLIP whose config does not fit its weights: shape mismatches and missing layers, named.
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(num_hidden_layers=3, intermediate_size=40)
    (wrong / "config.json").write_text(json.dumps(cfg))
    (wrong / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    one_line_error(wrong, r"missing: encoder/layers_2/.*shape mismatch: encoder/layers_0/mlp/fc1/bias")

    # A stray tensor in an otherwise valid file.
    from safetensors.numpy import load_file

    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "config.json").write_bytes((src / "config.json").read_bytes())
    state = load_file(str(src / "model.safetensors"))
    # Older transformers saved the position_ids buffer: skipped knowingly.
    state["text_model.embeddings.position_ids"] = np.arange(24, dtype=np.int64)[None]
    save_file(state, str(extra / "model.safetensors"))
    load_clip_text(extra, tokenizer=False)
    state["text_model.adapter.weight"] = np.zeros((2, 2), np.float32)
    state["unet.conv.weight"] = np.zeros((2,), np.float32)
    save_file(state, str(extra / "model.safetensors"))
    one_line_error(extra, "not part of a CLIP model: unet.conv.weight")
    del state["unet.conv.weight"]
    save_file(state, str(extra / "model.safetensors"))
    one_line_error(extra, "unexpected: adapter/kernel")


def test_stable_diffusion_layout_and_weight_file(tiny, loaded, tmp_path):
    """A pipeline folder (text_encoder/ + tokenizer/ beside it), and a weight file given directly."""
    src = tiny["dirs"]["safetensors"]
    for sub, names in (("text_encoder", ("config.json", "model.safetensors")), ("tokenizer", ("vocab.json",
                                                                                           "merges.txt"))):
        (tmp_path / sub).mkdir()
        for n in names:
            (tmp_path / sub / n).write_bytes((src / n).read_bytes())
    _, params, _ = loaded
    for source in (tmp_path, src / "model.safetensors"):
        _, got, tok = load_clip_text(source)
        assert isinstance(tok, transformers.CLIPTokenizer)
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)


def test_hub_id_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(WeightsError, match=r"openai/clip-vit-large-patch14: .*(local|cache)") as e:
        load_clip_text("openai/clip-vit-large-patch14")
    assert "\n" not in str(e.value)


def test_text_encoder_embed(tiny):
    enc = TextEncoder.from_pretrained(tiny["dirs"]["safetensors"], batch_size=3)
    ids = tiny["tokenizer"](PROMPTS, padding="max_length", truncation=True, max_length=MAX_LEN,
                            return_tensors="np")["input_ids"]
    _, ref = _torch_forward(tiny["model"], ids)
    got = enc.embed(PROMPTS)  # 4 prompts in batches of 3: a padded last batch
    assert got.shape == (4, 32) and got.dtype == np.float32
    assert _max_err(got, ref) < 4.5e-6
    np.testing.assert_array_equal(enc.tokenize(PROMPTS), ids)


def test_scene_embedding():
    table = np.arange(27 * 4, dtype=np.float32).reshape(27, 4)
    full = with_unknown_row(table)
    assert full.shape == (28, 4)
    np.testing.assert_allclose(full[27], table.mean(0))
    np.testing.assert_array_equal(scene_embedding(table, "kitchen"), table[6])
    np.testing.assert_array_equal(scene_embedding(full, 3), table[3])
    for unknown in (None, -1, 27):
        np.testing.assert_allclose(scene_embedding(full, unknown), table.mean(0))
        np.testing.assert_allclose(scene_embedding(table, unknown), table.mean(0))
    with pytest.raises(ValueError):
        scene_embedding(table, 28)
    with pytest.raises(ValueError):
        scene_embedding(table, "garage")


def test_templates_are_the_clip_imagenet_80():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    # Pinned so an accidental edit cannot pass unnoticed.
    digest = hashlib.sha1("\n".join(IMAGENET_TEMPLATES).encode()).hexdigest()
    assert digest == "ac25554d7f839d70155b8ecf9ce5cbf18dd049a8"


def test_class_embeddings_tool(tiny, tmp_path):
    """The command end to end against the recipe computed directly with PyTorch."""
    from vpd_jax.tools.class_embeddings import load_table, main, save_table

    src = tiny["dirs"]["safetensors"]
    assert main(["--clip", str(src), "--out", str(tmp_path / "t28.pth"), "--with_mean"]) == 0
    t28 = torch.load(tmp_path / "t28.pth", weights_only=True).numpy()
    assert t28.shape == (28, 32) and t28.dtype == np.float32
    table = t28[:27]
    np.testing.assert_allclose(t28[27], table.mean(0), atol=1e-6)
    np.testing.assert_array_equal(load_table(tmp_path / "t28.pth"), t28)

    # The fast tokenizer gives the slow one's ids (test_tokenizer_files_work_offline) at a tenth of the time.
    tok, model = transformers.CLIPTokenizerFast.from_pretrained(str(tiny["root"] / "tok")), tiny["model"]
    rows = []
    with torch.no_grad():
        for name in NYU_CLASSES:
            texts = [t.format(name.replace("_", " ")) for t in IMAGENET_TEMPLATES]
            ids = tok(texts, truncation=True, max_length=MAX_LEN, padding="max_length", return_tensors="pt")
            rows.append(model(input_ids=ids["input_ids"]).pooler_output.mean(dim=0))
    ref = torch.stack(rows).numpy()
    err = _max_err(table, ref)
    print(f"class table max err vs PyTorch recipe: {err:.2e}")
    assert err < 2.2e-6

    # A custom class list; the other output formats.
    (tmp_path / "classes.json").write_text(json.dumps(["kitchen", "bathroom"]))
    assert main(["--clip", str(src), "--out", str(tmp_path / "t.npy"), "--classes", str(tmp_path / "classes.json"),
                 "--no_progress"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), table[[6, 1]])
    save_table(table, tmp_path / "t.safetensors")
    np.testing.assert_array_equal(load_table(tmp_path / "t.safetensors"), table)
    # Usage mistakes: one line, exit 2, before any encoding.
    assert main(["--clip", str(src), "--out", str(tmp_path / "t.txt")]) == 2
    assert main(["--clip", str(src), "--out", str(tmp_path / "t.npy"), "--classes", str(tmp_path / "none.json")]) == 2


def test_config_from_clip_model_dict():
    cfg = CLIPTextConfig.from_dict({"model_type": "clip", "text_config": {"hidden_size": 768},
                                    "text_config_dict": {"hidden_size": 64, "num_attention_heads": 4},
                                    "vision_config": {"hidden_size": 1024}})
    assert cfg.hidden_size == 64 and cfg.num_attention_heads == 4 and cfg.eos_token_id == 49407
    big = CLIPTextConfig.vit_l14()
    assert (big.hidden_size, big.num_hidden_layers, big.eos_token_id) == (768, 12, 2)
    shapes = jax.eval_shape(lambda: CLIPTextTransformer(big).init(jax.random.PRNGKey(0),
                                                                  jnp.zeros((1, 20), jnp.int32)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert n == 123_060_480  # transformers' CLIPTextModel for openai/clip-vit-large-patch14


@pytest.mark.slow
def test_vit_l14_size_matches_pytorch(tmp_path, jit_apply):
    """openai/clip-vit-large-patch14's text-tower config at full size, random weights, through the reader."""
    cfg = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
               bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=768)
    torch.manual_seed(3)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).eval()
    model.save_pretrained(tmp_path)
    module, params, tok = load_clip_text(tmp_path)
    assert tok is None and module.config == CLIPTextConfig.vit_l14()
    rng = np.random.default_rng(0)
    ids = np.full((2, MAX_LEN), 49407)
    ids[:, 0] = 49406
    ids[0, 1:7] = rng.integers(0, 49406, 6)
    ids[1, 1:12] = rng.integers(0, 49406, 11)
    ref_h, ref_p = _torch_forward(model, ids)
    out = jit_apply(module, params, ids)
    err_h, err_p = _max_err(out.last_hidden_state, ref_h), _max_err(out.pooler_output, ref_p)
    print(f"ViT-L/14 size: last_hidden_state max err {err_h:.2e}, pooler_output {err_p:.2e}")
    assert err_h < 1.3e-5 and err_p < 1.3e-5
