"""How exact the float32 reductions that are not GroupNorm stay at every batch size, against float64.

    .venv/bin/python benchmarks/reduction_accuracy.py

XLA:CPU lowers a large reduction one way for batches of 1-3 and another from 4 on; GroupNorm's per-image
statistics drifted by up to 1e-4 relative there (``vpd_jax.models.layers.pixel_sum`` fixes them, tested in
tests/test_layers.py). This prints the same check for the decoder's BatchNorm in training mode (statistics over
the whole batch, at the decoder's sizes for a 480 crop) and for both SiLog losses over 480x480 depth maps. The
evaluator's metrics are accumulated in float64 (vpd_jax/evaluation/metrics.py) and need no check.
"""

import jax
import numpy as np

from vpd_jax.models.head import BatchNorm
from vpd_jax.training.losses import silog_mmseg, silog_official

jax.config.update("jax_default_matmul_precision", "highest")


def silog64(target, pred, per_image: bool) -> float:
    """SiLog (lambda 0.5) in float64: pooled over the batch's valid pixels, or per image and then averaged."""
    def one(t, p):
        v = t > 1e-6
        d = np.log(t[v]) - np.log(p[v])
        return np.sqrt((d * d).mean() - 0.5 * d.mean() ** 2)

    t, p = target.astype(np.float64), pred.astype(np.float64)
    return float(np.mean([one(a, b) for a, b in zip(t, p)])) if per_image else one(t, p)


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}); inputs with mean 6, std 1")
    print("BatchNorm, training mode: max error of the normalised output (relative to its largest value) and of the "
          "running mean")
    bn = BatchNorm()
    apply = jax.jit(lambda v, x: bn.apply(v, x, True, mutable=["batch_stats"]))
    for hw, c in ((60, 192), (120, 192), (240, 192)):
        for b in (1, 2, 4, 8, 16):
            x = (rng.standard_normal((b, hw, hw, c)) + 6.0).astype(np.float32)
            y, st = apply(bn.init(jax.random.PRNGKey(0), x, True), x)
            x64 = x.astype(np.float64)
            m = x64.mean((0, 1, 2))
            y64 = (x64 - m) / np.sqrt(((x64 - m) ** 2).mean((0, 1, 2)) + 1e-5)
            err = np.abs(np.asarray(y) - y64).max() / np.abs(y64).max()
            rm = np.abs(np.asarray(st["batch_stats"]["mean"]) - 0.1 * m).max() / (0.1 * np.abs(m).max())
            print(f"  ({b:2d}, {hw}, {hw}, {c}): output {err:.1e}, running mean {rm:.1e}")
    print("SiLog over (B, 480, 480), 90% valid pixels: relative error")
    for b in (1, 2, 4, 8, 16):
        t = rng.uniform(0.5, 10, (b, 480, 480)).astype(np.float32)
        t[rng.random(t.shape) < 0.1] = 0
        p = (t * np.exp(0.3 + 0.2 * rng.standard_normal(t.shape))).astype(np.float32) + 0.01
        official = float(jax.jit(silog_official)(p, t))
        mmseg = float(jax.jit(silog_mmseg)(p, t))
        e_off = abs(official - silog64(t, p, False)) / silog64(t, p, False)
        e_mm = abs(mmseg - silog64(t, p, True)) / silog64(t, p, True)
        print(f"  batch {b:2d}: official (pooled) {e_off:.1e}, mmseg (per image) {e_mm:.1e}")


if __name__ == "__main__":
    main()
