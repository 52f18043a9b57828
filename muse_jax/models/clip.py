"""CLIP (Radford et al., 2021) in Flax Linen, as `transformers.CLIPModel` defines it: the two
towers for CLIP score, and the text tower alone as a text-to-image model's encoder.

Two pre-LayerNorm transformer towers with biased projections and (for the OpenAI checkpoints)
`quick_gelu`:

- vision: patches (a bias-free conv), a learned class token, absolute position embeddings,
  `pre_layrnorm` (sic, Hugging Face's name), the encoder, then `post_layernorm` on the class token;
- text: token + position embeddings, a causal encoder, `final_layer_norm`, pooled at the EOS token;

each followed by a bias-free projection into the shared space. The parameter tree mirrors the
Hugging Face module names (`text_model/encoder/layers_3/self_attn/q_proj/kernel`, ...) so that
`muse_jax.text.clip_model` maps a safetensors checkpoint onto it key by key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.errors import UsageError
from muse_jax.models.layers import Dtype, constrain, get_dtype, partitioned

# Hugging Face's "legacy" eos_token_id: configs written before the real EOS id was recorded carry
# 2, and transformers then pools at argmax(ids), which is the EOS because it is the largest id.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class TowerConfig:
    """One transformer tower; field names and defaults follow `transformers.CLIP*Config`."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig(TowerConfig):
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextConfig(TowerConfig):
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPConfig:
    """Both towers and the shared embedding width.

    Attributes:
      dtype: compute dtype of the dense layers ("float32" or "bfloat16"); parameters, LayerNorms,
        the residual stream and the outputs stay float32.
    """

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    projection_dim: int = 512
    dtype: str = "float32"


PRESETS: dict[str, CLIPConfig] = {
    "tiny": CLIPConfig(
        vision=VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=28,
            patch_size=14,
        ),
        text=TextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=100,
            eos_token_id=99,
        ),
        projection_dim=16,
    ),
    "vit-b-32": CLIPConfig(),
    # openai/clip-vit-large-patch14: the CLIP used for CLIP score in most text-to-image papers.
    "vit-l-14": CLIPConfig(
        vision=VisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=14,
        ),
        text=TextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
        ),
        projection_dim=768,
    ),
}


def get_config(name: str, **overrides: Any) -> CLIPConfig:
    """Returns preset `name` (e.g. "vit-l-14") with top-level fields replaced by `overrides`."""
    if name not in PRESETS:
        raise UsageError(f"Unknown CLIP preset {name!r}; valid: {sorted(PRESETS)}.")
    return dataclasses.replace(PRESETS[name], **overrides)


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


# Names as transformers' ACT2FN spells them; "gelu" there is the exact (erf) form.
ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    # Two-pass variance: CLIP-L's residual stream has outlier channels in the hundreds, where
    # E[x^2] - E[x]^2 in float32 loses the digits that torch's LayerNorm keeps.
    return nn.LayerNorm(
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=partitioned(nn.initializers.ones, "embed"),
        bias_init=partitioned(nn.initializers.zeros, "embed"),
        name=name,
    )


def _dense(features: int, axes: tuple[str | None, str | None], dtype: Dtype, name: str, bias=True):
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=partitioned(nn.initializers.lecun_normal(), *axes),
        bias_init=partitioned(nn.initializers.zeros, axes[1]),
        name=name,
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections, logits scaled 1/sqrt(d)."""

    config: TowerConfig
    causal: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        width, heads = cfg.hidden_size, cfg.num_attention_heads
        if width % heads:
            raise UsageError(f"hidden_size {width} is not divisible by {heads} heads.")
        shape = (*x.shape[:2], heads, width // heads)
        q = _dense(width, ("embed", "joined_kv"), self.dtype, "q_proj")(x).reshape(shape)
        k = _dense(width, ("embed", "joined_kv"), self.dtype, "k_proj")(x).reshape(shape)
        v = _dense(width, ("embed", "joined_kv"), self.dtype, "v_proj")(x).reshape(shape)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        return _dense(width, ("joined_kv", "embed"), self.dtype, "out_proj")(
            out.reshape(*x.shape[:2], width)
        )


class Mlp(nn.Module):
    config: TowerConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        if cfg.hidden_act not in ACTIVATIONS:
            raise UsageError(
                f"Unknown hidden_act {cfg.hidden_act!r}; valid: {sorted(ACTIVATIONS)}."
            )
        h = _dense(cfg.intermediate_size, ("embed", "mlp"), self.dtype, "fc1")(x)
        h = constrain(ACTIVATIONS[cfg.hidden_act](h), "batch", "length", "mlp")
        return _dense(cfg.hidden_size, ("mlp", "embed"), self.dtype, "fc2")(h)


class EncoderLayer(nn.Module):
    """Pre-LN residual block: LN -> self-attention, LN -> MLP."""

    config: TowerConfig
    causal: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = _layer_norm(cfg.layer_norm_eps, "layer_norm1")(x)
        x = x + SelfAttention(cfg, self.causal, self.dtype, name="self_attn")(h)
        h = _layer_norm(cfg.layer_norm_eps, "layer_norm2")(x)
        x = x + Mlp(cfg, self.dtype, name="mlp")(h)
        return constrain(x.astype(jnp.float32), "batch", "length", "embed")


class Encoder(nn.Module):
    config: TowerConfig
    causal: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, keep: int | None = None):
        """The last layer's output; with `keep` k, also the output after k layers (k = 0: the
        input), as `hidden_states[k]` of transformers' `output_hidden_states`."""
        kept = x if keep == 0 else None
        for i in range(self.config.num_hidden_layers):
            x = EncoderLayer(self.config, self.causal, self.dtype, name=f"layers_{i}")(x)
            if keep == i + 1:
                kept = x
        return x if keep is None else (x, kept)


