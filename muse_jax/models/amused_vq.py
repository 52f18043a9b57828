"""aMUSEd's VQ-GAN tokenizer (diffusers' `VQModel`) in Flax, behind the `VQGAN` interface.

The architecture follows diffusers' `VQModel` as aMUSEd configures it (`DownEncoderBlock2D` /
`UpDecoderBlock2D` blocks, group norm, plain Euclidean codebook), so the published weights of
amused/amused-256 and amused-512 load unchanged (`muse_jax.convert.diffusers_vq`). Layout is
NHWC. Images cross the interface in this project's [-1, 1] convention; the model itself sees
[0, 1] as aMUSEd does, and decoded images come back as 2 * output - 1 without clipping.
Decoding token ids follows `VQModel.decode(ids, force_not_quantize=True)` with
`lookup_from_codebook=True`, the path aMUSEd's pipeline takes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.errors import UsageError
from muse_jax.models import arg_reductions
from muse_jax.models.layers import (
    Dtype,
    constrain,
    conv_general_dilated,
    dense,
    get_dtype,
    partitioned,
)

_CONV_AXES = ("height", "width", "conv_in", "conv_out")
_EPS = 1e-6  # diffusers' resnet_eps for every GroupNorm of the VQ model.
_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
_ACTIVATIONS = ("silu", "swish")  # diffusers' names for the same SiLU.

# diffusers' `VQModel` defaults, for config.json files that leave a field out.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 3,
    "num_vq_embeddings": 256,
    "norm_num_groups": 32,
    "vq_embed_dim": None,
    "norm_type": "group",
    "mid_block_add_attention": True,
    "lookup_from_codebook": False,
}


def check_config(
    *,
    in_channels: int,
    out_channels: int,
    block_out_channels: Sequence[int],
    layers_per_block: int,
    latent_channels: int,
    num_vq_embeddings: int,
    norm_num_groups: int,
    vq_embed_dim: int | None,
    act_fn: str,
    norm_type: str,
    lookup_from_codebook: bool,
    down_block_types: Sequence[str] = (),
    up_block_types: Sequence[str] = (),
    **_: Any,
) -> None:
    """Raises ValueError (one line) for a config outside what aMUSEd's VQ model uses."""
    levels = len(block_out_channels)
    if levels < 1:
        raise UsageError("block_out_channels needs at least one level.")
    for name, types, want in (
        ("down_block_types", down_block_types, _DOWN_BLOCK),
        ("up_block_types", up_block_types, _UP_BLOCK),
    ):
        if types and (len(types) != levels or any(t != want for t in types)):
            raise UsageError(
                f"{name} {list(types)} is not supported: only {levels} x {want!r} "
                "(one per block_out_channels entry)."
            )
    if act_fn not in _ACTIVATIONS:
        raise UsageError(f"act_fn {act_fn!r} is not supported; valid: {_ACTIVATIONS}.")
    if norm_type != "group":
        raise UsageError(f"norm_type {norm_type!r} is not supported; only 'group' (aMUSEd's).")
    if not lookup_from_codebook:
        raise UsageError(
            "lookup_from_codebook=False is not supported: ids decode via the codebook."
        )
    for name, value in (
        ("in_channels", in_channels),
        ("out_channels", out_channels),
        ("layers_per_block", layers_per_block),
        ("latent_channels", latent_channels),
        ("num_vq_embeddings", num_vq_embeddings),
        ("norm_num_groups", norm_num_groups),
        ("vq_embed_dim", latent_channels if vq_embed_dim is None else vq_embed_dim),
    ):
        if int(value) <= 0:
            raise UsageError(f"{name} is {value}; it must be positive.")
    bad = [c for c in block_out_channels if c <= 0 or c % norm_num_groups]
    if bad:
        raise UsageError(
            f"block_out_channels {list(block_out_channels)}: {bad[0]} is not a positive "
            f"multiple of norm_num_groups {norm_num_groups}."
        )


def _conv(
    features: int,
    kernel: int,
    dtype: Dtype,
    name: str,
    strides: int = 1,
    padding: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> nn.Conv:
    """A torch-style Conv2d: symmetric (kernel - 1) / 2 padding unless `padding` says."""
    pad = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=padding if padding is not None else ((pad, pad), (pad, pad)),
        dtype=dtype,
        conv_general_dilated=conv_general_dilated(dtype),
        kernel_init=partitioned(
            nn.initializers.variance_scaling(1.0, "fan_in", "uniform"), *_CONV_AXES
        ),
        bias_init=partitioned(nn.initializers.zeros, "conv_out"),
        name=name,
    )


