"""Users' own data: TFDS builders from real files, bad records, preprocessing, exact resume.

Every dataset here is written by the test itself (real JPEG/PNG encodings, real tar shards,
real parquet, real COCO-format JSON), built through TFDS and read back through tf.data.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from muse_jax.data import coco, image_text_tfds, ordering, preprocessing, records, tasks
from tests.helpers import ROOT, run_module

# ------------------------------------------------------------------------------ file helpers


def _smooth(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A colour ramp: survives JPEG within a few levels, and every image differs."""
    y = np.linspace(0, 1, h)[:, None, None]
    x = np.linspace(0, 1, w)[None, :, None]
    base, dy, dx = rng.uniform(60, 195, 3), rng.uniform(-50, 50, 3), rng.uniform(-50, 50, 3)
    return np.clip(base + dy * y + dx * x, 0, 255).astype(np.uint8)


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _truncated_jpeg(rng) -> bytes:
    return _encode(_smooth(rng, 40, 50), "JPEG")[:200]


def _build(source_format: str, source_dir, data_dir, **kw) -> image_text_tfds.ImageTextBuilder:
    params = image_text_tfds.source_params(source_format, str(source_dir), **kw)
    builder = image_text_tfds.make_builder(str(data_dir), params)
    image_text_tfds.prepare(builder)
    return builder


def _records(builder, split: str) -> dict[str, dict]:
    ds = builder.as_dataset(
        split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
    )
    return {ex["id"].decode(): ex for ex in tfds.as_numpy(ds)}


def _all_records(builder) -> dict[str, dict]:
    return _records(builder, "train") | _records(builder, "test")


def _pixels(ex: dict) -> np.ndarray:
    return tf.io.decode_image(ex["image"], channels=3).numpy()


def _skipped(builder) -> dict[str, int]:
    """Skip counts summed over both splits, non-zero only."""
    total: dict[str, int] = {}
    for counts in image_text_tfds.counts(builder).values():
        for k, v in counts.items():
            if k.startswith("skipped_") and v:
                total[k.removeprefix("skipped_")] = total.get(k.removeprefix("skipped_"), 0) + v
    return total


def _config(dataset: str, source_dir, data_dir, **data) -> ml_collections.ConfigDict:
    from configs import user_data

    config = user_data.get_config("smoke")
    config.data.update(
        dict(dataset=dataset, source_dir=str(source_dir), data_dir=str(data_dir), **data)
    )
    return config


