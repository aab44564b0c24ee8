"""Full-size VPD train step on one accelerator: ours (JAX) against a PyTorch VPD step (diffusers), same batch.

    python benchmarks/bench_train_step.py --batch 8 --cases jax:bf16:remat,jax:fp32:remat,torch:fp32,torch:bf16

Each case runs in its own process (clean peak memory, no allocator fights) and prints one line; the table comes
last. The model is the released one: SD-1.5 UNet (859.5 M parameters), the SD VAE encoder (frozen), the
VPD neck/decoder/head, one CLIP-sized context token, at ``--size`` x ``--size`` crops (480 = the official
recipe). Weights are random (speed and memory do not depend on their values); inputs are random images, depths
in (0.5, 10) m with 10% invalid pixels, random scene ids.

A case is ``framework:dtype[:remat][:attention][:autolayout]``:

* ``jax:bf16:remat:cudnn``: our ``make_train_step`` as ``train.py`` builds it (AdamW groups, VAE frozen,
  BatchNorm groups of the per-device batch, batch-pooled SiLog), compute in bf16 with fp32 parameters, norms
  and softmax; ``remat`` = per-block rematerialisation; attention ``xla``/``cudnn``/``einsum`` (default: ours,
  i.e. cuDNN's fused kernel for bf16 on GPUs, XLA for fp32). fp32 cases use XLA's default GPU precision
  (TF32 tensor cores allowed for matmuls and convolutions).
* ``autolayout``: the train state lives in the layouts XLA picks for the step (``make_train_step(...,
  state_layout="auto")``) instead of row-major. On an H100 (deviceless XLA:GPU compile) this removes the
  transposes between our HWIO conv kernels and cuDNN's OHWI ones: 8.3 GiB of transposed output per bf16 step
  at batch 8 becomes 0.5 GiB. Not timed on a GPU yet.
* ``torch:fp32[:remat]``: the official recipe in PyTorch: diffusers ``UNet2DConditionModel`` and
  ``AutoencoderKL`` (``no_grad`` encode, ``.mode()``, no scaling), the official head, ``torch.optim.AdamW``
  with the two learning-rate groups; ``remat`` = diffusers gradient checkpointing, which is what the official
  ``use_checkpoint=True`` does. ``torch:bf16`` wraps the forward in ``torch.autocast(bfloat16)``. PyTorch
  defaults: TF32 for convolutions (cuDNN), not for matmuls.

Reported per case: compile seconds (JAX), median step seconds over ``--steps`` timed steps (after 3 warm-up
steps), images/s, model TFLOP per step, TFLOP/s, MFU against ``--peak_tflops`` (dense bf16 of the card; 989
for an H100 SXM), peak device memory (JAX ``peak_bytes_in_use``, torch ``max_memory_allocated``), and for JAX
cases the device-free proxy of the compiled step: kernels launched and memory-bound GiB moved
(``vpd_jax.tools.hlo_sources.entry_traffic``), to check the proxy against the measured times.
Model FLOPs are XLA's cost analysis of the same step lowered without remat and with XLA attention (so
recomputation and opaque cuDNN calls neither inflate nor hide work); every case of one batch size uses that
same count, which makes the MFU column comparable across rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GiB = 1024**3


# ------------------------------------------------------------------------------------------------ data
def _batch_np(batch: int, size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    depth = rng.uniform(0.5, 10.0, (batch, size, size)).astype(np.float32)
    depth[rng.random((batch, size, size)) < 0.1] = 0.0
    return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), "depth": depth,
            "class_id": rng.integers(0, 27, (batch,)).astype(np.int32), "valid": np.ones((batch,), bool)}


# ------------------------------------------------------------------------------------------------ JAX
def _jax_setup(batch: int, dtype: str, remat: bool, attention: str | None, model_size: str):
    """``(model, mesh, tx, abstract variables, make_step)``; ``make_step(shardings)`` is the jitted train step
    exactly as ``train.py`` builds it (``vpd_jax.build``) for the official recipe on one device."""
    import jax

    from vpd_jax import build, parallel

    cfg = recipe_config(batch, {"bf16": "bfloat16", "fp32": "float32"}[dtype], remat, attention, model_size)
    mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
    setup = build.train_setup(cfg, mesh)
    abstract = setup.abstract_vars
    constants = {"class_embeddings": np.random.default_rng(1).standard_normal(
        abstract["constants"]["class_embeddings"].shape).astype(np.float32)}

    def make_step(shardings, state_layout="default"):
        cfg.train.state_layout = state_layout
        return build.train_step(cfg, dataclasses.replace(setup, shardings=shardings), mesh, constants)

    return setup.model, mesh, setup.tx, abstract, make_step


def recipe_config(batch: int, dtype: str, remat: bool, attention: str | None, model_size: str, fsdp: int = 1):
    """``configs/nyu_480.py`` (the official recipe) with the benchmark's model settings, ``batch`` images per
    device in one BatchNorm/SiLog group."""
    from configs import nyu_480

    cfg = nyu_480.get_config()
    cfg.model.size = "tiny" if model_size == "tiny" else "sd15"
    cfg.model.dtype, cfg.model.remat, cfg.model.attention_impl = dtype, bool(remat), attention or ""
    cfg.train.global_batch_size, cfg.train.group_size = batch * fsdp, batch
    cfg.mesh.data, cfg.mesh.fsdp = 1, fsdp
    return cfg


def _model_flops(batch, size, dtype, model_size) -> float:
    """XLA's FLOP count of the step without remat and with XLA attention (from the lowered step where the
    backend gives one, else from the compiled step)."""
    import jax

    from vpd_jax.build import abstract_train_state
    from vpd_jax.training import step as S

    model, mesh, tx, abstract, make_step = _jax_setup(batch, dtype, False, "xla", model_size)
    state_abs, shardings = abstract_train_state(abstract, tx, mesh)
    step_fn = make_step(shardings)
    b = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch_np(batch, size))
    lowered = step_fn.lower(state_abs, b)
    flops = S.step_flops(lowered)
    if flops is None:  # jax 0.11 on GPUs gives none before compilation: count on the compiled step instead
        flops = S.step_flops(lowered.compile())
    return float("nan") if flops is None else flops


def _kernel_table(trace_dir: str, steps: int, top: int = 25, sources: dict | None = None) -> tuple[str, dict]:
    """Per-kernel device time from a ``jax.profiler`` perfetto trace: the top kernels and totals by kind.

    ``sources`` (``vpd_jax.tools.hlo_sources`` of the compiled step) adds each XLA kernel's op name and source
    line; library kernels (cuDNN, cuBLAS) have none."""
    import glob
    import gzip
    import re

    files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        return "(no perfetto trace written)", {}
    with gzip.open(files[0], "rt") as f:
        events = json.load(f)
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    per, kinds = {}, {}
    rules = [("attention", r"fmha|flash|sdpa|attention|cudnn.*mha"), ("conv", r"conv|xmma|implicit|fprop|dgrad|wgrad"),
             ("gemm", r"gemm|gemv|cublas|cutlass|matmul|dot"), ("reduce (norms, loss)", r"reduce|reduction"),
             ("copy/transpose", r"copy|transpose|memcpy|memset"), ("elementwise", r"fusion|loop|elementwise")]
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in gpu_pids or "dur" not in e:
            continue
        name = str(e.get("name", "?"))
        per[name] = per.get(name, 0.0) + e["dur"] / 1e3 / steps  # ms per step
        kind = next((k for k, r in rules if re.search(r, name, re.I)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + e["dur"] / 1e3 / steps
    total = sum(kinds.values()) or float("nan")
    lines = [f"device kernel time per step: {total:.1f} ms"]
    lines += [f"  {k:<22} {v:8.1f} ms {100 * v / total:5.1f}%" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines.append(f"top {top} kernels (ms per step):")
    for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {v:8.2f}  {k[:110]}")
        where = (sources or {}).get(k)
        if where:
            lines.append(f"            <- {where[-160:]}")
    return "\n".join(lines), kinds


def run_jax(batch, size, dtype, remat, attention, steps, model_size, profile=None, hlo_path=None,
            state_layout="default") -> dict:
    import jax

    from vpd_jax import parallel
    from vpd_jax.training import initialize
    from vpd_jax.training import step as S

    model, mesh, tx, abstract, make_step = _jax_setup(batch, dtype, remat, attention, model_size)
    t0 = time.perf_counter()
    variables = initialize.random_variables(model, 0, "fast")
    state, shardings = S.create_train_state_from_variables(variables, tx, mesh, 0)
    del variables
    init_s = time.perf_counter() - t0
    step_fn = make_step(shardings, state_layout)
    if profile:  # a persistent-cache hit would carry the source lines of whatever code compiled it first
        jax.config.update("jax_compilation_cache_include_metadata_in_key", True)
    data = jax.device_put(_batch_np(batch, size), parallel.batch_sharding(mesh))
    if state_layout == "auto":  # compile for the abstract state, then move it once into the chosen layouts
        abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        compiled, compile_s = S.compile_step(step_fn, abstract_state, data)
        state = S.place_state(compiled, state)  # as train.py does
    else:
        compiled, compile_s = S.compile_step(step_fn, state, data)
    ma = compiled.memory_analysis()
    from vpd_jax.tools.hlo_sources import traffic_summary

    kernels, mem_bound = traffic_summary(compiled.as_text())  # the device-free proxy, next to the measured times
    extra = {"kernels": kernels, "mem_bound_gib": mem_bound / GiB}
    for _ in range(3):
        state, m = compiled(state, data)
    loss0 = float(jax.device_get(m["loss"]))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, data)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
    stats = jax.devices()[0].memory_stats() or {}
    if profile:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d, create_perfetto_trace=True):
                for _ in range(3):
                    state, m = compiled(state, data)
                jax.block_until_ready(m["loss"])
            from vpd_jax.tools.hlo_sources import hlo_sources

            text = compiled.as_text()
            if hlo_path:  # the optimized HLO, to trace any kernel of the table back to the model by hand
                with open(hlo_path, "w") as f:
                    f.write(text)
            table, kinds = _kernel_table(d, 3, sources=hlo_sources(text))
        print(table, file=sys.stderr, flush=True)
        extra["kernel_ms"] = kinds
    return {**extra, "compile_s": compile_s, "init_s": init_s, "step_s": statistics.median(times),
            "step_min_s": min(times), "peak_gib": stats.get("peak_bytes_in_use", 0) / GiB,
            "xla_gib": (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
                        + ma.temp_size_in_bytes) / GiB if ma is not None else float("nan"),
            "loss": float(jax.device_get(m["loss"])), "loss0": loss0}


# ------------------------------------------------------------------------------------------------ torch
def _torch_vpd(model_size: str):
    """diffusers' UNet and VAE, and the official head and text adapter of the tests' PyTorch reference."""
    import diffusers
    import torch
    import torch.nn as tnn

    from reference.torch_vpd import TorchHead, TorchTextAdapter
    from vpd_jax.models.vpd import VPDConfig

    cfg = VPDConfig.tiny() if model_size == "tiny" else VPDConfig()
    u, v = cfg.unet, cfg.vae
    unet = diffusers.UNet2DConditionModel(
        sample_size=64, in_channels=u.in_channels, out_channels=u.out_channels,
        block_out_channels=u.block_out_channels, down_block_types=u.down_block_types, up_block_types=u.up_block_types,
        layers_per_block=u.layers_per_block, cross_attention_dim=u.cross_attention_dim,
        attention_head_dim=u.attention_head_dim, norm_num_groups=u.norm_num_groups)
    vae = diffusers.AutoencoderKL(
        block_out_channels=v.block_out_channels, down_block_types=("DownEncoderBlock2D",) * len(v.block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(v.block_out_channels), layers_per_block=v.layers_per_block,
        latent_channels=v.latent_channels, norm_num_groups=v.norm_num_groups)
    del vae.decoder, vae.post_quant_conv  # VPD never decodes
    head = tnn.Module()  # everything the optimizer trains besides the UNet
    head.dec = TorchHead(list(u.block_out_channels), cfg.neck_features, cfg.deconv_filters, cfg.decoder_features,
                         cfg.max_depth)  # the maps o11, o7, o4, o1 have 320, 640, 1280, 1280 channels
    head.adapter = TorchTextAdapter(cfg.text_dim)
    head.gamma = tnn.Parameter(torch.full((cfg.text_dim,), 1e-4))
    return unet, vae, head, cfg


def run_torch(batch, size, dtype, remat, steps, model_size) -> dict:
    import math

    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet, vae, head, cfg = _torch_vpd(model_size)
    unet, vae, head = unet.to(dev).train(), vae.to(dev).eval().requires_grad_(False), head.to(dev).train()
    if remat:
        unet.enable_gradient_checkpointing()
    table = torch.randn(cfg.num_classes + 1, cfg.text_dim, device=dev)
    taps = [unet.up_blocks[0].resnets[-1], unet.up_blocks[1].attentions[-1], unet.up_blocks[2].attentions[-1],
            unet.up_blocks[3]]  # o1, o4, o7, o11
    feats = {}
    for i, m in enumerate(taps):
        m.register_forward_hook(lambda m, a, out, i=i: feats.__setitem__(i, out[0] if isinstance(out, tuple) else out))
    # The official optimizer: UNet at lr x 0.01; 1-D parameters and biases without weight decay.
    groups = {}
    for name, p in list(unet.named_parameters(prefix="unet")) + list(head.named_parameters(prefix="head")):
        key = ("unet" in name.split(".")[0], p.ndim == 1 or name.endswith(".bias"))
        groups.setdefault(key, []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": 5e-4 * (0.01 if u else 1.0), "weight_decay": 0.0 if nd else 0.1}
                             for (u, nd), ps in groups.items()], betas=(0.9, 0.999))
    b = {k: torch.from_numpy(v).to(dev) for k, v in _batch_np(batch, size).items()}
    image = b["image"].permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
    depth, ids = b["depth"], b["class_id"].long()
    pad = 64 * math.ceil(size / 64)
    valid_hw = (math.ceil(size / 32),) * 2
    t_ones = torch.ones(batch, dtype=torch.long, device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step():
        x = torch.nn.functional.pad(image, (0, pad - size, 0, pad - size))
        with torch.no_grad(), amp:
            latents = vae.encode(x).latent_dist.mode()
        with amp:
            e = table[ids]
            ctx = head.adapter(e, head.gamma)[:, None, :]
            unet(latents, t_ones, ctx)
            pred = head.dec([feats[3], feats[2], feats[1], feats[0]], valid_hw)[:, 0, :size, :size].float()
        valid = depth > 1e-3  # the official batch-pooled SiLog, lambda 0.5, no x10
        d = torch.log(depth[valid]) - torch.log(pred[valid])
        loss = torch.sqrt((d**2).mean() - 0.5 * d.mean() ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(3):
        loss0 = float(step())
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / GiB if dev.type == "cuda" else float("nan")
    return {"step_s": statistics.median(times), "step_min_s": min(times), "peak_gib": peak, "loss": float(loss),
            "loss0": loss0, "compile_s": float("nan")}


# ------------------------------------------------------------------------------------------------ driver
def parse_case(case: str) -> dict:
    parts = case.split(":")
    fw, dtype, rest = parts[0], parts[1], parts[2:]
    if fw not in ("jax", "torch") or dtype not in ("fp32", "bf16"):
        raise SystemExit(f"error: case {case!r}: expected "
                         "jax|torch:fp32|bf16[:remat][:xla|cudnn|cudnn_or_xla|einsum][:autolayout]")
    attention = next((p for p in rest if p in ("xla", "cudnn", "cudnn_or_xla", "einsum")), None)
    return {"framework": fw, "dtype": dtype, "remat": "remat" in rest, "attention": attention,
            "state_layout": "auto" if "autolayout" in rest else "default"}


def _file_stem(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text)


def one_case(a) -> dict:
    c = parse_case(a.case)
    if c["framework"] == "jax":
        import jax

        if jax.default_backend() == "cpu":
            jax.config.update("jax_threefry_partitionable", False)
        hlo = os.path.join(a.logdir, _file_stem(a.case) + ".hlo.txt") if a.logdir and a.profile else None
        if hlo:
            os.makedirs(a.logdir, exist_ok=True)
        out = run_jax(a.batch, a.size, c["dtype"], c["remat"], c["attention"], a.steps, a.model, a.profile, hlo,
                      c["state_layout"])
        out["device"] = jax.devices()[0].device_kind
    else:
        import torch

        out = run_torch(a.batch, a.size, c["dtype"], c["remat"], a.steps, a.model)
        out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="jax:bf16:remat,jax:fp32:remat,torch:bf16:remat,torch:fp32:remat")
    ap.add_argument("--batch", type=int, default=8, help="per-device batch")
    ap.add_argument("--size", type=int, default=480)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default="sd15", choices=["sd15", "tiny"])
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="the card's dense bf16 TFLOP/s")
    ap.add_argument("--model_flops", type=float, default=None,
                    help="model FLOPs per step, if known (e.g. counted on a CPU host: --flops); skips the count")
    ap.add_argument("--budget_s", type=float, default=540.0, help="no case is started after this many seconds")
    ap.add_argument("--json", default=None, help="also write every result here")
    ap.add_argument("--logdir", default=None, help="write each case's stderr here")
    ap.add_argument("--profile", action="store_true",
                    help="JAX cases: profile 3 steps, log a per-kernel table with each XLA kernel's source line "
                         "(and, with --logdir, write the optimized HLO there)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    ap.add_argument("--flops", action="store_true", help="print the model FLOPs per step and exit")
    a = ap.parse_args(argv)
    if a.flops:
        import jax

        if jax.default_backend() == "cpu":
            jax.config.update("jax_threefry_partitionable", False)
        print("RESULT " + json.dumps({"flops": _model_flops(a.batch, a.size, "bf16", a.model)}), flush=True)
        return
    if a.case:
        print("RESULT " + json.dumps(one_case(a)), flush=True)
        return

    t0 = time.perf_counter()
    common = ["--batch", str(a.batch), "--size", str(a.size), "--steps", str(a.steps), "--model", a.model,
              *(["--profile"] if a.profile else []), *(["--logdir", a.logdir] if a.logdir else [])]

    def child(extra):
        p = subprocess.run([sys.executable, os.path.abspath(__file__), *common, *extra], capture_output=True,
                           text=True)
        if a.logdir:
            os.makedirs(a.logdir, exist_ok=True)
            name = _file_stem("".join(extra).lstrip("-"))
            with open(os.path.join(a.logdir, name + ".log"), "w") as f:
                f.write(p.stdout + "\n" + p.stderr)
        for line in p.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:]), None
        return None, (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1][:300]

    res, err = ({"flops": a.model_flops}, None) if a.model_flops else child(["--flops"])
    flops = res["flops"] if res else float("nan")
    print(f"model FLOPs per step (batch {a.batch}, {a.size}x{a.size}): {flops / 1e12:.4g} TFLOP"
          + (f"  [{err}]" if err else ""), flush=True)
    head = (f"{'case':<24} {'compile s':>9} {'step s':>8} {'img/s':>7} {'TFLOP/s':>8} {'MFU':>6} "
            f"{'peak GiB':>8} {'loss':>7} {'kernels':>7} {'mem-bound GiB':>13}")
    rows, results = [head, "-" * len(head)], []
    for case in a.cases.split(","):
        if time.perf_counter() - t0 > a.budget_s:
            rows.append(f"{case:<24} skipped (budget)")
            continue
        r, err = child(["--case", case])
        if r is None:
            rows.append(f"{case:<24} FAILED: {err}")
            print(rows[-1], flush=True)
            continue
        tf = flops / r["step_s"] / 1e12
        r.update(case=case, batch=a.batch, size=a.size, model_flops=flops, tflops=tf, mfu=tf / a.peak_tflops)
        results.append(r)
        rows.append(f"{case:<24} {r['compile_s']:>9.1f} {r['step_s']:>8.3f} {a.batch / r['step_s']:>7.1f} "
                    f"{tf:>8.1f} {100 * tf / a.peak_tflops:>5.1f}% {r['peak_gib']:>8.2f} {r['loss']:>7.3f} "
                    f"{r.get('kernels', '-'):>7} {r.get('mem_bound_gib', float('nan')):>13.2f}")
        print(rows[-1] + f"   [{r['device']}]", flush=True)
    print("\n".join(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
