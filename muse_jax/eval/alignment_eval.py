"""Generates images for prompts and scores them with the pixel alignment checker."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from muse_jax.eval import alignment
from muse_jax.train import summaries


@dataclasses.dataclass
class Generated:
    images: np.ndarray  # uint8 [N, H, W, 3], prompt-major (samples of one prompt together).
    captions: list[str]
    tokens: np.ndarray
    scores: dict[str, float]
    # Cascade only: the base stage's own output (before super-res) and its scores.
    lowres_images: np.ndarray | None = None
    lowres_scores: dict[str, float] | None = None


def generate(
    config,
    sampler,
    params,
    conditioner,
    prompts: list[str],
    *,
    samples_per_prompt: int,
    seed: int,
    negative_prompt: str | None = None,
) -> Generated:
    """`samples_per_prompt` images for each prompt in one batch, with their alignment scores."""
    for p in prompts:
        if not p.strip():
            raise ValueError("Empty prompt: give a caption, e.g. --prompt='a red circle'.")
    captions = [p for p in prompts for _ in range(samples_per_prompt)]
    neg = config.sampling.negative_prompt if negative_prompt is None else negative_prompt
    cond = conditioner.encode(captions)
    uncond = {k: np.repeat(v, len(captions), 0) for k, v in conditioner.encode([neg]).items()}
    out = sampler(params, cond, uncond, jax.random.PRNGKey(seed))
    images = summaries.to_uint8(np.asarray(out.images))
    low = getattr(out, "lowres_images", None)
    low = None if low is None else summaries.to_uint8(np.asarray(low))
    return Generated(
        images=images,
        captions=captions,
        tokens=np.asarray(out.tokens),
        scores=_score(images, captions),
        lowres_images=low,
        lowres_scores=None if low is None else _score(low, captions),
    )


def _score(images: np.ndarray, captions: list[str]) -> dict[str, float]:
    try:
        return alignment.score(images, captions)
    except ValueError:  # Prompts outside the shapes grammar cannot be checked.
        return {}


def subset(generated: Generated, rows: slice) -> Generated:
    """The samples `rows` of a `Generated` (e.g. one prompt group), re-scored on their own."""
    images = generated.images[rows]
    captions = generated.captions[rows]
    low = None if generated.lowres_images is None else generated.lowres_images[rows]
    return Generated(
        images=images,
        captions=captions,
        tokens=generated.tokens[rows],
        scores=_score(images, captions),
        lowres_images=low,
        lowres_scores=None if low is None else _score(low, captions),
    )
