"""The dot of Dense layers, with a backward whose weight gradient XLA:CPU runs in YNNPACK.

jax differentiates y = x @ w into dW = x^T g, a dot that contracts the *major* axis of both
operands ([M, K] and [M, N] over the M rows). XLA:CPU hands YNNPACK only dots that contract a
minor axis, so it runs these in Eigen, well below the rate it reaches on the same FLOPs as a
plain [N, M] @ [M, K] dot. Here the weight gradient is (g^T x)^T: the cotangent is transposed
into [N, M] first, and the small [N, K] product is transposed back. It transposes g rather than
x because a layer's input is usually an elementwise expression (a LayerNorm or GELU output) that
XLA fuses into the transposing copy, and its loop emitter runs a fused broadcast + transpose
several times slower than a plain copy; the cotangent is usually a dot's output, copied as it
is. `optimization_barrier`s keep XLA's algebraic simplifier from folding either transpose back
into the dot. The input gradient g w^T contracts the minor axis of both and stays as jax has it.
Train steps run faster this way than when transposing x (or with jax's rule after a GELU), at
the embedded default's size and at the peer size; figures in BENCHMARKS.md, sections "Dense
weight gradients through the transposed cotangent" and "Train steps with several steps per call
and YNNPACK weight gradients".

Only on CPU, where the batch and feature axes flatten into one [M, K] @ [K, N]; elsewhere (and
for batched dots) it is `lax.dot_general`, which TPUs and GPUs run natively in any orientation.
On that path bfloat16 operands accumulate in float32 in both passes (the cotangent is cast back
to bf16 first); elsewhere the forward does (see `precision`) and the backward is jax's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
from jax import lax

from muse_jax.models import kernels
from muse_jax.models import precision as precision_lib


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x: jax.Array, w: jax.Array, precision: Any, accumulate: Any) -> jax.Array:
    return lax.dot(x, w, precision=precision, preferred_element_type=accumulate)


def _matmul_fwd(x, w, precision, accumulate):
    return _matmul(x, w, precision, accumulate), (x, w)


def _matmul_bwd(precision, accumulate, residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)  # A bf16 layer's cotangent is a bf16 value seen through a cast.
    d_x = lax.dot_general(
        g, w, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=accumulate
    )
    # The barriers are removed by XLA:CPU only after its algebraic simplifier ran.
    g_t = lax.optimization_barrier(g.T)
    d_w_t = lax.dot(g_t, x, precision=precision, preferred_element_type=accumulate)
    return d_x.astype(x.dtype), lax.optimization_barrier(d_w_t).T.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _is_dense(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> bool:
    """Contracts the trailing axes of lhs with the leading axes of rhs, no batch axes (Dense)."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    n = len(lhs_contract)
    return (
        not lhs_batch
        and not rhs_batch
        and n > 0
        and tuple(lhs_contract) == tuple(range(lhs.ndim - n, lhs.ndim))
        and tuple(rhs_contract) == tuple(range(n))
    )


def dot_general(dtype: Any, transposed_weight_grad: bool = True) -> Callable:
    """A `dot_general` for Flax's Dense/DenseGeneral computing in `dtype`.

    `transposed_weight_grad=False` keeps jax's weight gradient (the baseline of
    `benchmarks/dense_dot.py`).
    """

    def dense_dot_general(
        lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None
    ) -> jax.Array:
        if (
            not transposed_weight_grad
            or not kernels.hand_written()
            or not _is_dense(lhs, rhs, dimension_numbers)
        ):
            return lax.dot_general(
                lhs,
                rhs,
                dimension_numbers,
                precision,
                preferred_element_type=preferred_element_type,
            )
        n = len(dimension_numbers[0][0])
        batch_shape, features_shape = lhs.shape[: lhs.ndim - n], rhs.shape[n:]
        k = math.prod(rhs.shape[:n])
        return _matmul(
            lhs.reshape(math.prod(batch_shape), k),
            rhs.reshape(k, math.prod(features_shape)),
            precision,
            preferred_element_type,
        ).reshape(batch_shape + features_shape)

    return precision_lib.accumulating_in_float32(dense_dot_general, dtype)
