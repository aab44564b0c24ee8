"""Training a small SD-style VAE encoder from scratch, as an autoencoder of a set of images.

VPD reads images through Stable Diffusion's pretrained, frozen VAE. Without SD weights (the demo, tests, any
toy-sized model) a random frozen VAE is a poor stand-in: its GroupNorms wash out the absolute brightness and
colour that a trained autoencoder keeps, so its latents hold little of the picture. ``train_autoencoder`` gives
such a model what SD's VAE gives VPD: an encoder whose latents can be decoded back into the image. It trains the
encoder with a mirrored decoder (``vpd_jax.models.vae.VAEDecoder``) on an L1 reconstruction loss over random
crops; the decoder is then dropped, as VPD drops SD's.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vpd_jax.models.vae import VAEConfig, VAEDecoder, VAEEncoder


def train_autoencoder(config: VAEConfig, images: np.ndarray, *, steps: int = 300, batch_size: int = 16,
                      crop: int = 64, lr: float = 2e-3, seed: int = 0,
                      log: Callable[[str], None] | None = None) -> tuple[dict, float]:
    """``(encoder params, final reconstruction L1)`` of an autoencoder trained on ``images`` (N, H, W, 3) uint8
    (random ``crop`` x ``crop`` windows, ``batch_size`` per step, Adam with a cosine-decayed rate). The params
    are ``VAEEncoder(config)``'s: ``encoder/...`` and ``quant_conv``."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < crop:
        raise ValueError(f"autoencoder: expected (N, H, W, 3) images of at least {crop}x{crop}, got {images.shape}")
    factor = config.downsample_factor
    if crop % factor:
        raise ValueError(f"autoencoder: crop {crop} is not a multiple of the VAE's x{factor} downsampling")
    enc, dec = VAEEncoder(config), VAEDecoder(config)
    x0 = jnp.zeros((1, crop, crop, 3), jnp.float32)
    k_enc, k_dec = jax.random.split(jax.random.key(seed))
    params = {"enc": enc.init(k_enc, x0)["params"]}
    params["dec"] = dec.init(k_dec, enc.apply({"params": params["enc"]}, x0))["params"]
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x):
        def loss_fn(p):
            recon = dec.apply({"params": p["dec"]}, enc.apply({"params": p["enc"]}, x))
            return jnp.mean(jnp.abs(recon - x))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    n, h, w, _ = images.shape
    loss = float("nan")
    for i in range(steps):
        idx = rng.integers(0, n, batch_size)
        ys, xs = rng.integers(0, h - crop + 1, batch_size), rng.integers(0, w - crop + 1, batch_size)
        batch = np.stack([images[j, y:y + crop, x:x + crop] for j, y, x in zip(idx, ys, xs, strict=True)])
        params, opt_state, loss = step(params, opt_state, batch.astype(np.float32) / 127.5 - 1.0)
        if log is not None and (i + 1) % max(1, steps // 5) == 0:
            log(f"  autoencoder step {i + 1}/{steps}: reconstruction L1 {float(loss):.4f}")
    return jax.tree.map(np.asarray, params["enc"]), float(loss)
