"""Masking schedules, training masks, and the loss taken on masked positions only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.sampling import mask_schedule
from muse_jax.train import losses


@pytest.mark.parametrize("name", ["cosine", "linear", "square", "sqrt"])
def test_schedule_runs_from_all_masked_to_none_and_decreases(name):
    gamma = mask_schedule.get(name)
    r = jnp.linspace(0, 1, 101)
    g = np.asarray(gamma(r))
    assert g[0] == pytest.approx(1.0)
    assert g[-1] == pytest.approx(0.0, abs=1e-6)
    assert np.all(np.diff(g) <= 1e-7)


def test_unknown_schedule_names_the_valid_ones():
    with pytest.raises(ValueError, match="cosine"):
        mask_schedule.get("cosinus")


def test_random_mask_counts_follow_the_cosine_schedule():
    batch, length = 4096, 64
    mask = np.asarray(mask_schedule.random_mask(jax.random.PRNGKey(0), (batch, length), "cosine"))
    counts = mask.sum(-1)
    assert counts.min() >= 1 and counts.max() <= length
    # E[cos(pi r / 2)] over r ~ U(0, 1) = 2 / pi; ceil adds < 1 token per row.
    assert counts.mean() / length == pytest.approx(2 / np.pi, abs=0.02)
    # Every position is masked about equally often (no positional bias).
    per_pos = mask.mean(0)
    assert per_pos.max() - per_pos.min() < 0.1


def test_loss_ignores_unmasked_positions():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 16, size=(2, 8)))
    mask = jnp.asarray(rng.random((2, 8)) < 0.5).at[:, 0].set(True).at[:, 1].set(False)
    base, _ = losses.masked_cross_entropy(logits, targets, mask)
    # Changing logits where mask is False must not change the loss ...
    perturbed = jnp.where(mask[..., None], logits, logits + 100 * rng.normal(size=logits.shape))
    same, _ = losses.masked_cross_entropy(perturbed, targets, mask)
    np.testing.assert_allclose(base, same, rtol=1e-6)
    # ... and its gradient there is exactly zero, while masked positions get gradient.
    grad = jax.grad(lambda lg: losses.masked_cross_entropy(lg, targets, mask)[0])(logits)
    assert np.all(np.asarray(grad)[~np.asarray(mask)] == 0)
    assert np.all(np.abs(np.asarray(grad)[np.asarray(mask)]).sum(-1) > 0)


def test_loss_equals_mean_cross_entropy_of_masked_positions():
    logits = jnp.log(jnp.asarray([[[0.5, 0.5], [0.9, 0.1]]]))
    targets = jnp.asarray([[0, 1]])
    loss, acc = losses.masked_cross_entropy(logits, targets, jnp.asarray([[False, True]]))
    np.testing.assert_allclose(loss, -np.log(0.1), rtol=1e-6)
    assert float(acc) == 0.0