def _group_norm(groups: int, dtype: Dtype, name: str) -> nn.GroupNorm:
    # Two-pass variance, as torch computes it: E[x^2] - E[x]^2 loses digits on offset maps.
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=_EPS,
        dtype=dtype,
        use_fast_variance=False,
        scale_init=partitioned(nn.initializers.ones, "conv_out"),
        bias_init=partitioned(nn.initializers.zeros, "conv_out"),
        name=name,
    )


class ResnetBlock(nn.Module):
    """diffusers' `ResnetBlock2D` without a time embedding: norm-act-conv twice plus a
    (1x1-projected when the width changes) skip."""

    features: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(_group_norm(self.groups, self.dtype, "norm1")(x))
        h = _conv(self.features, 3, self.dtype, "conv1")(h)
        h = nn.silu(_group_norm(self.groups, self.dtype, "norm2")(h))
        h = _conv(self.features, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class SpatialAttention(nn.Module):
    """The mid block's single-head self-attention over all positions, with a group-normed
    input and a residual connection (diffusers' `Attention` from the deprecated attn block)."""

    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        h = _group_norm(self.groups, self.dtype, "group_norm")(x).reshape(b, height * width, c)
        q = dense(c, "embed", "mlp", self.dtype, "to_q")(h)
        k = dense(c, "embed", "mlp", self.dtype, "to_k")(h)
        v = dense(c, "embed", "mlp", self.dtype, "to_v")(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * (c**-0.5), axis=-1)  # float32, as upcast_softmax.
        out = jnp.einsum("bqk,bkc->bqc", weights.astype(v.dtype), v)
        out = dense(c, "mlp", "embed", self.dtype, "to_out")(out)
        return x + out.reshape(b, height, width, c).astype(x.dtype)


class MidBlock(nn.Module):
    """Resnet, optional attention, resnet at the lowest resolution (`UNetMidBlock2D`)."""

    groups: int
    add_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, self.dtype, name="res_0")(x)
        if self.add_attention:
            x = SpatialAttention(self.groups, self.dtype, name="attn_0")(x)
        return ResnetBlock(c, self.groups, self.dtype, name="res_1")(x)


class Encoder(nn.Module):
    """Images [B, H, W, in] in [0, 1] -> latents [B, H / f, W / f, latent_channels]."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    groups: int
    add_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        chans = tuple(self.block_out_channels)
        x = _conv(chans[0], 3, self.dtype, "conv_in")(x)
        for level, c in enumerate(chans):
            for j in range(self.layers_per_block):
                x = ResnetBlock(c, self.groups, self.dtype, name=f"down_{level}_res_{j}")(x)
            if level < len(chans) - 1:
                # diffusers' Downsample2D with padding=0: pad right/bottom by one, then a
                # stride-2 3x3 convolution (not torch's or XLA's symmetric "same").
                x = _conv(c, 3, self.dtype, f"down_{level}_downsample", 2, ((0, 1), (0, 1)))(x)
        x = MidBlock(self.groups, self.add_attention, self.dtype, name="mid")(x)
        x = nn.silu(_group_norm(self.groups, self.dtype, "conv_norm_out")(x))
        return _conv(self.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    """Latents [B, h, w, latent_channels] -> images [B, h * f, w * f, out] (about [0, 1])."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    groups: int
    add_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        chans = tuple(self.block_out_channels)[::-1]
        x = _conv(chans[0], 3, self.dtype, "conv_in")(z)
        x = MidBlock(self.groups, self.add_attention, self.dtype, name="mid")(x)
        for level, c in enumerate(chans):
            for j in range(self.layers_per_block + 1):  # The decoder has one block more.
                x = ResnetBlock(c, self.groups, self.dtype, name=f"up_{level}_res_{j}")(x)
            if level < len(chans) - 1:  # Nearest x2, then a 3x3 convolution (Upsample2D).
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
                x = _conv(c, 3, self.dtype, f"up_{level}_upsample")(x)
        x = nn.silu(_group_norm(self.groups, self.dtype, "conv_norm_out")(x))
        return _conv(self.out_channels, 3, self.dtype, "conv_out")(x).astype(jnp.float32)


