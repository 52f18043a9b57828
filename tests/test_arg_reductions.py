"""The two-reduction argmin/argmax agree with jnp's: ties, NaN, infinities, integer-valued rows."""

import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.models import arg_reductions


def _cases():
    rng = np.random.default_rng(0)
    yield "normal", rng.standard_normal((64, 37)).astype(np.float32)
    yield "ties", rng.integers(0, 3, (64, 37)).astype(np.float32)  # Many equal extrema per row.
    x = rng.standard_normal((8, 37)).astype(np.float32)
    x[0, [5, 9]] = np.nan
    x[1, 3] = -np.inf
    x[2, 4] = np.inf
    x[3, :] = np.inf
    x[4, :] = -np.inf
    x[5, :] = np.nan
    yield "special", x
    yield "rank3", rng.standard_normal((4, 16, 512)).astype(np.float32)


@pytest.mark.parametrize("name,x", list(_cases()), ids=[c[0] for c in _cases()])
def test_matches_jnp(name, x):
    x = jnp.asarray(x)
    np.testing.assert_array_equal(arg_reductions.argmin(x), jnp.argmin(x, axis=-1))
    np.testing.assert_array_equal(arg_reductions.argmax(x), jnp.argmax(x, axis=-1))
    assert arg_reductions.argmin(x).dtype == jnp.int32
