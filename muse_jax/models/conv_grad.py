"""The VQGAN's convolution, with gradients XLA:CPU runs in YNNPACK inside loops as well.

jax differentiates a convolution into two more whose operands XLA's layout assignment turns
into the canonical NHWC / HWIO form YNNPACK takes (the weight gradient becomes a convolution
with the channels as batch and the batch as features, over a window as large as the image).
In the body of a loop (several train steps per call, `train.steps_per_call`) that rewrite does
not happen and XLA:CPU runs its naive convolution instead: at the tokenizer's shapes (3x3,
128 -> 128 channels, [32, 8, 8, 128]) the weight gradient is far slower in a `lax.scan` than
outside one, and the input gradient slower too (figures in BENCHMARKS.md, section "Train steps,
convolutions in loops: every stage at 10 steps per call"). Here both gradients are written as
canonical convolutions on explicitly transposed operands, the form XLA reaches on its own
outside loops (the compiled one-call train step is unchanged), so inside a scan they run in
YNNPACK at their one-call speed (tests: a 3x3 and a 4x4 stride-2 layer on 8x8 maps, the
discriminator). Not covered: on very small maps (a stride-2 input gradient with a 2x2 output)
XLA still rewrites the input gradient into another layout inside a loop.

Only on CPU, for ungrouped, undilated NHWC/HWIO convolutions (all of the VQGAN's and the
discriminator's); otherwise `lax.conv_general_dilated`. A `custom_vjp`: reverse mode only, so
`jax.jvp` through these convolutions fails on CPU (nothing here uses forward mode).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from muse_jax.models import kernels
from muse_jax.models import precision as precision_lib

_NHWC = ("NHWC", "HWIO", "NHWC")
_NHWC_NUMBERS = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, _NHWC)

Padding = tuple[tuple[int, int], ...]


def _conv(x, w, strides, padding, precision, accumulate, lhs_dilation=None, rhs_dilation=None):
    return lax.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=_NHWC,
        precision=precision,
        preferred_element_type=accumulate,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _canonical_conv(
    x: jax.Array, w: jax.Array, strides: tuple[int, ...], padding: Padding, precision, accumulate
) -> jax.Array:
    return _conv(x, w, strides, padding, precision, accumulate)


def _canonical_conv_fwd(x, w, strides, padding, precision, accumulate):
    return _canonical_conv(x, w, strides, padding, precision, accumulate), (x, w)


def _canonical_conv_bwd(strides, padding, precision, accumulate, residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)  # A bf16 layer's cotangent is a bf16 value seen through a cast.
    kernel, size, out = w.shape[:2], x.shape[1:3], g.shape[1:3]
    # Input gradient: the cotangent, dilated by the strides, correlated with the flipped kernel
    # (input and output channels swapped); the padding puts each output where jax's rule does.
    x_pads = tuple(
        (k - 1 - lo, n - (m - 1) * s + lo - 1)
        for k, n, m, s, (lo, _) in zip(kernel, size, out, strides, padding, strict=True)
    )
    w_flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    d_x = _conv(g, w_flipped, (1, 1), x_pads, precision, accumulate, lhs_dilation=strides)
    # Weight gradient: the channels of x as batch, its batch as input features, the cotangent
    # [h, w, batch, out] as an image-sized kernel dilated by the strides; output [C, kh, kw, O].
    w_pads = tuple(
        (lo, k + (m - 1) * s - n - lo)
        for k, n, m, s, (lo, _) in zip(kernel, size, out, strides, padding, strict=True)
    )
    d_w = _conv(
        x.transpose(3, 1, 2, 0),
        g.transpose(1, 2, 0, 3),
        (1, 1),
        w_pads,
        precision,
        accumulate,
        rhs_dilation=strides,
    ).transpose(1, 2, 0, 3)
    return d_x.astype(x.dtype), d_w.astype(w.dtype)


_canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def _is_plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, groups) -> bool:
    ones = lambda d: d is None or all(v == 1 for v in d)
    return (
        lhs.ndim == 4
        and rhs.ndim == 4
        and groups == 1
        and ones(lhs_dilation)
        and ones(rhs_dilation)
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC_NUMBERS
    )


def conv_general_dilated(dtype: Any) -> Callable:
    """A `conv_general_dilated` for Flax's Conv computing in `dtype`; bfloat16 operands
    accumulate in float32 (see `precision`), in both passes on CPU."""

    def conv(
        lhs: jax.Array,
        rhs: jax.Array,
        window_strides: Sequence[int],
        padding: str | Sequence[tuple[int, int]],
        lhs_dilation: Sequence[int] | None = None,
        rhs_dilation: Sequence[int] | None = None,
        dimension_numbers: Any = None,
        feature_group_count: int = 1,
        precision: Any = None,
        preferred_element_type: Any = None,
    ) -> jax.Array:
        if not kernels.hand_written() or not _is_plain_nhwc(
            lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count
        ):
            return lax.conv_general_dilated(
                lhs,
                rhs,
                window_strides,
                padding,
                lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation,
                dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count,
                precision=precision,
                preferred_element_type=preferred_element_type,
            )
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
        return _canonical_conv(
            lhs,
            rhs,
            tuple(window_strides),
            tuple((int(lo), int(hi)) for lo, hi in padding),
            precision,
            preferred_element_type,
        )

    return precision_lib.accumulating_in_float32(conv, dtype)
