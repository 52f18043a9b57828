"""Reads `transformers` CLIP checkpoints (safetensors, local or gs://) into `models.clip`:

    HF [out, in] Linear weights    -> Flax [in, out] kernels (transposed)
    HF [D, C, p, p] patch conv     -> Flax [p, p, C, D] conv kernel
    LayerNorm weight / bias        -> scale / bias
    Embedding weight               -> embedding

`CLIPModel` directories for CLIP score; `CLIPTextModelWithProjection` directories (aMUSEd's and
SDXL's text encoder) for `models.clip.CLIPTextEncoder`. The model's names are re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import storage
from muse_jax.models.clip import (  # noqa: F401 -- re-exported: the model beside its loader.
    ACTIVATIONS,
    CLIP,
    LEGACY_EOS_TOKEN_ID,
    PRESETS,
    CLIPConfig,
    CLIPTextEncoder,
    TextConfig,
    TowerConfig,
    VisionConfig,
    get_config,
    init_params,
    param_count,
    param_shapes,
    text_encoder,
)
from muse_jax.text.safetensors_t5 import CheckpointError, _read, _weight_files

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- checkpoints


def _tower_fields(hf: dict, tower: str, cls: type[TowerConfig]) -> dict:
    """The tower's config as transformers 5.24's `CLIPConfig` resolves it.

    Old checkpoints (openai/clip-vit-large-patch14 among them) carry both `text_config` and a
    `text_config_dict`; transformers then builds a full `CLIPTextConfig` from the *_dict (its
    defaults filling the gaps) and lets it override `text_config` key by key, so e.g. their
    stale `eos_token_id: 2` becomes the default 49407.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    fields = {**defaults, **(hf.get(f"{tower}_config") or {})}
    override = hf.get(f"{tower}_config_dict")
    if override is not None:
        fields.update({**defaults, **override})
    return {k: fields[k] for k in defaults}


def config_from_hf(path: str, dtype: str = "float32") -> CLIPConfig:
    """Builds a `CLIPConfig` from `path/config.json` of a `transformers` `CLIPModel`."""
    if not storage.isdir(path):
        raise CheckpointError(f"{path}: CLIP checkpoint directory does not exist.")
    file = storage.join(path, CONFIG_FILE)
    if not storage.exists(file):
        raise CheckpointError(
            f"{path}: missing {CONFIG_FILE} (a transformers CLIPModel directory)."
        )
    hf = storage.read_json(file)
    if hf.get("model_type") != "clip" or "vision_config" not in hf or "text_config" not in hf:
        raise CheckpointError(
            f"{file}: not a CLIP config (model_type={hf.get('model_type')!r}); expected a "
            "transformers CLIPModel with text_config and vision_config."
        )
    vision = _tower_fields(hf, "vision", VisionConfig)
    text = _tower_fields(hf, "text", TextConfig)
    for name, fields in (("vision", vision), ("text", text)):
        bad = {k: v for k, v in fields.items() if isinstance(v, (list, tuple, dict))}
        if bad:
            raise CheckpointError(f"{file}: {name}_config fields {bad} must be single numbers.")
        if fields["hidden_act"] not in ACTIVATIONS:
            raise CheckpointError(
                f"{file}: {name}_config.hidden_act {fields['hidden_act']!r} is not one of "
                f"{sorted(ACTIVATIONS)}."
            )
    return CLIPConfig(
        vision=VisionConfig(**vision),
        text=TextConfig(**text),
        projection_dim=hf.get("projection_dim", 512),
        dtype=dtype,
    )


