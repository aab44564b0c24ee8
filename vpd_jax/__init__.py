"""vpd-jax: VPD (Zhao et al., ICCV 2023) in JAX/Flax: monocular depth and semantic segmentation.

The model and train-step code import only jax, flax, optax, orbax and numpy; weight readers and data code
import their heavier packages lazily, so ``import vpd_jax`` works on a bare accelerator image.
"""

__version__ = "0.1.0"

__all__ = ["Predictor", "Segmenter"]


def __getattr__(name):
    # Lazy, so that ``import vpd_jax`` stays free of jax: ``vpd_jax.Predictor`` loads the inference module.
    if name == "Predictor":
        from vpd_jax.inference import Predictor

        return Predictor
    if name == "Segmenter":
        from vpd_jax.inference import Segmenter

        return Segmenter
    raise AttributeError(f"module 'vpd_jax' has no attribute {name!r}")
