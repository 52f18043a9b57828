"""seqio Tasks and the batch iterators the trainer consumes.

A Task turns TFDS records into {'image': float32 [H, W, 3] in [-1, 1], 'text': int32 ids (with
EOS), 'caption': string}; `batches` pads text to a fixed length, adds its mask, shuffles, repeats
and batches, and yields numpy dicts ready for a jitted step.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from muse_jax.data import shapes_tfds, vocabulary

# tf.data must not grab the cores the JAX step runs on, nor the accelerator.
tf.config.set_visible_devices([], "GPU")


def data_dir(config, workdir: str) -> str:
    return config.data.data_dir or os.path.join(workdir, "data")


def _shapes_builder(config, data_root: str) -> tfds.core.DatasetBuilder:
    d = config.data
    return shapes_tfds.make_builder(
        os.path.join(data_root, "tfds"),
        image_size=d.image_size,
        num_train=d.num_train,
        num_test=d.num_test,
        seed=d.get("dataset_seed", 0),
        held_out=tuple(d.held_out),
        two_object_prob=d.two_object_prob,
        hr_image_size=d.get("hr_image_size", 0),
    )


def _prepare_shapes(config, data_root: str) -> tfds.core.DatasetBuilder:
    import jax

    builder = _shapes_builder(config, data_root)
    # Built once, by process 0 (the workdir is shared on pods); the others wait for it.
    if jax.process_index() == 0 and not builder.is_prepared():
        print(f"[data] building the shapes dataset in {builder.data_dir} ...", flush=True)
        tfds.disable_progress_bar()
        builder.download_and_prepare()  # Once: the config name hashes every parameter.
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("muse_jax:dataset_built")
        builder = _shapes_builder(config, data_root)  # Re-read the finished dataset's info.
    return builder


_BUILDERS = {"shapes": _prepare_shapes}


IMAGE_KEYS = ("image", "image_hr")  # image_hr: the super-res stage's resolution, if built.


@seqio.map_over_dataset
def _select(ex: dict) -> dict:
    # Images stay uint8 until after the cache: 4x less memory than float32.
    out = {k: ex[k] for k in IMAGE_KEYS if k in ex}
    return {**out, "text": ex["caption"], "caption": ex["caption"]}


def get_task(config, workdir: str) -> seqio.Task:
    """Builds the dataset if needed and returns (registering once) its seqio Task."""
    name = config.data.dataset
    if name not in _BUILDERS:
        raise ValueError(f"Unknown config.data.dataset {name!r}; valid: {sorted(_BUILDERS)}.")
    root = data_dir(config, workdir)
    builder = _BUILDERS[name](config, root)
    vocab = vocabulary.get_vocabulary(config, root)
    task_name = (
        f"muse_{name}_{builder.builder_config.name}_{config.data.get('vocabulary', 'shapes')}"
    )
    task_name = task_name.replace("/", "_").replace(".", "_")
    if task_name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(task_name)

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        return builder.as_dataset(
            split=split,
            shuffle_files=shuffle_files,
            read_config=tfds.ReadConfig(shuffle_seed=seed),
        )

    return seqio.TaskRegistry.add(
        task_name,
        source=seqio.FunctionDataSource(dataset_fn, splits=("train", "test")),
        preprocessors=[_select, seqio.preprocessors.tokenize],
        output_features={"text": seqio.Feature(vocab, add_eos=True, dtype=tf.int32)},
    )


def pad_text(ex: dict, length: int) -> dict:
    """Pads/cuts 'text' ids to `length` and adds 'text_mask' (1 on real tokens)."""
    ids = ex.pop("text")[:length]
    n = tf.shape(ids)[0]
    ex["text_ids"] = tf.pad(ids, [[0, length - n]])
    ex["text_mask"] = tf.pad(tf.ones([n], tf.int32), [[0, length - n]])
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
) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches {*images, 'text_ids', 'text_mask'[, 'caption']} from the config's task.

    Images are float32 in [-1, 1]; `images` names the resolutions wanted ('image' and/or
    'image_hr', the latter only when `config.data.hr_image_size` is set).
    """
    task = get_task(config, workdir)
    ds = task.get_dataset(
        sequence_length=None, split=split, shuffle=False, seed=seed, use_cached=False
    )
    # Multi-host: each process reads its own shard and a 1/process_count slice of the batch.
    import jax

    num_processes = jax.process_count()
    if batch_size % num_processes:
        raise ValueError(f"batch_size {batch_size} does not divide over {num_processes} processes.")
    batch_size //= num_processes
    ds = ds.shard(num_processes, jax.process_index())
    ds = ds.map(functools.partial(pad_text, length=config.data.text_length))
    missing = [k for k in images if k not in ds.element_spec]
    if missing:
        raise ValueError(
            f"The dataset has no {missing} feature (has {sorted(ds.element_spec)}); "
            "'image_hr' needs config.data.hr_image_size > 0."
        )
    keys = (*images, "text_ids", "text_mask") + (("caption",) if keep_captions else ())
    ds = ds.map(lambda ex: {k: ex[k] for k in keys})
    ds = ds.cache()  # Small datasets: decode once, then serve from memory.
    ds = ds.map(
        lambda ex: {
            k: tf.cast(v, tf.float32) / 127.5 - 1.0 if k in images else v for k, v in ex.items()
        }
    )
    if shuffle:
        ds = ds.shuffle(10_000, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=repeat).prefetch(2)
    return iter(tfds.as_numpy(ds))


def encode_prompts(config, workdir: str, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (ids [N, text_length], mask [N, text_length]) as the trainer saw them.

    An empty string is the unconditional prompt (EOS only); longer prompts are cut with a warning.
    """
    from muse_jax.text.conditioning import encode_ids

    vocab = vocabulary.get_vocabulary(config, data_dir(config, workdir))
    return encode_ids(vocab, prompts, config.data.text_length)
