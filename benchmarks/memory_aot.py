"""XLA's per-device memory of the full SD-1.5 VPD train step (depth at 480x480, or ``--task segmentation``: the
ADE20K step at 512x512 with 150 class tokens and the cross-attention maps kept), from AOT compilation only.

No weights and no device memory: shapes come from ``jax.eval_shape``, the step is lowered and compiled for
``jax.ShapeDtypeStruct`` inputs, and ``compiled.memory_analysis()`` gives what XLA would allocate per device
(arguments + outputs - donated aliases + temporaries). Cases: per-device batch x fp32/bf16 x remat x fsdp.
fsdp=8 uses 8 simulated host devices (``--xla_force_host_platform_device_count=8``, set below); the other
cases use one of them. The optimizer is the official recipe's (AdamW groups, VAE frozen), group_size = the
per-device batch (whole BatchNorm/SiLog groups per device).

    python benchmarks/memory_aot.py --batches 1,4,8 --dtypes float32,bfloat16 --remat 0,1 --fsdp 1,8 \
        --budget_s 1200
    python benchmarks/memory_aot.py --task segmentation --size 512 --batches 2 --fsdp 8,1

On a CPU host the compiler is XLA:CPU, whose buffer assignment is close to, but not the same as, the GPU
compiler's; on a GPU machine run the same command to get the GPU figures (the device count flag is then
ignored for GPUs: use --fsdp with the real number of GPUs). A case that compiles for longer than the remaining
budget is not started; each case prints its line as soon as it is done.

The last two columns are a speed proxy that needs no device: the kernels the step launches, and the GiB that its
memory-bound kernels (everything but convolutions, GEMMs and attention) read and write
(``vpd_jax.tools.hlo_sources.entry_traffic``). They describe the GPU program only with ``--target``.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import ade20k_512, nyu_480  # noqa: E402

jax.config.update("jax_threefry_partitionable", False)

GiB = 1024**3


TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")


def target_config(target: str) -> str:
    """The GpuTargetConfig text of ``target``: a name under benchmarks/gpu_targets or a .txtpb file."""
    path = target if os.path.isfile(target) else os.path.join(TARGETS, target + ".txtpb")
    if not os.path.isfile(path):
        raise SystemExit(f"error: --target {target!r}: no file {path} (known: "
                         f"{sorted(f[:-6] for f in os.listdir(TARGETS) if f.endswith('.txtpb'))})")
    with open(path) as f:
        return f.read()


def gpu_devices(target: str, n: int):
    """``n`` abstract GPUs of ``target`` for deviceless compilation: needs the CUDA PJRT plugin
    (``pip install jax[cuda13]``), not a GPU."""
    from jax.experimental import topologies

    config = target_config(target)
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=config, topology=f"1x1x{n}")
    except Exception as e:  # noqa: BLE001 (the plugin's errors are plain RuntimeErrors)
        raise SystemExit(f"error: --target {target}: cannot describe {n} CUDA devices without a GPU ({e}); "
                         "install the CUDA plugin (pip install jax[cuda13]) and set "
                         "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 on a machine without a GPU") from None
    return list(topo.devices)


def one_case(batch: int, dtype: str, remat: bool, fsdp: int, size: int = 480, target: str = "host",
             hlo_dir: str | None = None, state_layout: str = "default", task: str = "depth"):
    from vpd_jax import build, parallel
    from vpd_jax.tools.hlo_sources import traffic_summary
    from vpd_jax.training import step as S

    if target == "host":
        devices, attention = jax.devices()[:fsdp], None  # None: what a run on this backend would pick
    else:  # what a run on the GPU would pick: cuDNN's fused attention for bf16 where it can, XLA's for fp32
        devices, attention = gpu_devices(target, fsdp), ("cudnn_or_xla" if dtype == "bfloat16" else "xla")
    mesh = parallel.make_mesh(1, fsdp, devices)
    # The step exactly as train.py builds it (vpd_jax.build) for configs/nyu_480.py (or ade20k_512.py) with these
    # settings.
    cfg = (ade20k_512 if task == "segmentation" else nyu_480).get_config()
    cfg.model.dtype, cfg.model.remat, cfg.model.attention_impl = dtype, bool(remat), attention or ""
    cfg.train.global_batch_size, cfg.train.group_size, cfg.train.state_layout = batch * fsdp, batch, state_layout
    cfg.mesh.data, cfg.mesh.fsdp = 1, fsdp
    setup = build.train_setup(cfg, mesh)
    abstract_state = setup.abstract_state
    constants = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), setup.abstract_vars["constants"])
    step_fn = build.train_step(cfg, setup, mesh, constants)
    g = batch * fsdp
    bs = parallel.batch_sharding(mesh)
    batch_abs = {"image": jax.ShapeDtypeStruct((g, size, size, 3), jnp.uint8, sharding=bs),
                 "valid": jax.ShapeDtypeStruct((g,), jnp.bool_, sharding=bs)}
    if task == "segmentation":
        batch_abs.update(label=jax.ShapeDtypeStruct((g, size, size), jnp.uint8, sharding=bs),
                         image_hw=jax.ShapeDtypeStruct((g, 2), jnp.int32, sharding=bs))
    else:
        batch_abs.update(depth=jax.ShapeDtypeStruct((g, size, size), jnp.float32, sharding=bs),
                         class_id=jax.ShapeDtypeStruct((g,), jnp.int32, sharding=bs))
    compiled, secs = S.compile_step(step_fn, abstract_state, batch_abs)
    text = compiled.as_text()
    if hlo_dir:  # the optimized HLO, e.g. for vpd_jax.tools.hlo_sources
        os.makedirs(hlo_dir, exist_ok=True)
        name = f"{target}_b{batch}_{dtype}_remat{int(remat)}_fsdp{fsdp}.hlo.txt"
        with open(os.path.join(hlo_dir, name), "w") as f:
            f.write(text)
    kernels, mem_bound = traffic_summary(text)  # the device-free speed proxy
    ma = compiled.memory_analysis()
    args, out, alias, temp = (ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.alias_size_in_bytes,
                              ma.temp_size_in_bytes)
    ca = S.cost_analysis(compiled)  # {} from a deviceless GPU compile
    return {"args": args / GiB, "temp": temp / GiB, "total": (args + out - alias + temp) / GiB,
            "compile_s": secs, "tflop": float(ca.get("flops", float("nan"))) / 1e12,  # already per device
            "kernels": kernels, "mem_bound": mem_bound / GiB}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--remat", default="0,1")
    p.add_argument("--fsdp", default="1,8")
    p.add_argument("--size", type=int, default=480)
    p.add_argument("--task", default="depth", choices=["depth", "segmentation"],
                   help="depth: configs/nyu_480.py's step; segmentation: configs/ade20k_512.py's (use --size 512)")
    p.add_argument("--budget_s", type=float, default=1200.0)
    p.add_argument("--target", default="host",
                   help="host: this machine's backend (8 simulated devices on a CPU); or a GPU to compile for "
                        "without one, e.g. h100 (benchmarks/gpu_targets/h100.txtpb) or a GpuTargetConfig file")
    p.add_argument("--hlo_dir", default=None, help="also write each case's optimized HLO text here")
    p.add_argument("--state_layout", default="default", choices=["default", "auto"],
                   help="make_train_step's state_layout: auto lets XLA pick the state's device layouts")
    a = p.parse_args(argv)
    cases = [(b, d, bool(int(r)), f) for f in map(int, a.fsdp.split(",")) for r in a.remat.split(",")
             for d in a.dtypes.split(",") for b in map(int, a.batches.split(","))]
    if a.target != "host":  # a clear error for a missing target or CUDA plugin before anything is compiled
        gpu_devices(a.target, max(map(int, a.fsdp.split(","))))
    where = (f"{jax.devices()[0].platform} x{len(jax.devices())}" if a.target == "host"
             else f"deviceless XLA:GPU for {a.target}")
    print(f"{where}; jax {jax.__version__}; {a.task} step at {a.size}x{a.size}; {len(cases)} cases; budget "
          f"{a.budget_s:.0f}s", flush=True)
    head = (f"{'batch/dev':>9} {'dtype':>8} {'remat':>5} {'fsdp':>4} | {'params+opt (GiB)':>16} {'temp (GiB)':>10} "
            f"{'total/dev (GiB)':>15} | {'TFLOP/dev/step':>14} {'compile s':>9} | {'kernels':>7} {'mem-bound GiB':>13}")
    print(head + "\n" + "-" * len(head), flush=True)
    t0, last = time.perf_counter(), 0.0
    for b, d, r, f in cases:
        left = a.budget_s - (time.perf_counter() - t0)
        if left < last:
            print(f"(budget: {left:.0f}s left < {last:.0f}s per case; skipping the rest)")
            break
        t = time.perf_counter()
        res = one_case(b, d, r, f, a.size, a.target, a.hlo_dir, a.state_layout, a.task)
        last = time.perf_counter() - t
        print(f"{b:>9} {d:>8} {str(r):>5} {f:>4} | {res['args']:>16.2f} {res['temp']:>10.2f} {res['total']:>15.2f} | "
              f"{res['tflop']:>14.2f} {res['compile_s']:>9.0f} | {res['kernels']:>7d} {res['mem_bound']:>13.2f}",
              flush=True)


if __name__ == "__main__":
    main()
