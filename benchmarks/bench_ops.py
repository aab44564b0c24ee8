"""Where the SD-1.5 UNet's CPU time goes: its main ops timed in XLA (ours) and in PyTorch, side by side.

    .venv/bin/python benchmarks/bench_ops.py [--repeats 5]

Each row is one op at the shapes the SD-1.5 UNet runs at a 64x64 latent (batch 1, fp32), with how many times
the UNet runs it; ``x count`` columns give its share of a forward pass. A profile by op type, so the README can
say what limits the UNet ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    from vpd_jax.models.layers import GroupNorm, attention

    rng = np.random.default_rng(0)

    def tj(f, *a):
        jax.block_until_ready(f(*a))
        ts = []
        for _ in range(args.repeats):
            s = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts.append(time.perf_counter() - s)
        return statistics.median(ts)

    def tt(f, *a):
        with torch.inference_mode():
            f(*a)
            ts = []
            for _ in range(args.repeats):
                s = time.perf_counter()
                f(*a)
                ts.append(time.perf_counter() - s)
        return statistics.median(ts)

    rows = []
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                             dimension_numbers=("NHWC", "HWIO", "NHWC")))
    # (spatial, in, out, count): 3x3 convs of the resnets (2 each), up/downsamplers, conv_in/out.
    for s, cin, cout, n in [(64, 320, 320, 9), (64, 640, 320, 1), (32, 640, 640, 7), (32, 320, 640, 1),
                            (16, 1280, 1280, 7), (16, 640, 1280, 1), (8, 1280, 1280, 12)]:
        x = rng.standard_normal((1, s, s, cin)).astype(np.float32)
        w = (rng.standard_normal((3, 3, cin, cout)) * 0.02).astype(np.float32)
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
        rows.append((f"conv3x3 {cin}->{cout} @{s}", n, tj(conv, x, w),
                     tt(lambda a, b: F.conv2d(a, b, padding=1), xt, wt)))
    for t, heads, dh, n in [(4096, 8, 40, 5), (1024, 8, 80, 5), (256, 8, 160, 6)]:
        q = rng.standard_normal((1, t, heads, dh)).astype(np.float32)
        f = jax.jit(lambda a, b, c: attention(a, b, c, scale=dh ** -0.5, impl="einsum"))
        qt = torch.from_numpy(q).permute(0, 2, 1, 3).contiguous()
        rows.append((f"self-attention {t} tokens {heads}x{dh}", n, tj(f, q, q, q),
                     tt(lambda a, b, c: F.scaled_dot_product_attention(a, b, c), qt, qt, qt)))
    for t, c, n in [(4096, 320, 5), (1024, 640, 5), (256, 1280, 6)]:
        x = rng.standard_normal((t, c)).astype(np.float32)
        w1 = (rng.standard_normal((c, 8 * c)) * 0.02).astype(np.float32)
        w2 = (rng.standard_normal((4 * c, c)) * 0.02).astype(np.float32)

        def ff(x, w1, w2):
            h, g = jnp.split(x @ w1, 2, axis=-1)
            return (h * jax.nn.gelu(g, approximate=False)) @ w2

        xt, w1t, w2t = (torch.from_numpy(a) for a in (x, w1, w2))

        def fft(x, w1, w2):
            h, g = (x @ w1).chunk(2, dim=-1)
            return (h * F.gelu(g)) @ w2

        rows.append((f"GEGLU feed-forward {t}x{c}", n, tj(jax.jit(ff), x, w1, w2), tt(fft, xt, w1t, w2t)))
    for s, c, n in [(64, 320, 14), (32, 640, 12), (16, 1280, 12), (8, 1280, 14)]:
        x = rng.standard_normal((1, s, s, c)).astype(np.float32)
        m = GroupNorm(32)
        p = m.init(jax.random.PRNGKey(0), x)
        f = jax.jit(lambda p, x: jax.nn.silu(m.apply(p, x)))
        gn = torch.nn.GroupNorm(32, c)
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        rows.append((f"GroupNorm+SiLU {c} @{s}", n, tj(f, p, x), tt(lambda a: F.silu(gn(a)), xt)))

    print(f"{'op':40s} {'count':>5s} {'ours s':>9s} {'torch s':>9s} {'ratio':>6s} "
          f"{'ours x count':>13s} {'torch x count':>14s}")
    tot_j = tot_t = 0.0
    for name, n, j, t in rows:
        tot_j += n * j
        tot_t += n * t
        print(f"{name:40s} {n:5d} {j:9.4f} {t:9.4f} {j / t:6.2f} {n * j:13.3f} {n * t:14.3f}")
    print(f"{'total of the rows':40s} {'':5s} {'':9s} {'':9s} {tot_j / tot_t:6.2f} {tot_j:13.3f} {tot_t:14.3f}")


if __name__ == "__main__":
    main()
