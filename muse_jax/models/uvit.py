"""aMUSEd's transformer (diffusers' `UVit2DModel`) in Flax, NHWC, with logical axes.

A U-ViT over the token grid: token embedding, a block of ConvNeXt + cross-attention layers,
a stack of transformer layers (self-attention, cross-attention, GEGLU MLP, each behind an
RMS/LayerNorm modulated by the pooled text and micro-conditioning embedding), a mirrored block
and a 1x1 convolution head over the codebook. Parameters follow diffusers' module names (lists
as `name_i`) so `muse_jax.convert.diffusers_uvit` maps its weights one to one.

Everything that depends only on the prompt and micro-conditions (projected text, conditioning
embedding, every cross-attention's keys/values, every norm's scale/shift) is computed once by
`context`; each decoding step then calls `logits` with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.errors import ConversionError, UsageError
from muse_jax.models import attention as attention_lib
from muse_jax.models import layers, precision
from muse_jax.models.layers import Dtype, constrain, partitioned

Context = dict[str, Any]  # `UVit2D.context`'s output: arrays with a leading batch axis.

_CONV_AXES = ("height", "width", "conv_in", "conv_out")


def _gelu(x: jax.Array) -> jax.Array:
    """torch's default (erf) GELU, as diffusers uses."""
    return jax.nn.gelu(x, approximate=False)


class Linear(nn.Module):
    """Dense over the last `in_dims` input axes to `features`, bias optional, kernel created at
    its final shape ([*inputs, *features]) with logical names `axes`."""

    features: tuple[int, ...]
    axes: tuple[str, ...]
    use_bias: bool
    dtype: Dtype = jnp.float32
    in_dims: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inputs = x.shape[x.ndim - self.in_dims :]
        flat = (math.prod(inputs), math.prod(self.features))

        def kernel_init(rng, shape, dtype=jnp.float32):
            return jnp.reshape(layers.dense_init()(rng, flat, dtype), shape)

        kernel = self.param(
            "kernel", partitioned(kernel_init, *self.axes), inputs + tuple(self.features)
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias",
                partitioned(nn.initializers.zeros, *self.axes[self.in_dims :]),
                tuple(self.features),
            )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
        y = layers.dot_general(self.dtype, self.axes)(x, kernel, (contract, ((), ())))
        return y if bias is None else y + bias


class Conv1x1(nn.Module):
    """A 1x1 convolution over NHWC (or [..., C]) input: a Dense whose kernel keeps torch's
    convolution layout ([1, 1, in, out]) and the convolution axes."""

    features: int
    use_bias: bool
    dtype: Dtype = jnp.float32
    out_axis: str = "conv_out"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axes = (*_CONV_AXES[:3], self.out_axis)
        kernel = self.param(
            "kernel",
            partitioned(nn.initializers.lecun_normal(), *axes),
            (1, 1, x.shape[-1], self.features),
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias", partitioned(nn.initializers.zeros, self.out_axis), (self.features,)
            )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        y = layers.dot_general(self.dtype, axes[2:])(x, kernel[0, 0], dims)
        return y if bias is None else y + bias


class Norm(nn.Module):
    """RMSNorm (diffusers' `RMSNorm`) or LayerNorm over the last axis, statistics in float32.

    `affine`: a learned scale ("scale"); `bias` (LayerNorm, or RMSNorm with affine): a learned
    offset ("bias"). The result is cast to `dtype`.
    """

    eps: float
    kind: str = "rms"  # "rms" | "layer"
    affine: bool = True
    bias: bool = False
    dtype: Dtype = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.kind == "layer":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(var + self.eps)
        width = (x.shape[-1],)
        if self.affine:
            y = y * self.param("scale", partitioned(nn.initializers.ones, self.axis_name), width)
            if self.bias:
                y = y + self.param(
                    "bias", partitioned(nn.initializers.zeros, self.axis_name), width
                )
        return y.astype(self.dtype)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN over NHWC: each channel scaled by its spatial L2 norm relative to the
    channels' mean, gamma * (x * n) + beta + x."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = (x.shape[-1],)
        gamma = self.param("gamma", partitioned(nn.initializers.zeros, "mlp"), width)
        beta = self.param("beta", partitioned(nn.initializers.zeros, "mlp"), width)
        x32 = x.astype(jnp.float32)
        gx = jnp.sqrt(jnp.sum(jnp.square(x32), axis=(1, 2), keepdims=True))
        nx = gx / (jnp.mean(gx, axis=-1, keepdims=True) + 1e-6)
        return (gamma * (x32 * nx) + beta + x32).astype(self.dtype)


