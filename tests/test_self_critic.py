"""Self-critic refinement: which tokens it re-masks, that it mends disagreeing tokens, and that
the sampler keeps fixed tokens with it on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.errors import UsageError
from muse_jax.sampling import parallel_decode, self_critic


def test_phase_groups_partition_the_grid_and_keep_neighbours_apart():
    groups = self_critic.phase_groups(64)
    assert groups.shape == (4, 64)
    np.testing.assert_array_equal(groups.sum(0), np.ones(64))  # Each position in one group.
    for g in groups:
        grid = g.reshape(8, 8)
        # No two 4-neighbours masked together: each scored token sees its direct neighbours.
        assert not np.any(grid[1:] & grid[:-1]) and not np.any(grid[:, 1:] & grid[:, :-1])
    odd = self_critic.phase_groups(10)
    np.testing.assert_array_equal(odd.sum(0), np.ones(10))
    with pytest.raises(UsageError):
        self_critic.phase_groups(0)


def test_choose_remask_takes_the_least_likely_candidates_only():
    scores = jnp.asarray([[-9.0, 0.0, -5.0, -0.1, -7.0, -0.2, 0.0, -0.3]] * 2)
    candidates = jnp.asarray([[True] * 8, [True, True, True, True, False, False, False, False]])
    pick = np.asarray(self_critic.choose_remask(jax.random.PRNGKey(0), scores, candidates, 0.25))
    # Row 0: 2 of 8, the two lowest (-9, -7). Row 1: 1 of 4 candidates, the lowest (-9);
    # position 4 (-7) is not a candidate.
    np.testing.assert_array_equal(np.flatnonzero(pick[0]), [0, 4])
    np.testing.assert_array_equal(np.flatnonzero(pick[1]), [0])


def _consistent_logits(target: np.ndarray, vocab: int):
    """A toy model: each position predicts the token its visible neighbours agree on.

    The "right" grid is `target`; a position with a visible, right left or right neighbour
    predicts target strongly, otherwise it is unsure (flat logits). So a wrong token among
    right ones gets a low score, and is re-decoded to the target.
    """
    t = jnp.asarray(target)

    def logits_fn(tokens):
        right = tokens == t
        padded = jnp.pad(right, ((0, 0), (1, 1)))
        nb = padded[:, :-2] | padded[:, 2:]
        onehot = jax.nn.one_hot(t, vocab) * 8.0
        return jnp.where(nb[..., None], onehot, 0.0) + 0.0 * tokens[..., None]

    return logits_fn


def test_refine_mends_wrong_generated_tokens_and_keeps_fixed_ones():
    vocab, mask_id = 5, 5
    target = np.tile(np.arange(16) % 4, (2, 1)).astype(np.int32)  # [2, 16]
    tokens = target.copy()
    tokens[:, [3, 9]] = 4  # Two generated tokens the neighbours disagree with.
    tokens[1, 12] = 4  # A fixed (not generated) wrong token: refinement must keep it.
    generated = np.ones_like(tokens, bool)
    generated[1, 12] = False
    logits_fn = _consistent_logits(target, vocab)

    def redecode(t, key):
        return parallel_decode.decode(
            t, key, lambda x, s: logits_fn(x), mask_id=mask_id, num_steps=2, temperature=0.0,
            choice_temperature=0.0,
        ).tokens  # fmt: skip

    out = self_critic.refine(
        jnp.asarray(tokens),
        jnp.asarray(generated),
        jax.random.PRNGKey(0),
        score_logits_fn=logits_fn,
        redecode=redecode,
        mask_id=mask_id,
        rounds=2,
        fraction=0.125,  # 2 of 16 per round.
    )
    out = np.asarray(out)
    np.testing.assert_array_equal(out[0], target[0])
    assert out[1, 12] == 4
    np.testing.assert_array_equal(np.delete(out[1], 12), np.delete(target[1], 12))
    # No rounds: unchanged.
    same = self_critic.refine(
        jnp.asarray(tokens), jnp.asarray(generated), jax.random.PRNGKey(0),
        score_logits_fn=logits_fn, redecode=redecode, mask_id=mask_id, rounds=0, fraction=0.2,
    )  # fmt: skip
    np.testing.assert_array_equal(same, tokens)


def test_bad_refinement_settings_are_one_line_errors():
    from configs import shapes_tiny
    from muse_jax.sampling.sampler import Settings

    cfg = shapes_tiny.get_config("smoke").base.sampling
    with pytest.raises(UsageError, match="refine_fraction"):
        Settings.from_config(cfg, refine_rounds=2, refine_fraction=1.5)
    with pytest.raises(UsageError, match="refine_rounds"):
        Settings.from_config(cfg, refine_rounds=-1)
    with pytest.raises(UsageError, match="refine_steps"):
        Settings.from_config(cfg, refine_rounds=1, refine_steps=0)
    # A sampling block from before refinement (no refine keys) samples without it.
    old = cfg.copy_and_resolve_references()
    for k in ("refine_rounds", "refine_fraction", "refine_steps"):
        if k in old:
            del old[k]
    assert Settings.from_config(old).refine_rounds == 0
