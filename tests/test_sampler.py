"""The Muse sampler on a tiny random model: guidance, negative prompts, fixed tokens, seeds."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.data import tasks
from muse_jax.sampling import guidance, parallel_decode
from muse_jax.train.base_stage import BaseStage
from muse_jax.train.tokenizer_stage import TokenizerStage


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from configs import shapes_tiny

    config = shapes_tiny.get_config("smoke")
    workdir = str(tmp_path_factory.mktemp("sampler"))
    base = BaseStage(config, workdir)
    tok = TokenizerStage(config, workdir)
    base_state = nn.unbox(base.init(jax.random.PRNGKey(1)))
    tok_state = nn.unbox(tok.init(jax.random.PRNGKey(2)))
    # Sharpen the random model so that prompts matter for the sampled tokens.
    params = {
        "transformer": jax.tree.map(lambda x: x * 3, base_state.params["transformer"]),
        "text_encoder": base_state.params["text_encoder"],
        "vq": tok_state.params["vq"],
    }
    ids, mask = tasks.encode_prompts(
        config, workdir, ["a red circle on the left"] * 3 + [""] * 3 + ["a blue square"] * 3
    )
    return (
        config,
        workdir,
        base,
        params,
        {"text_ids": ids[:3], "text_mask": mask[:3]},
        {"text_ids": ids[3:6], "text_mask": mask[3:6]},
        {"text_ids": ids[6:], "text_mask": mask[6:]},
    )


def _sampler(base, **overrides):
    from muse_jax.sampling.sampler import MuseSampler

    cfg = base.config.base.sampling.copy_and_resolve_references()
    for k, v in overrides.items():
        cfg[k] = v
    return MuseSampler(base.transformer, base.text_encoder, base.tokenizer, cfg)


def _decode_by_hand(base, tokens, key, tokens_to_logits, num_steps):
    """MaskGIT's loop with the config's decoding settings, outside the sampler."""
    cfg = base.config.base.sampling
    return parallel_decode.decode(
        tokens,
        key,
        tokens_to_logits,
        mask_id=base.transformer.mask_id,
        num_steps=num_steps,
        schedule=cfg.mask_schedule,
        temperature=cfg.temperature,
        temperature_final=cfg.temperature_final,
        choice_temperature=cfg.choice_temperature,
    )


def test_images_have_the_configured_size_and_all_tokens_are_decoded(tiny):
    config, _, base, params, cond, uncond, _ = tiny
    out = _sampler(base)(params, cond, uncond, jax.random.PRNGKey(0))
    assert out.images.shape == (3, config.data.image_size, config.data.image_size, 3)
    assert np.all(np.asarray(out.tokens) < base.transformer.vocab_size)
    assert out.num_masked.shape == (config.base.sampling.num_steps, 3)
    assert np.all(np.asarray(out.num_masked)[-1] == 0)


def test_guidance_scale_zero_equals_the_conditional_path(tiny):
    _, _, base, params, cond, uncond, negative = tiny
    rng = jax.random.PRNGKey(4)
    unguided = _sampler(base, guidance_scale=0.0, refine_rounds=0)(params, cond, uncond, rng)
    # The conditional path, written out by hand: text -> kv -> decode with conditional logits.
    tr = base.transformer
    ctx = base.text_encoder.apply(
        {"params": params["text_encoder"]},
        jnp.asarray(cond["text_ids"]),
        jnp.asarray(cond["text_mask"]),
    )
    kv = tr.apply({"params": params["transformer"]}, ctx, method=tr.encode_context)
    fn = lambda t, s: tr.apply(
        {"params": params["transformer"]}, t, kv, jnp.asarray(cond["text_mask"]), method=tr.logits
    )
    init = jnp.full((3, tr.seq_len), tr.mask_id, jnp.int32)
    manual = _decode_by_hand(base, init, rng, fn, base.config.base.sampling.num_steps)
    np.testing.assert_array_equal(unguided.tokens, manual.tokens)
    # And a guided sampler whose negative prompt differs does change the result.
    guided = _sampler(base, guidance_scale=5.0, guidance_schedule="constant", refine_rounds=0)(
        params, cond, negative, rng
    )
    assert not np.array_equal(guided.tokens, unguided.tokens)


def test_guided_logits_follow_the_formula():
    cond, uncond = jnp.ones((1, 2, 3)), jnp.zeros((1, 2, 3))
    fn = lambda t: jnp.concatenate([cond, uncond])
    for step, expected in [(0, 1.0), (3, 1.0 + 2.0)]:
        out = guidance.guided(fn, scale=2.0, schedule="linear", num_steps=4)(
            jnp.zeros((1, 2)), step
        )
        np.testing.assert_allclose(out, expected)
    with pytest.raises(ValueError, match="linear"):
        guidance.scale_at(1.0, "cubic", 0, 4)


def test_fixed_seed_reproduces_and_fixed_tokens_stay(tiny):
    _, _, base, params, cond, uncond, _ = tiny
    sampler = _sampler(base)
    a = sampler(params, cond, uncond, jax.random.PRNGKey(9))
    b = sampler(params, cond, uncond, jax.random.PRNGKey(9))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.images, b.images)
    tr = base.transformer
    rng = np.random.default_rng(0)
    keep = rng.random((3, tr.seq_len)) < 0.5
    init = np.where(keep, rng.integers(0, tr.vocab_size, (3, tr.seq_len)), tr.mask_id).astype(
        np.int32
    )
    out = sampler(params, cond, uncond, jax.random.PRNGKey(1), init_tokens=jnp.asarray(init))
    np.testing.assert_array_equal(np.asarray(out.tokens)[keep], init[keep])


def test_a_second_call_with_new_prompts_and_seed_does_not_compile(tiny):
    """Same shapes, different prompts/keys/fixed tokens: no second XLA compilation."""
    from jax import monitoring

    _, _, base, params, cond, uncond, other = tiny
    sampler = _sampler(base, num_steps=5)  # A setting no other test compiles.
    compiles: list[float] = []

    def listener(event: str, duration: float, **kw) -> None:
        del kw
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    keys = jax.random.PRNGKey(0), jax.random.PRNGKey(5)
    init = jax.block_until_ready(sampler.masked(3).at[:, :4].set(7))  # Inputs made beforehand.
    monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.block_until_ready(sampler(params, cond, uncond, keys[0]))
        first = len(compiles)
        out = jax.block_until_ready(sampler(params, other, uncond, keys[1], init))
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert first >= 1  # The listener sees compilations ...
    assert len(compiles) == first  # ... and the second call caused none.
    assert sampler._jitted._cache_size() == 1  # Not even a retrace.
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, :4], 7)


def test_self_critic_refinement_keeps_fixed_tokens_and_revisits_generated_ones(tiny):
    """With refine_rounds > 0 the sampler re-decodes some generated tokens (the result differs
    from the plain loop's with the same key) but never a fixed one (inpainting)."""
    _, _, base, params, cond, uncond, _ = tiny
    tr = base.transformer
    rng = np.random.default_rng(3)
    keep = rng.random((3, tr.seq_len)) < 0.5
    init = np.where(keep, rng.integers(0, tr.vocab_size, (3, tr.seq_len)), tr.mask_id).astype(
        np.int32
    )
    key = jax.random.PRNGKey(2)
    plain = _sampler(base, refine_rounds=0)(
        params, cond, uncond, key, init_tokens=jnp.asarray(init)
    )
    refined = _sampler(base, refine_rounds=2, refine_fraction=0.5, refine_steps=2)(
        params, cond, uncond, key, init_tokens=jnp.asarray(init)
    )
    out = np.asarray(refined.tokens)
    np.testing.assert_array_equal(out[keep], init[keep])
    assert np.all(out < tr.vocab_size)
    assert not np.array_equal(out, np.asarray(plain.tokens))
    # The first pass is the plain loop's (same key): at most the re-masked tokens differ,
    # 2 rounds of half the generated ones.
    generated = (~keep).sum(1)
    assert np.all((out != np.asarray(plain.tokens)).sum(1) <= 2 * np.round(0.5 * generated))
    assert refined.num_masked.shape == plain.num_masked.shape


def test_guided_refinement_scores_with_the_prompt_alone(tiny):
    """Guided sampling with refinement equals the loop written out by hand: guided decoding
    ([prompt; negative] context, 2B rows), then rounds whose critic sees the prompt's context
    alone (B rows) and whose re-decoding is guided again."""
    from muse_jax.sampling import self_critic

    _, _, base, params, cond, _, negative = tiny
    tr, tp = base.transformer, {"params": params["transformer"]}
    both = {k: jnp.concatenate([jnp.asarray(cond[k]), jnp.asarray(negative[k])]) for k in cond}
    encoded = base.text_encoder.apply(
        {"params": params["text_encoder"]}, both["text_ids"], both["text_mask"]
    )
    kv_both = tr.apply(tp, encoded, method=tr.encode_context)
    kv_prompt = tr.apply(tp, encoded[:3], method=tr.encode_context)
    cfg = base.config.base.sampling

    def decode(tokens, key, num_steps):
        fn = guidance.guided(
            lambda t: tr.apply(tp, t, kv_both, both["text_mask"], method=tr.logits),
            scale=5.0,
            schedule="constant",
            num_steps=num_steps,
        )
        return _decode_by_hand(base, tokens, key, fn, num_steps)

    rng = jax.random.PRNGKey(5)
    init = jnp.full((3, tr.seq_len), tr.mask_id, jnp.int32)
    manual = self_critic.refine(
        decode(init, rng, cfg.num_steps).tokens,
        init == tr.mask_id,
        jax.random.fold_in(rng, 0x5EF1),
        score_logits_fn=lambda t: tr.apply(
            tp, t, kv_prompt, both["text_mask"][:3], method=tr.logits
        ),
        redecode=lambda t, key: decode(t, key, 2).tokens,
        mask_id=tr.mask_id,
        rounds=2,
        fraction=0.5,
    )
    sampler = _sampler(
        base,
        guidance_scale=5.0,
        guidance_schedule="constant",
        refine_rounds=2,
        refine_fraction=0.5,
        refine_steps=2,
    )
    np.testing.assert_array_equal(sampler(params, cond, negative, rng).tokens, manual)
