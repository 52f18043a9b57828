"""Builds the Flax modules a config describes (one place, so stages and binaries agree)."""

from __future__ import annotations

import flax.linen as nn

from muse_jax.models.layers import get_dtype
from muse_jax.models.transformer import MaskedTransformer, TinyTextEncoder
from muse_jax.models.vqgan import VQGAN


def vqgan(m) -> VQGAN:
    """A VQGAN from a tokenizer model block (`config.tokenizer.model` or `config.superres.tokenizer`)."""
    return VQGAN(
        channels=m.channels,
        channel_mult=tuple(m.channel_mult),
        num_res_blocks=m.num_res_blocks,
        embedding_dim=m.embedding_dim,
        codebook_size=m.codebook_size,
        norm_groups=m.norm_groups,
        patch_size=m.get("patch_size", 1),
        l2_normalize_codes=m.get("l2_normalize_codes", True),
        commitment_cost=m.get("commitment_cost", 0.25),
        dtype=get_dtype(m.get("dtype", "float32")),
    )


def tokenizer(config) -> VQGAN:
    return vqgan(config.tokenizer.model)


def token_grid(config) -> int:
    """Side of the base stage's token grid: image_size / downsampling factor."""
    f = tokenizer(config).downsample_factor
    size = config.data.image_size
    if size % f:
        raise ValueError(f"image_size {size} is not divisible by the tokenizer's factor {f}.")
    return size // f


def base_transformer(config) -> MaskedTransformer:
    m = config.base.model
    side = token_grid(config)
    return MaskedTransformer(
        vocab_size=config.tokenizer.model.codebook_size,
        seq_len=side * side,
        width=m.width,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_dim=m.mlp_dim,
        dropout=m.dropout,
        dtype=get_dtype(m.dtype),
    )


_TEXT_ENCODERS = ("tiny", "t5")


def text_encoder(config, vocab_size: int) -> nn.Module:
    """The text encoder behind the base model's one interface: (ids, mask) -> [B, S, D]."""
    t = config.base.text_encoder
    if t.name == "tiny":
        return TinyTextEncoder(
            vocab_size=vocab_size,
            max_length=config.data.text_length,
            width=t.width,
            depth=t.depth,
            num_heads=t.num_heads,
            mlp_dim=t.mlp_dim,
        )
    if t.name == "t5":
        from muse_jax.models import t5

        t5_config = t5.get_config(t.preset, dtype=t.get("dtype", "float32"))
        if vocab_size > t5_config.vocab_size:
            raise ValueError(
                f"The vocabulary has {vocab_size} ids but T5 preset {t.preset!r} embeds only "
                f"{t5_config.vocab_size}: use the SentencePiece model the checkpoint was trained with."
            )
        return t5.T5Encoder(t5_config)
    raise ValueError(f"Unknown config.base.text_encoder.name {t.name!r}; valid: {_TEXT_ENCODERS}.")
