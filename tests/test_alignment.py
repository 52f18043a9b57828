"""Tests for the pixel-based text-image alignment checker.

Besides clean renderings, the checker is exercised on the defects generated
images show: blur (the base stage), ragged edges, blocky edges (VQ tokens are
4x4 pixels at 64 px and the super-res model works in 2x2-token blocks), stray
specks of other colours, holes, and objects split in two or merged with a
second shape. For each degradation and image size a confusion matrix of true
shape -> read shape (circle, square, triangle, none) is measured on random
single-object scenes of every shape and both sizes. Shape-preserving
degradations must keep the diagonal high; shape-destroying ones must not read
as the original shape. `python tests/test_alignment.py` prints every matrix.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import numpy as np
import pytest
from scipy import ndimage

from muse_jax.data import shapes
from muse_jax.data import shapes_alignment as alignment

N = 400
SIZES = (32, 64)
READ = (*shapes.SHAPES, alignment.NO_SHAPE)
# Scenes per confusion matrix: every (shape, size) pair equally often.
N_DEGRADED = 240


def _dataset(size: int, n: int = N, seed: int = 0):
    ex = [shapes.generate_example(seed, "test", i, image_size=size) for i in range(n)]
    return np.stack([e[0] for e in ex]), [e[1] for e in ex]


# ----------------------------------------------------------------------------- degradations
# Each takes a single-object scene, an image size and a seeded generator and returns an
# [S, S, 3] image. Pixel amounts are given at 32 px and scaled with the image, so a scene
# degraded at 32 and at 64 px is the same picture at two resolutions.

Degradation = Callable[[shapes.Scene, int, np.random.Generator], np.ndarray]


def _paint(mask: np.ndarray, color: str) -> np.ndarray:
    img = np.zeros((*mask.shape, 3), np.uint8)
    img[mask] = shapes.COLORS[color]
    return img


def _mask(scene: shapes.Scene, size: int) -> np.ndarray:
    return shapes.object_mask(scene.objects[0], size)


def _ragged_mask(mask: np.ndarray, size: int, rng: np.random.Generator, p: float) -> np.ndarray:
    """Flips each pixel within one (32-px) pixel of the boundary with probability p."""
    r = size // 32
    band = ndimage.binary_dilation(mask, iterations=r) & ~ndimage.binary_erosion(mask, iterations=r)
    return mask ^ (band & (rng.random(mask.shape) < p))


def _blockify(mask: np.ndarray, block: int) -> np.ndarray:
    """Downsamples to blocks (a block is set if at least half its pixels are) and back, nearest."""
    h, w = mask.shape
    coarse = mask.reshape(h // block, block, w // block, block).mean((1, 3)) >= 0.5
    return np.repeat(np.repeat(coarse, block, 0), block, 1)


def clean(scene, size, rng):
    return shapes.render(scene, size)


def blur(scene, size, rng):
    """Gaussian blur, sigma one (32-px) pixel."""
    sigma = size / 32
    img = ndimage.gaussian_filter(shapes.render(scene, size).astype(np.float32), (sigma, sigma, 0))
    return np.clip(img, 0, 255)


def ragged(scene, size, rng):
    """A fifth of the pixels in a one-pixel band around the boundary flipped."""
    return _paint(_ragged_mask(_mask(scene, size), size, rng, 0.2), scene.objects[0].color)


def blocky_token(scene, size, rng):
    """Edges in steps of one VQ token (4 px at 64 px, 2 px at 32 px)."""
    return _paint(_blockify(_mask(scene, size), size // 16), scene.objects[0].color)


def blocky(scene, size, rng):
    """Edges in steps of 2x2 tokens (8 px at 64, 4 px at 32): a small object is 2-3 blocks."""
    return _paint(_blockify(_mask(scene, size), size // 8), scene.objects[0].color)


def ragged_blocky(scene, size, rng):
    """Blocky (2x2 tokens) and then ragged: the ragged, blocky blobs of weak samples."""
    m = _ragged_mask(_blockify(_mask(scene, size), size // 8), size, rng, 0.35)
    return _paint(m, scene.objects[0].color)


def specks(scene, size, rng):
    """Six 1-3 px dots of other palette colours in the background, apart from each other."""
    img = shapes.render(scene, size)
    obj = scene.objects[0]
    taken = _mask(scene, size)
    others = [c for c in shapes.COLORS if c != obj.color]
    for _ in range(6):
        d = int(rng.integers(1, 4))
        for _ in range(50):
            y, x = rng.integers(1, size - d, 2)
            if not taken[y - 1 : y + d + 1, x - 1 : x + d + 1].any():
                break
        img[y : y + d, x : x + d] = shapes.COLORS[others[rng.integers(len(others))]]
        taken[y : y + d, x : x + d] = True
    return img


def holes(scene, size, rng):
    """Three black holes of 1-2 (32-px) pixels inside the object, walls at least 2 pixels."""
    img = shapes.render(scene, size)
    r = size // 32
    inner = ndimage.binary_erosion(_mask(scene, size), iterations=2 * r)
    for _ in range(3):
        d = int(rng.integers(1, 3)) * r
        # Top-left corners whose d x d hole stays inside `inner`.
        ok = ndimage.binary_erosion(inner, np.ones((d, d), bool), origin=-(d // 2))
        ys, xs = np.nonzero(ok)
        if len(ys):
            i = rng.integers(len(ys))
            img[ys[i] : ys[i] + d, xs[i] : xs[i] + d] = 0
    return img


def merged(scene, size, rng):
    """The object fused with a second random shape of its size, centres 0.45-0.7 extents apart."""
    obj = scene.objects[0]
    angle = rng.uniform(0, 2 * np.pi)
    dist = rng.uniform(0.45, 0.7) * obj.extent
    other = dataclasses.replace(
        obj,
        shape=shapes.SHAPES[rng.integers(len(shapes.SHAPES))],
        cx=obj.cx + dist * np.cos(angle),
        cy=obj.cy + dist * np.sin(angle),
    )
    return _paint(_mask(scene, size) | shapes.object_mask(other, size), obj.color)


def halved(scene, size, rng):
    """Only the left or the right half of the object."""
    m = _mask(scene, size)
    ys, xs = np.nonzero(m)
    keep = xs < np.median(xs) if rng.random() < 0.5 else xs > np.median(xs)
    half = np.zeros_like(m)
    half[ys[keep], xs[keep]] = True
    return _paint(half, scene.objects[0].color)


def blob(scene, size, rng):
    """The object's outline pushed in and out by smooth noise: a lumpy blob of its size."""
    obj = scene.objects[0]
    m = _mask(scene, size)
    noise = ndimage.gaussian_filter(rng.normal(size=m.shape), size / 12)
    signed = ndimage.distance_transform_edt(m) - ndimage.distance_transform_edt(~m)
    field = signed / (obj.extent * size) + 0.225 * noise / noise.std()
    lab, n = ndimage.label(field > 0)
    out = lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1 if n else field > 0
    return _paint(out, obj.color)


