"""A Fréchet distance in the high-res tokenizer's encoder features: realism and diversity that
the attribute checker does not see, with a network the main job trained itself (no download).

Features: the encoder's output before quantization [B, h, w, D] (64x64 images -> 16x16 x D),
average-pooled to a 4x4 grid and flattened (16 * D values), so that both what is drawn and
where it is drawn count. The distance of cascade samples to real renderings of the same prompts
means little alone (few images, many dimensions, a small network): it is reported beside the
same distance between two independent real sets of those prompts, its floor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import chex
import jax
import numpy as np

from muse_jax.eval import fid

POOLED_SIDE = 4


def feature_fn(model) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 [B, S, S, 3] at the high-res tokenizer's size -> float64 features [B, 16 * D], from
    a loaded cascade (`muse_jax.inference.model.Model`)."""
    vq = model.modules.superres_tokenizer
    params = model.stage_params["superres_tokenizer"]["vq"]

    @jax.jit
    def encode(x):
        z = vq.apply({"params": params}, x, method=lambda m, x: m.encoder(x))
        b, h, w, d = z.shape
        k = h // POOLED_SIDE
        z = z.reshape(b, POOLED_SIDE, k, POOLED_SIDE, k, d).mean(axis=(2, 4))
        return z.reshape(b, -1)

    def features(images: np.ndarray) -> np.ndarray:
        chex.assert_rank(images, 4)
        x = np.asarray(images, np.float32) / 127.5 - 1.0
        return np.asarray(encode(x), np.float64)

    return features


def distances(
    model,
    outputs: dict[str, np.ndarray],
    prompts: Sequence[str],
    samples_per_prompt: int,
    seed: int = 0,
) -> dict[str, float | int]:
    """{name: distance of outputs[name] to real renderings of the prompts, 'real_floor': the
    distance between two other real sets, 'n': images per set}.

    `outputs`: uint8 [len(prompts) * samples_per_prompt, S, S, 3] each, prompt-major, at the
    high-res size (upsample a base stage's output first). Prompts must be of the shapes grammar.
    """
    from muse_jax.data import shapes

    features = feature_fn(model)
    size = next(iter(outputs.values())).shape[1]
    rng = np.random.default_rng(seed)
    captions = [p for p in prompts for _ in range(samples_per_prompt)]

    def real_set() -> np.ndarray:
        return np.stack([shapes.render(shapes.scene_from_caption(c, rng), size) for c in captions])

    reference = fid.statistics(features(real_set()))
    result: dict[str, float | int] = {"n": len(captions)}
    for name, images in outputs.items():
        chex.assert_equal(images.shape[0], len(captions))
        result[name] = fid.frechet_distance(fid.statistics(features(images)), reference)
    result["real_floor"] = fid.frechet_distance(fid.statistics(features(real_set())), reference)
    return result
