"""Building blocks shared by the transformers: attention, MLP, norms, all with logical axes.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and every large
activation a logical constraint, so one rules table (see `muse_jax.parallel`) decides how a model
shards; the modules themselves never mention a mesh axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.models import activations, attention, conv_grad, dense_dot

Dtype = Any

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def get_dtype(name: str | Dtype) -> Dtype:
    """Maps a config string to a dtype with a clear error."""
    if not isinstance(name, str):
        return name
    if name not in _DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; valid: {sorted(_DTYPES)}.")
    return _DTYPES[name]


def partitioned(init: Callable, *axes: str | None) -> Callable:
    return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
    return nn.with_logical_constraint(x, tuple(axes))


def dense_init() -> Callable:
    return nn.initializers.xavier_uniform()


def dot_general(dtype: Dtype) -> Callable:
    """The `dot_general` of Dense layers computing in `dtype`: `dense_dot`'s (its weight
    gradient runs in YNNPACK on CPU); bfloat16 accumulates in float32 (see `precision`)."""
    return dense_dot.dot_general(dtype)


def conv_general_dilated(dtype: Dtype) -> Callable:
    """The same for convolutions (the VQGAN's and its discriminator's): `conv_grad`'s, whose
    gradients XLA:CPU also runs fast inside loops (several train steps per call)."""
    return conv_grad.conv_general_dilated(dtype)


def dense(
    features: int,
    in_axis: str,
    out_axis: str,
    dtype: Dtype,
    name: str | None = None,
) -> nn.Dense:
    """A Dense layer with logically partitioned kernel/bias and the dtype's dot (above)."""
    return nn.Dense(
        features,
        dtype=dtype,
        dot_general=dot_general(dtype),
        kernel_init=partitioned(dense_init(), in_axis, out_axis),
        bias_init=partitioned(nn.initializers.zeros, out_axis),
        name=name,
    )


class LayerNorm(nn.Module):
    """LayerNorm with a logically partitioned scale and bias."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.LayerNorm(
            dtype=self.dtype,
            scale_init=partitioned(nn.initializers.ones, "embed"),
            bias_init=partitioned(nn.initializers.zeros, "embed"),
        )(x)


class MlpBlock(nn.Module):
    """Position-wise GELU MLP."""

    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        width = x.shape[-1]
        h = dense(self.mlp_dim, "embed", "mlp", self.dtype, name="wi")(x)
        h = activations.gelu(h)
        h = constrain(h, "batch", "length", "mlp")
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return dense(width, "mlp", "embed", self.dtype, "wo")(h)


class _HeadsProjection(nn.Module):
    """[..., embed] -> [..., heads, head_dim]."""

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.DenseGeneral(
            (self.num_heads, self.head_dim),
            dtype=self.dtype,
            dot_general=dot_general(self.dtype),
            kernel_init=partitioned(dense_init(), "embed", "heads", "kv"),
            bias_init=partitioned(nn.initializers.zeros, "heads", "kv"),
        )(x)


class Attention(nn.Module):
    """Multi-head attention whose key/value projection can run on its own.

    `project_kv` is separate so that the sampler computes the text keys/values of every
    cross-attention layer once per prompt instead of once per decoding step.
    """

    num_heads: int
    width: int
    dtype: Dtype = jnp.float32
    implementation: str = "auto"  # See `muse_jax.models.attention`.

    def setup(self) -> None:
        attention.check_implementation(self.implementation)
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")
        head_dim = self.width // self.num_heads
        self.query = _HeadsProjection(self.num_heads, head_dim, self.dtype)
        self.key = _HeadsProjection(self.num_heads, head_dim, self.dtype)
        self.value = _HeadsProjection(self.num_heads, head_dim, self.dtype)
        self.out = nn.DenseGeneral(
            self.width,
            axis=(-2, -1),
            dtype=self.dtype,
            dot_general=dot_general(self.dtype),
            kernel_init=partitioned(dense_init(), "heads", "kv", "embed"),
            bias_init=partitioned(nn.initializers.zeros, "embed"),
        )

    def project_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[batch, S, C] -> (keys, values), each [batch, S, heads, head_dim]."""
        k = constrain(self.key(context), "batch", "length", "heads", "kv")
        v = constrain(self.value(context), "batch", "length", "heads", "kv")
        return k, v

    def __call__(
        self,
        x: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Attends from `x` to precomputed `kv`, or to `x` itself when `kv` is None.

        Args:
          x: [batch, length, width].
          kv: optional (keys, values) from `project_kv`, each [batch, S, heads, head_dim].
          mask: boolean, broadcastable to [batch, heads, length, S]; True where attention is allowed.
        Returns:
          [batch, length, width].
        """
        if kv is None:
            kv = self.project_kv(x)
        k, v = kv
        q = constrain(self.query(x), "batch", "length", "heads", "kv")
        out = attention.dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), mask, self.implementation
        )
        return self.out(out)
