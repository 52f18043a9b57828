"""Raw image-caption records from users' files, and the checks that decide which ones are kept.

Readers (img2dataset, COCO, image folder) yield `RawRecord`s without judging them; `process`
turns one into a stored example or raises `BadRecord(reason)`. One bad record is skipped and
counted, never a crash: a multi-day build must survive the odd truncated JPEG or Latin-1 caption.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io

import numpy as np
import tensorflow as tf
from PIL import Image

from muse_jax import storage
from muse_jax.data.preprocessing import clean_caption_py

# Why records are skipped; the build log, the dataset's metadata and TensorBoard use these names.
SKIP_REASONS = (
    "corrupt_image",  # cannot be decoded (truncated, garbage, unsupported)
    "empty_image",  # a zero-byte file or a zero-pixel image
    "missing_image",  # the caption names an image that is not there
    "missing_caption",  # no caption, or only whitespace/control characters
    "bad_caption_encoding",  # caption bytes are not UTF-8
    "duplicate_key",  # a second record with a key already seen in the same shard
    "corrupt_shard",  # a tar/parquet file that stops being readable (its remaining records)
)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_or_none(path: str) -> bytes | None:
    """A local or gs:// file's bytes, or None when it is missing or unreadable, so that the
    record is skipped as `missing_image` rather than ending the build. Remote client errors
    arrive as `storage.StorageError`, an OSError, so they count the same way."""
    try:
        return storage.read_bytes(path)
    except OSError:
        return None


class BadRecord(Exception):
    """A record to skip; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass
class RawRecord:
    """One image and its captions as found on disk, not yet checked.

    `image` is None when the file is missing; captions are bytes (checked as UTF-8 here) or str
    (read with `errors="surrogateescape"`, so undecodable bytes show up as lone surrogates).
    `problem` lets a reader report a skip it found itself (e.g. "corrupt_shard").
    """

    key: str
    image: bytes | None
    captions: list[bytes | str]
    problem: str = ""


def in_test_split(key: str, test_fraction: float) -> bool:
    """Deterministic held-out assignment by key hash: stable as shards are added or removed."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return h < test_fraction * 2.0**64


def captions_of(raw: RawRecord) -> list[str]:
    """The cleaned, non-empty UTF-8 captions; raises BadRecord when none is left."""
    kept, bad_encoding = [], False
    for c in raw.captions:
        if c is None:
            continue
        try:
            if isinstance(c, bytes):
                text = c.decode("utf-8")
            else:
                c.encode("utf-8")  # Lone surrogates (undecodable bytes) raise here.
                text = c
        except UnicodeError:
            bad_encoding = True
            continue
        text = clean_caption_py(text)
        if text:
            kept.append(text)
    if not kept:
        raise BadRecord("bad_caption_encoding" if bad_encoding else "missing_caption", raw.key)
    return kept


def _target_size(width: int, height: int, max_size: int) -> tuple[int, int] | None:
    """(w, h) with the shorter side capped at `max_size`, or None when no resize is needed."""
    short = min(width, height)
    if max_size <= 0 or short <= max_size:
        return None
    scale = max_size / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_image(data: bytes, max_size: int) -> tuple[bytes, int, int, bool]:
    """(bytes to store, width, height, re-encoded?) for one image file, or raises BadRecord.

    JPEG and PNG files with 1 or 3 channels and a shorter side <= `max_size` are stored as they
    are (TensorFlow decodes them at training time, so TensorFlow checks them here). Anything else
    TensorFlow cannot store as-is (other formats, alpha, CMYK, larger images) is re-encoded:
    JPEG stays JPEG (quality 95), everything else becomes PNG.
    """
    if not data:
        raise BadRecord("empty_image")
    fmt = "jpeg" if data[:3] == _JPEG_MAGIC else "png" if data[:8] == _PNG_MAGIC else "other"
    try:
        pixels = tf.io.decode_image(data, channels=0, expand_animations=False)
    except (tf.errors.OpError, ValueError):
        pixels = None
    if pixels is not None and fmt != "other" and pixels.shape[-1] in (1, 3):
        height, width = int(pixels.shape[0]), int(pixels.shape[1])
        if not height or not width:
            raise BadRecord("empty_image")
        size = _target_size(width, height, max_size)
        if size is None:
            return data, width, height, False
        small = tf.image.resize(pixels, (size[1], size[0]), antialias=True)
        small = tf.cast(tf.clip_by_value(tf.round(small), 0, 255), tf.uint8)
        enc = tf.io.encode_jpeg(small, quality=95) if fmt == "jpeg" else tf.io.encode_png(small)
        return enc.numpy(), size[0], size[1], True
    return _reencode_with_pil(data, max_size)


def _reencode_with_pil(data: bytes, max_size: int) -> tuple[bytes, int, int, bool]:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises many types for bad input; all mean "unreadable".
        raise BadRecord("corrupt_image", str(e)[:80]) from None
    if not image.width or not image.height:
        raise BadRecord("empty_image")
    lossy = image.format in ("JPEG", "MPO", "WEBP")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))  # Transparent -> white, not black.
    else:
        image = image.convert("RGB")
    size = _target_size(image.width, image.height, max_size)
    if size is not None:
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    out = io.BytesIO()
    if lossy:
        image.save(out, "JPEG", quality=95)
    else:
        image.save(out, "PNG")
    return out.getvalue(), image.width, image.height, True


def process(raw: RawRecord, max_size: int) -> dict:
    """A checked record, ready for the TFDS features, or raises BadRecord."""
    if raw.problem:
        raise BadRecord(raw.problem, raw.key)
    captions = captions_of(raw)  # Cheap checks first.
    if raw.image is None:
        raise BadRecord("missing_image", raw.key)
    data, width, height, reencoded = encode_image(raw.image, max_size)
    return {
        # Bookkeeping, popped by the builder: counts, not features.
        "reencoded": reencoded,
        "dropped_captions": len(raw.captions) - len(captions),
        "image": data,
        "captions": captions,
        "width": np.int32(width),
        "height": np.int32(height),
        "id": raw.key.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
    }
