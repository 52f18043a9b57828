"""Text-to-image sampling: text encoder -> guided parallel decoding -> VQ decoder, one jit.

The text keys/values of every cross-attention layer are computed once per prompt (before the
decoding loop), and the conditional and unconditional (or negative-prompt) branches share one
batch through the loop. `SuperResSampler` is the same loop over high-res tokens given low-res
ones; `CascadeSampler` chains base -> super-res -> (fine-tuned) decoder in one jitted call.

The config's sampling block gives each sampler its defaults; a call may override them with a
`Settings`. Its guidance scale and temperatures are traced values, so changing them reuses the
compiled program. The step count, schedules, whether guidance runs at all (scale 0 drops the
unconditional branch and half the work) and the self-critic refinement settings shape the
program: each new value compiles once and stays in jit's cache.
"""

from __future__ import annotations

from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.errors import UsageError
from muse_jax.sampling import guidance, parallel_decode, self_critic


@flax.struct.dataclass
class Sample:
    tokens: jax.Array  # [B, L]
    images: jax.Array  # [B, H, W, 3] in [-1, 1]
    num_masked: jax.Array  # [steps, B]


@flax.struct.dataclass
class CascadeSample:
    tokens: jax.Array  # [B, L_high] super-res tokens.
    images: jax.Array  # [B, H_high, W_high, 3] in [-1, 1] (what the cascade returns).
    num_masked: jax.Array  # [steps_high, B]
    lowres_tokens: jax.Array  # [B, L_low] base tokens.
    lowres_images: jax.Array  # [B, H_low, W_low, 3]: the base stage alone.


@flax.struct.dataclass
class Settings:
    """One sampling call's decoding settings. The floats are jit arguments (changing them
    compiles nothing); the static fields are part of the compiled program's key."""

    guidance_scale: jax.Array  # [] float32; 0 = no guidance (a program of its own)
    temperature: jax.Array  # [] first-step token temperature (0: argmax)
    temperature_final: jax.Array  # [] last-step token temperature (linear in between)
    choice_temperature: jax.Array  # [] Gumbel noise on confidences at the first step
    num_steps: int = flax.struct.field(pytree_node=False)
    mask_schedule: str = flax.struct.field(pytree_node=False, default="cosine")
    guidance_schedule: str = flax.struct.field(pytree_node=False, default="linear")
    guided: bool = flax.struct.field(pytree_node=False, default=True)
    # Self-critic refinement after the decoding loop (`muse_jax.sampling.self_critic`):
    # rounds (0: off), the share of the generated tokens re-masked per round, and the
    # decoding steps that fill them in again.
    refine_rounds: int = flax.struct.field(pytree_node=False, default=0)
    refine_fraction: float = flax.struct.field(
        pytree_node=False, default=self_critic.DEFAULT_FRACTION
    )
    refine_steps: int = flax.struct.field(pytree_node=False, default=self_critic.DEFAULT_STEPS)

    @classmethod
    def from_config(cls, cfg, **overrides) -> Settings:
        """A config's sampling block with `overrides` (None values keep the config's)."""
        values = {k: cfg.get(k) for k in _SETTING_KEYS}
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(overrides) - set(_SETTING_KEYS)
        if unknown:
            raise TypeError(f"Unknown sampling settings {sorted(unknown)}; valid: {_SETTING_KEYS}.")
        steps = int(values["num_steps"])
        if steps < 1:
            raise UsageError(f"num_steps must be >= 1, got {steps}.")
        temperature = float(values["temperature"])
        if temperature < 0:
            raise UsageError(f"temperature must be >= 0 (0: argmax), got {temperature}.")
        final = values.get("temperature_final")
        scale = float(values["guidance_scale"])
        if scale < 0:
            raise UsageError(f"guidance_scale must be >= 0 (0: no guidance), got {scale}.")
        # Sampling blocks written before refinement existed lack its keys: off.
        given = lambda key, default: default if values.get(key) is None else values[key]
        rounds = int(given("refine_rounds", 0))
        fraction = float(given("refine_fraction", self_critic.DEFAULT_FRACTION))
        refine_steps = int(given("refine_steps", self_critic.DEFAULT_STEPS))
        self_critic.check_settings(rounds, fraction, refine_steps)
        return cls(
            guidance_scale=np.float32(scale),
            temperature=np.float32(temperature),
            temperature_final=np.float32(temperature if final is None else float(final)),
            choice_temperature=np.float32(float(values["choice_temperature"])),
            num_steps=steps,
            mask_schedule=str(values.get("mask_schedule") or "cosine"),
            guidance_schedule=str(values.get("guidance_schedule") or "linear"),
            guided=scale > 0,
            refine_rounds=rounds,
            refine_fraction=fraction,
            refine_steps=refine_steps,
        )


