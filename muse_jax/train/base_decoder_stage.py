"""Stage 3: the base decoder, the low-res tokenizer's decoder fine-tuned on the base stage's own
token grids.

The tokenizer's decoder only ever saw grids its encoder made. The base transformer's samples
are not quite such grids: tokens decided apart disagree at a few places (neighbour pairs no
real image's encoding holds), and the plain decoder renders those as blobs between shapes,
most often on small objects. Here the encoder and codebook stay frozen and the decoder learns
to map grids with part of their tokens re-drawn by the frozen base transformer (a uniform share
in [0, `redraw_max`] of each grid masked and filled in one step, conditioned on the caption)
back to the real image, with the tokenizer's pixel losses and, when `loss.adversarial_weight`
> 0, its hinge patch discriminator (which pushes a grid between two shapes towards one of them
rather than their average). Step 0 is the plain decoder. The sampler decodes the base stage's
tokens with it (`muse_jax.inference.model.load`); the super-res stage still reads those tokens
as drawn (handing it the new decoder's image re-encoded lost held-out pairs: BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from muse_jax import parallel
from muse_jax.errors import UsageError
from muse_jax.train import losses, stage, summaries
from muse_jax.train.base_stage import BaseStage, load_tokenizer_params
from muse_jax.train.decoder_stage import merge_matching
from muse_jax.train.state import TrainState
from muse_jax.train.tokenizer_stage import make_discriminator, reconstruction_loss


def redraw(
    rng: jax.Array,
    tokens: jax.Array,
    logits_fn: Callable[[jax.Array], jax.Array],
    mask_id: int,
    max_share: float,
    temperature: float = 1.0,
) -> jax.Array:
    """[B, L]: `tokens` with a uniform share in [0, max_share] of each row masked and filled
    by one sampling step of `logits_fn` (tokens with [MASK] -> [B, L, V] logits)."""
    chex.assert_rank(tokens, 2)
    if not 0.0 <= max_share <= 1.0:
        raise UsageError(f"base_decoder.redraw_max must be in [0, 1], got {max_share}.")
    if temperature <= 0:
        raise UsageError(f"base_decoder.temperature must be > 0, got {temperature}.")
    share_rng, pick_rng, draw_rng = jax.random.split(rng, 3)
    share = jax.random.uniform(share_rng, (tokens.shape[0], 1), maxval=max_share)
    masked = jax.random.uniform(pick_rng, tokens.shape) < share
    logits = logits_fn(jnp.where(masked, mask_id, tokens)).astype(jnp.float32)
    drawn = jax.random.categorical(draw_rng, logits / temperature)
    return jnp.where(masked, drawn, tokens)


class BaseDecoderStage(BaseStage):
    """Reads the base stage's training batches (images and captions) and its frozen weights."""

    name = "base_decoder"
    loss_keys = ("l1_weight", "l2_weight", "edge_weight", "adversarial_weight", "disc_channels")

    def __init__(self, config, workdir: str, conditioner=None):
        super().__init__(config, workdir, conditioner)
        ignored = sorted(set(self.stage_config.loss) - set(self.loss_keys))
        if ignored:
            raise UsageError(
                f"base_decoder.loss has {', '.join(ignored)}: this stage trains the decoder on "
                f"pixel and discriminator losses only; valid keys: {', '.join(self.loss_keys)}."
            )
        self.disc = make_discriminator(self.stage_config.loss, self.name)

    def init(self, rng: jax.Array) -> TrainState:
        size = self.config.data.image_size
        x = jnp.zeros((1, size, size, 3), jnp.float32)
        params = {"decoder": self.tokenizer.init(rng, x)["params"]["decoder"]}
        if self.disc is not None:  # Trained beside the decoder; sampling reads the decoder only.
            params["disc"] = self.disc.init(jax.random.fold_in(rng, 2), x)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            rng=jax.random.fold_in(rng, 1),
            extra={},
        )

    def warm_start(self, state: TrainState, mesh, axis_rules) -> TrainState:
        vq, _ = load_tokenizer_params(self.config, self.workdir, mesh, axis_rules)
        decoder, loaded, fresh = merge_matching(state.params["decoder"], vq["decoder"])
        print(
            f"[{self.name}] decoder: {loaded} tensors from the tokenizer, {fresh} new", flush=True
        )
        return state.replace(params={**state.params, "decoder": decoder})

    def frozen(self, mesh, axis_rules, abstract: bool = False) -> Any:
        """The tokenizer (encoder and codebook make the targets) and the base stage's weights
        (its transformer re-draws tokens)."""
        frozen = super().frozen(mesh, axis_rules, abstract)
        if abstract:  # The base stage's parameters as this stage builds them: nothing is read.
            base_init = lambda rng: BaseStage.init(self, rng)
            state, _ = parallel.abstract_state(base_init, jax.random.PRNGKey(0), mesh, axis_rules)
            frozen["base"] = state.params
            return frozen
        base, step = stage.load_trained(self.config, self.workdir, "base", mesh, axis_rules)
        print(f"[{self.name}] using base checkpoint step {step}", flush=True)
        frozen["base"] = base
        return frozen

    def _vq(self, params: Any, frozen: Any) -> Any:
        return {**frozen["tokenizer"], "decoder": params["decoder"]}

    def train_step(
        self, state: TrainState, batch: dict[str, jax.Array], frozen: Any
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        cfg = self.stage_config
        rng, redraw_rng = jax.random.split(state.rng)
        x = batch["image"]
        tokens, _ = self.targets(batch, frozen)
        text = {k: batch[k] for k in self.empty}
        ctx = self.encode_text(frozen["base"], frozen, text)
        tp = {"params": frozen["base"]["transformer"]}
        logits_fn = lambda t: self.transformer.apply(tp, t, ctx, text["text_mask"])
        mixed = jax.lax.stop_gradient(
            redraw(
                redraw_rng,
                tokens,
                logits_fn,
                self.transformer.mask_id,
                cfg.redraw_max,
                cfg.temperature,
            )
        )

        def loss_fn(params):
            recon = self.tokenizer.apply(
                {"params": self._vq(params, frozen)}, mixed, method=self.tokenizer.decode_ids
            )
            return reconstruction_loss(cfg.loss, self.disc, params, recon, x, 1.0)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        params, opt_state, grad_norm = stage.apply_gradients(self.tx, state, grads)
        metrics = {
            "loss": loss,
            "psnr": losses.psnr(aux["l2"]),
            "redrawn_changed": jnp.mean((mixed != tokens).astype(jnp.float32)),
            "grad_norm": grad_norm,
            "param_norm": optax.global_norm(params),
            **aux,
        }
        return state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, rng=rng
        ), metrics

    def write_summaries(self, state, frozen, writer, step: int):
        """Held-out images: original / plain decoder / this decoder, on the real tokens."""
        batch = self.eval_batch(("image",), 16)
        if batch is None:
            return {}
        x = jnp.asarray(batch["image"])
        ids = self.tokenizer.apply(
            {"params": frozen["tokenizer"]}, x, method=self.tokenizer.tokenize
        )
        decode = lambda vq: np.asarray(
            self.tokenizer.apply({"params": vq}, ids, method=self.tokenizer.decode_ids)
        )
        plain, tuned = decode(frozen["tokenizer"]), decode(self._vq(state.params, frozen))
        rows = [summaries.to_uint8(np.asarray(a)) for a in (x, plain, tuned)]
        writer.write_images(
            step, {"reconstructions": summaries.grid(np.concatenate(rows), 16)[None]}
        )
        return {
            "eval/psnr": summaries.psnr(tuned, x),
            "eval/psnr_plain_decoder": summaries.psnr(plain, x),
        }
