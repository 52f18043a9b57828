"""MaskGIT's tokenizer checkpoints (google-research/maskgit) -> `MaskGITVQGAN` parameters.

MaskGIT publishes its ImageNet VQGAN tokenizers (e.g.
https://storage.googleapis.com/maskgit-public/checkpoints/tokenizer_imagenet256_checkpoint) as
the Flax variables dict `{"params": {"encoder", "quantizer", "decoder"}}` serialised with
`flax.serialization.to_bytes` (msgpack), parameters named by Flax's automatic numbering
(`encoder/ResBlock_3/Conv_1/kernel`). This module reads such a file with msgpack alone (no
MaskGIT import), derives from the model's config the name every tensor has there, and hands both
to `tensors.assemble`, which checks names and shapes. The layouts agree (both are Flax), so no
tensor changes layout; only the names do.

Users of the released tokenizers need only the file:

    model = maskgit_vqgan.build(maskgit.model_block())
    params = maskgit.params_from_checkpoint(path, model)
    ids = model.apply({"params": params}, images, method=model.tokenize)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from muse_jax import storage
from muse_jax.convert.tensors import COPY, ConversionError, Table, assemble
from muse_jax.models.maskgit_vqgan import MaskGITVQGAN


def model_block() -> dict[str, Any]:
    """The model block of MaskGIT's released ImageNet tokenizers (`configs/vqgan_config.py`;
    the 256 and 512 checkpoints share it), for `maskgit_vqgan.build`."""
    d = MaskGITVQGAN()
    return {
        "kind": "maskgit",
        "filters": d.filters,
        "channel_multipliers": tuple(d.channel_multipliers),
        "num_res_blocks": d.num_res_blocks,
        "embedding_dim": d.embedding_dim,
        "codebook_size": d.codebook_size,
        "conv_downsample": d.conv_downsample,
        "activation": d.activation,
        "commitment_cost": d.commitment_cost,
        "entropy_loss_ratio": d.entropy_loss_ratio,
        "entropy_temperature": d.entropy_temperature,
        "entropy_loss_type": d.entropy_loss_type,
        "dtype": "float32",
    }


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Every parameter of a MaskGIT checkpoint (local or gs://) as numpy, keyed by its
    '/'-joined path under "params" (`encoder/Conv_0/kernel`). Other top-level collections
    (none in the released files) are ignored. A missing, truncated or non-MaskGIT file is a
    ConversionError naming it."""
    if not storage.exists(path):
        raise ConversionError(f"{path} does not exist.")
    data = storage.read_bytes(path)
    try:
        state = serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001 -- any parse failure is a damaged file for the user.
        raise ConversionError(
            f"{path} is not a readable Flax msgpack checkpoint ({type(e).__name__}: {e})."
        ) from None
    params = state.get("params") if isinstance(state, dict) else None
    if not isinstance(params, dict):
        found = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise ConversionError(
            f"{path} is not a MaskGIT checkpoint: no 'params' collection at the top (found "
            f"{found})."
        )
    flat = {}
    for key, value in traverse_util.flatten_dict(params).items():
        name = "/".join(str(k) for k in key)
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
            raise ConversionError(
                f"{path}: params/{name} is a {type(value).__name__}, not a numeric tensor."
            )
        flat[name] = value
    return flat


def _conv(t: Table, source: str, path: tuple[str, ...], bias: bool = True) -> None:
    t[f"{source}/kernel"] = (path + ("kernel",), COPY)
    if bias:
        t[f"{source}/bias"] = (path + ("bias",), COPY)


def _norm(t: Table, source: str, path: tuple[str, ...]) -> None:
    t[f"{source}/scale"] = (path + ("scale",), COPY)
    t[f"{source}/bias"] = (path + ("bias",), COPY)


def _res_block(t: Table, source: str, path: tuple[str, ...], shortcut: bool) -> None:
    _norm(t, f"{source}/GroupNorm_0", path + ("norm_1",))
    _conv(t, f"{source}/Conv_0", path + ("conv_1",), bias=False)
    _norm(t, f"{source}/GroupNorm_1", path + ("norm_2",))
    _conv(t, f"{source}/Conv_1", path + ("conv_2",), bias=False)
    if shortcut:
        _conv(t, f"{source}/Conv_2", path + ("shortcut",), bias=False)


def table(model: MaskGITVQGAN) -> Table:
    """Every tensor MaskGIT's VQVAE holds for `model`'s config -> (path in the Flax parameter
    tree, layout change). Flax numbers a module's submodules of one kind in creation order, so
    the names follow MaskGIT's construction order."""
    mults = [model.filters * m for m in model.channel_multipliers]
    nrb, levels = model.num_res_blocks, len(mults)
    t: Table = {}

    enc, convs, blocks = ("encoder",), 1, 0
    _conv(t, "encoder/Conv_0", enc + ("conv_in",), bias=False)
    width = model.filters
    for level, filters in enumerate(mults):
        for j in range(nrb):
            path = enc + (f"block_{level}_{j}",)
            _res_block(t, f"encoder/ResBlock_{blocks}", path, width != filters)
            blocks, width = blocks + 1, filters
        if level < levels - 1 and model.conv_downsample:
            _conv(t, f"encoder/Conv_{convs}", enc + (f"down_{level}",))
            convs += 1
    for j in range(nrb):
        _res_block(t, f"encoder/ResBlock_{blocks}", enc + (f"mid_{j}",), False)
        blocks += 1
    _norm(t, "encoder/GroupNorm_0", enc + ("norm_out",))
    _conv(t, f"encoder/Conv_{convs}", enc + ("conv_out",))

    t["quantizer/codebook"] = (("quantizer", "codebook"), COPY)

    dec, convs, blocks = ("decoder",), 1, 0
    _conv(t, "decoder/Conv_0", dec + ("conv_in",))
    width = mults[-1]
    for j in range(nrb):
        _res_block(t, f"decoder/ResBlock_{blocks}", dec + (f"mid_{j}",), False)
        blocks += 1
    for level in reversed(range(levels)):
        for j in range(nrb):
            path = dec + (f"block_{level}_{j}",)
            _res_block(t, f"decoder/ResBlock_{blocks}", path, width != mults[level])
            blocks, width = blocks + 1, mults[level]
        if level > 0:
            _conv(t, f"decoder/Conv_{convs}", dec + (f"up_{level}",))
            convs += 1
    _norm(t, "decoder/GroupNorm_0", dec + ("norm_out",))
    _conv(t, f"decoder/Conv_{convs}", dec + ("conv_out",))
    return t


def abstract_params(model: MaskGITVQGAN) -> Any:
    """The unboxed parameter tree `model.init` would make, as ShapeDtypeStructs."""
    f = model.downsample_factor
    images = jnp.zeros((1, f, f, 3), jnp.float32)
    return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images)["params"])


def params_from_checkpoint(path: str, model: MaskGITVQGAN) -> dict[str, Any]:
    """`model`'s parameter tree (for `model.apply({"params": ...})`), float32 numpy, from the
    MaskGIT tokenizer checkpoint at `path` (local or gs://). ConversionError (one line naming
    the file and the tensor) for a damaged file or one that holds another model."""
    return assemble(read_checkpoint(path), table(model), abstract_params(model), path)
