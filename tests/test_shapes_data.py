"""Tests for the procedural shapes world and its TFDS builder."""

from __future__ import annotations

import numpy as np
import pytest

from muse_jax.data import shapes

HELD_OUT = ("red triangle", "blue square", "green circle")


def _objects_combos(text: str) -> set[str]:
    p = shapes.parse_caption(text)
    return {f"{c} {s}" for c, s in zip(p.colors, p.shapes)}


def test_same_seed_and_index_is_deterministic():
    for i in range(20):
        a_img, a_cap = shapes.generate_example(3, "train", i)
        b_img, b_cap = shapes.generate_example(3, "train", i)
        assert a_cap == b_cap
        np.testing.assert_array_equal(a_img, b_img)


def test_different_seeds_and_splits_differ():
    caps0 = [shapes.generate_example(0, "train", i)[1] for i in range(30)]
    caps1 = [shapes.generate_example(1, "train", i)[1] for i in range(30)]
    caps_test = [shapes.generate_example(0, "test", i)[1] for i in range(30)]
    assert caps0 != caps1
    assert caps0 != caps_test
    imgs0 = np.stack([shapes.generate_example(0, "train", i)[0] for i in range(30)])
    imgs1 = np.stack([shapes.generate_example(1, "train", i)[0] for i in range(30)])
    assert not np.array_equal(imgs0, imgs1)


def test_sample_scene_excludes_held_out_and_mixes_scene_types():
    rng = np.random.default_rng(0)
    scenes = [shapes.sample_scene(rng, held_out=HELD_OUT, two_object_prob=0.3) for _ in range(2000)]
    combos = {o.combo for s in scenes for o in s.objects}
    assert combos.isdisjoint(HELD_OUT)
    assert len(combos) == 21 - len(HELD_OUT)
    frac_two = np.mean([len(s.objects) == 2 for s in scenes])
    assert 0.25 < frac_two < 0.35
    for s in scenes:
        if s.relation is not None:
            a, b = s.objects
            assert a.color != b.color and a.size == b.size == "small"
    rng = np.random.default_rng(0)
    allowed = {
        o.combo
        for _ in range(2000)
        for o in shapes.sample_scene(rng, held_out=HELD_OUT, exclude_held_out=False).objects
    }
    assert set(HELD_OUT) <= allowed


def test_unknown_held_out_combo_raises():
    with pytest.raises(ValueError, match="held-out"):
        shapes.sample_scene(np.random.default_rng(0), held_out=["purple hexagon"])


def test_caption_roundtrip_and_grammar():
    rng = np.random.default_rng(1)
    vocab = set(shapes.vocabulary_words())
    for _ in range(300):
        scene = shapes.sample_scene(rng, two_object_prob=0.5)
        text = shapes.caption(scene)
        assert set(text.split()) <= vocab
        p = shapes.parse_caption(text)
        assert p.colors == tuple(o.color for o in scene.objects)
        assert p.shapes == tuple(o.shape for o in scene.objects)
        assert p.relation == scene.relation and p.position == scene.position
        again = shapes.scene_from_caption(text, rng)
        assert shapes.caption(again) == text
    caps = shapes.all_single_object_captions()
    assert len(caps) == len(set(caps)) == 2 * 7 * 3 * 5
    assert "a large red circle on the left" in caps


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a purple circle on the left",
        "a large red circle",
        "a red circle left of a red square",
        "red circle",
    ],
)
def test_invalid_captions_raise(bad):
    with pytest.raises(ValueError):
        shapes.parse_caption(bad)
    with pytest.raises(ValueError):
        shapes.scene_from_caption(bad, np.random.default_rng(0))


