"""argmin / argmax over the last axis as two plain reductions, faster on XLA:CPU.

XLA lowers `jnp.argmin` to one variadic (value, index) reduce, which its CPU backend does not
vectorise: the tokenizer's nearest-codeword lookup over the quantiser distances pays for it in
every train step that runs the tokenizer, and the loss's accuracy pays as much again. A min
followed by a min over the indices where the value is reached vectorises, and runs several
times faster (figures in BENCHMARKS.md, section "Train steps", on the argmin/argmax change;
`tests/test_arg_reductions.py` checks the semantics: first index among ties, NaN wins as in
jnp).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from muse_jax.models import kernels


def first_index_where(hit: jax.Array) -> jax.Array:
    """Index of the first True along the last axis of a boolean array; its length if none."""
    n = hit.shape[-1]
    index = jax.lax.broadcasted_iota(jnp.int32, hit.shape, hit.ndim - 1)
    return jnp.min(jnp.where(hit, index, n), axis=-1)


def argmin(x: jax.Array) -> jax.Array:
    """`jnp.argmin(x, axis=-1)`: the first index of the minimum; of the first NaN if any."""
    if not kernels.hand_written():
        return jnp.argmin(x, axis=-1)
    m = jnp.min(x, axis=-1, keepdims=True)  # NaN if the row has one: then pick the first NaN.
    return first_index_where((x == m) | jnp.isnan(x))


def argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)`, the same way."""
    if not kernels.hand_written():
        return jnp.argmax(x, axis=-1)
    m = jnp.max(x, axis=-1, keepdims=True)
    return first_index_where((x == m) | jnp.isnan(x))
