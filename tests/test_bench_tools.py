"""Benchmark tools' user errors: memory_aot.py --target names a missing target, or lacks the CUDA plugin."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _memory_aot(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_aot.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_memory_aot_unknown_target_is_one_clear_error():
    r = _memory_aot("--target", "h200x")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: --target 'h200x': no file")
    assert "known: ['h100']" in r.stderr


def _has_cuda_plugin() -> bool:
    try:
        return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13))
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


@pytest.mark.skipif(_has_cuda_plugin(), reason="the CUDA plugin is installed: the deviceless compile would run")
def test_memory_aot_gpu_target_without_the_cuda_plugin_says_what_to_install():
    r = _memory_aot("--target", "h100", "--fsdp", "8")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --target h100: cannot describe 8 CUDA devices") and "pip install" in last
