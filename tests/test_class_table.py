"""Scene tables for your own classes: ``python -m vpd_jax.tools.class_embeddings --classes/--classes_file
--templates``, against ``class_embedding_table`` called directly on a tiny random CLIP (as tests/test_clip.py)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("USE_TF", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from reference.torch_clip import tiny_config, torch_text_model, write_tokenizer  # noqa: E402
from vpd_jax.data.segmentation import ADE20K_CLASSES  # noqa: E402
from vpd_jax.text import (  # noqa: E402
    AUTHOR_TEMPLATE,
    IMAGENET_TEMPLATES,
    SINGLE_TEMPLATE,
    TextEncoder,
    class_embedding_table,
    class_prompt_name,
)
from vpd_jax.tools.class_embeddings import classes_path, load_table, main  # noqa: E402

NAMES = ["kitchen", "garage", "parking lot", "living_room"]  # not sorted: the rows must keep this order


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny random CLIPTextModel folder with its tokenizer, and the encoder the tool builds from it."""
    root = tmp_path_factory.mktemp("clip")
    vocab = write_tokenizer(root)
    torch_text_model(tiny_config(vocab), seed=0).save_pretrained(root, safe_serialization=True)
    return root


def _run(clip, out, *args) -> int:
    return main(["--clip", str(clip), "--out", str(out), "--fast_tokenizer", "--no_progress", *args])


def test_own_classes_in_given_order(clip, tmp_path, capsys):
    enc = TextEncoder.from_pretrained(clip, use_fast=True, batch_size=len(IMAGENET_TEMPLATES))
    ref = class_embedding_table(enc, NAMES)

    assert _run(clip, tmp_path / "a.npy", "--classes", ",".join(NAMES)) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(tmp_path / "a.classes.json") in last, last
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), ref)
    assert json.loads((tmp_path / "a.classes.json").read_text()) == {
        "classes": NAMES, "templates": "official", "with_mean": False, "max_length": 20}
    assert classes_path(tmp_path / "a.npy") == tmp_path / "a.classes.json"

    # The same names from a text file (comments, blank lines, surrounding spaces), a JSON list under either flag,
    # and the .classes.json written above: the same table, exactly.
    (tmp_path / "classes.txt").write_text("# my scenes\n\nkitchen\n  garage \nparking lot\n\n# NYU's\nliving_room\n")
    (tmp_path / "classes.json").write_text(json.dumps(NAMES))
    for i, args in enumerate((["--classes_file", str(tmp_path / "classes.txt")],
                              ["--classes_file", str(tmp_path / "classes.json")],
                              ["--classes", str(tmp_path / "classes.json")],
                              ["--classes_file", str(tmp_path / "a.classes.json")])):
        assert _run(clip, tmp_path / f"b{i}.npy", *args) == 0, args
        np.testing.assert_array_equal(np.load(tmp_path / f"b{i}.npy"), ref, err_msg=str(args))
        assert json.loads((tmp_path / f"b{i}.classes.json").read_text())["classes"] == NAMES

    # Another order gives the rows in that order; --with_mean and another format are recorded too.
    assert _run(clip, tmp_path / "r.safetensors", "--classes", ",".join(NAMES[::-1]), "--with_mean") == 0
    table = load_table(tmp_path / "r.safetensors")
    np.testing.assert_array_equal(table[:4], ref[::-1])
    np.testing.assert_allclose(table[4], ref.mean(0), atol=1e-6)
    assert json.loads((tmp_path / "r.classes.json").read_text()) == {
        "classes": NAMES[::-1], "templates": "official", "with_mean": True, "max_length": 20}
    # Nothing but the outputs is left in the folder (the writes are atomic).
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_single_template(clip, tmp_path):
    assert SINGLE_TEMPLATE == ("a photo of a {}.",) and SINGLE_TEMPLATE[0] in IMAGENET_TEMPLATES
    assert _run(clip, tmp_path / "s.npy", "--classes", ",".join(NAMES), "--templates", "single") == 0
    enc = TextEncoder.from_pretrained(clip, use_fast=True, batch_size=1)
    ref = enc.embed([f"a photo of a {class_prompt_name(n)}." for n in NAMES])
    got = np.load(tmp_path / "s.npy")
    np.testing.assert_array_equal(got, ref)
    assert json.loads((tmp_path / "s.classes.json").read_text())["templates"] == "single"
    official = class_embedding_table(TextEncoder.from_pretrained(clip, use_fast=True), NAMES)
    assert not np.allclose(got, official)