# Defects that leave the shape recognisable, and ones that destroy it.
MILD: dict[str, Degradation] = {
    "clean": clean,
    "blur": blur,
    "ragged": ragged,
    "blocky_token": blocky_token,
    "specks": specks,
    "holes": holes,
}
DESTROYING: dict[str, Degradation] = {"merged": merged, "halved": halved, "blob": blob}
DEGRADATIONS: dict[str, Degradation] = {
    **MILD,
    "blocky": blocky,
    "ragged_blocky": ragged_blocky,
    **DESTROYING,
}


def _scenes(n: int, seed: int) -> list[shapes.Scene]:
    """n random single-object scenes cycling through every (shape, size) pair."""
    rng = np.random.default_rng(seed)
    pairs = [(s, z) for s in shapes.SHAPES for z in shapes.SIZES]
    out = []
    for i in range(n):
        shape, size = pairs[i % len(pairs)]
        color = list(shapes.COLORS)[rng.integers(len(shapes.COLORS))]
        pos = shapes.POSITIONS[rng.integers(len(shapes.POSITIONS))]
        out.append(shapes.scene_from_caption(f"a {size} {color} {shape} {pos}", rng))
    return out


def _read_shape(image: np.ndarray) -> str:
    blobs = alignment.find_blobs(image)
    return blobs[0].shape if blobs else alignment.NO_SHAPE


