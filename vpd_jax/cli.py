"""What train.py, eval.py and demo.py share: jax start-up, absl flags, and one-line errors for user mistakes
(the convention of ``vpd_jax.console``)."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from vpd_jax import evaluate, parallel
from vpd_jax.console import check_output_file, check_output_folder, say_error, use_compile_cache
from vpd_jax.errors import ConfigError, UsageError, UserError
from vpd_jax.training import trainer


def setup_jax(config=None) -> None:
    """Multi-host start (before any device use), the persistent compile cache, and CPU-only speedups.

    On CPU, jax's partitionable threefry makes each random call compile for ~15 s; VPD draws no random numbers
    in the step (no dropout), so the classic threefry is used there. Results on GPU/TPU are unaffected.
    """
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/tfds INFO lines would bury the training log

    parallel.initialize_distributed()
    use_compile_cache()
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


def report(e: BaseException, code: int) -> None:
    """One ``error: ...`` line on stderr (the traceback too under ``VPD_DEBUG=1``), then exit with ``code``."""
    say_error(e)
    sys.exit(code)


@contextlib.contextmanager
def user_errors():
    """Print ``error: <message>`` and exit 2 for a bad command or config value, 1 for the other errors a user can
    fix (the traceback with ``VPD_DEBUG=1``); anything else keeps its traceback."""
    try:
        yield
    except (UsageError, ConfigError) as e:  # the command or its config: exit code 2, as a bad flag
        report(e, 2)
    except user_error_types() as e:
        report(e, 1)


def run(main) -> None:
    """``absl.app.run(main)`` where a bad flag or ``--config.field`` override (a typo) is one line, not a traceback."""
    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError, ImportError,
                SyntaxError) as e:
            msg = e.args[0] if e.args else e
            if isinstance(e, SyntaxError):
                msg = f"{e.filename}, line {e.lineno}: {e.msg}"
            msg = str(msg).replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
            if len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":  # KeyError's repr quotes
                msg = msg[1:-1]
            print(f"error: {msg}", file=sys.stderr, flush=True)
            sys.exit(2)

    app.run(main, flags_parser=parse)


def _config_search_path(argv: list[str]) -> None:
    """Recipes import their base as ``from configs import base``: put the folder holding ``configs/`` on the
    import path, wherever the command runs from. A recipe file that does not exist is one usage error."""
    for i, a in enumerate(argv):
        path = a.split("=", 1)[1] if a.startswith("--config=") else (argv[i + 1] if a == "--config" and
                                                                        i + 1 < len(argv) else None)
        if path:
            path = path.split(":", 1)[0]  # config_flags' "file.py:argument" form
            if not os.path.isfile(path):
                report(UsageError(f"--config {path}: no such file (a recipe such as configs/nyu_480.py)"), 2)
            root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
            if root not in sys.path:
                sys.path.insert(0, root)


def _check_loaded(config_flag) -> None:
    """A recipe that failed to import (a syntax error, a bad import) is one usage error, not a traceback."""
    try:
        cfg = config_flag.value
        if cfg is not None:
            cfg.to_dict()
    except (OSError, ImportError, SyntaxError, AttributeError, NameError) as e:
        report(UsageError(f"--config: the recipe does not load ({str(e).splitlines()[0]})"), 2)


def train_main() -> None:
    """``train.py`` / ``vpd-train``: ``--config=configs/X.py --workdir=DIR [--config.field=value ...]``."""
    config = config_flags.DEFINE_config_file("config", None, "a configs/*.py recipe", lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "checkpoints, logs and TensorBoard events go here")
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        del argv
        _check_loaded(config)
        setup_jax(config.value)
        with user_errors():
            trainer.train(config.value, workdir.value)  # its last line says how the run ended

    _config_search_path(sys.argv)
    run(main)


def workdir_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training workdir was trained with (its ``config.json``)."""
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except FileNotFoundError:
        raise UsageError(f"--workdir {workdir}: no config.json (not a train.py workdir?); pass --config") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable ({e}); pass --config") from e


def eval_main() -> None:
    """``eval.py`` / ``vpd-eval``: a workdir (its best or latest checkpoint; ``--config`` defaults to the run's
    own) or a checkpoint file/folder with ``--config``."""
    config = config_flags.DEFINE_config_file("config", None, "a configs/*.py recipe (default with --workdir: "
                                             "the run's config.json)", lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "a training workdir (its best or latest checkpoint)")
    which = flags.DEFINE_enum("which", "best", ["best", "latest"], "which checkpoint of --workdir")
    checkpoint = flags.DEFINE_string("checkpoint", None, "a converted folder or an official/mmseg PyTorch file")
    save = flags.DEFINE_string("save_predictions", None, "write 16-bit depth PNGs (mm) here")
    output = flags.DEFINE_string("output", None, "metrics JSON (default: <workdir>/eval_<which>.json or eval.json)")

    def main(argv):
        del argv
        _check_loaded(config)
        try:
            cfg = config.value
            if cfg is None:
                if not workdir.value:
                    raise UsageError("give --config=configs/X.py (and --workdir or --checkpoint)")
                cfg = workdir_run_config(workdir.value)
            if output.value:
                check_output_file("--output", output.value)
            if save.value:
                check_output_folder("--save_predictions", save.value)
        except UsageError as e:
            report(e, 2)
        setup_jax(cfg)
        with user_errors():
            evaluate.evaluate_main(cfg, workdir=workdir.value, which=which.value, checkpoint=checkpoint.value,
                                   save_predictions=save.value, output=output.value)

    _config_search_path(sys.argv)
    run(main)
