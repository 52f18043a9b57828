"""seqio Tasks and the batch iterators the trainer consumes.

A Task turns TFDS records into {'image'[, 'image_hr']: uint8 [H, W, 3], 'text': int32 ids ending
in EOS, 'caption': string}. Sources: the procedural shapes world, or users' image-caption data
(`config.data.dataset` = "img2dataset" | "coco" | "image_folder", or "mixture" of those with
rates); see configs/user_data.py for every key.

`batches` is deterministic and exactly resumable (see ordering.py): the batches from step k on
are a function of (config, seed, k), so a job restarted at k sees exactly the batches an
uninterrupted one would. Image-text records stay encoded until after shuffling and skipping, so
resuming decodes nothing it throws away.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterator

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from muse_jax import storage
from muse_jax.data import image_text_tfds, ordering, preprocessing, shapes_tfds, vocabulary
from muse_jax.errors import UsageError

# tf.data must not grab the cores the JAX step runs on, nor the accelerator.
tf.config.set_visible_devices([], "GPU")

IMAGE_KEYS = ("image", "image_hr")  # image_hr: the super-res stage's resolution, if set.

# Per-source options of user data (under config.data, or per mixture entry) and defaults.
_SOURCE_DEFAULTS = dict(
    source_dir="",
    captions_file="",
    layout="auto",
    coco_year="2017",
    max_image_size=512,
    test_fraction=0.01,
    min_image_size=0,
    max_aspect_ratio=0.0,
)


def data_dir(config, workdir: str) -> str:
    return config.data.data_dir or storage.join(workdir, "data")


# ------------------------------------------------------------------------------------ sources


@dataclasses.dataclass(frozen=True)
class Source:
    """One built dataset the pipeline reads: shapes, or an image-text builder (+ its filters)."""

    name: str
    builder: tfds.core.DatasetBuilder
    rate: float = 1.0
    min_image_size: int = 0
    max_aspect_ratio: float = 0.0

    @property
    def image_text(self) -> bool:
        return isinstance(self.builder, image_text_tfds.ImageTextBuilder)


def _built(make, build) -> tfds.core.DatasetBuilder:
    """`make()`'s builder after process 0 ran `build` on it (the workdir is shared on pods)."""
    import jax

    builder = make()
    if jax.process_index() == 0:
        build(builder)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("muse_jax:dataset_built")
        builder = make()  # Re-read the finished dataset's info.
    return builder


def _shapes_builder(config, data_root: str) -> tfds.core.DatasetBuilder:
    d = config.data
    return shapes_tfds.make_builder(
        storage.join(data_root, "tfds"),
        image_size=d.image_size,
        num_train=d.num_train,
        num_test=d.num_test,
        seed=d.get("dataset_seed", 0),
        held_out=tuple(d.held_out),
        two_object_prob=d.two_object_prob,
        hr_image_size=d.get("hr_image_size", 0),
    )


def _build_shapes(builder) -> None:
    if not builder.is_prepared():
        print(f"[data] building the shapes dataset in {builder.data_dir} ...", flush=True)
        # Once: the config name hashes every parameter.
        image_text_tfds.download_and_prepare(builder)


def _source_specs(config) -> list[tuple[str, str, dict, float]]:
    """[(name, format, options, rate)] of the user-data sources the config names."""
    d = config.data
    if d.dataset in image_text_tfds.FORMATS:
        opts = {k: d.get(k, v) for k, v in _SOURCE_DEFAULTS.items()}
        return [(d.dataset, d.dataset, opts, 1.0)]
    mixture = d.get("mixture", None)
    if not mixture:
        raise UsageError("config.data.dataset='mixture' needs entries in config.data.mixture.")
    specs = []
    for name in sorted(mixture.keys()):
        entry = mixture[name]
        fmt = entry.get("dataset", "")
        if fmt not in image_text_tfds.FORMATS:
            raise UsageError(
                f"config.data.mixture.{name}.dataset={fmt!r}; valid: {image_text_tfds.FORMATS}."
            )
        opts = {k: entry.get(k, d.get(k, v)) for k, v in _SOURCE_DEFAULTS.items()}
        rate = float(entry.get("rate", 1.0))
        if not rate > 0:
            raise UsageError(f"config.data.mixture.{name}.rate must be > 0, got {rate}.")
        specs.append((name, fmt, opts, rate))
    return specs


