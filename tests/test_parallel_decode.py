"""The model-agnostic iterative decoder: invariants, not exact numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.sampling import parallel_decode

VOCAB, MASK = 10, 10


def random_logits_fn(seed=0, length=16):
    table = jax.random.normal(jax.random.PRNGKey(seed), (length, VOCAB)) * 2

    def fn(tokens, step):
        del step
        return jnp.broadcast_to(table, tokens.shape + (VOCAB,))

    return fn


@pytest.mark.parametrize("num_steps", [1, 4, 12])
@pytest.mark.parametrize("seed", [0, 1])
def test_decodes_every_token_in_exactly_num_steps(num_steps, seed):
    tokens = jnp.full((3, 16), MASK, jnp.int32)
    calls = []

    def fn(tokens, step):
        jax.debug.callback(lambda s: calls.append(int(s)), step)
        return random_logits_fn(seed)(tokens, step)

    out = parallel_decode.decode(
        tokens, jax.random.PRNGKey(seed), fn, mask_id=MASK, num_steps=num_steps
    )
    jax.effects_barrier()
    assert sorted(calls) == [s for s in range(num_steps) for _ in range(1)]
    t = np.asarray(out.tokens)
    assert np.all((t >= 0) & (t < VOCAB))
    masked = np.asarray(out.num_masked)
    assert masked.shape == (num_steps, 3)
    assert np.all(masked[-1] == 0)
    # Strictly fewer masked tokens after every step: each step decodes at least one.
    prev = np.concatenate([np.full((1, 3), 16), masked[:-1]])
    assert np.all(masked < prev)


def test_masked_counts_follow_the_cosine_schedule():
    out = parallel_decode.decode(
        jnp.full((1, 64), MASK, jnp.int32),
        jax.random.PRNGKey(0),
        random_logits_fn(length=64),
        mask_id=MASK,
        num_steps=8,
    )
    expected = [int(np.floor(64 * np.cos(np.pi / 2 * (t + 1) / 8))) for t in range(8)]
    np.testing.assert_array_equal(np.asarray(out.num_masked)[:, 0], expected)


def test_fixed_tokens_stay_fixed():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, size=(4, 16))
    holes = rng.random((4, 16)) < 0.5
    tokens = jnp.asarray(np.where(holes, MASK, tokens), jnp.int32)
    out = parallel_decode.decode(
        tokens, jax.random.PRNGKey(3), random_logits_fn(), mask_id=MASK, num_steps=5
    )
    t = np.asarray(out.tokens)
    np.testing.assert_array_equal(t[~holes], np.asarray(tokens)[~holes])
    assert np.all(t != MASK)


def test_nothing_to_decode_returns_input():
    tokens = jnp.asarray(np.arange(16).reshape(1, 16) % VOCAB, jnp.int32)
    out = parallel_decode.decode(
        tokens, jax.random.PRNGKey(0), random_logits_fn(), mask_id=MASK, num_steps=3
    )
    np.testing.assert_array_equal(out.tokens, tokens)


def test_fixed_seed_reproduces_and_other_seed_differs():
    tokens = jnp.full((2, 16), MASK, jnp.int32)
    fn = random_logits_fn()
    kw = dict(mask_id=MASK, num_steps=4, temperature=3.0)
    a = parallel_decode.decode(tokens, jax.random.PRNGKey(7), fn, **kw).tokens
    b = parallel_decode.decode(tokens, jax.random.PRNGKey(7), fn, **kw).tokens
    c = parallel_decode.decode(tokens, jax.random.PRNGKey(8), fn, **kw).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_low_temperature_picks_the_argmax():
    out = parallel_decode.decode(
        jnp.full((2, 16), MASK, jnp.int32),
        jax.random.PRNGKey(0),
        random_logits_fn(),
        mask_id=MASK,
        num_steps=4,
        temperature=1e-4,
        choice_temperature=0.0,
    )
    best = np.argmax(np.asarray(random_logits_fn()(jnp.zeros((2, 16), jnp.int32), 0)), -1)
    np.testing.assert_array_equal(out.tokens, best)


def test_zero_steps_is_an_error():
    with pytest.raises(ValueError, match="num_steps"):
        parallel_decode.decode(
            jnp.zeros((1, 4), jnp.int32),
            jax.random.PRNGKey(0),
            random_logits_fn(length=4),
            mask_id=MASK,
            num_steps=0,
        )


@pytest.mark.parametrize(
    "vocab, pattern",
    [(7, "random"), (64, "random"), (1000, "random"), (64, "blocks"), (1000, "tail")],
)
def test_inverse_cdf_sampling_draws_from_the_softmax(vocab, pattern):
    """Frequencies of 40k draws match softmax(logits) (chi-square), zero-mass entries never:
    scattered -inf entries, whole blocks of -inf, or all mass in the padded last block."""
    from scipy import stats

    from muse_jax.sampling import categorical

    rng = np.random.default_rng(vocab)
    logits = rng.normal(size=vocab) * 2
    if pattern == "random":
        logits[rng.choice(vocab, size=max(1, vocab // 5), replace=False)] = -np.inf
    elif pattern == "blocks":  # Blocks of 8: every other one empty.
        logits.reshape(-1, 8)[::2] = -np.inf
    else:  # Blocks of 32 (1024 padded slots): only the last, partly padded one has mass.
        logits[: 32 * 31] = -np.inf
    n = 40_000
    draws = np.asarray(jax.jit(categorical.sample)(jax.random.PRNGKey(0), jnp.tile(logits, (n, 1))))
    counts = np.bincount(draws, minlength=vocab)
    assert len(counts) == vocab
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert counts[p == 0].sum() == 0
    keep = p * n >= 5  # Chi-square needs expected counts >= 5; the rest are pooled.
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(p[keep] * n, p[~keep].sum() * n)
    observed, expected = observed[expected > 0], expected[expected > 0]
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    # Same key, same draws; other key, other draws; batch shape is kept.
    few = jnp.tile(jnp.asarray(logits), (2, 50, 1))
    a, b, c = (categorical.sample(jax.random.PRNGKey(k), few) for k in (1, 1, 2))
    assert a.shape == (2, 50) and a.dtype == jnp.int32
    np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(a) != np.asarray(c))
