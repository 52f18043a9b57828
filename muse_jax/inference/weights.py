"""Parameter trees as safetensors files, local or gs:// (the exported model's format).

Keys are the parameter paths joined by '.', e.g. `transformer.block_0.attention.query.kernel`.
safetensors' numpy API has no bfloat16, so bfloat16 arrays are stored as their uint16 bits and
named in the file's metadata; reading restores them. Reading checks every name and shape
against the model the config builds and places each array with its sharding.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
from flax import traverse_util

from muse_jax import storage
from muse_jax.errors import UsageError

_BF16_KEY = "muse_jax.bfloat16"


class WeightsError(UsageError):
    """A weights file does not hold the arrays its config describes."""


def to_bytes(tree: Any, metadata: dict[str, str] | None = None) -> bytes:
    """A nested dict of arrays -> safetensors bytes."""
    flat = traverse_util.flatten_dict(jax.device_get(tree), sep=".")
    arrays, bf16 = {}, []
    for name, value in flat.items():
        value = np.asarray(value)
        if value.dtype == ml_dtypes.bfloat16:
            value, _ = value.view(np.uint16), bf16.append(name)
        arrays[name] = np.ascontiguousarray(value)
    meta = dict(metadata or {})
    if bf16:
        meta[_BF16_KEY] = json.dumps(sorted(bf16))
    return safetensors.numpy.save(arrays, metadata=meta or None)


def save(path: str, tree: Any, metadata: dict[str, str] | None = None) -> None:
    """Writes `tree` to `path` atomically (see `muse_jax.storage.write_bytes`)."""
    storage.write_bytes(path, to_bytes(tree, metadata))


def _read_arrays(path: str) -> dict[str, np.ndarray]:
    data = storage.read_bytes(path)
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        arrays = safetensors.numpy.load(data)
    except Exception as e:  # noqa: BLE001 -- any parse failure is a damaged file for the user.
        raise WeightsError(f"{path} is not a readable safetensors file ({e}).") from None
    bf16 = set(json.loads(header.get("__metadata__", {}).get(_BF16_KEY, "[]")))
    return {k: (v.view(ml_dtypes.bfloat16) if k in bf16 else v) for k, v in arrays.items()}


def load(path: str, abstract: Any) -> Any:
    """The tree `abstract` (ShapeDtypeStructs with shardings) read from `path`.

    Raises WeightsError naming the first missing, unexpected or mis-shaped tensor.
    """
    arrays = _read_arrays(path)
    wanted = traverse_util.flatten_dict(abstract, sep=".")
    missing = sorted(set(wanted) - set(arrays))
    extra = sorted(set(arrays) - set(wanted))
    if missing or extra:
        name = (missing or extra)[0]
        where = "missing from" if missing else "unexpected in"
        raise WeightsError(
            f"{name} is {where} {path} ({len(missing)} missing, {len(extra)} unexpected): the "
            "file and config.json describe different models."
        )
    out = {}
    for name, spec in wanted.items():
        value = arrays[name]
        if tuple(value.shape) != tuple(spec.shape):
            raise WeightsError(
                f"{name} in {path} has shape {tuple(value.shape)}, config.json says "
                f"{tuple(spec.shape)}."
            )
        out[name] = jax.device_put(np.asarray(value, spec.dtype), spec.sharding)
    return traverse_util.unflatten_dict(out, sep=".")
