"""Vocabularies: a word-level SentencePiece model trained on the shapes grammar, or a user's file.

The embedded default trains its own SentencePiece model (T5's id convention: pad 0, eos 1,
unk 2) from captions it generates, so nothing is downloaded and every word is one token.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm
import seqio

from muse_jax import storage
from muse_jax.data import shapes


def _training_captions(num: int = 4000, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    captions = shapes.all_single_object_captions()
    captions += [shapes.caption(shapes.sample_scene(rng, two_object_prob=1.0)) for _ in range(num)]
    captions += [" ".join(shapes.vocabulary_words())]
    return captions


def train_shapes_vocabulary(path: str) -> str:
    """Trains (once) a word-level SentencePiece model covering the grammar; returns its path."""
    if storage.exists(path):
        return path
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_captions()),
        model_writer=model,
        model_type="word",
        vocab_size=len(shapes.vocabulary_words()) + 3,
        use_all_vocab=True,  # Every word of the grammar becomes a piece.
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    # Atomic: a concurrent or interrupted run never sees half a model; concurrent writers (hosts
    # of a pod) produce identical files, so the last one wins harmlessly.
    storage.write_bytes(path, model.getvalue())
    return path


# `config.data.vocabulary='clip:<directory>'`: CLIP's BPE tokenizer files (see `text.conditioning`).
CLIP_PREFIX = "clip:"


def get_vocabulary(config, data_dir: str, create: bool = True) -> seqio.Vocabulary:
    """The vocabulary the config names: 'shapes' (trained here), a .model path, or 'byte'
    ('clip:<dir>' gives the data pipeline bytes: see `text.conditioning`).

    `create=False` (readers of a trained model) never writes: a missing shapes vocabulary is a
    FileNotFoundError instead of a new file in someone's workdir.
    """
    name = config.data.get("vocabulary", "shapes")
    if name == "shapes":
        path = storage.join(data_dir, "shapes_words.model")
        if not create and not storage.exists(path):
            raise FileNotFoundError(
                f"No vocabulary at {path}: train the experiment first (its data build writes it), "
                "or check --workdir."
            )
        return seqio.SentencePieceVocabulary(train_shapes_vocabulary(path))
    if name == "byte":
        return seqio.ByteVocabulary()
    if name.startswith(CLIP_PREFIX):
        # CLIP's BPE tokenizes captions on the host (`text.conditioning.TextConditioner`), which
        # replaces whatever ids the data pipeline made; bytes keep the pipeline's shape.
        return seqio.ByteVocabulary()
    if not storage.exists(name):
        raise FileNotFoundError(
            f"config.data.vocabulary={name!r} is neither 'shapes', 'byte' nor an existing "
            "SentencePiece .model file."
        )
    return seqio.SentencePieceVocabulary(name)


def encode_ids(vocab, captions: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """T5 convention: ids + EOS, zero padding; captions longer than `length` are cut with a warning."""
    ids = np.zeros((len(captions), length), np.int32)
    mask = np.zeros((len(captions), length), np.int32)
    for i, caption in enumerate(captions):
        toks = list(vocab.encode(caption))
        if len(toks) + 1 > length:
            warnings.warn(
                f"Caption cut to {length} tokens (text_length): {caption[:80]!r}", stacklevel=2
            )
        toks = toks[: length - 1] + [vocab.eos_id]
        ids[i, : len(toks)] = toks
        mask[i, : len(toks)] = 1
    return ids, mask
