"""Masking schedules gamma(r): the fraction of tokens still masked at progress r in [0, 1].

Training samples r ~ U(0, 1) and masks gamma(r) of the tokens; decoding at step t of T keeps
gamma((t + 1) / T) of the initially unknown tokens masked. Both use the same function, which is
what makes the trained model match the sampler's inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from muse_jax.errors import UsageError

Schedule = Callable[[jax.Array], jax.Array]

_SCHEDULES: dict[str, Schedule] = {
    "cosine": lambda r: jnp.cos(r * jnp.pi / 2),
    "linear": lambda r: 1.0 - r,
    "square": lambda r: 1.0 - r**2,
    "sqrt": lambda r: 1.0 - jnp.sqrt(r),
}


def get(name: str) -> Schedule:
    """Returns the schedule `name`; unknown names fail with the valid choices."""
    if name not in _SCHEDULES:
        raise UsageError(f"Unknown mask schedule {name!r}; valid: {sorted(_SCHEDULES)}.")
    return _SCHEDULES[name]


def random_mask(rng: jax.Array, shape: tuple[int, int], schedule: str) -> jax.Array:
    """Boolean [B, L] training mask: ceil(gamma(r) * L) positions per row, r ~ U(0, 1).

    At least one position per row is masked so that every example contributes to the loss.
    """
    batch, length = shape
    r_rng, p_rng = jax.random.split(rng)
    ratio = jax.random.uniform(r_rng, (batch,))
    num = jnp.clip(jnp.ceil(get(schedule)(ratio) * length), 1, length).astype(jnp.int32)
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(p_rng, shape), axis=-1), axis=-1)
    return ranks < num[:, None]
