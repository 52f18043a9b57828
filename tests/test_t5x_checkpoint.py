"""Round-trips a tiny T5 v1.1 encoder through both on-disk T5X checkpoint formats.

The legacy writer below follows ``t5x.checkpoints.Checkpointer.save`` (T5X itself is not
installable here): each partitioned leaf goes to a TensorStore ``zarr`` array in a sibling
directory named by its dot-joined key path, written through a ``cast`` driver when T5X's
``save_dtype`` (bfloat16) differs, and the msgpack ``checkpoint`` file holds
``{'version': 3, 'optimizer': state_dict}`` with each such leaf replaced by its relative spec JSON;
unpartitioned leaves stay inline.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import serialization

from muse_jax.text.t5x_checkpoint import detect_format, load_t5x_encoder

VOCAB, D_MODEL, HEADS, D_KV, D_FF, BUCKETS, LAYERS = 50, 16, 2, 8, 32, 32, 2


def _expected_shapes() -> dict[str, Any]:
    def layer() -> dict[str, Any]:
        dense = {"kernel": (D_MODEL, HEADS * D_KV)}
        return {
            "pre_attention_layer_norm": {"scale": (D_MODEL,)},
            "attention": {
                "query": dense,
                "key": dense,
                "value": dense,
                "out": {"kernel": (HEADS * D_KV, D_MODEL)},
            },
            "pre_mlp_layer_norm": {"scale": (D_MODEL,)},
            "mlp": {
                "wi_0": {"kernel": (D_MODEL, D_FF)},
                "wi_1": {"kernel": (D_MODEL, D_FF)},
                "wo": {"kernel": (D_FF, D_MODEL)},
            },
        }

    encoder: dict[str, Any] = {"relpos_bias": {"rel_embedding": (HEADS, BUCKETS)}}
    encoder.update({f"layers_{i}": layer() for i in range(LAYERS)})
    encoder["encoder_norm"] = {"scale": (D_MODEL,)}
    return {"token_embedder": {"embedding": (VOCAB, D_MODEL)}, "encoder": encoder}


def _random_like(shapes: Any, rng: np.random.Generator) -> Any:
    if isinstance(shapes, dict):
        return {k: _random_like(v, rng) for k, v in shapes.items()}
    return rng.standard_normal(shapes).astype(np.float32)


def _flat(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, (*prefix, key)).items()}
    return {prefix: tree}


def _unflat(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return tree


def _state_dict(seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A T5X ``Optimizer.state_dict()``: params plus Adafactor-style step and param_states."""
    rng = np.random.default_rng(seed)
    encoder_params = _random_like(_expected_shapes(), rng)
    decoder = {"decoder_norm": {"scale": rng.standard_normal(D_MODEL).astype(np.float32)}}
    decoder["layers_0"] = {"mlp": {"wo": {"kernel": rng.standard_normal((D_FF, D_MODEL))}}}
    target = {**copy.deepcopy(encoder_params), "decoder": decoder}
    param_states = {
        "encoder": {"layers_0": {"mlp": {"wo": {"kernel": {"v_row": np.ones(D_FF, np.float32)}}}}}
    }
    state = {"step": np.int32(7), "param_states": param_states}
    return {"target": target, "state": state}, encoder_params


def _compressor(name: str) -> dict[str, Any] | None:
    if name.endswith("embedding"):
        return {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1}
    if "mlp" in name:
        return {"id": "zstd", "level": 3}  # What jax.Array serialization picks.
    return {"id": "gzip"}  # t5x Checkpointer's default.