def _write_folder(root, n: int, rng, prefix: str = "photo", sizes=None) -> dict[str, np.ndarray]:
    """n good images (alternating JPEG/PNG) + captions.csv with a header; returns the arrays."""
    os.makedirs(root, exist_ok=True)
    arrays, rows = {}, ["file,caption"]
    for i in range(n):
        h, w = sizes[i] if sizes else (int(rng.integers(36, 72)), int(rng.integers(36, 72)))
        name = f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        arrays[name] = _smooth(rng, h, w)
        with open(os.path.join(root, name), "wb") as f:
            f.write(_encode(arrays[name], "PNG" if i % 2 else "JPEG"))
        rows.append(f"{name},{prefix} number {i}")
    with open(os.path.join(root, "captions.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return arrays


# ----------------------------------------------------------------------- image folder + CSV


def test_image_folder_keeps_good_records_and_counts_bad_ones(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    arrays = _write_folder(src, 12, rng)
    (src / "zero.jpg").write_bytes(b"")
    (src / "truncated.jpg").write_bytes(_truncated_jpeg(rng))
    (src / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (src / "nocap.png").write_bytes(_encode(_smooth(rng, 40, 40), "PNG"))
    (src / "latin1.png").write_bytes(_encode(_smooth(rng, 40, 40), "PNG"))
    two = _smooth(rng, 44, 60)
    (src / "two.png").write_bytes(_encode(two, "PNG"))
    extra = (
        b"zero.jpg,an empty file\n"
        b"truncated.jpg,half a jpeg\n"
        b"garbage.png,not an image\n"
        b"absent.jpg,no such file\n"
        b"nocap.png\n"
        b"nocap.png,  \t \n"
        b"latin1.png,caf\xe9 au lait\n"
        b'two.png,"  first\tcaption,\x01 with  spaces "\n'
        b"two.png,second caption\n"
        b"two.png,d\xe9j\xe0 vu\n"
    )
    with open(src / "captions.csv", "ab") as f:
        f.write(extra)
    builder = _build("image_folder", src, tmp_path / "tfds", test_fraction=0.3)

    assert _skipped(builder) == {
        "empty_image": 1,
        "corrupt_image": 2,
        "missing_image": 1,
        "missing_caption": 1,
        "bad_caption_encoding": 1,
    }
    counts = image_text_tfds.counts(builder)
    assert sum(c["dropped_captions"] for c in counts.values()) == 1  # two.png's Latin-1 one.
    recs = _all_records(builder)
    assert set(recs) == set(arrays) | {"two.png"}
    for split in ("train", "test"):
        expected = {k for k in recs if records.in_test_split(k, 0.3) == (split == "test")}
        assert set(_records(builder, split)) == expected
        assert builder.info.splits[split].num_examples == counts[split]["kept"] == len(expected)
    assert 0 < len(_records(builder, "test")) < len(recs)
    for name, arr in arrays.items():
        ex = recs[name]
        assert (ex["width"], ex["height"]) == (arr.shape[1], arr.shape[0])
        assert [c.decode() for c in ex["captions"]] == [f"photo number {int(name[3:6])}"]
        err = np.abs(_pixels(ex).astype(int) - arr)
        if name.endswith(".png"):
            assert err.max() == 0
        else:
            assert err.mean() < 2.0 and err.max() < 16
    np.testing.assert_array_equal(_pixels(recs["two.png"]), two)
    # Cleaned: control characters and whitespace runs become one space, ends stripped.
    assert [c.decode() for c in recs["two.png"]["captions"]] == [
        "first caption, with spaces",
        "second caption",
    ]
    # The counts are the dataset's metadata: a fresh builder reads them back.
    params = image_text_tfds.source_params("image_folder", str(src), test_fraction=0.3)
    again = image_text_tfds.make_builder(str(tmp_path / "tfds"), params)
    assert again.is_prepared()
    assert image_text_tfds.counts(again) == counts


def test_tsv_without_header_and_reencoding(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    src.mkdir()
    big = _smooth(rng, 300, 400)
    gray = _smooth(rng, 30, 50)[..., 0]
    rgba = np.dstack([_smooth(rng, 30, 30), np.full((30, 30), 0, np.uint8)])
    (src / "big.jpg").write_bytes(_encode(big, "JPEG"))
    (src / "gray.png").write_bytes(_encode(gray, "PNG"))
    (src / "rgba.png").write_bytes(_encode(rgba, "PNG"))
    (src / "pic.bmp").write_bytes(_encode(big[:40, :40], "BMP"))
    (src / "captions.tsv").write_text(
        'big.jpg\ta "quoted" big one\ngray.png\tgray\nrgba.png\tclear\npic.bmp\tbitmap\n'
    )
    builder = _build("image_folder", src, tmp_path / "tfds", max_image_size=64, test_fraction=0)
    recs = _records(builder, "train")
    assert set(recs) == {"big.jpg", "gray.png", "rgba.png", "pic.bmp"}
    assert recs["big.jpg"]["captions"][0] == b'a "quoted" big one'  # TSV: no quote parsing.
    # Shorter side capped at 64 (aspect kept), re-encoded as JPEG; small ones stay as they were.
    assert (recs["big.jpg"]["width"], recs["big.jpg"]["height"]) == (85, 64)
    assert tf.io.is_jpeg(recs["big.jpg"]["image"]).numpy()
    small = tf.image.resize(big, (64, 85), antialias=True).numpy()
    assert np.abs(_pixels(recs["big.jpg"]) - small).mean() < 3
    assert recs["gray.png"]["image"] == (src / "gray.png").read_bytes()
    np.testing.assert_array_equal(_pixels(recs["gray.png"]), np.repeat(gray[..., None], 3, -1))
    # Transparent pixels become white, not black; BMP becomes PNG, losslessly.
    np.testing.assert_array_equal(_pixels(recs["rgba.png"]), np.full((30, 30, 3), 255))
    np.testing.assert_array_equal(_pixels(recs["pic.bmp"]), big[:40, :40])
    assert image_text_tfds.counts(builder)["train"]["reencoded"] == 3


# --------------------------------------------------------------------------------- img2dataset


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_img2dataset_webdataset_tars(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "src"
    src.mkdir()
    good = {}
    with tarfile.open(src / "00000.tar", "w") as tar:
        for i in range(6):
            key = f"{i:09d}"
            good[f"00000/{key}"] = arr = _smooth(rng, 40 + i, 50)
            _tar_add(tar, f"{key}.jpg", _encode(arr, "JPEG"))
            if i % 2:
                _tar_add(tar, f"{key}.txt", f"text caption {i}".encode())
            _tar_add(tar, f"{key}.json", json.dumps({"caption": f"json caption {i}"}).encode())
        _tar_add(tar, "000000006.jpg", b"")  # zero-size
        _tar_add(tar, "000000006.txt", b"empty image")
        _tar_add(tar, "000000007.jpg", _truncated_jpeg(rng))
        _tar_add(tar, "000000007.txt", b"truncated image")
        _tar_add(tar, "000000008.jpg", _encode(_smooth(rng, 40, 40), "JPEG"))
        _tar_add(tar, "000000008.json", json.dumps({"url": "http://x", "caption": None}).encode())
        _tar_add(tar, "000000009.jpg", _encode(_smooth(rng, 40, 40), "JPEG"))
        _tar_add(tar, "000000009.txt", b"\xff\xfe not utf-8")
        _tar_add(tar, "000000010.txt", b"caption without an image")
    # A second shard cut short mid-file: what precedes the cut is kept, the rest counted.
    with tarfile.open(tmp_path / "whole.tar", "w") as tar:
        for i in range(3):
            good_key = f"00001/{i:09d}"
            arr = _smooth(rng, 48, 48)
            if i < 2:
                good[good_key] = arr
            _tar_add(tar, f"{i:09d}.png", _encode(arr, "PNG"))
            _tar_add(tar, f"{i:09d}.txt", f"second shard {i}".encode())
    with tarfile.open(tmp_path / "whole.tar") as tar:
        last = tar.getmember("000000002.png")
        cut = last.offset_data + last.size // 2
    (src / "00001.tar").write_bytes((tmp_path / "whole.tar").read_bytes()[:cut])
    # img2dataset's metadata parquet beside the tars has no image column: ignored.
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": ["000000000"], "caption": ["meta"]}), src / "00000.parquet")

    builder = _build("img2dataset", src, tmp_path / "tfds", test_fraction=0.25)
    assert builder.builder_config.layout == "webdataset"
    assert _skipped(builder) == {
        "empty_image": 1,
        "corrupt_image": 1,
        "missing_caption": 1,
        "bad_caption_encoding": 1,
        "missing_image": 1,
        "corrupt_shard": 1,
    }
    recs = _all_records(builder)
    assert set(recs) == set(good)
    for key, arr in good.items():
        i = int(key[-1])
        want = (
            f"second shard {i}"
            if key.startswith("00001")
            else f"text caption {i}"
            if i % 2
            else f"json caption {i}"
        )
        assert [c.decode() for c in recs[key]["captions"]] == [want]
        assert np.abs(_pixels(recs[key]).astype(int) - arr).mean() < 2.0


def test_img2dataset_parquet_and_files_layouts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    arrays = [_smooth(rng, 40, 56) for _ in range(5)]
    table = pa.table(
        {
            "key": [f"{i:09d}" for i in range(7)],
            "caption": pa.array(
                [f"parquet {i}".encode() for i in range(5)] + [b"bad \xff", b"no image"],
                pa.binary(),
            ),
            "jpg": pa.array(
                [_encode(a, "JPEG") for a in arrays] + [_encode(arrays[0], "JPEG"), None],
                pa.binary(),
            ),
            "status": ["success"] * 7,
        }
    )
    (tmp_path / "pq").mkdir()
    pq.write_table(table, tmp_path / "pq" / "00000.parquet")
    builder = _build("img2dataset", tmp_path / "pq", tmp_path / "tfds", test_fraction=0)
    assert builder.builder_config.layout == "parquet"
    assert _skipped(builder) == {"bad_caption_encoding": 1, "missing_image": 1}
    recs = _records(builder, "train")
    assert sorted(recs) == [f"00000/{i:09d}" for i in range(5)]
    for i, arr in enumerate(arrays):
        assert recs[f"00000/{i:09d}"]["captions"][0] == f"parquet {i}".encode()
        assert np.abs(_pixels(recs[f"00000/{i:09d}"]).astype(int) - arr).mean() < 2.0

    files = tmp_path / "files" / "00003"
    files.mkdir(parents=True)
    for i, arr in enumerate(arrays[:3]):
        (files / f"{i:09d}.jpg").write_bytes(_encode(arr, "JPEG"))
        (files / f"{i:09d}.txt").write_text(f"files {i}")
    (files / "000000003.jpg").write_bytes(_encode(arrays[3], "JPEG"))  # No caption file.
    builder = _build("img2dataset", tmp_path / "files", tmp_path / "tfds", test_fraction=0)
    assert builder.builder_config.layout == "files"
    assert _skipped(builder) == {"missing_caption": 1}
    recs = _records(builder, "train")
    assert {k: v["captions"][0].decode() for k, v in recs.items()} == {
        f"00003/{i:09d}": f"files {i}" for i in range(3)
    }


# ----------------------------------------------------------------------------------------- COCO


def _write_coco(root, rng, year: str = "2017") -> dict[str, tuple[np.ndarray, list[str]]]:
    """train: 6 images (5 captions each) + bad ones; val: 4 images. Returns id -> (pixels, caps)."""
    (root / "annotations").mkdir(parents=True)
    expected, ann_id = {}, 1000
    for split, ids in (("train", range(1, 7)), ("val", range(101, 105))):
        folder = root / f"{split}{year}"
        folder.mkdir()
        images, anns = [], []
        for i in ids:
            arr = _smooth(rng, 40 + i % 7, 60)
            file_name = f"{i:012d}.jpg"
            (folder / file_name).write_bytes(_encode(arr, "JPEG"))
            images.append({"id": i, "file_name": file_name, "width": 60, "height": arr.shape[0]})
            caps = [f"image {i} caption {j}" for j in range(5)]
            # Annotation ids descend while captions are listed in order: sorting must use ids.
            for j, cap in enumerate(caps):
                anns.append({"id": ann_id - j, "image_id": i, "caption": cap + " \n"})
            ann_id += 10
            expected[str(i)] = (arr, caps[::-1])
        if split == "train":
            images.append({"id": 50, "file_name": "missing.jpg"})
            anns.append({"id": 1, "image_id": 50, "caption": "a missing file"})
            (folder / "corrupt.jpg").write_bytes(_truncated_jpeg(rng))
            images.append({"id": 51, "file_name": "corrupt.jpg"})
            anns.append({"id": 2, "image_id": 51, "caption": "a corrupt file"})
            (folder / "uncaptioned.jpg").write_bytes(_encode(_smooth(rng, 40, 40), "JPEG"))
            images.append({"id": 52, "file_name": "uncaptioned.jpg"})
        (root / "annotations" / f"captions_{split}{year}.json").write_text(
            json.dumps({"images": images, "annotations": anns})
        )
    return expected


def test_coco_captions_and_the_30k_caption_set(tmp_path):
    rng = np.random.default_rng(4)
    expected = _write_coco(tmp_path / "coco", rng)
    builder = _build("coco", tmp_path / "coco", tmp_path / "tfds")
    assert _skipped(builder) == {"missing_image": 1, "corrupt_image": 1, "missing_caption": 1}
    train, test = _records(builder, "train"), _records(builder, "test")
    assert set(train) == {str(i) for i in range(1, 7)}
    assert set(test) == {str(i) for i in range(101, 105)}
    for image_id, ex in {**train, **test}.items():
        arr, caps = expected[image_id]
        assert [c.decode() for c in ex["captions"]] == caps  # all 5, annotation-id order
        assert np.abs(_pixels(ex).astype(int) - arr).mean() < 2.0

    pairs = coco.coco30k_pairs(builder, "test", num=3, seed=0)
    assert pairs == coco.coco30k_pairs(builder, "test", num=3, seed=0)
    assert len({p.image_id for p in pairs}) == 3  # distinct images when num <= #images
    for p in pairs:
        assert p.caption in expected[p.image_id][1]
    more = coco.coco30k_pairs(builder, "test", num=12, seed=0)  # > images: distinct pairs
    assert len(set(more)) == 12
    draws = {tuple(coco.coco30k_pairs(builder, "test", num=3, seed=s)) for s in range(6)}
    assert len(draws) > 1
    with pytest.raises(ValueError, match="only 20"):
        coco.coco30k_pairs(builder, "test", num=21)
    # Storage order does not matter: the draw sorts by id first.
    images = [(i, expected[i][1]) for i in sorted(expected)]
    assert coco.sample_pairs(images, 4, seed=3) == coco.sample_pairs(images[::-1], 4, seed=3)


# ------------------------------------------------------------------------------ preprocessing


def test_centre_crop_is_exact_and_random_crops_are_windows():
    # 60 wide, 40 high, every column a different value: a crop is identified by its columns.
    cols = np.arange(60, dtype=np.uint8) * 4
    arr = np.broadcast_to(cols[None, :, None], (40, 60, 3)).copy()
    arr[..., 1] = np.arange(40, dtype=np.uint8)[:, None] * 5
    ex = {
        "image": tf.constant(_encode(arr, "PNG")),
        "width": tf.constant(60, tf.int32),
        "height": tf.constant(40, tf.int32),
        "captions": tf.constant(["first", "second"]),
    }
    out = preprocessing.prepare_image_text(ex, image_size=40)
    np.testing.assert_array_equal(out["image"].numpy(), arr[:, 10:50])
    assert out["caption"].numpy() == b"first"
    offsets, captions = set(), set()
    for s in range(40):
        out = preprocessing.prepare_image_text({**ex, "seed": tf.constant([7, s], tf.int64)}, 40)
        x0 = int(out["image"].numpy()[0, 0, 0]) // 4
        np.testing.assert_array_equal(out["image"].numpy(), arr[:, x0 : x0 + 40])
        offsets.add(x0)
        captions.add(out["caption"].numpy())
    assert offsets <= set(range(21)) and len(offsets) > 8
    assert captions == {b"first", b"second"}
    # The same seed gives the same crop: what exact resumption relies on.
    a = preprocessing.prepare_image_text({**ex, "seed": tf.constant([1, 2], tf.int64)}, 40)
    b = preprocessing.prepare_image_text({**ex, "seed": tf.constant([1, 2], tf.int64)}, 40)
    np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy())

    # Portrait JPEG: the crop runs along the height; both resolutions come from one crop.
    tall = np.ascontiguousarray(np.transpose(arr, (1, 0, 2)))
    ex = {**ex, "image": tf.constant(_encode(tall, "JPEG")), "width": 40, "height": 60}
    out = preprocessing.prepare_image_text(ex, image_size=20, hr_image_size=80)
    assert out["image"].shape == (20, 20, 3) and out["image_hr"].shape == (80, 80, 3)
    assert out["image"].dtype == tf.uint8
    down = tf.image.resize(out["image_hr"], (20, 20), antialias=True).numpy()
    assert np.abs(down - out["image"].numpy()).mean() < 3
    centre = tf.image.resize(tall[10:50], (20, 20), antialias=True).numpy()
    assert np.abs(out["image"].numpy() - centre).mean() < 3


def test_caption_cleaning_agrees_between_python_and_tensorflow():
    texts = [
        "  a  dog\tand\na cat  ",
        "no\x00nul\x7fdel\x85nel",
        "non\u00a0breaking\u3000ideographic\u2028line",
        "caf\u00e9 \U0001f600 emoji",
        "\t\n ",
        "",
    ]
    got = [t.decode() for t in preprocessing.clean_caption(tf.constant(texts)).numpy()]
    assert got == [preprocessing.clean_caption_py(t) for t in texts]
    assert got[:3] == ["a dog and a cat", "no nul del nel", "non breaking ideographic line"]
    assert got[4:] == ["", ""]


# ------------------------------------------------------------------ the pipeline and resume


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """40 captioned images of various shapes, built once into a shared data dir."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(5)
    sizes = [(int(rng.integers(36, 72)), int(rng.integers(36, 72))) for _ in range(40)]
    sizes[:4] = [(40, 120), (120, 40), (64, 64), (30, 90)]  # For the size filters.
    arrays = _write_folder(root / "src", 40, rng, sizes=sizes)
    return root / "src", root / "data", arrays


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_resume_exactly_and_reshuffle_each_epoch(folder):
    src, data, _ = folder
    config = _config("image_folder", src, data, test_fraction=0.2, shuffle_buffer=64)

    def run(start_step=0, seed=0, n=12):
        it = tasks.batches(
            config,
            "unused",
            split="train",
            batch_size=8,
            seed=seed,
            keep_captions=True,
            images=("image", "image_hr"),
            start_step=start_step,
        )
        return _take(it, n)

    full = run()
    assert full[0]["image"].shape == (8, 32, 32, 3) and full[0]["image_hr"].shape == (8, 64, 64, 3)
    assert full[0]["image"].dtype == np.float32
    assert -1.0 <= full[0]["image"].min() and full[0]["image"].max() <= 1.0
    assert full[0]["text_ids"].shape == (8, 64) and full[0]["text_mask"].shape == (8, 64)
    for k in (1, 4, 9):  # 4 and 9 start in later epochs (the train split has < 40 records).
        _assert_same(run(start_step=k, n=12 - k), full[k:])

    builder = image_text_tfds.make_builder(str(data / "tfds"), _params(config))
    n_train = builder.info.splits["train"].num_examples
    captions = [c for b in full for c in b["caption"]]
    epochs = [captions[i : i + n_train] for i in range(0, len(captions) - n_train + 1, n_train)]
    assert len(epochs) >= 2
    for epoch in epochs:
        assert len(set(epoch)) == n_train  # Every record exactly once per epoch.
    assert epochs[0] != epochs[1]  # Reshuffled.
    # Same records, the next epoch: other random crops (square images excepted).
    images = np.concatenate([b["image"] for b in full])
    second = {c: n_train + i for i, c in enumerate(epochs[1])}
    differ = [not np.array_equal(images[i], images[second[c]]) for i, c in enumerate(epochs[0])]
    assert sum(differ) > n_train // 2
    assert run(seed=1, n=2)[0]["caption"].tolist() != full[0]["caption"].tolist()
    # Text ids end in EOS exactly like prompts encoded for sampling.
    ids, mask = tasks.encode_prompts(config, "unused", [c.decode() for c in full[0]["caption"]])
    np.testing.assert_array_equal(full[0]["text_ids"], ids)
    np.testing.assert_array_equal(full[0]["text_mask"], mask)


def _params(config) -> dict:
    d = config.data
    return image_text_tfds.source_params(
        d.dataset, d.source_dir, test_fraction=d.test_fraction, max_image_size=d.max_image_size
    )


def test_eval_batches_are_centre_crops_in_storage_order(folder):
    src, data, arrays = folder
    config = _config("image_folder", src, data, test_fraction=0.2)
    batches = list(
        tasks.batches(
            config,
            "unused",
            split="test",
            batch_size=3,
            seed=0,
            shuffle=False,
            repeat=False,
            keep_captions=True,
        )
    )
    builder = image_text_tfds.make_builder(str(data / "tfds"), _params(config))
    stored = list(_records(builder, "test").values())
    assert sum(len(b["caption"]) for b in batches) == len(stored)
    ex = stored[0]
    assert batches[0]["caption"][0] == ex["captions"][0]
    want = preprocessing.prepare_image_text(
        {k: tf.constant(ex[k]) for k in ("image", "width", "height", "captions")}, 32
    )["image"].numpy()
    np.testing.assert_allclose(batches[0]["image"][0], want / 127.5 - 1.0, atol=1e-6)
    # Resuming an evaluation pass skips whole batches.
    again = tasks.batches(
        config,
        "unused",
        split="test",
        batch_size=3,
        seed=0,
        shuffle=False,
        repeat=False,
        keep_captions=True,
        start_step=1,
    )
    _assert_same(list(again), batches[1:])


def test_size_filters_drop_records_and_resume_stays_exact(folder):
    src, data, _ = folder
    config = _config(
        "image_folder", src, data, test_fraction=0.2, min_image_size=38, max_aspect_ratio=2.5
    )
    builder = image_text_tfds.make_builder(str(data / "tfds"), _params(config))
    sizes = image_text_tfds.sizes(builder, "train")
    recs = list(_records(builder, "train").values())
    assert [(r["width"], r["height"]) for r in recs] == [tuple(s) for s in sizes]
    keep = {
        r["captions"][0]
        for r in recs
        if min(r["width"], r["height"]) >= 38
        and max(r["width"], r["height"]) <= 2.5 * min(r["width"], r["height"])
    }
    assert 0 < len(keep) < len(recs)
    stats = tasks.data_stats(config, "unused")
    assert stats["data/filtered_train"] == len(recs) - len(keep)
    it = tasks.batches(config, "unused", split="train", batch_size=4, seed=3, keep_captions=True)
    full = _take(it, 10)
    seen = [c for b in full for c in b["caption"]]
    assert set(seen[: len(keep)]) == keep  # One epoch = exactly the kept records.
    resumed = tasks.batches(
        config, "unused", split="train", batch_size=4, seed=3, keep_captions=True, start_step=6
    )
    _assert_same(_take(resumed, 4), full[6:])


def test_mixture_rates_follow_the_seeded_draws_and_resume(tmp_path):
    rng = np.random.default_rng(6)
    _write_folder(tmp_path / "a", 10, rng, prefix="alpha")
    _write_folder(tmp_path / "b", 10, rng, prefix="beta")
    from configs import user_data

    config = user_data.get_config("smoke,mixture")
    config.data.data_dir = str(tmp_path / "data")
    config.data.test_fraction = 0.0
    config.data.mixture = ml_collections.ConfigDict(
        dict(
            alpha=dict(dataset="image_folder", source_dir=str(tmp_path / "a"), rate=1.0),
            beta=dict(dataset="image_folder", source_dir=str(tmp_path / "b"), rate=3.0),
        )
    )
    batch, steps, seed = 8, 40, 11

    def run(start_step=0):
        it = tasks.batches(
            config,
            "unused",
            split="train",
            batch_size=batch,
            seed=seed,
            keep_captions=True,
            start_step=start_step,
        )
        return _take(it, steps - start_step)

    full = run()
    source = np.array([c.startswith(b"beta") for b in full for c in b["caption"]], int)
    draws = ordering.mixture_choices([1.0, 3.0], seed, 0, steps * batch)
    np.testing.assert_array_equal(source, draws)  # The documented draw, example by example.
    n = len(draws)
    frac = source.mean()
    assert abs(frac - 0.75) < 4 * np.sqrt(0.75 * 0.25 / n)
    _assert_same(run(start_step=23), full[23:])
    stats = tasks.data_stats(config, "unused")
    assert stats["data/alpha/examples_train"] == stats["data/beta/examples_train"] == 10


def test_missing_or_empty_source_is_one_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "nope"
    for dataset in image_text_tfds.FORMATS:
        for path in (missing, empty):
            config = _config(dataset, path, tmp_path / "data")
            with pytest.raises(ValueError, match=re.escape(str(path))) as err:
                tasks.get_task(config, str(tmp_path))
            assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="source_dir is empty"):
        tasks.get_task(_config("coco", "", tmp_path / "data"), str(tmp_path))


def test_cli_reports_a_missing_source_in_one_line(tmp_path):
    missing = tmp_path / "no_such_dir"
    proc = run_module(
        "muse_jax.train",
        f"--config={os.path.join(ROOT, 'configs', 'user_data.py')}:smoke",
        "--config.stage=tokenizer",
        f"--config.data.source_dir={missing}",
        f"--workdir={tmp_path}",
        timeout=300,
    )
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: Image folder {str(missing)!r} does not exist."]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_trainer_trains_on_user_data_and_logs_the_skip_counts(folder, tmp_path):
    from muse_jax.train import summaries, trainer

    src, data, _ = folder
    bad = tmp_path / "with_bad"
    bad.mkdir()
    for name in os.listdir(src):
        os.symlink(src / name, bad / name)
    os.remove(bad / "captions.csv")
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    (bad / "captions.csv").write_bytes(
        (src / "captions.csv").read_bytes() + b"broken.jpg,a broken one\n"
    )
    config = _config("image_folder", bad, data, test_fraction=0.2)
    config.tokenizer.train.num_steps = 3
    result = trainer.train(config, str(tmp_path / "run"), "tokenizer")
    assert result.status == "completed" and result.step == 3
    assert np.isfinite(result.metrics["loss"])
    logged = summaries.read_scalars(str(tmp_path / "run" / "tokenizer"))
    assert logged["data/skipped_corrupt_image"] == {0: 1.0}
    assert logged["data/examples_train"][0] + logged["data/examples_test"][0] == 40


@pytest.mark.slow
def test_without_a_test_split_training_skips_the_held_out_summaries(folder, tmp_path, capsys):
    """The advice of the empty-split error (set config.data.test_fraction to 0) works: training
    runs through its summaries and checkpoints, saying the held-out summaries are skipped."""
    from muse_jax import checkpoints
    from muse_jax.train import trainer

    src, _, _ = folder
    config = _config("image_folder", src, tmp_path / "data", test_fraction=0.0)
    config.tokenizer.train.num_steps = 3
    config.tokenizer.train.summary_every = 2
    workdir = tmp_path / "run"
    result = trainer.train(config, str(workdir), "tokenizer")
    assert result.status == "completed" and result.step == 3
    said = capsys.readouterr().out
    assert "[tokenizer] the data has no 'test' split" in said and said.count("no 'test' split") == 1
    assert checkpoints.finalized_steps(str(workdir / "tokenizer" / "checkpoints"))[-1] == 3
