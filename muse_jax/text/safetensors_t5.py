"""Reads and writes T5 v1.1 encoder weights in the safetensors layout that `transformers` writes.

A checkpoint is a directory with `config.json` and either `model.safetensors` or a sharded
`model.safetensors.index.json` plus the shards it names. Tensors are read with the `safetensors`
numpy API (never pickle); decoder tensors of full encoder-decoder checkpoints are skipped without
being read. The result is the T5X-named tree of `muse_jax.models.t5.T5Encoder` as float32 numpy.

Hugging Face stores `torch.nn.Linear` weights as [out, in]; Flax kernels are [in, out], so every
projection is transposed. The relative-position table is [buckets, heads] there and
[heads, buckets] here.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from muse_jax.errors import UsageError
from muse_jax.models import t5

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Full T5 checkpoints carry these; the encoder never reads them.
_IGNORED_PREFIXES = ("decoder.", "lm_head.")
_EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")


class CheckpointError(UsageError):
    """A checkpoint does not match the encoder it is being loaded into."""


def config_from_hf(path: str, dtype: str = "float32") -> t5.T5Config:
    """Builds a `T5Config` from `path/config.json`, refusing anything but T5 v1.1 "gated-gelu"."""
    file = os.path.join(path, CONFIG_FILE)
    with open(file) as f:
        hf = json.load(f)
    proj = hf.get("feed_forward_proj", "relu")
    if proj != "gated-gelu":
        raise CheckpointError(
            f"{file}: feed_forward_proj is {proj!r}; only T5 v1.1 'gated-gelu' encoders are supported."
        )
    try:
        return t5.T5Config(
            vocab_size=hf["vocab_size"],
            d_model=hf["d_model"],
            d_kv=hf["d_kv"],
            d_ff=hf["d_ff"],
            num_layers=hf["num_layers"],
            num_heads=hf["num_heads"],
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
            dtype=dtype,
        )
    except KeyError as e:
        raise CheckpointError(f"{file}: missing field {e.args[0]!r}.") from None


def _hf_to_flax(config: t5.T5Config) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Maps each encoder key of the HF layout to (path in the Flax tree, transpose?)."""
    attn = {"q": "query", "k": "key", "v": "value", "o": "out"}
    mlp = ("wi_0", "wi_1", "wo")
    table: dict[str, tuple[tuple[str, ...], bool]] = {
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (
            ("encoder", "relpos_bias", "rel_embedding"),
            True,
        ),
        "encoder.final_layer_norm.weight": (("encoder", "encoder_norm", "scale"), False),
    }
    for i in range(config.num_layers):
        hf, fx = f"encoder.block.{i}.layer", ("encoder", f"layers_{i}")
        for a, b in attn.items():
            table[f"{hf}.0.SelfAttention.{a}.weight"] = ((*fx, "attention", b, "kernel"), True)
        table[f"{hf}.0.layer_norm.weight"] = ((*fx, "pre_attention_layer_norm", "scale"), False)
        for m in mlp:
            table[f"{hf}.1.DenseReluDense.{m}.weight"] = ((*fx, "mlp", m, "kernel"), True)
        table[f"{hf}.1.layer_norm.weight"] = ((*fx, "pre_mlp_layer_norm", "scale"), False)
    return table


