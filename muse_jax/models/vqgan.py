"""VQGAN tokenizer: conv encoder, vector quantiser, conv decoder (MaskGIT-style).

The downsampling factor is patch_size * 2 ** (len(channel_mult) - 1). A `patch_size` > 1 starts
the encoder with a space-to-depth patchify and ends the decoder with depth-to-space, so that the
residual blocks run at token resolution: far cheaper for tiny CPU configs, while `patch_size=1`
with GroupNorm (`norm_groups=32`) is the paper's all-convolutional VQGAN. Codes can be l2-normalised before the
nearest-neighbour lookup (cosine similarity, as in ViT-VQGAN), which keeps far more of the
codebook in use than raw Euclidean lookup.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.models import arg_reductions
from muse_jax.models.layers import Dtype, constrain, conv_general_dilated, partitioned

_CONV_AXES = ("height", "width", "conv_in", "conv_out")


def _conv(
    features: int,
    kernel: int,
    name: str | None = None,
    dtype: Dtype = jnp.float32,
    strides: int = 1,
    zero_init: bool = False,
) -> nn.Conv:
    init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding="SAME",
        dtype=dtype,
        conv_general_dilated=conv_general_dilated(dtype),
        kernel_init=partitioned(nn.initializers.zeros if zero_init else init, *_CONV_AXES),
        bias_init=partitioned(nn.initializers.zeros, "conv_out"),
        name=name,
    )


def _norm(groups: int, channels: int, dtype: Dtype) -> nn.Module:
    if groups <= 0:  # No normalisation: on CPU, GroupNorm costs more than the convolutions.
        return lambda x: x
    return nn.GroupNorm(
        num_groups=min(groups, channels),
        dtype=dtype,
        scale_init=partitioned(nn.initializers.ones, "conv_out"),
        bias_init=partitioned(nn.initializers.zeros, "conv_out"),
    )


class ResBlock(nn.Module):
    channels: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    zero_init: bool = False  # Start as the identity: blocks added to a trained decoder.

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.swish(_norm(self.norm_groups, x.shape[-1], self.dtype)(x))
        h = _conv(self.channels, 3, dtype=self.dtype)(h)
        h = nn.swish(_norm(self.norm_groups, self.channels, self.dtype)(h))
        h = _conv(self.channels, 3, dtype=self.dtype, zero_init=self.zero_init)(h)
        if x.shape[-1] != self.channels:
            x = _conv(self.channels, 1, name="skip", dtype=self.dtype)(x)
        return x + h


class Encoder(nn.Module):
    channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    embedding_dim: int
    norm_groups: int = 32
    patch_size: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.patch_size > 1:
            x = _space_to_depth(x, self.patch_size)
        x = _conv(
            self.channels * self.channel_mult[0], 3 if self.patch_size == 1 else 1, dtype=self.dtype
        )(x)
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                x = ResBlock(self.channels * mult, self.norm_groups, self.dtype)(x)
            if level < len(self.channel_mult) - 1:
                x = _conv(
                    self.channels * self.channel_mult[level + 1], 4, dtype=self.dtype, strides=2
                )(x)
        x = ResBlock(x.shape[-1], self.norm_groups, self.dtype)(x)
        x = nn.swish(_norm(self.norm_groups, x.shape[-1], self.dtype)(x))
        return _conv(self.embedding_dim, 1, dtype=self.dtype)(x)


class Decoder(nn.Module):
    """Mirrors the encoder: resolution doubles per level, nearest-neighbour upsampling + conv.

    `extra_res_blocks` (decoder fine-tuning) adds named, zero-initialised residual blocks after
    each level's blocks, so a decoder loaded from a trained tokenizer starts as exactly that
    decoder and fine-tuning can only add to it.
    """

    channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    norm_groups: int = 32
    patch_size: int = 1
    out_channels: int = 16  # Channels at full resolution after depth-to-space (patch_size > 1).
    dtype: Dtype = jnp.float32
    extra_res_blocks: int = 0

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        mults = list(self.channel_mult)[::-1]
        x = _conv(self.channels * mults[0], 3, dtype=self.dtype)(z)
        x = ResBlock(x.shape[-1], self.norm_groups, self.dtype)(x)
        for level, mult in enumerate(mults):
            for _ in range(self.num_res_blocks):
                x = ResBlock(self.channels * mult, self.norm_groups, self.dtype)(x)
            for i in range(self.extra_res_blocks):
                x = ResBlock(
                    self.channels * mult,
                    self.norm_groups,
                    self.dtype,
                    True,
                    name=f"extra_{level}_{i}",
                )(x)
            if level < len(mults) - 1:
                b, h, w, c = x.shape
                x = jax.image.resize(x, (b, h * 2, w * 2, c), "nearest")
                x = _conv(self.channels * mults[level + 1], 3, dtype=self.dtype)(x)
        x = nn.swish(_norm(self.norm_groups, x.shape[-1], self.dtype)(x))
        if self.patch_size > 1:
            x = _conv(self.patch_size**2 * self.out_channels, 1, dtype=self.dtype)(x)
            x = _depth_to_space(x, self.patch_size)
            x = nn.swish(_conv(self.out_channels, 3, dtype=self.dtype)(nn.swish(x)))
        return _conv(3, 3, dtype=self.dtype)(x).astype(jnp.float32)


def _space_to_depth(x: jax.Array, p: int) -> jax.Array:
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def _depth_to_space(x: jax.Array, p: int) -> jax.Array:
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c // (p * p))


class VectorQuantizer(nn.Module):
    """Nearest-codeword lookup with straight-through gradients and codebook/commitment losses."""

    codebook_size: int
    embedding_dim: int
    commitment_cost: float = 0.25
    l2_normalize: bool = True

    def setup(self) -> None:
        self.codebook = self.param(
            "codebook",
            partitioned(
                nn.initializers.variance_scaling(1.0, "fan_in", "uniform"), "codebook", None
            ),
            (self.codebook_size, self.embedding_dim),
        )

    def normalized_codebook(self) -> jax.Array:
        cb = self.codebook.astype(jnp.float32)
        return _l2norm(cb) if self.l2_normalize else cb

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Quantises z [..., D] -> (z_q with straight-through grads, ids [...], losses)."""
        z = z.astype(jnp.float32)
        if self.l2_normalize:
            z = _l2norm(z)
        cb = self.normalized_codebook()
        flat = z.reshape(-1, z.shape[-1])
        dist = jnp.sum(flat**2, -1, keepdims=True) - 2 * flat @ cb.T + jnp.sum(cb**2, -1)[None]
        ids = arg_reductions.argmin(dist).reshape(z.shape[:-1])
        z_q = jnp.take(cb, ids, axis=0)
        codebook_loss = jnp.mean((z_q - jax.lax.stop_gradient(z)) ** 2)
        commit_loss = jnp.mean((jax.lax.stop_gradient(z_q) - z) ** 2)
        z_q_st = z + jax.lax.stop_gradient(z_q - z)
        losses = {
            "codebook": codebook_loss + self.commitment_cost * commit_loss,
            "commitment": commit_loss,
            "encodings": z,
        }
        return z_q_st, ids, losses

    def lookup(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.normalized_codebook(), ids, axis=0)


