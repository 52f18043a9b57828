"""Self-critic refinement: re-mask the generated tokens the model itself finds least likely,
and decode them again.

Parallel decoding commits several tokens per step, each sampled on its own. Where the
neighbours of a token are still masked, the tokens of one object can disagree (a square's
corner beside a circle's arc): the decoded object is a blob between shapes, and nothing in
MaskGIT's loop ever revisits a committed token. Token-Critic (Lezama et al., 2022) trains a
second network to find such tokens. Here the generator is its own critic, so nothing more is
trained: each round scores every generated token by log p(token | the other tokens, prompt),
with the token and a spread-out quarter of the grid masked (four passes in all), re-masks the
least likely `fraction` of them, and fills those in with the ordinary decoding loop, now
given the rest of the image.

Only positions the caller asked to generate (the [MASK] positions of the initial tokens) are
ever re-masked, so inpainting and editing keep their fixed tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.errors import UsageError

# The defaults of `Settings` (and of a sampling block that predates refinement).
DEFAULT_FRACTION = 0.2
DEFAULT_STEPS = 4


def check_settings(rounds: int, fraction: float, steps: int = DEFAULT_STEPS) -> None:
    """One-line refusals of refinement settings that cannot run."""
    if rounds < 0:
        raise UsageError(f"refine_rounds must be >= 0 (0: off), got {rounds}.")
    if rounds and not 0.0 < fraction <= 1.0:
        raise UsageError(f"refine_fraction must be in (0, 1], got {fraction}.")
    if steps < 1:
        raise UsageError(f"refine_steps must be >= 1, got {steps}.")


# Scale of the token log-probability against unit Gumbel noise when choosing what to re-mask:
# large enough that the least likely tokens go first, with a little randomness among near-ties.
CRITIC_SHARPNESS = 30.0


def phase_groups(length: int) -> np.ndarray:
    """bool [G, length]: positions split into groups scored together, each spread out.

    A square grid splits by (row parity, column parity) into 4 groups, so every masked token
    keeps its 4 direct neighbours visible; any other length splits by position mod 4.
    """
    if length < 1:
        raise UsageError(f"length must be >= 1, got {length}.")
    pos = np.arange(length)
    side = int(round(length**0.5))
    if side * side == length:
        phase = (pos // side % 2) * 2 + pos % side % 2
    else:
        phase = pos % 4
    return np.stack([phase == g for g in range(4) if np.any(phase == g)])


def token_log_probs(
    tokens: jax.Array,
    logits_fn: Callable[[jax.Array], jax.Array],
    mask_id: int,
) -> jax.Array:
    """[B, L]: log p(tokens[b, i] | the other tokens) with i's phase group masked.

    Args:
      tokens: [B, L] complete token grids (no [MASK]).
      logits_fn: tokens [B, L] -> logits [B, L, V] (conditioned on the prompt).
      mask_id: the [MASK] id.
    """
    chex.assert_rank(tokens, 2)
    scores = jnp.zeros(tokens.shape, jnp.float32)
    for group in phase_groups(tokens.shape[1]):
        g = jnp.asarray(group)[None]
        logits = logits_fn(jnp.where(g, mask_id, tokens)).astype(jnp.float32)
        chosen = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
        scores = jnp.where(g, chosen - jax.nn.logsumexp(logits, axis=-1), scores)
    return scores


def choose_remask(
    rng: jax.Array, scores: jax.Array, candidates: jax.Array, fraction: float
) -> jax.Array:
    """bool [B, L]: round(fraction * candidates per row) candidate positions, lowest scores
    first (Gumbel top-k on `-CRITIC_SHARPNESS * scores`); at least one where a row has any."""
    chex.assert_equal_shape((scores, candidates))
    n_cand = jnp.sum(candidates, axis=-1)
    count = jnp.clip(jnp.round(fraction * n_cand).astype(jnp.int32), jnp.minimum(n_cand, 1), n_cand)
    return gumbel_lowest(rng, CRITIC_SHARPNESS * scores, candidates, count)


def gumbel_lowest(
    rng: jax.Array, scores: jax.Array, candidates: jax.Array, count: jax.Array
) -> jax.Array:
    """bool [B, L]: `count[b]` of row b's candidate positions, drawn without replacement with
    weights exp(-scores) (Gumbel top-k): the lowest scores most likely, equal scores uniformly.

    The one choice of tokens to re-sample, shared by refinement and mask-free editing.
    """
    chex.assert_equal_shape((scores, candidates))
    chex.assert_shape(count, scores.shape[:1])
    keys = jax.random.gumbel(rng, scores.shape) - scores
    keys = jnp.where(candidates, keys, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-keys, axis=-1), axis=-1)  # 0 = the first chosen.
    return (rank < count[:, None]) & candidates


def refine(
    tokens: jax.Array,
    generated: jax.Array,
    rng: jax.Array,
    *,
    score_logits_fn: Callable[[jax.Array], jax.Array],
    redecode: Callable[[jax.Array, jax.Array], jax.Array],
    mask_id: int,
    rounds: int,
    fraction: float,
) -> jax.Array:
    """`rounds` rounds of self-critic re-masking and re-decoding.

    Args:
      tokens: [B, L] decoded tokens.
      generated: bool [B, L], True where the tokens were generated (may be re-masked).
      rng: PRNG key.
      score_logits_fn: tokens -> logits [B, L, V], the prompt's (conditional) logits.
      redecode: (tokens with [MASK]s, rng) -> [B, L] tokens with every [MASK] filled.
      mask_id: the [MASK] id.
      rounds: refinement rounds (static; 0 returns `tokens`).
      fraction: share of the generated tokens re-masked per round, in (0, 1].
    Returns:
      [B, L] refined tokens.
    """
    check_settings(rounds, fraction)
    chex.assert_equal_shape((tokens, generated))
    for r in range(rounds):
        pick_rng, decode_rng = jax.random.split(jax.random.fold_in(rng, r))
        scores = token_log_probs(tokens, score_logits_fn, mask_id)
        remask = choose_remask(pick_rng, scores, generated, fraction)
        tokens = redecode(jnp.where(remask, mask_id, tokens), decode_rng)
    return tokens
