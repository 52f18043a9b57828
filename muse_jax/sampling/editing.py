"""Zero-shot editing with the generation sampler: inpainting, outpainting, mask-free editing.

Muse edits without fine-tuning. Inpainting and outpainting are generation with some tokens
fixed: the image is tokenized, the tokens touched by the edit region are set to [MASK] and the
*same* jitted sampler fills them in (`MuseSampler.__call__(..., init_tokens=...)`: fixed tokens
are an input, so every mode shares one compiled program with plain generation). Mask-free
editing re-masks a random fraction of the current tokens for a few iterations under the new
prompt. Outside the edit region the output keeps the original pixels, feathered at the border.

The model enters through `TokenStage` (tokenize, sample with fixed tokens). The base stage is
`SamplerStage`; a super-resolution stage plugs in as a second `TokenStage` whose `sample` also
takes the lower stage's tokens (`lower`), and `edit_with_mask` / `maskfree_edit` run the whole
cascade: each stage gets the pixel mask mapped onto its own token grid.

Pixel masks are boolean, True = re-generate. Images here are float [-1, 1] unless stated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import chex
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from scipy import ndimage

from muse_jax.errors import UsageError
from muse_jax.sampling import self_critic

# ---------------------------------------------------------------------------------------------
# Masks.
# ---------------------------------------------------------------------------------------------


def token_mask(pixel_mask: np.ndarray, grid: int, dilation: int = 0) -> np.ndarray:
    """Pixel mask -> token mask: a token is re-generated if any of its pixels is masked.

    Args:
      pixel_mask: bool [B, H, W] (or [H, W]); H and W multiples of `grid`.
      grid: token grid side (h = w = grid).
      dilation: margin in tokens added around the masked tokens (Chebyshev distance), so the
        model also re-draws context next to the edit and the seam falls on generated tokens.
    Returns:
      bool [B, grid * grid], row-major like `VQGAN.tokenize`.
    """
    m = np.asarray(pixel_mask, bool)
    squeeze = m.ndim == 2
    m = m[None] if squeeze else m
    chex.assert_rank(m, 3)
    b, h, w = m.shape
    if h % grid or w % grid:
        raise UsageError(f"Mask of {h}x{w} px does not tile a {grid}x{grid} token grid.")
    if dilation < 0:
        raise UsageError(f"dilation must be >= 0, got {dilation}.")
    t = m.reshape(b, grid, h // grid, grid, w // grid).any(axis=(2, 4))
    if dilation:
        t = ndimage.maximum_filter(t, size=(1, 2 * dilation + 1, 2 * dilation + 1), mode="constant")
    t = t.reshape(b, grid * grid)
    return t[0] if squeeze else t


def token_mask_to_pixels(mask: np.ndarray, grid: int, image_size: int) -> np.ndarray:
    """bool [B, grid * grid] -> bool [B, S, S]: the pixels each masked token covers (cascade:
    the base stage's changed tokens become the next stage's pixel mask)."""
    m = np.asarray(mask, bool).reshape(-1, grid, grid)
    f = image_size // grid
    return np.repeat(np.repeat(m, f, axis=1), f, axis=2)


def apply_token_mask(tokens: np.ndarray, mask: np.ndarray, mask_id: int) -> np.ndarray:
    """int [B, L] tokens with `mask` positions replaced by `mask_id`: the sampler's
    `init_tokens` (mask_id = generate, anything else = fixed)."""
    chex.assert_equal_shape([np.asarray(tokens), np.asarray(mask)])
    return np.where(mask, mask_id, tokens).astype(np.int32)


def feather_alpha(pixel_mask: np.ndarray, feather: int) -> np.ndarray:
    """Blend weight of the generated image: 1 deep inside the mask, ramping to 0 at its border.

    The ramp lies *inside* the mask (Euclidean distance to the nearest unmasked pixel divided
    by `feather + 1`), so every pixel outside the mask has weight exactly 0 and stays original.

    Args:
      pixel_mask: bool [B, H, W] or [H, W].
      feather: ramp width in pixels; 0 pastes the generated pixels with a hard edge.
    Returns:
      float32 alpha of the mask's shape, in [0, 1].
    """
    m = np.asarray(pixel_mask, bool)
    if feather < 0:
        raise UsageError(f"feather must be >= 0, got {feather}.")
    if feather == 0:
        return m.astype(np.float32)
    lead = m.shape[:-2]
    flat = m.reshape((-1, *m.shape[-2:]))
    # Pad with unmasked pixels: the canvas edge does not count as a boundary.
    dist = np.stack(
        [
            ndimage.distance_transform_edt(np.pad(x, 1, constant_values=True))[1:-1, 1:-1]
            if x.any()
            else np.zeros(x.shape)
            for x in flat
        ]
    )
    alpha = np.where(flat, np.clip(dist / (feather + 1), 0.0, 1.0), 0.0)
    return alpha.reshape((*lead, *m.shape[-2:])).astype(np.float32)


def blend(
    original: np.ndarray, generated: np.ndarray, pixel_mask: np.ndarray, feather: int
) -> np.ndarray:
    """Original pixels outside the mask, generated inside, feathered at the mask border.

    Args:
      original, generated: [B, H, W, 3] in the same value range (any dtype).
      pixel_mask: bool [B, H, W], True where the edit is.
      feather: see `feather_alpha`.
    Returns:
      [B, H, W, 3] of `original`'s dtype; pixels with mask False equal `original` exactly.
    """
    chex.assert_equal_shape([original, generated])
    chex.assert_equal(np.shape(pixel_mask), np.shape(original)[:-1])
    alpha = feather_alpha(pixel_mask, feather)[..., None]
    out = alpha * np.asarray(generated, np.float32) + (1 - alpha) * np.asarray(original, np.float32)
    out = np.where(alpha > 0, out, original)  # Bit-exact outside, whatever the dtype.
    if np.issubdtype(np.asarray(original).dtype, np.integer):
        out = np.clip(np.round(out), 0, 255)
    return out.astype(np.asarray(original).dtype)


def parse_pad(spec: str) -> tuple[int, int, int, int]:
    """'l,t,r,b' (pixels of the input image) or one number for all sides -> (l, t, r, b)."""
    try:
        vals = [int(v) for v in spec.split(",")]
    except ValueError:
        raise UsageError(f"--pad must be 'left,top,right,bottom' pixels, got {spec!r}.") from None
    if len(vals) == 1:
        vals *= 4
    if len(vals) != 4 or min(vals) < 0 or not any(vals):
        raise UsageError(f"--pad must be 4 non-negative pixel counts, not all 0; got {spec!r}.")
    return vals[0], vals[1], vals[2], vals[3]


MAX_OUTPAINT_GROWTH = 4  # The padded canvas's longer side, in multiples of the image's.


def outpaint_canvas(
    image: np.ndarray, pad: tuple[int, int, int, int], image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Places `image` on a larger canvas and fits that canvas into the model's square.

    The canvas is the image with `pad` = (left, top, right, bottom) pixels added around it,
    scaled so its longer side is `image_size` and centred; everything that is not the original
    image (the padding and any letterbox) is the region to generate.

    Args:
      image: uint8 [H, W, 3].
      pad: padding in pixels of `image`.
      image_size: the model's side S.
    Returns:
      (canvas uint8 [S, S, 3] with black where content is to be generated,
       pixel mask bool [S, S], True = generate).
    """
    chex.assert_rank(image, 3)
    left, top, right, bottom = pad
    h, w = image.shape[:2]
    ch, cw = h + top + bottom, w + left + right
    if max(ch, cw) > MAX_OUTPAINT_GROWTH * max(h, w):
        raise UsageError(
            f"padding {pad} makes a {cw}x{ch} canvas around a {w}x{h} image: at most "
            f"{MAX_OUTPAINT_GROWTH}x the image's longer side, so that the image keeps a "
            "visible size on the model's canvas."
        )
    scale = image_size / max(ch, cw)
    # Original's box on the model canvas, in integer pixels.
    ox = round((image_size - cw * scale) / 2 + left * scale)
    oy = round((image_size - ch * scale) / 2 + top * scale)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    nw, nh = min(nw, image_size - ox), min(nh, image_size - oy)
    canvas = np.zeros((image_size, image_size, 3), np.uint8)
    if (nw, nh) != (w, h):
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.LANCZOS))
    canvas[oy : oy + nh, ox : ox + nw] = image
    mask = np.ones((image_size, image_size), bool)
    mask[oy : oy + nh, ox : ox + nw] = False
    return canvas, mask


