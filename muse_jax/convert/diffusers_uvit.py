"""diffusers' `UVit2DModel` weights (aMUSEd's transformer) -> `muse_jax.models.uvit.UVit2D`.

The table follows the model's config: biases only with `use_bias`, norm scales only with
`ln_elementwise_affine` (the attention blocks' norms always have one), `kv_mapper` only where
the blocks' width differs from `hidden_size`, the down/upsampling layers only when configured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from muse_jax.convert.tensors import CONV, COPY, Table, Transform, assemble
from muse_jax.models.uvit import UVit2D, example_inputs

Path = tuple[str, ...]


def _lenient(fn: Callable[[np.ndarray], np.ndarray]) -> Transform:
    """`fn`, or the tensor unchanged where its layout change does not apply to that shape, so
    that `assemble`'s shape check reports a mis-shaped tensor instead of numpy."""

    def transform(x: np.ndarray) -> np.ndarray:
        try:
            return fn(x)
        except ValueError:
            return x

    return transform


def _transposed(x: np.ndarray, block: int = 256) -> np.ndarray:
    """A 2-D array's transpose, contiguous, copied in square tiles: several times faster than
    numpy's strided copy (`np.ascontiguousarray(x.T)`) for the large kernels, whose
    column-order reads miss the cache on every element."""
    if x.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {x.shape}")
    out = np.empty(x.shape[::-1], x.dtype)
    for i in range(0, x.shape[0], block):
        for j in range(0, x.shape[1], block):
            out[j : j + block, i : i + block] = x[i : i + block, j : j + block].T
    return out


def _conv(x: np.ndarray) -> np.ndarray:
    """torch Conv2d [out, in, kh, kw] -> Flax [kh, kw, in, out] (`CONV`), 1x1 kernels tiled."""
    if x.ndim == 4 and x.shape[2:] == (1, 1):
        return _transposed(x[:, :, 0, 0])[None, None]
    return CONV(x)


def _split_heads(heads: int) -> Transform:
    """torch Linear [heads * head_dim, in] -> [in, heads, head_dim]."""
    return _lenient(lambda x: _transposed(x).reshape(x.shape[1], heads, -1))


def _merge_heads(heads: int) -> Transform:
    """torch Linear [out, heads * head_dim] -> [heads, head_dim, out]."""
    return _lenient(lambda x: _transposed(x).reshape(heads, -1, x.shape[0]))


_LINEAR = _lenient(_transposed)  # `LINEAR`, tiled.
_CONV = _lenient(_conv)
# torch ConvTranspose2d [in, out, kh, kw] -> [kh, kw, in, out].
_CONV_TRANSPOSE = _lenient(lambda x: x.transpose(2, 3, 0, 1))
_FLAT = _lenient(lambda x: x.reshape(-1))  # GRN's [1, 1, 1, C] -> [C].


