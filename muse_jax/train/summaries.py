"""Image grids and PNG files for TensorBoard summaries and sample outputs."""

from __future__ import annotations

import numpy as np

from muse_jax import storage


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255]."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
        np.uint8
    )


def grid(images: np.ndarray, columns: int, pad: int = 1, pad_value: int = 64) -> np.ndarray:
    """[N, H, W, C] uint8 -> one [rows * (H + pad) + pad, ...] image, row-major."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), pad_value, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        out[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + col * (w + pad) : pad + col * (w + pad) + w,
        ] = img
    return out


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement so that tiny images are visible in TensorBoard and READMEs."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


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
