"""Training-loader throughput: images/s with every augmentation on, 480x640 sources cropped to 480x480, by
worker count, plus a per-stage profile of one example (decode, CutDepth/flip/crop, photometric).

    python benchmarks/bench_loader.py [--workers 0,1,2] [--num_images 64] [--batch 8] [--batches 30]

It prepares a small synthetic ``nyu_vpd`` dataset at full NYU size (stored like the real one: encoded image,
zlib float32 depth) in a temporary ``data_dir`` unless ``--data_dir`` already holds one. The target is at
least 50 images/s per CPU core.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("data_dir", None, "existing data_dir with nyu_vpd/synthetic at 480x640 (default: build one)")
flags.DEFINE_string("workers", "0,1,2", "comma-separated worker counts to measure")
flags.DEFINE_integer("num_images", 48, "synthetic training images to prepare")
flags.DEFINE_integer("batch", 8, "batch size")
flags.DEFINE_integer("batches", 30, "batches timed per setting (after 3 warm-up batches)")
FLAGS = flags.FLAGS


def _prepare(data_dir: str, n: int):
    import cv2
    import numpy as np

    from vpd_jax.data import builder, sources, testing

    # Rendering 480x640 scenes costs ~1 s each; upsampled small renders plus full-size texture noise give
    # images of realistic size and JPEG cost in a fraction of that.
    def items():
        from vpd_jax.data import synthetic

        for sc_i in range(n):
            sc = synthetic.generate_scene(0, sc_i, 0, 120, 160)
            img = cv2.resize(sc.image, (640, 480), interpolation=cv2.INTER_LINEAR)
            rng = np.random.default_rng(sc_i)
            img = np.clip(img.astype(np.int16) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
            depth = cv2.resize(sc.depth, (640, 480), interpolation=cv2.INTER_NEAREST)
            depth = (np.round(depth * 1000) / 1000).astype(np.float32)  # mm steps, like real NYU depth
            ok, enc = cv2.imencode(".jpg", img[..., ::-1])  # BTS images are JPEG
            name = f"{sc.scene_dir}/rgb_{sc_i:05d}.jpg"
            yield sources.Item(name, lambda enc=enc, depth=depth, sc=sc, name=name: sources.make_example(
                enc.tobytes(), depth, sc.scene_dir, name, f"{sc.scene_dir}_rgb.jpg", f"{sc.scene_dir}_0.jpg", name))

    del testing
    builder.build_nyu_vpd(data_dir, "synthetic", {"train": items}, {"train": n},
                          builder.PrepareReport(log=lambda m: None))


def _profile(data_dir: str, reps: int = 20):
    import numpy as np

    from vpd_jax.data import augment as ag
    from vpd_jax.data import loader

    src = loader.open_source(data_dir, "nyu_vpd/synthetic", "train")
    cfg = ag.AugmentConfig()
    t = {"read+decode (jpeg, zlib depth)": 0.0, "cutdepth+flip+crop": 0.0, "photometric": 0.0}
    for i in range(reps):
        t0 = time.process_time()
        ex = loader.decode_record(src[i % len(src)], "official")
        t1 = time.process_time()
        rng = np.random.default_rng(i)
        geo = ag.AugmentConfig(photometric=False)
        img, dep, _ = ag.augment(ex["image"], ex["depth"], geo, rng, position=0)
        t2 = time.process_time()
        p = ag.PhotometricParams((1.1, 10.0), 1.1, (10.0, 10.0, 10.0))  # all three ops: the worst case
        ag.apply_photometric(img, p)
        t3 = time.process_time()
        t["read+decode (jpeg, zlib depth)"] += t1 - t0
        t["cutdepth+flip+crop"] += t2 - t1
        t["photometric"] += t3 - t2
    del cfg
    return {k: 1000 * v / reps for k, v in t.items()}


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    from vpd_jax.data import loader
    from vpd_jax.data.augment import AugmentConfig

    tmp = None
    data_dir = FLAGS.data_dir
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory()
        data_dir = tmp.name
        t0 = time.perf_counter()
        _prepare(data_dir, FLAGS.num_images)
        print(f"prepared {FLAGS.num_images} synthetic 480x640 images in {time.perf_counter() - t0:.1f}s")
    cores = len(os.sched_getaffinity(0))
    print(f"CPU cores available: {cores}; batch {FLAGS.batch}; all augmentations (official 480 recipe)")
    prof = _profile(data_dir)
    for stage, ms in prof.items():
        print(f"  per image {stage:32s} {ms:6.2f} ms CPU")
    print(f"  per image total                          {sum(prof.values()):6.2f} ms CPU "
          f"= {1000 / sum(prof.values()):.0f} images/s per core")
    for w in [int(x) for x in FLAGS.workers.split(",")]:
        it = loader.make_train_loader(data_dir, dataset="nyu_vpd/synthetic", global_batch_size=FLAGS.batch, seed=0,
                                      aug=AugmentConfig(), worker_count=w)
        for _ in range(3):
            next(it)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(FLAGS.batches):
            b = next(it)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert b["image"].shape[1:] == (480, 480, 3)
        n = FLAGS.batches * FLAGS.batch
        ips = n / dt
        # In-process, CPU seconds per image give a per-core rate that does not depend on other load on the
        # machine; with workers the work happens in child processes this process cannot time.
        cpu_rate = f", {n / cpu:6.1f} images per CPU-second in-process" if w == 0 else ""
        print(f"workers={w}: {ips:7.1f} images/s wall ({ips / cores:6.1f} per core){cpu_rate}")
        it.close()
    print(f"load average after: {os.getloadavg()[0]:.1f} (other processes share these cores)")
    if tmp is not None:
        tmp.cleanup()
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
