"""vpd-jax: VPD monocular depth estimation (Zhao et al., ICCV 2023) in JAX/Flax.

The model and train-step code import only jax, flax, optax, orbax and numpy; weight readers and data code
import their heavier packages lazily, so ``import vpd_jax`` works on a bare accelerator image.
"""

__version__ = "0.1.0"