def _constrain_kv(x: jax.Array) -> jax.Array:
    return constrain(x, "batch", "length", "heads", "kv")


class Attention(nn.Module):
    """diffusers' `Attention` (no norms, no mask): queries from `x`, keys/values from a context
    projected once by `project_kv`; dropout on the output projection (diffusers' to_out[1])."""

    width: int
    num_heads: int
    use_bias: bool
    out_bias: bool
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    implementation: str = "auto"

    def setup(self) -> None:
        heads = (self.num_heads, self.width // self.num_heads)
        qkv_axes = ("embed", "heads", "kv")
        self.to_q = Linear(heads, qkv_axes, self.use_bias, self.dtype)
        self.to_k = Linear(heads, qkv_axes, self.use_bias, self.dtype)
        self.to_v = Linear(heads, qkv_axes, self.use_bias, self.dtype)
        self.to_out = Linear(
            (self.width,), ("heads", "kv", "embed"), self.out_bias, self.dtype, in_dims=2
        )
        self.drop = nn.Dropout(self.dropout)

    def project_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, S, C] -> (keys, values), each [B, S, heads, head_dim]."""
        return _constrain_kv(self.to_k(context)), _constrain_kv(self.to_v(context))

    def __call__(
        self, x: jax.Array, kv: tuple[jax.Array, jax.Array] | None, deterministic: bool
    ) -> jax.Array:
        """[B, L, width] attending to `kv` (or to itself when None) -> [B, L, width]."""
        if kv is None:
            kv = self.project_kv(x)
        k, v = kv
        q = _constrain_kv(self.to_q(x))
        out = attention_lib.dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), None, self.implementation
        )
        return self.drop(self.to_out(out), deterministic=deterministic)


class AdaNorm(nn.Module):
    """diffusers' `AdaLayerNormContinuous`: norm(x) * (1 + scale) + shift, scale/shift a linear
    map of silu(conditioning). `modulation` runs once per prompt."""

    width: int
    eps: float
    kind: str
    affine: bool
    use_bias: bool
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.linear = Linear((2 * self.width,), ("embed", "mlp"), self.use_bias, self.dtype)
        bias = self.use_bias and self.kind == "layer"  # torch LayerNorm(bias=use_bias)
        self.norm = Norm(self.eps, self.kind, self.affine, bias, self.dtype)

    def modulation(self, cond: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[B, D] -> (scale, shift), each [B, width]."""
        scale, shift = jnp.split(self.linear(nn.silu(cond)), 2, axis=-1)
        return scale, shift

    def __call__(self, x: jax.Array, mod: tuple[jax.Array, jax.Array]) -> jax.Array:
        scale, shift = mod
        return self.norm(x) * (1 + scale[:, None, :]) + shift[:, None, :]


