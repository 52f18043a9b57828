"""Dense layers' dot and GELU: same values and gradients as jax's, and the weight gradient that
XLA:CPU runs in YNNPACK (a dot contracting a minor axis, not the rows of both operands)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.models import activations, dense_dot, layers
from tests import traced


def _loss(dot, dims):
    # A nonlinear loss: gradients depend on every output element differently.
    return lambda x, w: jnp.sum(jnp.sin(dot(x, w, dims).astype(jnp.float32)))


_CASES = {
    "dense": ((4, 6, 8), (8, 5), (((2,), (0,)), ((), ()))),
    "dense_general_two_axes": ((4, 6, 3, 8), (3, 8, 5), (((2, 3), (0, 1)), ((), ()))),
    "batched_fallback": ((4, 6, 8), (4, 8, 5), (((2,), (1,)), ((0,), (0,)))),
}


@pytest.mark.parametrize("case", list(_CASES))
@pytest.mark.parametrize("transposed", [True, False])
def test_float32_values_and_gradients_equal_jax(case, transposed):
    x_shape, w_shape, dims = _CASES[case]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    ours = dense_dot.dot_general(jnp.float32, transposed)
    ref = jax.lax.dot_general
    np.testing.assert_allclose(ours(x, w, dims), ref(x, w, dims), rtol=1e-6, atol=1e-6)
    got = jax.grad(_loss(ours, dims), (0, 1))(x, w)
    want = jax.grad(_loss(ref, dims), (0, 1))(x, w)
    for g, r in zip(got, want):
        assert g.shape == r.shape and g.dtype == r.dtype
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_bfloat16_takes_bf16_operands_and_accumulates_in_float32_in_both_passes():
    rng = np.random.default_rng(1)
    dims = _CASES["dense"][2]
    x32 = jnp.asarray(rng.standard_normal((16, 32, 256)), jnp.float32)
    w32 = jnp.asarray(rng.standard_normal((256, 64)) / 16, jnp.float32)
    x, w = x32.astype(jnp.bfloat16), w32.astype(jnp.bfloat16)
    ours = dense_dot.dot_general(jnp.bfloat16)
    y = ours(x, w, dims)
    assert y.dtype == jnp.bfloat16
    exact = jax.lax.dot_general(x32.astype(jnp.bfloat16).astype(jnp.float32), w, dims)
    np.testing.assert_allclose(y.astype(jnp.float32), exact, rtol=1e-2, atol=1e-2)
    grads = jax.grad(_loss(ours, dims), (0, 1))
    assert all(g.dtype == jnp.bfloat16 for g in grads(x, w))
    # Forward, input gradient, weight gradient.
    traced.assert_bf16_operands_float32_accumulation(grads, (x, w), "dot_general", 3)


def _eigen_style_dots(hlo: str) -> list[str]:
    """Unfused dots (outside YNNPACK fusions) whose lhs contracts its major axis."""
    return [
        line
        for line in hlo.splitlines()
        if " dot(" in line and "lhs_contracting_dims={0}" in line and "ENTRY" not in line
    ]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the layout concerns XLA:CPU")
def test_weight_gradient_is_a_minor_axis_contraction_on_cpu():
    dims = _CASES["dense"][2]
    x = jnp.ones((32, 64, 128))
    w = jnp.ones((128, 256))
    for transposed, expect_major in ((True, False), (False, True)):
        dot = dense_dot.dot_general(jnp.float32, transposed)
        hlo = jax.jit(jax.grad(_loss(dot, dims), 1)).lower(x, w).compile().as_text()
        assert bool(_eigen_style_dots(hlo)) == expect_major, hlo[-3000:]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the layout concerns XLA:CPU")
def test_mlp_weight_gradients_are_minor_axis_contractions_on_cpu():
    """The GELU-fed output projection too (it kept jax's rule while x^T was materialised)."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((8, 64, 32)), jnp.float32)
    block = layers.MlpBlock(mlp_dim=128)
    params = block.init(jax.random.PRNGKey(0), x)
    loss = lambda p: jnp.sum(jnp.sin(block.apply(p, x)))  # noqa: E731
    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert not _eigen_style_dots(hlo), hlo[-3000:]


def test_flax_dense_with_it_matches_plain_dense():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 7, 16)), jnp.float32)
    plain = nn.DenseGeneral((4, 8))
    ours = nn.DenseGeneral((4, 8), dot_general=dense_dot.dot_general(jnp.float32))
    params = plain.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(params) == jax.tree.structure(ours.init(jax.random.PRNGKey(0), x))
    np.testing.assert_allclose(ours.apply(params, x), plain.apply(params, x), rtol=1e-6, atol=1e-6)
    g_ours = jax.grad(lambda p: jnp.sum(jnp.tanh(ours.apply(p, x))))(params)
    g_plain = jax.grad(lambda p: jnp.sum(jnp.tanh(plain.apply(p, x))))(params)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gelu_equals_jax_tanh_gelu_with_gradients():
    x = jnp.linspace(-8.0, 8.0, 4001, dtype=jnp.float32)
    np.testing.assert_allclose(
        activations.gelu(x), jax.nn.gelu(x, approximate=True), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        jax.grad(lambda v: jnp.sum(activations.gelu(v)))(x),
        jax.grad(lambda v: jnp.sum(jax.nn.gelu(v, approximate=True)))(x),
        rtol=1e-5,
        atol=1e-5,  # Both lose digits to 1 - tanh^2 where the slope is ~1e-5 (x ~ -4.6).
    )
    bf = x.astype(jnp.bfloat16)
    assert activations.gelu(bf).dtype == jnp.bfloat16
    assert jax.grad(lambda v: jnp.sum(activations.gelu(v).astype(jnp.float32)))(bf).dtype == (
        jnp.bfloat16
    )


def test_gelu_backward_keeps_only_its_input():
    x = jnp.ones((8, 16))
    _, vjp = jax.vjp(activations.gelu, x)
    residuals = [leaf for leaf in jax.tree.leaves(vjp) if isinstance(leaf, jax.Array)]
    assert len(residuals) == 1 and residuals[0].shape == x.shape
