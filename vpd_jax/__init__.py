"""vpd-jax: VPD monocular depth estimation (Zhao et al., ICCV 2023) in JAX/Flax.

The model and train-step code import only jax, flax, optax, orbax and numpy; weight readers and data code
import their heavier packages lazily, so ``import vpd_jax`` works on a bare accelerator image.
"""

__version__ = "0.1.0"

__all__ = ["Predictor"]


def __getattr__(name):
    # Lazy, so that ``import vpd_jax`` stays free of jax: ``vpd_jax.Predictor`` loads the inference module.
    if name == "Predictor":
        from vpd_jax.inference import Predictor

        return Predictor
    raise AttributeError(f"module 'vpd_jax' has no attribute {name!r}")
