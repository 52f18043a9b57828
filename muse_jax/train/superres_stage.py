"""Stage 5: the super-resolution transformer (Muse section 2.4).

It predicts the high-res tokenizer's tokens of an image from its (unmasked) low-res tokens and
the caption. Training is the base stage's: cosine-scheduled masking of the high-res tokens,
cross-entropy on the masked positions only, and caption dropout for classifier-free guidance
(the low-res tokens are never dropped). Both tokenizers are frozen; the text conditioning is
the base stage's configuration (a trainable tiny encoder gets its own weights here).

With `superres.model.lowres_input="pixels"` the transformer reads the low-res image instead of
the token ids: the real low-res tokens decoded by the decoder that makes the base stage's pixels
at sampling time (the base decoder's, stage 3, when the config has that stage; else the
tokenizer's own), so that training sees what sampling will give it.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from muse_jax import stages
from muse_jax.models import factory
from muse_jax.sampling.sampler import SuperResSampler
from muse_jax.stages import has_cascade  # noqa: F401  (re-exported)
from muse_jax.train import stage, summaries
from muse_jax.train.base_stage import BaseStage


class SuperResStage(BaseStage):
    name = "superres"
    image_keys = ("image", "image_hr")

    def __init__(self, config, workdir: str, conditioner=None):
        super().__init__(config, workdir, conditioner)
        self.hr_tokenizer = factory.superres_tokenizer(config)
        self._tokenize_low = jax.jit(
            lambda p, x: self.tokenizer.apply({"params": p}, x, method=self.tokenizer.tokenize)
        )

    def build_transformer(self):
        return factory.superres_transformer(self.config)

    def build_sampler(self) -> SuperResSampler:
        return SuperResSampler(
            self.transformer,
            self.text_encoder,
            self.hr_tokenizer,
            self.stage_config.sampling,
            self.tokenizer,
        )

    @property
    def reads_pixels(self) -> bool:
        return self.sampler.reads_pixels

    def init_inputs(self) -> dict[str, jax.Array]:
        return {"lowres": self.transformer.lowres_example()}

    def frozen(self, mesh, axis_rules, abstract: bool = False) -> Any:
        frozen = super().frozen(mesh, axis_rules, abstract)
        params, step = stage.load_trained(
            self.config, self.workdir, "superres_tokenizer", mesh, axis_rules, abstract=abstract
        )
        if not abstract:
            print(f"[{self.name}] using superres_tokenizer checkpoint step {step}", flush=True)
        frozen["superres_tokenizer"] = params["vq"]
        if self.reads_pixels:
            frozen["lowres_decoder"] = self._lowres_decoder(frozen, mesh, axis_rules, abstract)
        return frozen

    def _lowres_decoder(self, frozen, mesh, axis_rules, abstract: bool) -> Any:
        """The decoder that makes the base stage's pixels: the base decoder's when the config
        trains one (the same shapes as the tokenizer's: abstract, nothing is read)."""
        if abstract or "base_decoder" not in stages.enabled(self.config):
            return frozen["tokenizer"]["decoder"]
        params, step = stage.load_trained(
            self.config, self.workdir, "base_decoder", mesh, axis_rules
        )
        print(f"[{self.name}] low-res images from base_decoder checkpoint step {step}", flush=True)
        return params["decoder"]

    def lowres_vq(self, frozen: Any) -> Any:
        """The low-res tokenizer with the decoder the low-res images come from."""
        return {**frozen["tokenizer"], "decoder": frozen["lowres_decoder"]}

    def targets(
        self, batch: dict[str, jax.Array], frozen: Any
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        low = self.tokenizer.apply(
            {"params": frozen["tokenizer"]}, batch["image"], method=self.tokenizer.tokenize
        )
        high = self.hr_tokenizer.apply(
            {"params": frozen["superres_tokenizer"]},
            batch["image_hr"],
            method=self.hr_tokenizer.tokenize,
        )
        if self.reads_pixels:  # The image the sampler gives the transformer, made the same way.
            low = self.sampler.lowres_input({"lowres_vq": self.lowres_vq(frozen)}, low)
        return jax.lax.stop_gradient(high), {"lowres": jax.lax.stop_gradient(low)}

    def sampler_params(self, trained: Any, frozen: Any) -> dict[str, Any]:
        params = super().sampler_params(trained, frozen)
        params["vq"] = frozen["superres_tokenizer"]
        if self.reads_pixels:
            params["lowres_vq"] = self.lowres_vq(frozen)
        return params

    def write_summaries(self, state, frozen, writer, step: int):
        """Super-res of held-out test images from their true low-res tokens: a grid of
        (low-res input, super-res output, high-res original) rows and their alignment score."""
        from muse_jax.data import shapes_alignment as alignment

        b = self.eval_batch(self.image_keys, 16, keep_captions=True)
        if b is None:
            return {}
        captions = [c.decode() for c in b["caption"]]
        low = self._tokenize_low(frozen["tokenizer"], b["image"])
        cond = self.conditioner.encode(captions)
        uncond = {k: np.repeat(v, len(captions), 0) for k, v in self.empty.items()}
        out = self.sampler(
            self.sampler_params(state.params, frozen),
            cond,
            uncond,
            jax.random.PRNGKey(0),
            None,
            low,
        )
        images = summaries.to_uint8(np.asarray(out.images))
        scale = images.shape[1] // b["image"].shape[1]
        rows = [
            summaries.to_uint8(b["image"]).repeat(scale, axis=1).repeat(scale, axis=2),
            images,
            summaries.to_uint8(b["image_hr"]),
        ]
        grid = summaries.grid(np.concatenate(rows), columns=len(captions))
        writer.write_images(step, {"superres": grid[None]})
        try:
            scores = alignment.score(images, captions)
        except ValueError:  # Captions outside the shapes grammar.
            return {}
        return {f"eval/superres_alignment_{k}": v for k, v in scores.items() if k != "n"}
