"""Procedural "coloured shapes" world: scene sampling, captions and rendering.

The world is small enough that every caption attribute (colour, shape, size,
position, relation) can be verified from pixels (see `muse_jax.data.shapes_alignment`),
which lets us measure text-image alignment and compositional generalisation
(held-out colour-shape combinations) without a learned evaluator.

Geometry lives in continuous [0, 1] coordinates (x to the right, y downwards)
and is rasterised by testing pixel centres, so a scene rendered at 32 px and at
64 px is the same picture at different resolutions. Rendering uses hard edges
and exact palette colours so pixels can be classified by nearest colour.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Collection, Sequence

import numpy as np

from muse_jax.errors import UsageError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "on the left",
    "on the right",
    "at the top",
    "at the bottom",
    "in the center",
)
RELATIONS: tuple[str, ...] = ("left of", "above")

# Object extent (circle diameter, square side, triangle base and height) as a
# fraction of the canvas side. Far apart so size is unambiguous at 32 px.
SIZE_EXTENT: dict[str, float] = {"small": 0.32, "large": 0.55}
# Nominal object centre for each position phrase, (cx, cy).
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
    "in the center": (0.5, 0.5),
}
POSITION_JITTER = 0.04
# Gap kept between an object and the canvas border, in canvas fractions.
BORDER_MARGIN = 0.02

SPLIT_IDS: dict[str, int] = {"train": 0, "test": 1}


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object; (cx, cy) is its bounding-box centre in [0, 1] canvas units."""

    color: str
    shape: str
    size: str
    cx: float
    cy: float

    @property
    def extent(self) -> float:
        """Side of the object's bounding box as a canvas fraction."""
        return SIZE_EXTENT[self.size]

    @property
    def combo(self) -> str:
        """The "color shape" string used for held-out combinations."""
        return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """A single object with a position phrase, or two objects with a relation.

    For two-object scenes `objects[0]` is the relation's subject: it is left
    of / above `objects[1]`.
    """

    objects: tuple[ShapeObject, ...]
    position: str | None = None
    relation: str | None = None


@dataclasses.dataclass(frozen=True)
class ParsedCaption:
    """Attributes a caption states; per-object tuples are in caption order."""

    colors: tuple[str, ...]
    shapes: tuple[str, ...]
    size: str | None = None
    position: str | None = None
    relation: str | None = None

    @property
    def attributes(self) -> tuple[str, ...]:
        """Names of the attributes the caption states (alignment-check keys)."""
        if self.relation is not None:
            return ("color", "shape", "relation")
        return ("color", "shape", "size", "position")


def all_combos() -> list[str]:
    """Every "color shape" combination, e.g. "red triangle"."""
    return [f"{c} {s}" for c, s in itertools.product(COLORS, SHAPES)]


def normalize_held_out(held_out: Collection[str]) -> frozenset[str]:
    """Validates held-out combos so a typo cannot silently hold out nothing."""
    valid = set(all_combos())
    norm = frozenset(" ".join(h.lower().split()) for h in held_out)
    bad = sorted(norm - valid)
    if bad:
        raise UsageError(
            f"Unknown held-out combination(s) {bad}; expected 'color shape' from {sorted(valid)}"
        )
    return norm


def _clamp_center(v: float, extent: float) -> float:
    """Keeps an object of the given extent fully inside the canvas."""
    half = extent / 2 + BORDER_MARGIN
    return float(np.clip(v, half, 1.0 - half))


def _single_layout(rng: np.random.Generator, size: str, position: str) -> tuple[float, float]:
    ax, ay = POSITION_ANCHORS[position]
    ext = SIZE_EXTENT[size]
    cx = _clamp_center(ax + rng.uniform(-POSITION_JITTER, POSITION_JITTER), ext)
    cy = _clamp_center(ay + rng.uniform(-POSITION_JITTER, POSITION_JITTER), ext)
    return cx, cy


