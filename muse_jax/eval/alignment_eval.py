"""Generates images for prompts and scores them with the pixel alignment checker."""

from __future__ import annotations

import dataclasses

import numpy as np

from muse_jax.data import shapes, shapes_alignment
from muse_jax.data.shapes_alignment import score_or_empty


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
    pipe,
    prompts: list[str],
    *,
    samples_per_prompt: int,
    seed: int,
    negative_prompt: str | None = None,
    stages: str | None = None,
) -> Generated:
    """`samples_per_prompt` images for each prompt from a `MusePipeline`, with their alignment
    scores (batches of the pipeline's `batch_size`)."""
    out = pipe(
        prompts,
        num_images_per_prompt=samples_per_prompt,
        seed=seed,
        negative_prompt=negative_prompt,
        stages=stages,
    )
    low = out.lowres_array
    return Generated(
        images=out.array,
        captions=out.captions,
        tokens=out.tokens,
        scores=score_or_empty(out.array, out.captions),
        lowres_images=low,
        lowres_scores=None if low is None else score_or_empty(low, out.captions),
    )


def subset(generated: Generated, rows: slice) -> Generated:
    """The samples `rows` of a `Generated` (e.g. one prompt group), re-scored on their own."""
    images = generated.images[rows]
    captions = generated.captions[rows]
    low = None if generated.lowres_images is None else generated.lowres_images[rows]
    return Generated(
        images=images,
        captions=captions,
        tokens=generated.tokens[rows],
        scores=score_or_empty(images, captions),
        lowres_images=low,
        lowres_scores=None if low is None else score_or_empty(low, captions),
    )


def readable_scores(images: np.ndarray, captions: list[str]) -> tuple[dict[str, float], list[str]]:
    """The checker's scores of the samples whose caption is in the shapes grammar ({} if none
    is), and the distinct captions it cannot read: those samples are skipped, not failed."""
    readable = [shapes.in_grammar(c) for c in captions]
    keep = np.flatnonzero(readable)
    skipped = list(dict.fromkeys(c for c, ok in zip(captions, readable) if not ok))
    if len(keep) == 0:
        return {}, skipped
    return shapes_alignment.score(images[keep], [captions[i] for i in keep]), skipped
