"""Precomputed text embeddings: a caption-keyed table on local disk or `gs://`, streamed in bf16.

The table's layout and its reader; `muse_jax.text.precompute` writes it (`python -m
muse_jax.embed`), `TextConditioner` reads it. A table directory holds:

  table.json               the commit marker, written last: shapes, dtype, encoder, row counts
  emb/                     zarr3 [rows, S, D] bfloat16, one row per inner chunk, rows grouped
                           into shard files of a few tens of MiB (tensorstore)
  mask/                    zarr3 [rows, S] int8, grouped the same way
  captions/NNNNNNNN.json   the captions of rows [n * C, (n + 1) * C), C = CAPTION_BLOCK
  index/VVVVVV/keys        zarr3 [rows, 2] uint64 (caption key, row), sorted by key
  index/VVVVVV/first       zarr3 [blocks] uint64: the first key of each INDEX_BLOCK entries

Why this shape:
- Keyed by caption, not by record index: it survives shuffling, filtering and dataset mixtures,
  and deduplicates (the shapes world has ~2k distinct captions for 20k images).
- A reader holds no embeddings: `lookup` hashes the captions (64-bit blake2b keys), finds their
  index blocks in the in-memory directory `first` (8 bytes per INDEX_BLOCK captions), reads the
  blocks missing from a small LRU, then reads exactly the requested rows. A host's memory is the
  batch, not the table (the table is 0.5 MiB per caption with T5-XXL: 1.7 TB for CC3M).
- Only rows covered by the committed index version (`rows` in table.json) are visible; the
  writer's side of this contract (resuming, merging, collision checks) is in `precompute`.
- The same code reads `gs://`: files go through `muse_jax.storage`, arrays through tensorstore's
  `gcs` kvstore.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorstore as ts

from muse_jax import storage
from muse_jax.errors import UsageError

FORMAT = 2
INDEX_BLOCK = 1024  # Index entries per block: the unit a lookup reads (16 KiB).
INDEX_SHARD_BLOCKS = 256  # Index blocks per shard file (4 MiB).
CAPTION_BLOCK = 4096  # Captions per captions/*.json file.
# tensorstore's cache per table (shard indexes, recent rows). Small: random rows are rarely
# re-read, and a larger pool mostly adds allocator overhead (BENCHMARKS.md, section
# "Precomputed text embeddings: host memory of the table").
_CACHE_BYTES = 8 << 20
META = "table.json"
_EMBED = "`python -m muse_jax.embed --config=... --output_dir={d} --prompts_file=FILE`"

HashFn = Callable[[str], int]


def caption_hash(caption: str) -> int:
    """The 64-bit key of a caption: blake2b of its UTF-8 bytes."""
    return int.from_bytes(
        hashlib.blake2b(caption.encode("utf-8"), digest_size=8).digest(), "little"
    )


class UnknownCaptionError(UsageError):
    """A caption that was never embedded; `str()` is one line naming it and the fix."""


class HashCollisionError(UsageError):
    """Two different captions with the same 64-bit key; raised at write time."""


def hash_name(hash_fn: HashFn) -> str:
    return "blake2b-64" if hash_fn is caption_hash else getattr(hash_fn, "__name__", "custom")


def caption_keys(captions: Sequence[str], hash_fn: HashFn) -> np.ndarray:
    return np.fromiter((hash_fn(c) for c in captions), np.uint64, len(captions))


def ts_context() -> ts.Context:
    return ts.Context({"cache_pool": {"total_bytes_limit": _CACHE_BYTES}})


def open_array(path: str, context: ts.Context) -> ts.TensorStore:
    with storage.checked("opening array", path):
        return ts.open(
            {"driver": "zarr3", "kvstore": storage.kvstore_spec(path, directory=True)},
            context=context,
            open=True,
        ).result()


def create_array(
    path: str,
    shape: Sequence[int],
    dtype: str,
    shard_rows: int,
    context: ts.Context,
    *,
    inner_rows: int = 1,
    compress: bool = False,
) -> ts.TensorStore:
    """A zarr3 array whose shard files hold `shard_rows` rows of inner chunks of `inner_rows`:
    few files, and a read of one row touches only that row's bytes (a range read on gs://)."""
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compress:
        inner.append({"name": "zstd", "configuration": {"level": 3}})
    rest = list(shape[1:])
    metadata = {
        "shape": list(shape),
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard_rows, *rest]}},
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {"chunk_shape": [inner_rows, *rest], "codecs": inner},
            }
        ],
    }
    with storage.checked("creating array", path):
        spec = {
            "driver": "zarr3",
            "kvstore": storage.kvstore_spec(path, directory=True),
            "metadata": metadata,
        }
        return ts.open(spec, context=context, create=True).result()


