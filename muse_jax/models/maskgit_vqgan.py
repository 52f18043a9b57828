"""MaskGIT's VQGAN tokenizer (google-research/maskgit `nets/vqgan_tokenizer.py`) in this project.

`MaskGITVQGAN` computes what MaskGIT's `VQVAE` with the "vq" quantiser and GroupNorm computes,
so its released ImageNet tokenizer checkpoints (read by `muse_jax.convert.maskgit`) tokenize and
decode here as they do there, behind the interface of `muse_jax.models.vqgan.VQGAN`. MaskGIT's
quirks are kept on purpose, since the released weights were trained with them:

- Images enter the encoder in [0, 1] and leave the decoder in [0, 1]; here they are mapped from
  and to this project's [-1, 1] (x -> (x + 1) / 2 in, y -> 2 y - 1 out, never clipped).
- When a residual block changes the channel count, its 1x1 shortcut (no bias) is applied to the
  block's *output*, not its input: the block returns h + W h, and the input is dropped.
- The encoder's first conv has `filters` outputs whatever `channel_multipliers[0]` is; its
  convolutions inside residual blocks have no bias; the others do.
- The encoder downsamples with a 2x2 average pool (TensorFlow-style "SAME": padded cells are
  not counted), or a 4x4 stride-2 conv when `conv_downsample`; the decoder upsamples with
  nearest-neighbour resizing followed by a 3x3 conv.
- Flax's GroupNorm with its defaults (32 groups, epsilon 1e-6) everywhere.
- The quantiser looks up the nearest codeword by squared Euclidean distance, with no l2
  normalisation; its training loss adds an entropy term (`entropy_loss_ratio`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.errors import UsageError
from muse_jax.models import arg_reductions
from muse_jax.models.layers import Dtype, constrain, conv_general_dilated, get_dtype, partitioned

_CONV_AXES = ("height", "width", "conv_in", "conv_out")
_NORM_GROUPS = 32  # Flax's GroupNorm default, which MaskGIT uses.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"swish": nn.swish, "relu": nn.relu}


def _conv(
    features: int, kernel: int, dtype: Dtype, name: str, bias: bool = True, strides: int = 1
) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding="SAME",
        use_bias=bias,
        dtype=dtype,
        conv_general_dilated=conv_general_dilated(dtype),
        kernel_init=partitioned(nn.initializers.lecun_normal(), *_CONV_AXES),
        bias_init=partitioned(nn.initializers.zeros, "conv_out"),
        name=name,
    )


def _norm(dtype: Dtype, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(
        num_groups=_NORM_GROUPS,
        dtype=dtype,
        scale_init=partitioned(nn.initializers.ones, "conv_out"),
        bias_init=partitioned(nn.initializers.zeros, "conv_out"),
        name=name,
    )


def _avg_pool_2x2(x: jax.Array) -> jax.Array:
    """MaskGIT's `dsample`: 2x2 stride-2 "SAME" average pool dividing by the cells in the image."""
    window = (1, 2, 2, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, "SAME")
    count = jax.lax.reduce_window(jnp.ones_like(x), 0.0, jax.lax.add, window, window, "SAME")
    return total / count


class ResBlock(nn.Module):
    """norm -> act -> 3x3 conv -> norm -> act -> 3x3 conv, plus MaskGIT's residual (see top)."""

    filters: int
    activation: str = "swish"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.activation]
        h = act(_norm(self.dtype, "norm_1")(x))
        h = _conv(self.filters, 3, self.dtype, "conv_1", bias=False)(h)
        h = act(_norm(self.dtype, "norm_2")(h))
        h = _conv(self.filters, 3, self.dtype, "conv_2", bias=False)(h)
        if x.shape[-1] != self.filters:
            # MaskGIT's shortcut reads the branch's output: the block's input does not pass on.
            return h + _conv(self.filters, 1, self.dtype, "shortcut", bias=False)(h)
        return h + x