class TransformerLayer(nn.Module):
    """diffusers' `BasicTransformerBlock` as UVit2D configures it: AdaNorm(rms) self-attention,
    AdaNorm(rms) cross-attention, AdaNorm(layer) GEGLU feed-forward."""

    width: int
    num_heads: int
    intermediate_size: int
    use_bias: bool
    eps: float
    affine: bool
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    def setup(self) -> None:
        ada = lambda kind: AdaNorm(
            self.width, self.eps, kind, self.affine, self.use_bias, self.dtype
        )
        attn = lambda: Attention(
            self.width, self.num_heads, self.use_bias, self.use_bias, self.dropout, self.dtype,
            self.attention,
        )  # fmt: skip
        self.norm1, self.attn1 = ada("rms"), attn()
        self.norm2, self.attn2 = ada("rms"), attn()
        self.norm3 = ada("layer")
        self.ff_proj = Linear(
            (2 * self.intermediate_size,), ("embed", "mlp"), self.use_bias, self.dtype
        )
        self.ff_out = Linear((self.width,), ("mlp", "embed"), self.use_bias, self.dtype)
        self.drop = nn.Dropout(self.dropout)

    def context(self, text: jax.Array, cond: jax.Array) -> Context:
        return {
            "kv": self.attn2.project_kv(text),
            "norm1": self.norm1.modulation(cond),
            "norm2": self.norm2.modulation(cond),
            "norm3": self.norm3.modulation(cond),
        }

    def __call__(self, x: jax.Array, ctx: Context, deterministic: bool) -> jax.Array:
        x = x + self.attn1(self.norm1(x, ctx["norm1"]), None, deterministic)
        x = x + self.attn2(self.norm2(x, ctx["norm2"]), ctx["kv"], deterministic)
        h, gate = jnp.split(self.ff_proj(self.norm3(x, ctx["norm3"])), 2, axis=-1)
        h = constrain(h * _gelu(gate), "batch", "length", "mlp")
        h = self.drop(h, deterministic=deterministic)
        x = x + self.ff_out(h)
        return constrain(x, "batch", "length", "embed")


class ConvNextBlock(nn.Module):
    """diffusers' `ConvNextBlock` over NHWC: depthwise 3x3, RMSNorm, 4x MLP with GRN, residual,
    then a scale/shift from the conditioning embedding (computed per prompt by `context`)."""

    channels: int
    eps: float
    affine: bool
    use_bias: bool
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.depthwise = nn.Conv(
            self.channels,
            (3, 3),
            padding=((1, 1), (1, 1)),
            feature_group_count=self.channels,
            use_bias=self.use_bias,
            dtype=self.dtype,
            conv_general_dilated=layers.conv_general_dilated(self.dtype),
            kernel_init=partitioned(nn.initializers.lecun_normal(), *_CONV_AXES),
            bias_init=partitioned(nn.initializers.zeros, "conv_out"),
        )
        self.norm = Norm(self.eps, "rms", self.affine, dtype=self.dtype)
        hidden = 4 * self.channels
        self.channelwise_linear_1 = Linear((hidden,), ("embed", "mlp"), self.use_bias, self.dtype)
        self.channelwise_norm = GlobalResponseNorm(self.dtype)
        self.channelwise_linear_2 = Linear(
            (self.channels,), ("mlp", "embed"), self.use_bias, self.dtype
        )
        self.drop = nn.Dropout(self.dropout)
        self.cond_embeds_mapper = Linear(
            (2 * self.channels,), ("embed", "mlp"), self.use_bias, self.dtype
        )

    def context(self, cond: jax.Array) -> tuple[jax.Array, jax.Array]:
        scale, shift = jnp.split(self.cond_embeds_mapper(nn.silu(cond)), 2, axis=-1)
        return scale, shift

    def __call__(
        self, x: jax.Array, mod: tuple[jax.Array, jax.Array], deterministic: bool
    ) -> jax.Array:
        h = self.norm(self.depthwise(x))
        h = _gelu(self.channelwise_linear_1(h))
        h = self.channelwise_linear_2(self.channelwise_norm(h))
        x = x + self.drop(h, deterministic=deterministic)
        scale, shift = mod
        return x * (1 + scale[:, None, None, :]) + shift[:, None, None, :]


class ConvAttentionBlock(nn.Module):
    """diffusers' `SkipFFTransformerBlock`: two RMSNorm'd attentions, both to the text (mapped
    to the block's width by silu + `kv_mapper` when the widths differ), no feed-forward."""

    channels: int
    num_heads: int
    text_width: int
    use_bias: bool
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    def setup(self) -> None:
        if self.text_width != self.channels:
            self.kv_mapper = Linear(
                (self.channels,), ("context_embed", "embed"), self.use_bias, self.dtype
            )
        attn = lambda: Attention(
            self.channels, self.num_heads, self.use_bias, self.use_bias, self.dropout,
            self.dtype, self.attention,
        )  # fmt: skip
        # diffusers builds these norms with its defaults: eps 1e-6 and a scale, whatever the
        # model's layer_norm_eps and ln_elementwise_affine.
        self.norm1, self.attn1 = Norm(1e-6, dtype=self.dtype), attn()
        self.norm2, self.attn2 = Norm(1e-6, dtype=self.dtype), attn()

    def context(self, text: jax.Array) -> Context:
        if self.text_width != self.channels:
            text = self.kv_mapper(nn.silu(text))
        return {"kv1": self.attn1.project_kv(text), "kv2": self.attn2.project_kv(text)}

    def __call__(self, x: jax.Array, ctx: Context, deterministic: bool) -> jax.Array:
        x = x + self.attn1(self.norm1(x), ctx["kv1"], deterministic)
        x = x + self.attn2(self.norm2(x), ctx["kv2"], deterministic)
        return constrain(x, "batch", "length", "embed")


