"""Reads the T5 v1.1 encoder out of T5X checkpoints into a plain nested dict of numpy arrays.

Muse conditions on a frozen T5-XXL encoder, and the public T5 v1.1 weights ship as T5X
checkpoints. T5X has written two on-disk formats over time, both handled here without T5X:

* ``t5x_legacy`` (``t5x.checkpoints.Checkpointer``): ``checkpoint_<step>/checkpoint`` is a flax
  msgpack of ``{'version': 3, 'optimizer': {'target': params, 'state': {...}}}``. Leaves that
  were partitioned are replaced by the JSON of a TensorStore ``zarr`` spec whose kvstore path is
  relative to the step directory (``target.encoder.layers_0.attention.query.kernel/``, the key
  path joined with dots); unpartitioned leaves are inline numpy arrays. The kvstore driver may be
  ``file``, ``gfile`` or ``gcs``; like T5X, all are read relative to the step directory, which
  may itself be local or on ``gs://`` (read through ``muse_jax.storage``). Very early
  Orbax checkpoints used the same layout with ``'PLACEHOLDER://<name>'`` strings instead of specs
  (seen in T5X's ``testdata/tiny_orbax``); those are read from the ``<name>`` zarr directory.
* ``orbax`` (``t5x.checkpoints.OrbaxCheckpointManagerInterface``): ``checkpoint_<step>/state/`` is
  an Orbax PyTree checkpoint (``_METADATA``, OCDBT) of ``{'target': params, 'state': {...}}``.
  A PyTree/Standard checkpoint written straight into ``checkpoint_<step>/`` is accepted too.

Only ``target/token_embedder`` and ``target/encoder`` are ever read: the decoder, the optimizer
``state`` (step, Adafactor ``param_states``), ``flax_mutables`` and the dataset iterator are
skipped without touching their TensorStore data, since a frozen text encoder needs none of them
and the XXL optimizer state is as large as the weights. Parameters T5X saved in bfloat16 (its
``save_dtype``) are upcast to ``dtype`` (float32 by default) so downstream code sees one dtype.
Scanned-layer checkpoints (stacked ``encoder/layers``) are returned as stored and will fail an
``expected_shapes`` check rather than being silently reshaped.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from etils import epath
from flax import serialization

from muse_jax import storage
from muse_jax.errors import UsageError

Path = epath.Path

LEGACY = "t5x_legacy"
ORBAX = "orbax"

# Subtrees of the T5X `target` (params) that make up the text encoder.
ENCODER_KEYS = ("token_embedder", "encoder")

_CHECKPOINT_FILE = "checkpoint"
# Files only Orbax PyTree checkpoints hold; T5X's own detector keys on `_METADATA` too.
_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt")
# T5X's Orbax manager stores the train state under this item name.
_ORBAX_STATE_ITEM = "state"
_PLACEHOLDER = "PLACEHOLDER://"
# `checkpoint_<step>` (T5X) or a bare `<step>` (Orbax's default step naming); tmp dirs don't match.
_STEP_DIR_RE = re.compile(r"^(?:checkpoint_)?(\d+)$")
_LOCAL_KVSTORE_DRIVERS = ("file", "gfile", "gcs")

Flat = dict[tuple[str, ...], Any]


def detect_format(path: str | os.PathLike) -> str:
    """Returns ``'t5x_legacy'`` or ``'orbax'`` for a step directory, its parent, or its msgpack."""
    return _format_of(_resolve_step_dir(path))  # type: ignore[return-value]


def load_t5x_encoder(
    path: str | os.PathLike,
    expected_shapes: Mapping[str, Any] | None = None,
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Loads ``{'token_embedder': ..., 'encoder': ...}`` from a T5X checkpoint as numpy arrays.

    Args:
        path: a ``checkpoint_<step>`` directory, its ``checkpoint`` msgpack file, or the parent
            directory (then the highest complete step is used).
        expected_shapes: optional tree with the same nesting as the result and shape tuples as
            leaves; any missing, unexpected or mis-shaped parameter raises ``ValueError``.
        dtype: floating-point arrays are cast to this dtype; ``None`` keeps the stored dtype.

    Returns:
        Nested dict with ``token_embedder`` and ``encoder`` subtrees, named as in T5X's
        ``t5x/examples/t5/network.py``.

    Raises:
        FileNotFoundError: ``path`` does not exist, holds no checkpoint, or array data is missing.
        ValueError: the checkpoint is unreadable as T5X, or disagrees with ``expected_shapes``.
    """
    step_dir = _resolve_step_dir(path)
    fmt = _format_of(step_dir)
    flat = _read_orbax(step_dir) if fmt == ORBAX else _read_legacy(step_dir)
    if dtype is not None:
        flat = {k: _cast_floating(v, dtype) for k, v in flat.items()}
    if expected_shapes is not None:
        _check_shapes(flat, expected_shapes, step_dir)
    elif not any(k[0] == "encoder" for k in flat):
        raise UsageError(f"T5X checkpoint {step_dir} has no 'target/encoder' parameters")
    return _unflatten(flat)