def _weight_files(path: str) -> dict[str, str]:
    """Maps every tensor key to the file holding it (one file, or the shards of an index)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    single = os.path.join(path, WEIGHTS_FILE)
    if not os.path.exists(single):
        raise CheckpointError(f"{path}: neither {WEIGHTS_FILE} nor {INDEX_FILE} exists.")
    with safe_open(single, framework="np") as f:
        return dict.fromkeys(f.keys(), single)


def _read_bf16(file: str, key: str) -> np.ndarray:
    """Reads one BF16 tensor as float32: numpy has no bfloat16, so safetensors' numpy API refuses.

    Uses the documented safetensors layout (u64 header size, JSON header with byte offsets
    relative to the data section); bfloat16 is the top half of a float32.
    """
    with open(file, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(header_size))[key]
        begin, end = info["data_offsets"]
        f.seek(8 + header_size + begin)
        raw = np.frombuffer(f.read(end - begin), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def _read(files: dict[str, str], keys: list[str]) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yields (key, float32 array, file) for `keys`, opening each file once."""
    by_file: dict[str, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    for file, file_keys in by_file.items():
        with safe_open(file, framework="np") as f:
            for k in file_keys:
                if f.get_slice(k).get_dtype() == "BF16":
                    yield k, _read_bf16(file, k), file
                else:
                    yield k, np.asarray(f.get_tensor(k), dtype=np.float32), file


def load_encoder_params(path: str, config: t5.T5Config | None = None) -> dict:
    """Loads the encoder of a `transformers` T5 v1.1 safetensors checkpoint.

    Args:
      path: directory with config.json and model.safetensors (or an index and its shards).
      config: the encoder to load into; defaults to `config_from_hf(path)`.
    Returns:
      The unboxed `T5Encoder` parameter tree, float32 numpy arrays (bf16 files are upcast).
    Raises:
      CheckpointError: one line naming the key and file, for a missing key, an unexpected
        (non-decoder) key, or a shape that differs from the module's.
    """
    config = config or config_from_hf(path)
    files = _weight_files(path)
    index = os.path.join(path, INDEX_FILE)
    source = index if os.path.exists(index) else os.path.join(path, WEIGHTS_FILE)
    table = _hf_to_flax(config)
    expected = t5.param_shapes(config)

    embedding = next((k for k in _EMBEDDING_KEYS if k in files), None)
    if embedding is None:
        raise CheckpointError(f"{source}: missing key {_EMBEDDING_KEYS[0]!r} (token embedding).")
    for k, file in files.items():
        if k not in table and k not in _EMBEDDING_KEYS and not k.startswith(_IGNORED_PREFIXES):
            raise CheckpointError(
                f"{file}: unexpected key {k!r} for a {config.num_layers}-layer encoder."
            )
    for k in table:
        if k not in files:
            raise CheckpointError(f"{source}: missing key {k!r}.")
    table[embedding] = (("token_embedder", "embedding"), False)

    params: dict = {}
    for k, value, file in _read(files, list(table)):
        where, transpose = table[k]
        want = expected
        for name in where:
            want = want[name]
        hf_shape = tuple(want.shape)[::-1] if transpose else tuple(want.shape)
        if value.shape != hf_shape:
            raise CheckpointError(
                f"{file}: key {k!r} has shape {value.shape}, expected {hf_shape}."
            )
        node = params
        for name in where[:-1]:
            node = node.setdefault(name, {})
        node[where[-1]] = np.ascontiguousarray(value.T if transpose else value)
    return params


def save_encoder_params(params: dict, config: t5.T5Config, path: str) -> None:
    """Writes `params` (unboxed `T5Encoder` tree) as a `transformers` T5EncoderModel directory.

    The inverse of `load_encoder_params`: config.json plus a single model.safetensors in float32,
    loadable by `transformers.T5EncoderModel.from_pretrained(path)`.
    """
    os.makedirs(path, exist_ok=True)
    tensors = {"shared.weight": params["token_embedder"]["embedding"]}
    for k, (where, transpose) in _hf_to_flax(config).items():
        value = params
        for name in where:
            value = value[name]
        value = np.asarray(value, dtype=np.float32)
        tensors[k] = value.T if transpose else value
    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
        os.path.join(path, WEIGHTS_FILE),
        metadata={"format": "pt"},
    )
    hf_config = {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "d_kv": config.d_kv,
        "d_ff": config.d_ff,
        "num_layers": config.num_layers,
        "num_decoder_layers": config.num_layers,
        "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
        "is_encoder_decoder": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2)
