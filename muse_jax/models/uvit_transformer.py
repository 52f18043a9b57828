"""aMUSEd's U-ViT behind the base stage's transformer interface (`config.base.model.kind='uvit'`).

The project's samplers and trainer talk to a base transformer through `encode_context(text)`
(once per prompt), `logits(tokens, context, mask)` (once per decoding step), `mask_id` and
`seq_len`. `UVitTransformer` is `uvit.UVit2D` (same parameter tree, so converted diffusers
weights load as they are) with those methods. Its text context is CLIP's {'hidden', 'pooled'}
(`models.clip.CLIPTextEncoder`); the micro-conditioning (width, height, crop top, crop left,
aesthetic score) is fixed per model by the `micro_conds` field, as aMUSEd's pipeline fixes it
per call. The text mask is ignored: aMUSEd's cross-attention sees every position.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from muse_jax.errors import UsageError
from muse_jax.models import uvit

# aMUSEd's pipeline defaults at 256x256: width, height, crop (0, 0), aesthetic score 6.
DEFAULT_MICRO_CONDS = (256.0, 256.0, 0.0, 0.0, 6.0)


class UVitTransformer(uvit.UVit2D):
    micro_conds: tuple[float, ...] = DEFAULT_MICRO_CONDS

    def encode_context(self, context: dict[str, jax.Array]) -> Any:
        """CLIP's {'hidden' [B, S, D], 'pooled' [B, P]} -> the per-prompt context."""
        pooled = context["pooled"]
        micro = jnp.broadcast_to(
            jnp.asarray(self.micro_conds, jnp.float32), (pooled.shape[0], len(self.micro_conds))
        )
        return self.context(context["hidden"], pooled, micro)

    def logits(
        self,
        tokens: jax.Array,
        context_kv: Any,
        context_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Logits [B, L, codebook_size] for tokens [B, L] given `encode_context`'s output."""
        del context_mask
        return super().logits(tokens, context_kv, deterministic)

    def __call__(
        self,
        tokens: jax.Array,
        context: dict[str, jax.Array],
        context_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        return self.logits(tokens, self.encode_context(context), context_mask, deterministic)


def build(m, seq_len: int, codebook_size: int) -> UVitTransformer:
    """The transformer of a `kind='uvit'` model block on a grid of `seq_len` tokens, checked
    against the tokenizer's `codebook_size`."""
    net = uvit.build(m, seq_len)
    if net.codebook_size != codebook_size:
        raise UsageError(
            f"config.base.model.codebook_size {net.codebook_size} != the tokenizer's "
            f"{codebook_size} codes."
        )
    fields = {
        f.name: getattr(net, f.name)
        for f in dataclasses.fields(net)
        if f.init and f.name not in ("parent", "name")
    }
    micro = tuple(float(v) for v in m.get("micro_conds", DEFAULT_MICRO_CONDS))
    if len(micro) != net.num_micro_conds:
        raise UsageError(
            f"config.base.model.micro_conds has {len(micro)} values; the model reads "
            f"{net.num_micro_conds}."
        )
    return UVitTransformer(**fields, micro_conds=micro)
