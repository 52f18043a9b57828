"""Text-to-image sampling: text encoder -> guided parallel decoding -> VQ decoder, one jit.

The text keys/values of every cross-attention layer are computed once per prompt (before the
decoding loop), and the conditional and unconditional (or negative-prompt) branches share one
batch through the loop. `SuperResSampler` is the same loop over high-res tokens given low-res
ones; `CascadeSampler` chains base -> super-res -> (fine-tuned) decoder in one jitted call.
"""

from __future__ import annotations

from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp

from muse_jax.sampling import guidance, parallel_decode


@flax.struct.dataclass
class Sample:
    tokens: jax.Array  # [B, L]
    images: jax.Array  # [B, H, W, 3] in [-1, 1]
    num_masked: jax.Array  # [steps, B]


@flax.struct.dataclass
class CascadeSample:
    tokens: jax.Array  # [B, L_high] super-res tokens.
    images: jax.Array  # [B, H_high, W_high, 3] in [-1, 1] (what the cascade returns).
    num_masked: jax.Array  # [steps_high, B]
    lowres_tokens: jax.Array  # [B, L_low] base tokens.
    lowres_images: jax.Array  # [B, H_low, W_low, 3]: the base stage alone.


def _concat(a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


class MuseSampler:
    """Generates images from token ids of prompts with a trained base stage.

    `params` passed to `__call__` is {'transformer', 'text_encoder', 'tokenizer'}.
    """

    def __init__(self, transformer, text_encoder, tokenizer, sampling_cfg):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.cfg = sampling_cfg
        self._jitted = jax.jit(self._generate)

    def _encode(self, params: dict[str, Any], text: dict[str, jax.Array]) -> jax.Array:
        if "text_emb" in text:  # Precomputed (e.g. T5-XXL) embeddings.
            return text["text_emb"]
        return self.text_encoder.apply(
            {"params": params["text_encoder"]}, text["text_ids"], text["text_mask"]
        )

    def _context(self, tp: dict[str, Any], ctx: jax.Array, ctx_mask: jax.Array, lowres: Any):
        """(cross-attention keys/values of every layer, their mask): once per prompt."""
        del lowres
        tr = self.transformer
        return tr.apply(tp, ctx, method=tr.encode_context), ctx_mask

    def tokens(
        self,
        params: dict[str, Any],
        cond: dict[str, jax.Array],
        uncond: dict[str, jax.Array],
        rng: jax.Array,
        init_tokens: jax.Array,
        lowres_tokens: jax.Array | None = None,
    ) -> parallel_decode.DecodeResult:
        """The guided decoding loop alone (traceable: the cascade calls it inside its jit)."""
        chex.assert_trees_all_equal_shapes(cond, uncond)
        cfg, tr = self.cfg, self.transformer
        tp = {"params": params["transformer"]}
        if cfg.guidance_scale > 0:
            text = _concat(cond, uncond)
            if lowres_tokens is not None:  # Both branches see the same low-res tokens.
                lowres_tokens = jnp.concatenate([lowres_tokens, lowres_tokens])
        else:
            text = cond
        kv, ctx_mask = self._context(
            tp, self._encode(params, text), text["text_mask"], lowres_tokens
        )

        def logits_fn(tokens):
            return tr.apply(tp, tokens, kv, ctx_mask, method=tr.logits)

        if cfg.guidance_scale > 0:
            tokens_to_logits = guidance.guided(
                logits_fn,
                scale=cfg.guidance_scale,
                schedule=cfg.guidance_schedule,
                num_steps=cfg.num_steps,
            )
        else:
            tokens_to_logits = lambda tokens, step: logits_fn(tokens)
        return parallel_decode.decode(
            init_tokens,
            rng,
            tokens_to_logits,
            mask_id=tr.mask_id,
            num_steps=cfg.num_steps,
            schedule=cfg.mask_schedule,
            temperature=cfg.temperature,
            temperature_final=cfg.temperature_final,
            choice_temperature=cfg.choice_temperature,
        )

    def decode_pixels(self, params: dict[str, Any], tokens: jax.Array) -> jax.Array:
        return self.tokenizer.apply(
            {"params": params["tokenizer"]}, tokens, method=self.tokenizer.decode_ids
        )

    def _generate(self, params, cond, uncond, rng, init_tokens, lowres_tokens) -> Sample:
        result = self.tokens(params, cond, uncond, rng, init_tokens, lowres_tokens)
        images = self.decode_pixels(params, result.tokens)
        return Sample(tokens=result.tokens, images=images, num_masked=result.num_masked)

    def masked(self, batch: int) -> jax.Array:
        """A fully masked [batch, L] token array: generate everything."""
        return jnp.full((batch, self.transformer.seq_len), self.transformer.mask_id, jnp.int32)

    def __call__(
        self,
        params: dict[str, Any],
        cond: dict[str, Any],
        uncond: dict[str, Any],
        rng: jax.Array,
        init_tokens: jax.Array | None = None,
        lowres_tokens: jax.Array | None = None,
    ) -> Sample:
        """Samples one image per row of the conditioning.

        Args:
          params: {'transformer', 'tokenizer'[, 'text_encoder']}.
          cond: the prompts' text input, {'text_ids', 'text_mask'} ([B, S]) or
            {'text_emb' [B, S, D], 'text_mask'} (see `muse_jax.text.conditioning`).
          uncond: the same for the unconditional branch: the empty prompt, or a negative one.
          rng: PRNG key; the same key reproduces the same images.
          init_tokens: optional [B, L] tokens; positions equal to the mask id are generated, the
            others stay fixed (inpainting/outpainting). Default: everything generated.
          lowres_tokens: [B, L_low] base tokens (super-res samplers only).
        """
        if init_tokens is None:
            init_tokens = self.masked(cond["text_mask"].shape[0])
        return self._jitted(params, cond, uncond, rng, init_tokens, lowres_tokens)


class SuperResSampler(MuseSampler):
    """High-res tokens given low-res tokens and text; `tokenizer` is the high-res decoder."""

    def _context(self, tp, ctx, ctx_mask, lowres):
        if lowres is None:
            raise ValueError("The super-res sampler needs lowres_tokens (the base stage's output).")
        tr = self.transformer
        return tr.apply(tp, ctx, ctx_mask, lowres, method=tr.encode_context)


class CascadeSampler:
    """Base -> super-res -> decoder in one jitted call, each stage with its own settings.

    `params` is {'base': base sampler params, 'superres': super-res sampler params}; the
    super-res params' 'tokenizer' holds the decoder that makes the pixels (the fine-tuned one
    when it exists).
    """

    def __init__(self, base: MuseSampler, superres: SuperResSampler):
        self.base = base
        self.superres = superres
        self.cfg = base.cfg
        self._jitted = jax.jit(self._generate)

    def _generate(self, params, cond, uncond, rng, init_tokens, init_hr_tokens) -> CascadeSample:
        base_rng, sr_rng = jax.random.split(rng)
        low = self.base.tokens(params["base"], cond, uncond, base_rng, init_tokens)
        high = self.superres.tokens(
            params["superres"], cond, uncond, sr_rng, init_hr_tokens, low.tokens
        )
        return CascadeSample(
            tokens=high.tokens,
            images=self.superres.decode_pixels(params["superres"], high.tokens),
            num_masked=high.num_masked,
            lowres_tokens=low.tokens,
            lowres_images=self.base.decode_pixels(params["base"], low.tokens),
        )

    def __call__(
        self,
        params: dict[str, Any],
        cond: dict[str, Any],
        uncond: dict[str, Any],
        rng: jax.Array,
        init_tokens: jax.Array | None = None,
        init_hr_tokens: jax.Array | None = None,
    ) -> CascadeSample:
        """As `MuseSampler.__call__`; `init_tokens` fixes base tokens, `init_hr_tokens` fixes
        high-res tokens (mask id = generate)."""
        batch = cond["text_mask"].shape[0]
        if init_tokens is None:
            init_tokens = self.base.masked(batch)
        if init_hr_tokens is None:
            init_hr_tokens = self.superres.masked(batch)
        return self._jitted(params, cond, uncond, rng, init_tokens, init_hr_tokens)
