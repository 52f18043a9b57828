"""Loads a frozen text encoder's weights from the formats users have: T5X checkpoints (legacy
tensorstore or orbax) and transformers-style safetensors directories (T5, and CLIP's text tower
with projection). Nothing is downloaded."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from muse_jax import storage
from muse_jax.errors import UsageError


def is_safetensors_dir(path: str) -> bool:
    return storage.isdir(path) and any(
        n.endswith(".safetensors") or n == "model.safetensors.index.json"
        for n in storage.listdir(path)
    )


def load_t5_params(path: str, expected_shapes: Any, t5_config) -> Any:
    """Numpy parameter tree of a T5 v1.1 encoder from `path` (format auto-detected)."""
    if not path:
        raise FileNotFoundError(
            "config.text_encoder.checkpoint is empty: point it at a T5X checkpoint directory "
            "or a safetensors directory (config.json + model.safetensors)."
        )
    if not storage.exists(path):
        raise FileNotFoundError(f"Text encoder checkpoint {path} does not exist.")
    if is_safetensors_dir(path):
        if storage.is_remote(path):
            raise UsageError(
                f"Text encoder checkpoint {path}: safetensors are memory-mapped, so they must be "
                "on local disk (copy the directory to each host); T5X checkpoints are read from "
                "gs:// directly."
            )
        from muse_jax.text import safetensors_t5

        params = safetensors_t5.load_encoder_params(path, t5_config)
    else:
        from muse_jax.text import t5x_checkpoint

        params = t5x_checkpoint.load_t5x_encoder(path, expected_shapes=expected_shapes)
    got = jax.tree.map(lambda x: tuple(np.shape(x)), params)
    if jax.tree.structure(got) != jax.tree.structure(expected_shapes) or got != expected_shapes:
        raise UsageError(f"Text encoder weights in {path} do not match config.text_encoder.preset.")
    return params


def load_text_encoder(config, abstract: Any, shardings: Any) -> Any:
    """The frozen encoder's parameters placed with `shardings` (abstract: its unboxed tree)."""
    from muse_jax.models import t5

    tcfg = config.text_encoder
    expected = jax.tree.map(lambda x: tuple(x.shape), abstract)
    if tcfg.name == "clip":
        from muse_jax.text import clip_model

        if not tcfg.get("checkpoint"):
            raise FileNotFoundError(
                "config.text_encoder.checkpoint is empty: point it at a transformers "
                "CLIPTextModelWithProjection directory (config.json + model.safetensors)."
            )
        params = clip_model.load_text_encoder_params(
            tcfg.checkpoint, clip_model.text_encoder(tcfg, tcfg.get("dtype", "float32"))
        )
    else:
        params = load_t5_params(tcfg.checkpoint, expected, t5.get_config(tcfg.preset))
    return jax.tree.map(
        lambda x, a, s: jax.device_put(np.asarray(x, a.dtype), s), params, abstract, shardings
    )
