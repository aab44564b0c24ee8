"""Shared test set-up: the persistent compile cache, quiet reference libraries, GPU skipping."""

from __future__ import annotations

import os
import pathlib

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# transformers would import TensorFlow on first use (seconds per session) although we only use its torch side.
os.environ.setdefault("USE_TF", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
jax.config.update("jax_compilation_cache_dir", str(ROOT / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# The parity tests compare fp32 against PyTorch at 1e-4..1e-6: on GPUs XLA's default precision would use TF32
# (3e-3 max abs error on the tiny UNet, seen on an H100), so tests ask for true fp32 everywhere.
jax.config.update("jax_default_matmul_precision", "highest")

# The official NYU lists (the depth/ folder of wl-zhao/VPD: nyu_train_list.txt, nyu_test_list.txt,
# nyu_class_list.json): a folder holding them, named by VPD_NYU_LISTS; the tests that read them skip without it.
NYU_LISTS_ENV = "VPD_NYU_LISTS"


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    skip_gpu = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def reference_dir():
    folder = pathlib.Path(os.environ.get(NYU_LISTS_ENV, "") or "/nonexistent")
    if not (folder / "nyu_train_list.txt").exists():
        pytest.skip(f"{NYU_LISTS_ENV} names no folder with the official NYU lists (wl-zhao/VPD depth/)")
    return folder


def run_entry_point(script: str, *args: str, check: bool = True, timeout: int = 900):
    """``python SCRIPT ARGS`` from the repository root on the CPU, with the persistent compile cache shared."""
    import subprocess
    import sys

    env = dict(os.environ, VPD_COMPILATION_CACHE=str(ROOT / ".jax_cache"), TF_CPP_MIN_LOG_LEVEL="3", USE_TF="0",
               JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="session")
def run_script():
    """:func:`run_entry_point`, for tests that run ``train.py``, ``eval.py`` or ``predict.py`` end to end."""
    return run_entry_point