# ----------------------------------------------------------------------------- locating


def _orbax_tree_dir(step_dir: Path) -> Path | None:
    """The directory holding the Orbax PyTree, if ``step_dir`` is an Orbax checkpoint."""
    for candidate in (step_dir, step_dir / _ORBAX_STATE_ITEM):
        if any((candidate / marker).is_file() for marker in _ORBAX_MARKERS):
            return candidate
    return None


def _format_of(step_dir: Path) -> str | None:
    # Orbax wins over a `checkpoint` msgpack, as in t5x.checkpoint_utils.detect_checkpoint_type:
    # some Orbax versions also wrote an aggregate msgpack next to `_METADATA`.
    if _orbax_tree_dir(step_dir) is not None:
        return ORBAX
    if (step_dir / _CHECKPOINT_FILE).is_file():
        return LEGACY
    return None


def _resolve_step_dir(path: str | os.PathLike) -> Path:
    p = storage.path(path)
    if not p.exists():
        raise FileNotFoundError(f"T5X checkpoint path does not exist: {p}")
    if p.is_file():
        if p.name == _CHECKPOINT_FILE:
            return p.parent
        raise FileNotFoundError(f"not a T5X checkpoint directory or 'checkpoint' file: {p}")
    if _format_of(p) is not None:
        return p
    steps = []
    for child in p.iterdir():
        match = _STEP_DIR_RE.match(child.name)
        if match and child.is_dir() and _format_of(child) is not None:
            steps.append((int(match.group(1)), child))
    if not steps:
        raise FileNotFoundError(
            f"no T5X checkpoint in {p}: expected a 'checkpoint' msgpack file, Orbax "
            "'_METADATA', or checkpoint_<step>/ subdirectories holding one"
        )
    return max(steps)[1]


def _target_prefix(tree: Mapping[str, Any], where: Path) -> tuple[str, ...]:
    """Key path of the params: ``optimizer/target`` (legacy), ``target`` (Orbax), ..."""
    for prefix in (("optimizer",), ("_optimizer",), ()):
        node: Any = tree
        for key in prefix:
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and isinstance(node.get("target"), Mapping):
            return (*prefix, "target")
    raise UsageError(f"T5X checkpoint {where} has no 'target' parameter subtree")


def _subtree(tree: Mapping[str, Any], prefix: tuple[str, ...]) -> Mapping[str, Any]:
    for key in prefix:
        tree = tree[key]
    return tree


# ----------------------------------------------------------------------------- legacy


def _is_ts_spec(value: Any) -> bool:
    return (
        isinstance(value, Mapping) and "driver" in value and ("kvstore" in value or "path" in value)
    )


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, Mapping) and not _is_ts_spec(tree):
        for key, value in tree.items():
            yield from _flatten(value, (*prefix, str(key)))
    else:
        yield prefix, tree


def _read_legacy(step_dir: Path) -> Flat:
    raw = (step_dir / _CHECKPOINT_FILE).read_bytes()
    if raw.startswith(b"model_checkpoint_path"):
        raise UsageError(f"{step_dir} is a TensorFlow (Mesh TF) checkpoint, not a T5X one")
    try:
        contents = serialization.msgpack_restore(raw)
    except Exception as e:  # msgpack raises several unrelated types on garbage.
        raise UsageError(f"cannot parse {step_dir / _CHECKPOINT_FILE} as T5X msgpack: {e}") from e
    if not isinstance(contents, Mapping):
        raise UsageError(f"{step_dir / _CHECKPOINT_FILE} does not hold a T5X state dict")
    target = _subtree(contents, _target_prefix(contents, step_dir))
    leaves = {
        key: value
        for name in ENCODER_KEYS
        if name in target
        for key, value in _flatten(target[name], (name,))
        if value is not None
    }
    # Open every array first and then read them all, so TensorStore overlaps the I/O.
    pending = {k: _open_array(v, step_dir, k) for k, v in leaves.items() if _is_stored(v)}
    stores = {k: future.result() for k, future in pending.items()}
    reads = {k: store.read() for k, store in stores.items()}
    out: Flat = {}
    for key, value in leaves.items():
        if key in reads:
            out[key] = np.asarray(reads[key].result())
        elif isinstance(value, str):
            raise UsageError(f"unexpected string leaf for {_name(key)} in {step_dir}: {value!r}")
        else:
            out[key] = np.asarray(value)
    return out


