"""Stage 2: the base masked transformer over the frozen tokenizer's tokens.

A cosine-scheduled fraction of tokens is replaced by [MASK]; the loss is cross-entropy on the
masked positions only; `cond_dropout` of the captions are replaced by the empty prompt so that
the same model serves as the unconditional branch of classifier-free guidance.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from muse_jax import parallel, stages
from muse_jax.data import tasks
from muse_jax.errors import UsageError
from muse_jax.inference import modules
from muse_jax.models import factory
from muse_jax.sampling import mask_schedule
from muse_jax.sampling.sampler import MuseSampler
from muse_jax.text.conditioning import TextConditioner
from muse_jax.train import losses, optim, stage, summaries
from muse_jax.train.state import TrainState


def tokenizer_dir(config, workdir: str) -> str:
    return stages.stage_dir(config, workdir, "tokenizer")


def load_tokenizer_params(
    config, workdir: str, mesh, axis_rules, abstract: bool = False
) -> tuple[Any, int]:
    """The trained tokenizer's parameters (replicated/sharded by the rules) and their step."""
    params, step = stage.load_trained(
        config, workdir, "tokenizer", mesh, axis_rules, tokenizer_dir(config, workdir), abstract
    )
    return params["vq"], step


class BaseStage(stage.Stage):
    name = "base"
    image_keys: tuple[str, ...] = ("image",)  # The resolutions `targets` reads.

    def __init__(self, config, workdir: str, conditioner: TextConditioner | None = None):
        """`conditioner`: the captions' text input (default: the config's, reading its
        vocabulary or embedding table); `muse_jax.aot` passes a shapes-only one."""
        super().__init__(config, workdir)
        self.tokenizer = factory.tokenizer(config)
        self.conditioner = conditioner or TextConditioner(config, workdir)
        tcfg = self.config.text_encoder  # One text configuration for every stage.
        if self.conditioner.precomputed:
            self.text_encoder = None
            self.text_trainable = False
        else:
            self.text_encoder = factory.text_encoder(config, self.conditioner.vocab.vocab_size)
            self.text_trainable = bool(tcfg.trainable)
        self.transformer = self.build_transformer()
        self.tx = optim.make(self.train_config.optimizer, self.train_config.num_steps)
        self.empty = {k: jnp.asarray(v) for k, v in self.conditioner.encode([""]).items()}

    @functools.cached_property
    def sampler(self):
        """The stage's sampler, built on first use (after every subclass's constructor)."""
        return self.build_sampler()

    def build_transformer(self):
        return factory.base_transformer(self.config)

    def build_sampler(self) -> MuseSampler:
        return MuseSampler(
            self.transformer, self.text_encoder, self.tokenizer, self.stage_config.sampling
        )

    def init_inputs(self) -> dict[str, jax.Array]:
        """Extra inputs of the transformer beyond (tokens, context, mask), for `init`."""
        return {}

    def _context_shape(self, text_params) -> Any:
        emb = self.empty.get("text_emb")
        return modules.context_shape(
            self.text_encoder,
            text_params,
            self.config.data.text_length,
            None if emb is None else emb.shape,
        )

    def _text_init(self, rng: jax.Array):
        length = self.config.data.text_length
        ids = jnp.zeros((1, length), jnp.int32)
        return self.text_encoder.init(rng, ids, jnp.ones_like(ids))["params"]

    def init(self, rng: jax.Array) -> TrainState:
        t_rng, x_rng, rng = jax.random.split(rng, 3)
        params = {}
        if self.text_encoder is not None:
            text_params = self._text_init(t_rng)
            ctx_shape = self._context_shape(nn.unbox(text_params))
            if self.text_trainable:
                params["text_encoder"] = text_params
        else:
            ctx_shape = self._context_shape(None)
        params["transformer"] = modules.init_transformer(
            self.transformer, ctx_shape, x_rng, **self.init_inputs()
        )
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            rng=rng,
            extra={},
        )

    def warm_start(self, state: TrainState, mesh, axis_rules) -> TrainState:
        """`base.init_from='model:DIR'`: fine-tune the base stage of an exported or converted
        model (e.g. aMUSEd from `muse_jax.convert`) instead of starting from random weights."""
        source = self.stage_config.get("init_from", "")
        if source and not source.startswith(stage.MODEL_PREFIX):
            raise UsageError(f"{self.name}.init_from={source!r}; valid: '' or 'model:DIR'.")
        return self.init_from_model(state, "base", ("transformer", "text_encoder"))

    def frozen(self, mesh, axis_rules, abstract: bool = False) -> Any:
        params, step = load_tokenizer_params(self.config, self.workdir, mesh, axis_rules, abstract)
        if not abstract:
            print(
                f"[{self.name}] using tokenizer checkpoint step {step} from "
                f"{tokenizer_dir(self.config, self.workdir)}"
            )
        frozen = {"tokenizer": params}
        if self.text_encoder is not None and not self.text_trainable:
            frozen["text_encoder"] = self.frozen_text_encoder(mesh, axis_rules, abstract)
        return frozen

    def frozen_text_encoder(self, mesh, axis_rules, abstract: bool = False) -> Any:
        """The frozen (e.g. T5) encoder's weights from config.text_encoder.checkpoint."""
        from muse_jax.text import loading

        shapes, shardings = parallel.abstract_state(
            self._text_init, jax.random.PRNGKey(0), mesh, axis_rules
        )
        if abstract:
            return shapes
        return loading.load_text_encoder(self.config, shapes, shardings)

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        spec = {}
        for key in self.image_keys:
            size = self.config.data.image_size if key == "image" else self.config.data.hr_image_size
            spec[key] = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)
        for key, value in self.empty.items():  # The text input, as the empty prompt's.
            spec[key] = jax.ShapeDtypeStruct((batch_size,) + value.shape[1:], value.dtype)
        return spec

    def batches(self, seed: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        it = tasks.batches(
            self.config,
            self.workdir,
            split="train",
            batch_size=self.train_config.batch_size,
            seed=seed,
            start_step=start_step,
            keep_captions=self.conditioner.host_encoded,
            images=self.image_keys,
        )
        if self.conditioner.host_encoded:
            return (self.conditioner.add_to_batch(b) for b in it)
        return it

    def encode_text(self, params, frozen, text: dict[str, jax.Array]) -> jax.Array:
        """The transformer's context [B, S, D] from ids (encoder in the graph) or embeddings."""
        if "text_emb" in text:
            return text["text_emb"]
        text_params = params["text_encoder"] if self.text_trainable else frozen["text_encoder"]
        return self.text_encoder.apply({"params": text_params}, text["text_ids"], text["text_mask"])

    def targets(
        self, batch: dict[str, jax.Array], frozen: Any
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(token ids the loss predicts [B, L], extra transformer inputs) from a batch."""
        tokens = self.tokenizer.apply(
            {"params": frozen["tokenizer"]}, batch["image"], method=self.tokenizer.tokenize
        )
        return jax.lax.stop_gradient(tokens), {}

    def loss(
        self,
        params: Any,
        frozen: Any,
        inputs: jax.Array,
        targets: jax.Array,
        masked: jax.Array,
        text: dict[str, jax.Array],
        inputs_kw: dict[str, jax.Array],
        dropout_rng: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """(loss, accuracy): cross-entropy against `targets` on the `masked` positions only."""
        ctx = self.encode_text(params, frozen, text)
        logits = self.transformer.apply(
            {"params": params["transformer"]},
            inputs,
            ctx,
            text["text_mask"],
            **inputs_kw,
            deterministic=False,
            rngs={"dropout": dropout_rng},
        )
        cfg = self.stage_config
        return losses.masked_cross_entropy(logits, targets, masked, cfg.label_smoothing)

    def train_step(
        self, state: TrainState, batch: dict[str, jax.Array], frozen: Any
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        cfg = self.stage_config
        rng, mask_rng, drop_rng, dropout_rng = jax.random.split(state.rng, 4)
        tokens, inputs_kw = self.targets(batch, frozen)
        masked = mask_schedule.random_mask(mask_rng, tokens.shape, cfg.mask_schedule)
        inputs = jnp.where(masked, self.transformer.mask_id, tokens)
        # Classifier-free guidance: some captions become the empty prompt.
        drop = jax.random.uniform(drop_rng, (tokens.shape[0],)) < cfg.cond_dropout
        text = {
            k: jnp.where(drop.reshape((-1,) + (1,) * (batch[k].ndim - 1)), self.empty[k], batch[k])
            for k in self.empty
        }

        def loss_fn(params):
            return self.loss(params, frozen, inputs, tokens, masked, text, inputs_kw, dropout_rng)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        params, opt_state, grad_norm = stage.apply_gradients(self.tx, state, grads)
        metrics = {
            "loss": loss,
            "masked_accuracy": acc,
            "mask_rate": jnp.mean(masked.astype(jnp.float32)),
            "grad_norm": grad_norm,
            "param_norm": optax.global_norm(params),
        }
        return state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, rng=rng
        ), metrics

    def sampler_params(self, trained: Any, frozen: Any) -> dict[str, Any]:
        """What the sampler needs, from the trained parameters (`state.params`) and `frozen`."""
        params = {"transformer": trained["transformer"], "vq": frozen["tokenizer"]}
        if self.text_encoder is not None:
            params["text_encoder"] = (
                trained["text_encoder"] if self.text_trainable else frozen["text_encoder"]
            )
        return params

    def write_summaries(self, state, frozen, writer, step: int):
        from muse_jax.data import shapes_alignment
        from muse_jax.inference.model import Model
        from muse_jax.inference.pipeline import MusePipeline

        ev = self.config.eval
        prompts = list(ev.seen_prompts)[:4] + list(ev.held_out_prompts)[:4]
        params = self.sampler_params(state.params, frozen)
        model = Model.in_memory(self.config, self.sampler, params, self.conditioner)
        pipe = MusePipeline(model, batch_size=4 * len(prompts))
        out = pipe(prompts, num_images_per_prompt=4, seed=0)
        image = summaries.upscale(summaries.grid(out.array, columns=4 * 2), 2)
        writer.write_images(step, {"samples": image[None]})
        scores = shapes_alignment.score_or_empty(out.array, out.captions)
        return {f"eval/alignment_{k}": v for k, v in scores.items() if k != "n"}