class Downsample(nn.Module):
    """RMSNorm, then a 2x2 stride-2 convolution over the grid padded by one row/column at the
    bottom/right (diffusers' `Downsample2D(padding=0, kernel_size=2)`)."""

    channels: int
    eps: float
    affine: bool
    use_bias: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Norm(self.eps, "rms", self.affine, dtype=self.dtype, name="norm")(x)
        return nn.Conv(
            self.channels,
            (2, 2),
            strides=(2, 2),
            padding=((0, 1), (0, 1)),
            use_bias=self.use_bias,
            dtype=self.dtype,
            conv_general_dilated=layers.conv_general_dilated(self.dtype),
            kernel_init=partitioned(nn.initializers.lecun_normal(), *_CONV_AXES),
            bias_init=partitioned(nn.initializers.zeros, "conv_out"),
            name="conv",
        )(x)


class Upsample(nn.Module):
    """RMSNorm, then a 2x2 stride-2 transposed convolution (diffusers' `Upsample2D` with
    `use_conv_transpose`, kernel 2, padding 0): each input cell becomes a 2x2 patch."""

    channels: int
    eps: float
    affine: bool
    use_bias: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Norm(self.eps, "rms", self.affine, dtype=self.dtype, name="norm")(x)
        conv = _ConvTranspose2x2(self.channels, self.use_bias, self.dtype, name="conv")
        return conv(x)


class _ConvTranspose2x2(nn.Module):
    """Kernel 2, stride 2, no padding: out[2i + p, 2j + q] = x[i, j] @ kernel[p, q] (+ bias)."""

    features: int
    use_bias: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            partitioned(nn.initializers.lecun_normal(), *_CONV_AXES),
            (2, 2, x.shape[-1], self.features),
        )
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        einsum = precision.accumulating_in_float32(jnp.einsum, self.dtype)
        y = einsum("bhwi,pqio->bhpwqo", x, kernel, preferred_element_type=None)
        b, h, _, w, _, c = y.shape
        y = y.reshape(b, 2 * h, 2 * w, c)
        if self.use_bias:
            bias = self.param(
                "bias", partitioned(nn.initializers.zeros, "conv_out"), (self.features,)
            )
            y = y + bias.astype(y.dtype)
        return y


class UVitBlock(nn.Module):
    """diffusers' `UVitBlock`: optional downsampling, `num_res_blocks` x (ConvNeXt, attention
    to the text), optional upsampling. NHWC in and out."""

    channels: int
    num_res_blocks: int
    text_width: int
    num_heads: int
    eps: float
    affine: bool
    use_bias: bool
    hidden_dropout: float
    attention_dropout: float
    down: bool
    up: bool
    dtype: Dtype = jnp.float32
    attention: str = "auto"

    def setup(self) -> None:
        args = (self.channels, self.eps, self.affine, self.use_bias)
        if self.down:
            self.downsample = Downsample(*args, self.dtype)
        self.res_blocks = [
            ConvNextBlock(*args, self.hidden_dropout, self.dtype)
            for _ in range(self.num_res_blocks)
        ]
        self.attention_blocks = [
            ConvAttentionBlock(
                self.channels,
                self.num_heads,
                self.text_width,
                self.use_bias,
                self.attention_dropout,
                self.dtype,
                self.attention,
            )  # fmt: skip
            for _ in range(self.num_res_blocks)
        ]
        if self.up:
            self.upsample = Upsample(*args, self.dtype)

    def context(self, text: jax.Array, cond: jax.Array) -> Context:
        return {
            "res": [block.context(cond) for block in self.res_blocks],
            "attn": [block.context(text) for block in self.attention_blocks],
        }

    def __call__(self, x: jax.Array, ctx: Context, deterministic: bool) -> jax.Array:
        if self.down:
            x = self.downsample(x)
        for res, attn, res_ctx, attn_ctx in zip(
            self.res_blocks, self.attention_blocks, ctx["res"], ctx["attn"]
        ):
            x = res(x, res_ctx, deterministic)
            b, h, w, c = x.shape
            seq = constrain(x.reshape(b, h * w, c), "batch", "length", "embed")
            x = attn(seq, attn_ctx, deterministic).reshape(b, h, w, c)
        if self.up:
            x = self.upsample(x)
        return x