class Encoder(nn.Module):
    """Images in [0, 1] -> continuous codes [B, H / f, W / f, embedding_dim]."""

    filters: int
    channel_multipliers: Sequence[int]
    num_res_blocks: int
    embedding_dim: int
    conv_downsample: bool = False
    activation: str = "swish"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _conv(self.filters, 3, self.dtype, "conv_in", bias=False)(x)
        levels = len(self.channel_multipliers)
        filters = self.filters
        for level, mult in enumerate(self.channel_multipliers):
            filters = self.filters * mult
            for j in range(self.num_res_blocks):
                x = ResBlock(filters, self.activation, self.dtype, name=f"block_{level}_{j}")(x)
            if level < levels - 1:
                if self.conv_downsample:
                    x = _conv(filters, 4, self.dtype, f"down_{level}", strides=2)(x)
                else:
                    x = _avg_pool_2x2(x)
        for j in range(self.num_res_blocks):
            x = ResBlock(filters, self.activation, self.dtype, name=f"mid_{j}")(x)
        x = _ACTIVATIONS[self.activation](_norm(self.dtype, "norm_out")(x))
        return _conv(self.embedding_dim, 1, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    """Codes [B, h, w, D] -> images [B, h f, w f, 3] in about [0, 1] (MaskGIT's range)."""

    filters: int
    channel_multipliers: Sequence[int]
    num_res_blocks: int
    activation: str = "swish"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        mults = tuple(self.channel_multipliers)
        filters = self.filters * mults[-1]
        x = _conv(filters, 3, self.dtype, "conv_in")(z)
        for j in range(self.num_res_blocks):
            x = ResBlock(filters, self.activation, self.dtype, name=f"mid_{j}")(x)
        for level in reversed(range(len(mults))):
            filters = self.filters * mults[level]
            for j in range(self.num_res_blocks):
                x = ResBlock(filters, self.activation, self.dtype, name=f"block_{level}_{j}")(x)
            if level > 0:
                b, h, w, c = x.shape
                x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")
                x = _conv(filters, 3, self.dtype, f"up_{level}")(x)
        x = _ACTIVATIONS[self.activation](_norm(self.dtype, "norm_out")(x))
        return _conv(3, 3, self.dtype, "conv_out")(x).astype(jnp.float32)


def entropy_loss(affinity: jax.Array, loss_type: str, temperature: float) -> jax.Array:
    """MaskGIT's codebook entropy loss: mean per-token entropy minus the entropy of the mean
    assignment, so tokens commit to one code each while the batch spreads over the codebook."""
    flat = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = jax.nn.softmax(flat, axis=-1)
    log_probs = jax.nn.log_softmax(flat + 1e-5, axis=-1)
    if loss_type == "softmax":
        target = probs
    elif loss_type == "argmax":
        onehot = jax.nn.one_hot(jnp.argmax(flat, axis=-1), flat.shape[-1], dtype=flat.dtype)
        target = probs - jax.lax.stop_gradient(probs - onehot)
    else:
        raise UsageError(f"Unknown entropy_loss_type {loss_type!r}; valid: 'softmax', 'argmax'.")
    avg_probs = jnp.mean(target, axis=0)
    avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5))
    sample_entropy = -jnp.mean(jnp.sum(target * log_probs, axis=-1))
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    """Nearest codeword by squared Euclidean distance; straight-through gradients; MaskGIT's
    losses (commitment-weighted encoder term + codebook term + weighted entropy term)."""

    codebook_size: int
    embedding_dim: int
    commitment_cost: float = 0.25
    entropy_loss_ratio: float = 0.1
    entropy_temperature: float = 0.01
    entropy_loss_type: str = "softmax"

    def setup(self) -> None:
        self.codebook = self.param(
            "codebook",
            partitioned(
                nn.initializers.variance_scaling(1.0, "fan_in", "uniform"), "codebook", None
            ),
            (self.codebook_size, self.embedding_dim),
        )

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """z [..., D] -> (z_q with straight-through gradients, ids [...] int32, losses)."""
        z = z.astype(jnp.float32)
        cb = self.codebook.astype(jnp.float32)
        flat = z.reshape(-1, z.shape[-1])
        # MaskGIT's `squared_euclidean_distance`, term for term (the same rounding).
        dist = (
            jnp.sum(flat**2, axis=1, keepdims=True)
            - 2 * jnp.matmul(flat, cb.T)
            + jnp.sum(cb.T**2, axis=0, keepdims=True)
        )
        ids = arg_reductions.argmin(dist).reshape(z.shape[:-1]).astype(jnp.int32)
        q = jnp.take(cb, ids, axis=0)
        commit = jnp.mean((jax.lax.stop_gradient(q) - z) ** 2)
        codebook = jnp.mean((q - jax.lax.stop_gradient(z)) ** 2)
        loss = commit * self.commitment_cost + codebook
        if self.entropy_loss_ratio != 0:
            entropy = entropy_loss(-dist, self.entropy_loss_type, self.entropy_temperature)
            loss = loss + entropy * self.entropy_loss_ratio
        losses = {"codebook": loss, "commitment": commit, "encodings": z}
        # Straight-through as MaskGIT's `x + sg(q - x)` (gradients reach z only), written so
        # that the forward value is exactly q, as MaskGIT's inference computes it.
        return jax.lax.stop_gradient(q) + (z - jax.lax.stop_gradient(z)), ids, losses

    def lookup(self, ids: jax.Array) -> jax.Array:
        """ids [...] -> codewords [..., D]."""
        return jnp.take(self.codebook.astype(jnp.float32), ids, axis=0)