@pytest.mark.parametrize("size", [32, 64])
def test_pixels_agree_with_caption(size):
    rng = np.random.default_rng(2)
    palette = {tuple(v) for v in shapes.COLORS.values()} | {(0, 0, 0)}
    for _ in range(200):
        scene = shapes.sample_scene(rng, two_object_prob=0.3)
        img = shapes.render(scene, size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        assert {tuple(v) for v in img.reshape(-1, 3)} <= palette  # hard edges, exact colours
        centroids = []
        for obj in scene.objects:
            mask = np.all(img == shapes.COLORS[obj.color], axis=-1)
            assert mask.sum() > 0.03 * size * size
            ys, xs = np.nonzero(mask)
            # Fully inside: no pixel of the object touches the border.
            assert ys.min() > 0 and xs.min() > 0 and ys.max() < size - 1 and xs.max() < size - 1
            bbox_cx = (xs.min() + xs.max() + 1) / 2 / size
            bbox_cy = (ys.min() + ys.max() + 1) / 2 / size
            centroids.append((bbox_cx, bbox_cy))
            assert abs(bbox_cx - obj.cx) < 1.5 / size and abs(bbox_cy - obj.cy) < 1.5 / size
        if scene.relation == "left of":
            assert centroids[1][0] - centroids[0][0] > 0.3
        elif scene.relation == "above":
            assert centroids[1][1] - centroids[0][1] > 0.3
        else:
            ax, ay = shapes.POSITION_ANCHORS[scene.position]
            cx, cy = centroids[0]
            # Nearest anchor is the stated one.
            nearest = min(
                shapes.POSITIONS,
                key=lambda p: np.hypot(*np.subtract(shapes.POSITION_ANCHORS[p], (cx, cy))),
            )
            assert nearest == scene.position, (scene, cx, cy, ax, ay)


def test_render_is_resolution_independent():
    scene = shapes.scene_from_caption(
        "a large yellow triangle at the top", np.random.default_rng(0)
    )
    small = shapes.render(scene, 32).astype(np.float32)
    big = shapes.render(scene, 64).astype(np.float32)
    down = big.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.mean(np.abs(down - small) > 1) < 0.05  # only edge pixels differ
    fill32 = np.mean(small.any(-1))
    fill64 = np.mean(big.any(-1))
    assert abs(fill32 - fill64) < 0.02


def test_shapes_have_expected_fill():
    rng = np.random.default_rng(0)
    for shape, fill in (("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)):
        scene = shapes.scene_from_caption(f"a large white {shape} in the center", rng)
        mask = shapes.render(scene, 64).any(-1)
        ys, xs = np.nonzero(mask)
        bbox = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert abs(mask.sum() / bbox - fill) < 0.06


# ----------------------------------------------------------------- TFDS builder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    shapes_tfds = pytest.importorskip("muse_jax.data.shapes_tfds")
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = shapes_tfds.make_builder(
        str(data_dir), image_size=32, num_train=200, num_test=50, seed=5, held_out=HELD_OUT
    )
    builder.download_and_prepare()
    return shapes_tfds, builder, data_dir


def _records(builder, split):
    return list(builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator())


def test_tfds_records_match_numpy_generator(built):
    _, builder, _ = built
    train, test = _records(builder, "train"), _records(builder, "test")
    assert len(train) == 200 and len(test) == 50
    for split, recs in (("train", train), ("test", test)):
        for i in (0, 1, 17, len(recs) - 1):
            img, cap = shapes.generate_example(5, split, i, image_size=32, held_out=HELD_OUT)
            assert recs[i]["caption"].decode() == cap
            np.testing.assert_array_equal(recs[i]["image"], img)


def test_tfds_held_out_only_in_test(built):
    _, builder, _ = built
    train_combos = set().union(
        *(_objects_combos(r["caption"].decode()) for r in _records(builder, "train"))
    )
    test_combos = set().union(
        *(_objects_combos(r["caption"].decode()) for r in _records(builder, "test"))
    )
    assert train_combos.isdisjoint(HELD_OUT)
    assert test_combos & set(HELD_OUT)


def test_tfds_config_name_tracks_parameters(built):
    shapes_tfds, builder, data_dir = built
    same = shapes_tfds.make_builder(
        str(data_dir),
        image_size=32,
        num_train=200,
        num_test=50,
        seed=5,
        held_out=tuple(reversed(HELD_OUT)),
    )
    assert same.builder_config.name == builder.builder_config.name
    assert same.is_prepared()  # equivalent parameters reuse the built data
    names = {builder.builder_config.name}
    for change in (
        dict(image_size=64),
        dict(num_train=201),
        dict(num_test=51),
        dict(seed=6),
        dict(held_out=HELD_OUT[:2]),
        dict(two_object_prob=0.5),
    ):
        kwargs = dict(image_size=32, num_train=200, num_test=50, seed=5, held_out=HELD_OUT) | change
        other = shapes_tfds.make_builder(str(data_dir), **kwargs)
        assert other.builder_config.name not in names, change
        assert not other.is_prepared()
        names.add(other.builder_config.name)
    default = shapes_tfds.make_builder(str(data_dir))
    assert default.info.features["image"].shape == (32, 32, 3)