def micro_cond_embedding(micro_conds: jax.Array, dim: int) -> jax.Array:
    """[B, N] -> [B, N * dim]: diffusers' `get_timestep_embedding(flip_sin_to_cos=True,
    downscale_freq_shift=0)` of every micro-condition, in float32."""
    half = dim // 2
    # The exponents as diffusers rounds them (float32), exponentiated exactly: XLA's float32 exp
    # may differ from torch's by an ulp, which the large arguments (sizes in pixels) amplify.
    exponent = (-math.log(10000) * np.arange(half, dtype=np.float32)) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = micro_conds.reshape(-1).astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb.reshape(micro_conds.shape[0], -1)


class UVit2D(nn.Module):
    """diffusers' `UVit2DModel` (aMUSEd); fields as its config. See the module docstring.

    `grid_size`: the token grid's side when it differs from `sample_size` (0: `sample_size`).
    The [MASK] token is id `vocab_size - 1`; logits cover the `codebook_size` image tokens.
    """

    hidden_size: int = 1024
    use_bias: bool = False
    hidden_dropout: float = 0.0
    cond_embed_dim: int = 768
    micro_cond_encode_dim: int = 256
    micro_cond_embed_dim: int = 1280
    encoder_hidden_size: int = 768
    vocab_size: int = 8256
    codebook_size: int = 8192
    in_channels: int = 768
    block_out_channels: int = 768
    num_res_blocks: int = 3
    downsample: bool = False
    upsample: bool = False
    block_num_heads: int = 12
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    attention_dropout: float = 0.0
    intermediate_size: int = 2816
    layer_norm_eps: float = 1e-6
    ln_elementwise_affine: bool = True
    sample_size: int = 64
    grid_size: int = 0
    dtype: Dtype = jnp.float32
    attention: str = "auto"  # See `muse_jax.models.attention`.

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1

    @property
    def grid(self) -> int:
        return self.grid_size or self.sample_size

    @property
    def seq_len(self) -> int:
        return self.grid**2

    @property
    def num_micro_conds(self) -> int:
        return self.micro_cond_embed_dim // self.micro_cond_encode_dim

    def setup(self) -> None:
        eps, affine, bias, dtype = (
            self.layer_norm_eps, self.ln_elementwise_affine, self.use_bias, self.dtype
        )  # fmt: skip
        self.encoder_proj = Linear((self.hidden_size,), ("context_embed", "embed"), bias, dtype)
        self.encoder_proj_layer_norm = Norm(eps, "rms", affine, dtype=dtype)
        self.embed = _ConvEmbed(self.vocab_size, self.in_channels, self.block_out_channels,
                                eps, affine, bias, dtype)  # fmt: skip
        self.cond_embed = _CondEmbed(self.hidden_size, bias, dtype)
        block = lambda down, up: UVitBlock(
            self.block_out_channels, self.num_res_blocks, self.hidden_size, self.block_num_heads,
            eps, affine, bias, self.hidden_dropout, self.attention_dropout, down, up, dtype,
            self.attention,
        )  # fmt: skip
        self.down_block = block(self.downsample, False)
        self.project_to_hidden_norm = Norm(eps, "rms", affine, dtype=dtype)
        self.project_to_hidden = Linear((self.hidden_size,), ("mlp", "embed"), bias, dtype)
        self.transformer_layers = [
            TransformerLayer(
                self.hidden_size,
                self.num_attention_heads,
                self.intermediate_size,
                bias,
                eps,
                affine,
                self.hidden_dropout,
                dtype,
                self.attention,
            )  # fmt: skip
            for _ in range(self.num_hidden_layers)
        ]
        self.project_from_hidden_norm = Norm(eps, "rms", affine, dtype=dtype)
        self.project_from_hidden = Linear((self.block_out_channels,), ("embed", "mlp"), bias, dtype)
        self.up_block = block(False, self.upsample)
        self.mlm_layer = _ConvMlmLayer(self.in_channels, self.codebook_size, eps, affine, bias,
                                       dtype)  # fmt: skip

    def context(
        self, encoder_hidden_states: jax.Array, pooled_text_emb: jax.Array, micro_conds: jax.Array
    ) -> Context:
        """Everything that depends only on the prompt and micro-conditions, once per prompt.

        Args:
          encoder_hidden_states: [B, S, encoder_hidden_size] text hidden states.
          pooled_text_emb: [B, cond_embed_dim] pooled text embedding.
          micro_conds: [B, num_micro_conds] (aMUSEd: width, height, crop top, crop left,
            aesthetic score).
        Returns:
          A pytree, every leaf with a leading batch axis, for `logits`.
        """
        text = self.encoder_proj_layer_norm(self.encoder_proj(encoder_hidden_states))
        text = constrain(text, "batch", "length", "embed")
        micro = micro_cond_embedding(micro_conds, self.micro_cond_encode_dim)
        cond = self.cond_embed(
            jnp.concatenate([pooled_text_emb.astype(jnp.float32), micro], axis=1)
        )
        return {
            "text": text,
            "cond": cond,
            "down": self.down_block.context(text, cond),
            "layers": [layer.context(text, cond) for layer in self.transformer_layers],
            "up": self.up_block.context(text, cond),
        }

    def logits(self, tokens: jax.Array, ctx: Context, deterministic: bool = True) -> jax.Array:
        """Logits [B, L, codebook_size] (float32) for tokens [B, L], the row-major grid with
        [MASK] = `mask_id`, given `context`'s output."""
        b, length = tokens.shape
        side = self.grid
        if length != side * side:
            raise UsageError(f"{length} tokens do not fill the {side}x{side} grid.")
        if self.downsample and side % 2:
            raise UsageError(f"Downsampling needs an even grid, not {side}x{side}.")
        x = self.embed(tokens.reshape(b, side, side))
        x = self.down_block(x, ctx["down"], deterministic)
        _, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        x = self.project_to_hidden(self.project_to_hidden_norm(x))
        x = constrain(x, "batch", "length", "embed")
        for layer, layer_ctx in zip(self.transformer_layers, ctx["layers"]):
            x = layer(x, layer_ctx, deterministic)
        x = self.project_from_hidden(self.project_from_hidden_norm(x))
        x = self.up_block(x.reshape(b, h, w, c), ctx["up"], deterministic)
        logits = self.mlm_layer(x).reshape(b, -1, self.codebook_size)
        return constrain(logits, "batch", "length", "vocab").astype(jnp.float32)

    def __call__(
        self,
        tokens: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_text_emb: jax.Array,
        micro_conds: jax.Array,
        deterministic: bool = True,
    ) -> jax.Array:
        """`logits(tokens, context(encoder_hidden_states, pooled_text_emb, micro_conds))`."""
        ctx = self.context(encoder_hidden_states, pooled_text_emb, micro_conds)
        return self.logits(tokens, ctx, deterministic)


