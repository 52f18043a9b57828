"""The train state every stage carries: a pytree orbax can save and jit can shard."""

from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32
    params: Any  # trained parameters
    opt_state: Any
    rng: jax.Array  # raw uint32 key data: checkpointable as a plain array
    extra: Any  # stage-specific arrays that are not trained (e.g. codebook usage)
