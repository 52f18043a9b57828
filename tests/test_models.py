"""Model invariants: cached text keys/values, padding, tokenizer shapes, quantiser lookup."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.models import factory
from muse_jax.models.transformer import MaskedTransformer, TinyTextEncoder
from muse_jax.models.vqgan import VQGAN, VectorQuantizer


@pytest.fixture(scope="module")
def tiny_transformer():
    model = MaskedTransformer(vocab_size=32, seq_len=16, width=32, depth=2, num_heads=2, mlp_dim=64)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 33, size=(2, 16)), jnp.int32)
    ctx = jnp.asarray(rng.normal(size=(2, 5, 12)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.int32)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens, ctx, mask))
    return model, params, tokens, ctx, mask


def test_precomputed_text_kv_gives_the_same_logits(tiny_transformer):
    model, params, tokens, ctx, mask = tiny_transformer
    direct = model.apply(params, tokens, ctx, mask)
    kv = model.apply(params, ctx, method=model.encode_context)
    cached = model.apply(params, tokens, kv, mask, method=model.logits)
    assert direct.shape == (2, 16, 32)
    np.testing.assert_allclose(direct, cached, rtol=1e-6, atol=1e-6)


def test_padded_text_positions_do_not_change_logits(tiny_transformer):
    model, params, tokens, ctx, mask = tiny_transformer
    base = model.apply(params, tokens, ctx, mask)
    ctx2 = ctx.at[0, 3:].set(100.0)  # Example 0 pads positions 3 and 4.
    changed = model.apply(params, tokens, ctx2, mask)
    np.testing.assert_allclose(base[0], changed[0], rtol=1e-5, atol=1e-5)
    ctx3 = ctx.at[0, 0].set(5.0)  # A real text position does matter.
    assert not np.allclose(base[0], model.apply(params, tokens, ctx3, mask)[0], atol=1e-4)


def test_logical_axis_names_on_every_parameter(tiny_transformer):
    model, _, tokens, ctx, mask = tiny_transformer
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, ctx, mask)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == len(leaf.value.shape)


def test_text_encoder_zeroes_padding():
    enc = TinyTextEncoder(vocab_size=20, max_length=8, width=16, depth=1, num_heads=2, mlp_dim=32)
    ids = jnp.asarray([[3, 4, 1, 0, 0, 0, 0, 0]])
    mask = (ids > 0).astype(jnp.int32).at[0, 2].set(1)
    params = nn.unbox(enc.init(jax.random.PRNGKey(0), ids, mask))
    out = np.asarray(enc.apply(params, ids, mask))
    assert np.all(out[0, 3:] == 0) and np.all(np.abs(out[0, :3]).sum(-1) > 0)


@pytest.mark.parametrize("patch,mult,factor", [(4, (1,), 4), (1, (1, 2, 2), 4), (2, (1, 2), 4)])
def test_tokenizer_round_trip_shapes(patch, mult, factor):
    vq = VQGAN(
        channels=8,
        channel_mult=mult,
        num_res_blocks=1,
        embedding_dim=4,
        codebook_size=16,
        norm_groups=4 if patch == 1 else 0,
        patch_size=patch,
    )
    assert vq.downsample_factor == factor
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3), minval=-1, maxval=1)
    params = nn.unbox(vq.init(jax.random.PRNGKey(1), x))
    ids = vq.apply(params, x, method=vq.tokenize)
    assert ids.shape == (2, (16 // factor) ** 2)
    assert ids.min() >= 0 and ids.max() < 16
    images = vq.apply(params, ids, method=vq.decode_ids)
    assert images.shape == (2, 16, 16, 3)
    recon, _, _ = vq.apply(params, x)
    np.testing.assert_allclose(images, recon, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("l2", [True, False])
def test_quantizer_picks_the_nearest_codeword(l2):
    q = VectorQuantizer(codebook_size=12, embedding_dim=3, l2_normalize=l2)
    z = jax.random.normal(jax.random.PRNGKey(0), (5, 7, 3))
    params = nn.unbox(q.init(jax.random.PRNGKey(1), z))
    z_q, ids, _ = q.apply(params, z)
    cb = np.asarray(q.apply(params, method=q.normalized_codebook))
    zz = np.asarray(z)
    if l2:
        zz = zz / np.linalg.norm(zz, axis=-1, keepdims=True)
    brute = np.argmin(((zz[..., None, :] - cb) ** 2).sum(-1), -1)
    np.testing.assert_array_equal(ids, brute)
    np.testing.assert_allclose(z_q, cb[brute], rtol=1e-5, atol=1e-5)


def test_token_grid_must_divide_the_image(smoke_config):
    smoke_config.data.image_size = 30
    with pytest.raises(ValueError, match="not a positive multiple"):
        factory.token_grid(smoke_config)


def _operand_and_result_types(hlo: str, op: str) -> list[tuple[str, str]]:
    """(operand types, result type) of each StableHLO `op` line; batched dots (attention's own,
    XLA's business) left out."""
    lines = [ln for ln in hlo.splitlines() if f"stablehlo.{op}" in ln and "batching_dims" not in ln]
    return [re.search(r":\s*\((.*?)\)\s*->\s*(tensor<[^>]*>)", ln).groups() for ln in lines]


def test_bfloat16_compute_accumulates_dots_in_float32_from_float32_weights():
    """bf16 compute: float32 master weights, every matmul bf16 x bf16 -> f32, logits near f32's."""
    kw = dict(vocab_size=64, seq_len=16, width=32, depth=2, num_heads=2, mlp_dim=64)
    f32, bf16 = MaskedTransformer(**kw), MaskedTransformer(**kw, dtype=jnp.bfloat16)
    tokens = jnp.arange(32).reshape(2, 16) % 65
    ctx = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    mask = jnp.ones((2, 5), jnp.int32)
    params = bf16.init(jax.random.PRNGKey(1), tokens, ctx, mask)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    hlo = jax.jit(lambda p: bf16.apply(p, tokens, ctx, mask)).lower(params).as_text()
    dots = _operand_and_result_types(hlo, "dot_general")
    dense = [(ins, out) for ins, out in dots if ins.count("bf16") == 2]
    assert len(dense) >= 2 * (4 + 2) + 1  # q, k, v, out, MLP in/out per layer, head.
    assert all(out.endswith("xf32>") for _, out in dense), dense
    a = f32.apply(params, tokens, ctx, mask)
    b = bf16.apply(params, tokens, ctx, mask)
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(b, a, atol=0.1 * float(jnp.max(jnp.abs(a))))


def test_bfloat16_vqgan_convolutions_accumulate_in_float32():
    """The VQ decoder's convolutions in bf16: bf16 operands, f32 results, output near f32's."""
    kw = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, embedding_dim=4)
    f32 = VQGAN(**kw, codebook_size=16, norm_groups=0)
    bf16 = VQGAN(**kw, codebook_size=16, norm_groups=0, dtype=jnp.bfloat16)
    images = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3), minval=-1, maxval=1)
    params = f32.init(jax.random.PRNGKey(1), images)
    ids = jnp.arange(2 * 8 * 8).reshape(2, 8, 8) % 16
    decode = lambda m, p: m.apply(p, ids, method=m.decode_ids)
    hlo = jax.jit(lambda p: decode(bf16, p)).lower(params).as_text()
    convs = _operand_and_result_types(hlo, "convolution")
    assert convs and all(ins.count("bf16") == 2 and out.endswith("xf32>") for ins, out in convs)
    np.testing.assert_allclose(
        np.asarray(decode(bf16, params), np.float32), decode(f32, params), atol=0.1
    )