def _hf_to_flax(config: CLIPConfig) -> dict[str, tuple[tuple[str, ...], str]]:
    """Maps each key of the HF layout to (path in the Flax tree, "linear" | "conv" | "copy")."""
    table: dict[str, tuple[tuple[str, ...], str]] = {
        "logit_scale": (("logit_scale",), "copy"),
        "visual_projection.weight": (("visual_projection", "kernel"), "linear"),
        "text_projection.weight": (("text_projection", "kernel"), "linear"),
    }

    def norm(hf: str, fx: tuple[str, ...]) -> None:
        table[f"{hf}.weight"] = ((*fx, "scale"), "copy")
        table[f"{hf}.bias"] = ((*fx, "bias"), "copy")

    def linear(hf: str, fx: tuple[str, ...]) -> None:
        table[f"{hf}.weight"] = ((*fx, "kernel"), "linear")
        table[f"{hf}.bias"] = ((*fx, "bias"), "copy")

    for tower, layers in (
        ("vision_model", config.vision.num_hidden_layers),
        ("text_model", config.text.num_hidden_layers),
    ):
        for i in range(layers):
            hf, fx = f"{tower}.encoder.layers.{i}", (tower, "encoder", f"layers_{i}")
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                linear(f"{hf}.self_attn.{proj}", (*fx, "self_attn", proj))
            linear(f"{hf}.mlp.fc1", (*fx, "mlp", "fc1"))
            linear(f"{hf}.mlp.fc2", (*fx, "mlp", "fc2"))
            norm(f"{hf}.layer_norm1", (*fx, "layer_norm1"))
            norm(f"{hf}.layer_norm2", (*fx, "layer_norm2"))
    v, t = "vision_model", "text_model"
    table[f"{v}.embeddings.class_embedding"] = ((v, "class_embedding"), "copy")
    table[f"{v}.embeddings.patch_embedding.weight"] = ((v, "patch_embedding", "kernel"), "conv")
    table[f"{v}.embeddings.position_embedding.weight"] = (
        (v, "position_embedding", "embedding"),
        "copy",
    )
    norm(f"{v}.pre_layrnorm", (v, "pre_layrnorm"))
    norm(f"{v}.post_layernorm", (v, "post_layernorm"))
    table[f"{t}.embeddings.token_embedding.weight"] = ((t, "token_embedding", "embedding"), "copy")
    table[f"{t}.embeddings.position_embedding.weight"] = (
        (t, "position_embedding", "embedding"),
        "copy",
    )
    norm(f"{t}.final_layer_norm", (t, "final_layer_norm"))
    return table


# safetensors dtype names -> numpy; BF16 (no numpy type) is widened by hand in `_read_remote`.
_NUMPY_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