def _sources(config, data_root: str) -> list[Source]:
    """The config's datasets, built if needed; a missing or empty source dir is a ValueError."""
    name = config.data.dataset
    if name == "shapes":
        return [Source("shapes", _built(lambda: _shapes_builder(config, data_root), _build_shapes))]
    valid = ["shapes", *image_text_tfds.FORMATS, "mixture"]
    if name not in valid:
        raise UsageError(f"Unknown config.data.dataset {name!r}; valid: {valid}.")
    workers = int(config.data.get("build_workers", 2))
    out = []
    for src_name, fmt, opts, rate in _source_specs(config):
        params = image_text_tfds.source_params(
            fmt,
            opts["source_dir"],
            captions_file=opts["captions_file"],
            layout=opts["layout"],
            coco_year=opts["coco_year"],
            max_image_size=opts["max_image_size"],
            test_fraction=opts["test_fraction"],
        )
        builder = _built(
            functools.partial(
                image_text_tfds.make_builder, storage.join(data_root, "tfds"), params
            ),
            functools.partial(image_text_tfds.prepare, build_workers=workers),
        )
        out.append(
            Source(
                src_name,
                builder,
                rate,
                int(opts["min_image_size"]),
                float(opts["max_aspect_ratio"]),
            )
        )
    return out


# --------------------------------------------------------------------------------- seqio tasks


@seqio.map_over_dataset
def _select(ex: dict) -> dict:
    # Images stay uint8 until batched: 4x less memory than float32 in caches and buffers.
    out = {k: ex[k] for k in IMAGE_KEYS if k in ex}
    return {**out, "text": ex["caption"], "caption": ex["caption"]}


def _size_filter(ds: tf.data.Dataset, min_size: int, max_aspect: float) -> tf.data.Dataset:
    if min_size <= 0 and max_aspect <= 0:
        return ds
    return ds.filter(
        lambda ex: preprocessing.keep_size(ex["width"], ex["height"], min_size, max_aspect)
    )


def _read(src: Source, split: str, shuffle_files: bool = False, seed: int | None = None):
    """The stored records of `split` (any TFDS split string) in storage order; image-text
    images stay encoded (decoding comes after shuffling and skipping)."""
    decoders = {"image": tfds.decode.SkipDecoding()} if src.image_text else None
    return src.builder.as_dataset(
        split=split,
        shuffle_files=shuffle_files,
        decoders=decoders,
        read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False),
    )


def _prepare_fn(config):
    d = config.data
    return functools.partial(
        preprocessing.prepare_image_text,
        image_size=int(d.image_size),
        hr_image_size=int(d.get("hr_image_size", 0)),
    )


def _tokenize(ds: tf.data.Dataset, output_features) -> tf.data.Dataset:
    return seqio.preprocessors.tokenize_and_append_eos(
        ds, output_features=output_features, copy_pretokenized=False
    )


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _register_task(config, src: Source, vocab: seqio.Vocabulary) -> seqio.Task:
    d = config.data
    params = dict(
        builder=src.builder.builder_config.name,
        data_dir=str(src.builder.data_dir),
        vocabulary=d.get("vocabulary", "shapes"),
        image_size=d.image_size,
        hr_image_size=d.get("hr_image_size", 0),
        min_image_size=src.min_image_size,
        max_aspect_ratio=src.max_aspect_ratio,
    )
    name = f"muse_{src.name}_{_digest(params)}"
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    if src.image_text:
        # The same functions `batches` applies (there: filter, then shuffle/skip, then the rest).
        preprocessors = [
            functools.partial(
                _size_filter, min_size=src.min_image_size, max_aspect=src.max_aspect_ratio
            ),
            seqio.map_over_dataset(_prepare_fn(config)),
            seqio.preprocessors.tokenize_and_append_eos,
        ]
    else:
        preprocessors = [_select, seqio.preprocessors.tokenize_and_append_eos]
    return seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(functools.partial(_read, src), splits=("train", "test")),
        preprocessors=preprocessors,
        output_features={"text": seqio.Feature(vocab, add_eos=True, dtype=tf.int32)},
    )


def _resolve(config, workdir: str) -> tuple[list[Source], list[seqio.Task], seqio.Vocabulary]:
    root = data_dir(config, workdir)
    sources = _sources(config, root)
    vocab = vocabulary.get_vocabulary(config, root)
    return sources, [_register_task(config, s, vocab) for s in sources], vocab


