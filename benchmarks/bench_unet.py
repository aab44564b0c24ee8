"""Time the full SD-1.5 UNet forward: ours (JAX/Flax) against diffusers' PyTorch model, same weights, one run.

    .venv/bin/python benchmarks/bench_unet.py [--latent 64] [--batch 1] [--repeats 5] [--dtype float32]
                                               [--load_memory]

Both models get the same random SD-1.5 weights (no download needed; SD-1.5's architecture is what matters
for speed). Each is warmed up first (JAX: compile time reported separately), then timed over ``--repeats``
alternating calls, and the medians are printed with their ratio (ours / PyTorch; below 1 is faster) and
the max abs difference of the outputs. ``--load_memory`` also writes the weights as a diffusers safetensors
file and measures the peak host memory of ``load_unet`` in a fresh process.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, default=64, help="latent height and width (64 = a 512x512 image)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="our compute dtype")
    ap.add_argument("--features", action="store_true", help="time VPD's features path instead of the full UNet")
    ap.add_argument("--load_memory", action="store_true", help="also measure load_unet's peak host memory")
    args = ap.parse_args()

    import diffusers
    import jax
    import jax.numpy as jnp
    import torch

    from vpd_jax.models.unet import UNet2DConditionModel, UNetConfig
    from vpd_jax.weights.diffusers import unet_params_from_torch

    diffusers.utils.logging.set_verbosity_error()
    cfg = UNetConfig()  # SD v1.5
    torch.manual_seed(0)
    pt = diffusers.UNet2DConditionModel(
        block_out_channels=cfg.block_out_channels, down_block_types=cfg.down_block_types,
        up_block_types=cfg.up_block_types, cross_attention_dim=768, attention_head_dim=8).eval()
    state = {k: v.detach().numpy().copy() for k, v in pt.state_dict().items()}
    params = jax.device_put(unet_params_from_torch(state))
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    module = UNet2DConditionModel(cfg, dtype=dtype)

    rng = np.random.default_rng(0)
    b, s = args.batch, args.latent
    x = rng.standard_normal((b, s, s, 4)).astype(np.float32)
    t = np.ones((b,), np.int64)
    ctx = rng.standard_normal((b, 1, 768)).astype(np.float32)
    xt, tt, ct = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(t), torch.from_numpy(ctx)

    method = "features" if args.features else None
    fn = jax.jit(lambda p, *a: module.apply({"params": p}, *a, method=method) if method
                 else module.apply({"params": p}, *a))
    t0 = time.perf_counter()
    compiled = fn.lower(params, x, t, ctx).compile()
    compile_s = time.perf_counter() - t0

    def run_jax():
        return jax.block_until_ready(compiled(params, x, t, ctx))

    def run_torch():
        with torch.inference_mode():
            if args.features:
                return _torch_features(pt, xt, tt, ct)
            return pt(xt, tt, ct).sample

    out_j, out_t = run_jax(), run_torch()  # warm-up
    jt, tt_ = [], []
    for _ in range(args.repeats):
        s0 = time.perf_counter()
        run_torch()
        tt_.append(time.perf_counter() - s0)
        s0 = time.perf_counter()
        run_jax()
        jt.append(time.perf_counter() - s0)
    if args.features:
        diff = max(float(np.max(np.abs(np.asarray(a, np.float32) - b_.permute(0, 2, 3, 1).numpy())))
                   for a, b_ in zip(out_j, out_t))
    else:
        diff = float(np.max(np.abs(np.asarray(out_j, np.float32) - out_t.permute(0, 2, 3, 1).numpy())))
    mj, mt = statistics.median(jt), statistics.median(tt_)
    what = "features path" if args.features else "full UNet"
    print(f"machine: {_cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"SD-1.5 {what}, latent {s}x{s}, batch {b}, ours in {args.dtype}, PyTorch in float32, "
          f"{args.repeats} repeats (median)")
    print(f"  ours (JAX jit):   {mj:7.3f} s   (compile {compile_s:.1f} s)")
    print(f"  diffusers torch:  {mt:7.3f} s")
    print(f"  ratio ours/torch: {mj / mt:7.3f}")
    print(f"  max abs diff:     {diff:.2e}")

    if args.load_memory:
        del params, compiled, out_j
        with tempfile.TemporaryDirectory() as d:
            pt.save_pretrained(os.path.join(d, "unet"))
            size = sum(os.path.getsize(os.path.join(d, "unet", f)) for f in os.listdir(os.path.join(d, "unet")))
            # VmHWM, not ru_maxrss: the latter is inherited across exec from this (large) process.
            hwm = ("import re; print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())"
                   ".group(1)) * 1024)")
            code = "import sys; from vpd_jax.weights.diffusers import load_unet; m, p = load_unet(sys.argv[1]); " + hwm
            base = "import jax, jax.numpy as jnp, flax; from vpd_jax.weights import diffusers; " + hwm
            peak = int(subprocess.check_output([sys.executable, "-c", code, d]).split()[-1])
            idle = int(subprocess.check_output([sys.executable, "-c", base]).split()[-1])
        gib = 1024 ** 3
        print(f"load_unet(diffusers safetensors, {size / gib:.2f} GiB fp32): peak RSS {peak / gib:.2f} GiB "
              f"({(peak - idle) / gib:.2f} GiB above an idle interpreter with jax imported, "
              f"{(peak - idle) / size:.2f}x the file)")


def _torch_features(pt, x, t, ctx):
    feats = {}
    hooks = []
    for i, blk in enumerate(pt.up_blocks):
        mod = blk if blk.upsamplers is None else (blk.attentions[1] if getattr(blk, "attentions", None)
                                                  else blk.resnets[1])
        hooks.append(mod.register_forward_hook(
            lambda m, a, o, i=i: feats.__setitem__(i, o[0] if isinstance(o, tuple) else o)))
    pt(x, t, ctx)
    for h in hooks:
        h.remove()
    return [feats[i] for i in sorted(feats)][::-1]


if __name__ == "__main__":
    main()
