"""What the base stage conditions on: caption token ids (encoder in the graph) or precomputed
embeddings (`config.text_embeddings`, written by `muse_jax.embed`) — one interface for both.

Batches and prompts come out as {'text_ids', 'text_mask'} or {'text_emb', 'text_mask'}; the
empty caption "" is the unconditional input of classifier-free guidance in both cases.

The two routes of the paper's frozen T5: in the graph (`text_embeddings` empty; the base stage
loads the encoder's weights sharded by the same logical-axis rules as the transformer and runs
it in every step), or precomputed once into a table (local or gs://) whose rows are read per
batch in bf16 and handed to the model as float32, so host memory is a batch, not the table.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np

from muse_jax import storage
from muse_jax.data import tasks, vocabulary
from muse_jax.data.vocabulary import CLIP_PREFIX, encode_ids
from muse_jax.text.clip_tokenizer import CLIPTokenizer
from muse_jax.text.embeddings import EmbeddingTable


def clip_tokenizer_dir(config) -> str | None:
    """The directory of 'clip:<directory>' in `config.data.vocabulary`, else None."""
    name = config.data.get("vocabulary", "")
    return name[len(CLIP_PREFIX) :] if name.startswith(CLIP_PREFIX) else None


def embeddings_dir(config) -> str:
    return config.get("text_embeddings", "")


@functools.lru_cache(maxsize=4)
def _table(directory: str) -> EmbeddingTable:
    """One reader per table and process (its index directory and caches are shared)."""
    return EmbeddingTable(directory)


class TextConditioner:
    """Captions -> the model's text input. `create_vocab=False` (sampling a trained model) reads
    the vocabulary and never writes one."""

    def __init__(self, config, workdir: str, create_vocab: bool = True):
        self.config = config
        self.workdir = workdir
        self.create_vocab = create_vocab
        directory = embeddings_dir(config)
        self.table = _table(os.fspath(storage.path(directory))) if directory else None

    @property
    def precomputed(self) -> bool:
        return self.table is not None

    @functools.cached_property
    def clip(self) -> CLIPTokenizer | None:
        """CLIP's BPE tokenizer when `config.data.vocabulary` is 'clip:<directory>'."""
        directory = clip_tokenizer_dir(self.config)
        if directory is None:
            return None
        return CLIPTokenizer.from_pretrained(directory, self.config.data.text_length)

    @property
    def host_encoded(self) -> bool:
        """Captions become the model's input here, per batch, not in the data pipeline
        (embedding lookups, and CLIP's tokenizer, whose BOS/padding seqio does not follow)."""
        return self.precomputed or self.clip is not None

    @functools.cached_property
    def vocab(self):
        if self.clip is not None:
            return self.clip
        return vocabulary.get_vocabulary(
            self.config, tasks.data_dir(self.config, self.workdir), create=self.create_vocab
        )

    def encode(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
        """Captions -> the model's text input (numpy, [N, S] / [N, S, D])."""
        if self.table is not None:
            emb, mask = self.table.lookup(captions)
            return {"text_emb": emb, "text_mask": mask}
        if self.clip is not None:
            ids = self.clip(list(captions))
            # 1 up to and including the first EOS (the encoder itself reads no mask).
            first_eos = np.argmax(ids == self.clip.eos_id, axis=-1)
            mask = (np.arange(ids.shape[1])[None] <= first_eos[:, None]).astype(np.int32)
            return {"text_ids": ids, "text_mask": mask}
        ids, mask = encode_ids(self.vocab, captions, self.config.data.text_length)
        return {"text_ids": ids, "text_mask": mask}

    def add_to_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Replaces a batch's captions by their host-side encoding (see `host_encoded`)."""
        captions = [c.decode() if isinstance(c, bytes) else str(c) for c in batch.pop("caption")]
        batch.pop("text_ids", None)
        batch.update(self.encode(captions))
        return batch


class ShapeConditioner:
    """The text input's shapes and dtypes without a vocabulary or an embedding table: what
    `muse_jax.aot` compiles a stage with. `encode` returns zeros of the real input's shapes."""

    def __init__(self, config, precomputed: bool):
        self.config = config
        self._precomputed = precomputed

    @property
    def precomputed(self) -> bool:
        return self._precomputed

    @functools.cached_property
    def vocab(self):
        """An object with the vocabulary size the text encoder embeds."""
        import types

        from muse_jax.models import t5

        tcfg = self.config.text_encoder
        name = self.config.data.get("vocabulary", "shapes")
        if tcfg.name == "t5":
            size = t5.get_config(tcfg.preset).vocab_size
        elif name == "shapes":
            from muse_jax.data import shapes

            size = len(shapes.vocabulary_words()) + 3  # See vocabulary.train_shapes_vocabulary.
        else:
            size = vocabulary.get_vocabulary(self.config, "", create=False).vocab_size
        return types.SimpleNamespace(vocab_size=size)

    def encode(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
        n, length = len(captions), self.config.data.text_length
        mask = np.zeros((n, length), np.int32)
        if not self.precomputed:
            return {"text_ids": np.zeros((n, length), np.int32), "text_mask": mask}
        from muse_jax.models import factory

        width = factory.text_width(self.config)
        return {"text_emb": np.zeros((n, length, width), np.float32), "text_mask": mask}
