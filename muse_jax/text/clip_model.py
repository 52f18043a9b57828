"""CLIP (Radford et al., 2021) in Flax Linen, as `transformers.CLIPModel` defines it, for CLIP score.

Two pre-LayerNorm transformer towers with biased projections and (for the OpenAI checkpoints)
`quick_gelu`:

- vision: patches (a bias-free conv), a learned class token, absolute position embeddings,
  `pre_layrnorm` (sic, Hugging Face's name), the encoder, then `post_layernorm` on the class token;
- text: token + position embeddings, a causal encoder, `final_layer_norm`, pooled at the EOS token;

each followed by a bias-free projection into the shared space. The parameter tree mirrors the
Hugging Face module names (`text_model/encoder/layers_3/self_attn/q_proj/kernel`, ...) so that
`load_params` maps a safetensors checkpoint onto it key by key:

    HF [out, in] Linear weights    -> Flax [in, out] kernels (transposed)
    HF [D, C, p, p] patch conv     -> Flax [p, p, C, D] conv kernel
    LayerNorm weight / bias        -> scale / bias
    Embedding weight               -> embedding

The checkpoint directory may be local or on gs:// (through `muse_jax.storage`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterator
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import storage
from muse_jax.models.layers import Dtype, constrain, get_dtype, partitioned
from muse_jax.text.safetensors_t5 import CheckpointError, _read, _weight_files

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

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
        raise ValueError(f"Unknown CLIP preset {name!r}; valid: {sorted(PRESETS)}.")
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
            raise ValueError(f"hidden_size {width} is not divisible by {heads} heads.")
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
            raise ValueError(
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
            raise ValueError(
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
            raise ValueError(f"hidden_layer {self.hidden_layer} outside a {layers}-layer tower.")
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


# ----------------------------------------------------------------------------- checkpoints


def _tower_fields(hf: dict, tower: str, cls: type[TowerConfig]) -> dict:
    """The tower's config as transformers 5.24's `CLIPConfig` resolves it.

    Old checkpoints (openai/clip-vit-large-patch14 among them) carry both `text_config` and a
    `text_config_dict`; transformers then builds a full `CLIPTextConfig` from the *_dict (its
    defaults filling the gaps) and lets it override `text_config` key by key, so e.g. their
    stale `eos_token_id: 2` becomes the default 49407.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    fields = {**defaults, **(hf.get(f"{tower}_config") or {})}
    override = hf.get(f"{tower}_config_dict")
    if override is not None:
        fields.update({**defaults, **override})
    return {k: fields[k] for k in defaults}


def config_from_hf(path: str, dtype: str = "float32") -> CLIPConfig:
    """Builds a `CLIPConfig` from `path/config.json` of a `transformers` `CLIPModel`."""
    if not storage.isdir(path):
        raise CheckpointError(f"{path}: CLIP checkpoint directory does not exist.")
    file = storage.join(path, CONFIG_FILE)
    if not storage.exists(file):
        raise CheckpointError(
            f"{path}: missing {CONFIG_FILE} (a transformers CLIPModel directory)."
        )
    hf = storage.read_json(file)
    if hf.get("model_type") != "clip" or "vision_config" not in hf or "text_config" not in hf:
        raise CheckpointError(
            f"{file}: not a CLIP config (model_type={hf.get('model_type')!r}); expected a "
            "transformers CLIPModel with text_config and vision_config."
        )
    vision = _tower_fields(hf, "vision", VisionConfig)
    text = _tower_fields(hf, "text", TextConfig)
    for name, fields in (("vision", vision), ("text", text)):
        bad = {k: v for k, v in fields.items() if isinstance(v, (list, tuple, dict))}
        if bad:
            raise CheckpointError(f"{file}: {name}_config fields {bad} must be single numbers.")
        if fields["hidden_act"] not in ACTIVATIONS:
            raise CheckpointError(
                f"{file}: {name}_config.hidden_act {fields['hidden_act']!r} is not one of "
                f"{sorted(ACTIVATIONS)}."
            )
    return CLIPConfig(
        vision=VisionConfig(**vision),
        text=TextConfig(**text),
        projection_dim=hf.get("projection_dim", 512),
        dtype=dtype,
    )