class MaskGITVQGAN(nn.Module):
    """MaskGIT's VQGAN: images in [-1, 1] <-> token ids, with `VQGAN`'s interface.

    The field defaults are MaskGIT's `vqgan_config` (its released ImageNet 256 and 512
    tokenizers), so `MaskGITVQGAN()` is the model those checkpoints hold.
    """

    filters: int = 128
    channel_multipliers: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    embedding_dim: int = 256
    codebook_size: int = 1024
    conv_downsample: bool = False
    activation: str = "swish"  # MaskGIT's `activation_fn`: "swish" or "relu".
    commitment_cost: float = 0.25
    entropy_loss_ratio: float = 0.1
    entropy_temperature: float = 0.01
    entropy_loss_type: str = "softmax"
    dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    def setup(self) -> None:
        if self.activation not in _ACTIVATIONS:
            raise UsageError(
                f"Unknown activation {self.activation!r}; valid: {sorted(_ACTIVATIONS)}."
            )
        mults = tuple(self.channel_multipliers)
        bad = [self.filters * m for m in (1, *mults) if (self.filters * m) % _NORM_GROUPS]
        if bad:
            raise UsageError(
                f"MaskGIT's GroupNorm splits channels into {_NORM_GROUPS} groups; filters "
                f"{self.filters} x channel_multipliers {list(mults)} gives {bad[0]} channels."
            )
        self.encoder = Encoder(
            self.filters,
            mults,
            self.num_res_blocks,
            self.embedding_dim,
            self.conv_downsample,
            self.activation,
            self.dtype,
        )
        self.quantizer = VectorQuantizer(
            self.codebook_size,
            self.embedding_dim,
            self.commitment_cost,
            self.entropy_loss_ratio,
            self.entropy_temperature,
            self.entropy_loss_type,
        )
        self.decoder = Decoder(
            self.filters, mults, self.num_res_blocks, self.activation, self.dtype
        )

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """images [B, H, W, 3] in [-1, 1] -> (z_q [B, h, w, D], ids [B, h, w], losses)."""
        chex.assert_rank(images, 4)
        x = constrain(images, "batch", "height", "width", None).astype(jnp.float32)
        return self.quantizer(self.encoder((x + 1.0) / 2.0))

    def tokenize(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> flat token ids [B, h * w] (row-major), int32."""
        _, ids, _ = self.encode(images)
        return ids.reshape(ids.shape[0], -1)

    def decode_codes(self, z_q: jax.Array) -> jax.Array:
        """Codewords [B, h, w, D] -> images [B, H, W, 3] in [-1, 1] (not clipped)."""
        return 2.0 * self.decoder(z_q) - 1.0

    def decode_ids(self, ids: jax.Array) -> jax.Array:
        """Token ids [B, h, w] or [B, h * w] (square grid) -> images [B, H, W, 3] in [-1, 1]."""
        if ids.ndim == 2:
            side = int(round(ids.shape[1] ** 0.5))
            chex.assert_equal(side * side, ids.shape[1])
            ids = ids.reshape(ids.shape[0], side, side)
        return self.decode_codes(self.quantizer.lookup(ids))

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Reconstruction [B, H, W, 3] in [-1, 1], ids [B, h, w] and quantiser losses."""
        z_q, ids, losses = self.encode(images)
        return self.decode_codes(z_q), ids, losses


_INTS = ("filters", "num_res_blocks", "embedding_dim", "codebook_size")
_FLOATS = ("commitment_cost", "entropy_loss_ratio", "entropy_temperature")


def build(m: Mapping[str, Any]) -> MaskGITVQGAN:
    """A MaskGITVQGAN from a model block (ConfigDict or dict) with `kind="maskgit"`; absent
    fields take MaskGIT's released-tokenizer values (`MaskGITVQGAN`'s defaults)."""
    kind = m.get("kind", "maskgit")
    if kind != "maskgit":
        raise UsageError(f"Model block kind {kind!r} is not 'maskgit'.")
    for name, valid in (("quantizer", "vq"), ("norm_type", "GN")):
        if m.get(name, valid) != valid:
            raise UsageError(f"MaskGITVQGAN supports {name}={valid!r} only, not {m[name]!r}.")
    defaults = MaskGITVQGAN()
    fields: dict[str, Any] = {name: int(m.get(name, getattr(defaults, name))) for name in _INTS}
    fields.update({name: float(m.get(name, getattr(defaults, name))) for name in _FLOATS})
    fields["channel_multipliers"] = tuple(
        int(c) for c in m.get("channel_multipliers", defaults.channel_multipliers)
    )
    fields["conv_downsample"] = bool(m.get("conv_downsample", defaults.conv_downsample))
    fields["activation"] = str(m.get("activation", defaults.activation))
    fields["entropy_loss_type"] = str(m.get("entropy_loss_type", defaults.entropy_loss_type))
    return MaskGITVQGAN(**fields, dtype=get_dtype(m.get("dtype", "float32")))
