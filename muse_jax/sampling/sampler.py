"""Text-to-image sampling: text encoder -> guided parallel decoding -> VQ decoder, one jit.

The text keys/values of every cross-attention layer are computed once per prompt (before the
decoding loop), and the conditional and unconditional (or negative-prompt) branches share one
batch through the loop.
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

    def _generate(
        self,
        params: dict[str, Any],
        cond: dict[str, jax.Array],
        uncond: dict[str, jax.Array],
        rng: jax.Array,
        init_tokens: jax.Array,
    ) -> Sample:
        chex.assert_trees_all_equal_shapes(cond, uncond)
        cfg, tr = self.cfg, self.transformer
        tp = {"params": params["transformer"]}
        if cfg.guidance_scale > 0:
            both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, uncond)
            ctx, ctx_mask = self._encode(params, both), both["text_mask"]
        else:
            ctx, ctx_mask = self._encode(params, cond), cond["text_mask"]
        kv = tr.apply(tp, ctx, method=tr.encode_context)  # Once per prompt, not per step.

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
        result = parallel_decode.decode(
            init_tokens,
            rng,
            tokens_to_logits,
            mask_id=tr.vocab_size,
            num_steps=cfg.num_steps,
            schedule=cfg.mask_schedule,
            temperature=cfg.temperature,
            temperature_final=cfg.temperature_final,
            choice_temperature=cfg.choice_temperature,
        )
        images = self.tokenizer.apply(
            {"params": params["tokenizer"]}, result.tokens, method=self.tokenizer.decode_ids
        )
        return Sample(tokens=result.tokens, images=images, num_masked=result.num_masked)

    def __call__(
        self,
        params: dict[str, Any],
        cond: dict[str, Any],
        uncond: dict[str, Any],
        rng: jax.Array,
        init_tokens: jax.Array | None = None,
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
        """
        batch = cond["text_mask"].shape[0]
        if init_tokens is None:
            init_tokens = jnp.full(
                (batch, self.transformer.seq_len), self.transformer.vocab_size, jnp.int32
            )
        return self._jitted(params, cond, uncond, rng, init_tokens)
