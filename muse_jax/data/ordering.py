"""Deterministic, resumable example order: per-epoch shuffles and mixture draws.

Everything is a function of (seed, position), never of how far an iterator has run: epoch e is
shuffled with a seed derived from (seed, e), each example gets a preprocessing seed from
(seed, e, position in epoch), and a mixture's source for draw i comes from a counter-based
(stateless) random block. So a pipeline can start at any position and yield exactly what an
uninterrupted one yields from there: whole epochs are skipped for free, and only the records
before the position in the current epoch are read (not decoded) to skip them.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

_FOREVER = 2**62  # "Endless" as a number of epochs / mixture blocks.
_CHOICE_BLOCK = 4096  # Mixture draws come in blocks, so any position is reached directly.


def stream_key(seed: int, component: int, process_index: int) -> int:
    """The seed of one source's stream on one process (different per mixture source and host)."""
    return ((int(seed) * 1009 + component) * 10007 + process_index) % 2**40


def epochs(
    records: tf.data.Dataset,
    num: int,
    key: int,
    start: int,
    *,
    shuffle: bool,
    repeat: bool,
    buffer: int,
    with_seeds: bool,
) -> tf.data.Dataset:
    """`records` (`num` of them) from position `start` of the endless (or one-epoch) stream.

    Epoch e is the records shuffled (buffer `buffer`) with seed (key, e); with `with_seeds`,
    each element gets 'seed': int64 [2] = (epoch key, position in epoch) for its preprocessing.
    """
    first, offset = divmod(start, num)
    stop = _FOREVER if repeat else 1
    if first >= stop:
        return records.take(0)

    def epoch(e):
        ekey = tf.constant(key, tf.int64) * 1_000_003 + e
        ds = records
        if shuffle:
            ds = ds.shuffle(max(1, min(buffer, num)), seed=ekey)
        if with_seeds:
            ds = ds.enumerate().map(lambda i, ex: {**ex, "seed": tf.stack([ekey, i])})
        return ds

    return tf.data.Dataset.range(first, stop).flat_map(epoch).skip(offset)


def _logits(rates) -> tf.Tensor:
    rates = np.asarray(rates, np.float64)
    return tf.constant(np.log(rates / rates.sum()), tf.float32)


def _choice_block(logits: tf.Tensor, key: int, block) -> tf.Tensor:
    seed = tf.stack([tf.constant(key, tf.int64), tf.cast(block, tf.int64)])
    return tf.random.stateless_categorical(logits[None], _CHOICE_BLOCK, seed=seed)[0]


def _mixture_key(seed: int, process_index: int) -> int:
    return stream_key(seed, 7919, process_index)


def mixture_choices(rates, seed: int, start: int, count: int, process_index: int = 0) -> np.ndarray:
    """Which source (index into `rates`, i.e. the sorted mixture names) supplies draws
    start..start+count-1 of a process's mixture stream: the draws `choice_stream` makes."""
    if count <= 0:
        return np.zeros((0,), np.int64)
    logits, key = _logits(rates), _mixture_key(seed, process_index)
    blocks = range(start // _CHOICE_BLOCK, (start + count - 1) // _CHOICE_BLOCK + 1)
    draws = np.concatenate([_choice_block(logits, key, b).numpy() for b in blocks])
    first = start % _CHOICE_BLOCK
    return draws[first : first + count]


def choices_before(rates, seed: int, start: int, process_index: int = 0) -> np.ndarray:
    """How many of the first `start` mixture draws went to each source: where each source's
    own stream resumes. It replays every draw before `start`, so its cost grows linearly with
    `start`."""
    counts = np.zeros(len(rates), np.int64)
    for b0 in range(0, start, 16 * _CHOICE_BLOCK):
        n = min(16 * _CHOICE_BLOCK, start - b0)
        counts += np.bincount(
            mixture_choices(rates, seed, b0, n, process_index), minlength=len(rates)
        )
    return counts


def choice_stream(rates, seed: int, start: int, process_index: int = 0) -> tf.data.Dataset:
    """The endless int64 source indices from draw `start` on, for `choose_from_datasets`."""
    logits, key = _logits(rates), _mixture_key(seed, process_index)
    return (
        tf.data.Dataset.range(start // _CHOICE_BLOCK, _FOREVER)
        .map(lambda b: _choice_block(logits, key, b))
        .unbatch()
        .skip(start % _CHOICE_BLOCK)
    )
