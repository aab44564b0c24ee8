"""Training checkpoints with orbax: the full train state + the data iterator, and the best weights apart.

Layout of a workdir::

    workdir/checkpoints/<step>/  state (params, batch_stats, opt_state, step, rng), constants (class table),
                                 data (loader state JSON),
                                 meta (config, metrics)           -- the last ``keep`` of them
    workdir/best/<step>/         model (params, batch_stats, constants), meta (config, metrics)
                                 -- one: the lowest test RMSE so far (for eval.py --workdir, --which=best)
    workdir/damaged/checkpoints_<step>/  a checkpoint that could not be read when resuming, set aside

Saves are atomic (orbax writes to a temporary directory and renames it when complete), so a killed run
leaves the previous checkpoint intact, and asynchronous when ``async_save`` (training continues while the
arrays are written; ``wait()`` before exiting). Restoring takes the shapes and shardings of a freshly built
abstract state, so arrays land directly in their shardings (any mesh, any number of devices).
"""

from __future__ import annotations

import json
import logging
import os

import jax

from vpd_jax.errors import CheckpointError
from vpd_jax.weights.common import orbax
from vpd_jax.weights.loader import (
    BEST,
    BEST_ITEMS,
    CHECKPOINTS,
    STATE_ITEMS,
    abstract_shapes,
    checkpoint_steps,
    failure_cause,
    stored_shapes,
)

DAMAGED = "damaged"  # workdir/damaged/checkpoints_<step>: checkpoints that could not be read, set aside

log = logging.getLogger(__name__)


def _abstract(tree):
    """ShapeDtypeStructs carrying the shardings of ``tree`` (arrays or ShapeDtypeStructs with .sharding)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


class Checkpointer:
    """The latest-K manager and the best-by-RMSE manager of one workdir."""

    def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True):
        ocp = orbax()
        self.workdir = os.path.abspath(workdir)
        # cleanup_tmp_directories: the unfinished folders of a save that failed (a full disk) go on the next start.
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                            cleanup_tmp_directories=True)
        self.latest = ocp.CheckpointManager(os.path.join(self.workdir, CHECKPOINTS), options=opts,
                                            item_names=STATE_ITEMS)
        best_opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=async_save,
                                                 cleanup_tmp_directories=True)
        self.best = ocp.CheckpointManager(os.path.join(self.workdir, BEST), options=best_opts,
                                          item_names=BEST_ITEMS)

    # ------------------------------------------------------------------------------------------ save
    def save(self, state, constants, data_state: bytes | None, meta: dict, *, force: bool = False) -> bool:
        ocp = orbax()
        step = int(jax.device_get(state.step))
        data = {"loader": data_state.decode() if data_state else None}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), constants=ocp.args.StandardSave(constants),
                                  data=ocp.args.JsonSave(data),
                                  meta=ocp.args.JsonSave(_jsonable(meta)))
        return self.latest.save(step, args=args, force=force)

    def save_best(self, state, constants, meta: dict) -> None:
        ocp = orbax()
        step = int(jax.device_get(state.step))
        model = {"params": state.params, "batch_stats": state.batch_stats, "constants": constants}
        self.best.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(model),
                                                     meta=ocp.args.JsonSave(_jsonable(meta))), force=True)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()

    # ------------------------------------------------------------------------------------------ restore
    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def best_meta(self) -> dict | None:
        step = self.best.latest_step()
        if step is None:
            return None
        return dict(self.best.restore(step, args=orbax().args.Composite(meta=orbax().args.JsonRestore())).meta)

    def restore(self, abstract_state, abstract_constants, step: int | None = None):
        """``(state, constants, data_state, meta)`` of ``step`` (default latest) in ``abstract_state``'s shardings."""
        ocp = orbax()
        step = self.latest.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.latest.directory}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(abstract_state)),
                                  constants=ocp.args.StandardRestore(_abstract(abstract_constants)),
                                  data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        try:
            out = self.latest.restore(step, args=args)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{self.latest.directory}/{step} does not fit this run's model/optimizer "
                f"(another config in the same workdir?): {_short(e)}") from None
        loader = (out.data or {}).get("loader")
        return out.state, out.constants, (loader.encode() if loader else None), dict(out.meta or {})


