"""Patch discriminator for the tokenizer's adversarial loss (StyleGAN-lite, no norm layers)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.models.layers import conv_general_dilated, partitioned


class PatchDiscriminator(nn.Module):
    """Images [B, H, W, 3] -> per-patch real/fake logits [B, h, w]."""

    channels: int = 32
    num_layers: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = partitioned(
            nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
            "height",
            "width",
            "conv_in",
            "conv_out",
        )
        bias = partitioned(nn.initializers.zeros, "conv_out")
        for i in range(self.num_layers):
            x = nn.Conv(
                self.channels * 2**i,
                (4, 4),
                strides=(2, 2) if i else (1, 1),
                padding="SAME",
                kernel_init=init,
                bias_init=bias,
                conv_general_dilated=conv_general_dilated(jnp.float32),
            )(x)
            x = nn.leaky_relu(x, 0.2)
        logits = nn.Conv(
            1,
            (3, 3),
            padding="SAME",
            kernel_init=init,
            bias_init=bias,
            conv_general_dilated=conv_general_dilated(jnp.float32),
        )(x)
        return logits[..., 0].astype(jnp.float32)