def _write_legacy(step_dir: Path, state_dict: dict[str, Any], inline: set[str]) -> None:
    """Writes ``state_dict`` the way t5x's legacy Checkpointer does (bf16 save_dtype)."""
    step_dir.mkdir(parents=True)
    written = {}
    for key, arr in _flat(state_dict).items():
        name = "/".join(key)
        arr = np.asarray(arr)
        save_dtype = "bfloat16" if key[0] == "target" and "layers_1" not in key else arr.dtype.name
        if name in inline or arr.ndim == 0:
            written[key] = arr.astype(save_dtype)  # Unpartitioned: cast, kept in the msgpack.
            continue
        chunks = [max(1, d // 2) for d in arr.shape]  # Several chunks per array.
        spec = {
            "driver": "zarr",
            "dtype": save_dtype,
            "kvstore": {"driver": "file", "path": name.replace("/", ".")},
            "metadata": {"compressor": _compressor(name), "shape": arr.shape, "chunks": chunks},
        }
        relative = ts.Spec(spec).to_json()  # What t5x stores in the msgpack.
        absolute = copy.deepcopy(relative)
        absolute["kvstore"]["path"] = str(step_dir / absolute["kvstore"]["path"])
        if save_dtype != arr.dtype.name:
            absolute = {"base": absolute, "driver": "cast", "dtype": arr.dtype.name}
        ts.open(absolute, create=True, open=True).result().write(arr).result()
        written[key] = relative
    # t5x registers ts.Spec with flax serialization as `to_json()`, so `serialization.to_bytes`
    # leaves spec lists (shape, chunks) as msgpack arrays; packing the JSON directly matches that.
    payload = serialization.msgpack_serialize({"version": 3, "optimizer": _unflat(written)})
    (step_dir / "checkpoint").write_bytes(payload)


def _assert_tree_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    got_flat, want_flat = _flat(got), _flat(want)
    assert set(got_flat) == set(want_flat)
    for key, value in want_flat.items():
        assert got_flat[key].dtype == np.float32, key
        np.testing.assert_array_equal(got_flat[key], value, err_msg="/".join(key))


def _as_saved(state_dict: dict[str, Any], encoder_params: dict[str, Any]) -> dict[str, Any]:
    """The encoder values after the legacy writer's bf16 cast (layers_1 stays float32)."""
    out = {}
    for key, value in _flat(encoder_params).items():
        if "layers_1" not in key:
            value = value.astype(ml_dtypes.bfloat16).astype(np.float32)
        out[key] = value
    return _unflat(out)


def test_legacy_roundtrip_with_bf16_compression_and_inline(tmp_path: Path) -> None:
    state_dict, encoder_params = _state_dict(0)
    inline = {
        "target/encoder/encoder_norm/scale",
        "target/encoder/layers_0/pre_mlp_layer_norm/scale",
    }
    step_dir = tmp_path / "checkpoint_100"
    _write_legacy(step_dir, state_dict, inline)
    # The layout T5X produces: zarr dirs named by dotted key path next to the msgpack.
    query_dir = step_dir / "target.encoder.layers_0.attention.query.kernel"
    assert '"bfloat16"' in (query_dir / ".zarray").read_text()
    assert (step_dir / "state.param_states.encoder.layers_0.mlp.wo.kernel.v_row").is_dir()
    assert detect_format(step_dir) == "t5x_legacy"
    assert detect_format(tmp_path) == "t5x_legacy"

    want = _as_saved(state_dict, encoder_params)
    for path in (step_dir, tmp_path, step_dir / "checkpoint"):
        got = load_t5x_encoder(str(path), expected_shapes=_expected_shapes())
        _assert_tree_equal(got, want)
    kept = load_t5x_encoder(step_dir, dtype=None)
    assert kept["encoder"]["layers_0"]["mlp"]["wo"]["kernel"].dtype == ml_dtypes.bfloat16
    assert kept["encoder"]["layers_1"]["mlp"]["wo"]["kernel"].dtype == np.float32
    assert "decoder" not in kept


def test_legacy_early_orbax_placeholders(tmp_path: Path) -> None:
    """Early Orbax (T5X testdata/tiny_orbax): 'PLACEHOLDER://name' strings, zarr in ``name/``."""
    _, params = _state_dict(1)
    step_dir = tmp_path / "1"
    step_dir.mkdir()
    tree = {}
    for key, value in _flat(params).items():
        name = ".".join(("_optimizer", "target", *key))
        store = ts.open(
            {"driver": "zarr", "kvstore": {"driver": "file", "path": str(step_dir / name)}},
            create=True,
            dtype=ts.float32,
            shape=value.shape,
        ).result()
        store.write(value).result()
        tree[key] = "PLACEHOLDER://" + name
    contents = {"_optimizer": {"target": _unflat(tree), "state": {}}, "flax_mutables": None}
    (step_dir / "checkpoint").write_bytes(serialization.to_bytes(contents))
    _assert_tree_equal(load_t5x_encoder(tmp_path, _expected_shapes()), params)


def test_orbax_takes_latest_step(tmp_path: Path) -> None:
    old, _ = _state_dict(2)
    new, new_params = _state_dict(3)
    new["target"]["encoder"]["layers_0"]["attention"]["key"]["kernel"] = new_params["encoder"][
        "layers_0"
    ]["attention"]["key"]["kernel"].astype(ml_dtypes.bfloat16)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((tmp_path / "checkpoint_5").absolute(), old)
    checkpointer.save((tmp_path / "checkpoint_12").absolute(), new)
    checkpointer.wait_until_finished()
    checkpointer.close()
    (tmp_path / "checkpoint_13.orbax-checkpoint-tmp-1").mkdir()  # An unfinished save.

    assert detect_format(tmp_path) == "orbax"
    got = load_t5x_encoder(str(tmp_path), expected_shapes=_expected_shapes())
    kernel = new_params["encoder"]["layers_0"]["attention"]["key"]["kernel"]
    new_params["encoder"]["layers_0"]["attention"]["key"]["kernel"] = kernel.astype(
        ml_dtypes.bfloat16
    ).astype(np.float32)
    _assert_tree_equal(got, new_params)


def test_orbax_t5x_manager_layout(tmp_path: Path) -> None:
    """T5X's Orbax manager puts the train state in ``checkpoint_<step>/state/`` (OCDBT)."""
    state_dict, params = _state_dict(4)
    manager = ocp.CheckpointManager(
        tmp_path.absolute(),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=True)},
        options=ocp.CheckpointManagerOptions(step_prefix="checkpoint"),
    )
    manager.save(3, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state_dict)))
    manager.wait_until_finished()
    manager.close()
    assert (tmp_path / "checkpoint_3" / "state" / "_METADATA").is_file()
    _assert_tree_equal(load_t5x_encoder(tmp_path / "checkpoint_3", _expected_shapes()), params)