_SETTING_KEYS = (
    "guidance_scale",
    "temperature",
    "temperature_final",
    "choice_temperature",
    "num_steps",
    "mask_schedule",
    "guidance_schedule",
    "refine_rounds",
    "refine_fraction",
    "refine_steps",
)


def _concat(a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


class MuseSampler:
    """Generates images from token ids of prompts with a trained base stage.

    `params` passed to `__call__` is {'transformer', 'text_encoder', 'vq'}: 'vq' holds the
    weights of `tokenizer`, the VQ model that turns this stage's tokens into pixels. The
    config's sampling block (`sampling_cfg`) gives the default `Settings`.
    """

    def __init__(self, transformer, text_encoder, tokenizer, sampling_cfg):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.cfg = sampling_cfg
        self.settings = Settings.from_config(sampling_cfg)
        # Images per super-res pass inside the cascade (0: the whole batch; CascadeSampler).
        self.micro_batch = int(sampling_cfg.get("micro_batch", 0) or 0)
        self._jitted = jax.jit(self._generate)

    def _encode(self, params: dict[str, Any], text: dict[str, jax.Array]) -> jax.Array:
        if "text_emb" in text:  # Precomputed (e.g. T5-XXL) embeddings.
            return text["text_emb"]
        return self.text_encoder.apply(
            {"params": params["text_encoder"]}, text["text_ids"], text["text_mask"]
        )

    def lowres_input(self, params: dict[str, Any], lowres_tokens: Any) -> Any:
        """What the transformer reads of the low-res tokens: the tokens themselves here; a
        super-res sampler reading pixels decodes them (traceable: training calls it too)."""
        return lowres_tokens

    def _context(self, tp: dict[str, Any], ctx: jax.Array, ctx_mask: jax.Array, lowres: Any):
        """(cross-attention keys/values of every layer, their mask): once per prompt."""
        del lowres
        tr = self.transformer
        return tr.apply(tp, ctx, method=tr.encode_context), ctx_mask

    def tokens(
        self,
        params: dict[str, Any],
        cond: dict[str, jax.Array],
        uncond: dict[str, jax.Array],
        rng: jax.Array,
        init_tokens: jax.Array,
        lowres_tokens: jax.Array | None = None,
        settings: Settings | None = None,
    ) -> parallel_decode.DecodeResult:
        """The guided decoding loop alone (traceable: the cascade calls it inside its jit)."""
        chex.assert_trees_all_equal_shapes(cond, uncond)
        cfg, tr = settings or self.settings, self.transformer
        tp = {"params": params["transformer"]}
        lowres_tokens = self.lowres_input(params, lowres_tokens)
        if cfg.guided:
            text = _concat(cond, uncond)
            if lowres_tokens is not None:  # Both branches see the same low-res tokens.
                lowres_tokens = jnp.concatenate([lowres_tokens, lowres_tokens])
        else:
            text = cond
        encoded = self._encode(params, text)
        kv, ctx_mask = self._context(tp, encoded, text["text_mask"], lowres_tokens)

        def logits_fn(tokens):
            return tr.apply(tp, tokens, kv, ctx_mask, method=tr.logits)

        def run_decode(tokens, key, num_steps):
            if cfg.guided:
                tokens_to_logits = guidance.guided(
                    logits_fn,
                    scale=cfg.guidance_scale,
                    schedule=cfg.guidance_schedule,
                    num_steps=num_steps,
                )
            else:
                tokens_to_logits = lambda tokens, step: logits_fn(tokens)
            return parallel_decode.decode(
                tokens,
                key,
                tokens_to_logits,
                mask_id=tr.mask_id,
                num_steps=num_steps,
                schedule=cfg.mask_schedule,
                temperature=cfg.temperature,
                temperature_final=cfg.temperature_final,
                choice_temperature=cfg.choice_temperature,
            )

        if not cfg.refine_rounds:
            return run_decode(init_tokens, rng, cfg.num_steps)
        # The first pass draws exactly what sampling without refinement draws (same key).
        first = run_decode(init_tokens, rng, cfg.num_steps)
        refine_rng = jax.random.fold_in(rng, 0x5EF1)
        batch = init_tokens.shape[0]

        # The critic scores with the prompt's logits alone: the context of the guided batch's
        # first half (B rows, not the 2B the guided passes run).
        critic_kv, critic_mask = kv, ctx_mask
        if cfg.guided:
            critic_kv, critic_mask = self._context(
                tp,
                encoded[:batch],
                text["text_mask"][:batch],
                None if lowres_tokens is None else lowres_tokens[:batch],
            )

        def cond_logits(tokens):
            return tr.apply(tp, tokens, critic_kv, critic_mask, method=tr.logits)

        refined = self_critic.refine(
            first.tokens,
            init_tokens == tr.mask_id,
            refine_rng,
            score_logits_fn=cond_logits,
            redecode=lambda tokens, key: run_decode(tokens, key, cfg.refine_steps).tokens,
            mask_id=tr.mask_id,
            rounds=cfg.refine_rounds,
            fraction=cfg.refine_fraction,
        )
        # num_masked keeps the first pass's history (one row per decoding step).
        return parallel_decode.DecodeResult(tokens=refined, num_masked=first.num_masked)

    def token_log_probs(
        self, params: dict[str, Any], tokens: jax.Array, cond: dict[str, jax.Array]
    ) -> jax.Array:
        """[B, L]: log p(token | the other tokens, prompt) for every token of a complete [B, L]
        grid, each scored with its 2x2-phase quarter of the grid masked (the refinement's
        critic, `self_critic.token_log_probs`). Low where a token does not fit the rest of the
        image under the prompt: the tokens a mask-free edit re-samples first."""
        tr, tp = self.transformer, {"params": params["transformer"]}
        kv, ctx_mask = self._context(tp, self._encode(params, cond), cond["text_mask"], None)
        return self_critic.token_log_probs(
            tokens, lambda t: tr.apply(tp, t, kv, ctx_mask, method=tr.logits), tr.mask_id
        )

    def decode_pixels(self, params: dict[str, Any], tokens: jax.Array) -> jax.Array:
        return self.tokenizer.apply(
            {"params": params["vq"]}, tokens, method=self.tokenizer.decode_ids
        )

    def _generate(self, params, cond, uncond, rng, init_tokens, lowres_tokens, settings) -> Sample:
        result = self.tokens(params, cond, uncond, rng, init_tokens, lowres_tokens, settings)
        images = self.decode_pixels(params, result.tokens)
        return Sample(tokens=result.tokens, images=images, num_masked=result.num_masked)

    def masked(self, batch: int) -> jax.Array:
        """A fully masked [batch, L] token array: generate everything."""
        return jnp.full((batch, self.transformer.seq_len), self.transformer.mask_id, jnp.int32)

    def __call__(
        self,
        params: dict[str, Any],
        cond: dict[str, Any],
        uncond: dict[str, Any],
        rng: jax.Array,
        init_tokens: jax.Array | None = None,
        lowres_tokens: jax.Array | None = None,
        settings: Settings | None = None,
    ) -> Sample:
        """Samples one image per row of the conditioning.

        Args:
          params: {'transformer', 'vq'[, 'text_encoder']}.
          cond: the prompts' text input, {'text_ids', 'text_mask'} ([B, S]) or
            {'text_emb' [B, S, D], 'text_mask'} (see `muse_jax.text.conditioning`).
          uncond: the same for the unconditional branch: the empty prompt, or a negative one.
          rng: PRNG key; the same key reproduces the same images.
          init_tokens: optional [B, L] tokens; positions equal to the mask id are generated, the
            others stay fixed (inpainting/outpainting). Default: everything generated.
          lowres_tokens: [B, L_low] base tokens (super-res samplers only).
          settings: decoding settings (default: the config's, `self.settings`).
        """
        if init_tokens is None:
            init_tokens = self.masked(cond["text_mask"].shape[0])
        settings = settings or self.settings
        return self._jitted(params, cond, uncond, rng, init_tokens, lowres_tokens, settings)


class SuperResSampler(MuseSampler):
    """High-res tokens given low-res tokens and text; `tokenizer` is the high-res decoder.

    A transformer that reads the low-res image (`lowres_input="pixels"`) gets the low-res
    tokens decoded by `lowres_tokenizer` with `params['lowres_vq']`: the weights that make the
    base stage's pixels (its fine-tuned base decoder when there is one), as in training.
    """

    def __init__(self, transformer, text_encoder, tokenizer, sampling_cfg, lowres_tokenizer=None):
        super().__init__(transformer, text_encoder, tokenizer, sampling_cfg)
        self.lowres_tokenizer = lowres_tokenizer
        if self.reads_pixels and lowres_tokenizer is None:
            raise ValueError("A super-res model reading pixels needs the low-res tokenizer.")

    @property
    def reads_pixels(self) -> bool:
        return getattr(self.transformer, "lowres_input", "tokens") == "pixels"

    def lowres_input(self, params, lowres_tokens):
        """The low-res tokens decoded with `params['lowres_vq']` when the transformer reads
        pixels; the super-res stage builds its training inputs with this same call."""
        if not self.reads_pixels or lowres_tokens is None:
            return lowres_tokens
        tk = self.lowres_tokenizer
        return tk.apply({"params": params["lowres_vq"]}, lowres_tokens, method=tk.decode_ids)

    def _context(self, tp, ctx, ctx_mask, lowres):
        if lowres is None:
            raise UsageError("The super-res sampler needs lowres_tokens (the base stage's output).")
        tr = self.transformer
        return tr.apply(tp, ctx, ctx_mask, lowres, method=tr.encode_context)


class CascadeSampler:
    """Base -> super-res -> decoder in one jitted call, each stage with its own settings.

    `params` is {'base': base sampler params, 'superres': super-res sampler params}; the
    super-res params' 'vq' holds the decoder that makes the pixels (the fine-tuned one
    when it exists).
    """

    def __init__(self, base: MuseSampler, superres: SuperResSampler):
        self.base = base
        self.superres = superres
        self.cfg = base.cfg
        self._jitted = jax.jit(self._generate)

    def _generate(
        self, params, cond, uncond, rng, init_tokens, init_hr_tokens, settings
    ) -> CascadeSample:
        base_rng, sr_rng = jax.random.split(rng)
        base_settings, sr_settings = settings
        low = self.base.tokens(
            params["base"], cond, uncond, base_rng, init_tokens, None, base_settings
        )
        tokens, images, num_masked = self._superres(
            params["superres"], cond, uncond, sr_rng, init_hr_tokens, low.tokens, sr_settings
        )
        return CascadeSample(
            tokens=tokens,
            images=images,
            num_masked=num_masked,
            lowres_tokens=low.tokens,
            lowres_images=self.base.decode_pixels(params["base"], low.tokens),
        )

    def _superres(self, params, cond, uncond, rng, init_hr_tokens, low_tokens, settings):
        """(tokens, images, num_masked) of the super-res stage and its decoder.

        With the super-res sampling block's `micro_batch` m (0: off) dividing a larger batch,
        the batch goes through m images at a time, one after another (`lax.map`, one key
        per micro-batch from `rng`): the stage's logits over a large codebook at every high-res
        position, and the decoder's full-resolution activations, then need memory for m
        images, not the batch (`python -m muse_jax.aot` shows the difference).
        """
        batch = low_tokens.shape[0]
        m = self.superres.micro_batch
        if not m or batch <= m or batch % m:
            high = self.superres.tokens(
                params, cond, uncond, rng, init_hr_tokens, low_tokens, settings
            )
            images = self.superres.decode_pixels(params, high.tokens)
            return high.tokens, images, high.num_masked
        n = batch // m
        split = lambda x: x.reshape((n, m) + x.shape[1:])

        def one(args):
            c, u, key, init, low = args
            high = self.superres.tokens(params, c, u, key, init, low, settings)
            return high.tokens, self.superres.decode_pixels(params, high.tokens), high.num_masked

        parts = (
            jax.tree.map(split, cond),
            jax.tree.map(split, uncond),
            jax.random.split(rng, n),
            split(init_hr_tokens),
            split(low_tokens),
        )
        tokens, images, num_masked = jax.lax.map(one, parts)
        merge = lambda x: x.reshape((batch,) + x.shape[2:])
        # num_masked: [n, steps, m] -> [steps, batch].
        num_masked = jnp.moveaxis(num_masked, 0, 1).reshape(num_masked.shape[1], batch)
        return merge(tokens), merge(images), num_masked

    def __call__(
        self,
        params: dict[str, Any],
        cond: dict[str, Any],
        uncond: dict[str, Any],
        rng: jax.Array,
        init_tokens: jax.Array | None = None,
        init_hr_tokens: jax.Array | None = None,
        settings: tuple[Settings, Settings] | None = None,
    ) -> CascadeSample:
        """As `MuseSampler.__call__`; `init_tokens` fixes base tokens, `init_hr_tokens` fixes
        high-res tokens (mask id = generate); `settings` is (base, super-res) `Settings`
        (default: each stage's config)."""
        batch = cond["text_mask"].shape[0]
        if init_tokens is None:
            init_tokens = self.base.masked(batch)
        if init_hr_tokens is None:
            init_hr_tokens = self.superres.masked(batch)
        settings = settings or (self.base.settings, self.superres.settings)
        return self._jitted(params, cond, uncond, rng, init_tokens, init_hr_tokens, settings)
