"""Exact categorical sampling over a large codebook without a noise draw per codebook entry.

`jax.random.categorical` adds Gumbel noise to every logit: at Muse's sizes (8192 codes, 256+
positions, every decoding step) generating those random numbers costs as much as the
transformer call itself on a CPU. Inverse-CDF sampling needs two uniforms per position: pick a
block of the codebook by the cumulative block masses, then an entry inside the block. The
cumulative sums run over ~sqrt(V) entries only, so the cost is one exp pass over the logits.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

from muse_jax.models.arg_reductions import first_index_where


def sample(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw from softmax(logits) along the last axis: int32 of shape logits.shape[:-1].

    Entries of probability 0 (logit -inf, or underflow) are never drawn.
    """
    chex.assert_type(logits, float)
    vocab = logits.shape[-1]
    block = 1 << math.ceil(math.log2(math.sqrt(vocab)))
    blocks = -(-vocab // block)
    logits = logits.astype(jnp.float32)
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # Unnormalised, max entry 1.
    if blocks * block != vocab:
        p = jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, blocks * block - vocab)])
    p = p.reshape(p.shape[:-1] + (blocks, block))
    # u in (0, 1]: the first cumulative sum >= u * total belongs to an entry of mass > 0. The
    # mass test also guards against prefix sums that rounding left non-monotonic.
    u = 1.0 - jax.random.uniform(key, p.shape[:-2] + (2,))
    chosen = _first_reaching(jnp.sum(p, axis=-1), u[..., :1])
    within = jnp.take_along_axis(p, chosen[..., None, None], axis=-2)[..., 0, :]
    entry = _first_reaching(within, u[..., 1:])
    return (chosen * block + entry).astype(jnp.int32)


def _first_reaching(mass: jax.Array, u: jax.Array) -> jax.Array:
    """Index of the first entry of positive mass whose prefix sum reaches u * total (the last
    one of positive mass if rounding leaves none)."""
    cum = jnp.cumsum(mass, axis=-1)
    positive = mass > 0
    hit = (cum >= u * cum[..., -1:]) & positive
    n = mass.shape[-1]
    first = first_index_where(hit)
    from_end = first_index_where(positive[..., ::-1])
    last = n - 1 - jnp.where(from_end < n, from_end, 0)  # No positive mass at all: n - 1.
    return jnp.where(first < n, first, last)