def get_task(config, workdir: str) -> seqio.Task | seqio.Mixture:
    """Builds the dataset(s) if needed and returns (registering once) the seqio Task, or for
    `dataset="mixture"` the seqio Mixture of the sources' Tasks with their rates."""
    sources, tasks, _ = _resolve(config, workdir)
    if config.data.dataset != "mixture":
        return tasks[0]
    name = "muse_mixture_" + _digest([(t.name, s.rate) for s, t in zip(sources, tasks)])
    if name not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(name, [(t.name, s.rate) for s, t in zip(sources, tasks)])
    return seqio.get_mixture_or_task(name)


def has_split(config, workdir: str, split: str) -> bool:
    """Whether every source of the config has `split` (user data has no 'test' split when
    config.data.test_fraction is 0)."""
    sources, _, _ = _resolve(config, workdir)
    return all(split in s.builder.info.splits for s in sources)


def _host_records(src: Source, split: str, output_features) -> tuple[tf.data.Dataset, int]:
    """This process's contiguous slice of the split (so each host reads only its own shards),
    filtered, and how many records it holds."""
    import jax

    if split not in src.builder.info.splits:
        raise UsageError(
            f"{src.name!r} has no {split!r} split (splits: {sorted(src.builder.info.splits)}); "
            "user data holds out 'test' only when config.data.test_fraction > 0."
        )
    total = src.builder.info.splits[split].num_examples
    procs = jax.process_count()
    per = total // procs  # Equal slices: every host yields the same number of batches.
    lo = jax.process_index() * per
    if per == 0:
        raise UsageError(
            f"The {split!r} split of {src.name!r} has {total} examples: none for "
            f"{procs} process(es). For user data, config.data.test_fraction sets the 'test' share."
        )
    ds = _read(src, f"{split}[{lo}:{lo + per}]")
    if not src.image_text:
        ds = _tokenize(_select(ds), output_features)
        return ds.cache(), per  # Small: decoded and tokenised once, then served from memory.
    sizes = image_text_tfds.sizes(src.builder, split)[lo : lo + per]
    num = int(preprocessing.keep_size(sizes[:, 0], sizes[:, 1], *_filters(src)).sum())
    if num == 0:
        raise UsageError(
            f"No {split!r} examples of {src.name!r} pass min_image_size={src.min_image_size} "
            f"and max_aspect_ratio={src.max_aspect_ratio}."
        )
    return _size_filter(ds, *_filters(src)), num


def _filters(src: Source) -> tuple[int, float]:
    return src.min_image_size, src.max_aspect_ratio


def pad_text(ex: dict, length: int) -> dict:
    """Pads 'text' ids (ending in EOS) to `length` and adds 'text_mask' (1 on real tokens).

    A longer caption keeps its first `length - 1` tokens and its EOS, like `encode_prompts`.
    """
    ids = ex.pop("text")
    n = tf.shape(ids)[0]
    ids = tf.cond(n > length, lambda: tf.concat([ids[: length - 1], ids[-1:]], 0), lambda: ids)
    n = tf.shape(ids)[0]
    ex["text_ids"] = tf.pad(ids, [[0, length - n]])
    ex["text_ids"].set_shape([length])
    ex["text_mask"] = tf.pad(tf.ones([n], tf.int32), [[0, length - n]])
    ex["text_mask"].set_shape([length])
    return ex


