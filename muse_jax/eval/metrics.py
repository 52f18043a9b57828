"""Evaluation metrics as plug-ins: `config.eval.metrics` names them, `muse_jax.evaluate` runs them.

A metric streams: the evaluator feeds it one generated batch at a time (`update`) and asks for
the numbers at the end (`result`), so 30k images at 512 px (23 GB of pixels) never sit in host
memory at once; FID keeps 2048 floats per image, CLIP one embedding. Its lifecycle:

  metric = metrics.get("fid")(setup)   # cheap: checks config keys and paths (one-line errors)
  metric.prepare()                      # once per process: weights, reference statistics
  metric.reset(); metric.bind(model)    # once per checkpoint: the loaded models, then
  metric.update(batch); ...; metric.result()

A new metric is a subclass with a `name`, decorated with `@register`.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np

from muse_jax import storage
from muse_jax.errors import UsageError

# Keys of config.data that do not change the pixels of the evaluation images, so they are left
# out of the FID reference cache key (changing them reuses the cached statistics).
_TEXT_ONLY_DATA_KEYS = frozenset(
    {"text_length", "vocabulary", "shuffle_buffer", "build_workers", "random_crop", "data_dir"}
)


class MetricConfigError(UsageError):
    """A metric's config is incomplete (e.g. no weights file): one line naming the key to set."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a metric may read when it is built.

    Attributes:
      config: the experiment's config (`config.eval` holds the metrics' keys).
      workdir: the experiment directory (data are built under it).
      image_key: the dataset feature matching the generated images: "image" (base stage) or
        "image_hr" (cascade); FID's reference images are read from it.
      log: where progress lines go.
    """

    config: object
    workdir: str
    image_key: str = "image"
    log: Callable[[str], None] = lambda s: print(s, flush=True)

    @property
    def image_size(self) -> int:
        d = self.config.data
        return int(d.hr_image_size if self.image_key == "image_hr" else d.image_size)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One generated batch.

    Attributes:
      images: uint8 [B, H, W, 3], the evaluated output (with the cascade: high-res).
      captions: B captions, images[i] was generated from captions[i].
      group: "seen" / "held_out" (the config's prompts) or the split (dataset captions).
      lowres_images: cascade only: uint8 [B, h, w, 3], the base stage's own output.
    """

    images: np.ndarray
    captions: list[str]
    group: str
    lowres_images: np.ndarray | None = None


class Metric(abc.ABC):
    """A streaming metric; `result()` keys are TensorBoard tags below `eval/`."""

    name: ClassVar[str] = ""

    def __init__(self, setup: Setup):
        """Validates the metric's config keys; raises MetricConfigError. Loads nothing."""
        self.setup = setup

    def prepare(self) -> None:  # noqa: B027 (an optional hook: most metrics need nothing)
        """One-time expensive work (weights, reference statistics); idempotent."""

    def bind(self, model) -> None:  # noqa: B027 (an optional hook: most metrics need nothing)
        """The loaded models (`muse_jax.inference.model.Model`) the next images come from."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forgets the batches of the previous evaluation."""

    @abc.abstractmethod
    def update(self, batch: Batch) -> None:
        """Accumulates one generated batch."""

    @abc.abstractmethod
    def result(self) -> dict[str, float]:
        """The metric's values over every batch since `reset`."""


_REGISTRY: dict[str, type[Metric]] = {}


def register(cls: type[Metric]) -> type[Metric]:
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"Metric {cls.__name__} needs a new, non-empty name (got {cls.name!r}).")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type[Metric]:
    if name not in _REGISTRY:
        raise MetricConfigError(
            f"Unknown metric {name!r} in config.eval.metrics; valid: {', '.join(names())}."
        )
    return _REGISTRY[name]


def build(setup: Setup) -> list[Metric]:
    """The metrics `config.eval.metrics` names, validated, in that order.

    The key is a tuple (ConfigDict overrides cannot replace lists); items may hold several
    comma-separated names, so `--config.eval.metrics=alignment,clip,fid` works on a command line.
    """
    metrics = setup.config.eval.metrics
    items = [metrics] if isinstance(metrics, str) else list(metrics)
    wanted = [n.strip() for item in items for n in item.split(",") if n.strip()]
    if not wanted:
        raise MetricConfigError(f"config.eval.metrics is empty; valid names: {', '.join(names())}.")
    if len(set(wanted)) != len(wanted):
        raise MetricConfigError(f"config.eval.metrics names a metric twice: {wanted}.")
    classes = [get(n) for n in wanted]  # Every name is checked before any metric is built.
    return [cls(setup) for cls in classes]