class Codebook(nn.Module):
    """The VQ codebook with diffusers' nearest-codeword (Euclidean) lookup and losses."""

    num_embeddings: int
    embedding_dim: int
    beta: float = 0.25
    legacy: bool = True

    def setup(self) -> None:
        bound = 1.0 / self.num_embeddings  # diffusers' init: uniform(-1 / n, 1 / n).

        def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        self.codebook = self.param(
            "codebook",
            partitioned(init, "codebook", None),
            (self.num_embeddings, self.embedding_dim),
        )

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """z [..., D] -> (z_q with straight-through gradients, ids [...], losses)."""
        z = z.astype(jnp.float32)
        cb = self.codebook.astype(jnp.float32)
        flat = z.reshape(-1, z.shape[-1])
        dist = (
            jnp.sum(flat**2, -1, keepdims=True)
            - 2.0 * jnp.dot(flat, cb.T, precision=jax.lax.Precision.HIGHEST)
            + jnp.sum(cb**2, -1)[None]
        )
        ids = arg_reductions.argmin(dist).reshape(z.shape[:-1])
        z_q = jnp.take(cb, ids, axis=0)
        to_codes = jnp.mean((z_q - jax.lax.stop_gradient(z)) ** 2)  # Moves the codebook.
        commitment = jnp.mean((jax.lax.stop_gradient(z_q) - z) ** 2)  # Moves the encoder.
        # diffusers' VectorQuantizer (legacy, as VQModel builds it) weighs the terms swapped.
        if self.legacy:
            total = commitment + self.beta * to_codes
        else:
            total = to_codes + self.beta * commitment
        losses = {"codebook": total, "commitment": commitment, "encodings": z}
        return z + jax.lax.stop_gradient(z_q - z), ids, losses

    def lookup(self, ids: jax.Array) -> jax.Array:
        """ids [...] -> codewords [..., D] (`get_codebook_entry`)."""
        return jnp.take(self.codebook.astype(jnp.float32), ids, axis=0)