@functools.cache
def _readings(name: str, size: int) -> tuple[tuple[str, str, str], ...]:
    """(true shape, object size, read shape) of each degraded scene.

    Deterministic: scenes from seed 0, the degradation's randomness from seed 1.
    """
    rng = np.random.default_rng(1)
    out = []
    for scene in _scenes(N_DEGRADED, seed=0):
        obj = scene.objects[0]
        out.append((obj.shape, obj.size, _read_shape(DEGRADATIONS[name](scene, size, rng))))
    return tuple(out)


def confusion(name: str, size: int, obj_size: str | None = None) -> np.ndarray:
    """Row-normalised [3, 4] matrix true shape (SHAPES) -> read shape (READ) under a degradation.

    `obj_size` ("small" or "large") restricts it to objects of that size.
    """
    counts = np.zeros((len(shapes.SHAPES), len(READ)))
    for shape, z, read in _readings(name, size):
        if obj_size is None or z == obj_size:
            counts[shapes.SHAPES.index(shape), READ.index(read)] += 1
    return counts / counts.sum(1, keepdims=True)


def format_confusion(m: np.ndarray, title: str = "") -> str:
    head = f"{title:<22}" + "".join(f"{r:>9}" for r in READ)
    rows = [
        f"{'  ' + s:<22}" + "".join(f"{v:9.2f}" for v in row) for s, row in zip(shapes.SHAPES, m)
    ]
    return "\n".join([head, *rows])


def _shape_acc(name: str, size: int, obj_size: str | None = None) -> np.ndarray:
    return confusion(name, size, obj_size).diagonal()


# ----------------------------------------------------------------------------- clean renders


@pytest.mark.parametrize("size", SIZES)
def test_real_images_score_high(size):
    images, captions = _dataset(size)
    res = alignment.score(images, captions)
    assert res["n"] == N
    for key in (*alignment.ATTRIBUTES, "all"):
        assert res[key] >= 0.98, (key, res)


@pytest.mark.parametrize("size", SIZES)
def test_shuffled_captions_score_near_chance(size):
    images, captions = _dataset(size)
    perm = np.random.default_rng(0).permutation(N)
    res = alignment.score(images, [captions[j] for j in perm])
    assert res["all"] < 0.1
    assert res["color"] < 0.25  # chance for 7 colours is ~0.14
    assert res["shape"] < 0.5 and res["position"] < 0.4 and res["relation"] < 0.2


def test_noise_keeps_score_high():
    images, captions = _dataset(32, seed=1)
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 20, images.shape), 0, 255)
    res = alignment.score(noisy, captions)
    for key in (*alignment.ATTRIBUTES, "all"):
        assert res[key] >= 0.95, (key, res)


def test_each_attribute_is_checked_independently():
    rng = np.random.default_rng(0)
    text = "a large red triangle on the left"
    base = shapes.scene_from_caption(text, rng)
    assert all(alignment.check(shapes.render(base, 32), text).values())
    (obj,) = base.objects
    variants = {
        "color": dataclasses.replace(obj, color="blue"),
        "shape": dataclasses.replace(obj, shape="square"),
        "size": dataclasses.replace(obj, size="small"),
        "position": dataclasses.replace(obj, cx=0.75),
    }
    for attr, wrong in variants.items():
        res = alignment.check(
            shapes.render(shapes.Scene(objects=(wrong,), position=base.position), 32), text
        )
        want = {k: k != attr for k in ("color", "shape", "size", "position", "count")}
        assert res == want, (attr, res)


def test_two_object_checks():
    text = "a green circle above a white square"
    scene = shapes.scene_from_caption(text, np.random.default_rng(0))
    img = shapes.render(scene, 64)
    want = {"color": True, "shape": True, "relation": True, "count": True}
    assert alignment.check(img, text) == want
    assert alignment.check(img, "a white square above a green circle")["relation"] is False
    assert alignment.check(img, "a green circle left of a white square")["relation"] is False
    res = alignment.check(img, "a green triangle above a white square")
    assert res["color"] and not res["shape"]
    res = alignment.check(img, "a red circle above a white square")
    assert not res["color"] and not res["relation"]


def test_blank_image_fails_everything():
    res = alignment.check(np.zeros((32, 32, 3), np.uint8), "a small cyan circle in the center")
    assert res == {"color": False, "shape": False, "size": False, "position": False, "count": False}


