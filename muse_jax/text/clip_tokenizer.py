"""CLIP's byte-level BPE tokenizer, read from the checkpoint directory with `tokenizers`.

The `tokenizers` library (Rust, no torch, no network) runs the same pipeline as
`transformers.CLIPTokenizer`: NFC, whitespace runs -> one space, lowercase; split on CLIP's regex
(contractions, letter runs, single digits, punctuation runs); byte-level BPE with a `</w>`
end-of-word suffix; `<|startoftext|> ... <|endoftext|>`. Like transformers (and unlike OpenAI's
reference `clip.tokenize`), it does not run `ftfy`/HTML unescaping, so mojibake or "&amp;" in a
caption tokenize as written.

Captions are truncated to 77 tokens *including* BOS and EOS (75 content tokens, then EOS, as both
references do) and right-padded with the pad token (openai's CLIP: the EOS); causal attention and EOS pooling make
the padding irrelevant to the pooled embedding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from muse_jax import storage
from muse_jax.errors import UsageError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"

# CLIP's pre-tokenisation regex (the special tokens, contractions, letters, digits, the rest).
_SPLIT = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)


def _from_vocab_and_merges(vocab_file: str, merges_file: str) -> tokenizers.Tokenizer:
    """Builds CLIP's pipeline around a vocab.json + merges.txt pair (local or gs://)."""
    vocab = json.loads(storage.read_bytes(vocab_file).decode("utf-8"))
    text = storage.read_bytes(merges_file).decode("utf-8")
    # Universal newlines, as open(..., encoding="utf-8") reads them.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    # merges.txt starts with a "#version" line; a trailing newline leaves an empty line.
    merges = [tuple(m.split()) for m in lines if m and not m.startswith("#version")]
    for token in (BOS, EOS):
        if token not in vocab:
            raise UsageError(f"{vocab_file}: special token {token!r} is missing.")
    tok = tokenizers.Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=EOS,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.RobertaProcessing(
        (EOS, vocab[EOS]), (BOS, vocab[BOS]), trim_offsets=False, add_prefix_space=False
    )
    return tok


SPECIAL_TOKENS_FILE, TOKENIZER_CONFIG_FILE = "special_tokens_map.json", "tokenizer_config.json"
FILES = (TOKENIZER_FILE, VOCAB_FILE, MERGES_FILE, SPECIAL_TOKENS_FILE, TOKENIZER_CONFIG_FILE)


def _pad_token(path: str) -> str:
    """The pad token transformers' tokenizer of `path` uses (EOS when no file names one)."""
    for name in (SPECIAL_TOKENS_FILE, TOKENIZER_CONFIG_FILE):
        file = storage.join(path, name)
        if storage.exists(file):
            pad = json.loads(storage.read_bytes(file).decode("utf-8")).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad:
                return pad
    return EOS


class CLIPTokenizer:
    """Captions -> [N, 77] int32 ids, from the files a transformers CLIP checkpoint ships."""

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, max_length: int = MAX_LENGTH, pad_token: str = EOS
    ):
        self.bos_id = tokenizer.token_to_id(BOS)
        self.eos_id = tokenizer.token_to_id(EOS)
        if self.bos_id is None or self.eos_id is None:
            raise UsageError(f"The tokenizer has no {BOS!r} / {EOS!r} token; is it CLIP's?")
        self.pad_id = tokenizer.token_to_id(pad_token)
        if self.pad_id is None:
            raise UsageError(f"The tokenizer's pad token {pad_token!r} is not in its vocabulary.")
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=pad_token)
        self._tokenizer = tokenizer
        self.max_length = max_length
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_pretrained(cls, path: str, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
        """Reads `path/tokenizer.json`, or else `path/vocab.json` + `path/merges.txt`; `path`
        may be local or gs:// (the files are read whole: `Tokenizer.from_file` is local only).
        The pad token is the one `special_tokens_map.json` or `tokenizer_config.json` names
        (openai's CLIP pads with EOS, LAION's OpenCLIP tokenizers with "!"), else EOS."""
        pad = _pad_token(path)
        tokenizer_file = storage.join(path, TOKENIZER_FILE)
        if storage.exists(tokenizer_file):
            text = storage.read_bytes(tokenizer_file).decode("utf-8")
            return cls(tokenizers.Tokenizer.from_str(text), max_length, pad)
        vocab, merges = storage.join(path, VOCAB_FILE), storage.join(path, MERGES_FILE)
        if not (storage.exists(vocab) and storage.exists(merges)):
            raise FileNotFoundError(
                f"{path}: no CLIP tokenizer; expected {TOKENIZER_FILE}, or {VOCAB_FILE} and "
                f"{MERGES_FILE} (as in the openai/clip-vit-large-patch14 repository)."
            )
        return cls(_from_vocab_and_merges(vocab, merges), max_length, pad)

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        """Returns [len(captions), max_length] int32: BOS, up to 75 tokens, EOS, EOS padding."""
        if isinstance(captions, str):
            raise TypeError("Pass a sequence of captions, not a single string.")
        encodings = self._tokenizer.encode_batch(list(captions))
        ids = np.asarray([e.ids for e in encodings], dtype=np.int32).reshape(-1, self.max_length)
        return ids