@pytest.fixture(scope="module")
def legacy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    step_dir = tmp_path_factory.mktemp("errors") / "checkpoint_1"
    _write_legacy(step_dir, _state_dict(5)[0], inline=set())
    return step_dir


def _with(tree: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    tree = copy.deepcopy(tree)
    *parents, leaf = path.split("/")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    if value is None:
        del node[leaf]
    else:
        node[leaf] = value
    return tree


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        ("encoder/layers_1/mlp/wi_2/kernel", (D_MODEL, D_FF), "missing parameter 'encoder/layers_1/mlp/wi_2/kernel'"),
        ("encoder/relpos_bias/rel_embedding", None, "unexpected parameter 'encoder/relpos_bias/rel_embedding'"),
        ("token_embedder/embedding", (VOCAB + 1, D_MODEL), r"shape mismatch for 'token_embedder/embedding': checkpoint \(50, 16\) vs expected \(51, 16\)"),
    ],
)  # fmt: skip
def test_expected_shape_errors(legacy_dir: Path, path: str, value: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_t5x_encoder(legacy_dir, _with(_expected_shapes(), path, value))


def test_path_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"does not exist: {missing}"):
        load_t5x_encoder(missing)
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match="no T5X checkpoint in .*bare"):
        load_t5x_encoder(tmp_path / "bare")
    (tmp_path / "empty" / "checkpoint_3").mkdir(parents=True)  # A step dir with nothing inside.
    with pytest.raises(FileNotFoundError, match="no T5X checkpoint in .*empty"):
        detect_format(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no T5X checkpoint in .*checkpoint_3"):
        load_t5x_encoder(tmp_path / "empty" / "checkpoint_3")


def test_missing_array_data_names_parameter(legacy_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "checkpoint_1"
    broken.mkdir()
    (broken / "checkpoint").write_bytes((legacy_dir / "checkpoint").read_bytes())
    with pytest.raises(FileNotFoundError, match="token_embedder/embedding"):
        load_t5x_encoder(broken)


def test_legacy_gfile_driver_without_zarray(legacy_dir: Path, tmp_path: Path) -> None:
    """Like T5X's own testdata/tiny_t5: 'gfile' kvstore specs and no committed ``.zarray``."""
    want = load_t5x_encoder(legacy_dir)
    copy_dir = tmp_path / "checkpoint_1"
    shutil.copytree(legacy_dir, copy_dir)
    zarrays = list(copy_dir.glob("*/.zarray"))
    assert zarrays
    for zarray in zarrays:
        zarray.unlink()
    contents = serialization.msgpack_restore((copy_dir / "checkpoint").read_bytes())
    for key in _flat(contents):
        if key[-2:] == ("kvstore", "driver"):
            _set(contents, key, "gfile")
    (copy_dir / "checkpoint").write_bytes(serialization.msgpack_serialize(contents))
    _assert_tree_equal(load_t5x_encoder(copy_dir, _expected_shapes()), want)


def _set(tree: dict[str, Any], key: tuple[str, ...], value: Any) -> None:
    for part in key[:-1]:
        tree = tree[part]
    tree[key[-1]] = value
