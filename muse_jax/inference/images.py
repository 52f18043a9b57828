"""Pixel helpers of the sampling path: model outputs to uint8, grids, user images to the
model's square, and PIL conversions."""

from __future__ import annotations

import numpy as np
from PIL import Image

from muse_jax.errors import UsageError


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
    """Nearest-neighbour enlargement so that tiny images are visible in TensorBoard and pages."""
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def preview_grid(images: np.ndarray, columns: int = 8, min_side: int = 128) -> np.ndarray:
    """A grid of uint8 images enlarged (nearest) so each is at least ~`min_side` pixels."""
    scale = max(1, min_side // images.shape[1])
    return upscale(grid(images, max(1, min(columns, len(images)))), scale)


def as_pil(image) -> Image.Image:
    """A PIL image, or a uint8 array [H, W, 3] / [H, W] -> PIL."""
    if isinstance(image, Image.Image):
        return image
    return Image.fromarray(np.asarray(image, np.uint8))


def fit_square(im: Image.Image, size: int, resample) -> tuple[np.ndarray, str | None]:
    """PIL image -> array [size, size, ...]: shorter side scaled to `size`, centre-cropped.

    Returns the array and a note saying what was done (None when nothing was).
    """
    w, h = im.size
    if (w, h) == (size, size):
        return np.asarray(im), None
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), resample)
    x, y = (nw - size) // 2, (nh - size) // 2
    note = f"resized {w}x{h} to {nw}x{nh}"
    if (nw, nh) != (size, size):
        note += f" and centre-cropped to {size}x{size}"
    return np.asarray(im.crop((x, y, x + size, y + size))), note


def fit_mask(mask: Image.Image, image_size: tuple[int, int], size: int) -> np.ndarray:
    """A mask image (white = re-generate) of the input image's size or the model's -> bool
    [size, size], cropped exactly like the image. ValueError for any other size or no white."""
    m = mask.convert("L")
    if m.size == image_size:
        arr, _ = fit_square(m, size, Image.Resampling.NEAREST)
    elif m.size == (size, size):
        arr = np.asarray(m)
    else:
        raise UsageError(
            f"mask is {m.size[0]}x{m.size[1]} but the image is {image_size[0]}x{image_size[1]}: "
            f"give a mask of the image's size or the model's {size}x{size}."
        )
    out = arr >= 128
    if not out.any():
        raise UsageError("the mask has no white pixels: nothing to re-generate.")
    return out