class _ConvEmbed(nn.Module):
    """Token embedding, RMSNorm, 1x1 convolution to the blocks' width: [B, H, W] -> NHWC."""

    vocab_size: int
    in_channels: int
    out_channels: int
    eps: float
    affine: bool
    use_bias: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Embed(
            self.vocab_size,
            self.in_channels,
            dtype=self.dtype,
            embedding_init=partitioned(nn.initializers.normal(0.02), "vocab", "embed"),
            name="embeddings",
        )(tokens)
        x = Norm(self.eps, "rms", self.affine, dtype=self.dtype, name="layer_norm")(x)
        return Conv1x1(self.out_channels, self.use_bias, self.dtype, name="conv")(x)


class _CondEmbed(nn.Module):
    """diffusers' `TimestepEmbedding` on [pooled text, micro-conds]: linear, silu, linear."""

    width: int
    use_bias: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Linear((self.width,), ("context_embed", "mlp"), self.use_bias, self.dtype,
                   name="linear_1")(x)  # fmt: skip
        return Linear((self.width,), ("mlp", "embed"), self.use_bias, self.dtype,
                      name="linear_2")(nn.silu(x))  # fmt: skip


class _ConvMlmLayer(nn.Module):
    """1x1 convolution, RMSNorm, 1x1 convolution to the codebook logits (NHWC)."""

    in_channels: int
    codebook_size: int
    eps: float
    affine: bool
    use_bias: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Conv1x1(self.in_channels, self.use_bias, self.dtype, name="conv1")(x)
        x = Norm(self.eps, "rms", self.affine, dtype=self.dtype, name="layer_norm")(x)
        return Conv1x1(self.codebook_size, self.use_bias, self.dtype, "vocab", name="conv2")(x)


