"""Reading other projects' weight files into this project's Flax parameter trees.

A converter names, for every tensor of the source layout, the path of its parameter in the
Flax tree and how its layout changes (`LINEAR`, `CONV`, `COPY`). `assemble` then checks the
source tensors against that table and against the shapes the Flax module expects, and fails on
the first problem with one line naming the tensor and the file. The same checks serve every
source format (diffusers, transformers, MaskGIT).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from muse_jax import storage
from muse_jax.errors import ConversionError  # noqa: F401 -- raised here, named by callers.

Transform = Callable[[np.ndarray], np.ndarray]


def COPY(x: np.ndarray) -> np.ndarray:  # noqa: N802 -- a table constant, read as one.
    return x


def LINEAR(x: np.ndarray) -> np.ndarray:  # noqa: N802
    """torch Linear [out, in] -> Flax Dense [in, out]."""
    return x.T


def CONV(x: np.ndarray) -> np.ndarray:  # noqa: N802
    """torch Conv2d [out, in, kh, kw] -> Flax Conv [kh, kw, in, out]."""
    return x.transpose(2, 3, 1, 0)


Table = dict[str, tuple[tuple[str, ...], Transform]]


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file (local or gs://) as numpy; bfloat16 widens to
    float32. A truncated or non-safetensors file is a ConversionError naming it."""
    from safetensors import deserialize

    if not storage.exists(path):
        raise ConversionError(f"{path} does not exist.")
    data = storage.read_bytes(path)
    try:
        header_len = int.from_bytes(data[:8], "little")
        if len(data) < 8 or 8 + header_len > len(data):
            raise ValueError("the header runs past the end of the file")
        json.loads(data[8 : 8 + header_len])
        tensors = deserialize(data)
    except Exception as e:  # noqa: BLE001 -- any parse failure is a damaged file for the user.
        raise ConversionError(f"{path} is not a readable safetensors file ({e}).") from None
    out = {}
    for name, t in tensors:
        dtype = t["dtype"]
        if dtype == "BF16":
            value = (np.frombuffer(t["data"], "<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in _DTYPES:
            value = np.frombuffer(t["data"], _DTYPES[dtype])
        else:
            raise ConversionError(f"{path}: tensor {name} has unsupported dtype {dtype}.")
        out[name] = value.reshape(t["shape"])
    return out


_DTYPES = {
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


def assemble(
    state: Mapping[str, np.ndarray],
    table: Table,
    expected: Any,
    source: str,
    ignore: Callable[[str], bool] = lambda name: False,
) -> dict[str, Any]:
    """The Flax parameter tree built from `state` by `table`, float32 numpy arrays.

    Args:
      state: source tensor name -> array.
      table: source tensor name -> (path in the Flax tree, transform).
      expected: the Flax module's parameter tree (arrays or ShapeDtypeStructs, unboxed), which
        the result must match leaf for leaf.
      source: the file named in errors.
      ignore: source names that are not parameters (buffers) and may be present.
    Raises:
      ConversionError: one line naming the first missing, unexpected or mis-shaped tensor, with
        the counts of each.
    """
    missing = sorted(k for k in table if k not in state)
    unexpected = sorted(k for k in state if k not in table and not ignore(k))
    if missing or unexpected:
        name = (missing or unexpected)[0]
        what = "is missing from" if missing else "is not expected in"
        raise ConversionError(
            f"tensor {name} {what} {source} ({len(missing)} missing, {len(unexpected)} "
            "unexpected): the weights and the config describe different models."
        )
    want = traverse_util.flatten_dict(expected)
    covered = {path for path, _ in table.values()}
    uncovered = sorted(set(want) - covered)
    if uncovered:  # The table and the module disagree: a bug here, not the user's file.
        raise AssertionError(f"No source tensor maps to parameter {'/'.join(uncovered[0])}.")
    flat = {}
    for name, (path, transform) in table.items():
        try:
            value = np.asarray(transform(np.asarray(state[name])), np.float32)
        except ValueError:  # e.g. a conv kernel of the wrong rank: a shape problem as well.
            value = np.empty((0,) * 0)
        if path not in want:
            raise AssertionError(f"{name} maps to {'/'.join(path)}, which the module lacks.")
        shape = tuple(want[path].shape)
        if value.shape != shape:
            raise ConversionError(
                f"tensor {name} in {source} has shape {tuple(state[name].shape)}; the config "
                f"gives {'/'.join(path)} the shape {shape} (after layout change)."
            )
        flat[path] = np.ascontiguousarray(value)
    return traverse_util.unflatten_dict(flat)