class FullBatches:
    """Feeds a batched network (`fn`: images -> [N, D]) only full batches of `size` images, and
    the partial rest at `flush`: the networks pad every call to their batch size, so feeding
    them each small generated batch would waste most of every call."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], size: int):
        self.fn, self.size = fn, size
        self._pending: list[np.ndarray] = []
        self._held = 0
        self._outputs: list[np.ndarray] = []

    def add(self, images: np.ndarray) -> None:
        self._pending.append(images)
        self._held += len(images)
        if self._held >= self.size:
            images = np.concatenate(self._pending)
            full = len(images) // self.size * self.size
            self._outputs.append(self.fn(images[:full]))
            self._pending, self._held = [images[full:]], len(images) - full

    def flush(self) -> np.ndarray:
        """All outputs, in the order the images came."""
        if self._held:
            self._outputs.append(self.fn(np.concatenate(self._pending)))
            self._pending, self._held = [], 0
        return np.concatenate(self._outputs)


def _require_path(
    metric: str, value: str, key: str, what: str, hint: str, directory: bool = False
) -> str:
    """`value` if it names an existing file (or directory), local or gs://; else one line
    naming `key`."""
    if not value:
        raise MetricConfigError(f"metric {metric!r} needs {what}: set --{key}=PATH ({hint}).")
    exists = storage.isdir(value) if directory else storage.isfile(value)
    if not exists:
        kind = "directory" if directory else "file"
        raise MetricConfigError(f"{key}={value}: no such {kind} ({what}; {hint}).")
    return value


# ----------------------------------------------------------------------------- alignment


@register
class Alignment(Metric):
    """The shapes world's pixel checker, per attribute and caption group (`alignment/seen/color`).

    With the cascade, the base stage's own output is scored too (`alignment/base_only/...`),
    so the two resolutions compare on the same samples, and both go into a Fréchet distance to
    real renderings of the same captions in the high-res tokenizer's features
    (`alignment/frechet/{cascade,base_upsampled,real_floor}`, `muse_jax.eval.tokenizer_frechet`).
    A caption outside the shapes grammar
    is sampled but not scored: `alignment/<group>/skipped` counts its samples. A config none of
    whose prompts the checker can read is an error up front.
    """

    name = "alignment"

    def __init__(self, setup: Setup):
        super().__init__(setup)
        ev = setup.config.eval
        if ev.get("captions", "prompts") == "prompts":
            from muse_jax.data import shapes
            from muse_jax.prompt_groups import all_prompts

            prompts = all_prompts(ev)
            if prompts and not any(map(shapes.in_grammar, prompts)):
                raise MetricConfigError(
                    "metric 'alignment' checks captions of the shapes grammar only, and none of "
                    f"config.eval's prompts is one (e.g. {prompts[0]!r}); drop it from "
                    "config.eval.metrics (e.g. --config.eval.metrics=clip,fid)."
                )

    def reset(self) -> None:
        # Images are kept (the shapes world's are tiny), so `alignment.score` runs exactly as it
        # does for alignment_eval.generate's own scores.
        self._groups: dict[str, dict[str, list]] = {}
        self._pairs: list[tuple[np.ndarray, np.ndarray, list[str]]] = []
        self._model = None

    def bind(self, model) -> None:
        self._model = model

    def update(self, batch: Batch) -> None:
        if batch.lowres_images is not None:
            self._pairs.append((batch.images, batch.lowres_images, batch.captions))
        outputs = [("", batch.images)]
        if batch.lowres_images is not None:
            outputs.append(("base_only/", batch.lowres_images))
        for prefix, images in outputs:
            entry = self._groups.setdefault(prefix + batch.group, {"images": [], "captions": []})
            entry["images"].append(images)
            entry["captions"].extend(batch.captions)

    def result(self) -> dict[str, float]:
        from muse_jax.eval.alignment_eval import readable_scores

        out = {}
        for group, entry in self._groups.items():
            captions = entry["captions"]
            scores, skipped = readable_scores(np.concatenate(entry["images"]), captions)
            for k, v in scores.items():
                if k != "n" and v == v:  # NaN: no caption of the group states it.
                    out[f"alignment/{group}/{k}"] = v
            if skipped:
                out[f"alignment/{group}/skipped"] = float(sum(c in skipped for c in captions))
        if self._pairs and self._model is not None:
            out.update(self._frechet())
        self._model = None  # Not kept alive while the next checkpoint loads.
        return out

    def _frechet(self) -> dict[str, float]:
        from muse_jax.data import shapes
        from muse_jax.eval import tokenizer_frechet

        images = np.concatenate([p[0] for p in self._pairs])
        low = np.concatenate([p[1] for p in self._pairs])
        captions = [c for p in self._pairs for c in p[2]]
        keep = [i for i, c in enumerate(captions) if shapes.in_grammar(c)]
        if len(keep) < 2:  # A covariance needs two images.
            return {}
        scale = images.shape[1] // low.shape[1]
        outputs = {
            "cascade": images[keep],
            "base_upsampled": low[keep].repeat(scale, axis=1).repeat(scale, axis=2),
        }
        d = tokenizer_frechet.distances(self._model, outputs, [captions[i] for i in keep], 1)
        return {f"alignment/frechet/{k}": float(v) for k, v in d.items() if k != "n"}


# ----------------------------------------------------------------------------- CLIP score


@register
class ClipScore(Metric):
    """CLIP score (`clip_score`: 100·max(cos, 0); `clip_score_01`: the paper's 0–1 scale)."""

    name = "clip"
    _HINT = "a transformers CLIPModel directory, e.g. openai/clip-vit-large-patch14"

    def __init__(self, setup: Setup):
        super().__init__(setup)
        self.path = _require_path(
            self.name,
            setup.config.eval.clip.checkpoint,
            "config.eval.clip.checkpoint",
            "a CLIP checkpoint",
            self._HINT,
            directory=True,
        )
        self.scorer = None

    def prepare(self) -> None:
        if self.scorer is None:
            from muse_jax.eval import clip

            self.scorer = clip.CLIPScorer.from_pretrained(
                self.path, batch_size=int(self.setup.config.eval.clip.batch_size)
            )

    def reset(self) -> None:
        self._images = FullBatches(self.scorer.image_embeddings, self.scorer.batch_size)
        self._captions: list[str] = []

    def update(self, batch: Batch) -> None:
        self._images.add(batch.images)
        self._captions.extend(batch.captions)

    def result(self) -> dict[str, float]:
        from muse_jax.eval import clip

        unique = list(dict.fromkeys(self._captions))  # Each caption is encoded once.
        text = self.scorer.text_embeddings(unique)
        index = {c: i for i, c in enumerate(unique)}
        score = clip.clip_score(self._images.flush(), text[[index[c] for c in self._captions]])
        return {"clip_score": score.clip_score, "clip_score_01": score.clip_score_01}


# ----------------------------------------------------------------------------- FID


def reference_images(setup: Setup, split: str, count: int, batch_size: int) -> Iterator[np.ndarray]:
    """The first `count` real images of `split` (centre crops, as the generated images' size)
    as uint8 batches; fewer in the split is a ValueError."""
    from muse_jax.data import tasks
    from muse_jax.inference import images as summaries

    seen = 0
    for batch in tasks.batches(
        setup.config,
        setup.workdir,
        split=split,
        batch_size=batch_size,
        seed=0,
        shuffle=False,
        repeat=False,
        images=(setup.image_key,),
    ):
        images = summaries.to_uint8(batch[setup.image_key][: count - seen])
        seen += len(images)
        yield images
        if seen == count:
            return
    raise UsageError(
        f"config.eval.fid.num_reference={count} but split {split!r} of the dataset has only "
        f"{seen} images; lower it or pick another config.eval.fid.reference_split."
    )


def data_digest(config) -> str:
    """A short hash of the data config's pixel-relevant keys (for the FID cache key)."""
    data = {k: v for k, v in config.data.to_dict().items() if k not in _TEXT_ONLY_DATA_KEYS}
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


@register
class Fid(Metric):
    """FID of the generated images against `eval.fid.num_reference` real images of
    `eval.fid.reference_split`, whose statistics are computed once and cached on disk."""

    name = "fid"
    _HINT = (
        "pytorch-fid's pt_inception-2015-12-05-6726825d.pth converted with "
        "`python -m muse_jax.eval.convert_inception --input=... --output=inception_fid.safetensors`"
    )

    def __init__(self, setup: Setup):
        super().__init__(setup)
        cfg = setup.config.eval.fid
        self.weights = _require_path(
            self.name,
            cfg.inception_weights,
            "config.eval.fid.inception_weights",
            "FID Inception weights (.safetensors or .npz)",
            self._HINT,
        )
        if int(cfg.num_reference) < 2:
            raise MetricConfigError(
                f"config.eval.fid.num_reference must be >= 2, got {cfg.num_reference}."
            )
        self.extractor = None
        self.reference = None

    @property
    def cache_dir(self) -> str:
        cache = self.setup.config.eval.fid.cache_dir
        return cache or storage.join(self.setup.workdir, "eval", "fid_stats")

    def cache_key(self) -> str:
        from muse_jax.eval import fid

        c = self.setup.config
        return fid.cache_key(
            c.data.dataset,
            data_digest(c),
            c.eval.fid.reference_split,
            int(c.eval.fid.num_reference),
            f"{self.setup.image_size}px",
            weights=self.weights,
        )

    def prepare(self) -> None:
        if self.reference is not None:
            return
        from muse_jax.eval import fid

        cfg = self.setup.config.eval.fid
        self.extractor = fid.FeatureExtractor(
            self.weights, batch_size=int(cfg.batch_size), log=self.setup.log
        )
        self.reference = fid.reference_statistics(
            self.extractor,
            lambda: reference_images(
                self.setup, cfg.reference_split, int(cfg.num_reference), int(cfg.batch_size)
            ),
            self.cache_dir,
            self.cache_key(),
        )

    def reset(self) -> None:
        self._features = FullBatches(self.extractor, self.extractor.batch_size)

    def update(self, batch: Batch) -> None:
        self._features.add(batch.images)

    def result(self) -> dict[str, float]:
        from muse_jax.eval import fid

        stats = fid.statistics(self._features.flush())
        return {"fid": fid.frechet_distance(stats, self.reference)}