class _Builder:
    def __init__(self, model: UVit2D) -> None:
        self.model = model
        self.table: Table = {}

    def add(self, name: str, path: Path, transform: Transform) -> None:
        self.table[name] = (path, transform)

    def weight_bias(
        self, src: str, dst: Path, transform: Transform, bias: bool, bias_transform=COPY
    ) -> None:
        self.add(f"{src}.weight", dst + ("kernel",), transform)
        if bias:
            self.add(f"{src}.bias", dst + ("bias",), bias_transform)

    def linear(self, src: str, dst: Path) -> None:
        self.weight_bias(src, dst, _LINEAR, self.model.use_bias)

    def conv(self, src: str, dst: Path, transform: Transform = _CONV) -> None:
        self.weight_bias(src, dst, transform, self.model.use_bias)

    def norm(self, src: str, dst: Path, affine: bool | None = None, bias: bool = False) -> None:
        if self.model.ln_elementwise_affine if affine is None else affine:
            self.add(f"{src}.weight", dst + ("scale",), COPY)
            if bias:
                self.add(f"{src}.bias", dst + ("bias",), COPY)

    def attention(self, src: str, dst: Path, heads: int) -> None:
        bias = self.model.use_bias
        for proj in ("to_q", "to_k", "to_v"):
            split_bias = _lenient(lambda x: x.reshape(heads, -1))
            self.weight_bias(f"{src}.{proj}", dst + (proj,), _split_heads(heads), bias, split_bias)
        self.weight_bias(f"{src}.to_out.0", dst + ("to_out",), _merge_heads(heads), bias)

    def uvit_block(self, src: str, dst: Path, down: bool, up: bool) -> None:
        m = self.model
        if down:
            self.norm(f"{src}.downsample.norm", dst + ("downsample", "norm"))
            self.conv(f"{src}.downsample.conv", dst + ("downsample", "conv"))
        for i in range(m.num_res_blocks):
            s, d = f"{src}.res_blocks.{i}", dst + (f"res_blocks_{i}",)
            self.conv(f"{s}.depthwise", d + ("depthwise",))
            self.norm(f"{s}.norm", d + ("norm",))
            self.linear(f"{s}.channelwise_linear_1", d + ("channelwise_linear_1",))
            self.add(f"{s}.channelwise_norm.gamma", d + ("channelwise_norm", "gamma"), _FLAT)
            self.add(f"{s}.channelwise_norm.beta", d + ("channelwise_norm", "beta"), _FLAT)
            self.linear(f"{s}.channelwise_linear_2", d + ("channelwise_linear_2",))
            self.linear(f"{s}.cond_embeds_mapper", d + ("cond_embeds_mapper",))
        for i in range(m.num_res_blocks):
            s, d = f"{src}.attention_blocks.{i}", dst + (f"attention_blocks_{i}",)
            if m.block_out_channels != m.hidden_size:
                self.linear(f"{s}.kv_mapper", d + ("kv_mapper",))
            for n in ("1", "2"):
                self.norm(f"{s}.norm{n}", d + (f"norm{n}",), affine=True)
                self.attention(f"{s}.attn{n}", d + (f"attn{n}",), m.block_num_heads)
        if up:
            self.norm(f"{src}.upsample.norm", dst + ("upsample", "norm"))
            self.conv(f"{src}.upsample.conv", dst + ("upsample", "conv"), _CONV_TRANSPOSE)

    def build(self) -> Table:
        m = self.model
        self.linear("encoder_proj", ("encoder_proj",))
        self.norm("encoder_proj_layer_norm", ("encoder_proj_layer_norm",))
        self.add("embed.embeddings.weight", ("embed", "embeddings", "embedding"), COPY)
        self.norm("embed.layer_norm", ("embed", "layer_norm"))
        self.conv("embed.conv", ("embed", "conv"))
        self.linear("cond_embed.linear_1", ("cond_embed", "linear_1"))
        self.linear("cond_embed.linear_2", ("cond_embed", "linear_2"))
        self.uvit_block("down_block", ("down_block",), m.downsample, False)
        self.norm("project_to_hidden_norm", ("project_to_hidden_norm",))
        self.linear("project_to_hidden", ("project_to_hidden",))
        for i in range(m.num_hidden_layers):
            s, d = f"transformer_layers.{i}", (f"transformer_layers_{i}",)
            for n in ("1", "2", "3"):
                self.linear(f"{s}.norm{n}.linear", d + (f"norm{n}", "linear"))
                # norm3 is torch's LayerNorm(bias=use_bias); norm1/2 RMSNorms have no bias.
                bias = n == "3" and m.use_bias
                self.norm(f"{s}.norm{n}.norm", d + (f"norm{n}", "norm"), bias=bias)
            self.attention(f"{s}.attn1", d + ("attn1",), m.num_attention_heads)
            self.attention(f"{s}.attn2", d + ("attn2",), m.num_attention_heads)
            self.linear(f"{s}.ff.net.0.proj", d + ("ff_proj",))
            self.linear(f"{s}.ff.net.2", d + ("ff_out",))
        self.norm("project_from_hidden_norm", ("project_from_hidden_norm",))
        self.linear("project_from_hidden", ("project_from_hidden",))
        self.uvit_block("up_block", ("up_block",), False, m.upsample)
        self.conv("mlm_layer.conv1", ("mlm_layer", "conv1"))
        self.norm("mlm_layer.layer_norm", ("mlm_layer", "layer_norm"))
        self.conv("mlm_layer.conv2", ("mlm_layer", "conv2"))
        return self.table


def table(model: UVit2D) -> Table:
    """Every tensor of the diffusers state dict of `model`'s config -> (Flax parameter path,
    layout change)."""
    return _Builder(model).build()


def abstract_params(model: UVit2D) -> Any:
    """`model`'s parameter tree as unboxed ShapeDtypeStructs (nothing is initialised)."""
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(model)))
    return nn.unbox(variables["params"])


def params_from_diffusers(
    state: Mapping[str, np.ndarray], model: UVit2D, source: str
) -> dict[str, Any]:
    """The Flax parameter tree (the "params" collection, float32 numpy) of `model` from a
    diffusers `UVit2DModel` state dict.

    Raises:
      ConversionError: one line naming the first missing, unexpected or mis-shaped tensor.
    """
    return assemble(state, table(model), abstract_params(model), source)
