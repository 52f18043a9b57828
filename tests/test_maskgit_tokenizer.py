"""MaskGITVQGAN against MaskGIT's own VQGAN, through the committed fixture.

`tests/fixtures/maskgit/make_fixture.py` wrote a small checkpoint and reference outputs with
google-research/maskgit's code; these tests read them only (no MaskGIT import): decoding and
encoding agree with MaskGIT, the converter's name table matches the released tokenizers'
layout, and damaged or foreign checkpoints fail with one line naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util

from muse_jax.convert import maskgit
from muse_jax.convert.tensors import ConversionError
from muse_jax.models import maskgit_vqgan

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "maskgit")
CHECKPOINT = os.path.join(FIXTURE, "tokenizer_checkpoint")
# make_fixture.SMALL: MaskGIT's vqgan_config with these fields overridden.
SMALL = dict(filters=32, channel_multipliers=(2, 1), num_res_blocks=1, codebook_size=64)
SMALL["embedding_dim"] = 16


@pytest.fixture(scope="module")
def model() -> maskgit_vqgan.MaskGITVQGAN:
    return maskgit_vqgan.build({**maskgit.model_block(), **SMALL})


@pytest.fixture(scope="module")
def variables(model):
    return {"params": maskgit.params_from_checkpoint(CHECKPOINT, model)}


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(os.path.join(FIXTURE, "reference.npz")) as f:
        return dict(f)


def _pixels(maskgit_images: np.ndarray) -> np.ndarray:
    """MaskGIT's [0, 1] outputs in this project's [-1, 1]."""
    return 2.0 * maskgit_images - 1.0


def test_decode_matches_maskgit(model, variables, ref):
    for ids in (ref["random_ids"], ref["random_ids"].reshape(2, -1)):
        out = model.apply(variables, jnp.asarray(ids), method=model.decode_ids)
        assert out.shape == ref["random_decoded"].shape
        np.testing.assert_allclose(out, _pixels(ref["random_decoded"]), rtol=0, atol=1e-5)
    out = model.apply(variables, jnp.asarray(ref["quantized"]), method=model.decode_codes)
    np.testing.assert_allclose(out, _pixels(ref["recon"]), rtol=0, atol=1e-5)


def test_encode_matches_maskgit(model, variables, ref):
    images = jnp.asarray(ref["images"])
    z_q, ids, losses = model.apply(variables, images, method=model.encode)
    np.testing.assert_array_equal(ids, ref["ids"])
    assert ids.dtype == jnp.int32
    np.testing.assert_allclose(z_q, ref["quantized"], rtol=0, atol=1e-6)
    flat = model.apply(variables, images, method=model.tokenize)
    assert flat.dtype == jnp.int32
    np.testing.assert_array_equal(flat, ref["ids"].reshape(2, -1))
    # MaskGIT's training losses: e_latent (already times commitment_cost) + q_latent + entropy.
    np.testing.assert_allclose(losses["codebook"], ref["quantizer_loss"], rtol=1e-5)
    np.testing.assert_allclose(
        losses["commitment"] * model.commitment_cost, ref["e_latent_loss"], rtol=1e-5
    )
    assert losses["encodings"].shape == (2, 16, 16, 16)
    recon, ids2, _ = model.apply(variables, images)
    np.testing.assert_array_equal(ids2, ref["ids"])
    np.testing.assert_allclose(recon, _pixels(ref["recon"]), rtol=0, atol=1e-5)


def test_straight_through_gradients(model, variables, ref):
    """The decoder's gradient reaches the encoder through the quantiser, not the codebook."""

    def loss(params):
        recon, _, _ = model.apply({"params": params}, jnp.asarray(ref["images"][:1, :8, :8]))
        return jnp.mean(recon**2)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    assert float(jnp.abs(grads["encoder"]["conv_in"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["quantizer"]["codebook"]).max()) == 0


def test_released_layout():
    """The name table at MaskGIT's vqgan_config names exactly the released tokenizers' tensors
    (recorded by make_fixture.py from MaskGIT's VQVAE), with the same shapes."""
    with open(os.path.join(FIXTURE, "imagenet256_tree.json")) as f:
        tree = json.load(f)
    full = maskgit_vqgan.build(maskgit.model_block())
    assert full.downsample_factor == 16 and full.codebook_size == 1024
    table = maskgit.table(full)
    assert sorted(table) == sorted(tree)
    want = traverse_util.flatten_dict(maskgit.abstract_params(full))
    assert set(want) == {path for path, _ in table.values()}
    for name, (path, _) in table.items():
        assert tuple(want[path].shape) == tuple(tree[name]), name


def test_every_parameter_has_logical_names(model):
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2, 2, 3)))["params"]
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )[0]
    assert leaves
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.Partitioned), name
        assert len(leaf.names) == leaf.value.ndim, name
        if name.endswith("['kernel']"):
            assert leaf.names == ("height", "width", "conv_in", "conv_out"), name
        elif name.endswith("['codebook']"):
            assert leaf.names == ("codebook", None), name
        else:
            assert leaf.names == ("conv_out",), name


