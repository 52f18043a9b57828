"""T5 v1.1 encoder in Flax Linen: the frozen text encoder of Muse.

Muse conditions on the per-token outputs of a pre-trained T5-XXL encoder, so this module has to
reproduce the published checkpoints bit-for-bit in structure: token embedding without scaling,
RMS norms without bias or mean subtraction, attention logits without 1/sqrt(d) scaling plus
bucketed relative position biases (one table shared by all layers), and a gated-GELU MLP. Nothing
has biases and there is no dropout (the encoder is only ever used frozen).

The parameter tree mirrors T5X (`t5x/examples/t5/network.py`) so that T5X checkpoints map onto it
by name, with 2-D ("joined heads") kernels:

    token_embedder/embedding                      [vocab, d_model]
    encoder/relpos_bias/rel_embedding             [heads, buckets]
    encoder/layers_{i}/pre_attention_layer_norm/scale  [d_model]
    encoder/layers_{i}/attention/{query,key,value}/kernel  [d_model, heads * d_kv]
    encoder/layers_{i}/attention/out/kernel       [heads * d_kv, d_model]
    encoder/layers_{i}/pre_mlp_layer_norm/scale   [d_model]
    encoder/layers_{i}/mlp/{wi_0,wi_1}/kernel     [d_model, d_ff]
    encoder/layers_{i}/mlp/wo/kernel              [d_ff, d_model]
    encoder/encoder_norm/scale                    [d_model]

`muse_jax.text.safetensors_t5` reads the Hugging Face safetensors into this tree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.errors import UsageError
from muse_jax.models.layers import Dtype, constrain, dot_general, get_dtype, partitioned


@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config:
    """Hyperparameters of a T5 v1.1 encoder; field names follow Hugging Face's `T5Config`.

    Attributes:
      dtype: compute dtype ("float32" or "bfloat16"); parameters are always stored in float32 and
        norms, softmax and the output are computed in float32.
    """

    vocab_size: int = 32128
    d_model: int
    d_kv: int = 64
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"


PRESETS: dict[str, T5Config] = {
    "tiny": T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    "small": T5Config(d_model=512, d_ff=1024, num_layers=8, num_heads=6),
    "base": T5Config(d_model=768, d_ff=2048, num_layers=12, num_heads=12),
    "large": T5Config(d_model=1024, d_ff=2816, num_layers=24, num_heads=16),
    "xl": T5Config(d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
    "xxl": T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64),
}


def get_config(name: str, **overrides: Any) -> T5Config:
    """Returns preset `name` (e.g. "xxl") with fields replaced by `overrides`."""
    if name not in PRESETS:
        raise UsageError(f"Unknown T5 preset {name!r}; valid: {sorted(PRESETS)}.")
    return dataclasses.replace(PRESETS[name], **overrides)


def relative_position_buckets(
    query_len: int, key_len: int, num_buckets: int, max_distance: int
) -> np.ndarray:
    """Bidirectional T5 relative-position buckets, [query_len, key_len] int32.

    Half the buckets are for keys after the query, half for keys before; within each half, the
    first half of the buckets are exact distances and the rest grow logarithmically up to
    `max_distance`, beyond which all distances share the last bucket. Computed in numpy at trace
    time (shapes are static) with the same float32 arithmetic as Mesh TensorFlow / Hugging Face,
    so bucket boundaries (distances 16, 32, 64 for the defaults) land identically.
    """
    rel = (
        np.arange(key_len, dtype=np.int64)[None, :] - np.arange(query_len, dtype=np.int64)[:, None]
    )
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    # max(dist, 1) only avoids log(0); those positions take the exact branch anyway.
    scaled = (
        np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact))
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(half - max_exact)
    )
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    buckets += np.where(dist < max_exact, dist, large)
    return buckets.astype(np.int32)


class RMSNorm(nn.Module):
    """T5LayerNorm: x / rms(x) * scale, in float32, no bias and no mean subtraction."""

    epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", partitioned(nn.initializers.ones, "embed"), (x.shape[-1],), jnp.float32
        )
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        return (x * scale).astype(self.dtype)


class RelativePositionBias(nn.Module):
    """The encoder's one relative-position bias table, `rel_embedding` [heads, buckets]."""

    config: T5Config

    @nn.compact
    def __call__(self, length: int) -> jax.Array:
        """Returns the attention bias [1, heads, length, length] in float32."""
        cfg = self.config
        table = self.param(
            "rel_embedding",
            partitioned(
                nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                "heads",
                "relpos_buckets",
            ),
            (cfg.num_heads, cfg.relative_attention_num_buckets),
            jnp.float32,
        )
        buckets = relative_position_buckets(
            length, length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        return table[:, buckets][None]


def _dense(
    features: int,
    in_axis: str,
    out_axis: str,
    init: Any,
    dtype: Dtype,
    name: str,
):
    return nn.Dense(
        features,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        dot_general=dot_general(dtype),
        kernel_init=partitioned(init, in_axis, out_axis),
        name=name,
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention with T5's unscaled logits and an additive bias."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x: [B, S, d_model]; bias: [B, heads, S, S] float32 (position + padding)."""
        cfg = self.config
        dtype = get_dtype(cfg.dtype)
        inner = cfg.num_heads * cfg.d_kv
        fan_in = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        # T5X folds the 1/sqrt(d_kv) that T5 omits from the logits into the query init instead.
        query_init = nn.initializers.variance_scaling(1.0 / cfg.d_kv, "fan_in", "normal")
        heads = (*x.shape[:2], cfg.num_heads, cfg.d_kv)
        q = _dense(inner, "embed", "joined_kv", query_init, dtype, "query")(x).reshape(heads)
        k = _dense(inner, "embed", "joined_kv", fan_in, dtype, "key")(x).reshape(heads)
        v = _dense(inner, "embed", "joined_kv", fan_in, dtype, "value")(x).reshape(heads)
        q = constrain(q, "batch", "length", "heads", "kv")
        k = constrain(k, "batch", "length", "heads", "kv")
        v = constrain(v, "batch", "length", "heads", "kv")
        # Unscaled logits can be large: accumulate and softmax in float32 whatever the dtype.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits + bias, axis=-1).astype(dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*x.shape[:2], inner)
        return _dense(cfg.d_model, "joined_kv", "embed", fan_in, dtype, "out")(out)


class GatedMlp(nn.Module):
    """T5 v1.1 "gated-gelu" MLP: wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = get_dtype(cfg.dtype)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        # Hugging Face's "gated-gelu" is `gelu_new`, the tanh approximation.
        gate = nn.gelu(_dense(cfg.d_ff, "embed", "mlp", init, dtype, "wi_0")(x), approximate=True)
        h = gate * _dense(cfg.d_ff, "embed", "mlp", init, dtype, "wi_1")(x)
        h = constrain(h, "batch", "length", "mlp")
        return _dense(cfg.d_model, "mlp", "embed", init, dtype, "wo")(h)


class EncoderLayer(nn.Module):
    """Pre-norm residual block: RMSNorm -> self-attention, RMSNorm -> gated MLP."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = get_dtype(cfg.dtype)
        eps = cfg.layer_norm_epsilon
        h = RMSNorm(eps, dtype, name="pre_attention_layer_norm")(x)
        x = x + SelfAttention(cfg, name="attention")(h, bias)
        h = RMSNorm(eps, dtype, name="pre_mlp_layer_norm")(x)
        x = x + GatedMlp(cfg, name="mlp")(h)
        return constrain(x, "batch", "length", "embed")


class EncoderStack(nn.Module):
    """The `encoder` subtree: relative-position bias, layers, final norm."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [B, S, d_model] embeddings; mask: [B, S] {0, 1}. Returns [B, S, d_model] float32."""
        cfg = self.config
        # Computed once and shared by every layer, as in T5X (Hugging Face keeps the same single
        # table in block 0 and passes its output down).
        position_bias = RelativePositionBias(cfg, name="relpos_bias")(x.shape[1])
        padding_bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        bias = position_bias + padding_bias
        for i in range(cfg.num_layers):
            x = EncoderLayer(cfg, name=f"layers_{i}")(x, bias)
        x = RMSNorm(cfg.layer_norm_epsilon, jnp.float32, name="encoder_norm")(x)
        return constrain(x, "batch", "length", "embed")


class T5Encoder(nn.Module):
    """T5 v1.1 encoder: token ids -> per-token embeddings.

    Padding keys are masked out of attention, so the outputs at real tokens do not depend on
    padding. Outputs at padded positions are well-defined numbers but meaningless; consumers must
    mask them (Muse's cross-attention does). Positions are absolute indices 0..S-1, so use right
    padding as the published models were trained with.
    """

    config: T5Config

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Encodes a batch.

        Args:
          ids: [B, S] int32 token ids.
          mask: [B, S] int (or bool), 1 for real tokens and 0 for padding.
        Returns:
          [B, S, d_model] float32.
        """
        cfg = self.config
        chex.assert_rank(ids, 2)
        chex.assert_equal_shape((ids, mask))
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=get_dtype(cfg.dtype),
            param_dtype=jnp.float32,
            embedding_init=partitioned(nn.initializers.normal(stddev=1.0), "vocab", "embed"),
            name="token_embedder",
        )
        x = constrain(embed(ids.astype(jnp.int32)), "batch", "length", "embed")
        out = EncoderStack(cfg, name="encoder")(x, mask)
        chex.assert_shape(out, (*ids.shape, cfg.d_model))
        return out.astype(jnp.float32)


def param_shapes(config: T5Config) -> dict:
    """The unboxed parameter tree of `T5Encoder(config)` as `jax.ShapeDtypeStruct`s, unallocated."""
    ids = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(
        lambda: T5Encoder(config).init(jax.random.key(0), ids, jnp.ones_like(ids))
    )
    # Logical boxes are pytree nodes whose single leaf is the value, so stripping them is a map.
    return jax.tree.map(
        lambda b: b.value if isinstance(b, nn.LogicallyPartitioned) else b,
        abstract["params"],
        is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned),
    )


def param_count(config: T5Config) -> int:
    """Number of parameters of `T5Encoder(config)`, via `jax.eval_shape` (no allocation)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(config)))