def batches(
    config,
    workdir: str,
    *,
    split: str,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    keep_captions: bool = False,
    images: tuple[str, ...] = ("image",),
    start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches {*images, 'text_ids', 'text_mask'[, 'caption']} from the config's data.

    Images are float32 in [-1, 1]; `images` names the resolutions wanted ('image' and/or
    'image_hr', the latter only when `config.data.hr_image_size` is set). The batches are those
    an uninterrupted iterator would yield from batch `start_step` on (same seed and config).
    Training (`shuffle`) crops at random positions (`config.data.random_crop`) and picks one of
    an image's captions per epoch; evaluation crops centred and uses the first caption.
    """
    import jax

    if start_step < 0:
        raise UsageError(f"start_step must be >= 0, got {start_step}.")
    sources, tasks, _ = _resolve(config, workdir)
    features = tasks[0].output_features
    num_processes, index = jax.process_count(), jax.process_index()
    if batch_size % num_processes:
        raise UsageError(f"batch_size {batch_size} does not divide over {num_processes} processes.")
    batch_size //= num_processes  # Each process yields its slice of the global batch.
    start = start_step * batch_size
    d = config.data
    stream = functools.partial(
        ordering.epochs,
        shuffle=shuffle,
        repeat=repeat,
        buffer=int(d.get("shuffle_buffer", 10_000)),
        with_seeds=shuffle and bool(d.get("random_crop", True)) and sources[0].image_text,
    )
    parts = [_host_records(s, split, features) for s in sources]
    keys = [ordering.stream_key(seed, c, index) for c in range(len(sources))]
    if len(sources) == 1:
        ds = stream(parts[0][0], parts[0][1], keys[0], start)
    elif repeat:
        rates = [s.rate for s in sources]
        before = ordering.choices_before(rates, seed, start, index)
        streams = [stream(rec, num, key, int(n)) for (rec, num), key, n in zip(parts, keys, before)]
        choices = ordering.choice_stream(rates, seed, start, index)
        ds = tf.data.Dataset.choose_from_datasets(streams, choices)
    else:  # One pass over every source in turn (evaluation).
        ds = stream(parts[0][0], parts[0][1], keys[0], 0)
        for (rec, num), key in zip(parts[1:], keys[1:]):
            ds = ds.concatenate(stream(rec, num, key, 0))
        ds = ds.skip(start)
    if sources[0].image_text:
        ds = ds.map(_prepare_fn(config), num_parallel_calls=tf.data.AUTOTUNE)
        ds = _tokenize(ds, features)
    ds = ds.map(functools.partial(pad_text, length=d.text_length))
    missing = [k for k in images if k not in ds.element_spec]
    if missing:
        raise UsageError(
            f"The dataset has no {missing} feature (has {sorted(ds.element_spec)}); "
            "'image_hr' needs config.data.hr_image_size > 0."
        )
    wanted = (*images, "text_ids", "text_mask") + (("caption",) if keep_captions else ())
    ds = ds.map(lambda ex: {k: ex[k] for k in wanted})
    ds = ds.batch(batch_size, drop_remainder=repeat)
    ds = ds.map(
        lambda ex: {
            k: tf.cast(v, tf.float32) / 127.5 - 1.0 if k in images else v for k, v in ex.items()
        }
    )
    return iter(tfds.as_numpy(ds.prefetch(2)))


# ------------------------------------------------------------------------------ statistics


def data_stats(config, workdir: str) -> dict[str, float]:
    """Build-time counts of the config's data for TensorBoard: examples per split, records
    skipped per reason (all splits), images re-encoded, and train records the size filters drop.
    Mixtures prefix each source's counts with its name."""
    sources, _, _ = _resolve(config, workdir)
    stats: dict[str, float] = {}
    for src in sources:
        prefix = "data/" if len(sources) == 1 else f"data/{src.name}/"
        for split, info in src.builder.info.splits.items():
            stats[f"{prefix}examples_{split}"] = float(info.num_examples)
        if not src.image_text:
            continue
        for split_counts in image_text_tfds.counts(src.builder).values():
            for k, v in split_counts.items():
                if k != "kept":
                    stats[prefix + k] = stats.get(prefix + k, 0.0) + float(v)
        if src.min_image_size > 0 or src.max_aspect_ratio > 0:
            sizes = image_text_tfds.sizes(src.builder, "train")
            kept = preprocessing.keep_size(sizes[:, 0], sizes[:, 1], *_filters(src)).sum()
            stats[f"{prefix}filtered_train"] = float(len(sizes) - kept)
    return stats


def all_captions(config, workdir: str, split: str) -> list[str]:
    """Every distinct caption of a split (all of an image's captions, not one per image), e.g.
    for precomputing text embeddings of a multi-caption dataset such as COCO."""
    sources, _, _ = _resolve(config, workdir)
    out: dict[str, None] = {}
    for src in sources:
        key = "captions" if src.image_text else "caption"
        ds = src.builder.as_dataset(
            split=split, shuffle_files=False, decoders=tfds.decode.PartialDecoding({key: True})
        )
        for ex in tfds.as_numpy(ds):
            values = ex[key] if src.image_text else [ex[key]]
            out.update((c.decode("utf-8"), None) for c in values)
    return list(out)


def encode_prompts(config, workdir: str, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (ids [N, text_length], mask [N, text_length]) as the trainer saw them.

    An empty string is the unconditional prompt (EOS only); longer prompts are cut with a warning.
    """
    vocab = vocabulary.get_vocabulary(config, data_dir(config, workdir))
    return vocabulary.encode_ids(vocab, prompts, config.data.text_length)
