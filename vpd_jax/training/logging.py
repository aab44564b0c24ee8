"""Console and TensorBoard logging for training (tensorboardX imported lazily; process 0 only writes)."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import numpy as np

from vpd_jax.files import write_text

log = logging.getLogger("vpd_jax.train")


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return f"{v}"
    return f"{v:.3e}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}"


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Scalars to ``workdir/metrics.jsonl`` (one JSON object per line: ``step``, ``kind`` and the values) and to
    TensorBoard (``workdir/tb``) with images, and one console line per log step.

    ``resume_step``: lines of steps after it (written by a run that was killed after its last checkpoint) are
    dropped, so the file describes the run that continues.
    """

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            path = os.path.join(workdir, METRICS_FILE)
            if resume_step is not None and os.path.exists(path):
                _truncate_after(path, resume_step)
            self._jsonl = open(path, "a")
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:  # pragma: no cover - tensorboardX is in requirements.txt
                log.warning("tensorboardX is not installed: console logging only")

    def scalars(self, step: int, values: dict[str, float], prefix: str = "", kind: str = "train") -> None:
        if not self.enabled:
            return
        if self._jsonl is not None:
            row = {"step": int(step), "kind": kind}
            row.update({k: _json_float(v) for k, v in values.items()})
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._tb is None:
            return
        for k, v in values.items():
            self._tb.add_scalar(f"{prefix}{k}", float(v), step)
        self._tb.flush()

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, np.asarray(image), step, dataformats="HWC")
            self._tb.flush()

    def console(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _json_float(v) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None  # JSON has no inf/NaN


def _truncate_after(path: str, step: int) -> None:
    """Keep the lines of ``path`` whose step is at most ``step`` (atomic rewrite)."""
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if int(json.loads(line)["step"]) <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line of a killed run
    write_text(path, "".join(keep))


def read_metrics(workdir: str) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl``."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


class Throughput:
    """images/s, TFLOP/s per device, MFU and ETA between log steps (wall clock, including the input pipeline)."""

    def __init__(self, images_per_step: int, flops_per_step: float | None, num_devices: int,
                 peak_flops_per_device: float, total_steps: int):
        self.images_per_step = images_per_step
        self.flops_per_step = flops_per_step
        self.num_devices = num_devices
        self.peak = peak_flops_per_device
        self.total_steps = total_steps
        self._t = time.perf_counter()
        self._step: int | None = None

    def reset(self, step: int) -> None:
        self._t, self._step = time.perf_counter(), step

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        out: dict[str, float] = {}
        if self._step is not None and step > self._step:
            dt = (now - self._t) / (step - self._step)
            out["sec_per_step"] = dt
            out["images_per_sec"] = self.images_per_step / dt
            if self.flops_per_step:
                tflops = self.flops_per_step / dt / self.num_devices / 1e12
                out["tflops_per_device"] = tflops
                if self.peak:
                    out["mfu"] = tflops * 1e12 / self.peak
            out["eta_sec"] = dt * max(0, self.total_steps - step)
        self._t, self._step = now, step
        return out


def step_line(step: int, total: int, m: dict[str, float]) -> str:
    parts = [f"step {step}/{total} ({100.0 * step / max(total, 1):.1f}%)"]
    for k in ("loss", "grad_norm"):
        if k in m:
            parts.append(f"{k} {_fmt(m[k])}")
    lrs = [f"{k} {_fmt(v)}" for k, v in m.items() if k.startswith("lr")]
    parts += lrs
    if "images_per_sec" in m:
        parts.append(f"{m['images_per_sec']:.1f} img/s")
    if "tflops_per_device" in m:
        parts.append(f"{m['tflops_per_device']:.3f} TFLOP/s/dev")
    if "mfu" in m:
        parts.append(f"MFU {100 * m['mfu']:.2f}%")
    if "eta_sec" in m:
        parts.append(f"ETA {fmt_duration(m['eta_sec'])}")
    return " | ".join(parts)