# ---------------------------------------------------------------------------------------------
# Stages: what an edit needs from a model.
# ---------------------------------------------------------------------------------------------


class TokenStage(Protocol):
    """One stage of the cascade as editing sees it."""

    image_size: int  # Pixel side of this stage's images.
    grid: int  # Token grid side.
    mask_id: int

    def tokenize(self, images: np.ndarray) -> np.ndarray:
        """float [B, S, S, 3] in [-1, 1] -> int [B, grid * grid]."""

    def token_log_probs(self, tokens, cond) -> np.ndarray:
        """[B, L] `MuseSampler.token_log_probs` (mask-free editing with `critic` > 0 only)."""

    def sample(self, init_tokens, cond, uncond, rng, lower=None) -> Any:
        """Fills the `mask_id` positions of `init_tokens` -> `sampler.Sample`. `lower`: the
        previous stage's tokens (super-res); None for the base stage."""

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """int [B, grid * grid] -> float [B, S, S, 3] in [-1, 1] (mask-free editing through a
        cascade only: the input's tokens, to find where the base image changed)."""


class SamplerStage:
    """A stage of the cascade from its sampler and params: the base stage's `MuseSampler`, or
    the super-res stage's `SuperResSampler` (which also takes the lower stage's tokens).
    `settings`: the sampler's decoding settings (default: its config's)."""

    def __init__(self, sampler, params: dict[str, Any], image_size: int, settings=None):
        self.sampler, self.params, self.image_size = sampler, params, image_size
        self.settings = settings
        self._log_probs = self._decode = None
        self.mask_id = sampler.transformer.vocab_size
        self.grid = int(round(sampler.transformer.seq_len**0.5))
        tok = sampler.tokenizer
        self._tokenize = jax.jit(
            lambda p, x: tok.apply({"params": p}, x, method=tok.tokenize).astype(jnp.int32)
        )

    def tokenize(self, images: np.ndarray) -> np.ndarray:
        chex.assert_shape(images, (None, self.image_size, self.image_size, 3))
        return np.asarray(self._tokenize(self.params["vq"], jnp.asarray(images)))

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        if self._decode is None:
            self._decode = jax.jit(self.sampler.decode_pixels)
        return np.asarray(self._decode(self.params, jnp.asarray(tokens, jnp.int32)), np.float32)

    def token_log_probs(self, tokens, cond) -> np.ndarray:
        """[B, L] `MuseSampler.token_log_probs` of this stage's tokens (the base stage's)."""
        if self._log_probs is None:
            self._log_probs = jax.jit(self.sampler.token_log_probs)
        return np.asarray(self._log_probs(self.params, jnp.asarray(tokens), cond))

    def sample(self, init_tokens, cond, uncond, rng, lower=None):
        from muse_jax.sampling.sampler import SuperResSampler

        if isinstance(self.sampler, SuperResSampler) != (lower is not None):
            raise UsageError(
                "A super-res stage needs the lower stage's tokens; the base stage takes none."
            )
        init = jnp.asarray(init_tokens, jnp.int32)
        low = None if lower is None else jnp.asarray(lower, jnp.int32)
        return self.sampler(self.params, cond, uncond, rng, init, low, self.settings)


