"""GELU (tanh form) whose backward keeps only its input.

jax's autodiff of `nn.gelu` keeps the tanh and the output beside the input: three [tokens, mlp]
buffers per MLP, the largest activations of a transformer step. Keeping the input alone and
recomputing the tanh in the backward (one elementwise pass) cuts two of them; on XLA:CPU, where
every buffer of a step is freshly mapped memory, that also saves the cost of faulting them in.
Values follow `jax.nn.gelu(x, approximate=True)` operation for operation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from muse_jax.models import kernels

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715


def _tanh_term(x):
    return jnp.tanh(_C * (x + _A * (x**3)))


def gelu(x: jax.Array) -> jax.Array:
    """`jax.nn.gelu(x, approximate=True)`; with the input-only backward where kernels are
    hand-written (`kernels.hand_written()`), jax's own otherwise."""
    if kernels.hand_written():
        return _gelu(x)
    return jax.nn.gelu(x, approximate=True)


@jax.custom_vjp
def _gelu(x: jax.Array) -> jax.Array:
    return x * (0.5 * (1.0 + _tanh_term(x)))


def _gelu_fwd(x):
    return _gelu(x), x


def _gelu_bwd(x, g):
    t = _tanh_term(x)
    dt = (1.0 - t * t) * (_C * (1.0 + 3.0 * _A * x * x))
    return (g * (0.5 * (1.0 + t) + 0.5 * x * dt),)


_gelu.defvjp(_gelu_fwd, _gelu_bwd)