BAD = [
    ("empty name", ["--classes", "kitchen,,garage"], "entry 2 is empty"),
    ("trailing comma", ["--classes", "kitchen,garage,"], "entry 3 is empty"),
    ("duplicate", ["--classes", "kitchen,garage,kitchen"], "entry 3 'kitchen' repeats entry 1"),
    ("same prompt", ["--classes", "living_room,living room"], "entry 2 'living room' repeats entry 1"),
    ("no names", ["--classes", ""], "no class names"),
    ("duplicate line", ["--classes_file", "{tmp}/dup.txt"], "line 4 'garage' repeats line 2"),
    ("empty in JSON", ["--classes_file", "{tmp}/empty.json"], "entry 2 is empty"),
    ("only comments", ["--classes_file", "{tmp}/comments.txt"], "no class names"),
    ("missing file", ["--classes_file", "{tmp}/none.txt"], "none.txt"),
    ("missing JSON, old form", ["--classes", "{tmp}/none.json"], "none.json"),
    ("a text file to --classes", ["--classes", "{tmp}/dup.txt"], "use --classes_file"),
    ("both", ["--classes", "kitchen", "--classes_file", "{tmp}/dup.txt"], "not both"),
    ("unknown templates", ["--templates", "many"], "--templates"),
]


@pytest.mark.parametrize("name,args,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_class_list_is_one_line(name, args, needle, tmp_path, capsys):
    (tmp_path / "dup.txt").write_text("kitchen\ngarage\n# a comment\ngarage\n")
    (tmp_path / "empty.json").write_text(json.dumps(["kitchen", " "]))
    (tmp_path / "comments.txt").write_text("# nothing\n\n")
    args = [a.format(tmp=tmp_path) for a in args]
    # Checked before the CLIP model is read: a missing --clip is never reached.
    try:
        code = main(["--clip", str(tmp_path / "no_clip"), "--out", str(tmp_path / "t.npy"), *args])
    except SystemExit as e:  # argparse's own mistakes exit from the parser
        code = e.code
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    assert not (tmp_path / "t.npy").exists() and not (tmp_path / "t.classes.json").exists()


def test_ade20k_table_with_the_authors_sentence(clip, tmp_path):
    assert _run(clip, tmp_path / "ade.npy", "--dataset", "ade20k", "--templates", "author") == 0
    table = np.load(tmp_path / "ade.npy")
    side = json.loads((tmp_path / "ade.classes.json").read_text())
    assert side["classes"] == list(ADE20K_CLASSES) and side["templates"] == "author" and table.shape[0] == 150
    enc = TextEncoder.from_pretrained(clip, use_fast=True, batch_size=1)
    np.testing.assert_array_equal(table, class_embedding_table(enc, ADE20K_CLASSES, templates=AUTHOR_TEMPLATE))
    # One row against transformers' own PyTorch model on the sentence itself (pooled output, max_length 20).
    import torch

    model = transformers.CLIPTextModel.from_pretrained(clip).eval()
    tok = transformers.CLIPTokenizerFast.from_pretrained(clip)
    ids = tok(["a photo of a chest of drawers"], padding="max_length", truncation=True, max_length=20,
              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).pooler_output[0].numpy()
    row = table[list(ADE20K_CLASSES).index("chest of drawers")]
    # measured 1.8e-7 of the largest value (2-core CPU, fp32)
    np.testing.assert_allclose(row, want, rtol=0, atol=5e-7 * np.abs(want).max())
