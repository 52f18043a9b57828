"""Tests for the pixel-based text-image alignment checker."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from muse_jax.data import shapes
from muse_jax.data import shapes_alignment as alignment

N = 400


def _dataset(size: int, n: int = N, seed: int = 0):
    ex = [shapes.generate_example(seed, "test", i, image_size=size) for i in range(n)]
    return np.stack([e[0] for e in ex]), [e[1] for e in ex]


@pytest.mark.parametrize("size", [32, 64])
def test_real_images_score_high(size):
    images, captions = _dataset(size)
    res = alignment.score(images, captions)
    assert res["count"] == N
    for key in (*alignment.ATTRIBUTES, "all"):
        assert res[key] >= 0.98, (key, res)


@pytest.mark.parametrize("size", [32, 64])
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
        assert res == {k: k != attr for k in ("color", "shape", "size", "position")}, (attr, res)


def test_two_object_checks():
    text = "a green circle above a white square"
    scene = shapes.scene_from_caption(text, np.random.default_rng(0))
    img = shapes.render(scene, 64)
    assert alignment.check(img, text) == {"color": True, "shape": True, "relation": True}
    assert alignment.check(img, "a white square above a green circle")["relation"] is False
    assert alignment.check(img, "a green circle left of a white square")["relation"] is False
    res = alignment.check(img, "a green triangle above a white square")
    assert res["color"] and not res["shape"]
    res = alignment.check(img, "a red circle above a white square")
    assert not res["color"] and not res["relation"]


def test_blank_image_fails_everything():
    res = alignment.check(np.zeros((32, 32, 3), np.uint8), "a small cyan circle in the center")
    assert res == {"color": False, "shape": False, "size": False, "position": False}


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
    assert math.isnan(res["relation"]) and res["count"] == len(singles)
    assert res["all"] == 1.0
