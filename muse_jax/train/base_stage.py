"""Stage 2: the base masked transformer over the frozen tokenizer's tokens.

A cosine-scheduled fraction of tokens is replaced by [MASK]; the loss is cross-entropy on the
masked positions only; `cond_dropout` of the captions are replaced by the empty prompt so that
the same model serves as the unconditional branch of classifier-free guidance.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from muse_jax import parallel
from muse_jax.data import tasks, vocabulary
from muse_jax.models import factory
from muse_jax.sampling import mask_schedule
from muse_jax.sampling.sampler import MuseSampler
from muse_jax.train import checkpoints, losses, optim, stage, summaries
from muse_jax.train.state import TrainState


def tokenizer_dir(config, workdir: str) -> str:
    return os.path.join(config.tokenizer_workdir or workdir, "tokenizer")


def load_tokenizer_params(config, workdir: str, mesh, axis_rules) -> tuple[Any, int]:
    """The trained tokenizer's parameters (replicated/sharded by the rules) and their step."""
    from muse_jax.train.tokenizer_stage import TokenizerStage

    tok_stage = TokenizerStage(config, workdir)
    abstract, _ = parallel.abstract_state(tok_stage.init, jax.random.PRNGKey(0), mesh, axis_rules)
    state, step = checkpoints.load_params(tokenizer_dir(config, workdir), abstract, "tokenizer")
    return state.params["vq"], step


def load_for_sampling(config, workdir: str):
    """(sampler, params, step) from the experiment's latest base and tokenizer checkpoints."""
    base = BaseStage(config, workdir)
    mesh = parallel.create_mesh(config)
    axis_rules = parallel.rules(config)
    abstract, _ = parallel.abstract_state(base.init, jax.random.PRNGKey(0), mesh, axis_rules)
    state, step = checkpoints.load_params(base.stage_dir, abstract, "base")
    tok_params, _ = load_tokenizer_params(config, workdir, mesh, axis_rules)
    return base.sampler, base.sampler_params(state, {"tokenizer": tok_params}), step


@stage.register
class BaseStage(stage.Stage):
    name = "base"

    def __init__(self, config, workdir: str):
        super().__init__(config, workdir)
        self.tokenizer = factory.tokenizer(config)
        vocab = vocabulary.get_vocabulary(config, tasks.data_dir(config, workdir))
        self.text_encoder = factory.text_encoder(config, vocab.vocab_size)
        self.transformer = factory.base_transformer(config)
        self.tx = optim.make(self.train_config.optimizer, self.train_config.num_steps)
        empty_ids, empty_mask = tasks.encode_prompts(config, workdir, [""])
        self.empty_ids, self.empty_mask = jnp.asarray(empty_ids), jnp.asarray(empty_mask)
        self.sampler = MuseSampler(
            self.transformer, self.text_encoder, self.tokenizer, config.sampling
        )

    def init(self, rng: jax.Array) -> TrainState:
        length = self.config.data.text_length
        ids = jnp.zeros((1, length), jnp.int32)
        mask = jnp.ones((1, length), jnp.int32)
        t_rng, x_rng, rng = jax.random.split(rng, 3)
        text_params = self.text_encoder.init(t_rng, ids, mask)["params"]
        ctx = jax.eval_shape(
            lambda: self.text_encoder.apply({"params": nn.unbox(text_params)}, ids, mask)
        )
        tokens = jnp.zeros((1, self.transformer.seq_len), jnp.int32)
        tr_params = self.transformer.init(x_rng, tokens, jnp.zeros(ctx.shape, ctx.dtype), mask)[
            "params"
        ]
        params = {"transformer": tr_params, "text_encoder": text_params}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            rng=rng,
            extra={},
        )

    def frozen(self, mesh, axis_rules) -> Any:
        params, step = load_tokenizer_params(self.config, self.workdir, mesh, axis_rules)
        print(
            f"[base] using tokenizer checkpoint step {step} from {tokenizer_dir(self.config, self.workdir)}"
        )
        return {"tokenizer": params}

    def batches(self, seed: int) -> Iterator[dict[str, np.ndarray]]:
        return tasks.batches(
            self.config,
            self.workdir,
            split="train",
            batch_size=self.train_config.batch_size,
            seed=seed,
        )

    def train_step(
        self, state: TrainState, batch: dict[str, jax.Array], frozen: Any
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        cfg = self.stage_config
        rng, mask_rng, drop_rng, dropout_rng = jax.random.split(state.rng, 4)
        tokens = self.tokenizer.apply(
            {"params": frozen["tokenizer"]}, batch["image"], method=self.tokenizer.tokenize
        )
        tokens = jax.lax.stop_gradient(tokens)
        masked = mask_schedule.random_mask(mask_rng, tokens.shape, cfg.mask_schedule)
        inputs = jnp.where(masked, self.transformer.mask_id, tokens)
        drop = jax.random.uniform(drop_rng, (tokens.shape[0], 1)) < cfg.cond_dropout
        text_ids = jnp.where(drop, self.empty_ids, batch["text_ids"])
        text_mask = jnp.where(drop, self.empty_mask, batch["text_mask"])

        def loss_fn(params):
            ctx = self.text_encoder.apply({"params": params["text_encoder"]}, text_ids, text_mask)
            logits = self.transformer.apply(
                {"params": params["transformer"]},
                inputs,
                ctx,
                text_mask,
                deterministic=False,
                rngs={"dropout": dropout_rng},
            )
            return losses.masked_cross_entropy(logits, tokens, masked, cfg.label_smoothing)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "masked_accuracy": acc,
            "mask_rate": jnp.mean(masked.astype(jnp.float32)),
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
        }
        return state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, rng=rng
        ), metrics

    def sampler_params(self, state: TrainState, frozen: Any) -> dict[str, Any]:
        return {
            "transformer": state.params["transformer"],
            "text_encoder": state.params["text_encoder"],
            "tokenizer": frozen["tokenizer"],
        }

    def write_summaries(self, state, frozen, writer, step: int):
        from muse_jax.eval import alignment_eval

        ev = self.config.eval
        prompts = list(ev.seen_prompts)[:4] + list(ev.held_out_prompts)[:4]
        result = alignment_eval.generate(
            self.config,
            self.workdir,
            self.sampler,
            self.sampler_params(state, frozen),
            prompts,
            samples_per_prompt=4,
            seed=0,
        )
        image = summaries.upscale(summaries.grid(result.images, columns=4 * 2), 2)
        writer.write_images(step, {"samples": image[None]})
        return {f"eval/alignment_{k}": v for k, v in result.scores.items() if k != "count"}
