"""grain loaders over a prepared (synthetic) dataset: batch format, determinism, exact resume (in-process and
with worker processes), per-host sharding, official CutDepth cadence, evaluation order across hosts, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vpd_jax.data import builder, catalog, loader, sources
from vpd_jax.data.augment import AugmentConfig

H, W = 24, 32
NUM_TRAIN, NUM_TEST = 22, 7
DS = "nyu_vpd/synthetic"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    plan = {"train": lambda: sources.synthetic_items(0, NUM_TRAIN, H, W, "train", 2),
            "test": lambda: sources.synthetic_items(0, NUM_TEST, H, W, "test", 2)}
    builder.build_nyu_vpd(d, "synthetic", plan, report=builder.PrepareReport(log=lambda m: None))
    return d


@pytest.fixture(scope="module")
def source_images(data_dir):
    src = loader.open_source(data_dir, DS, "train")
    return [src[i]["image"] for i in range(len(src))]


def _index_of(image, source_images):
    hits = [i for i, s in enumerate(source_images) if np.array_equal(s, image)]
    assert len(hits) == 1
    return hits[0]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_batches_have_the_promised_format(data_dir):
    it = loader.make_train_loader(data_dir, dataset=DS, global_batch_size=4, seed=0,
                                  aug=AugmentConfig(crop_size=(H, H)))
    b = next(it)
    assert set(b) == {"image", "depth", "class_id", "valid"}
    assert b["image"].dtype == np.uint8 and b["image"].shape == (4, H, H, 3)
    assert b["depth"].dtype == np.float32 and b["depth"].shape == (4, H, H)
    assert b["class_id"].dtype == np.int32 and b["class_id"].shape == (4,)
    assert b["valid"].dtype == np.bool_ and b["valid"].all()
    assert ((b["depth"] >= 0) & (b["depth"] <= 10)).all()
    mm = loader.make_train_loader(data_dir, dataset=DS, global_batch_size=4, seed=0, class_rule="mmseg",
                                  aug=AugmentConfig(crop_size=(H, H)))
    assert (0 <= next(mm)["class_id"]).all()


def test_each_epoch_visits_every_example_once_in_a_new_order(data_dir, source_images):
    it = loader.make_train_loader(data_dir, dataset=DS, global_batch_size=2, seed=5, aug=AugmentConfig.none(),
                                  num_epochs=2)
    batches = list(it)
    assert len(batches) == NUM_TRAIN  # 2 epochs of 11 batches of 2
    order = [_index_of(img, source_images) for b in batches for img in b["image"]]
    e1, e2 = order[:NUM_TRAIN], order[NUM_TRAIN:]
    assert sorted(e1) == sorted(e2) == list(range(NUM_TRAIN))
    assert e1 != e2 and e1 != sorted(e1)


def test_same_seed_same_stream_other_seed_other_stream(data_dir):
    kw = dict(dataset=DS, global_batch_size=4, aug=AugmentConfig(crop_size=(H, H)))
    a = _take(loader.make_train_loader(data_dir, seed=1, **kw), 3)
    b = _take(loader.make_train_loader(data_dir, seed=1, **kw), 3)
    c = _take(loader.make_train_loader(data_dir, seed=2, **kw), 3)
    _assert_same(a, b)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_resume_yields_exactly_the_uninterrupted_batches(data_dir):
    kw = dict(dataset=DS, global_batch_size=4, seed=3, aug=AugmentConfig(crop_size=(H, H), cutdepth="mmseg"))
    full = _take(loader.make_train_loader(data_dir, **kw), 12)  # 5 batches per epoch: crosses two boundaries
    it = loader.make_train_loader(data_dir, **kw)
    _take(it, 4)
    state = it.get_state()
    assert isinstance(state, bytes)
    json.loads(state)  # JSON, so it can go into an orbax checkpoint as text
    del it
    resumed = loader.make_train_loader(data_dir, **kw)
    resumed.set_state(state)
    _assert_same(_take(resumed, 8), full[4:])
    other = loader.make_train_loader(data_dir, **{**kw, "seed": 4})
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)
    # A state saved before the class-row and input-crop fields existed resumes the same stream.
    old = json.loads(state)
    for k in ("class_rows", "input_crop"):
        del old["fingerprint"][k]
    again = loader.make_train_loader(data_dir, **kw)
    again.set_state(json.dumps(old).encode())
    _assert_same(_take(again, 8), full[4:])


def test_resume_with_worker_processes(data_dir):
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    kw = dict(dataset=DS, global_batch_size=2, seed=7, aug=AugmentConfig(crop_size=(H, H)), worker_count=2)
    it = loader.make_train_loader(data_dir, **kw)
    _take(it, 3)
    state = it.get_state()
    rest = _take(it, 4)  # the uninterrupted run's next batches
    it.close()
    resumed = loader.make_train_loader(data_dir, **kw)
    resumed.set_state(state)
    _assert_same(_take(resumed, 4), rest)
    resumed.close()
    # Per-example augmentation depends on the stream position only; workers only regroup examples into batches.
    single = _take(loader.make_train_loader(data_dir, **{**kw, "worker_count": 0}), NUM_TRAIN)
    pool = {x.tobytes() for b in single for x in b["image"]}
    assert all(x.tobytes() in pool for b in rest for x in b["image"])
    with pytest.raises(ValueError, match="worker_count"):
        loader.make_train_loader(data_dir, **{**kw, "worker_count": 0}).set_state(state)


def test_hosts_split_each_global_batch(data_dir, source_images):
    """3 hosts x 2 images together yield exactly the global batches of 1 host x 6, augmentation included."""
    aug = AugmentConfig(crop_size=(32, 48), cutdepth="official", flip=True, photometric=True)
    kw = dict(dataset=DS, global_batch_size=6, seed=0, aug=aug, num_epochs=1)
    single = list(loader.make_train_loader(data_dir, **kw))
    assert len(single) == 3 and all(b["image"].shape[0] == 6 for b in single)  # 22 // 6 = 3 global batches
    hosts = [list(loader.make_train_loader(data_dir, **kw, process_index=p, process_count=3)) for p in range(3)]
    assert all(len(h) == 3 and all(b["image"].shape[0] == 2 for b in h) for h in hosts)
    for s, parts in zip(single, zip(*hosts)):
        for key in ("image", "depth", "class_id"):
            np.testing.assert_array_equal(np.concatenate([b[key] for b in parts]), s[key])
    seen = [{_index_of(img, source_images) for b in h for img in b["image"]} for h in
            [list(loader.make_train_loader(data_dir, **{**kw, "aug": AugmentConfig.none()}, process_index=p,
                                           process_count=3)) for p in range(3)]]
    assert all(len(s) == 6 for s in seen)  # within an epoch, the hosts' examples are disjoint
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    with pytest.raises(ValueError, match="divisible"):
        loader.make_train_loader(data_dir, dataset=DS, global_batch_size=5, seed=0, process_count=2)


def test_official_cutdepth_fires_on_every_fourth_sample(data_dir, source_images):
    aug = AugmentConfig(crop_size=None, cutdepth="official", flip=False, photometric=False)
    batches = list(loader.make_train_loader(data_dir, dataset=DS, global_batch_size=2, seed=0, aug=aug,
                                            num_epochs=2))
    images = [img for b in batches for img in b["image"]]
    changed = [not any(np.array_equal(img, s) for s in source_images) for img in images]
    expected = [(i % NUM_TRAIN) % 4 == 0 for i in range(len(images))]  # the counter restarts each epoch
    assert changed == expected


def test_eval_loader_every_example_once_in_order_on_any_host_count(data_dir):
    src = loader.open_source(data_dir, DS, "test")
    names = [src[i]["file_name"].decode() for i in range(len(src))]
    assert len(names) == NUM_TEST == len(set(names))
    for hosts, bs in ((1, 3), (2, 2), (3, 2), (4, 1), (8, 1)):
        got, counts = [], set()
        for p in range(hosts):
            ev = loader.make_eval_loader(data_dir, dataset=DS, batch_size=bs, process_index=p, process_count=hosts)
            batches = list(ev)
            assert len(batches) == ev.num_batches and all(b["image"].shape[0] == bs for b in batches)
            counts.add(ev.num_batches)
            for b in batches:
                assert b["image"].shape[1:] == (H, W, 3) and b["depth"].shape[1:] == (H, W)
                assert (b["depth"][~b["valid"]] == 0).all()
                got += [n for n, v in zip(b["file_name"], b["valid"]) if v]
            assert list(iter(ev))[0]["file_name"].tolist() == batches[0]["file_name"].tolist()  # re-iterable
        assert got == names, (hosts, bs)
        assert len(counts) == 1  # every host runs the same number of steps
    first = next(iter(loader.make_eval_loader(data_dir, dataset=DS, batch_size=2)))
    np.testing.assert_array_equal(first["image"][0], src[0]["image"])
    np.testing.assert_array_equal(first["depth"][0], src[0]["depth"])


def test_missing_dataset_or_split_is_one_clear_line(data_dir, tmp_path):
    with pytest.raises(catalog.DatasetNotFoundError) as e:
        loader.make_train_loader(str(tmp_path), dataset="nyu_vpd/bts", global_batch_size=2, seed=0)
    msg = str(e.value)
    assert "\n" not in msg and "no prepared dataset 'nyu_vpd/bts'" in msg
    assert "python -m vpd_jax.data.prepare --source bts" in msg and str(tmp_path) in msg
    with pytest.raises(catalog.DatasetNotFoundError, match="prepared there: nyu_vpd/synthetic"):
        loader.make_eval_loader(data_dir, dataset="nyu_vpd/mat", batch_size=1)
    with pytest.raises(catalog.DatasetNotFoundError, match="has no split 'validation'"):
        loader.make_eval_loader(data_dir, dataset=DS, split="validation", batch_size=1)
    with pytest.raises(catalog.DatasetNotFoundError, match="does not exist"):
        loader.make_eval_loader(str(tmp_path / "nowhere"), dataset=DS, batch_size=1)
    with pytest.raises(catalog.DatasetNotFoundError, match="unknown dataset 'nyu'"):
        loader.make_eval_loader(data_dir, dataset="nyu", batch_size=1)
    assert catalog.prepared_datasets(data_dir) == {DS: ["train", "test"]}
    assert DS in catalog.dataset_names() and "nyu_depth_v2" in catalog.dataset_names()


def test_reading_imports_no_tensorflow_and_the_package_imports_nothing_heavy(data_dir):
    code = (
        "import sys\n"
        "import vpd_jax, vpd_jax.data, vpd_jax.data.loader, vpd_jax.data.augment\n"
        "heavy = [m for m in ('tensorflow', 'tensorflow_datasets', 'grain', 'cv2', 'h5py', 'jax') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from vpd_jax.data import loader\n"
        f"b = next(loader.make_train_loader({data_dir!r}, dataset={DS!r}, global_batch_size=2, seed=0))\n"
        "assert b['image'].shape[0] == 2\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_a_tfrecord_build_is_refused_with_the_conversion_command(data_dir, tmp_path):
    import shutil

    src = os.path.join(data_dir, "nyu_vpd/synthetic/1.0.0")
    dst = tmp_path / "nyu_vpd/synthetic/1.0.0"
    shutil.copytree(src, dst)
    info = json.loads((dst / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"
    (dst / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(catalog.DatasetNotFoundError, match="stored as tfrecord.*tfds convert_format"):
        loader.make_eval_loader(str(tmp_path), dataset=DS, batch_size=1)
