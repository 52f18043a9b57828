"""diffusers' `VQModel` weights (aMUSEd's `vqvae`) -> `AmusedVQ` parameters.

The table is derived from the module's config, so it names exactly the tensors diffusers'
`VQModel.state_dict()` holds for that config: a file with more, fewer or differently shaped
tensors fails in `tensors.assemble` with one line naming the first offending tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.convert.tensors import CONV, COPY, LINEAR, Table, assemble
from muse_jax.models.amused_vq import AmusedVQ


def _conv(table: Table, source: str, path: tuple[str, ...]) -> None:
    table[f"{source}.weight"] = (path + ("kernel",), CONV)
    table[f"{source}.bias"] = (path + ("bias",), COPY)


def _norm(table: Table, source: str, path: tuple[str, ...]) -> None:
    table[f"{source}.weight"] = (path + ("scale",), COPY)
    table[f"{source}.bias"] = (path + ("bias",), COPY)


def _resnet(table: Table, source: str, path: tuple[str, ...], shortcut: bool) -> None:
    _norm(table, f"{source}.norm1", path + ("norm1",))
    _conv(table, f"{source}.conv1", path + ("conv1",))
    _norm(table, f"{source}.norm2", path + ("norm2",))
    _conv(table, f"{source}.conv2", path + ("conv2",))
    if shortcut:
        _conv(table, f"{source}.conv_shortcut", path + ("conv_shortcut",))


def _mid(table: Table, source: str, path: tuple[str, ...], attention: bool) -> None:
    for i in range(2):
        _resnet(table, f"{source}.resnets.{i}", path + (f"res_{i}",), False)
    if attention:
        attn, out = f"{source}.attentions.0", path + ("attn_0",)
        _norm(table, f"{attn}.group_norm", out + ("group_norm",))
        for name, torch_name in (
            ("to_q", "to_q"),
            ("to_k", "to_k"),
            ("to_v", "to_v"),
            ("to_out", "to_out.0"),
        ):
            table[f"{attn}.{torch_name}.weight"] = (out + (name, "kernel"), LINEAR)
            table[f"{attn}.{torch_name}.bias"] = (out + (name, "bias"), COPY)


def table(model: AmusedVQ) -> Table:
    """Every tensor of diffusers' VQModel state dict for `model`'s config -> (path in the Flax
    parameter tree, layout change)."""
    chans = list(model.block_out_channels)
    levels, layers = len(chans), model.layers_per_block
    attention = model.mid_block_add_attention
    t: Table = {}

    enc = ("encoder",)
    _conv(t, "encoder.conv_in", enc + ("conv_in",))
    width = chans[0]
    for i, c in enumerate(chans):
        for j in range(layers):
            _resnet(
                t, f"encoder.down_blocks.{i}.resnets.{j}", enc + (f"down_{i}_res_{j}",), width != c
            )
            width = c
        if i < levels - 1:
            _conv(
                t, f"encoder.down_blocks.{i}.downsamplers.0.conv", enc + (f"down_{i}_downsample",)
            )
    _mid(t, "encoder.mid_block", enc + ("mid",), attention)
    _norm(t, "encoder.conv_norm_out", enc + ("conv_norm_out",))
    _conv(t, "encoder.conv_out", enc + ("conv_out",))

    _conv(t, "quant_conv", ("quant_conv",))
    t["quantize.embedding.weight"] = (("quantizer", "codebook"), COPY)
    _conv(t, "post_quant_conv", ("post_quant_conv",))

    dec = ("decoder",)
    _conv(t, "decoder.conv_in", dec + ("conv_in",))
    _mid(t, "decoder.mid_block", dec + ("mid",), attention)
    width = chans[-1]
    for i, c in enumerate(chans[::-1]):
        for j in range(layers + 1):
            _resnet(t, f"decoder.up_blocks.{i}.resnets.{j}", dec + (f"up_{i}_res_{j}",), width != c)
            width = c
        if i < levels - 1:
            _conv(t, f"decoder.up_blocks.{i}.upsamplers.0.conv", dec + (f"up_{i}_upsample",))
    _norm(t, "decoder.conv_norm_out", dec + ("conv_norm_out",))
    _conv(t, "decoder.conv_out", dec + ("conv_out",))
    return t


def abstract_params(model: AmusedVQ) -> Any:
    """The unboxed parameter tree `model.init` would make, as ShapeDtypeStructs."""
    f = model.downsample_factor
    images = jnp.zeros((1, f, f, model.in_channels), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    return nn.unbox(variables["params"])


def params_from_diffusers(
    state: Mapping[str, np.ndarray], model: AmusedVQ, source: str
) -> dict[str, Any]:
    """`model`'s parameter tree (for `model.apply({"params": ...})`) from a diffusers VQModel
    state dict read from `source` (named in errors)."""
    return assemble(state, table(model), abstract_params(model), source)
