"""The train state and the one jitted, sharded train step (model-agnostic).

The caller supplies ``loss_fn(params, batch_stats, batch, rng) -> (loss, (new_batch_stats, aux))`` for a
batch of images; this module owns everything around it: state allocation straight into its shardings,
the rng, gradient accumulation, and the update.

Per-device batch statistics and loss pooling ("groups"). Both references run on N GPUs without SyncBN:
BatchNorm normalises with the statistics of one GPU's images (3 official, 8 mmseg), the official SiLog pools
over those images, and DDP averages the gradients. Here that per-GPU batch is a *group* of ``group_size``
consecutive images of the global batch: ``loss_fn`` is ``vmap``-ed over groups, so BatchNorm statistics
and loss pooling are per group, and the step's loss and gradient are the mean over groups. The result
depends only on ``group_size``, not on how many devices we run on, how the mesh is shaped or how many
micro-batches accumulate: the reference's semantics are a config number, and sharding is only a
performance choice. When the groups of a micro-batch divide evenly over the devices, each device holds
whole groups and the statistics need no communication. The new running statistics are the mean over
groups (``bn_reduce="mean"``) or those of the first group (``"first"``: what DDP's rank-0 buffer broadcast
keeps).

Gradient accumulation. The global batch is split into ``num_microbatches`` micro-batches, each holding
whole groups (group ``k`` goes to micro-batch ``k % num_microbatches``, so every device keeps its own rows);
``lax.scan`` sums their gradients. Every group starts from the same batch statistics and draws its rng
from its global index, so accumulation reproduces the single large batch exactly (up to float rounding).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vpd_jax import parallel

LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, tuple[Any, Any]]]
BN_REDUCE = ("mean", "first")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far (the optax count)
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key (checkpoints as a plain array); folded with step each update


def _raw_key(rng) -> jax.Array:
    if isinstance(rng, int):
        return jax.random.PRNGKey(rng)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return rng


def _fresh_state(variables, tx: optax.GradientTransformation, key) -> TrainState:
    """Step 0 with ``variables``' params and batch statistics and a fresh optimizer state."""
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=key)


def create_train_state(
    init_fn: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rng,
    *,
    fsdp_min_size: int = parallel.DEFAULT_FSDP_MIN_SIZE,
) -> tuple[TrainState, TrainState]:
    """Allocates the state directly into its shardings; returns ``(state, shardings)``.

    ``init_fn(rng)`` returns flax variables (``{"params": ..., "batch_stats": ...}``; batch_stats optional).
    Shapes come from ``jax.eval_shape`` first, so no device ever holds the whole unsharded model.
    """

    def _init(key):
        init_key, state_key = jax.random.split(key)
        return _fresh_state(init_fn(init_key), tx, state_key)

    key = _raw_key(rng)
    abstract = jax.eval_shape(_init, key)
    shardings = parallel.state_shardings(abstract, mesh, fsdp_min_size)
    state = jax.jit(_init, out_shardings=shardings)(key)
    return state, shardings