# diffusers' UVit2DModel config fields and their defaults (its __init__ signature).
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    f.name: f.default
    for f in UVit2D.__dataclass_fields__.values()
    if f.name not in ("grid_size", "dtype", "attention", "parent", "name")
}


def example_inputs(model: UVit2D, batch: int = 1, text_len: int = 1) -> tuple[jax.Array, ...]:
    """Zero inputs of the shapes `model.init` needs: (tokens, encoder_hidden_states,
    pooled_text_emb, micro_conds)."""
    return (
        jnp.zeros((batch, model.seq_len), jnp.int32),
        jnp.zeros((batch, text_len, model.encoder_hidden_size), jnp.float32),
        jnp.zeros((batch, model.cond_embed_dim), jnp.float32),
        jnp.zeros((batch, model.num_micro_conds), jnp.float32),
    )


def build(m: Mapping[str, Any], seq_len: int | None = None) -> UVit2D:
    """A UVit2D from a model block (`kind="uvit"`, the diffusers fields, `dtype`, optional
    `attention`, `grid_size`); `seq_len` (a square) overrides the token grid."""
    kind = m.get("kind", "uvit")
    if kind != "uvit":
        raise UsageError(f"Model block kind {kind!r} is not 'uvit'.")
    fields = {k: m.get(k, default) for k, default in DIFFUSERS_DEFAULTS.items()}
    grid = int(m.get("grid_size", 0) or 0)
    if seq_len is not None:
        grid = math.isqrt(seq_len)
        if grid * grid != seq_len:
            raise UsageError(f"seq_len {seq_len} is not a square token grid.")
        if grid == fields["sample_size"]:
            grid = 0
    return UVit2D(
        **fields,
        grid_size=grid,
        dtype=layers.get_dtype(m.get("dtype", "float32")),
        attention=m.get("attention", "auto"),
    )


def config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A model block (`kind="uvit"` plus the fields) from a diffusers transformer config.json.

    Raises:
      ConversionError: one line, for another class, an unknown field or a shape this module
        cannot run (different down/upsampling, micro-condition widths that do not divide).
    """
    name = cfg.get("_class_name", "UVit2DModel")
    if name != "UVit2DModel":
        raise ConversionError(f"config.json describes a {name}, not a UVit2DModel (aMUSEd).")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
    if unknown:
        raise ConversionError(f"UVit2DModel config field {unknown[0]!r} is not supported.")
    block = {"kind": "uvit", **DIFFUSERS_DEFAULTS}
    block.update({k: cfg[k] for k in cfg if not k.startswith("_")})
    if bool(block["downsample"]) != bool(block["upsample"]):
        raise ConversionError(
            "UVit2DModel with downsample != upsample returns logits on another grid than its "
            "input; not supported."
        )
    encode, embed = block["micro_cond_encode_dim"], block["micro_cond_embed_dim"]
    if encode <= 0 or embed % encode:
        raise ConversionError(
            f"micro_cond_embed_dim {embed} is not a multiple of micro_cond_encode_dim {encode}."
        )
    return block