def test_invalid_captions_raise():
    img = np.zeros((32, 32, 3), np.uint8)
    for bad in ("a purple circle on the left", "two red squares", "a small red circle somewhere"):
        with pytest.raises(ValueError):
            alignment.check(img, bad)
    with pytest.raises(ValueError):
        alignment.score([img], ["a small red circle on the left", "a small red circle on the left"])


def test_score_reports_unstated_attributes_as_nan():
    images, captions = _dataset(32, n=60)
    singles = [
        (im, c) for im, c in zip(images, captions) if "left of" not in c and "above" not in c
    ]
    res = alignment.score([im for im, _ in singles], [c for _, c in singles])
    assert math.isnan(res["relation"]) and res["n"] == len(singles)
    assert res["all"] == 1.0 and res["count"] == 1.0


def test_ideal_shapes_are_the_renderers():
    """The geometry the checker fits (`shapes.shape_mask`) is what `shapes.object_mask` draws,
    pixel centres in canvas fractions."""
    rng = np.random.default_rng(0)
    for size in SIZES:
        coords = (np.arange(size) + 0.5) / size
        for _ in range(60):
            obj = shapes.sample_scene(rng, two_object_prob=0.0).objects[0]
            got = shapes.shape_mask(
                obj.shape, coords[None, :], coords[:, None], obj.cx, obj.cy, obj.extent
            )
            np.testing.assert_array_equal(got, shapes.object_mask(obj, size))


# ----------------------------------------------------------------------------- degraded shapes

# Lowest per-row diagonal (true shape read as itself) each shape-preserving degradation must
# keep at 32 and 64 px: a few points under what the deterministic scenes measure. The weak
# cells are small (10 px) squares at 32 px, whose corners are what tells them from circles.
MILD_MIN_DIAGONAL: dict[str, tuple[float, float]] = {
    "clean": (0.99, 0.99),
    "blur": (0.99, 0.99),
    "ragged": (0.9, 0.97),
    "blocky_token": (0.87, 0.92),
    "specks": (0.99, 0.99),
    "holes": (0.99, 0.99),
}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", list(MILD))
def test_mild_degradations_keep_the_shape(name, size):
    m = confusion(name, size)
    bound = MILD_MIN_DIAGONAL[name][SIZES.index(size)]
    msg = f"diagonal < {bound}\n" + format_confusion(m, f"{name} {size}px")
    assert m.diagonal().min() >= bound, msg


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", list(DESTROYING))
def test_destroyed_shapes_do_not_read_as_the_original(name, size):
    m = confusion(name, size)
    msg = format_confusion(m, f"{name} {size}px")
    # The true shape is read in a minority of cases (a lumpy blob or a fused pair can
    # still look like one of the shapes), and most blobs read as no shape at all.
    assert m.diagonal().max() <= 0.3, msg
    assert m[:, READ.index(alignment.NO_SHAPE)].mean() >= 0.75, msg


def test_blocky_edges_do_not_invent_circles_or_triangles():
    """Steps of 2x2 tokens leave a small object 2-3 blocks wide: a block square, not a circle.

    The reading may be "none" (a large square can come out as a 4x5-block rectangle or lose
    a corner block), but a square never reads as a circle and no blocky circle or square
    reads as a triangle.
    """
    for size in SIZES:
        m = confusion("blocky", size)
        msg = format_confusion(m, f"blocky {size}px")
        c, s, t = (shapes.SHAPES.index(k) for k in ("circle", "square", "triangle"))
        assert m[s, c] <= 0.02 and m[s, t] <= 0.02, msg
        assert m[c, t] <= 0.02, msg
        assert m[s, s] >= 0.35, msg
        small = confusion("blocky", size, "small")
        assert small[c, c] <= 0.1, msg + "\nsmall objects:\n" + format_confusion(small)


def test_ragged_blocky_squares_do_not_read_as_circles():
    """The reported failure: a ragged, blocky square-ish blob scored as a circle."""
    c, s = shapes.SHAPES.index("circle"), shapes.SHAPES.index("square")
    for size in SIZES:
        m = confusion("ragged_blocky", size)
        assert m[s, c] <= 0.03, format_confusion(m, f"ragged_blocky {size}px")
        small = confusion("ragged_blocky", size, "small")
        assert small[c, c] <= 0.1, format_confusion(small, f"ragged_blocky {size}px, small")


