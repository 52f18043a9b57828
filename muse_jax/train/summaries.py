"""Image grids for TensorBoard summaries, and reading scalars back from event files."""

from __future__ import annotations

import numpy as np

from muse_jax import storage
from muse_jax.inference.images import grid, to_uint8, upscale  # noqa: F401  (re-exported)


def psnr(recon: np.ndarray, x: np.ndarray) -> float:
    """PSNR in dB of `recon` (clipped to [-1, 1]) against `x`, both images in [-1, 1]."""
    mse = float(np.mean((np.clip(np.asarray(recon), -1, 1) - np.asarray(x)) ** 2))
    return 10.0 * float(np.log10(4.0 / max(mse, 1e-10)))


def save_png(image: np.ndarray, path: str) -> None:
    """A uint8 image as a PNG, local or remote (see `muse_jax.storage`)."""
    storage.save_png(image, path)


def read_scalars(logdir: str) -> dict[str, dict[int, float]]:
    """All scalars of the TensorBoard event files in `logdir`: {tag: {step: value}}.

    CLU writes scalars as tensor summaries; both forms are read.
    """
    import tensorflow as tf

    out: dict[str, dict[int, float]] = {}
    names = [n for n in storage.listdir(logdir) if n.startswith("events.out.tfevents.")]
    for path in (storage.join(logdir, n) for n in names):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                if v.HasField("tensor") and not v.tensor.string_val:
                    value = float(tf.make_ndarray(v.tensor).reshape(-1)[0])
                elif v.HasField("simple_value"):
                    value = float(v.simple_value)
                else:
                    continue
                out.setdefault(v.tag, {})[int(event.step)] = value
    return out