def latest_step(workdir: str) -> int | None:
    """The newest finished checkpoint of a workdir, or None (reads the folder only; creates nothing)."""
    steps = checkpoint_steps(os.path.join(os.path.abspath(workdir), CHECKPOINTS))
    return steps[-1] if steps else None


def best_meta(workdir: str) -> dict | None:
    """The JSON metadata (step, metrics, config) of a workdir's best weights, or None."""
    root = os.path.join(os.path.abspath(workdir), BEST)
    steps = checkpoint_steps(root)
    if not steps:
        return None
    try:
        with open(os.path.join(root, str(steps[-1]), "meta", "metadata")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _restore_step(root: str, step: int, abstract_state, abstract_constants):
    ocp = orbax()
    mgr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                                item_names=STATE_ITEMS)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(abstract_state)),
                              constants=ocp.args.StandardRestore(_abstract(abstract_constants)),
                              data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
    try:
        out = mgr.restore(step, args=args)
    finally:
        mgr.close()
    loader = (out.data or {}).get("loader")
    return out.state, out.constants, (loader.encode() if loader else None), dict(out.meta or {})


def restore_latest(workdir: str, abstract_state, abstract_constants, step: int | None = None):
    """``(state, constants, data_state, meta)`` of the newest checkpoint (or ``step``) in ``abstract_state``'s
    shardings, read through a read-only manager: a restore that fails leaves the workdir as it was."""
    root = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
    step = latest_step(workdir) if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {root}")
    try:
        return _restore_step(root, step, abstract_state, abstract_constants)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{root}/{step} does not fit this run's model/optimizer "
            f"(another config in the same workdir?): {_short(e)}") from None


def set_aside(workdir: str, step: int) -> str:
    """Move ``checkpoints/<step>`` to ``damaged/checkpoints_<step>`` (never deleted); returns the new path."""
    src = os.path.join(os.path.abspath(workdir), CHECKPOINTS, str(step))
    dst = os.path.join(os.path.abspath(workdir), DAMAGED, f"{CHECKPOINTS}_{step}")
    n = 1
    while os.path.exists(dst):
        n += 1
        dst = os.path.join(os.path.abspath(workdir), DAMAGED, f"{CHECKPOINTS}_{step}_{n}")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
    return dst


def restore_newest_intact(workdir: str, abstract_state, abstract_constants, say=print):
    """``(step, (state, constants, data_state, meta))`` of the newest checkpoint that restores completely, or
    None when the workdir has none.

    A checkpoint whose arrays have other shapes than this run's state is a config problem: one error, nothing
    touched. One whose shapes fit but which cannot be read is damaged: said in one line (its step and the read's
    own cause), moved aside with ``set_aside`` and the next older one is tried; if none restores, one error
    lists what was tried.
    """
    root = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
    steps = checkpoint_steps(root)
    want = abstract_shapes(abstract_state)
    tried = []
    for step in reversed(steps):
        try:
            stored = stored_shapes(os.path.join(root, str(step), "state"))
            fits = stored == want
        except Exception as e:  # noqa: BLE001 - unreadable metadata: damaged
            stored, fits, cause = None, None, failure_cause(e)
        if fits is False:
            raise CheckpointError(
                f"{root}/{step} does not fit this run's model/optimizer (another config in the same workdir?): "
                f"{len(stored)} stored arrays, this run has {len(want)}, shapes differ")
        if fits:
            try:
                return step, _restore_step(root, step, abstract_state, abstract_constants)
            except Exception as e:  # noqa: BLE001 - the shapes fit, so the files are damaged
                cause = failure_cause(e)
        moved = set_aside(workdir, step)
        tried.append(f"step {step} ({cause})")
        say(f"checkpoint {step} is damaged ({cause}); set aside as {moved}; trying the next older one")
    if tried:
        raise CheckpointError(f"no checkpoint in {root} restores (all set aside under "
                              f"{os.path.join(os.path.abspath(workdir), DAMAGED)}): {'; '.join(tried)}")
    return None


def _short(e: Exception, limit: int = 600) -> str:
    s = str(e).replace("\n", " ")
    return s if len(s) <= limit else s[:limit] + " ..."


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
