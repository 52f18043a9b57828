"""The Flax modules a config describes for sampling, and the shapes of their parameters.

Sampling needs, per stage, a subset of what training saves: the tokenizers' VQ models (not their
discriminators), the transformers and their trainable text encoders (not the optimizer), the
fine-tuned decoder (not the frozen encoder it was trained beside). `param_tree` gives each of
those subsets as a boxed tree with logical axis names, so a reader can place the arrays on any
mesh without knowing how the stage was trained. The training stages build their parameters with
the same functions, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.errors import UsageError
from muse_jax.models import factory
from muse_jax.stages import has_cascade

# The stages whose parameters sampling reads, in cascade order.
BASE_COMPONENTS = ("tokenizer", "base")
SUPERRES_COMPONENTS = ("superres_tokenizer", "superres", "decoder")


def init_vq(model, image_size: int, rng: jax.Array) -> Any:
    """A VQGAN's (boxed) parameters for `image_size`² RGB inputs."""
    return model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32))["params"]


def init_text(text_encoder, length: int, rng: jax.Array) -> Any:
    ids = jnp.zeros((1, length), jnp.int32)
    return text_encoder.init(rng, ids, jnp.ones_like(ids))["params"]


def context_shape(text_encoder, text_params: Any, length: int, emb_shape=None) -> Any:
    """The transformer's text context for one prompt, as `jax.ShapeDtypeStruct`s: the
    encoder's output ([1, S, D], or a dict such as CLIP's {'hidden', 'pooled'}), or the shape
    of the precomputed embeddings (`emb_shape`, [N, S, D]) when there is no encoder in the
    graph."""
    if text_encoder is None:
        return jax.ShapeDtypeStruct((1,) + tuple(emb_shape[1:]), jnp.float32)
    ids = jnp.zeros((1, length), jnp.int32)
    return jax.eval_shape(
        lambda p: text_encoder.apply({"params": p}, ids, jnp.ones_like(ids)), text_params
    )


def context_length(ctx: Any) -> int:
    """S of a text context (its 'hidden' states when it is a dict)."""
    return (ctx["hidden"] if isinstance(ctx, dict) else ctx).shape[1]


def init_transformer(transformer, ctx_shape: Any, rng: jax.Array, **inputs) -> Any:
    """A (super-res) masked transformer's (boxed) parameters for a one-prompt context
    (`context_shape`)."""
    tokens = jnp.zeros((1, transformer.seq_len), jnp.int32)
    mask = jnp.ones((1, context_length(ctx_shape)), jnp.int32)
    ctx = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), ctx_shape)
    return transformer.init(rng, tokens, ctx, mask, **inputs)["params"]


@dataclasses.dataclass
class Modules:
    """Every Flax module of a config's sampling path."""

    tokenizer: Any
    base: Any
    text_encoder: Any | None  # None: precomputed embeddings.
    text_trainable: bool  # Its weights are in each transformer stage's parameters.
    superres_tokenizer: Any | None = None
    superres: Any | None = None
    finetuned_decoder: Any | None = None  # The high-res VQGAN with the fine-tuned decoder.

    @property
    def cascade(self) -> bool:
        return self.superres is not None


def build(config, vocab_size: int | None, precomputed: bool, cascade: bool) -> Modules:
    """The modules of `config`; `vocab_size` sizes a text encoder in the graph."""
    text = None if precomputed else factory.text_encoder(config, vocab_size)
    modules = Modules(
        tokenizer=factory.tokenizer(config),
        base=factory.base_transformer(config),
        text_encoder=text,
        text_trainable=text is not None and bool(config.text_encoder.trainable),
    )
    if cascade:
        if not has_cascade(config):
            raise UsageError("The cascade needs config.superres and config.data.hr_image_size > 0.")
        modules.superres_tokenizer = factory.superres_tokenizer(config)
        modules.superres = factory.superres_transformer(config)
        if "decoder" in config:
            modules.finetuned_decoder = factory.finetuned_decoder_vqgan(config)
    return modules


def param_tree(
    config, modules: Modules, component: str, emb_shape=None
) -> Callable[[jax.Array], Any]:
    """rng -> the boxed parameter subset sampling reads from stage `component`'s `params`."""
    length = config.data.text_length
    hr = config.data.get("hr_image_size", 0)

    def transformer_stage(transformer, rng, **inputs):
        t_rng, x_rng = jax.random.split(rng)
        params = {}
        text_params = None
        if modules.text_encoder is not None:
            text_params = init_text(modules.text_encoder, length, t_rng)
            if modules.text_trainable:
                params["text_encoder"] = text_params
        ctx = context_shape(
            modules.text_encoder,
            None if text_params is None else nn.unbox(text_params),
            length,
            emb_shape,
        )
        params["transformer"] = init_transformer(transformer, ctx, x_rng, **inputs)
        return params

    trees = {
        "tokenizer": lambda rng: {"vq": init_vq(modules.tokenizer, config.data.image_size, rng)},
        "base_decoder": lambda rng: {
            "decoder": init_vq(modules.tokenizer, config.data.image_size, rng)["decoder"]
        },
        "base": lambda rng: transformer_stage(modules.base, rng),
        "superres_tokenizer": lambda rng: {"vq": init_vq(modules.superres_tokenizer, hr, rng)},
        "superres": lambda rng: transformer_stage(
            modules.superres,
            rng,
            lowres=modules.superres.lowres_example() if modules.superres is not None else None,
        ),
        "decoder": lambda rng: {"decoder": init_vq(modules.finetuned_decoder, hr, rng)["decoder"]},
    }
    if component not in trees:
        raise UsageError(f"Unknown component {component!r}; valid: {sorted(trees)}.")
    return trees[component]
