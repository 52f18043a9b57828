"""Precomputed text embeddings: a caption-keyed table written in chunks, read by the trainer.

Keying by caption (not by record index) survives shuffling, filtering and dataset mixtures, and
deduplicates: the shapes world has ~2k distinct captions for 20k images. Chunks are written
atomically, so an interrupted `muse_jax.embed` resumes at the first missing chunk.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

import ml_dtypes
import numpy as np

_META = "table.json"


def chunk_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"chunk_{index:06d}.npz")


def write_meta(directory: str, meta: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, _META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(directory, _META))


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, _META)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No text-embedding table in {directory} ({_META} missing): run `python -m muse_jax.embed` first."
        )
    with open(path) as f:
        return json.load(f)


def write_chunk(
    directory: str,
    index: int,
    captions: Sequence[str],
    emb: np.ndarray,
    mask: np.ndarray,
    dtype: str,
) -> None:
    """Writes one chunk atomically: [N] captions, [N, S, D] embeddings, [N, S] mask."""
    os.makedirs(directory, exist_ok=True)
    values = (
        emb.astype(ml_dtypes.bfloat16).view(np.uint16)
        if dtype == "bfloat16"
        else emb.astype(np.float32)
    )
    tmp = chunk_path(directory, index) + ".tmp.npz"
    np.savez(
        tmp,
        captions=np.asarray(list(captions), dtype=np.str_),
        emb=values,
        mask=mask.astype(np.int8),
        dtype=np.asarray(dtype),
    )
    os.replace(tmp, chunk_path(directory, index))


def completed_chunks(directory: str) -> list[int]:
    return sorted(
        int(os.path.basename(p)[6:12])
        for p in glob.glob(os.path.join(directory, "chunk_*.npz"))
        if not p.endswith(".tmp.npz")
    )


def embedded_captions(directory: str) -> set[str]:
    """Captions already in the table, reading only that field of each chunk (resuming must not
    load gigabytes of embeddings)."""
    captions: set[str] = set()
    for i in completed_chunks(directory):
        with np.load(chunk_path(directory, i)) as z:
            captions.update(str(c) for c in z["captions"])
    return captions


class EmbeddingTable:
    """All chunks of a table in memory: caption -> ([S, D] float32 embedding, [S] mask)."""

    def __init__(self, directory: str):
        self.meta = read_meta(directory)
        captions, embs, masks = [], [], []
        for i in completed_chunks(directory):
            with np.load(chunk_path(directory, i)) as z:
                emb = z["emb"]
                if str(z["dtype"]) == "bfloat16":
                    emb = emb.view(ml_dtypes.bfloat16)
                captions += [str(c) for c in z["captions"]]
                embs.append(emb.astype(np.float32))
                masks.append(z["mask"].astype(np.int32))
        if not captions:
            raise FileNotFoundError(f"The text-embedding table in {directory} has no chunks yet.")
        self.emb = np.concatenate(embs)
        self.mask = np.concatenate(masks)
        self.row = {c: i for i, c in enumerate(captions)}

    @property
    def dim(self) -> int:
        return self.emb.shape[-1]

    def lookup(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """([N, S, D] float32, [N, S] int32) for captions; unknown captions fail clearly."""
        rows = []
        for c in captions:
            if c not in self.row:
                raise KeyError(
                    f"Caption {c!r} is not in the precomputed text embeddings; embed it with "
                    "`python -m muse_jax.embed ... --prompts_file=FILE`."
                )
            rows.append(self.row[c])
        return self.emb[rows], self.mask[rows]