def _is_stored(value: Any) -> bool:
    return _is_ts_spec(value) or (isinstance(value, str) and value.startswith(_PLACEHOLDER))


def _open_array(value: Any, step_dir: Path, key: tuple[str, ...]) -> ts.Future:
    """Opens one TensorStore array referenced from the msgpack, relative to ``step_dir``."""
    if isinstance(value, str):
        array_dir = step_dir / value[len(_PLACEHOLDER) :]
        _require_zarray(array_dir, key)
        return ts.open({"driver": "zarr", "kvstore": storage.kvstore_spec(array_dir)})
    spec = copy.deepcopy(dict(value))
    kvstore = dict(spec.get("kvstore") or {})
    if kvstore.get("driver", "file") not in _LOCAL_KVSTORE_DRIVERS:
        raise UsageError(f"unsupported TensorStore kvstore {kvstore!r} for {_name(key)}")
    # tensorstore<0.1.14 specs kept the path at top level; newer ones inside the kvstore.
    relative = os.path.join(kvstore.get("path", ""), spec.pop("path", ""))
    array_dir = step_dir / relative
    spec["kvstore"] = storage.kvstore_spec(array_dir, directory=True)
    metadata = dict(spec.get("metadata") or {})
    if spec.get("dtype") == "uint16" or metadata.get("dtype") == "<u2":
        # Version-2 T5X checkpoints stored bfloat16 as uint16; T5X itself refuses these.
        raise UsageError(f"{_name(key)} is stored as uint16 (pre-2021 T5X bfloat16); re-save it")
    if (array_dir / ".zarray").is_file():
        # As T5X's `_read_ts` does: drop layout details so the stored `.zarray` decides them.
        metadata.pop("chunks", None)
        metadata.pop("compressor", None)
        spec["metadata"] = metadata
        return ts.open(spec, open=True, read=True)
    if not array_dir.is_dir():
        raise FileNotFoundError(f"TensorStore data for {_name(key)} missing: {array_dir}")
    # Some copies (T5X's own testdata) lack `.zarray`; the spec then carries the full metadata.
    return ts.open(spec, open=True, read=True, assume_metadata=True)


def _require_zarray(array_dir: Path, key: tuple[str, ...]) -> None:
    if not (array_dir / ".zarray").is_file():
        raise FileNotFoundError(f"TensorStore data for {_name(key)} missing: {array_dir}")


# ----------------------------------------------------------------------------- orbax


def _read_orbax(step_dir: Path) -> Flat:
    import jax
    import orbax.checkpoint as ocp  # Imported lazily: it is slow and only this path needs it.

    tree_dir = _orbax_tree_dir(step_dir)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        metadata = handler.metadata(tree_dir)
        tree = getattr(metadata, "tree", metadata)
        prefix = _target_prefix(tree, step_dir)
        target = _subtree(tree, prefix)
        # Partial restore of just the encoder, typed from the stored metadata, so no abstract
        # model tree is needed and the decoder/optimizer state are never read.
        wanted = {
            key: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)
            for name in ENCODER_KEYS
            if name in target
            for key, leaf in _flatten(target[name], (name,))
            if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
        }
        if not wanted:
            return {}
        item = _unflatten({(*prefix, *key): leaf for key, leaf in wanted.items()})
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        restored = handler.restore(
            tree_dir,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )
    finally:
        handler.close()
    restored = _subtree(restored, prefix)
    return {key: np.asarray(_subtree(restored, key)) for key in wanted}


# ----------------------------------------------------------------------------- helpers


def _name(key: tuple[str, ...]) -> str:
    return "/".join(key)


def _cast_floating(array: np.ndarray, dtype: Any) -> np.ndarray:
    # jnp.issubdtype also treats ml_dtypes' bfloat16 (numpy kind 'V') as floating.
    if jnp.issubdtype(array.dtype, jnp.floating) and array.dtype != np.dtype(dtype):
        return array.astype(dtype)
    return array


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return tree


def _check_shapes(flat: Flat, expected: Mapping[str, Any], where: Path) -> None:
    """Raises one ``ValueError`` line naming the first few mismatching parameters."""
    want = {k: tuple(int(d) for d in v) for k, v in _flatten_expected(expected)}
    problems = [f"missing parameter {_name(k)!r}" for k in want if k not in flat]
    problems += [f"unexpected parameter {_name(k)!r}" for k in flat if k not in want]
    problems += [
        f"shape mismatch for {_name(k)!r}: checkpoint {tuple(flat[k].shape)} vs expected {s}"
        for k, s in want.items()
        if k in flat and tuple(flat[k].shape) != s
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UsageError(f"T5X checkpoint {where}: " + "; ".join(problems[:3]) + more)


def _flatten_expected(
    tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten_expected(value, (*prefix, key))
        else:
            yield (*prefix, key), value
