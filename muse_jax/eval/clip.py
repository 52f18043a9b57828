"""CLIP score: how well images match their captions, by a frozen CLIP (ViT-L/14 by convention).

    scorer = clip.CLIPScorer.from_pretrained("/ckpt/clip-vit-large-patch14")
    result = scorer.score(images, captions)   # images: uint8 [N, H, W, 3]; captions: N strings
    result.clip_score      # mean over pairs of 100 * max(cos, 0)  (torchmetrics' scale)
    result.clip_score_01   # the same / 100 (the Muse paper's scale: 0.32 on COCO)

Preprocessing reproduces `transformers.CLIPImageProcessorPil` (OpenAI's own pipeline) exactly:
shortest side to 224 with Pillow's antialiased bicubic, centre crop 224, x/255, normalise with
OpenAI's mean/std. The resize *is* Pillow's (already a dependency), on the host: its uint8
fixed-point two-pass algorithm is what the published scores were computed with, and
`jax.image.resize(..., "bicubic")` differs from it by several uint8 levels (no intermediate
rounding, other edge handling); see `benchmarks/clip_throughput.py --compare_resize`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import chex
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from muse_jax.errors import UsageError
from muse_jax.text import clip_model
from muse_jax.text.clip_tokenizer import CLIPTokenizer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_shortest_side(image: np.ndarray, size: int) -> np.ndarray:
    """Pillow bicubic (antialiased) resize of uint8 [H, W, C]: shortest side to `size`, the other
    to int(size * long / short), as transformers sizes it."""
    h, w = image.shape[:2]
    height, width = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if (height, width) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """[H, W, C] -> [size, size, C] from offset ((H - size) // 2, (W - size) // 2)."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise UsageError(f"Image {h}x{w} is smaller than the {size}px crop.")
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def preprocess(
    image: np.ndarray,
    size: int = 224,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> np.ndarray:
    """CLIPImageProcessor's defaults for one image: uint8 [H, W, 3] -> float32 [size, size, 3].

    Arithmetic as transformers does it (x * (1/255) in float64, then float32 (x - mean) / std),
    so the output equals `CLIPImageProcessorPil(...)["pixel_values"]` (transposed to NHWC).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise UsageError(
            f"Expected a uint8 [H, W, 3] RGB image, got {image.dtype} {image.shape}; quantise "
            "float images with np.round(np.clip(x, 0, 1) * 255).astype(np.uint8) first."
        )
    x = center_crop(resize_shortest_side(image, size), size)
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# ----------------------------------------------------------------------------- the metric


@dataclasses.dataclass(frozen=True)
class ClipScore:
    """CLIP score of N (image, caption) pairs.

    Attributes:
      clip_score: mean over pairs of 100 * max(cos, 0) (Hessel et al.'s clamp, torchmetrics' x100).
      clip_score_01: clip_score / 100, the scale of the Muse paper (0.32 on COCO).
      mean_cosine: mean raw cosine, negatives included.
      torchmetrics_clip_score: max(100 * mean cosine, 0): torchmetrics' `CLIPScore` clamps the
        mean, not each pair; the two agree whenever no pair has a negative cosine (the usual case).
      count: N.
      cosines: [N] float64 per-pair cosines (not in `to_dict`).
    """

    clip_score: float
    clip_score_01: float
    mean_cosine: float
    torchmetrics_clip_score: float
    count: int
    cosines: np.ndarray

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("cosines")
        return d


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> ClipScore:
    """Scores paired embeddings (row i of each is one pair); they need not be normalised.

    Args:
      image_embeds: [N, D].
      text_embeds: [N, D].
    """
    chex.assert_equal_shape((image_embeds, text_embeds))
    chex.assert_rank(image_embeds, 2)
    a = np.asarray(image_embeds, np.float64)
    b = np.asarray(text_embeds, np.float64)
    cos = np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    if len(cos) == 0:
        raise UsageError("CLIP score of zero pairs.")
    clamped = float(np.mean(np.maximum(cos, 0.0)))
    return ClipScore(
        clip_score=100.0 * clamped,
        clip_score_01=clamped,
        mean_cosine=float(np.mean(cos)),
        torchmetrics_clip_score=max(100.0 * float(np.mean(cos)), 0.0),
        count=len(cos),
        cosines=cos,
    )


Progress = Callable[[str, int, int | None], None]


def print_progress(every_s: float = 30.0) -> Progress:
    """A progress callback printing "[clip] images 512/30000, 9.1/s, ETA 3240s" every `every_s`."""
    state = {"t0": None, "last": -math.inf}

    def report(what: str, done: int, total: int | None) -> None:
        now = time.perf_counter()
        if state["t0"] is None or done == 0:
            state["t0"], state["last"] = now, now
            return
        if now - state["last"] < every_s and done != total:
            return
        state["last"] = now
        rate = done / max(now - state["t0"], 1e-9)
        eta = f", ETA {(total - done) / rate:.0f}s" if total else ""
        of = f"/{total}" if total else ""
        print(f"[clip] {what} {done}{of}, {rate:.1f}/s{eta}", file=sys.stderr, flush=True)

    return report


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class CLIPScorer:
    """A loaded CLIP plus its tokenizer; embeds images and captions in fixed-size jitted batches.

    Every batch is padded to `batch_size`, so each tower compiles once. With several local
    devices, batches are split over them (`batch_size` must divide) and parameters replicated.
    """

    def __init__(
        self,
        config: clip_model.CLIPConfig,
        params: dict,
        tokenizer: CLIPTokenizer,
        batch_size: int = 32,
        progress: Progress | None = None,
    ):
        devices = jax.local_devices()
        if batch_size % len(devices):
            raise UsageError(f"batch_size {batch_size} must divide over {len(devices)} devices.")
        mesh = Mesh(np.asarray(devices), ("data",))
        self._batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
        self.params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self.config, self.tokenizer, self.batch_size = config, tokenizer, batch_size
        self.progress = progress if progress is not None else print_progress()
        model = clip_model.CLIP(config)
        self._image_fn = jax.jit(
            lambda p, x: model.apply({"params": p}, x, method=clip_model.CLIP.encode_image)
        )
        self._text_fn = jax.jit(
            lambda p, ids: model.apply({"params": p}, ids, method=clip_model.CLIP.encode_text)
        )

    @classmethod
    def from_pretrained(
        cls, path: str, *, dtype: str = "float32", batch_size: int = 32, **kwargs
    ) -> CLIPScorer:
        """Loads a transformers CLIPModel directory (config.json, model.safetensors or shards,
        tokenizer.json or vocab.json + merges.txt); see `clip_model.load_params` for errors."""
        config = clip_model.config_from_hf(path, dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(path)  # before the weights: fail fast
        params = clip_model.load_params(path, config)
        return cls(config, params, tokenizer, batch_size, **kwargs)

    def _run(self, fn, batches: Iterable[np.ndarray], what: str, total: int | None):
        """Runs `fn` on padded batches, one in flight: the host prepares batch k + 1 while the
        device computes batch k (a deeper queue would hold every batch's input on device)."""
        outs: list[np.ndarray] = []
        pending = None
        self.progress(what, 0, total)

        def collect(out: jax.Array, n: int) -> None:
            outs.append(np.asarray(out)[:n])
            self.progress(what, sum(len(o) for o in outs), total)

        for batch in batches:
            n = len(batch)
            padded = np.pad(batch, [(0, self.batch_size - n)] + [(0, 0)] * (batch.ndim - 1))
            out = fn(self.params, jax.device_put(padded, self._batch_sharding))
            if pending is not None:
                collect(*pending)
            pending = (out, n)
        if pending is not None:
            collect(*pending)
        if not outs:
            return np.zeros((0, self.config.projection_dim), np.float32)
        return np.concatenate(outs)

    def image_embeddings(
        self, images: Iterable[np.ndarray], total: int | None = None
    ) -> np.ndarray:
        """uint8 images ([N, H, W, 3] or an iterable of [H, W, 3], any sizes) -> [N, D] float32.

        Embeddings are the projected, unnormalised features (`get_image_features`).
        """
        if total is None and hasattr(images, "__len__"):
            total = len(images)
        size = self.config.vision.image_size
        batches = (
            np.stack([preprocess(im, size) for im in batch])
            for batch in _batches(images, self.batch_size)
        )
        return self._run(self._image_fn, batches, "images", total)

    def text_embeddings(self, captions: Sequence[str]) -> np.ndarray:
        """Captions -> [N, D] float32 projected, unnormalised features (`get_text_features`)."""
        batches = (self.tokenizer(b) for b in _batches(captions, self.batch_size))
        return self._run(self._text_fn, batches, "captions", len(captions))

    def score(self, images: Iterable[np.ndarray], captions: Sequence[str]) -> ClipScore:
        """CLIP score of images[i] against captions[i]; each distinct caption is encoded once."""
        captions = list(captions)
        unique = list(dict.fromkeys(captions))
        text = self.text_embeddings(unique)
        image = self.image_embeddings(images, total=len(captions))
        if len(image) != len(captions):
            raise UsageError(f"{len(image)} images but {len(captions)} captions.")
        index = {c: i for i, c in enumerate(unique)}
        return clip_score(image, text[[index[c] for c in captions]])
