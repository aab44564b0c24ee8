"""Training checkpoints with orbax: the full train state + the data iterator, and the best weights apart.

Layout of a workdir::

    workdir/checkpoints/<step>/  state (params, batch_stats, opt_state, step, rng), constants (class table),
                                 data (loader state JSON),
                                 meta (config, metrics)           -- the last ``keep`` of them
    workdir/best/<step>/         model (params, batch_stats, constants), meta (config, metrics)
                                 -- one: the lowest test RMSE so far (for eval.py --workdir, --which=best)

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
from vpd_jax.weights.loader import BEST, BEST_ITEMS, CHECKPOINTS, STATE_ITEMS, checkpoint_steps

log = logging.getLogger(__name__)


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _abstract(tree):
    """ShapeDtypeStructs carrying the shardings of ``tree`` (arrays or ShapeDtypeStructs with .sharding)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


class Checkpointer:
    """The latest-K manager and the best-by-RMSE manager of one workdir."""

    def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True):
        ocp = _ocp()
        self.workdir = os.path.abspath(workdir)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                            enable_async_checkpointing=async_save)
        self.latest = ocp.CheckpointManager(os.path.join(self.workdir, CHECKPOINTS), options=opts,
                                            item_names=STATE_ITEMS)
        best_opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=async_save)
        self.best = ocp.CheckpointManager(os.path.join(self.workdir, BEST), options=best_opts,
                                          item_names=BEST_ITEMS)

    # ------------------------------------------------------------------------------------------ save
    def save(self, state, constants, data_state: bytes | None, meta: dict, *, force: bool = False) -> bool:
        ocp = _ocp()
        step = int(jax.device_get(state.step))
        data = {"loader": data_state.decode() if data_state else None}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), constants=ocp.args.StandardSave(constants),
                                  data=ocp.args.JsonSave(data),
                                  meta=ocp.args.JsonSave(_jsonable(meta)))
        return self.latest.save(step, args=args, force=force)

    def save_best(self, state, constants, meta: dict) -> None:
        ocp = _ocp()
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
        return dict(self.best.restore(step, args=_ocp().args.Composite(meta=_ocp().args.JsonRestore())).meta)

    def restore(self, abstract_state, abstract_constants, step: int | None = None):
        """``(state, constants, data_state, meta)`` of ``step`` (default latest) in ``abstract_state``'s shardings."""
        ocp = _ocp()
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


def restore_latest(workdir: str, abstract_state, abstract_constants, step: int | None = None):
    """``(state, constants, data_state, meta)`` of the newest checkpoint (or ``step``) in ``abstract_state``'s
    shardings, read through a read-only manager: a restore that fails leaves the workdir as it was."""
    ocp = _ocp()
    root = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
    step = latest_step(workdir) if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {root}")
    mgr = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                                item_names=STATE_ITEMS)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(abstract_state)),
                              constants=ocp.args.StandardRestore(_abstract(abstract_constants)),
                              data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
    try:
        out = mgr.restore(step, args=args)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{root}/{step} does not fit this run's model/optimizer "
            f"(another config in the same workdir?): {_short(e)}") from None
    finally:
        mgr.close()
    loader = (out.data or {}).get("loader")
    return out.state, out.constants, (loader.encode() if loader else None), dict(out.meta or {})


def restore_best(workdir: str, abstract_model) -> tuple[dict, dict, int]:
    """``(variables, meta, step)`` of the best-by-RMSE weights of a training workdir.

    ``abstract_model``: ``{"params", "batch_stats", "constants"}`` of ShapeDtypeStructs (or arrays).
    """
    ocp = _ocp()
    root = os.path.join(os.path.abspath(workdir), BEST)
    if not os.path.isdir(root):
        raise CheckpointError(f"no best checkpoint in {root} (training never evaluated?); try --which=latest")
    mgr = ocp.CheckpointManager(root, item_names=("model", "meta"))
    step = mgr.latest_step()
    if step is None:
        raise CheckpointError(f"no best checkpoint in {root} (training never evaluated?); try --which=latest")
    args = ocp.args.Composite(model=ocp.args.StandardRestore(_abstract(abstract_model)), meta=ocp.args.JsonRestore())
    try:
        out = mgr.restore(step, args=args)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{root}/{step} does not fit the config's model: {_short(e)}") from None
    return dict(out.model), dict(out.meta or {}), step


def _short(e: Exception, limit: int = 600) -> str:
    s = str(e).replace("\n", " ")
    return s if len(s) <= limit else s[:limit] + " ..."


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
