"""Builds the Flax modules a config describes (one place, so stages and binaries agree)."""

from __future__ import annotations

import flax.linen as nn

from muse_jax.models.layers import get_dtype
from muse_jax.models.transformer import MaskedTransformer, SuperResTransformer, TinyTextEncoder
from muse_jax.models.vqgan import VQGAN


def vqgan(m, decoder=None) -> VQGAN:
    """A VQGAN from a tokenizer model block (`config.tokenizer.model` or
    `config.superres_tokenizer.model`); `decoder` (`config.decoder.model`) widens/deepens the
    decoder for decoder fine-tuning."""
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
        decoder_channels=decoder.channels if decoder is not None else 0,
        decoder_extra_res_blocks=decoder.extra_res_blocks if decoder is not None else 0,
    )


def tokenizer(config) -> VQGAN:
    return vqgan(config.tokenizer.model)


def superres_tokenizer(config) -> VQGAN:
    return vqgan(config.superres_tokenizer.model)


def finetuned_decoder_vqgan(config) -> VQGAN:
    """The super-res tokenizer with the fine-tuned decoder's architecture (same encoder/codebook)."""
    return vqgan(config.superres_tokenizer.model, config.decoder.model)


def _grid(model: VQGAN, size: int, what: str) -> int:
    f = model.downsample_factor
    if size <= 0 or size % f:
        raise ValueError(f"{what} {size} is not a positive multiple of the tokenizer's factor {f}.")
    return size // f


def token_grid(config) -> int:
    """Side of the base stage's token grid: image_size / downsampling factor."""
    return _grid(tokenizer(config), config.data.image_size, "data.image_size")


def superres_token_grid(config) -> int:
    """Side of the super-res stage's token grid: hr_image_size / its tokenizer's factor."""
    return _grid(
        superres_tokenizer(config), config.data.get("hr_image_size", 0), "data.hr_image_size"
    )


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
        attention=m.get("attention", "auto"),
        remat=m.get("remat", "none"),
        scan_layers=bool(m.get("scan_layers", False)),
    )


def superres_transformer(config) -> SuperResTransformer:
    m = config.superres.model
    low, high = token_grid(config), superres_token_grid(config)
    return SuperResTransformer(
        vocab_size=config.superres_tokenizer.model.codebook_size,
        seq_len=high * high,
        lowres_vocab_size=config.tokenizer.model.codebook_size,
        lowres_len=low * low,
        width=m.width,
        depth=m.depth,
        lowres_depth=m.lowres_depth,
        num_heads=m.num_heads,
        mlp_dim=m.mlp_dim,
        dropout=m.get("dropout", 0.0),
        dtype=get_dtype(m.get("dtype", "float32")),
        aligned_lowres=m.get("aligned_lowres", False),
        attention=m.get("attention", "auto"),
        remat=m.get("remat", "none"),
        scan_layers=bool(m.get("scan_layers", False)),
    )


_TEXT_ENCODERS = ("tiny", "t5")


def text_width(config) -> int:
    """Width D of the text context [B, S, D] the transformers read: the encoder's output
    width (T5's d_model, or the tiny encoder's width), precomputed or in the graph."""
    t = config.base.text_encoder
    if t.name == "t5":
        from muse_jax.models import t5

        return t5.get_config(t.preset).d_model
    return t.width


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
            attention=t.get("attention", "auto"),
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
