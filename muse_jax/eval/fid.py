"""Fréchet Inception Distance, computed as pytorch-fid computes it, with cached reference statistics.

FID = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) over the 2048-d pool3 features of
`muse_jax.eval.inception`. Features come from one jitted call per fixed-size batch (the last
batch is padded, so nothing recompiles); statistics and the distance are float64 numpy, and
the matrix square root is `scipy.linalg.sqrtm`, with pytorch-fid's fallback for singular
products and its tolerance for imaginary round-off, so our numbers equal its numbers.

Reference statistics (COCO-30k, CC3M, ...) are costly and never change for a given image set
and weights file: `reference_statistics` writes them once to `<cache_dir>/<key>.npz` under a
key the caller builds with `cache_key`. The file holds `mu` and `sigma` like pytorch-fid's
`--save-stats` files, so either tool can read the other's. The cache (and the weights file) may
be local or on gs:// (read and written through `muse_jax.storage`).

  extractor = fid.FeatureExtractor("inception_fid.safetensors", batch_size=50)
  key = fid.cache_key("coco2014", "val", 30000, "256px", weights="inception_fid.safetensors")
  ref = fid.reference_statistics(extractor, lambda: coco_batches(), "fid_stats", key)
  score = fid.fid(extractor, generated_batches, ref)
"""

from __future__ import annotations

import dataclasses
import io
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from muse_jax import storage
from muse_jax.errors import UsageError
from muse_jax.eval import inception

Images = np.ndarray | Iterable[np.ndarray]


@dataclasses.dataclass(frozen=True)
class Statistics:
    """Gaussian fit of a feature set: mu [D] and sigma [D, D] in float64, from `count` images."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    def save(self, path: str, key: str = "") -> None:
        """Writes `path` (local or gs://) atomically, so a killed run never leaves a half file
        to be reused."""
        buffer = io.BytesIO()
        np.savez(buffer, mu=self.mu, sigma=self.sigma, count=self.count, key=np.str_(key))
        storage.write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str) -> tuple[Statistics, str]:
        """(statistics, key); also reads pytorch-fid's stats files (count -1, key "")."""
        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as f:
            count = int(f["count"]) if "count" in f.files else -1
            key = str(f["key"]) if "key" in f.files else ""
            return cls(f["mu"].astype(np.float64), f["sigma"].astype(np.float64), count), key


def statistics(features: np.ndarray) -> Statistics:
    """Mean and unbiased covariance ([N, D] -> Statistics), float64 like `np.cov` in pytorch-fid."""
    chex.assert_rank(features, 2)
    if features.shape[0] < 2:
        raise UsageError(f"FID needs at least 2 images, got {features.shape[0]}.")
    x = np.asarray(features, dtype=np.float64)
    return Statistics(x.mean(axis=0), np.cov(x, rowvar=False), x.shape[0])


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr(sqrtm(S1 S2)) for symmetric PSD S1, S2, as the sum of the square roots of the
    eigenvalues of sqrt(S1) S2 sqrt(S1) (similar to S1 S2, but symmetric): two `eigh` calls,
    much faster than `scipy.linalg.sqrtm` at 2048 dimensions and never complex (BENCHMARKS.md,
    section "Evaluation metrics (random weights of the real shapes)")."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root @ s2 @ root)
    return float(np.sum(np.sqrt(np.clip(eig, 0, None))))


def frechet_distance(
    a: Statistics, b: Statistics, eps: float = 1e-6, method: str = "eigh"
) -> float:
    """Fréchet distance of two Gaussians.

    `method="sqrtm"` is `pytorch_fid.calculate_frechet_distance` step for step: with fewer
    images than dimensions the covariances are singular; when sqrtm of their product is not
    finite, `eps` is added to both diagonals and it is retried; sqrtm's tiny imaginary parts from
    round-off are dropped, unless the diagonal's exceed 1e-3. `method="eigh"` (the default)
    computes the same trace from a symmetric eigendecomposition (see `_trace_sqrt_product`):
    equal to within 1e-3 on well-posed inputs (tests/test_fid.py) and much faster at 2048
    dimensions on a CPU (see `_trace_sqrt_product`).
    """
    mu1, mu2 = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
    s1, s2 = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"Statistics of different dimensions: {mu1.shape} vs {mu2.shape}.")
    diff = mu1 - mu2
    if method == "eigh":
        tr = _trace_sqrt_product(s1, s2)
        return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * tr)
    if method != "sqrtm":
        raise ValueError(f"Unknown method {method!r}; valid: 'eigh', 'sqrtm'.")
    with warnings.catch_warnings():  # The singular case is handled below; no need to shout.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1.dot(s2))
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))} in sqrtm.")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _check_images(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise UsageError(f"Expected images [N, H, W, 3], got shape {x.shape}.")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise UsageError(f"Images must be uint8 or float in [0, 1], got {x.dtype}.")
    lo, hi = float(x.min(initial=0)), float(x.max(initial=0))
    if lo < -1e-3 or hi > 1 + 1e-3:  # A [-1, 1] or [0, 255] float image would silently skew FID.
        raise UsageError(f"Float images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}].")
    return x.astype(np.float32)