class VisionTransformer(nn.Module):
    """Pixels [B, H, W, C] (normalised, NHWC) -> pooled class token [B, hidden] after post-LN."""

    config: VisionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.config
        p, d = cfg.patch_size, cfg.hidden_size
        chex.assert_shape(pixels, (None, cfg.image_size, cfg.image_size, cfg.num_channels))
        patches = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=partitioned(nn.initializers.lecun_normal(), None, None, None, "embed"),
            name="patch_embedding",
        )(pixels)
        batch = pixels.shape[0]
        patches = patches.reshape(batch, -1, d).astype(jnp.float32)  # row-major over the grid
        cls = self.param(
            "class_embedding", partitioned(nn.initializers.normal(0.02), "embed"), (d,)
        )
        num_positions = (cfg.image_size // p) ** 2 + 1
        pos = nn.Embed(
            num_positions,
            d,
            embedding_init=partitioned(nn.initializers.normal(0.02), None, "embed"),
            name="position_embedding",
        ).embedding
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, d)), patches], axis=1) + pos
        x = _layer_norm(cfg.layer_norm_eps, "pre_layrnorm")(x)
        x = Encoder(cfg, causal=False, dtype=self.dtype, name="encoder")(x)
        return _layer_norm(cfg.layer_norm_eps, "post_layernorm")(x[:, 0])


class TextTransformer(nn.Module):
    """Token ids [B, S] -> the final-LN hidden state at each row's EOS token [B, hidden]."""

    config: TextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, keep: int | None = None):
        """Pooled [B, hidden]; with `keep` k, (pooled, the hidden states after k layers
        [B, S, hidden], before the final LayerNorm)."""
        cfg = self.config
        chex.assert_rank(ids, 2)
        if ids.shape[1] > cfg.max_position_embeddings:
            raise UsageError(
                f"{ids.shape[1]} tokens > max_position_embeddings {cfg.max_position_embeddings}."
            )
        ids = ids.astype(jnp.int32)
        tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=partitioned(nn.initializers.normal(0.02), "vocab", "embed"),
            name="token_embedding",
        )(ids)
        pos = nn.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            embedding_init=partitioned(nn.initializers.normal(0.01), None, "embed"),
            name="position_embedding",
        ).embedding
        x = tokens + pos[: ids.shape[1]]
        x = Encoder(cfg, causal=True, dtype=self.dtype, name="encoder")(x, keep)
        if keep is not None:
            x, kept = x
        x = _layer_norm(cfg.layer_norm_eps, "final_layer_norm")(x)
        # transformers' rule, kept so a config pools where transformers pools: the legacy id 2
        # means "the largest id is the EOS"; otherwise the first occurrence of eos_token_id.
        # (Padding after the EOS cannot change the pooled state: attention is causal.)
        if cfg.eos_token_id == LEGACY_EOS_TOKEN_ID:
            where = jnp.argmax(ids, axis=-1)
        else:
            where = jnp.argmax(ids == cfg.eos_token_id, axis=-1)
        pooled = x[jnp.arange(ids.shape[0]), where]
        return pooled if keep is None else (pooled, kept)


