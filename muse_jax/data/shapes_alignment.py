"""Pixel-based text-image alignment checker for the shapes world: the renderer read backwards.

Verifies each attribute a caption states (colour, shape, size, position,
relation, object count) directly from pixels, so alignment of generated images
can be measured without a learned model. Pixels are snapped to the nearest
palette colour (or black background) and smoothed by a 3x3 majority vote;
connected components smaller than a fraction of the canvas are ignored as
specks, the others are the objects, and the largest is "the" object of a
one-object caption. Measurements are in canvas fractions, so any image size
works.

Shape is read by comparison with what the renderer would draw: each ideal shape
(`shapes.shape_mask`, the renderer's geometry, seen through the same majority filter) is
fitted to the hole-filled component around its bounding box and its moments,
and the intersection-over-union of the best fit is its score. The component is
that shape only if the best score is high and clearly above the runner-up;
otherwise its shape is "none", which is wrong for every caption. A nearest-
prototype classifier would give every blob some shape, so a ragged square-ish
blob could pass for a circle; generated images (blur, ragged or blocky edges,
specks, holes, split objects) need a reading that can say "no shape".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from muse_jax.data.shapes import COLORS, SHAPES, parse_caption, shape_mask
from muse_jax.errors import UsageError

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position", "relation", "count")
# `Blob.shape` of a component that matches no shape well enough.
NO_SHAPE = "none"

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
# Shape reading: a component is the shape it fits best only if that fit's IoU
# is at least SHAPE_MIN_IOU and beats the runner-up by SHAPE_MIN_MARGIN. Clean
# renderings fit their own shape almost exactly at 32 and 64 px; the bar sits
# where ragged edges, one-token steps and notches still pass while fused
# shapes, halves and lumpy blobs fail (tests/test_alignment.py measures both).
SHAPE_MIN_IOU = 0.8
# A circle and a square of the same box fit each other's renderings far better
# than a triangle fits either, so a blob between them (a rounded square, a
# square with chipped corners) is told apart only by the margin: it is neither.
SHAPE_MIN_MARGIN = 0.03
# Fit search around each initial guess: centre shifts and size factors, as
# fractions of the extent (covers the bounding box being a pixel or two off
# after noise or the majority filter trims an apex).
_FIT_OFFSETS = (-0.04, 0.0, 0.04)
_FIT_SCALES = (0.94, 1.0, 1.06)
# Area / extent**2, and the centroid's offset below the bounding-box centre /
# extent, of each ideal shape (for the moment-based initial guess).
_SHAPE_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
_SHAPE_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6}


@dataclasses.dataclass(frozen=True)
class Blob:
    """Measurements of one connected component, in canvas fractions.

    Attributes:
      color: Palette colour name.
      area: Pixel count / canvas pixels.
      cx, cy: Bounding-box centre (triangles' centroids sit low, bbox does not).
      extent: max(bbox width, bbox height).
      shape: The best-fitting of SHAPES, or NO_SHAPE when none fits well.
      shape_fit: IoU of the best fit of each of SHAPES, in that order.
    """

    color: str
    area: float
    cx: float
    cy: float
    extent: float
    shape: str
    shape_fit: tuple[float, ...] = ()


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


def _majority3(masks: np.ndarray) -> np.ndarray:
    """`majority_filter` for one object on background, on a stack of masks [..., H, W]."""
    h, w = masks.shape[-2:]
    pad = [(0, 0)] * (masks.ndim - 2) + [(1, 1), (1, 1)]
    p = np.pad(masks, pad).astype(np.uint8)
    votes = sum(p[..., i : i + h, j : j + w] for i in range(3) for j in range(3))
    return votes >= 5


def shape_fit(mask: np.ndarray) -> dict[str, float]:
    """IoU of the best fit of each ideal shape to a cropped, hole-filled component mask [h, w].

    Candidates are centred on the bounding box (side = its longer side) and on
    the mask's centroid (side from its area), each shifted and scaled a little;
    they are passed through the same 3x3 majority vote as the image, so a clean
    rendering (whose corners and apex the vote trims) matches its own shape.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    area = len(ys)
    grid = np.array(np.meshgrid(_FIT_OFFSETS, _FIT_OFFSETS, _FIT_SCALES, indexing="ij"))
    ox, oy, sc = (g.ravel()[None, :] for g in grid)  # [1, C]
    out: dict[str, float] = {}
    for shape in SHAPES:
        side_m = np.sqrt(area / _SHAPE_AREA[shape])
        guesses = np.array(
            [
                (w / 2, h / 2, max(h, w)),
                (xs.mean() + 0.5, ys.mean() + 0.5 - _SHAPE_CENTROID_DY[shape] * side_m, side_m),
            ]
        )
        gx, gy, gs = (guesses[:, i : i + 1] for i in range(3))  # [G, 1]
        cx, cy, ext = (gx + ox * gs).ravel(), (gy + oy * gs).ravel(), (gs * sc).ravel()
        # Pad the crop so that every candidate lies inside it: pixels of a candidate
        # outside the crop would be missing from the union.
        reach = max(
            0.0,
            float(np.max(ext / 2 - cx)),
            float(np.max(cx + ext / 2 - w)),
            float(np.max(ext / 2 - cy)),
            float(np.max(cy + ext / 2 - h)),
        )
        pad = int(np.ceil(reach)) + 1
        m = np.pad(mask, pad)
        x = (np.arange(m.shape[1]) + 0.5 - pad)[None, None, :]
        y = (np.arange(m.shape[0]) + 0.5 - pad)[None, :, None]
        cand = shape_mask(shape, x, y, cx[:, None, None], cy[:, None, None], ext[:, None, None])
        ideal = _majority3(cand)
        inter = (ideal & m).sum((1, 2))
        union = (ideal | m).sum((1, 2))
        out[shape] = float((inter / np.maximum(union, 1)).max())
    return out


def read_shape(fit: dict[str, float]) -> str:
    """The shape of a `shape_fit` result: the best fit if good and unambiguous, else NO_SHAPE."""
    ranked = sorted(fit.values(), reverse=True)
    best = max(fit, key=fit.get)
    if ranked[0] >= SHAPE_MIN_IOU and ranked[0] - ranked[1] >= SHAPE_MIN_MARGIN:
        return best
    return NO_SHAPE


def find_blobs(image: np.ndarray) -> list[Blob]:
    """All non-speck components (the image's objects), largest first."""
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
            fit = shape_fit(crop)
            blobs.append(
                Blob(
                    color=_NAMES[k],
                    area=float(crop.sum()) / n_pix,
                    cx=(xs.start + xs.stop) / 2 / w,
                    cy=(ys.start + ys.stop) / 2 / h,
                    extent=max(bh / h, bw / w),
                    shape=read_shape(fit),
                    shape_fit=tuple(fit[s] for s in SHAPES),
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
    are True only if both objects are right. 'count' is True iff the image
    holds exactly as many non-speck components (of any colour) as the caption
    states objects: a stray second object, or one object split in two, fails
    it; specks below the speck threshold do not count.

    Args:
      image: [H, W, 3] uint8 (or float in [0, 255]), any size.
      caption: Caption in the shapes grammar.

    Returns:
      {attribute: bool} for 'color', 'shape', 'size', 'position', 'count'
      (single object) or 'color', 'shape', 'relation', 'count' (two objects).

    Raises:
      ValueError: If the caption is outside the grammar.
    """
    p = parse_caption(caption)
    blobs = find_blobs(image)
    count = len(blobs) == len(p.colors)
    if p.relation is None:
        if not blobs:
            return {**{k: False for k in p.attributes}, "count": False}
        obj = blobs[0]
        size = "large" if obj.extent >= SIZE_THRESHOLD else "small"
        return {
            "color": obj.color == p.colors[0],
            "shape": obj.shape == p.shapes[0],
            "size": size == p.size,
            "position": _position_of(obj) == p.position,
            "count": count,
        }
    found: list[Blob | None] = [next((b for b in blobs if b.color == c), None) for c in p.colors]
    a, b = found
    return {
        "color": a is not None and b is not None,
        "shape": all(o is not None and o.shape == s for o, s in zip(found, p.shapes)),
        "relation": a is not None and b is not None and _relation_holds(a, b, p.relation),
        "count": count,
    }


def score(images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str]) -> dict[str, float]:
    """Alignment accuracy of images against their captions.

    Args:
      images: [N, H, W, 3] array or sequence of [H, W, 3] images.
      captions: N captions.

    Returns:
      Accuracy for each of ATTRIBUTES over the captions stating it (NaN if
      none does, so the key set is fixed), 'all' = fraction of images with
      every stated attribute right (count included), and 'n' = N.
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
    out["n"] = float(len(captions))
    return out


def score_or_empty(images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str]):
    """`score`, or {} when a caption is outside the shapes grammar (it cannot be checked)."""
    try:
        return score(images, captions)
    except ValueError:
        return {}
