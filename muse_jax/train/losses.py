"""Loss functions shared by the stages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from muse_jax.models import arg_reductions


def masked_cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and accuracy over positions where `mask` is True only.

    Args:
      logits: [B, L, V]; targets: [B, L] int; mask: [B, L] bool (the masked input positions).
    """
    vocab = logits.shape[-1]
    labels = optax.smooth_labels(jax.nn.one_hot(targets, vocab), label_smoothing)
    ce = optax.softmax_cross_entropy(logits, labels)
    weights = mask.astype(jnp.float32)
    denom = jnp.maximum(weights.sum(), 1.0)
    acc = (arg_reductions.argmax(logits) == targets).astype(jnp.float32)
    return (ce * weights).sum() / denom, (acc * weights).sum() / denom


def edge_loss(x: jax.Array, y: jax.Array) -> jax.Array:
    """L1 between image gradients: a cheap perceptual-style term that rewards sharp edges."""
    dx = lambda a: a[:, :, 1:] - a[:, :, :-1]
    dy = lambda a: a[:, 1:] - a[:, :-1]
    return jnp.mean(jnp.abs(dx(x) - dx(y))) + jnp.mean(jnp.abs(dy(x) - dy(y)))


def psnr(mse_pm1: jax.Array) -> jax.Array:
    """PSNR in dB from the MSE of images in [-1, 1] (peak-to-peak 2)."""
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse_pm1, 1e-10))
