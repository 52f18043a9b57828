"""TFDS builder for users' image-caption data: img2dataset shards, COCO captions, image folders.

Built from existing files only (`source_dir`, local or gs://; nothing is downloaded) into
standard TFDS shards that every host reads in parallel. Each record stores the image as encoded
bytes (re-encoded only when its shorter side exceeds `max_image_size` or TensorFlow cannot
decode it as stored), all of its cleaned captions, its stored width/height (so crops are
planned before decoding) and an id.

Bad records are skipped and counted per reason (`records.SKIP_REASONS`); the counts go to the
build log and to `info.metadata["counts"][split]`. After the build, `sizes-<split>.npy` beside
the shards holds every record's (width, height) in storage order, so the input pipeline can
count what its size filters keep without reading the data.

As with the shapes builder, the config name hashes every parameter plus a fingerprint of the
source files, so changed options or new shards build a separate dataset.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import os
import sys
from collections.abc import Iterator
from concurrent import futures

import chex
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from muse_jax import storage
from muse_jax.data import coco, image_folder, img2dataset, records
from muse_jax.errors import UsageError

FORMATS = ("img2dataset", "coco", "image_folder")
_LOGGED_BAD = 20  # Per split: the first bad records are logged by key, the rest only counted.


@dataclasses.dataclass(eq=False)
class ImageTextConfig(tfds.core.BuilderConfig):
    """What to build from; see `make_builder`."""

    source_format: str = "image_folder"
    source_dir: str = ""
    captions_file: str = ""  # image_folder: the resolved table path.
    layout: str = ""  # img2dataset: the resolved layout.
    coco_year: str = "2017"
    max_image_size: int = 512
    test_fraction: float = 0.01
    fingerprint: str = ""


def source_params(
    source_format: str,
    source_dir: str,
    *,
    captions_file: str = "",
    layout: str = "auto",
    coco_year: str = "2017",
    max_image_size: int = 512,
    test_fraction: float = 0.01,
) -> dict:
    """Checked, normalised parameters; ValueError (naming the path) for a missing/empty source."""
    if source_format not in FORMATS:
        raise UsageError(f"Unknown image-text format {source_format!r}; valid: {FORMATS}.")
    if not source_dir:
        raise UsageError(f"config.data.source_dir is empty: where are the {source_format} files?")
    # Local: absolute with ~ expanded, as before; gs://: kept as given (abspath would make it a
    # local ./gs:/ folder).
    source_dir = os.fspath(storage.path(source_dir))
    params = dict(
        source_format=source_format,
        source_dir=source_dir,
        captions_file="",
        layout="",
        coco_year="",
        max_image_size=int(max_image_size),
        test_fraction=float(test_fraction),
    )
    if source_format == "img2dataset":
        params["layout"] = img2dataset.detect_layout(source_dir, layout)
        fp = img2dataset.fingerprint(source_dir, params["layout"])
    elif source_format == "coco":
        params["coco_year"] = str(coco_year)
        params["test_fraction"] = 0.0  # COCO has its own val split.
        coco.check_source(source_dir, params["coco_year"])
        fp = coco.fingerprint(source_dir, params["coco_year"])
    else:
        params["captions_file"] = image_folder.captions_path(source_dir, captions_file)
        fp = image_folder.fingerprint(params["captions_file"])
    params["fingerprint"] = hashlib.sha256(json.dumps(fp).encode()).hexdigest()[:16]
    return params


def config_name(params: dict) -> str:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return f"{params['source_format']}_{digest}"


class ImageTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Image-caption pairs from users' files (local or gs://); splits 'train' and 'test'.

    Not registered with TFDS (use `make_builder`), like the shapes builder.
    """

    name = "muse_image_text"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # TFDS bookkeeping needs a default config; real use passes a parameter-hashed one.
    BUILDER_CONFIGS = [ImageTextConfig(name="default")]
    build_workers: int = 2  # Threads that check and re-encode images while building.

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file; TFDS 4.9's default needs `importlib_resources`, absent on py>=3.9 installs."""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg: ImageTextConfig = self.builder_config
        return self.dataset_info_from_configs(
            description=f"Image-caption pairs ({cfg.source_format}) from {cfg.source_dir}.",
            features=tfds.features.FeaturesDict(
                {
                    # Encoded JPEG/PNG bytes as stored; decode with SkipDecoding + tf.io.
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                    "width": tfds.features.Scalar(np.int32),
                    "height": tfds.features.Scalar(np.int32),
                    "id": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Existing files only; nothing is downloaded.
        cfg: ImageTextConfig = self.builder_config
        # TFDS cannot store an empty split: test_fraction=0 means no 'test' split at all.
        held_out = cfg.source_format == "coco" or cfg.test_fraction > 0
        splits = ("train", "test") if held_out else ("train",)
        return {split: self._generate_examples(split) for split in splits}

    def _raw_records(self, split: str) -> Iterator[records.RawRecord]:
        cfg: ImageTextConfig = self.builder_config
        if cfg.source_format == "img2dataset":
            return img2dataset.iter_records(cfg.source_dir, cfg.layout, split, cfg.test_fraction)
        if cfg.source_format == "coco":
            return coco.iter_records(cfg.source_dir, split, cfg.coco_year)
        return image_folder.iter_records(
            cfg.source_dir, cfg.captions_file, split, cfg.test_fraction
        )

    def _generate_examples(self, split: str) -> Iterator[tuple[bytes, dict]]:
        cfg: ImageTextConfig = self.builder_config
        counts: collections.Counter = collections.Counter()

        def check(raw: records.RawRecord) -> dict | records.BadRecord:
            try:
                return records.process(raw, cfg.max_image_size)
            except records.BadRecord as e:
                return e

        raws = self._raw_records(split)
        with futures.ThreadPoolExecutor(max(1, self.build_workers)) as pool:
            while chunk := list(itertools.islice(raws, 64)):
                for raw, out in zip(chunk, pool.map(check, chunk)):
                    if isinstance(out, records.BadRecord):
                        counts[f"skipped_{out.reason}"] += 1
                        counts["bad"] += 1
                        if counts["bad"] <= _LOGGED_BAD:
                            print(f"[data] {split}: skipping {raw.key!r} ({out})", flush=True)
                        continue
                    counts["kept"] += 1
                    counts["reencoded"] += int(out.pop("reencoded"))
                    counts["dropped_captions"] += out.pop("dropped_captions")
                    yield raw.key.encode("utf-8", "surrogateescape"), out
        # dropped_captions: unusable captions (empty, not UTF-8) of records kept for others.
        stats = {k: int(counts.get(k, 0)) for k in ("kept", "reencoded", "dropped_captions")}
        stats |= {f"skipped_{r}": int(counts.get(f"skipped_{r}", 0)) for r in records.SKIP_REASONS}
        self.info.metadata.setdefault("counts", {})[split] = stats
        skipped = " ".join(
            f"{k.removeprefix('skipped_')}={v}" for k, v in stats.items() if "skipped" in k and v
        )
        print(
            f"[data] {cfg.source_format} {split}: kept {stats['kept']} (re-encoded "
            f"{stats['reencoded']}, captions dropped {stats['dropped_captions']}); "
            f"skipped {skipped or 'none'}",
            flush=True,
        )
        if not stats["kept"]:  # TFDS cannot store an empty split: say why, in one line.
            hint = " Raise config.data.test_fraction, or set it to 0." if split == "test" else ""
            raise UsageError(
                f"No usable {split!r} records in {cfg.source_dir!r} "
                f"(skipped: {skipped or 'none found'}).{hint}"
            )


def make_builder(data_dir: str, params: dict) -> ImageTextBuilder:
    """A builder for `source_params(...)`; call `prepare` before reading."""
    return ImageTextBuilder(
        data_dir=data_dir, config=ImageTextConfig(name=config_name(params), **params)
    )


def _sizes_path(builder, split: str) -> epath.Path:
    return epath.Path(builder.data_dir) / f"sizes-{split}.npy"


class _WithoutTfdsNotices(io.TextIOBase):
    """A stdout that drops TFDS's "Downloading and preparing dataset" and "downloaded and
    prepared" lines (nothing is downloaded here) and passes every other line on."""

    _NOTICES = ("Downloading and preparing dataset", "Dataset ")

    def __init__(self, out):
        self._out, self._line = out, ""

    def write(self, text: str) -> int:
        self._line += text
        *done, self._line = self._line.split("\n")
        for line in done:
            notice = line.startswith(self._NOTICES[0]) or (
                line.startswith(self._NOTICES[1]) and "downloaded and prepared to" in line
            )
            if not notice:
                self._out.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self._out.flush()


def download_and_prepare(builder) -> None:
    """`builder.download_and_prepare()`, quietly: no progress bar, no download notices."""
    tfds.disable_progress_bar()
    quiet = _WithoutTfdsNotices(sys.stdout)
    with contextlib.redirect_stdout(quiet):
        builder.download_and_prepare()
    if quiet._line:
        sys.stdout.write(quiet._line)


def prepare(builder: ImageTextBuilder, build_workers: int = 2) -> None:
    """Builds the dataset (once) and its per-record size table."""
    if not builder.is_prepared():
        print(f"[data] building the image-text dataset in {builder.data_dir} ...", flush=True)
        builder.build_workers = build_workers
        download_and_prepare(builder)
    for split in builder.info.splits:
        path = _sizes_path(builder, split)
        if storage.exists(path):
            continue
        ds = builder.as_dataset(
            split=split,
            shuffle_files=False,
            decoders=tfds.decode.PartialDecoding({"width": True, "height": True}),
            read_config=tfds.ReadConfig(try_autocache=False),
        )
        parts = [np.zeros((0, 2), np.int32)]
        for batch in tfds.as_numpy(ds.batch(4096)):
            parts.append(np.stack([batch["width"], batch["height"]], axis=1).astype(np.int32))
        buffer = io.BytesIO()
        np.save(buffer, np.concatenate(parts))
        storage.write_bytes(path, buffer.getvalue())  # Atomic: never half a table.


def sizes(builder: ImageTextBuilder, split: str) -> np.ndarray:
    """int32 [N, 2] (width, height) of the split's records in storage order."""
    path = _sizes_path(builder, split)
    table = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
    chex.assert_shape(table, (builder.info.splits[split].num_examples, 2))
    return table


def counts(builder: ImageTextBuilder) -> dict[str, dict[str, int]]:
    """{split: {'kept', 'reencoded', 'skipped_<reason>'...}} recorded at build time."""
    return dict(builder.info.metadata.get("counts", {}))