def _hf_to_flax(config: CLIPConfig) -> dict[str, tuple[tuple[str, ...], str]]:
    """Maps each key of the HF layout to (path in the Flax tree, "linear" | "conv" | "copy")."""
    table: dict[str, tuple[tuple[str, ...], str]] = {
        "logit_scale": (("logit_scale",), "copy"),
        "visual_projection.weight": (("visual_projection", "kernel"), "linear"),
        "text_projection.weight": (("text_projection", "kernel"), "linear"),
    }

    def norm(hf: str, fx: tuple[str, ...]) -> None:
        table[f"{hf}.weight"] = ((*fx, "scale"), "copy")
        table[f"{hf}.bias"] = ((*fx, "bias"), "copy")

    def linear(hf: str, fx: tuple[str, ...]) -> None:
        table[f"{hf}.weight"] = ((*fx, "kernel"), "linear")
        table[f"{hf}.bias"] = ((*fx, "bias"), "copy")

    for tower, layers in (
        ("vision_model", config.vision.num_hidden_layers),
        ("text_model", config.text.num_hidden_layers),
    ):
        for i in range(layers):
            hf, fx = f"{tower}.encoder.layers.{i}", (tower, "encoder", f"layers_{i}")
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                linear(f"{hf}.self_attn.{proj}", (*fx, "self_attn", proj))
            linear(f"{hf}.mlp.fc1", (*fx, "mlp", "fc1"))
            linear(f"{hf}.mlp.fc2", (*fx, "mlp", "fc2"))
            norm(f"{hf}.layer_norm1", (*fx, "layer_norm1"))
            norm(f"{hf}.layer_norm2", (*fx, "layer_norm2"))
    v, t = "vision_model", "text_model"
    table[f"{v}.embeddings.class_embedding"] = ((v, "class_embedding"), "copy")
    table[f"{v}.embeddings.patch_embedding.weight"] = ((v, "patch_embedding", "kernel"), "conv")
    table[f"{v}.embeddings.position_embedding.weight"] = (
        (v, "position_embedding", "embedding"),
        "copy",
    )
    norm(f"{v}.pre_layrnorm", (v, "pre_layrnorm"))
    norm(f"{v}.post_layernorm", (v, "post_layernorm"))
    table[f"{t}.embeddings.token_embedding.weight"] = ((t, "token_embedding", "embedding"), "copy")
    table[f"{t}.embeddings.position_embedding.weight"] = (
        (t, "position_embedding", "embedding"),
        "copy",
    )
    norm(f"{t}.final_layer_norm", (t, "final_layer_norm"))
    return table


# safetensors dtype names -> numpy; BF16 (no numpy type) is widened by hand in `_read_remote`.
_NUMPY_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


