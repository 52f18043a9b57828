"""Classifier-free guidance: l = l_c + s_t (l_c - l_u), conditional and unconditional in one batch.

The unconditional branch is the empty prompt, or a negative prompt in its place. The guidance
scale s_t follows a schedule over decoding steps (Muse ramps it up linearly).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from muse_jax.errors import UsageError

_SCHEDULES = ("constant", "linear")


def scale_at(scale: float, schedule: str, step: jax.Array, num_steps: int) -> jax.Array:
    """Guidance scale at `step`: constant, or linear from 0 at the first step to `scale` at the last."""
    if schedule == "constant":
        return jnp.asarray(scale, jnp.float32)
    if schedule == "linear":
        return scale * step / max(num_steps - 1, 1)
    raise UsageError(f"Unknown guidance schedule {schedule!r}; valid: {list(_SCHEDULES)}.")


def guided(
    logits_fn: Callable[[jax.Array], jax.Array],
    *,
    scale: float,
    schedule: str,
    num_steps: int,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Wraps `logits_fn(tokens [2B, L]) -> [2B, L, V]`, whose context is [cond; uncond], into a
    `tokens_to_logits(tokens [B, L], step)` for `parallel_decode.decode`."""

    def tokens_to_logits(tokens: jax.Array, step: jax.Array) -> jax.Array:
        both = logits_fn(jnp.concatenate([tokens, tokens], axis=0))
        cond, uncond = jnp.split(both, 2, axis=0)
        s = scale_at(scale, schedule, step, num_steps)
        return cond + s * (cond - uncond)

    return tokens_to_logits
