"""Stage 6: decoder fine-tuning (Muse section 2.3).

The high-res tokenizer's encoder and codebook stay frozen (so every token the super-res stage
learned keeps its meaning) while a deeper/wider decoder learns to turn those same tokens into
better pixels with the tokenizer's losses. Parameters whose names and shapes match the trained
decoder start from it; the added residual blocks start as the identity, so step 0 reproduces
the plain decoder exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from muse_jax.data import tasks
from muse_jax.models import factory
from muse_jax.train import losses, optim, stage, summaries
from muse_jax.train.state import TrainState
from muse_jax.train.tokenizer_stage import make_discriminator, reconstruction_loss


def merge_matching(fresh: Any, trained: Any) -> tuple[Any, int, int]:
    """`fresh` with every leaf whose path and shape also exist in `trained` taken from it.

    Returns (params, loaded leaf count, fresh leaf count).
    """
    flat_fresh = traverse_util.flatten_dict(fresh)
    flat_trained = traverse_util.flatten_dict(trained)
    out, loaded = {}, 0
    for path, value in flat_fresh.items():
        old = flat_trained.get(path)
        if old is not None and old.shape == value.shape:
            out[path], loaded = old.astype(value.dtype), loaded + 1
        else:
            out[path] = value
    return traverse_util.unflatten_dict(out), loaded, len(flat_fresh) - loaded


class DecoderStage(stage.Stage):
    name = "decoder"

    def __init__(self, config, workdir: str):
        super().__init__(config, workdir)
        self.model = factory.finetuned_decoder_vqgan(config)
        self.plain = factory.superres_tokenizer(config)
        self.disc = make_discriminator(self.stage_config.loss, self.name)
        self.tx = optim.make(self.train_config.optimizer, self.train_config.num_steps)
        self.reconstruct = jax.jit(lambda m, p, x: m.apply({"params": p}, x)[0], static_argnums=0)

    @property
    def image_size(self) -> int:
        return self.config.data.get("hr_image_size", 0)

    def init(self, rng: jax.Array) -> TrainState:
        x = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        vq_rng, disc_rng, rng = jax.random.split(rng, 3)
        params = {"decoder": self.model.init(vq_rng, x)["params"]["decoder"]}
        if self.disc is not None:
            params["disc"] = self.disc.init(disc_rng, x)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            rng=rng,
            extra={},
        )

    def _tokenizer_params(self, mesh, axis_rules, abstract: bool = False) -> Any:
        params, step = stage.load_trained(
            self.config, self.workdir, "superres_tokenizer", mesh, axis_rules, abstract=abstract
        )
        if not abstract:
            print(f"[{self.name}] using superres_tokenizer checkpoint step {step}", flush=True)
        return params["vq"]

    def warm_start(self, state: TrainState, mesh, axis_rules) -> TrainState:
        trained = self._tokenizer_params(mesh, axis_rules)["decoder"]
        decoder, loaded, fresh = merge_matching(state.params["decoder"], trained)
        print(
            f"[{self.name}] decoder: {loaded} tensors from the trained decoder, {fresh} new",
            flush=True,
        )
        return state.replace(params={**state.params, "decoder": decoder})

    def frozen(self, mesh, axis_rules, abstract: bool = False) -> Any:
        """The high-res tokenizer: its encoder and codebook make the tokens, never trained."""
        vq = self._tokenizer_params(mesh, axis_rules, abstract)
        return {"encoder": vq["encoder"], "quantizer": vq["quantizer"], "plain": vq}

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        shape = (batch_size, self.image_size, self.image_size, 3)
        return {"image": jax.ShapeDtypeStruct(shape, jnp.float32)}

    def batches(self, seed: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        it = tasks.batches(
            self.config,
            self.workdir,
            split="train",
            batch_size=self.train_config.batch_size,
            seed=seed,
            start_step=start_step,
            images=("image_hr",),
        )
        return ({"image": b["image_hr"]} for b in it)

    def finetuned_params(self, trained: Any, frozen: Any) -> dict[str, Any]:
        """The full VQGAN (frozen encoder/codebook + trained decoder) the sampler decodes with,
        from the trained parameters (`state.params`)."""
        return {
            "encoder": frozen["encoder"],
            "quantizer": frozen["quantizer"],
            "decoder": trained["decoder"],
        }

    def train_step(
        self, state: TrainState, batch: dict[str, jax.Array], frozen: Any
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        lc = self.stage_config.loss
        x = batch["image"]
        vq = {"encoder": frozen["encoder"], "quantizer": frozen["quantizer"]}
        z_q, _, _ = self.model.apply({"params": vq}, x, method=self.model.encode)
        z_q = jax.lax.stop_gradient(z_q)

        def loss_fn(params):
            recon = self.model.apply(
                {"params": {**vq, "decoder": params["decoder"]}},
                z_q,
                method=self.model.decode_codes,
            )
            return reconstruction_loss(lc, self.disc, params, recon, x, 1.0)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        params, opt_state, grad_norm = stage.apply_gradients(self.tx, state, grads)
        metrics = {
            "loss": loss,
            "psnr": losses.psnr(aux["l2"]),
            "grad_norm": grad_norm,
            "param_norm": optax.global_norm(params),
            **aux,
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def write_summaries(self, state, frozen, writer, step: int):
        """Held-out reconstructions: original / plain decoder / fine-tuned decoder, and PSNRs."""
        batch = self.eval_batch(("image_hr",), 32)
        if batch is None:
            return {}
        x = batch["image_hr"]
        plain = np.asarray(self.reconstruct(self.plain, frozen["plain"], x))
        tuned = np.asarray(
            self.reconstruct(self.model, self.finetuned_params(state.params, frozen), x)
        )
        rows = [summaries.to_uint8(a[:16]) for a in (x, plain, tuned)]
        writer.write_images(
            step, {"reconstructions": summaries.grid(np.concatenate(rows), 16)[None]}
        )
        return {
            "eval/psnr": summaries.psnr(tuned, x),
            "eval/psnr_plain_decoder": summaries.psnr(plain, x),
        }
