"""What every command-line door shares: snake_case flags, ``--help``, and mistakes answered in one line.

``train.py`` and ``eval.py`` parse absl flags (``vpd_jax.cli``); the tools (``predict.py``, ``vpd_jax.tools.convert``,
``vpd_jax.tools.class_embeddings``, ``vpd_jax.data.prepare``) parse with ``ArgumentParser`` below, under the
same convention: ``--snake_case`` flags given as ``--flag=value`` or ``--flag value``, a usage mistake is one
``error: ...`` line on stderr with exit code 2, a failure the user can fix (``vpd_jax.errors.UserError``, a
missing file) one line with exit code 1. ``VPD_DEBUG=1`` adds the traceback; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import traceback
from collections.abc import Callable, Sequence

from vpd_jax.errors import ConfigError, UsageError, UserError

DEBUG_ENV = "VPD_DEBUG"


def debug() -> bool:
    """``VPD_DEBUG=1``: user mistakes show their full traceback (and its causes) instead of one line."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def say_error(e: BaseException | str) -> None:
    """One ``error: ...`` line on stderr (the traceback first under ``VPD_DEBUG=1``)."""
    if isinstance(e, BaseException) and debug():
        traceback.print_exception(e)
    text = " ".join(str(e).split()) if not isinstance(e, str) else e
    print(f"error: {text}", file=sys.stderr, flush=True)


def use_compile_cache() -> None:
    """JAX's persistent compile cache for an entry point: ``VPD_COMPILATION_CACHE`` (empty: none), else
    ``./.jax_cache``; compilations of a second or more are kept."""
    import jax

    cache = os.environ.get("VPD_COMPILATION_CACHE", os.path.join(os.getcwd(), ".jax_cache"))
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _file_above(path: pathlib.Path) -> pathlib.Path | None:
    """The first existing parent of ``path`` that is not a folder (a folder cannot be created under it)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_folder(flag: str, path: str | os.PathLike) -> pathlib.Path:
    """``path`` as a folder to write into: a ``UsageError`` naming ``flag`` if it, or a parent, is a file."""
    p = pathlib.Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a folder; expected a folder (created if missing)")
    if (f := _file_above(p)) is not None:
        raise UsageError(f"{flag} {path}: {f} is a file; expected a folder (created if missing)")
    return p


def check_output_file(flag: str, path: str | os.PathLike) -> pathlib.Path:
    """``path`` as a file to write: a ``UsageError`` naming ``flag`` if it is a folder or a parent is a file."""
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; expected a file name")
    if (f := _file_above(p)) is not None:
        raise UsageError(f"{flag} {path}: {f} is a file, not a folder")
    return p


class ArgumentParser(argparse.ArgumentParser):
    """argparse under the project's convention: a usage mistake is one line (``error: ...``), exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        say_error(f"{message} (see {self.prog} --help)")
        sys.exit(2)


def run_tool(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """``main(argv)``'s exit code, with ``UsageError`` -> one line and 2, ``UserError`` or a missing file -> one
    line and 1."""
    try:
        return main(argv)
    except (UsageError, ConfigError) as e:
        say_error(e)
        return 2
    except (UserError, FileNotFoundError) as e:
        say_error(e)
        return 1
