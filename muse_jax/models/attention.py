"""Multi-head dot-product attention, with a heads-major implementation that is fast on CPU.

`jax.nn.dot_product_attention` (its XLA path) contracts [B, T, N, H] operands directly, which
leaves XLA:CPU to pick layouts: its score and output dots then run outside YNNPACK, and autodiff
keeps the normalised probabilities plus several [B, N, T, S] temporaries. `heads_major` moves
heads before positions once, normalises the softmax after the value product (one pass fewer over
the scores), turns the mask into an additive bias (a select in front of the row max blocks
XLA's fusion) and has a hand-written backward that keeps the unnormalised probabilities and
row sums (beside q, k, v and the output) instead of a normalised copy, and recomputes nothing.
On XLA:CPU that makes both the forward and forward + backward faster than
`jax.nn.dot_product_attention`, with or without `muse_jax.host_memory`'s huge pages
(`python benchmarks/attention.py`; figures in BENCHMARKS.md, section "Sampler vs diffusers'
aMUSEd", the paragraph on what moved the float32 loop). Tried and dropped: materialising
transposed probabilities so that the two backward dots that contract the query axis leave Eigen
for YNNPACK (the copies cost more than they save).

`implementation="auto"` picks `heads_major` on CPU and `jax.nn.dot_product_attention` (XLA)
elsewhere; "cudnn" asks jax for cuDNN's fused kernel on GPUs.

XLA's path materialises the [B, N, T, S] scores. Where they would exceed `MAX_SCORE_ELEMENTS`
(the super-res stage's 4096 x 4096 tokens, at a sampler batch of 32 with guidance: 16 Gi
elements) the queries go through in equal blocks, one after another (`lax.map`). No value
changes: each query's softmax still runs over every key.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.errors import UsageError
from muse_jax.models import kernels

IMPLEMENTATIONS = ("auto", "heads_major", "xla", "cudnn")

# Scores of one XLA attention call beyond which queries go through in blocks (1 GiB in f32).
MAX_SCORE_ELEMENTS = 2**28

# Added to the scores of masked-out keys. Finite so that a row with every key masked gives a
# uniform average instead of NaN, as `jax.nn.dot_product_attention` does.
_MASKED = -1e30


def check_implementation(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise UsageError(f"Unknown attention implementation {name!r}; valid: {IMPLEMENTATIONS}.")
    return name


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _scores(qt, kt, bias, scale):
    s = _dot("bnth,bnsh->bnts", qt, kt) * scale
    return s if bias is None else s + bias


def _forward(qt, kt, vt, bias, scale):
    s = _scores(qt, kt, bias, scale)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)).astype(vt.dtype)  # Unnormalised.
    inv_sum = 1.0 / jnp.sum(p.astype(jnp.float32), axis=-1, keepdims=True)
    out = (_dot("bnts,bnsh->bnth", p, vt) * inv_sum).astype(qt.dtype)
    return out, (qt, kt, vt, bias, p, inv_sum, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _heads_major(qt, kt, vt, bias, scale):
    return _forward(qt, kt, vt, bias, scale)[0]


def _heads_major_bwd(scale, res, d_out):
    qt, kt, vt, bias, p, inv_sum, out = res
    d_out32 = d_out.astype(jnp.float32)
    d_v = _dot("bnts,bnth->bnsh", p, (d_out32 * inv_sum).astype(p.dtype))
    d_p = _dot("bnth,bnsh->bnts", d_out, vt)
    # Softmax backward on normalised probabilities p * inv_sum: dS = P * (dP - rowsum(dO * O)).
    delta = jnp.sum(d_out32 * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_s = p * ((d_p - delta) * (inv_sum * scale))
    if bias is not None:  # A row with every key masked is constant (uniform): no gradient.
        d_s = jnp.where(bias < 0, 0.0, d_s)
    d_s = d_s.astype(qt.dtype)
    d_q = _dot("bnts,bnsh->bnth", d_s, kt)
    d_k = _dot("bnts,bnth->bnsh", d_s, qt)
    return d_q.astype(qt.dtype), d_k.astype(kt.dtype), d_v.astype(vt.dtype), None


_heads_major.defvjp(_forward, _heads_major_bwd)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    implementation: str = "auto",
    max_score_elements: int = MAX_SCORE_ELEMENTS,
) -> jax.Array:
    """softmax(q k^T / sqrt(H)) v over [B, T, N, H] queries and [B, S, N, H] keys/values.

    Args:
      mask: boolean, broadcastable to [B, N, T, S]; True where attention is allowed.
      implementation: one of `IMPLEMENTATIONS` (see the module docstring).
      max_score_elements: the XLA path's query blocking threshold (see the module docstring).
    Returns:
      [B, T, N, H] in q's dtype.
    """
    check_implementation(implementation)
    if implementation == "auto":
        implementation = "heads_major" if kernels.hand_written() else "xla"
    if implementation != "heads_major":
        return _in_query_blocks(q, k, v, mask, implementation, max_score_elements)
    bias = None
    if mask is not None:
        bias = jnp.where(mask, 0.0, _MASKED).astype(jnp.float32)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    out = _heads_major(heads_first(q), heads_first(k), heads_first(v), bias, q.shape[-1] ** -0.5)
    return heads_first(out)


def _query_blocks(b: int, n: int, t: int, s: int, limit: int) -> int:
    """The fewest equal blocks of the t queries whose scores fit `limit` elements."""
    for blocks in range(1, t + 1):
        if t % blocks == 0 and b * n * (t // blocks) * s <= limit:
            return blocks
    return t


def _batch_shards() -> int:
    """How many ways the batch is split while tracing: the mesh axes the logical "batch" axis
    maps to (1 without a mesh). Scores are per device, so the blocking threshold is too."""
    from flax.linen import partitioning

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = dict(partitioning.get_axis_rules()).get("batch")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return int(np.prod([sizes.get(a, 1) for a in axes]))


def _in_query_blocks(q, k, v, mask, implementation: str, limit: int) -> jax.Array:
    """`jax.nn.dot_product_attention`, over blocks of queries when the scores are large."""
    b, t, n, h = q.shape
    shards = _batch_shards()
    local_b = b // shards if b % shards == 0 else b
    blocks = _query_blocks(local_b, n, t, k.shape[1], limit)
    attend = functools.partial(jax.nn.dot_product_attention, implementation=implementation)
    if blocks == 1:
        return attend(q, k, v, mask=mask)
    qb = jnp.moveaxis(q.reshape(b, blocks, t // blocks, n, h), 1, 0)
    if mask is not None and mask.ndim == 4 and mask.shape[-2] == t:
        m = mask.reshape(mask.shape[:2] + (blocks, t // blocks, mask.shape[-1]))
        out = jax.lax.map(lambda a: attend(a[0], k, v, mask=a[1]), (qb, jnp.moveaxis(m, 2, 0)))
    else:
        out = jax.lax.map(lambda qi: attend(qi, k, v, mask=mask), qb)
    return jnp.moveaxis(out, 0, 1).reshape(b, t, n, h)
