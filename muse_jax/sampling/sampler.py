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

    def _generate(
        self,
        params: dict[str, Any],
        text_ids: jax.Array,
        text_mask: jax.Array,
        neg_ids: jax.Array,
        neg_mask: jax.Array,
        rng: jax.Array,
        init_tokens: jax.Array,
    ) -> Sample:
        chex.assert_equal_shape((text_ids, text_mask, neg_ids, neg_mask))
        cfg, tr = self.cfg, self.transformer
        tp = {"params": params["transformer"]}

        def embed(ids, mask):
            return self.text_encoder.apply({"params": params["text_encoder"]}, ids, mask)

        if cfg.guidance_scale > 0:
            ctx = embed(
                jnp.concatenate([text_ids, neg_ids]), jnp.concatenate([text_mask, neg_mask])
            )
            ctx_mask = jnp.concatenate([text_mask, neg_mask])
        else:
            ctx, ctx_mask = embed(text_ids, text_mask), text_mask
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
        text_ids: jax.Array,
        text_mask: jax.Array,
        neg_ids: jax.Array,
        neg_mask: jax.Array,
        rng: jax.Array,
        init_tokens: jax.Array | None = None,
    ) -> Sample:
        """Samples one image per row of `text_ids` [B, S].

        Args:
          neg_ids, neg_mask: [B, S] the unconditional branch: the empty prompt, or a negative one.
          init_tokens: optional [B, L] tokens; positions equal to the mask id are generated, the
            others stay fixed (inpainting/outpainting). Default: everything generated.
        """
        if init_tokens is None:
            init_tokens = jnp.full(
                (text_ids.shape[0], self.transformer.seq_len),
                self.transformer.vocab_size,
                jnp.int32,
            )
        return self._jitted(params, text_ids, text_mask, neg_ids, neg_mask, rng, init_tokens)