def index_path(directory: str, version: int) -> str:
    return storage.join(directory, "index", f"{version:06d}")


def has_meta(directory: str) -> bool:
    return storage.exists(storage.join(directory, META))


def write_meta(directory: str, meta: dict) -> None:
    """Commits a table state: readers and resuming writers see exactly what `meta` says."""
    storage.write_json(storage.join(directory, META), meta)


def read_meta(directory: str) -> dict:
    if not has_meta(directory):
        embed = f"`python -m muse_jax.embed --config=... --output_dir={directory}`"
        raise FileNotFoundError(
            f"No text-embedding table in {directory} ({META} missing): run {embed} first."
        )
    path = storage.join(directory, META)
    meta = storage.read_json(path)
    if meta.get("format") != FORMAT:
        raise UsageError(
            f"{directory} holds a text-embedding table of another format ({meta.get('format', 1)}, "
            f"this code reads {FORMAT}): re-run `python -m muse_jax.embed` into a new --output_dir."
        )
    return meta


class CaptionFiles:
    """The captions of the rows, CAPTION_BLOCK per JSON file: for write-time collision checks
    and for listing a table. A lookup never reads them."""

    def __init__(self, directory: str):
        self.directory = storage.join(directory, "captions")

    def _path(self, block: int) -> str:
        return storage.join(self.directory, f"{block:08d}.json")

    def _block(self, block: int) -> list[str]:
        path = self._path(block)
        return storage.read_json(path) if storage.exists(path) else []

    def read(self, rows: np.ndarray) -> list[str]:
        """Captions of `rows` [N], each file read once."""
        out: list[str] = [""] * len(rows)
        blocks = rows // CAPTION_BLOCK
        for b in np.unique(blocks):
            captions = self._block(int(b))
            for i in np.flatnonzero(blocks == b):
                out[i] = captions[int(rows[i]) % CAPTION_BLOCK]
        return out

    def write(self, start: int, captions: Sequence[str]) -> None:
        """Captions of rows [start, start + N); what a crashed run left past `start` is dropped."""
        row, i = start, 0
        while i < len(captions):
            block, offset = divmod(row, CAPTION_BLOCK)
            kept = self._block(block)[:offset] if offset else []
            part = list(captions[i : i + CAPTION_BLOCK - offset])
            storage.write_json(self._path(block), kept + part, indent=None)
            row, i = row + len(part), i + len(part)

    def iterate(self, stop: int) -> Iterator[str]:
        for block in range(-(-stop // CAPTION_BLOCK)):
            yield from self._block(block)[: stop - block * CAPTION_BLOCK]


class SortedIndex:
    """One index version: key -> row through sorted blocks (the array's inner chunks), the first
    key of each block in memory, and an LRU of recently read blocks."""

    def __init__(self, directory: str, context: ts.Context, cache_blocks: int = 256):
        self.path = storage.join(directory, "keys")
        self.keys = open_array(self.path, context)
        self.block = self.keys.chunk_layout.read_chunk.shape[0]
        self.slab = self.keys.chunk_layout.write_chunk.shape[0]  # One shard file.
        first = storage.join(directory, "first")
        with storage.checked("reading", first):
            self.first = open_array(first, context).read().result()
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cache_blocks = cache_blocks
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.keys.shape[0]

    def find(self, keys: np.ndarray, *, group: int = 256) -> np.ndarray:
        """Rows [N] int64 of `keys` [N] uint64, -1 where absent. Reads `group` blocks at a time,
        so that a query of many keys never holds much of the index."""
        rows = np.full(len(keys), -1, np.int64)
        blocks = np.searchsorted(self.first, keys, side="right") - 1
        order = np.argsort(blocks, kind="stable")
        wanted, starts = np.unique(blocks[order], return_index=True)
        ends = np.append(starts[1:], len(keys))
        live = np.flatnonzero(wanted >= 0)  # Block -1: below the smallest key, absent.
        for g in range(0, len(live), group):
            part = live[g : g + group]
            got = self._blocks(wanted[part])
            for j in part:
                sel = order[starts[j] : ends[j]]
                block = got[int(wanted[j])]
                pos = np.minimum(np.searchsorted(block[:, 0], keys[sel]), len(block) - 1)
                hit = block[pos, 0] == keys[sel]
                rows[sel[hit]] = block[pos[hit], 1].astype(np.int64)
        return rows

    def _blocks(self, blocks: np.ndarray) -> dict[int, np.ndarray]:
        with self._lock:
            got = {int(b): self._cache[int(b)] for b in blocks if int(b) in self._cache}
        n = len(self)
        with storage.checked("reading", self.path):
            reads = {
                int(b): self.keys[int(b) * self.block : min((int(b) + 1) * self.block, n)].read()
                for b in blocks
                if int(b) not in got
            }
            fetched = {b: r.result() for b, r in reads.items()}
        with self._lock:
            got.update(fetched)
            self._cache.update(fetched)
            for b in got:
                self._cache.move_to_end(b)
            while len(self._cache) > self._cache_blocks:
                self._cache.popitem(last=False)
        return got

    def slabs(self) -> Iterator[np.ndarray]:
        """The sorted entries, one shard at a time: [<=slab, 2] (for merging)."""
        for start in range(0, len(self), self.slab):
            with storage.checked("reading", self.path):
                yield self.keys[start : min(start + self.slab, len(self))].read().result()


class EmbeddingTable:
    """Reads a table: caption -> ([S, D] embedding, [S] mask), a batch at a time.

    Memory does not grow with the number of captions beyond the index directory (8 bytes per
    INDEX_BLOCK captions); rows are read on demand. Safe to share between threads.
    """

    def __init__(self, directory: str, *, hash_fn: HashFn = caption_hash, cache_blocks: int = 256):
        self.directory = os.fspath(storage.path(directory))
        self.meta = read_meta(self.directory)
        if self.meta["hash"] != hash_name(hash_fn):
            raise UsageError(
                f"{self.directory} is keyed by {self.meta['hash']}, not {hash_name(hash_fn)}."
            )
        if not self.meta["rows"]:
            raise FileNotFoundError(
                f"The text-embedding table in {self.directory} has no indexed captions yet: "
                "let `python -m muse_jax.embed` finish (rerunning it resumes)."
            )
        self._hash_fn = hash_fn
        context = ts_context()
        self._emb = open_array(storage.join(self.directory, "emb"), context)
        self._mask = open_array(storage.join(self.directory, "mask"), context)
        self._index = SortedIndex(
            index_path(self.directory, self.meta["index"]), context, cache_blocks
        )

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def text_length(self) -> int:
        return int(self.meta["text_length"])

    def __len__(self) -> int:
        return int(self.meta["rows"])

    def __contains__(self, caption: str) -> bool:
        return bool(self._index.find(caption_keys([caption], self._hash_fn))[0] >= 0)

    def rows(self, captions: Sequence[str]) -> np.ndarray:
        """Row [N] of each caption; an unknown caption raises `UnknownCaptionError`."""
        rows = self._index.find(caption_keys(captions, self._hash_fn))
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            more = f" (and {len(missing) - 1} more of {len(captions)})" if len(missing) > 1 else ""
            raise UnknownCaptionError(
                f"Caption {captions[missing[0]][:200]!r}{more} is not in the precomputed text "
                f"embeddings at {self.directory}; embed it with {_EMBED.format(d=self.directory)}."
            )
        return rows

    def lookup(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """([N, S, D] float32, [N, S] int32) for captions, read from storage in one batch."""
        rows = self.rows(captions)
        with storage.checked("reading rows of", self.directory):
            emb, mask = self._emb[rows].read(), self._mask[rows].read()
            return emb.result().astype(np.float32), mask.result().astype(np.int32)

    def captions(self) -> Iterator[str]:
        """Every caption in the table, in row order (streamed from the caption files)."""
        return CaptionFiles(self.directory).iterate(len(self))
