"""What train.py, eval.py and demo.py share: jax start-up and one-line errors for user mistakes."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import jax
from absl import app, flags
from absl import logging as absl_logging

from vpd_jax import parallel
from vpd_jax.errors import UserError


def setup_jax(config=None) -> None:
    """Multi-host start (before any device use), the persistent compile cache, and CPU-only speedups.

    On CPU, jax's partitionable threefry makes each random call compile for ~15 s; VPD draws no random numbers
    in the step (no dropout), so the classic threefry is used there. Results on GPU/TPU are unaffected.
    """
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/tfds INFO lines would bury the training log

    parallel.initialize_distributed()
    cache = os.environ.get("VPD_COMPILATION_CACHE", os.path.join(os.getcwd(), ".jax_cache"))
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if jax.default_backend() == "cpu":
        jax.config.update("jax_threefry_partitionable", False)
    precision = getattr(getattr(config, "model", None), "matmul_precision", "default") or "default"
    if precision not in ("default", "high", "highest"):
        raise SystemExit(f"error: model.matmul_precision {precision!r} is not 'default', 'high' or 'highest'")
    if precision != "default":
        # float32 matmuls/convolutions: "highest" is true fp32 (PyTorch parity), "default" lets GPUs use TF32.
        jax.config.update("jax_default_matmul_precision", precision)


def user_error_types() -> tuple[type[BaseException], ...]:
    return (UserError, FileNotFoundError)


DEBUG_ENV = "VPD_DEBUG"


def debug() -> bool:
    """``VPD_DEBUG=1``: user mistakes show their full traceback (and its causes) instead of one line."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def report(e: BaseException, code: int) -> None:
    """One ``error: ...`` line on stderr (the traceback too under ``VPD_DEBUG=1``), then exit with ``code``."""
    if debug():
        traceback.print_exception(e)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def user_errors():
    """Print ``error: <message>`` and exit 1 for the errors a user can fix (the traceback with ``VPD_DEBUG=1``);
    anything else keeps its traceback."""
    try:
        yield
    except user_error_types() as e:
        report(e, 1)


def run(main) -> None:
    """``absl.app.run(main)`` where a bad flag or ``--config.field`` override (a typo) is one line, not a traceback."""
    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
            msg = e.args[0] if e.args else e
            msg = str(msg).strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
            print(f"error: {msg}", file=sys.stderr, flush=True)
            sys.exit(2)

    app.run(main, flags_parser=parse)