def resize(images: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """float [B, H, W, C] (or bool masks [B, H, W]) -> side `size`, for moving between stages."""
    if images.shape[1] == size:
        return images
    if nearest:
        idx = np.arange(size) * images.shape[1] // size
        return images[:, idx][:, :, idx]
    return np.asarray(
        jax.image.resize(images, (images.shape[0], size, size, images.shape[-1]), "bicubic")
    )


@dataclasses.dataclass
class EditResult:
    images: np.ndarray  # float [B, S, S, 3] in [-1, 1]: the edit, blended into the original.
    raw_images: np.ndarray  # float [B, S, S, 3]: the decoded tokens before blending.
    tokens: list[np.ndarray]  # Per stage: int [B, L] final tokens.
    input_tokens: list[np.ndarray]  # Per stage: int [B, L] tokens of the input image.
    token_masks: list[np.ndarray]  # Per stage: bool [B, L], the positions that were re-sampled.
    changed_per_iteration: list[np.ndarray] = dataclasses.field(default_factory=list)  # [B] each.


# ---------------------------------------------------------------------------------------------
# Editing modes.
# ---------------------------------------------------------------------------------------------


def edit_with_mask(
    stages: Sequence[TokenStage],
    images: np.ndarray,
    pixel_mask: np.ndarray,
    cond: dict[str, Any],
    uncond: dict[str, Any],
    rng: jax.Array,
    *,
    dilation: int = 0,
    feather: int = 1,
    lower: np.ndarray | None = None,
) -> EditResult:
    """Inpainting and outpainting: re-generate the tokens under `pixel_mask`, keep the rest.

    Args:
      stages: the cascade, lowest resolution first (base, or base + super-res).
      images: float [B, S, S, 3] in [-1, 1] at the last stage's resolution.
      pixel_mask: bool [B, S, S], True = re-generate.
      cond, uncond: text inputs ([B, ...]); `uncond` is the empty or a negative prompt.
      rng: PRNG key.
      dilation: token margin around the mask (see `token_mask`).
      feather: blend ramp in pixels (see `feather_alpha`).
      lower: tokens of a stage below `stages[0]` (when editing starts mid-cascade).
    Returns:
      `EditResult`; tokens outside each stage's token mask equal the input's tokens.
    """
    chex.assert_rank(images, 4)
    chex.assert_equal(np.shape(pixel_mask), images.shape[:3])
    tokens, inputs, masks = [], [], []
    decoded = None
    for i, stage in enumerate(stages):
        stage_images = resize(images, stage.image_size)
        stage_mask = resize(np.asarray(pixel_mask, bool)[..., None], stage.image_size, True)[..., 0]
        ids = stage.tokenize(stage_images)
        tmask = token_mask(stage_mask, stage.grid, dilation)
        out = stage.sample(
            apply_token_mask(ids, tmask, stage.mask_id),
            cond,
            uncond,
            jax.random.fold_in(rng, i),
            lower=lower,
        )
        lower = out.tokens
        tokens.append(np.asarray(out.tokens))
        inputs.append(ids)
        masks.append(tmask)
        decoded = np.asarray(out.images, np.float32)
    decoded = resize(decoded, images.shape[1])
    return EditResult(
        images=blend(images, decoded, pixel_mask, feather),
        raw_images=decoded,
        tokens=tokens,
        input_tokens=inputs,
        token_masks=masks,
    )


def choose_resample(
    rng: jax.Array, shape: tuple[int, int], count: int, scores: np.ndarray | None = None
) -> np.ndarray:
    """bool [B, L] with exactly `count` True per row, uniformly random, or biased towards low
    `scores` (e.g. the model's log-probability of the current token) by Gumbel top-k."""
    scores = np.zeros(shape, np.float32) if scores is None else np.asarray(scores, np.float32)
    chex.assert_shape(scores, shape)
    chosen = self_critic.gumbel_lowest(
        rng, jnp.asarray(scores), jnp.ones(shape, bool), jnp.full(shape[:1], count, jnp.int32)
    )
    return np.asarray(chosen)


# A base token's pixels count as changed when the decoded image moved by more than this (of 2,
# the [-1, 1] range: 32 of 255) anywhere in its patch.
DECODED_CHANGE = 0.25


def decoded_change(before: np.ndarray, after: np.ndarray, grid: int) -> np.ndarray:
    """bool [B, grid * grid]: the tokens whose patch differs between two decoded images (float
    [B, S, S, 3] in [-1, 1]) by more than `DECODED_CHANGE` in some pixel.

    The decoder is convolutional, so a token that keeps its id can still decode differently
    among changed neighbours: a code for the rim of an object takes its colour from them. A
    mask-free edit that kept the input's pixels under every unchanged token left patches of the
    old colour on a recoloured object (BENCHMARKS.md, "Quality ablations": edit success).
    """
    chex.assert_equal_shape((before, after))
    return token_mask(np.abs(after - before).max(-1) > DECODED_CHANGE, grid)


# Mask-free editing's default share of the base tokens re-sampled per round: at 0.75 shape and
# position edits succeed far more often than at 0.25 or 0.5; smaller keeps more of the input
# (BENCHMARKS.md, "Quality ablations": edit success and footprint).
DEFAULT_RESAMPLE_FRACTION = 0.75


def maskfree_edit(
    stages: Sequence[TokenStage],
    images: np.ndarray,
    cond: dict[str, Any],
    uncond: dict[str, Any],
    rng: jax.Array,
    *,
    iterations: int,
    resample_fraction: float,
    score_fn=None,
    critic: float = 0.0,
    feather: int = 1,
) -> EditResult:
    """Mask-free editing: `iterations` rounds of re-sampling a fraction of the base tokens.

    Each round re-masks round(resample_fraction * L) of the current tokens (uniformly, or
    biased to low `score_fn(tokens) -> [B, L]` scores) and fills them with the same sampler
    call as generation, so at most that many tokens change per round. Higher stages then
    re-generate, as a masked edit, the pixels of the base tokens that changed and of those whose
    decoded patch changed with their neighbours (`decoded_change`); the rest keep the input's.

    `critic` > 0 (without a `score_fn`) biases the choice by the refinement's self-critic
    (`critic` * `MuseSampler.token_log_probs` under the edit's prompt): tokens that fit the rest
    of the image under the new prompt least go first, such as patches of the old colour that
    a text-contrast critic (prompt against no prompt) left in place. Chosen uniformly at small
    fractions, the re-sampled tokens are mostly ones the edit need not touch, and the kept ones
    pull them back to the input (BENCHMARKS.md, "Quality ablations": edit success).

    Returns:
      `EditResult` with `changed_per_iteration`: [B] counts of tokens changed in each round.
    """
    if iterations < 1:
        raise UsageError(f"iterations must be >= 1, got {iterations}.")
    if not 0.0 < resample_fraction <= 1.0:
        raise UsageError(f"resample_fraction must be in (0, 1], got {resample_fraction}.")
    if critic < 0:
        raise UsageError(f"critic must be >= 0, got {critic}.")
    base = stages[0]
    if score_fn is None and critic > 0:
        score_fn = lambda tokens: critic * base.token_log_probs(tokens, cond)
    base_images = resize(images, base.image_size)
    ids = base.tokenize(base_images)
    count = max(1, round(resample_fraction * ids.shape[1]))
    current, changed, ever = ids, [], np.zeros(ids.shape, bool)
    decoded = None
    for it in range(iterations):
        pick_rng, sample_rng = jax.random.split(jax.random.fold_in(rng, it))
        scores = None if score_fn is None else score_fn(current)
        remask = choose_resample(pick_rng, ids.shape, count, scores)
        out = base.sample(apply_token_mask(current, remask, base.mask_id), cond, uncond, sample_rng)
        new = np.asarray(out.tokens)
        changed.append(np.sum(new != current, axis=-1))
        ever |= remask
        current, decoded = new, np.asarray(out.images, np.float32)
    tokens, inputs, masks = [current], [ids], [current != ids]
    if len(stages) > 1:  # Super-res: re-generate where the base image changed, conditioned on it.
        # `decoded` is the last round's sample: `current` decoded by the base stage.
        region = masks[0] | decoded_change(base.decode(ids), decoded, base.grid)
        pixel = token_mask_to_pixels(region, base.grid, images.shape[1])
        rest = edit_with_mask(
            stages[1:], images, pixel, cond, uncond, rng, feather=feather, lower=current
        )
        return dataclasses.replace(
            rest,
            tokens=tokens + rest.tokens,
            input_tokens=inputs + rest.input_tokens,
            token_masks=masks + rest.token_masks,
            changed_per_iteration=changed,
        )
    decoded = resize(decoded, images.shape[1])
    return EditResult(
        images=decoded,
        raw_images=decoded,
        tokens=tokens,
        input_tokens=inputs,
        token_masks=masks,
        changed_per_iteration=changed,
    )
