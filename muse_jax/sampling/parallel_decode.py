"""Iterative parallel decoding (MaskGIT/Muse) that knows nothing about the model.

The model enters only through `tokens_to_logits(tokens, step)`, so the base stage, super-res
and editing (fixed tokens) share this one loop. The loop is a `lax.fori_loop` inside whatever
jit calls it: no host round-trip per step.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import flax
import jax
import jax.numpy as jnp

from muse_jax.errors import UsageError
from muse_jax.models import arg_reductions
from muse_jax.sampling import categorical, mask_schedule

TokensToLogits = Callable[[jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class DecodeResult:
    tokens: jax.Array  # [B, L] fully decoded ids.
    num_masked: jax.Array  # [num_steps, B] masked positions left after each step.


def decode(
    tokens: jax.Array,
    rng: jax.Array,
    tokens_to_logits: TokensToLogits,
    *,
    mask_id: int,
    num_steps: int,
    schedule: str = "cosine",
    temperature: float = 1.0,
    temperature_final: float | None = None,
    choice_temperature: float = 4.5,
) -> DecodeResult:
    """Fills every `mask_id` position of `tokens` in `num_steps` parallel steps.

    Each step samples all masked positions, keeps the most confident (log-probability plus
    Gumbel noise annealed from `choice_temperature` to 0) and re-masks the rest so that
    gamma((t + 1) / T) of the initially unknown tokens stay masked. Positions that are not
    `mask_id` on input are fixed: returned unchanged (editing relies on this).

    Args:
      tokens: [batch, length] int32; `mask_id` marks positions to generate.
      rng: PRNG key.
      tokens_to_logits: (tokens [B, L], step []) -> logits [B, L, vocab] (vocab excludes mask).
      mask_id: the [MASK] id.
      num_steps: decoding steps T (static).
      schedule: masking schedule name (see `mask_schedule`).
      temperature: sampling temperature of the first step; anneals linearly to
        `temperature_final` (default: constant). 0 takes the most likely token (argmax).
      choice_temperature: scale of the Gumbel noise on confidences at the first step.
    Returns:
      A `DecodeResult` with the decoded tokens and the masked count after each step.
    """
    chex.assert_rank(tokens, 2)
    if num_steps < 1:
        raise UsageError(f"num_steps must be >= 1, got {num_steps}.")
    gamma = mask_schedule.get(schedule)
    t_final = temperature if temperature_final is None else temperature_final
    unknown0 = jnp.sum(tokens == mask_id, axis=-1)  # [B]

    def body(step, carry):
        cur, rng, history = carry
        rng, sample_rng, choice_rng = jax.random.split(rng, 3)
        logits = tokens_to_logits(cur, step).astype(jnp.float32)
        progress = (step + 1) / num_steps
        temp = temperature + (t_final - temperature) * step / max(num_steps - 1, 1)
        # Temperature 0 is greedy decoding (argmax): deterministic, e.g. for parity checks.
        sampled = jax.lax.cond(
            temp > 0,
            lambda: categorical.sample(sample_rng, logits / jnp.maximum(temp, 1e-6)),
            lambda: arg_reductions.argmax(logits).astype(jnp.int32),
        )
        unknown = cur == mask_id
        sampled = jnp.where(unknown, sampled, cur)
        # log p(sampled) without materialising log_softmax over the whole codebook.
        chosen = jnp.take_along_axis(logits, sampled[..., None], axis=-1)[..., 0]
        chosen = chosen - jax.nn.logsumexp(logits, axis=-1)
        noise = jax.random.gumbel(choice_rng, chosen.shape)
        confidence = chosen + choice_temperature * (1.0 - progress) * noise
        confidence = jnp.where(unknown, confidence, jnp.inf)  # Fixed/decoded tokens stay.

        n_unknown = jnp.sum(unknown, axis=-1)
        n_mask = jnp.floor(unknown0 * gamma(progress)).astype(jnp.int32)
        # Decode at least one token per step, and keep at least one masked until the last.
        last = step == num_steps - 1
        n_mask = jnp.where(last, 0, jnp.clip(n_mask, jnp.minimum(1, n_unknown - 1), n_unknown - 1))
        n_mask = jnp.maximum(n_mask, 0)
        # MaskGIT's (and diffusers') rule: re-mask what is strictly below the n_mask-th lowest
        # confidence. Positions tied at the cut-off stay decoded (ties occur only without
        # Gumbel noise, e.g. equal predictions of a fully masked grid).
        cut_off = jnp.take_along_axis(jnp.sort(confidence, axis=-1), n_mask[:, None], axis=-1)
        remask = confidence < cut_off
        new = jnp.where(remask, mask_id, sampled)
        history = history.at[step].set(jnp.sum(new == mask_id, axis=-1))
        return new, rng, history

    history = jnp.zeros((num_steps, tokens.shape[0]), jnp.int32)
    out, _, history = jax.lax.fori_loop(0, num_steps, body, (tokens, rng, history))
    return DecodeResult(tokens=out, num_masked=history)
