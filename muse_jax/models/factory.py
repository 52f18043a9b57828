"""Builds the Flax modules a config describes (one place, so stages and binaries agree).

Each builder also applies `config.kernels` (`models.kernels.configure`): the modules it returns
trace with the CPU paths the config chose.
"""

from __future__ import annotations

import flax.linen as nn

from muse_jax.errors import UsageError
from muse_jax.models import kernels
from muse_jax.models.layers import get_dtype
from muse_jax.models.transformer import MaskedTransformer, SuperResTransformer, TinyTextEncoder
from muse_jax.models.vqgan import VQGAN

TOKENIZER_KINDS = ("vqgan", "amused_vq", "maskgit")
BASE_KINDS = ("muse", "uvit")


def vqgan(m, decoder=None) -> nn.Module:
    """The tokenizer a model block describes (`config.tokenizer.model` or
    `config.superres_tokenizer.model`), by its `kind`: this project's VQGAN (default), aMUSEd's
    VQ model, or MaskGIT's VQGAN; each has VQGAN's encode/tokenize/decode_ids interface.
    `decoder` (`config.decoder.model`) widens/deepens the VQGAN's decoder for decoder
    fine-tuning."""
    kind = m.get("kind", "vqgan")
    if kind not in TOKENIZER_KINDS:
        raise UsageError(f"Unknown tokenizer model kind {kind!r}; valid: {TOKENIZER_KINDS}.")
    if kind != "vqgan" and decoder is not None:
        raise UsageError(f"Decoder fine-tuning needs a kind='vqgan' tokenizer, not {kind!r}.")
    if kind == "amused_vq":
        from muse_jax.models import amused_vq

        return amused_vq.build(m)
    if kind == "maskgit":
        from muse_jax.models import maskgit_vqgan

        return maskgit_vqgan.build(m)
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
    kernels.configure(config)
    return vqgan(config.tokenizer.model)


def superres_tokenizer(config) -> VQGAN:
    kernels.configure(config)
    return vqgan(config.superres_tokenizer.model)


def finetuned_decoder_vqgan(config) -> VQGAN:
    """The super-res tokenizer with the fine-tuned decoder's architecture (same encoder/codebook)."""
    kernels.configure(config)
    return vqgan(config.superres_tokenizer.model, config.decoder.model)


def _grid(model: VQGAN, size: int, what: str) -> int:
    f = model.downsample_factor
    if size <= 0 or size % f:
        raise UsageError(f"{what} {size} is not a positive multiple of the tokenizer's factor {f}.")
    return size // f


def token_grid(config) -> int:
    """Side of the base stage's token grid: image_size / downsampling factor."""
    return _grid(tokenizer(config), config.data.image_size, "data.image_size")


def superres_token_grid(config) -> int:
    """Side of the super-res stage's token grid: hr_image_size / its tokenizer's factor."""
    return _grid(
        superres_tokenizer(config), config.data.get("hr_image_size", 0), "data.hr_image_size"
    )


def base_transformer(config) -> nn.Module:
    """The base stage's transformer by `config.base.model.kind`: this project's Muse
    transformer (default) or aMUSEd's U-ViT (`models.uvit_transformer`)."""
    kernels.configure(config)
    m = config.base.model
    side = token_grid(config)
    kind = m.get("kind", "muse")
    if kind not in BASE_KINDS:
        raise UsageError(f"Unknown config.base.model.kind {kind!r}; valid: {BASE_KINDS}.")
    if kind == "uvit":
        from muse_jax.models import uvit_transformer

        if config.text_encoder.name != "clip":
            raise UsageError("config.base.model.kind='uvit' needs text_encoder.name='clip'.")
        return uvit_transformer.build(m, side * side, config.tokenizer.model.codebook_size)
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
    kernels.configure(config)
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
        aligned_lowres=aligned_lowres(m.get("aligned_lowres", "none")),
        lowres_input=m.get("lowres_input", "tokens"),
        lowres_patch=tokenizer(config).downsample_factor,
        attention=m.get("attention", "auto"),
        remat=m.get("remat", "none"),
        scan_layers=bool(m.get("scan_layers", False)),
    )


def aligned_lowres(value: bool | str) -> str:
    """The super-res model's `aligned_lowres` mode; the booleans of earlier configs and
    exported models read as "parent" (True) and "none" (False)."""
    if isinstance(value, bool):
        return "parent" if value else "none"
    return value


_TEXT_ENCODERS = ("tiny", "t5", "clip")


def text_width(config) -> int:
    """Width D of the text context [B, S, D] the transformers read: the encoder's output
    width (T5's d_model, or the tiny encoder's width), precomputed or in the graph."""
    t = config.text_encoder
    if t.name == "t5":
        from muse_jax.models import t5

        return t5.get_config(t.preset).d_model
    if t.name == "clip":
        return t.clip.hidden_size
    return t.width


def text_encoder(config, vocab_size: int) -> nn.Module:
    """The text encoder behind the base model's one interface: (ids, mask) -> [B, S, D]."""
    kernels.configure(config)
    t = config.text_encoder
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
            raise UsageError(
                f"The vocabulary has {vocab_size} ids but T5 preset {t.preset!r} embeds only "
                f"{t5_config.vocab_size}: use the SentencePiece model the checkpoint was trained with."
            )
        return t5.T5Encoder(t5_config)
    if t.name == "clip":
        from muse_jax.models import clip

        return clip.text_encoder(t, t.get("dtype", "float32"))
    raise UsageError(f"Unknown config.text_encoder.name {t.name!r}; valid: {_TEXT_ENCODERS}.")