class AmusedVQ(nn.Module):
    """aMUSEd's VQ model: images in [-1, 1] <-> token ids, with `VQGAN`'s interface."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 3
    num_vq_embeddings: int = 256
    norm_num_groups: int = 32
    vq_embed_dim: int | None = None  # None: latent_channels, as in diffusers.
    mid_block_add_attention: bool = True
    lookup_from_codebook: bool = True
    act_fn: str = "silu"
    norm_type: str = "group"
    down_block_types: Sequence[str] = ()  # Empty: DownEncoderBlock2D at every level.
    up_block_types: Sequence[str] = ()  # Empty: UpDecoderBlock2D at every level.
    commitment_cost: float = 0.25  # diffusers' beta.
    legacy_loss: bool = True  # diffusers' VectorQuantizer(legacy=True) weighting of the losses.
    dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def codebook_size(self) -> int:
        return self.num_vq_embeddings

    @property
    def embed_dim(self) -> int:
        return self.latent_channels if self.vq_embed_dim is None else self.vq_embed_dim

    def setup(self) -> None:
        check_config(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            num_vq_embeddings=self.num_vq_embeddings,
            norm_num_groups=self.norm_num_groups,
            vq_embed_dim=self.vq_embed_dim,
            act_fn=self.act_fn,
            norm_type=self.norm_type,
            lookup_from_codebook=self.lookup_from_codebook,
            down_block_types=self.down_block_types,
            up_block_types=self.up_block_types,
        )
        chans = tuple(self.block_out_channels)
        groups, attn = self.norm_num_groups, self.mid_block_add_attention
        self.encoder = Encoder(
            chans, self.layers_per_block, self.latent_channels, groups, attn, self.dtype
        )
        self.quant_conv = _conv(self.embed_dim, 1, self.dtype, "quant_conv")
        self.quantizer = Codebook(
            self.num_vq_embeddings, self.embed_dim, self.commitment_cost, self.legacy_loss
        )
        self.post_quant_conv = _conv(self.latent_channels, 1, self.dtype, "post_quant_conv")
        self.decoder = Decoder(
            chans, self.layers_per_block, self.out_channels, groups, attn, self.dtype
        )

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """images [B, H, W, 3] in [-1, 1] -> (z_q [B, h, w, D], ids [B, h, w], losses)."""
        chex.assert_rank(images, 4)
        x = (constrain(images, "batch", "height", "width", None).astype(jnp.float32) + 1.0) / 2.0
        z = self.quant_conv(self.encoder(x))
        return self.quantizer(z)

    def tokenize(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> flat token ids [B, h * w] (row-major), int32."""
        _, ids, _ = self.encode(images)
        return ids.reshape(ids.shape[0], -1).astype(jnp.int32)

    def decode_codes(self, z_q: jax.Array) -> jax.Array:
        """Codewords [B, h, w, D] -> images [B, H, W, 3] in [-1, 1] (not clipped)."""
        return 2.0 * self.decoder(self.post_quant_conv(z_q)) - 1.0

    def decode_ids(self, ids: jax.Array) -> jax.Array:
        """Token ids [B, h, w] or [B, h * w] (square grid) -> images [B, H, W, 3] in [-1, 1]."""
        if ids.ndim == 2:
            side = int(round(ids.shape[1] ** 0.5))
            chex.assert_equal(side * side, ids.shape[1])
            ids = ids.reshape(ids.shape[0], side, side)
        return self.decode_codes(self.quantizer.lookup(ids))

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Reconstruction [B, H, W, 3], ids [B, h, w] and quantiser losses."""
        z_q, ids, losses = self.encode(images)
        return self.decode_codes(z_q), ids, losses


_FIELDS = tuple(DIFFUSERS_DEFAULTS) + ("down_block_types", "up_block_types")


def build(m: Mapping[str, Any]) -> AmusedVQ:
    """An AmusedVQ from a model block (ConfigDict or dict) with `kind="amused_vq"`, diffusers'
    field names, `codebook_size` (= num_vq_embeddings) and `dtype`."""
    kind = m.get("kind", "amused_vq")
    if kind != "amused_vq":
        raise UsageError(f"Model block kind {kind!r} is not 'amused_vq'.")
    fields: dict[str, Any] = {}
    for name in _FIELDS:
        value = m.get(name, DIFFUSERS_DEFAULTS.get(name, ()))
        if name in ("block_out_channels", "down_block_types", "up_block_types"):
            value = tuple(value)
        fields[name] = value
    fields["lookup_from_codebook"] = bool(m.get("lookup_from_codebook", True))
    size = m.get("codebook_size", fields["num_vq_embeddings"])
    if size != fields["num_vq_embeddings"]:
        raise UsageError(
            f"codebook_size {size} differs from num_vq_embeddings {fields['num_vq_embeddings']}."
        )
    check_config(**fields)
    return AmusedVQ(**fields, dtype=get_dtype(m.get("dtype", "float32")))


def config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The model block for a diffusers `VQModel` config.json dict (missing fields take
    diffusers' defaults); ConversionError (one line) for a config aMUSEd's VQ model is not."""
    from muse_jax.errors import ConversionError

    name = cfg.get("_class_name", "VQModel")
    if name != "VQModel":
        raise ConversionError(f"The config describes a {name}, not a diffusers VQModel.")
    fields = {k: cfg.get(k, v) for k, v in DIFFUSERS_DEFAULTS.items()}
    fields["block_out_channels"] = tuple(fields["block_out_channels"])
    levels = len(fields["block_out_channels"])
    fields["down_block_types"] = tuple(cfg.get("down_block_types", (_DOWN_BLOCK,) * levels))
    fields["up_block_types"] = tuple(cfg.get("up_block_types", (_UP_BLOCK,) * levels))
    try:
        check_config(**fields)
    except ValueError as e:
        raise ConversionError(f"Unsupported VQModel config: {e}") from None
    if fields["vq_embed_dim"] is None:
        fields["vq_embed_dim"] = fields["latent_channels"]
    return {
        "kind": "amused_vq",
        "codebook_size": fields["num_vq_embeddings"],
        "dtype": "float32",
        **fields,
        "block_out_channels": list(fields["block_out_channels"]),
        "down_block_types": list(fields["down_block_types"]),
        "up_block_types": list(fields["up_block_types"]),
    }
