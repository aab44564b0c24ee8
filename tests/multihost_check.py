"""Two-process check of the multi-host path: jax.distributed start-up, per-process batch feeding, the step.

Started twice by tests/test_step.py (process ids 0 and 1, 2 simulated CPU devices each):
    python tests/multihost_check.py <coordinator host:port> <process id>
Each process trains the toy model on a 2x2 (data x fsdp) mesh spanning both processes, and compares
the result with the same training on its own first device alone. Prints one JSON line.
"""

import json
import os
import pathlib
import sys

import jax

from vpd_jax import parallel


def main():
    address, pid = sys.argv[1], int(sys.argv[2])
    assert parallel.initialize_distributed(address, num_processes=2, process_id=pid)
    root = pathlib.Path(__file__).resolve().parents[1]
    jax.config.update("jax_compilation_cache_dir", os.environ.get("VPD_JAX_CACHE", str(root / ".jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_threefry_partitionable", False)  # see step_multidevice_check.py
    import step_multidevice_check as toy
    from jax.experimental import multihost_utils

    assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
    ref = toy.run(parallel.make_mesh(1, 1, jax.local_devices()[:1]))
    params, bstats, metrics, state, _ = toy.run(parallel.make_mesh(2, 2))
    full = multihost_utils.process_allgather(state.params, tiled=True)
    diff = max(toy.max_abs_diff(full, ref[0]), max(abs(m["loss"] - r["loss"]) for m, r in zip(metrics, ref[2])))
    print(json.dumps({"process": pid, "max_abs_diff": diff, "ok": bool(diff < 2e-5)}), flush=True)
    sys.exit(0 if diff < 2e-5 else 1)


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    main()
