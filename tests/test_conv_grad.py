"""The VQGAN's convolution: jax's values and gradients for every stride/padding it may meet, and
gradients that stay canonical NHWC/HWIO convolutions (YNNPACK's form) inside a loop, where
jax's own rule leaves XLA:CPU's naive convolution."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.models import conv_grad
from muse_jax.models.discriminator import PatchDiscriminator
from tests import traced

_NHWC = ("NHWC", "HWIO", "NHWC")
# conv_grad takes over on CPU only; elsewhere it is lax and these would compare lax with lax.
_CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu", reason="conv_grad is CPU-only")

# (input [B, H, W, C], kernel, output channels, stride, padding)
_CASES = {
    "3x3_same": ((2, 8, 9, 6), 3, 5, 1, "SAME"),
    "1x1": ((2, 8, 8, 6), 1, 4, 1, "SAME"),
    "4x4_stride2_same": ((2, 8, 8, 3), 4, 5, 2, "SAME"),
    "4x4_stride2_odd_size": ((1, 9, 7, 3), 4, 5, 2, "SAME"),
    "3x3_stride2_valid": ((2, 7, 7, 3), 3, 4, 2, "VALID"),
    "uneven_explicit_padding_stride3": ((1, 10, 11, 3), 3, 5, 3, ((2, 0), (1, 3))),
    "5x5_same": ((1, 6, 6, 2), 5, 3, 1, "SAME"),
}


def _inputs(x_shape, k, features, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, x_shape[-1], features)) / k, jnp.float32)
    return x, w


def _loss(conv, stride, padding):
    # A nonlinear loss: gradients depend on every output element differently.
    return lambda x, w: jnp.sum(
        jnp.sin(conv(x, w, (stride, stride), padding, dimension_numbers=_NHWC))
    )


@pytest.mark.parametrize("case", list(_CASES))
@_CPU_ONLY
def test_values_and_gradients_equal_jax(case):
    x_shape, k, features, stride, padding = _CASES[case]
    x, w = _inputs(x_shape, k, features)
    ours, ref = conv_grad.conv_general_dilated(jnp.float32), jax.lax.conv_general_dilated
    np.testing.assert_allclose(
        ours(x, w, (stride, stride), padding, dimension_numbers=_NHWC),
        ref(x, w, (stride, stride), padding, dimension_numbers=_NHWC),
        rtol=1e-5,
        atol=1e-5,
    )
    got = jax.grad(_loss(ours, stride, padding), (0, 1))(x, w)
    want = jax.grad(_loss(ref, stride, padding), (0, 1))(x, w)
    for g, r in zip(got, want):
        assert g.shape == r.shape and g.dtype == r.dtype
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_grouped_convolution_falls_back_to_lax():
    x, _ = _inputs((2, 6, 6, 4), 3, 4)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 2, 4)), jnp.float32)
    conv = lambda f: (
        lambda x, w: jnp.sum(
            jnp.sin(f(x, w, (1, 1), "SAME", dimension_numbers=_NHWC, feature_group_count=2))
        )
    )
    got = jax.grad(conv(conv_grad.conv_general_dilated(jnp.float32)), (0, 1))(x, w)
    want = jax.grad(conv(jax.lax.conv_general_dilated), (0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_flax_conv_with_it_matches_flax_default():
    x, _ = _inputs((2, 8, 8, 3), 3, 4)
    ours = nn.Conv(
        6, (4, 4), strides=(2, 2), conv_general_dilated=conv_grad.conv_general_dilated(jnp.float32)
    )
    ref = nn.Conv(6, (4, 4), strides=(2, 2))
    params = ref.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(ours.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(params)
    loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply(p, x)))
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
    for g, r in zip(
        jax.tree.leaves(jax.grad(loss(ours))(params)), jax.tree.leaves(jax.grad(loss(ref))(params))
    ):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@_CPU_ONLY
def test_bfloat16_takes_bf16_operands_and_accumulates_in_float32_in_both_passes():
    x32, w32 = _inputs((2, 8, 8, 16), 3, 8)
    x, w = x32.astype(jnp.bfloat16), w32.astype(jnp.bfloat16)
    ours = conv_grad.conv_general_dilated(jnp.bfloat16)
    y = ours(x, w, (1, 1), "SAME", dimension_numbers=_NHWC)
    assert y.dtype == jnp.bfloat16
    exact = jax.lax.conv_general_dilated(
        x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), "SAME", dimension_numbers=_NHWC
    )
    np.testing.assert_allclose(y.astype(jnp.float32), exact, rtol=2e-2, atol=2e-2)
    grads = jax.grad(lambda x, w: _loss(ours, 1, "SAME")(x, w).astype(jnp.float32), (0, 1))
    assert all(g.dtype == jnp.bfloat16 for g in grads(x, w))
    # Forward, input gradient, weight gradient.
    traced.assert_bf16_operands_float32_accumulation(grads, (x, w), "conv_general_dilated", 3)


def _non_canonical_convolutions(loss, params, x) -> list[str]:
    """The convolutions of XLA:CPU's program for three gradient steps of `loss(params, x)` in a
    scan that are not NHWC x HWIO -> NHWC (the form YNNPACK runs; others go to XLA's naive
    emitter, 150x slower for the tokenizer's weight gradients)."""

    def steps(params, x):
        def body(p, _):
            g = jax.grad(loss)(p, x)
            return jax.tree.map(lambda a, b: a - 1e-3 * b, p, g), None

        return jax.lax.scan(body, params, None, length=3)[0]

    hlo = jax.jit(steps).lower(params, x).compile().as_text()
    labels = re.findall(r" convolution\(.*?dim_labels=([^,\s]+)", hlo)
    assert labels, "no convolution in the compiled program"
    return [label for label in labels if label != "b01f_01io->b01f"]


def _two_layers(conv):
    """A 3x3 convolution, then a 4x4 stride-2 one (8x8 -> 4x4): loss of (input, w1, w2)."""

    def loss(xw, _):
        x, w1, w2 = xw
        h = jnp.sin(conv(x, w1, (1, 1), "SAME", dimension_numbers=_NHWC))
        return jnp.sum(jnp.sin(conv(h, w2, (2, 2), "SAME", dimension_numbers=_NHWC)))

    return loss


@_CPU_ONLY
def test_gradients_in_a_loop_stay_canonical_convolutions():
    """Input and weight gradients of both layers (the input is updated too)."""
    x, w1 = _inputs((4, 8, 8, 32), 3, 32)
    _, w2 = _inputs((4, 8, 8, 32), 4, 16, seed=1)
    ours = _two_layers(conv_grad.conv_general_dilated(jnp.float32))
    assert _non_canonical_convolutions(ours, (x, w1, w2), None) == []
    # jax's own rule leaves the weight gradients in another layout there (why conv_grad exists).
    assert _non_canonical_convolutions(_two_layers(jax.lax.conv_general_dilated), (x, w1, w2), None)


@_CPU_ONLY
def test_discriminator_gradients_in_a_loop_stay_canonical_convolutions():
    disc = PatchDiscriminator(channels=4)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 16, 16, 3)), jnp.float32)
    params = disc.init(jax.random.PRNGKey(0), x)
    loss = lambda p, x: jnp.sum(jnp.sin(disc.apply(p, x)))
    assert _non_canonical_convolutions(loss, params, x) == []
