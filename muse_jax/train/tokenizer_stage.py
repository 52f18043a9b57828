"""Stage 1: the VQGAN tokenizer (reconstruction, edge, codebook and optional adversarial losses).

Unused codebook entries are re-seeded from current encoder outputs every
`restart_dead_codes_every` steps; on small data this lifts codebook usage from about half to
nearly all entries.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metric_writers

from muse_jax.data import tasks
from muse_jax.errors import UsageError
from muse_jax.models import factory
from muse_jax.models.discriminator import PatchDiscriminator
from muse_jax.train import losses, optim, stage, summaries
from muse_jax.train.state import TrainState


def reconstruction_loss(
    lc, disc: PatchDiscriminator | None, params: Any, recon: jax.Array, x: jax.Array, gan_on
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The VQGAN's pixel losses (L1, L2, edge) plus the hinge patch-GAN terms when `disc` is set;
    shared by tokenizer training and decoder fine-tuning."""
    l1 = jnp.mean(jnp.abs(recon - x))
    l2 = jnp.mean((recon - x) ** 2)
    edge = losses.edge_loss(recon, x)
    loss = lc.l1_weight * l1 + lc.l2_weight * l2 + lc.edge_weight * edge
    aux = {"l1": l1, "l2": l2, "edge": edge}
    if disc is not None:
        d = lambda p, img: disc.apply({"params": p}, img)
        g_adv = -jnp.mean(d(jax.lax.stop_gradient(params["disc"]), recon))
        real = d(params["disc"], x)
        fake = d(params["disc"], jax.lax.stop_gradient(recon))
        d_loss = jnp.mean(jax.nn.relu(1 - real)) + jnp.mean(jax.nn.relu(1 + fake))
        loss = loss + gan_on * (lc.adversarial_weight * g_adv + d_loss)
        aux.update(g_adv=g_adv, d_loss=d_loss)
    return loss, aux


def make_discriminator(lc, stage_name: str) -> PatchDiscriminator | None:
    """The patch discriminator of a loss block `lc` whose `adversarial_weight` is > 0; None when
    that weight is 0 or absent (a block with pixel terms only)."""
    if lc.get("adversarial_weight", 0.0) <= 0:
        return None
    if "disc_channels" not in lc:
        raise UsageError(f"{stage_name}.loss.adversarial_weight > 0 needs disc_channels.")
    return PatchDiscriminator(lc.disc_channels)


MASKGIT_PREFIX = "maskgit:"