def _remote_weight_files(path: str) -> dict[str, str]:
    """`_weight_files` for a gs:// directory: the index's weight map, or else the keys listed in
    the header of the single file (read without its tensors)."""
    index = storage.join(path, INDEX_FILE)
    if storage.exists(index):
        weight_map = storage.read_json(index)["weight_map"]
        return {k: storage.join(path, v) for k, v in weight_map.items()}
    single = storage.join(path, WEIGHTS_FILE)
    if not storage.exists(single):
        raise CheckpointError(f"{path}: neither {WEIGHTS_FILE} nor {INDEX_FILE} exists.")
    with storage.checked("reading", single), storage.path(single).open("rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    return dict.fromkeys(sorted(k for k in header if k != "__metadata__"), single)


def _read_remote(files: dict[str, str], keys: list[str]) -> Iterator[tuple[str, np.ndarray, str]]:
    """`_read` for gs:// files: safetensors memory-maps local files only, so each file is read
    whole into memory (CLIP ViT-L/14 is 1.7 GB) and parsed from its bytes, once per file."""
    from safetensors import deserialize

    by_file: dict[str, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    for file, file_keys in by_file.items():
        with storage.checked("reading", file):
            tensors = dict(deserialize(storage.read_bytes(file)))
        for k in file_keys:
            t = tensors.pop(k)
            if t["dtype"] == "BF16":  # bfloat16 is the top half of a float32.
                raw = np.frombuffer(t["data"], dtype="<u2").astype(np.uint32) << 16
                value = raw.view(np.float32)
            elif t["dtype"] in _NUMPY_DTYPES:
                value = np.frombuffer(t["data"], dtype=_NUMPY_DTYPES[t["dtype"]])
            else:
                raise CheckpointError(f"{file}: key {k!r} has unsupported dtype {t['dtype']}.")
            yield k, np.asarray(value, dtype=np.float32).reshape(t["shape"]), file
        del tensors


_TO_FLAX = {
    "copy": lambda x: x,
    "linear": lambda x: x.T,  # torch Linear [out, in] -> Flax [in, out]
    "conv": lambda x: x.transpose(2, 3, 1, 0),  # torch [D, C, p, p] -> Flax [p, p, C, D]
}
_FROM_FLAX = {
    "copy": lambda x: x,
    "linear": lambda x: x.T,
    "conv": lambda x: x.transpose(3, 2, 0, 1),
}


def load_params(path: str, config: CLIPConfig | None = None) -> dict:
    """Loads a `transformers` `CLIPModel` safetensors checkpoint (single file or sharded).

    Args:
      path: directory with config.json and model.safetensors (or an index and its shards).
      config: the model to load into; defaults to `config_from_hf(path)`.
    Returns:
      The unboxed `CLIP` parameter tree, float32 numpy arrays (fp16/bf16 files are upcast).
    Raises:
      CheckpointError: one line naming the key and file, for a missing key, an unexpected key
        (e.g. a checkpoint of another architecture), or a shape that differs from the model's.
    """
    config = config or config_from_hf(path)
    return _load_table(path, _hf_to_flax(config), param_shapes(config), "a CLIPModel")


def text_encoder_from_hf(hf: dict, source: str, hidden_layer: int = -2) -> dict[str, Any]:
    """The `config.base.text_encoder` block (name 'clip') of a transformers
    `CLIPTextModelWithProjection` config.json dict (aMUSEd's and SDXL's `text_encoder`)."""
    if hf.get("model_type") != "clip_text_model":
        raise CheckpointError(
            f"{source}: model_type {hf.get('model_type')!r}, expected 'clip_text_model' (a "
            "transformers CLIPTextModelWithProjection)."
        )
    defaults = {f.name: f.default for f in dataclasses.fields(TextConfig)}
    fields = {k: hf.get(k, v) for k, v in defaults.items()}
    if fields["hidden_act"] not in ACTIVATIONS:
        raise CheckpointError(
            f"{source}: hidden_act {fields['hidden_act']!r} is not one of {sorted(ACTIVATIONS)}."
        )
    return dict(
        name="clip",
        clip=fields,
        projection_dim=int(hf.get("projection_dim", 512)),
        hidden_layer=hidden_layer,
    )


def text_encoder(block, dtype: str = "float32") -> CLIPTextEncoder:
    """The `CLIPTextEncoder` a `config.base.text_encoder` block (name 'clip') describes."""
    return CLIPTextEncoder(
        TextConfig(**dict(block.clip)),
        int(block.projection_dim),
        int(block.get("hidden_layer", -2)),
        get_dtype(dtype),
    )


def load_text_encoder_params(path: str, encoder: CLIPTextEncoder) -> dict:
    """The unboxed `encoder` parameters from a transformers `CLIPTextModelWithProjection`
    directory (model.safetensors or sharded; local or gs://)."""
    ids = jnp.zeros((1, encoder.config.max_position_embeddings), jnp.int32)
    expected = nn.unbox(jax.eval_shape(encoder.init, jax.random.key(0), ids)["params"])
    full = _hf_to_flax(CLIPConfig(text=encoder.config, vision=VisionConfig(num_hidden_layers=0)))
    table = {k: v for k, v in full.items() if k.startswith("text_model.")}
    table["text_projection.weight"] = (("text_projection", "kernel"), "linear")
    return _load_table(path, table, expected, "a CLIPTextModelWithProjection")


def _load_table(path: str, table: dict, expected: Any, what: str) -> dict:
    """The tree `expected` read from the safetensors files of directory `path` by `table`
    (transformers key -> (Flax path, layout)); one-line CheckpointErrors."""
    remote = storage.is_remote(path)
    if not storage.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory does not exist.")
    files = _remote_weight_files(path) if remote else _weight_files(path)
    index = storage.join(path, INDEX_FILE)
    source = index if storage.exists(index) else storage.join(path, WEIGHTS_FILE)
    for file in sorted(set(files.values())):
        if not storage.exists(file):
            raise CheckpointError(f"{source}: names {os.path.basename(file)}, which is missing.")
    for k, file in files.items():
        # position_ids are non-trainable buffers that older transformers versions saved.
        if k not in table and not k.endswith("embeddings.position_ids"):
            raise CheckpointError(f"{file}: unexpected key {k!r} for {what} of this config.")
    for k in table:
        if k not in files:
            raise CheckpointError(f"{source}: missing key {k!r}.")
    params: dict = {}
    for k, value, file in (_read_remote if remote else _read)(files, list(table)):
        where, kind = table[k]
        want = expected
        for name in where:
            want = want[name]
        value = _TO_FLAX[kind](value)
        if value.shape != tuple(want.shape):
            hf_shape = _FROM_FLAX[kind](np.empty(want.shape, np.uint8)).shape
            raise CheckpointError(
                f"{file}: key {k!r} has shape {_FROM_FLAX[kind](value).shape}, expected {hf_shape}."
            )
        node = params
        for name in where[:-1]:
            node = node.setdefault(name, {})
        node[where[-1]] = np.array(value, np.float32, order="C")  # keeps 0-d logit_scale 0-d
    return params
