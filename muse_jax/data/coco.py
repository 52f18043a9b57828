"""COCO captions from the official files, and the zero-shot COCO-30k caption set.

Layout (as unpacked from cocodataset.org; nothing is downloaded here):
  <source_dir>/annotations/captions_train2017.json   -> split 'train', images in train2017/
  <source_dir>/annotations/captions_val2017.json     -> split 'test',  images in val2017/
(`year="2014"` reads the 2014 files, whose val2014 is what COCO-30k is usually drawn from.)
One record per image keeps all its captions (usually 5), in annotation-id order: training draws
one per example per epoch, evaluation pairs are drawn by `coco30k_pairs`.
`source_dir` may be local or on `gs://` (read via `muse_jax.storage`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from muse_jax import storage
from muse_jax.data.records import RawRecord, read_or_none
from muse_jax.errors import UsageError

_SPLIT_PREFIX = {"train": "train", "test": "val"}


def annotation_file(source_dir: str, split: str, year: str) -> str:
    return storage.join(source_dir, "annotations", f"captions_{_SPLIT_PREFIX[split]}{year}.json")


def image_dir(source_dir: str, split: str, year: str) -> str:
    return storage.join(source_dir, f"{_SPLIT_PREFIX[split]}{year}")


def check_source(source_dir: str, year: str) -> None:
    """ValueError naming the first missing piece of the COCO layout."""
    if not storage.isdir(source_dir):
        raise UsageError(f"COCO source directory {source_dir!r} does not exist.")
    for split in _SPLIT_PREFIX:
        for path in (annotation_file(source_dir, split, year), image_dir(source_dir, split, year)):
            if not storage.exists(path):
                raise UsageError(f"COCO source directory {source_dir!r} has no {path!r}.")


def fingerprint(source_dir: str, year: str) -> list:
    """Annotation files' names and sizes: new annotations build a new dataset."""
    paths = [annotation_file(source_dir, s, year) for s in _SPLIT_PREFIX]
    return [(os.path.basename(p), storage.size(p)) for p in paths]


def load_annotations(path: str) -> list[tuple[str, str, list[str]]]:
    """[(image id, file name, captions)] sorted by image id; captions in annotation-id order.

    Read with `surrogateescape` so that one undecodable caption becomes a skipped record rather
    than a failed build.
    """
    data = json.loads(storage.read_bytes(path).decode("utf-8", errors="surrogateescape"))
    files = {}
    for im in data.get("images", []):
        files.setdefault(int(im["id"]), im["file_name"])  # First wins: ids are unique keys.
    captions: dict[int, list[tuple[int, str]]] = {i: [] for i in files}
    for ann in data.get("annotations", []):
        if int(ann["image_id"]) in captions:
            captions[int(ann["image_id"])].append((int(ann.get("id", 0)), ann.get("caption")))
    return [
        (str(i), files[i], [c for _, c in sorted(captions[i], key=lambda t: t[0])])
        for i in sorted(files)
    ]


def iter_records(source_dir: str, split: str, year: str) -> Iterator[RawRecord]:
    folder = image_dir(source_dir, split, year)
    for image_id, file_name, captions in load_annotations(annotation_file(source_dir, split, year)):
        data = read_or_none(storage.join(folder, file_name))
        yield RawRecord(image_id, data, [c for c in captions if isinstance(c, str)])


class CaptionPair(NamedTuple):
    image_id: str
    caption: str


def sample_pairs(
    images: list[tuple[str, list[str]]], num: int = 30_000, seed: int = 0
) -> list[CaptionPair]:
    """`num` (image, caption) pairs drawn deterministically from [(image id, captions)].

    With `num` <= the number of images (COCO-30k from val2014's 40,504): `num` distinct images,
    one random caption each, the usual zero-shot protocol. Otherwise distinct pairs from all
    captions (val2017 has 5,000 images and ~25k pairs); more than exist is a ValueError.
    The draw depends only on (ids, captions, num, seed), not on the storage order.
    """
    images = sorted(images, key=lambda t: t[0])
    rng = np.random.default_rng(seed)
    if num <= len(images):
        picks = rng.choice(len(images), size=num, replace=False)
        out = []
        for i in picks:
            image_id, caps = images[i]
            out.append(CaptionPair(image_id, caps[int(rng.integers(len(caps)))]))
        return out
    pairs = [CaptionPair(i, c) for i, caps in images for c in caps]
    if num > len(pairs):
        raise UsageError(f"Asked for {num} caption pairs; the split has only {len(pairs)}.")
    return [pairs[i] for i in rng.choice(len(pairs), size=num, replace=False)]


def coco30k_pairs(builder, split: str = "test", num: int = 30_000, seed: int = 0):
    """The zero-shot COCO caption set from a built COCO dataset (bad records already dropped):
    `sample_pairs` over the split's (id, captions). Images are not decoded."""
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders=tfds.decode.PartialDecoding({"id": True, "captions": True}),
    )
    images = [(ex["id"].decode(), [c.decode() for c in ex["captions"]]) for ex in tfds.as_numpy(ds)]
    return sample_pairs(images, num=num, seed=seed)
