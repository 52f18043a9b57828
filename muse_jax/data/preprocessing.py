"""Per-example preprocessing of stored image-caption records (TF ops, run inside tf.data).

Images are stored encoded (JPEG/PNG) with their width and height, so the square crop window is
known before decoding: JPEGs decode only that window (`decode_and_crop_jpeg`), then the crop is
resized to the stage resolution(s). Cropping the full shorter side and then resizing equals the
usual "resize the shorter side, then crop" without decoding pixels that are thrown away.

Randomness (crop position, which caption) comes from a per-example `seed` (int64 [2]) that the
input pipeline derives from (seed, epoch, position): the same example at the same position of
the same epoch is preprocessed identically, which is what makes resumption exact. Without a seed
the crop is centred and the first caption is used (evaluation).
"""

from __future__ import annotations

import unicodedata

import numpy as np
import tensorflow as tf

# Control characters and every Unicode separator become one space; RE2 and the Python twin below
# must agree, because the build decides "missing caption" with the Python one.
_SPACE_RE2 = r"[\p{Cc}\p{Z}]+"


def clean_caption_py(text: str) -> str:
    """Python twin of `clean_caption`: control chars/separators -> one space, stripped."""
    out, space = [], False
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Cc" or cat.startswith("Z"):
            space = True
            continue
        if space and out:
            out.append(" ")
        space = False
        out.append(ch)
    return "".join(out)


def clean_caption(text: tf.Tensor) -> tf.Tensor:
    """Collapses whitespace and control characters to single spaces and strips the ends."""
    return tf.strings.strip(tf.strings.regex_replace(text, _SPACE_RE2, " "))


def keep_size(width, height, min_size: int, max_aspect_ratio: float):
    """Whether an image passes the size filters; works on numpy arrays and on tf tensors alike.

    Float64 on both sides so the numpy count (used to plan epochs) and the tf.data filter agree
    exactly.
    """
    if isinstance(width, tf.Tensor):
        short = tf.cast(tf.minimum(width, height), tf.float64)
        long = tf.cast(tf.maximum(width, height), tf.float64)
        keep = tf.constant(True)
        if min_size > 0:
            keep = keep & (short >= float(min_size))
        if max_aspect_ratio > 0:
            keep = keep & (long <= float(max_aspect_ratio) * short)
        return keep
    width, height = np.asarray(width), np.asarray(height)
    short = np.minimum(width, height).astype(np.float64)
    long = np.maximum(width, height).astype(np.float64)
    keep = np.ones(short.shape, bool)
    if min_size > 0:
        keep &= short >= float(min_size)
    if max_aspect_ratio > 0:
        keep &= long <= float(max_aspect_ratio) * short
    return keep


def crop_window(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor | None) -> tf.Tensor:
    """[y, x, side, side] of the square crop: the whole shorter side, centred or (with a seed)
    at a uniformly random position along the longer side."""
    height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    side = tf.minimum(height, width)
    slack_y, slack_x = height - side, width - side
    if seed is None:
        y, x = slack_y // 2, slack_x // 2
    else:
        # One of the two slacks is zero, so one offset along the longer side serves both.
        offset = tf.random.stateless_uniform(
            [], seed=seed, minval=0, maxval=slack_y + slack_x + 1, dtype=tf.int32
        )
        y, x = tf.minimum(offset, slack_y), tf.minimum(offset, slack_x)
    return tf.stack([y, x, side, side])


def decode_crop(encoded: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
    """uint8 [side, side, 3]: the crop window of a JPEG (decoding only the window) or PNG."""

    def jpeg():
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """uint8 [size, size, 3] from a uint8 square; antialiased when shrinking."""
    out = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    out = tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)
    out.set_shape([size, size, 3])
    return out


def prepare_image_text(ex: dict, image_size: int, hr_image_size: int = 0) -> dict:
    """A stored record -> {'image'[, 'image_hr'] uint8, 'caption', 'text'} (one example).

    'image_hr' is the same crop at `hr_image_size`, so the super-res stage sees aligned pairs.
    """
    seed = ex.get("seed")
    crop_seed = cap_seed = None
    if seed is not None:
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
        crop_seed, cap_seed = seeds[0], seeds[1]
    window = crop_window(ex["height"], ex["width"], crop_seed)
    square = decode_crop(ex["image"], window)
    out = {"image": resize(square, image_size)}
    if hr_image_size:
        out["image_hr"] = resize(square, hr_image_size)
    captions = ex["captions"]
    if cap_seed is None:
        index = 0
    else:
        n = tf.shape(captions, out_type=tf.int32)[0]
        index = tf.random.stateless_uniform([], seed=cap_seed, minval=0, maxval=n, dtype=tf.int32)
    caption = clean_caption(captions[index])
    out["caption"] = caption
    out["text"] = caption
    return out
