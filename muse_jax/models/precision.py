"""bfloat16 layers: bf16 operands, float32 accumulation, result cast back to bf16.

What TPU MXUs and GPU tensor cores do anyway, and on an AVX512-BF16 CPU the only form XLA runs
natively (faster than its float32 dots; matmul rates in BENCHMARKS.md, section "Sampler vs
diffusers' aMUSEd"); a bf16 -> bf16 dot is lowered there as upcast + float32 dot + downcast,
slower than float32 (benchmarks/xla_cpu_bf16_findings.md). One wrapper for the Dense layers' dot
(`dense_dot`) and the convolutions (`conv_grad`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp


def accumulating_in_float32(op: Callable, dtype: Any) -> Callable:
    """`op` (a dot or convolution taking `preferred_element_type`) for a layer computing in
    `dtype`: in bfloat16 it accumulates in float32 and casts the result back; else `op`."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        return op

    @functools.wraps(op)
    def bf16_op(*args, preferred_element_type=None, **kwargs):
        del preferred_element_type
        return op(*args, preferred_element_type=jnp.float32, **kwargs).astype(dtype)

    return bf16_op