def _l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class VQGAN(nn.Module):
    """Images in [-1, 1] <-> token ids; `encode`/`decode_ids` are what later stages use."""

    channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    embedding_dim: int
    codebook_size: int
    norm_groups: int = 32
    patch_size: int = 1
    l2_normalize_codes: bool = True
    commitment_cost: float = 0.25
    dtype: Dtype = jnp.float32
    # Decoder fine-tuning (Muse section 2.3): a wider / deeper decoder than the encoder.
    decoder_channels: int = 0  # 0: `channels`.
    decoder_extra_res_blocks: int = 0

    @property
    def downsample_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)

    def setup(self) -> None:
        self.encoder = Encoder(
            self.channels,
            tuple(self.channel_mult),
            self.num_res_blocks,
            self.embedding_dim,
            self.norm_groups,
            self.patch_size,
            self.dtype,
        )
        self.quantizer = VectorQuantizer(
            self.codebook_size, self.embedding_dim, self.commitment_cost, self.l2_normalize_codes
        )
        self.decoder = Decoder(
            self.decoder_channels or self.channels,
            tuple(self.channel_mult),
            self.num_res_blocks,
            self.norm_groups,
            self.patch_size,
            dtype=self.dtype,
            extra_res_blocks=self.decoder_extra_res_blocks,
        )

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """images [B, H, W, 3] in [-1, 1] -> (z_q [B, h, w, D], ids [B, h, w], losses)."""
        chex.assert_rank(images, 4)
        z = self.encoder(constrain(images, "batch", "height", "width", None))
        return self.quantizer(z)

    def tokenize(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> flat token ids [B, h * w] (row-major)."""
        _, ids, _ = self.encode(images)
        return ids.reshape(ids.shape[0], -1)

    def decode_codes(self, z_q: jax.Array) -> jax.Array:
        """Quantised codes [B, h, w, D] -> images (decoder fine-tuning trains only this)."""
        return self.decoder(z_q)

    def decode_ids(self, ids: jax.Array) -> jax.Array:
        """Token ids [B, h, w] or [B, h * w] (square grid) -> images [B, H, W, 3] in about [-1, 1]."""
        if ids.ndim == 2:
            side = int(round(ids.shape[1] ** 0.5))
            chex.assert_equal(side * side, ids.shape[1])
            ids = ids.reshape(ids.shape[0], side, side)
        return self.decoder(self.quantizer.lookup(ids))

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Reconstruction [B, H, W, 3], ids [B, h, w] and quantiser losses."""
        z_q, ids, losses = self.encode(images)
        return self.decoder(z_q), ids, losses
