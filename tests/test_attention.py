"""The heads-major attention against `jax.nn.dot_product_attention`: values, gradients, masks."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.models import attention, factory
from muse_jax.models.transformer import MaskedTransformer

B, T, S, N, H = 3, 12, 7, 2, 8


def _inputs(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, N, H))
    k, v = rng.normal(size=(2, B, S, N, H))
    w = rng.normal(size=(B, T, N, H))  # Output cotangent weights.
    return [jnp.asarray(x, dtype) for x in (q, k, v, w)]


def _masks():
    rng = np.random.default_rng(1)
    key_padding = rng.uniform(size=(B, 1, 1, S)) < 0.6
    key_padding[:, :, :, 0] = True
    per_query = rng.uniform(size=(B, N, T, S)) < 0.5
    per_query[0, 1, 3] = False  # One row with every key masked.
    return {"none": None, "key_padding": key_padding, "per_query_with_empty_row": per_query}


@pytest.mark.parametrize("mask_name", ["none", "key_padding", "per_query_with_empty_row"])
def test_heads_major_matches_jax_values_and_gradients(mask_name):
    mask = _masks()[mask_name]
    mask = None if mask is None else jnp.asarray(mask)
    q, k, v, w = _inputs()

    def loss(impl):
        def f(q, k, v):
            out = attention.dot_product_attention(q, k, v, mask, impl)
            return jnp.sum(out * w), out

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    (_, ref), ref_grads = loss("xla")(q, k, v)
    (_, out), grads = loss("heads_major")(q, k, v)
    assert out.shape == (B, T, N, H) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if mask_name == "per_query_with_empty_row":  # Uniform over all keys, as jax does.
        np.testing.assert_allclose(out[0, 3, 1], jnp.mean(v[0, :, 1], axis=0), atol=1e-5)


def test_masked_keys_get_no_weight_and_no_gradient():
    q, k, v, w = _inputs()
    mask = jnp.asarray(_masks()["key_padding"])
    f = lambda k, v: jnp.sum(attention.dot_product_attention(q, k, v, mask, "heads_major") * w)
    d_k, d_v = jax.grad(f, argnums=(0, 1))(k, v)
    masked = ~np.asarray(mask[:, 0, 0, :])  # [B, S]
    assert masked.any()
    assert np.all(np.asarray(d_k)[masked] == 0) and np.all(np.asarray(d_v)[masked] == 0)
    changed = v.at[jnp.asarray(masked)].set(1e3)
    np.testing.assert_allclose(
        attention.dot_product_attention(q, k, changed, mask, "heads_major"),
        attention.dot_product_attention(q, k, v, mask, "heads_major"),
        atol=1e-6,
    )


def test_bfloat16_heads_major_stays_within_bfloat16_error_of_float32():
    q, k, v, w = _inputs(2)
    ref = attention.dot_product_attention(q, k, v, None, "xla")
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = jax.jit(lambda *a: attention.dot_product_attention(*a, None, "heads_major"))(*half)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=3e-2)
    loss = lambda impl, *a: jnp.sum(
        attention.dot_product_attention(*a, None, impl).astype(jnp.float32) * w
    )
    grads = jax.grad(functools.partial(loss, "heads_major"), argnums=(0, 1, 2))(*half)
    ref_grads = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), want, atol=5e-2)


def test_model_logits_and_gradients_agree_across_implementations():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 33, size=(2, 16)), jnp.int32)
    ctx = jnp.asarray(rng.normal(size=(2, 5, 12)), jnp.float32)
    ctx_mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.int32)
    make = lambda impl: MaskedTransformer(
        vocab_size=32, seq_len=16, width=32, depth=2, num_heads=2, mlp_dim=64, attention=impl
    )
    params = nn.unbox(make("xla").init(jax.random.PRNGKey(0), tokens, ctx, ctx_mask))

    def loss(impl):
        f = lambda p: jnp.mean(make(impl).apply(p, tokens, ctx, ctx_mask) ** 2)
        return jax.value_and_grad(f)(params)

    (ref, ref_grads), (got, grads) = loss("xla"), loss("heads_major")
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_unknown_implementation_is_a_clear_config_error(smoke_config):
    smoke_config.base.model.attention = "flash"
    with pytest.raises(ValueError, match="attention implementation 'flash'.*heads_major"):
        model = factory.base_transformer(smoke_config)
        tokens = jnp.zeros((1, model.seq_len), jnp.int32)
        model.init(jax.random.PRNGKey(0), tokens, jnp.zeros((1, 4, 8)), jnp.ones((1, 4)))


@pytest.mark.parametrize("mask_name", ["none", "key_padding", "per_query_with_empty_row"])
def test_xla_path_in_query_blocks_gives_the_same_values_and_gradients(mask_name):
    """Large score tensors go through in query blocks (`MAX_SCORE_ELEMENTS`): same numbers."""
    mask = _masks()[mask_name]
    mask = None if mask is None else jnp.asarray(mask)
    q, k, v, w = _inputs()
    full = B * N * T * S

    def run(limit):
        def f(q, k, v):
            out = attention.dot_product_attention(q, k, v, mask, "xla", max_score_elements=limit)
            return jnp.sum(out * w), out

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    assert attention._query_blocks(B, N, T, S, full // 3) == 3
    (_, ref), ref_grads = run(full)
    (_, out), grads = run(full // 3)  # Three blocks of four queries.
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