def _pair_layout(
    rng: np.random.Generator, relation: str
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres for (subject, object) of two small objects with the relation clearly true.

    Along the relation axis the centres are >= 0.4 apart (objects are 0.32
    wide, so they never overlap); across it they differ by at most 0.12.
    """
    ext = SIZE_EXTENT["small"]
    near = rng.uniform(0.18, 0.30)
    far = rng.uniform(0.70, 0.82)
    base = rng.uniform(0.25, 0.75)
    off_a = _clamp_center(base + rng.uniform(-0.06, 0.06), ext)
    off_b = _clamp_center(base + rng.uniform(-0.06, 0.06), ext)
    if relation == "left of":
        return (near, off_a), (far, off_b)
    if relation == "above":
        return (off_a, near), (off_b, far)
    raise UsageError(f"Unknown relation {relation!r}; expected one of {RELATIONS}")


def sample_scene(
    rng: np.random.Generator,
    *,
    held_out: Collection[str] = (),
    exclude_held_out: bool = True,
    two_object_prob: float = 0.3,
) -> Scene:
    """Samples a random scene.

    Args:
      rng: Source of randomness (the scene is a pure function of its state).
      held_out: "color shape" combinations withheld from training.
      exclude_held_out: If True no object uses a held-out combination.
      two_object_prob: Probability of a two-object relational scene.

    Returns:
      The sampled `Scene`.
    """
    held = normalize_held_out(held_out)
    combos = [c for c in all_combos() if not (exclude_held_out and c in held)]
    if not combos:
        raise UsageError("Every colour-shape combination is held out")
    if rng.random() < two_object_prob:
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        first = combos[rng.integers(len(combos))]
        color_a, shape_a = first.split()
        rest = [c for c in combos if c.split()[0] != color_a]
        if not rest:
            raise UsageError("Held-out set leaves no pair of differently coloured objects")
        color_b, shape_b = rest[rng.integers(len(rest))].split()
        (xa, ya), (xb, yb) = _pair_layout(rng, relation)
        objs = (
            ShapeObject(color_a, shape_a, "small", xa, ya),
            ShapeObject(color_b, shape_b, "small", xb, yb),
        )
        return Scene(objects=objs, relation=relation)
    color, shape = combos[rng.integers(len(combos))].split()
    size = SIZES[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    cx, cy = _single_layout(rng, size, position)
    return Scene(objects=(ShapeObject(color, shape, size, cx, cy),), position=position)


def caption(scene: Scene) -> str:
    """Plain-English caption of a scene (inverse of `parse_caption`)."""
    if scene.relation is not None:
        a, b = scene.objects
        return f"a {a.color} {a.shape} {scene.relation} a {b.color} {b.shape}"
    (o,) = scene.objects
    return f"a {o.size} {o.color} {o.shape} {scene.position}"


_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_SINGLE_RE = re.compile(
    rf"a (?P<size>{'|'.join(SIZES)}) (?P<color>{_COLOR_RE}) (?P<shape>{_SHAPE_RE}) "
    rf"(?P<position>{'|'.join(POSITIONS)})"
)
_PAIR_RE = re.compile(
    rf"a (?P<ca>{_COLOR_RE}) (?P<sa>{_SHAPE_RE}) (?P<rel>{'|'.join(RELATIONS)}) "
    rf"a (?P<cb>{_COLOR_RE}) (?P<sb>{_SHAPE_RE})"
)


def parse_caption(text: str) -> ParsedCaption:
    """Parses a caption of the grammar (case and extra whitespace tolerated).

    Raises:
      ValueError: If the text is outside the grammar, or a two-object caption
        gives both objects the same colour (undistinguishable in pixels).
    """
    norm = " ".join(text.lower().split()).rstrip(".")
    if m := _SINGLE_RE.fullmatch(norm):
        return ParsedCaption(
            colors=(m["color"],), shapes=(m["shape"],), size=m["size"], position=m["position"]
        )
    if m := _PAIR_RE.fullmatch(norm):
        if m["ca"] == m["cb"]:
            raise UsageError(f"Two-object caption needs two different colours: {text!r}")
        return ParsedCaption(
            colors=(m["ca"], m["cb"]), shapes=(m["sa"], m["sb"]), relation=m["rel"]
        )
    raise UsageError(
        f"Caption {text!r} is outside the shapes grammar: expected "
        "'a {size} {color} {shape} {position}' or 'a {color} {shape} {left of|above} a {color} {shape}'"
    )


def in_grammar(text: str) -> bool:
    """Whether `parse_caption` reads the text (the pixel checker can score it)."""
    try:
        parse_caption(text)
    except UsageError:
        return False
    return True


def scene_from_caption(text: str, rng: np.random.Generator) -> Scene:
    """Samples a layout matching a caption (e.g. reference images for eval prompts)."""
    p = parse_caption(text)
    if p.relation is not None:
        (xa, ya), (xb, yb) = _pair_layout(rng, p.relation)
        objs = (
            ShapeObject(p.colors[0], p.shapes[0], "small", xa, ya),
            ShapeObject(p.colors[1], p.shapes[1], "small", xb, yb),
        )
        return Scene(objects=objs, relation=p.relation)
    assert p.size is not None and p.position is not None
    cx, cy = _single_layout(rng, p.size, p.position)
    return Scene(
        objects=(ShapeObject(p.colors[0], p.shapes[0], p.size, cx, cy),), position=p.position
    )


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray, cx, cy, extent) -> np.ndarray:
    """Whether points (x, y) lie inside `shape` with bounding-box centre (cx, cy) and side
    `extent` (canvas fractions or pixels alike). Triangles point up: the half-width grows by
    0.5 per unit of depth, so base width == height == extent. Arguments broadcast, so one call
    can test many candidate shapes (the alignment checker's fits)."""
    half = extent / 2
    dx = x - cx
    dy = y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        depth = dy + half
        return (depth >= 0) & (dy <= half) & (np.abs(dx) <= depth / 2)
    raise UsageError(f"Unknown shape {shape!r}; expected one of {SHAPES}")


def object_mask(obj: ShapeObject, image_size: int) -> np.ndarray:
    """Boolean [H, W] mask of pixels whose centre lies inside the object."""
    coords = (np.arange(image_size, dtype=np.float64) + 0.5) / image_size
    return shape_mask(obj.shape, coords[None, :], coords[:, None], obj.cx, obj.cy, obj.extent)


def render(scene: Scene, image_size: int) -> np.ndarray:
    """Rasterises a scene on a black canvas.

    Args:
      scene: Scene to draw.
      image_size: Side in pixels (>= 32 keeps shapes distinguishable).

    Returns:
      uint8 [image_size, image_size, 3] with exact palette colours.
    """
    img = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    for obj in scene.objects:
        img[object_mask(obj, image_size)] = COLORS[obj.color]
    return img


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """RNG for example `index` of `split`: examples depend on (seed, split, index) only."""
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def generate_example(
    seed: int,
    split: str,
    index: int,
    *,
    image_size: int = 32,
    held_out: Collection[str] = (),
    two_object_prob: float = 0.3,
) -> tuple[np.ndarray, str]:
    """Example `index` of a dataset split; 'train' excludes held-out combos, 'test' does not.

    Returns:
      (uint8 image [S, S, 3], caption).
    """
    scene = example_scene(seed, split, index, held_out=held_out, two_object_prob=two_object_prob)
    return render(scene, image_size), caption(scene)


def example_scene(
    seed: int,
    split: str,
    index: int,
    *,
    held_out: Collection[str] = (),
    two_object_prob: float = 0.3,
) -> Scene:
    """The scene of example `index`: render it at several sizes for low/high-res pairs."""
    return sample_scene(
        example_rng(seed, split, index),
        held_out=held_out,
        exclude_held_out=(split == "train"),
        two_object_prob=two_object_prob,
    )


def vocabulary_words() -> list[str]:
    """Every word the grammar can produce, sorted (for a word-level tokenizer)."""
    phrases: Sequence[str] = ("a", *COLORS, *SHAPES, *SIZES, *POSITIONS, *RELATIONS)
    return sorted({w for p in phrases for w in p.split()})


def all_single_object_captions() -> list[str]:
    """All 210 single-object captions, in a fixed order (eval prompt lists)."""
    return [
        f"a {size} {color} {shape} {pos}"
        for size, color, shape, pos in itertools.product(SIZES, COLORS, SHAPES, POSITIONS)
    ]
