"""Building blocks shared by the transformers: attention, MLP, norms, all with logical axes.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and every large
activation a logical constraint, so one rules table (see `muse_jax.parallel`) decides how a model
shards; the modules themselves never mention a mesh axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import partitioning as nn_partitioning

from muse_jax.errors import UsageError
from muse_jax.models import activations, attention, conv_grad, dense_dot

Dtype = Any

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def get_dtype(name: str | Dtype) -> Dtype:
    """Maps a config string to a dtype with a clear error."""
    if not isinstance(name, str):
        return name
    if name not in _DTYPES:
        raise UsageError(f"Unknown dtype {name!r}; valid: {sorted(_DTYPES)}.")
    return _DTYPES[name]


def partitioned(init: Callable, *axes: str | None) -> Callable:
    return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
    return nn.with_logical_constraint(x, tuple(axes))


def dense_init() -> Callable:
    return nn.initializers.xavier_uniform()


def gathered(kernel: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """`kernel` (logical axes `axes`) as its matmul reads it: every dimension the rules split
    over the data-parallel mesh axes (`data`, `fsdp`) gathered, tensor-parallel splits kept.

    This is FSDP's all-gather of weights at use, stated: the parameter stays sharded in memory
    (and its gradient comes back reduce-scattered), while the matmul contracts whole weights
    against batch-split activations. Without it XLA:TPU may keep the weight split along the
    contracted `embed` dimension and all-reduce activations of the global batch instead
    (`python -m muse_jax.aot` shows the difference in its collectives). No-op without a mesh.
    """
    data_axes = {"data", "fsdp"}
    names = []
    for name in axes:
        mapped = dict(nn_partitioning.get_axis_rules()).get(name) if name is not None else None
        mapped = (mapped,) if isinstance(mapped, str) else tuple(mapped or ())
        names.append(None if data_axes & set(mapped) else name)
    return constrain(kernel, *names)


def dot_general(dtype: Dtype, kernel_axes: tuple[str | None, ...] | None = None) -> Callable:
    """The `dot_general` of Dense layers computing in `dtype`: `dense_dot`'s (its weight
    gradient runs in YNNPACK on CPU); bfloat16 accumulates in float32 (see `precision`).
    `kernel_axes`: the kernel's logical axes, gathered at use (`gathered`)."""
    dot = dense_dot.dot_general(dtype)
    if kernel_axes is None:
        return dot

    def gathered_dot(lhs, rhs, *args, **kwargs):
        return dot(lhs, gathered(rhs, kernel_axes), *args, **kwargs)

    return gathered_dot


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
        dot_general=dot_general(dtype, (in_axis, out_axis)),
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


class Projection(nn.Module):
    """Dense over the last `in_dims` input dimensions to `features`: flax's `DenseGeneral` with
    the same parameters ('kernel' [*inputs, *features], 'bias' [*features]) and the same
    initial values (the initializer sees the kernel flattened to 2-D, as DenseGeneral's does),
    but a kernel created at its final shape. DenseGeneral boxes the flat kernel with the final
    shape's logical names and reshapes it afterwards, which fails once a mesh is set while
    tracing (the names' sharding is applied to the flat array)."""

    features: tuple[int, ...]
    in_dims: int
    kernel_axes: tuple[str, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inputs = x.shape[x.ndim - self.in_dims :]
        flat = (math.prod(inputs), math.prod(self.features))

        def kernel_init(rng, shape, dtype=jnp.float32):
            return jnp.reshape(dense_init()(rng, flat, dtype), shape)

        kernel = self.param(
            "kernel", partitioned(kernel_init, *self.kernel_axes), inputs + tuple(self.features)
        )
        bias = self.param(
            "bias",
            partitioned(nn.initializers.zeros, *self.kernel_axes[self.in_dims :]),
            tuple(self.features),
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
        y = dot_general(self.dtype, self.kernel_axes)(x, kernel, (contract, ((), ())))
        return y + bias


class _HeadsProjection(nn.Module):
    """[..., embed] -> [..., heads, head_dim]."""

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Projection(
            (self.num_heads, self.head_dim),
            1,
            ("embed", "heads", "kv"),
            self.dtype,
            name="DenseGeneral_0",  # The parameter path of the flax layer it replaced.
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
            raise UsageError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")
        head_dim = self.width // self.num_heads
        self.query = _HeadsProjection(self.num_heads, head_dim, self.dtype)
        self.key = _HeadsProjection(self.num_heads, head_dim, self.dtype)
        self.value = _HeadsProjection(self.num_heads, head_dim, self.dtype)
        self.out = Projection((self.width,), 2, ("heads", "kv", "embed"), self.dtype)

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