def _batches(images: Images, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Re-chunks arrays of any length into (padded batch [B, H, W, 3], number of real rows)."""
    chunks = [images] if isinstance(images, np.ndarray) else images
    buf: list[np.ndarray] = []
    held = 0
    for chunk in chunks:
        chunk = _check_images(chunk)
        while len(chunk):
            take = chunk[: batch_size - held]
            chunk = chunk[len(take) :]
            buf.append(take)
            held += len(take)
            if held == batch_size:
                yield np.concatenate(buf), batch_size
                buf, held = [], 0
    if held:
        last = np.concatenate(buf)
        pad = np.zeros((batch_size - held, *last.shape[1:]), last.dtype)
        yield np.concatenate([last, pad]), held


class FeatureExtractor:
    """Pool3 features of image batches; the network is compiled once per image size.

    Args:
      weights: converted weights file (see `convert_inception`) or already-loaded variables.
      batch_size: images per call; the last batch is zero-padded to it.
      dtype: compute dtype; float32 matches pytorch-fid.
      log_every: print progress every this many batches (0: never).
      log: where progress lines go.
    """

    def __init__(
        self,
        weights: str | Mapping[str, Any],
        batch_size: int = 50,
        dtype: Any = jnp.float32,
        log_every: int = 20,
        log: Callable[[str], None] = lambda s: print(s, flush=True),
    ):
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}.")
        self.weights_path = weights if isinstance(weights, str) else None
        variables = inception.load_variables(weights) if isinstance(weights, str) else weights
        self.variables = jax.device_put(variables)
        self.batch_size = batch_size
        self.log_every = log_every
        self.log = log
        self._apply = jax.jit(inception.InceptionV3(dtype=dtype).apply)

    def __call__(self, images: Images) -> np.ndarray:
        """uint8 / [0, 1] float images, [N, H, W, 3] or an iterable of such arrays -> [N, 2048]."""
        out: list[np.ndarray] = []
        pending: tuple[jax.Array, int] | None = None
        start = time.perf_counter()
        done = batches = 0
        for batch, n in _batches(images, self.batch_size):
            # Dispatch this batch before fetching the previous one, so the host's next batch
            # is prepared while the device computes.
            features = self._apply(self.variables, batch)
            if pending is not None:
                out.append(np.asarray(pending[0])[: pending[1]])
            pending = (features, n)
            done += n
            batches += 1
            if self.log_every and batches % self.log_every == 0:
                rate = done / (time.perf_counter() - start)
                self.log(f"[fid] {done} images, {rate:.1f} images/s")
        if pending is not None:
            out.append(np.asarray(pending[0])[: pending[1]])
        if not out:
            raise UsageError("No images were given.")
        return np.concatenate(out)


def cache_key(*parts: str | int, weights: str) -> str:
    """A file-name-safe key for reference statistics: the parts plus the weights file's hash.

    Give everything that changes the images: dataset, split, count, resolution and crop.
    """
    digest = inception.sha256(weights)[:12]
    key = "-".join(str(p) for p in (*parts, f"inception{digest}"))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key)


def reference_statistics(
    extractor: FeatureExtractor,
    images: Callable[[], Images],
    cache_dir: str,
    key: str,
) -> Statistics:
    """Statistics of a reference set, read from `<cache_dir>/<key>.npz` or computed and saved.

    Args:
      extractor: the feature extractor.
      images: called only on a cache miss; returns the images (an array or an iterable of
        batches), so a cached run never touches the dataset.
      cache_dir: directory of the cache files.
      key: from `cache_key`; a different key never reuses another's file.
    """
    path = storage.join(cache_dir, f"{key}.npz")
    if storage.exists(path):
        stats, stored = Statistics.load(path)
        if stored and stored != key:
            raise UsageError(f"{path} holds statistics for {stored!r}, not {key!r}.")
        extractor.log(f"[fid] reference statistics from {path} ({stats.count} images)")
        return stats
    stats = statistics(extractor(images()))
    stats.save(path, key)  # Creates cache_dir if needed.
    extractor.log(f"[fid] wrote reference statistics of {stats.count} images to {path}")
    return stats


def fid(extractor: FeatureExtractor, images: Images, reference: Statistics) -> float:
    """FID of `images` (uint8 or [0, 1] float, [N, H, W, 3] or batches of it) to `reference`."""
    return frechet_distance(statistics(extractor(images)), reference)