class CLIPTextEncoder(nn.Module):
    """CLIP's text tower as a text-to-image model's encoder (`CLIPTextModelWithProjection`):
    ids [B, S] -> {'hidden': the hidden states after `hidden_layer` [B, S, hidden] (-2: the
    penultimate layer's, what aMUSEd and Stable Diffusion XL condition on), 'pooled': the
    projected EOS state [B, projection_dim]}.

    The mask argument is accepted for the project's (ids, mask) interface and ignored: CLIP
    attends causally, and its text-to-image users pass no padding mask either.
    """

    config: TextConfig
    projection_dim: int
    hidden_layer: int = -2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> dict[str, jax.Array]:
        del mask
        layers = self.config.num_hidden_layers
        keep = self.hidden_layer if self.hidden_layer >= 0 else layers + 1 + self.hidden_layer
        if not 0 <= keep <= layers:
            raise UsageError(f"hidden_layer {self.hidden_layer} outside a {layers}-layer tower.")
        pooled, hidden = TextTransformer(self.config, self.dtype, name="text_model")(ids, keep)
        dense = _dense(self.projection_dim, ("embed", None), self.dtype, "text_projection", False)
        return {
            "hidden": hidden.astype(jnp.float32),
            "pooled": dense(pooled).astype(jnp.float32),
        }


class CLIP(nn.Module):
    """The two towers and their projections; `encode_image` / `encode_text` run one tower each.

    Embeddings are returned unnormalised, as `CLIPModel.get_image_features` /
    `get_text_features` return them; `logit_scale` is kept so logits can be reproduced.
    """

    config: CLIPConfig

    def setup(self) -> None:
        cfg = self.config
        dtype = get_dtype(cfg.dtype)
        self.vision_model = VisionTransformer(cfg.vision, dtype)
        self.text_model = TextTransformer(cfg.text, dtype)
        self.visual_projection = _dense(cfg.projection_dim, ("embed", None), dtype, None, False)
        self.text_projection = _dense(cfg.projection_dim, ("embed", None), dtype, None, False)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(math.log(1 / 0.07)), ()
        )

    def encode_image(self, pixels: jax.Array) -> jax.Array:
        """[B, image_size, image_size, 3] float32 (see `clip.preprocess`) -> [B, projection_dim]."""
        out = self.visual_projection(self.vision_model(pixels)).astype(jnp.float32)
        chex.assert_shape(out, (pixels.shape[0], self.config.projection_dim))
        return out

    def encode_text(self, ids: jax.Array) -> jax.Array:
        """[B, S] int token ids with BOS ... EOS, S <= 77 -> [B, projection_dim]."""
        out = self.text_projection(self.text_model(ids)).astype(jnp.float32)
        chex.assert_shape(out, (ids.shape[0], self.config.projection_dim))
        return out

    def __call__(self, pixels: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (image features, text features, logits_per_image [B_img, B_txt]).

        Features are unnormalised, as `encode_*` return them; logits are `CLIPModel`'s:
        exp(logit_scale) * cosine.
        """
        img, txt = self.encode_image(pixels), self.encode_text(ids)
        cos = (img / jnp.linalg.norm(img, axis=-1, keepdims=True)) @ (
            txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        ).T
        return img, txt, jnp.exp(self.logit_scale) * cos


def _dummy_inputs(config: CLIPConfig) -> tuple[jax.Array, jax.Array]:
    v = config.vision
    return (
        jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32),
        jnp.zeros((1, config.text.max_position_embeddings), jnp.int32),
    )


def init_params(config: CLIPConfig, rng: jax.Array) -> dict:
    """Random unboxed parameters (for tests and benchmarks; the metric loads `load_params`)."""
    return nn.unbox(jax.jit(CLIP(config).init)(rng, *_dummy_inputs(config))["params"])


def param_shapes(config: CLIPConfig) -> dict:
    """The unboxed parameter tree of `CLIP(config)` as `jax.ShapeDtypeStruct`s, unallocated."""
    abstract = jax.eval_shape(CLIP(config).init, jax.random.key(0), *_dummy_inputs(config))
    return nn.unbox(abstract["params"])


def param_count(config: CLIPConfig) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(config)))


def text_encoder(block, dtype: str = "float32") -> CLIPTextEncoder:
    """The `CLIPTextEncoder` a `config.text_encoder` block (name 'clip') describes."""
    return CLIPTextEncoder(
        TextConfig(**dict(block.clip)),
        int(block.projection_dim),
        int(block.get("hidden_layer", -2)),
        get_dtype(dtype),
    )