def create_train_state_from_variables(
    variables,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rng,
    *,
    fsdp_min_size: int = parallel.DEFAULT_FSDP_MIN_SIZE,
) -> tuple[TrainState, TrainState]:
    """Like ``create_train_state`` for given weights (e.g. converted SD/VPD checkpoints, host numpy arrays).

    Each array is placed directly into its sharding (never whole on one device when ``fsdp > 1``); the
    optimizer state is then created on the devices, in its shardings.
    """

    def _init(variables, key):
        return _fresh_state(variables, tx, key)

    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    key = _raw_key(rng)
    abstract = jax.eval_shape(_init, variables, key)
    shardings = parallel.state_shardings(abstract, mesh, fsdp_min_size)
    placed = jax.device_put(variables, {"params": shardings.params, "batch_stats": shardings.batch_stats})
    # Donated so the weights are aliased into the state rather than copied (twice the memory otherwise).
    state = jax.jit(_init, out_shardings=shardings, donate_argnums=(0,))(placed, key)
    return state, shardings


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    state_shardings: TrainState,
    *,
    num_microbatches: int = 1,
    group_size: int | None = None,
    schedule: optax.Schedule | None = None,
    trainable: Any = None,
    bn_reduce: str = "mean",
    donate: bool = True,
    state_layout: str = "default",
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns ``train_step(state, batch) -> (state, metrics)``, jitted with donated state.

    Args:
      loss_fn: ``(params, batch_stats, group_batch, rng) -> (loss, (new_batch_stats, aux))`` for one group;
        ``aux`` is a dict of scalars (averaged over groups into the metrics).
      num_microbatches: gradient-accumulation steps per update (the global batch must divide evenly).
      group_size: images per BatchNorm/loss group (the reference's per-GPU batch); ``None`` = one group per
        micro-batch (statistics over the whole micro-batch, like SyncBN).
      schedule: the base learning-rate schedule, logged as ``lr`` (the optimizer applies its own copy).
      trainable: bool tree like params; frozen leaves are left out of ``grad_norm``.
      bn_reduce: how the groups' new running statistics combine: ``"mean"`` or ``"first"``.
      state_layout: ``"default"`` (row-major state arrays) or ``"auto"``: the compiler picks the state's
        on-device layouts (``Layout.AUTO``), so on GPUs the conv kernels can live in cuDNN's OHWI order instead of
        being transposed from HWIO for every forward pass and gradient (8.3 GiB of transposes per bf16 step at
        batch 8 on an H100, deviceless compile; README). An ``"auto"`` step must be compiled for abstract state
        (``jax.ShapeDtypeStruct``s) and the state moved once into its layouts (``place_state``).

    Batches are pytrees whose leaves share the leading (global batch) axis.
    """
    if bn_reduce not in BN_REDUCE:
        raise ValueError(f"bn_reduce must be one of {BN_REDUCE}, got {bn_reduce!r}")
    n_shards = parallel.num_batch_shards(mesh)
    num_micro = int(num_microbatches)

    def train_step(state: TrainState, batch):
        batch_size = jax.tree.leaves(batch)[0].shape[0]
        if batch_size % num_micro:
            raise ValueError(f"batch {batch_size} does not split into {num_micro} micro-batches")
        micro_size = batch_size // num_micro
        gsize = group_size or micro_size
        if micro_size % gsize:
            raise ValueError(f"micro-batch {micro_size} does not split into groups of {gsize}")
        groups = micro_size // gsize  # per micro-batch

        def split(x):
            # Row (j * M + m) * gsize + r is image r of group j of micro-batch m: each device's contiguous
            # block of rows stays on it, whole groups per device when groups % n_shards == 0.
            x = x.reshape(groups, num_micro, gsize, *x.shape[1:]).swapaxes(0, 1)
            if groups % n_shards == 0:
                x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, parallel.BATCH_AXES)))
            return x

        micro = jax.tree.map(split, batch)
        step_key = jax.random.fold_in(state.rng, state.step)

        def micro_loss(params, mbatch, m):
            def one_group(gbatch, k):
                return loss_fn(params, state.batch_stats, gbatch, jax.random.fold_in(step_key, k))

            global_index = jnp.arange(groups) * num_micro + m
            losses, (new_bs, aux) = jax.vmap(one_group)(mbatch, global_index)
            return jnp.mean(losses), (losses, new_bs, aux)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def constrain_like_params(tree):
            return jax.lax.with_sharding_constraint(tree, state_shardings.params)

        def combine_bs(new_bs):
            # "mean": a sum here, divided by the number of groups at the end; "first": group 0 only.
            if bn_reduce == "first":
                return jax.tree.map(lambda x: x[0], new_bs)
            return jax.tree.map(lambda x: jnp.sum(x, axis=0), new_bs)

        def summarise(out, grads):
            (_, (losses, new_bs, aux)) = out
            return {
                "grads": constrain_like_params(grads),
                "loss": jnp.sum(losses),
                "bs": combine_bs(new_bs),
                "aux": jax.tree.map(lambda x: jnp.sum(x, axis=0), aux),
            }

        if num_micro == 1:
            acc = summarise(*grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), 0))
        else:
            def body(carry, xs):
                mbatch, m = xs
                cur = summarise(*grad_fn(state.params, mbatch, m))
                new = jax.tree.map(jnp.add, carry, cur)
                if bn_reduce == "first":  # keep micro-batch 0's first group (global group 0) only
                    new["bs"] = jax.tree.map(lambda c, x: jnp.where(m == 0, x, c), carry["bs"], cur["bs"])
                return new, None

            shapes = jax.eval_shape(
                lambda: summarise(*grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), 0))
            )
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            zeros["grads"] = constrain_like_params(zeros["grads"])
            acc, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(num_micro)))

        total_groups = groups * num_micro
        grads = jax.tree.map(lambda g: g / num_micro, acc["grads"])
        if bn_reduce == "mean":
            new_batch_stats = jax.tree.map(lambda x: x / total_groups, acc["bs"])
        else:
            new_batch_stats = acc["bs"]
        # Keep dtypes (e.g. integer counters in custom stats) as they were.
        new_batch_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), new_batch_stats, state.batch_stats)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        norm_grads = grads if trainable is None else jax.tree.map(
            lambda g, t: g if t else jnp.zeros_like(g), grads, trainable
        )
        metrics = {"loss": acc["loss"] / total_groups, "grad_norm": optax.global_norm(norm_grads)}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        if isinstance(acc["aux"], dict):
            metrics.update({k: v / total_groups for k, v in acc["aux"].items()})
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=new_batch_stats, opt_state=opt_state
        )
        return new_state, metrics

    if state_layout not in ("default", "auto"):
        raise ValueError(f"state_layout {state_layout!r}: expected 'default' or 'auto'")
    if state_layout == "auto":
        from jax.experimental.layout import Format, Layout

        state_formats = jax.tree.map(lambda s: Format(Layout.AUTO, s), state_shardings)
    else:
        state_formats = state_shardings
    return jax.jit(
        train_step,
        in_shardings=(state_formats, parallel.batch_sharding(mesh)),
        out_shardings=(state_formats, parallel.replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )


def place_state(compiled, state):
    """Moves ``state`` into the layouts a compiled ``state_layout="auto"`` step takes (a no-op for a default one),
    array by array and donated, so at most one array is ever held twice."""
    return jax.device_put(state, compiled.input_formats[0][0], donate=True)


def compile_step(step_fn, *args) -> tuple[Any, float]:
    """AOT-compiles ``step_fn`` for ``args`` (arrays or ``jax.ShapeDtypeStruct``s); returns it and seconds.

    The compiled object's ``memory_analysis()`` gives XLA's per-device memory without running anything.
    """
    t0 = time.perf_counter()
    compiled = step_fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def cost_analysis(stage) -> dict:
    """XLA's cost analysis of a lowered or compiled step as one dict ({} where the backend gives none): jax returns
    a dict, a one-element list or None depending on the version and backend."""
    try:
        ca = stage.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends have no cost analysis at all
        return {}
    ca = ca[0] if isinstance(ca, (list, tuple)) and ca else ca
    return dict(ca or {})


def step_flops(stage) -> float | None:
    """FLOPs of one step (per device) from ``cost_analysis``, None where unknown."""
    f = float(cost_analysis(stage).get("flops", 0.0))
    return f if f > 0 else None
