"""Pixel-based text-image alignment checker for the shapes world: the renderer read backwards.

Verifies each attribute a caption states (colour, shape, size, position,
relation) directly from pixels, so alignment of generated images can be
measured without a learned model. Pixels are snapped to the nearest palette
colour (or black background); connected components smaller than a fraction of
the canvas are ignored as specks, and the largest component is taken as the
object. Measurements are in canvas fractions, so any image size works.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from muse_jax.data.shapes import COLORS, parse_caption
from muse_jax.errors import UsageError

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position", "relation")

_NAMES: tuple[str, ...] = ("background", *COLORS)
_PALETTE = np.array([(0, 0, 0), *COLORS.values()], dtype=np.float32)  # [K+1, 3]

# Components smaller than this fraction of the canvas are treated as noise
# (a small triangle covers ~5%).
MIN_AREA_FRAC = 0.01
# Bounding-box extent separating small (0.32) from large (0.55) objects.
SIZE_THRESHOLD = 0.435
# Centre offset from the canvas middle below which an object is "in the center".
CENTER_RADIUS = 0.11
# Minimum centre separation along the relation axis.
RELATION_MIN_GAP = 0.15
# Shape prototypes in (bbox fill ratio, top/bottom width asymmetry) space.
_SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "circle": (np.pi / 4, 0.0),
    "square": (1.0, 0.0),
    "triangle": (0.5, 0.75),
}


@dataclasses.dataclass(frozen=True)
class Blob:
    """Measurements of one connected component, in canvas fractions.

    Attributes:
      color: Palette colour name.
      area: Pixel count / canvas pixels.
      cx, cy: Bounding-box centre (triangles' centroids sit low, bbox does not).
      extent: max(bbox width, bbox height).
      shape: Nearest shape prototype.
    """

    color: str
    area: float
    cx: float
    cy: float
    extent: float
    shape: str


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Nearest-palette label per pixel: 0 background, i>0 the i-th colour of COLORS.

    Args:
      image: [H, W, 3] uint8, or float in [0, 255].

    Returns:
      int [H, W] labels.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise UsageError(f"Expected an [H, W, 3] image, got shape {img.shape}")
    d = ((img[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    return np.argmin(d, axis=-1)


def majority_filter(labels: np.ndarray) -> np.ndarray:
    """Replaces each label by the most common label in its 3x3 neighbourhood.

    Smooths ragged edges and removes isolated flipped pixels in noisy or
    blurry generated images; on clean renders it only trims one-pixel corners.
    """
    counts = np.stack(
        [
            ndimage.uniform_filter((labels == k).astype(np.float32), size=3, mode="constant")
            for k in range(len(_NAMES))
        ]
    )
    return np.argmax(counts, axis=0)


def _shape_of(mask: np.ndarray) -> str:
    """Classifies a cropped, hole-filled component mask [h, w] by geometry.

    Fill ratio of the bounding box separates square (1.0) from circle (~0.79)
    and triangle (0.5); the row-width profile (narrow top, wide bottom) makes
    triangles stand out even when noise eats into the fill ratio.
    """
    h, w = mask.shape
    fill = mask.mean()
    widths = mask.sum(axis=1) / w
    q = max(1, h // 4)
    asym = widths[-q:].mean() - widths[:q].mean()
    feats = np.array([fill, asym])
    dists = {s: np.linalg.norm(feats - np.array(p)) for s, p in _SHAPE_PROTOTYPES.items()}
    return min(dists, key=dists.get)


def find_blobs(image: np.ndarray) -> list[Blob]:
    """All non-speck components, largest first."""
    labels = majority_filter(classify_pixels(image))
    h, w = labels.shape
    n_pix = h * w
    min_pixels = max(2, int(MIN_AREA_FRAC * n_pix))
    blobs: list[Blob] = []
    for k in range(1, len(_NAMES)):
        comp, n = ndimage.label(labels == k)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        slices = ndimage.find_objects(comp)
        for idx in np.flatnonzero(sizes >= min_pixels):
            sl = slices[idx]
            crop = ndimage.binary_fill_holes(comp[sl] == idx + 1)
            ys, xs = sl
            bh, bw = ys.stop - ys.start, xs.stop - xs.start
            blobs.append(
                Blob(
                    color=_NAMES[k],
                    area=float(crop.sum()) / n_pix,
                    cx=(xs.start + xs.stop) / 2 / w,
                    cy=(ys.start + ys.stop) / 2 / h,
                    extent=max(bh / h, bw / w),
                    shape=_shape_of(crop),
                )
            )
    blobs.sort(key=lambda b: b.area, reverse=True)
    return blobs


def _position_of(blob: Blob) -> str:
    dx, dy = blob.cx - 0.5, blob.cy - 0.5
    if max(abs(dx), abs(dy)) < CENTER_RADIUS:
        return "in the center"
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def _relation_holds(a: Blob, b: Blob, relation: str) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if relation == "left of":
        return dx > RELATION_MIN_GAP and dx > abs(dy)
    if relation == "above":
        return dy > RELATION_MIN_GAP and dy > abs(dx)
    raise ValueError(f"Unknown relation {relation!r}")


def check(image: np.ndarray, caption: str) -> dict[str, bool]:
    """Checks each attribute the caption states against the pixels.

    Single-object captions: shape/size/position are measured on the largest
    object whatever its colour, and colour is that object's colour, so each
    attribute is scored independently (e.g. a blue triangle for "red triangle"
    gets the shape right and the colour wrong). Two-object captions: each
    object is the largest component of its stated colour; 'color' and 'shape'
    are True only if both objects are right.

    Args:
      image: [H, W, 3] uint8 (or float in [0, 255]), any size.
      caption: Caption in the shapes grammar.

    Returns:
      {attribute: bool} for 'color', 'shape', 'size', 'position' (single
      object) or 'color', 'shape', 'relation' (two objects).

    Raises:
      ValueError: If the caption is outside the grammar.
    """
    p = parse_caption(caption)
    blobs = find_blobs(image)
    if p.relation is None:
        if not blobs:
            return {k: False for k in p.attributes}
        obj = blobs[0]
        size = "large" if obj.extent >= SIZE_THRESHOLD else "small"
        return {
            "color": obj.color == p.colors[0],
            "shape": obj.shape == p.shapes[0],
            "size": size == p.size,
            "position": _position_of(obj) == p.position,
        }
    found: list[Blob | None] = [next((b for b in blobs if b.color == c), None) for c in p.colors]
    a, b = found
    return {
        "color": a is not None and b is not None,
        "shape": all(o is not None and o.shape == s for o, s in zip(found, p.shapes)),
        "relation": a is not None and b is not None and _relation_holds(a, b, p.relation),
    }


def score(images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str]) -> dict[str, float]:
    """Alignment accuracy of images against their captions.

    Args:
      images: [N, H, W, 3] array or sequence of [H, W, 3] images.
      captions: N captions.

    Returns:
      Accuracy for each of ATTRIBUTES over the captions stating it (NaN if
      none does, so the key set is fixed), 'all' = fraction of images with
      every stated attribute right, and 'count' = N.
    """
    if len(images) != len(captions):
        raise UsageError(f"{len(images)} images but {len(captions)} captions")
    hits: dict[str, list[bool]] = {k: [] for k in ATTRIBUTES}
    all_ok: list[bool] = []
    for img, cap in zip(images, captions):
        res = check(np.asarray(img), cap)
        for k, v in res.items():
            hits[k].append(v)
        all_ok.append(all(res.values()))
    out = {k: (float(np.mean(v)) if v else float("nan")) for k, v in hits.items()}
    out["all"] = float(np.mean(all_ok)) if all_ok else float("nan")
    out["count"] = float(len(captions))
    return out


def score_or_empty(images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str]):
    """`score`, or {} when a caption is outside the shapes grammar (it cannot be checked)."""
    try:
        return score(images, captions)
    except ValueError:
        return {}