def _conversion_error(path: str, model) -> str:
    """The message of the ConversionError that reading `path` into `model` raises."""
    with pytest.raises(ConversionError) as info:
        maskgit.params_from_checkpoint(path, model)
    return str(info.value)


def _names(message: str, path: str, *expected: str) -> bool:
    """One line that names the file and every expected part."""
    return "\n" not in message and all(part in message for part in (path, *expected))


def _rewrite(tmp_path, edit) -> str:
    with open(CHECKPOINT, "rb") as f:
        state = serialization.msgpack_restore(f.read())
    edit(state["params"])
    path = str(tmp_path / "edited_checkpoint")
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(state))
    return path


def test_truncated_checkpoint(model, tmp_path):
    with open(CHECKPOINT, "rb") as f:
        data = f.read()
    path = str(tmp_path / "truncated_checkpoint")
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    message = _conversion_error(path, model)
    assert _names(message, path, "not a readable"), message


def test_missing_tensor(model, tmp_path):
    path = _rewrite(tmp_path, lambda p: p["decoder"]["ResBlock_2"]["Conv_2"].pop("kernel"))
    message = _conversion_error(path, model)
    assert _names(message, path, "decoder/ResBlock_2/Conv_2/kernel", "missing"), message


def test_misshaped_tensor(model, tmp_path):
    def edit(params):
        params["quantizer"]["codebook"] = params["quantizer"]["codebook"][:, :8]

    path = _rewrite(tmp_path, edit)
    message = _conversion_error(path, model)
    assert _names(message, path, "quantizer/codebook", "(64, 8)"), message


def test_checkpoint_of_another_model(model, tmp_path):
    """The full-size config against the small file: the first missing tensor is named."""
    full = maskgit_vqgan.build(maskgit.model_block())
    path = str(tmp_path / "copy")
    shutil.copy(CHECKPOINT, path)
    message = _conversion_error(path, full)
    assert _names(message, path, "tensor "), message


def test_file_of_another_kind(model, tmp_path):
    npz = os.path.join(FIXTURE, "reference.npz")
    message = _conversion_error(npz, model)
    assert _names(message, npz, "not a"), message
    path = str(tmp_path / "no_params")
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize({"target": {"w": np.zeros(3)}}))
    message = _conversion_error(path, model)
    assert _names(message, path, "'params'"), message
    absent = str(tmp_path / "absent")
    message = _conversion_error(absent, model)
    assert _names(message, absent, "does not exist"), message


def test_build_checks_the_block():
    with pytest.raises(ValueError, match="kind"):
        maskgit_vqgan.build({"kind": "vqgan"})
    with pytest.raises(ValueError, match="norm_type"):
        maskgit_vqgan.build({"kind": "maskgit", "norm_type": "BN"})
    assert maskgit_vqgan.build({"kind": "maskgit"}) == maskgit_vqgan.MaskGITVQGAN()
