"""Precomputing frozen-text-encoder embeddings of a dataset's captions (`muse_jax.embed`).

`TableWriter` appends to the table that `muse_jax.text.embeddings` lays out and reads:
- Appending resizes the arrays and writes the chunk's rows and captions, then commits
  `rows_written` in table.json. A rerun resumes after the last committed chunk (nothing committed
  is re-encoded; a half-written chunk is overwritten) and appends new prompts.
- Readers see rows once the index covers them: every `index_every` rows and at `close`, the
  sorted index is streamed a shard at a time and merged with the new keys into a new version,
  and `rows` is committed. Memory is the chunk plus 16 bytes per caption since the last merge
  (and, in `missing`, a few integers per caption asked about, beside the caller's list); the
  cost is one pass over the index per merge.
- 64-bit keys can collide (about n^2 / 2^65 pairs among n captions). Every key match is checked
  against the stored caption, so a collision is an error, never a wrong embedding served for
  another caption.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import ml_dtypes
import numpy as np
import tensorstore as ts

from muse_jax import storage
from muse_jax.errors import UsageError
from muse_jax.text import embeddings as tables
from muse_jax.text.embeddings import HashFn, caption_hash

_SHARD_BYTES = 32 << 20  # Target size of an emb/ shard file (rows are read one by one).
_SHARD_ROWS = 1024  # At most: appends of `chunk_size` rows then fill whole shards, no rewrites.


def collect_captions(config, workdir: str, splits, prompts_file: str | None) -> list[str]:
    """Distinct captions in a deterministic order: "", eval prompts, prompts file, dataset splits."""
    from muse_jax.data import tasks
    from muse_jax.prompt_groups import all_prompts

    captions = ["", *all_prompts(config.eval)]
    if prompts_file:
        if not storage.exists(prompts_file):
            raise FileNotFoundError(f"--prompts_file {prompts_file} does not exist.")
        lines = storage.read_text(prompts_file).splitlines()
        captions += [line.strip() for line in lines if line.strip()]
    for split in splits:  # Every caption of every image (COCO has 5; training draws any).
        captions += tasks.all_captions(config, workdir, split)
    return list(dict.fromkeys(captions))


class TableWriter:
    """Appends captions and their embeddings to a table, resumably and in bounded memory.

    Use `missing` to find what to encode, `append` per encoded chunk, then `close` (or leave the
    `with` block) to index what is left. One writer per table at a time.
    """

    def __init__(
        self,
        directory: str,
        *,
        text_length: int,
        dtype: str = "bfloat16",
        encoder: dict | None = None,
        index_every: int = 1 << 20,
        index_block: int = tables.INDEX_BLOCK,
        hash_fn: HashFn = caption_hash,
    ):
        if dtype not in ("bfloat16", "float32"):
            raise UsageError(f"dtype must be bfloat16 or float32, got {dtype!r}.")
        self.directory = os.fspath(storage.path(directory))
        self.index_every = index_every
        self.index_block = index_block
        self._hash_fn = hash_fn
        self._context = tables.ts_context()
        self._captions = tables.CaptionFiles(self.directory)
        wanted = {
            "text_length": text_length,
            "dtype": dtype,
            "encoder": json.loads(json.dumps(encoder or {})),  # As table.json holds it.
            "hash": tables.hash_name(hash_fn),
        }
        if tables.has_meta(self.directory):
            self.meta = tables.read_meta(self.directory)
            for key, value in wanted.items():
                if self.meta[key] != value:
                    raise UsageError(
                        f"The table in {self.directory} has {key}={self.meta[key]!r}, this run "
                        f"{value!r}: write into a new --output_dir."
                    )
        else:
            self.meta = {"format": tables.FORMAT, **wanted, "dim": None, "index": None}
            self.meta.update(rows=0, rows_written=0)
            tables.write_meta(self.directory, self.meta)
        self._drop_index_versions()
        self._index = self._open_index()
        self._emb = self._mask = None
        if self.meta["dim"] is not None:
            self._emb = tables.open_array(storage.join(self.directory, "emb"), self._context)
            self._mask = tables.open_array(storage.join(self.directory, "mask"), self._context)
        # Rows that a stopped run appended but did not index: they go into the next merge.
        pending = [np.zeros((0, 2), np.uint64)]
        start, stop = self.meta["rows"], self.meta["rows_written"]
        for s in range(start, stop, tables.CAPTION_BLOCK):
            rows = np.arange(s, min(s + tables.CAPTION_BLOCK, stop))
            keys = tables.caption_keys(self._captions.read(rows), self._hash_fn)
            pending.append(np.stack([keys, rows.astype(np.uint64)], axis=1))
        self._pending = _sorted(np.concatenate(pending))  # [P, 2] (key, row), by key.
        # Keys that `missing` found absent from the index and not yet appended: `append` need
        # not read the index again for them.
        self._vouched = np.zeros(0, np.uint64)
        self._vouched_used = np.zeros(0, bool)

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()

    @property
    def rows_written(self) -> int:
        return int(self.meta["rows_written"])

    def _open_index(self) -> tables.SortedIndex | None:
        version = self.meta["index"]
        if version is None:
            return None
        return tables.SortedIndex(tables.index_path(self.directory, version), self._context)

    def _drop_index_versions(self) -> None:
        """Removes index versions but the current one and the one before it (a reader opened
        before the last merge may still use it), including any a crashed merge left behind."""
        current = self.meta["index"] or 0
        for name in storage.listdir(storage.join(self.directory, "index")):
            if name.isdigit() and int(name) not in (current, current - 1):
                storage.remove_tree(tables.index_path(self.directory, int(name)))

    def _find(self, keys: np.ndarray, in_index: np.ndarray | None = None) -> np.ndarray:
        """Row [N] of each key among pending rows and, where `in_index` [N] (default: all), the
        indexed ones; -1 where absent."""
        rows = np.full(len(keys), -1, np.int64)
        if self._index is not None:
            ask = np.ones(len(keys), bool) if in_index is None else in_index
            rows[ask] = self._index.find(keys[ask])
        if len(self._pending):
            pos = np.minimum(np.searchsorted(self._pending[:, 0], keys), len(self._pending) - 1)
            hit = self._pending[pos, 0] == keys
            rows[hit] = self._pending[pos[hit], 1].astype(np.int64)
        return rows

    def _check_known(self, captions: Sequence[str], keys: np.ndarray, rows: np.ndarray) -> None:
        """Raises `HashCollisionError` where a found row holds another caption than asked."""
        known = np.flatnonzero(rows >= 0)
        known = known[np.argsort(rows[known])]  # Each caption file is read once.
        for s in range(0, len(known), 1 << 16):
            part = known[s : s + (1 << 16)]
            for k, stored in zip(part, self._captions.read(rows[part])):
                _check_same(stored, captions[k], keys[k])

    def missing(self, captions: Sequence[str]) -> list[str]:
        """The distinct captions not in the table yet, in first-seen order.

        Every key already present (or repeated in `captions`) is checked against its caption:
        the same caption is skipped, a different one raises `HashCollisionError`. One call over
        the whole list reads each index block at most once.
        """
        captions = list(captions)
        keys, first, inverse = np.unique(
            tables.caption_keys(captions, self._hash_fn), return_index=True, return_inverse=True
        )
        for i in np.flatnonzero(first[inverse] != np.arange(len(captions))):
            _check_same(captions[first[inverse[i]]], captions[i], keys[inverse[i]])
        rows = self._find(keys)
        self._check_known([captions[i] for i in first], keys, rows)
        self._vouched, self._vouched_used = keys[rows < 0], np.zeros(int((rows < 0).sum()), bool)
        return [captions[i] for i in np.sort(first[rows < 0])]

    def append(self, captions: Sequence[str], emb: np.ndarray, mask: np.ndarray) -> None:
        """Appends `captions` [N] (new ones, from `missing`), `emb` [N, S, D], `mask` [N, S].

        Durable on return (a rerun will not re-encode them); visible to readers after the next
        index merge (every `index_every` rows, and `close`). A caption already in the table,
        or twice in the chunk, is refused before anything is written.
        """
        captions = list(captions)
        n, length = len(captions), self.meta["text_length"]
        if emb.ndim != 3 or emb.shape[:2] != (n, length) or mask.shape != (n, length):
            raise UsageError(
                f"append: {n} captions need emb [{n}, {length}, D] and mask [{n}, {length}], "
                f"got {emb.shape} and {mask.shape}."
            )
        if not n:
            return
        if self.meta["dim"] not in (None, emb.shape[-1]):
            raise UsageError(f"append: width {emb.shape[-1]}, the table's is {self.meta['dim']}.")
        keys = tables.caption_keys(captions, self._hash_fn)
        if len(np.unique(keys)) < n:
            raise UsageError("append: a caption (or key) twice in one chunk; use `missing`.")
        pos = np.minimum(np.searchsorted(self._vouched, keys), max(len(self._vouched) - 1, 0))
        vouched = np.zeros(n, bool)
        if len(self._vouched):
            vouched = (self._vouched[pos] == keys) & ~self._vouched_used[pos]
        rows = self._find(keys, in_index=~vouched)
        self._check_known(captions, keys, rows)
        if (rows >= 0).any():
            c = captions[int(np.flatnonzero(rows >= 0)[0])]
            raise UsageError(f"append: {c!r} is already in the table; use `missing`.")
        self._vouched_used[pos[vouched]] = True
        if self._emb is None:
            self._create_arrays(emb.shape[-1])
        start, stop = self.rows_written, self.rows_written + n
        dtype = ml_dtypes.bfloat16 if self.meta["dtype"] == "bfloat16" else np.float32
        self._emb = self._resize(self._emb, stop)
        self._mask = self._resize(self._mask, stop)
        writes = [
            self._emb[start:stop].write(np.asarray(emb).astype(dtype)),
            self._mask[start:stop].write(np.asarray(mask).astype(np.int8)),
        ]
        self._captions.write(start, captions)
        with storage.checked("writing rows of", self.directory):
            for w in writes:
                w.result()
        entries = np.stack([keys, np.arange(start, stop, dtype=np.uint64)], axis=1)
        self._pending = _sorted(np.concatenate([self._pending, entries]))  # Merges two runs.
        self.meta["rows_written"] = stop
        tables.write_meta(self.directory, self.meta)
        if len(self._pending) >= self.index_every:
            self.flush()

    def _resize(self, array: ts.TensorStore, rows: int) -> ts.TensorStore:
        # Metadata only: rows past `rows` left by a stopped run are overwritten, not deleted.
        with storage.checked("resizing", self.directory):
            shape = [rows, *array.shape[1:]]
            return array.resize(exclusive_max=shape, resize_metadata_only=True).result()

    def _create_arrays(self, dim: int) -> None:
        length, dtype = self.meta["text_length"], self.meta["dtype"]
        row_bytes = length * dim * (2 if dtype == "bfloat16" else 4)
        shard_rows = min(1 << max(int(np.log2(_SHARD_BYTES / row_bytes)), 0), _SHARD_ROWS)
        emb_path = storage.join(self.directory, "emb")
        mask_path = storage.join(self.directory, "mask")
        # A first run that stopped before committing a row may have left arrays: start afresh.
        storage.remove_tree(emb_path)
        storage.remove_tree(mask_path)
        ctx = self._context
        self._emb = tables.create_array(emb_path, [0, length, dim], dtype, shard_rows, ctx)
        self._mask = tables.create_array(
            mask_path, [0, length], "int8", _SHARD_ROWS, ctx, compress=True
        )
        self.meta["dim"] = dim
        tables.write_meta(self.directory, self.meta)

    def flush(self) -> None:
        """Merges the rows appended since the last merge into a new index version and commits
        it: readers opened from then on see them."""
        if not len(self._pending):
            return
        version = (self.meta["index"] or 0) + 1
        path = tables.index_path(self.directory, version)
        storage.remove_tree(path)  # Left by a merge that stopped before its commit.
        _write_index(path, self._index, self._pending, self._context, self.index_block)
        self.meta.update(rows=self.meta["rows_written"], index=version)
        tables.write_meta(self.directory, self.meta)
        self._pending = self._pending[:0]
        self._index = self._open_index()
        self._drop_index_versions()

    def close(self) -> None:
        self.flush()


def _sorted(entries: np.ndarray) -> np.ndarray:
    """[N, 2] (key, row) entries sorted by key (timsort: linear on a few sorted runs)."""
    return entries[np.argsort(entries[:, 0], kind="stable")]


def _check_same(stored: str, new: str, key: np.uint64) -> None:
    if stored != new:
        raise tables.HashCollisionError(
            f"Captions {stored[:200]!r} and {new[:200]!r} have the same 64-bit key "
            f"{int(key):016x}; one table cannot hold both (embed one into another table)."
        )


def _write_index(
    directory: str,
    old: tables.SortedIndex | None,
    new: np.ndarray,
    context: ts.Context,
    block: int,
) -> None:
    """Writes `old` merged with `new` [P, 2] (sorted (key, row)) as an index version at
    `directory` in blocks of `block` keys. `old` is streamed a shard at a time, so memory is a
    shard plus `new`, never the whole index."""
    total = (len(old) if old is not None else 0) + len(new)
    shard = block * tables.INDEX_SHARD_BLOCKS
    keys_path = storage.join(directory, "keys")
    keys = tables.create_array(keys_path, [total, 2], "uint64", shard, context, inner_rows=block)
    firsts, carry, written, used = [], np.zeros((0, 2), np.uint64), 0, 0

    def emit(entries: np.ndarray, final: bool) -> np.ndarray:
        """Writes whole shards of `entries` (all of them if `final`), returns the rest."""
        nonlocal written
        n = len(entries) if final else len(entries) // shard * shard
        if n:
            with storage.checked("writing", keys_path):
                keys[written : written + n].write(entries[:n]).result()
            firsts.append(entries[:n:block, 0])
            written += n
        return entries[n:]

    old_len, done = total - len(new), 0
    for slab in old.slabs() if old is not None else ():
        # New keys up to this slab's last key are merged with it; the last slab takes the rest.
        done += len(slab)
        upto = len(new)
        if done < old_len:
            upto = int(np.searchsorted(new[:, 0], slab[-1, 0], side="right"))
        merged = _sorted(np.concatenate([slab, new[used:upto]]))
        used = upto
        carry = emit(np.concatenate([carry, merged]), final=False)
    emit(np.concatenate([carry, new[used:]]), final=True)
    first = np.concatenate(firsts)
    step = 1 << 16
    first_path = storage.join(directory, "first")
    array = tables.create_array(first_path, [len(first)], "uint64", step, context, inner_rows=step)
    with storage.checked("writing", first_path):
        array[:].write(first).result()


def embed(
    config,
    workdir: str,
    output_dir: str,
    captions: list[str],
    *,
    batch_size: int,
    chunk_size: int,
    dtype: str,
    index_every: int = 1 << 20,
) -> int:
    """Encodes the captions not yet in the table at `output_dir`; returns how many it added."""
    import jax
    import jax.numpy as jnp

    from muse_jax import parallel
    from muse_jax.data.vocabulary import encode_ids
    from muse_jax.models import factory
    from muse_jax.text import loading
    from muse_jax.text.conditioning import TextConditioner

    stage_config = config.copy_and_resolve_references()
    stage_config.text_embeddings = ""  # Build the in-graph encoder of this config.
    if stage_config.text_encoder.trainable:
        raise UsageError(
            "config.text_encoder is trainable; precomputing needs a frozen encoder "
            "(e.g. --config.text_encoder.name=t5 --config.text_encoder.trainable=False)."
        )
    vocab = TextConditioner(stage_config, workdir).vocab
    text_encoder = factory.text_encoder(stage_config, vocab.vocab_size)
    mesh, rules = parallel.create_mesh(config), parallel.rules(config)

    def init_text(rng):
        ids = jnp.zeros((1, stage_config.data.text_length), jnp.int32)
        return text_encoder.init(rng, ids, jnp.ones_like(ids))["params"]

    length = config.data.text_length
    writer = TableWriter(
        output_dir,
        text_length=length,
        dtype=dtype,
        encoder=config.text_encoder.to_dict(),
        index_every=index_every,
    )
    todo = writer.missing(captions)
    frozen_text = None
    if todo:
        abstract, shardings = parallel.abstract_state(init_text, jax.random.PRNGKey(0), mesh, rules)
        frozen_text = loading.load_text_encoder(stage_config, abstract, shardings)
    encode = jax.jit(lambda p, ids, mask: text_encoder.apply({"params": p}, ids, mask))
    t0 = time.time()
    with writer:
        for start in range(0, len(todo), chunk_size):
            part = todo[start : start + chunk_size]
            ids, mask = encode_ids(vocab, part, length)
            outs = []
            for b in range(0, len(part), batch_size):
                n = len(part[b : b + batch_size])
                # Pad the last batch: one shape, one compilation.
                batch_ids = np.pad(ids[b : b + n], [(0, batch_size - n), (0, 0)])
                batch_mask = np.pad(mask[b : b + n], [(0, batch_size - n), (0, 0)])
                outs.append(np.asarray(encode(frozen_text, batch_ids, batch_mask))[:n])
            writer.append(part, np.concatenate(outs), mask)
            written = start + len(part)
            rate = written / max(time.time() - t0, 1e-9)
            eta = (len(todo) - written) / max(rate, 1e-9)
            print(
                f"[embed] {written}/{len(todo)} new captions, {rate:.1f} captions/s, "
                f"ETA {eta:.0f}s",
                flush=True,
            )
    return len(todo)