# A cascade sample for "a large blue circle on the left", redrawn in 4-pixel blocks: a
# blocky square-ish blob with chipped corners and stubs.
_SQUARISH_BLOB = (
    "................",
    "................",
    ".##..#..........",
    ".##..######.....",
    ".#########......",
    ".##########.....",
    ".##########.....",
    ".##########.....",
    ".##########.....",
    ".##########.....",
    ".#########......",
    ".########.......",
    ".##...###.......",
    ".#..............",
    "................",
    "................",
)


def test_ragged_square_blob_fails_only_the_circle_shape():
    blocks = np.array([[ch == "#" for ch in row] for row in _SQUARISH_BLOB])
    mask = np.repeat(np.repeat(blocks, 4, 0), 4, 1)
    text = "a large blue circle on the left"
    for seed in range(20):
        rng = np.random.default_rng(seed)
        image = _paint(_ragged_mask(mask, 64, rng, 0.35), "blue")
        (blob,) = alignment.find_blobs(image)
        assert blob.shape in ("square", alignment.NO_SHAPE), (seed, blob)
        res = alignment.check(image, text)
        want = {"color": True, "shape": False, "size": True, "position": True, "count": True}
        assert res == want, (seed, res, blob)


# ----------------------------------------------------------------------------- object count


@pytest.mark.parametrize("size", SIZES)
def test_split_object_counts_two(size):
    """An object cut in two by a black line is two objects: wrong for a one-object caption."""
    rng = np.random.default_rng(0)
    for text in ("a large red circle in the center", "a large green square on the left"):
        scene = shapes.scene_from_caption(text, rng)
        image = shapes.render(scene, size)
        assert alignment.check(image, text)["count"]
        col = int(scene.objects[0].cx * size)
        image[:, col - size // 32 : col + size // 32] = 0
        blobs = alignment.find_blobs(image)
        assert len(blobs) == 2 and blobs[0].color == blobs[1].color, blobs
        res = alignment.check(image, text)
        assert not res["count"] and not res["shape"], res
        assert alignment.score([image], [text])["all"] == 0.0


@pytest.mark.parametrize("size", SIZES)
def test_specks_do_not_count(size):
    rng = np.random.default_rng(2)
    for scene in _scenes(36, seed=3):
        image = specks(scene, size, rng)
        assert len(alignment.find_blobs(image)) == 1
        assert alignment.check(image, shapes.caption(scene))["count"]


def test_an_extra_object_counts():
    """A patch of another colour above the speck threshold is a second object."""
    text = "a small red square on the left"
    image = shapes.render(shapes.scene_from_caption(text, np.random.default_rng(0)), 64)
    patch = int(np.ceil(np.sqrt(alignment.MIN_AREA_FRAC * 64 * 64)))
    image[50 : 50 + patch, 50 : 50 + patch] = shapes.COLORS["green"]
    res = alignment.check(image, text)
    assert res == {"color": True, "shape": True, "size": True, "position": True, "count": False}
    image[50 : 50 + patch, 50 : 50 + patch] = 0
    image[50 : 50 + patch - 2, 50 : 50 + patch - 2] = shapes.COLORS["green"]
    assert alignment.check(image, text)["count"]


@pytest.mark.parametrize("size", SIZES)
def test_two_object_scenes_count_two(size):
    images, captions = _dataset(size, n=120, seed=2)
    pairs = [(im, c) for im, c in zip(images, captions) if "left of" in c or "above" in c]
    assert len(pairs) >= 20
    for image, text in pairs:
        assert len(alignment.find_blobs(image)) == 2
        assert alignment.check(image, text)["count"]
    # One of the two objects drawn: one object, wrong count (and colour) for the caption.
    text = pairs[0][1]
    scene = shapes.scene_from_caption(text, np.random.default_rng(0))
    alone = shapes.render(dataclasses.replace(scene, objects=scene.objects[:1]), size)
    res = alignment.check(alone, text)
    assert not res["count"] and not res["color"], res


def print_confusions() -> None:
    """Prints every degradation's confusion matrix at both sizes (and split by object size)."""
    for name in DEGRADATIONS:
        for size in SIZES:
            print(format_confusion(confusion(name, size), f"{name} {size}px"))
            per_size = {z: _shape_acc(name, size, z).round(2).tolist() for z in shapes.SIZES}
            print(f"  diagonal by object size: {per_size}\n")


if __name__ == "__main__":
    print_confusions()