def _remote_weight_files(path: str) -> dict[str, str]:
    """`_weight_files` for a gs:// directory: the index's weight map, or else the keys listed in
    the header of the single file (read without its tensors)."""
    index = storage.join(path, INDEX_FILE)
    if storage.exists(index):
        weight_map = storage.read_json(index)["weight_map"]
        return {k: storage.join(path, v) for k, v in weight_map.items()}
    single = storage.join(path, WEIGHTS_FILE)
    if not storage.exists(single):
        raise CheckpointError(f"{path}: neither {WEIGHTS_FILE} nor {INDEX_FILE} exists.")
    with storage.checked("reading", single), storage.path(single).open("rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    return dict.fromkeys(sorted(k for k in header if k != "__metadata__"), single)


def _read_remote(files: dict[str, str], keys: list[str]) -> Iterator[tuple[str, np.ndarray, str]]:
    """`_read` for gs:// files: safetensors memory-maps local files only, so each file is read
    whole into memory (CLIP ViT-L/14 is 1.7 GB) and parsed from its bytes, once per file."""
    from safetensors import deserialize

    by_file: dict[str, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    for file, file_keys in by_file.items():
        with storage.checked("reading", file):
            tensors = dict(deserialize(storage.read_bytes(file)))
        for k in file_keys:
            t = tensors.pop(k)
            if t["dtype"] == "BF16":  # bfloat16 is the top half of a float32.
                raw = np.frombuffer(t["data"], dtype="<u2").astype(np.uint32) << 16
                value = raw.view(np.float32)
            elif t["dtype"] in _NUMPY_DTYPES:
                value = np.frombuffer(t["data"], dtype=_NUMPY_DTYPES[t["dtype"]])
            else:
                raise CheckpointError(f"{file}: key {k!r} has unsupported dtype {t['dtype']}.")
            yield k, np.asarray(value, dtype=np.float32).reshape(t["shape"]), file
        del tensors


_TO_FLAX = {
    "copy": lambda x: x,
    "linear": lambda x: x.T,  # torch Linear [out, in] -> Flax [in, out]
    "conv": lambda x: x.transpose(2, 3, 1, 0),  # torch [D, C, p, p] -> Flax [p, p, C, D]
}
_FROM_FLAX = {
    "copy": lambda x: x,
    "linear": lambda x: x.T,
    "conv": lambda x: x.transpose(3, 2, 0, 1),
}


def load_params(path: str, config: CLIPConfig | None = None) -> dict:
    """Loads a `transformers` `CLIPModel` safetensors checkpoint (single file or sharded).

    Args:
      path: directory with config.json and model.safetensors (or an index and its shards).
      config: the model to load into; defaults to `config_from_hf(path)`.
    Returns:
      The unboxed `CLIP` parameter tree, float32 numpy arrays (fp16/bf16 files are upcast).
    Raises:
      CheckpointError: one line naming the key and file, for a missing key, an unexpected key
        (e.g. a checkpoint of another architecture), or a shape that differs from the model's.
    """
    config = config or config_from_hf(path)
    return _load_table(path, _hf_to_flax(config), param_shapes(config), "a CLIPModel")


def text_encoder_from_hf(hf: dict, source: str, hidden_layer: int = -2) -> dict[str, Any]:
    """The `config.text_encoder` block (name 'clip') of a transformers
    `CLIPTextModelWithProjection` config.json dict (aMUSEd's and SDXL's `text_encoder`)."""
    if hf.get("model_type") != "clip_text_model":
        raise CheckpointError(
            f"{source}: model_type {hf.get('model_type')!r}, expected 'clip_text_model' (a "
            "transformers CLIPTextModelWithProjection)."
        )
    defaults = {f.name: f.default for f in dataclasses.fields(TextConfig)}
    fields = {k: hf.get(k, v) for k, v in defaults.items()}
    if fields["hidden_act"] not in ACTIVATIONS:
        raise CheckpointError(
            f"{source}: hidden_act {fields['hidden_act']!r} is not one of {sorted(ACTIVATIONS)}."
        )
    return dict(
        name="clip",
        clip=fields,
        projection_dim=int(hf.get("projection_dim", 512)),
        hidden_layer=hidden_layer,
    )


def load_text_encoder_params(path: str, encoder: CLIPTextEncoder) -> dict:
    """The unboxed `encoder` parameters from a transformers `CLIPTextModelWithProjection`
    directory (model.safetensors or sharded; local or gs://)."""
    ids = jnp.zeros((1, encoder.config.max_position_embeddings), jnp.int32)
    expected = nn.unbox(jax.eval_shape(encoder.init, jax.random.key(0), ids)["params"])
    full = _hf_to_flax(CLIPConfig(text=encoder.config, vision=VisionConfig(num_hidden_layers=0)))
    table = {k: v for k, v in full.items() if k.startswith("text_model.")}
    table["text_projection.weight"] = (("text_projection", "kernel"), "linear")
    return _load_table(path, table, expected, "a CLIPTextModelWithProjection")


def _load_table(path: str, table: dict, expected: Any, what: str) -> dict:
    """The tree `expected` read from the safetensors files of directory `path` by `table`
    (transformers key -> (Flax path, layout)); one-line CheckpointErrors."""
    remote = storage.is_remote(path)
    if not storage.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory does not exist.")
    files = _remote_weight_files(path) if remote else _weight_files(path)
    index = storage.join(path, INDEX_FILE)
    source = index if storage.exists(index) else storage.join(path, WEIGHTS_FILE)
    for file in sorted(set(files.values())):
        if not storage.exists(file):
            raise CheckpointError(f"{source}: names {os.path.basename(file)}, which is missing.")
    for k, file in files.items():
        # position_ids are non-trainable buffers that older transformers versions saved.
        if k not in table and not k.endswith("embeddings.position_ids"):
            raise CheckpointError(f"{file}: unexpected key {k!r} for {what} of this config.")
    for k in table:
        if k not in files:
            raise CheckpointError(f"{source}: missing key {k!r}.")
    params: dict = {}
    for k, value, file in (_read_remote if remote else _read)(files, list(table)):
        where, kind = table[k]
        want = expected
        for name in where:
            want = want[name]
        value = _TO_FLAX[kind](value)
        if value.shape != tuple(want.shape):
            hf_shape = _FROM_FLAX[kind](np.empty(want.shape, np.uint8)).shape
            raise CheckpointError(
                f"{file}: key {k!r} has shape {_FROM_FLAX[kind](value).shape}, expected {hf_shape}."
            )
        node = params
        for name in where[:-1]:
            node = node.setdefault(name, {})
        node[where[-1]] = np.array(value, np.float32, order="C")  # keeps 0-d logit_scale 0-d
    return params