class TokenizerStage(stage.Stage):
    name = "tokenizer"
    image_key = "image"  # Which resolution of the dataset this tokenizer reads.

    def __init__(self, config, workdir: str):
        super().__init__(config, workdir)
        self.model = self.build_model()
        self.disc = make_discriminator(self.stage_config.loss, self.name)
        self.tx = optim.make(self.train_config.optimizer, self.train_config.num_steps)
        self._reconstruct = jax.jit(lambda p, x: self.model.apply({"params": p}, x)[0])

    def build_model(self):
        return factory.tokenizer(self.config)

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    def init(self, rng: jax.Array) -> TrainState:
        size = self.image_size
        x = jnp.zeros((1, size, size, 3), jnp.float32)
        vq_rng, disc_rng, rng = jax.random.split(rng, 3)
        params = {"vq": self.model.init(vq_rng, x)["params"]}
        if self.disc is not None:
            params["disc"] = self.disc.init(disc_rng, x)["params"]
        k = self.model.codebook_size
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            rng=rng,
            extra={"usage": jnp.full((k,), 1.0 / k, jnp.float32)},
        )

    def warm_start(self, state: TrainState, mesh, axis_rules) -> TrainState:
        """`tokenizer.init_from`: 'maskgit:PATH' (MaskGIT's VQGAN checkpoint; the model block
        must be kind='maskgit'), 'model:DIR' (the tokenizer of an exported or converted
        model), or '' (train from scratch). With `train.num_steps=0` the stage then saves
        these weights as its step 0 and trains nothing."""
        source = self.stage_config.get("init_from", "")
        if source.startswith(MASKGIT_PREFIX):
            from muse_jax.convert import maskgit

            if self.stage_config.model.get("kind", "vqgan") != "maskgit":
                raise UsageError(
                    f"{self.name}.init_from={source!r} needs {self.name}.model.kind='maskgit'."
                )
            path = source[len(MASKGIT_PREFIX) :]
            if not path:
                raise UsageError(
                    f"{self.name}.init_from='maskgit:' names no checkpoint: "
                    f"--config.{self.name}.init_from=maskgit:/path/to/tokenizer_checkpoint"
                )
            loaded = maskgit.params_from_checkpoint(path, self.model)
            vq = jax.tree.map(
                lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding),
                loaded,
                state.params["vq"],
            )
            print(f"[{self.name}] starting from MaskGIT's tokenizer {path}", flush=True)
            return state.replace(params={**state.params, "vq": vq})
        if source and not source.startswith(stage.MODEL_PREFIX):
            raise UsageError(
                f"{self.name}.init_from={source!r}; valid: '', 'maskgit:PATH' or 'model:DIR'."
            )
        return self.init_from_model(state, "tokenizer", ("vq",))

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
            images=(self.image_key,),
        )
        return ({"image": b[self.image_key]} for b in it)

    def train_step(
        self, state: TrainState, batch: dict[str, jax.Array], frozen: Any
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        del frozen
        lc = self.stage_config.loss
        x = batch["image"]
        rng, restart_rng = jax.random.split(state.rng)
        gan_on = (state.step >= lc.adversarial_start).astype(jnp.float32)

        def loss_fn(params):
            recon, ids, q = self.model.apply({"params": params["vq"]}, x)
            loss, aux = reconstruction_loss(lc, self.disc, params, recon, x, gan_on)
            loss = loss + lc.codebook_weight * q["codebook"]
            aux["codebook_loss"] = q["codebook"]
            return loss, (aux, ids, q["encodings"])

        (loss, (aux, ids, enc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        params, opt_state, grad_norm = stage.apply_gradients(self.tx, state, grads)
        params, usage = self._restart_dead_codes(params, state, ids, enc, restart_rng)

        metrics = {
            "loss": loss,
            "psnr": losses.psnr(aux["l2"]),
            "codebook_usage": jnp.mean(usage > 0.1 / usage.shape[0]),
            "grad_norm": grad_norm,
            "param_norm": optax.global_norm(params),
            **aux,
        }
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, rng=rng, extra={"usage": usage}
        )
        return new_state, metrics

    def _restart_dead_codes(self, params, state, ids, enc, rng):
        k = self.model.codebook_size
        counts = jnp.bincount(ids.reshape(-1), length=k) / ids.size
        usage = 0.95 * state.extra["usage"] + 0.05 * counts
        every = self.stage_config.restart_dead_codes_every
        if every <= 0:
            return params, usage
        due = (state.step + 1) % every == 0
        dead = due & (usage < 0.1 / k)
        flat = enc.reshape(-1, enc.shape[-1])
        picks = flat[jax.random.randint(rng, (k,), 0, flat.shape[0])]
        cb = params["vq"]["quantizer"]["codebook"]
        new_cb = jnp.where(dead[:, None], picks.astype(cb.dtype), cb)
        params = {**params, "vq": {**params["vq"], "quantizer": {"codebook": new_cb}}}
        # A grace period: re-seeded codes count as used at the uniform rate.
        return params, jnp.where(dead, 1.0 / k, usage)

    def write_summaries(self, state, frozen, writer: metric_writers.MetricWriter, step: int):
        batch = self.eval_batch((self.image_key,), 32)
        if batch is None:
            return {}
        x = batch[self.image_key]
        recon = np.asarray(self._reconstruct(state.params["vq"], x))
        mse = float(np.mean((np.clip(recon, -1, 1) - x) ** 2))
        pairs = np.concatenate([summaries.to_uint8(x[:16]), summaries.to_uint8(recon[:16])])
        image = summaries.upscale(summaries.grid(pairs, columns=16), 2)
        writer.write_images(step, {"reconstructions": image[None]})
        return {"eval/psnr": float(losses.psnr(mse))}


class SuperResTokenizerStage(TokenizerStage):
    """The high-res tokenizer the super-res stage predicts tokens of (`config.superres_tokenizer`).

    `init_from="tokenizer"` starts it from the trained low-res tokenizer: the VQGAN is fully
    convolutional, so the same weights tokenize the larger images, just into more tokens.
    """

    name = "superres_tokenizer"
    image_key = "image_hr"

    def build_model(self):
        return factory.superres_tokenizer(self.config)

    @property
    def image_size(self) -> int:
        return self.config.data.get("hr_image_size", 0)

    def warm_start(self, state: TrainState, mesh, axis_rules) -> TrainState:
        source = self.stage_config.get("init_from", "")
        if not source:
            return state
        if source != "tokenizer":
            raise UsageError(f"superres_tokenizer.init_from={source!r}; valid: 'tokenizer' or ''.")
        from muse_jax.train.base_stage import load_tokenizer_params

        if factory.tokenizer(self.config) != self.model:
            raise UsageError(
                "superres_tokenizer.init_from='tokenizer' needs the same model block as "
                "config.tokenizer.model; set init_from='' to train it from scratch."
            )
        params, step = load_tokenizer_params(self.config, self.workdir, mesh, axis_rules)
        print(f"[{self.name}] starting from the low-res tokenizer (step {step})", flush=True)
        return state.replace(params={**state.params, "vq": params})
