"""UVit2D (aMUSEd's transformer) against diffusers' `UVit2DModel`.

Random diffusers models (every parameter drawn, norms and GRN included, so each one matters)
written with `save_pretrained`, read back by `read_safetensors`, converted, and run on the same
tokens (mask ids included), text, pooled embedding and micro-conditions. Configs: diffusers'
aMUSEd pipeline test model, a variant with every optional tensor (biases, no norm scales,
`kv_mapper`, two heads), and the real aMUSEd-256 transformer (600M parameters, batch 1).
"""

from __future__ import annotations

import functools
import gc
import inspect
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest


def _hide_broken_torchvision() -> None:
    """PyPI's torchvision may not load with torch's CPU build; diffusers decides at import
    whether it has one (and transformers, which its lora loader imports, uses it), so it must be
    hidden before diffusers is first imported."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 -- any failure: the wheel does not fit this torch.
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None


_hide_broken_torchvision()
pytest.importorskip("diffusers")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import torch  # noqa: E402
from diffusers import UVit2DModel  # noqa: E402

from muse_jax.convert import amused_configs, diffusers_uvit, tensors  # noqa: E402
from muse_jax.convert.tensors import ConversionError  # noqa: E402
from muse_jax.models import uvit  # noqa: E402
from tests.helpers import random_diffusers_model  # noqa: E402

# diffusers' tests/pipelines/amused/test_amused.py transformer (run there on a 4x4 grid).
DUMMY = dict(
    hidden_size=8,
    use_bias=False,
    hidden_dropout=0.0,
    cond_embed_dim=8,
    micro_cond_encode_dim=2,
    micro_cond_embed_dim=10,
    encoder_hidden_size=8,
    vocab_size=32,
    codebook_size=8,
    in_channels=8,
    block_out_channels=8,
    num_res_blocks=1,
    downsample=True,
    upsample=True,
    block_num_heads=1,
    num_hidden_layers=1,
    num_attention_heads=1,
    attention_dropout=0.0,
    intermediate_size=8,
    layer_norm_eps=1e-06,
    ln_elementwise_affine=True,
)
# Every optional tensor kind: biases, kv_mapper (block width != hidden), several heads and
# blocks, an odd micro-cond width, and no norm scales.
VARIANT = dict(
    DUMMY,
    use_bias=True,
    hidden_size=16,
    num_attention_heads=4,
    num_hidden_layers=2,
    block_out_channels=12,
    block_num_heads=2,
    num_res_blocks=2,
    micro_cond_encode_dim=3,
    micro_cond_embed_dim=15,
    intermediate_size=24,
    ln_elementwise_affine=False,
    sample_size=6,
)
AMUSED_256 = amused_configs.TRANSFORMER_256
VALID_AXES = {
    "batch", "length", "embed", "mlp", "heads", "kv", "vocab", "conv_in", "conv_out",
    "codebook", "height", "width", "context_embed",
}  # fmt: skip
TOL = 1e-4


def _random_diffusers(cfg: dict, seed: int) -> UVit2DModel:
    """A UVit2DModel with every parameter drawn (norm scales 1 + 0.3 N(0, 1); biases and GRN
    gamma/beta, its only `.gamma`/`.beta` tensors, 0.3 N(0, 1)): see `random_diffusers_model`."""
    return random_diffusers_model(UVit2DModel, cfg, seed, noise=0.3)


def _inputs(cfg: dict, grid: int, batch: int, text_len: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg["codebook_size"], (batch, grid, grid))
    tokens[rng.random(tokens.shape) < 0.4] = cfg["vocab_size"] - 1  # [MASK]
    micro = np.array([[512, 512, 0, 0, 6], [256, 320, 17, 3, 5.5]], np.float32)[:batch]
    n_micro = cfg["micro_cond_embed_dim"] // cfg["micro_cond_encode_dim"]
    return dict(
        tokens=tokens,
        encoder_hidden_states=rng.standard_normal(
            (batch, text_len, cfg["encoder_hidden_size"]), np.float32
        ),
        pooled_text_emb=rng.standard_normal((batch, cfg["cond_embed_dim"]), np.float32),
        micro_conds=np.resize(micro, (batch, n_micro)),
    )


def _reference(model: UVit2DModel, x: dict[str, np.ndarray]) -> np.ndarray:
    """diffusers' logits [B, C, H, W] as [B, H*W, C]."""
    with torch.inference_mode():
        out = model(
            torch.from_numpy(x["tokens"]),
            torch.from_numpy(x["encoder_hidden_states"]),
            torch.from_numpy(x["pooled_text_emb"]),
            torch.from_numpy(x["micro_conds"]),
        )
    b, c = out.shape[:2]
    return out.reshape(b, c, -1).permute(0, 2, 1).numpy()


def _save(model: UVit2DModel, directory: str) -> dict:
    """save_pretrained; returns the written config.json."""
    model.save_pretrained(directory, safe_serialization=True)
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


def _convert(config: dict, directory: str, grid: int) -> tuple[uvit.UVit2D, dict]:
    """config.json -> model block -> UVit2D, and the safetensors file -> its parameters."""
    block = uvit.config_from_diffusers(config)
    flax_model = uvit.build(ml_collections.ConfigDict(block), seq_len=grid * grid)
    path = os.path.join(directory, "diffusion_pytorch_model.safetensors")
    state = tensors.read_safetensors(path)
    return flax_model, diffusers_uvit.params_from_diffusers(state, flax_model, path)


def _flax_args(x: dict[str, np.ndarray]) -> tuple[jax.Array, ...]:
    b = x["tokens"].shape[0]
    return (
        jnp.asarray(x["tokens"].reshape(b, -1), jnp.int32),
        jnp.asarray(x["encoder_hidden_states"]),
        jnp.asarray(x["pooled_text_emb"]),
        jnp.asarray(x["micro_conds"]),
    )


def _small_case(cfg: dict, grid: int, directory: str) -> dict:
    torch_model = _random_diffusers(cfg, seed=0)
    x = _inputs(cfg, grid, batch=2, text_len=5, seed=1)
    model, params = _convert(_save(torch_model, directory), directory, grid)
    out = jax.jit(model.apply)({"params": params}, *_flax_args(x))
    return dict(
        cfg=cfg, torch_model=torch_model, x=x, ref=_reference(torch_model, x), model=model,
        params=params, out=np.asarray(out),
    )  # fmt: skip


@pytest.fixture(scope="module")
def dummy(tmp_path_factory) -> dict:
    return _small_case(DUMMY, 4, str(tmp_path_factory.mktemp("dummy")))


@pytest.fixture(scope="module")
def variant(tmp_path_factory) -> dict:
    return _small_case(VARIANT, 6, str(tmp_path_factory.mktemp("variant")))


@pytest.mark.parametrize("case", ["dummy", "variant"])
def test_small_configs_match_diffusers(case, request):
    c = request.getfixturevalue(case)
    model, out = c["model"], c["out"]
    assert model.mask_id == c["cfg"]["vocab_size"] - 1
    assert model.seq_len == c["x"]["tokens"][0].size
    assert out.shape == c["ref"].shape and out.dtype == np.float32
    err = float(np.max(np.abs(out - c["ref"])))
    assert err <= TOL, f"{case}: max abs error {err:.3g} against diffusers"


def test_context_then_logits_is_call(variant):
    model, variables = variant["model"], {"params": variant["params"]}

    @jax.jit
    def split(variables, tokens, *cond):
        ctx = model.apply(variables, *cond, method="context")
        return model.apply(variables, tokens, ctx, method="logits")

    out = split(variables, *_flax_args(variant["x"]))
    np.testing.assert_allclose(out, variant["out"], rtol=0, atol=1e-6)


def test_dropout_and_bfloat16(dummy):
    """Dropout draws from the "dropout" rng only when not deterministic; bfloat16 computes
    close to float32 with the same (float32) parameters."""
    tokens, *cond = _flax_args(dummy["x"])
    variables, ref = {"params": dummy["params"]}, dummy["ref"]
    block = uvit.config_from_diffusers(dict(DUMMY, hidden_dropout=0.3, attention_dropout=0.3))
    model = uvit.build(block, seq_len=16)
    apply = jax.jit(functools.partial(model.apply, deterministic=False))
    key = {"dropout": jax.random.key(3)}
    dropped = apply(variables, tokens, *cond, rngs=key)
    assert float(jnp.max(jnp.abs(dropped - ref))) > 1e-2
    np.testing.assert_array_equal(dropped, apply(variables, tokens, *cond, rngs=key))
    bf16 = uvit.build(dict(block, dtype="bfloat16"), seq_len=16)
    out = jax.jit(bf16.apply)(variables, tokens, *cond)
    assert out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out - ref))) < 0.1 * float(np.max(np.abs(ref)))


@pytest.mark.slow
def test_amused_256_matches_diffusers():
    """The real aMUSEd-256 config; batch 1, 77 text tokens. Peak memory is about three copies
    of the 2.4 GB of weights: the torch model goes before the file is read."""
    grid = AMUSED_256["sample_size"]
    x = _inputs(AMUSED_256, grid, batch=1, text_len=77, seed=2)
    torch_model = _random_diffusers(AMUSED_256, seed=1)
    ref = _reference(torch_model, x)
    # A RAM-backed folder when there is room: writing 2.4 GB to disk takes longer than the rest.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    if shm and shutil.disk_usage(shm).free < 6 << 30:
        shm = None
    directory = tempfile.mkdtemp(dir=shm)
    try:
        config = _save(torch_model, directory)
        del torch_model
        gc.collect()
        model, params = _convert(config, directory, grid)
    finally:
        shutil.rmtree(directory)
    assert model.seq_len == 256 and model.mask_id == 8255
    out = jax.jit(model.apply)({"params": params}, *_flax_args(x))
    err = float(np.max(np.abs(np.asarray(out) - ref)))
    assert err <= TOL, f"aMUSEd-256: max abs error {err:.3g} against diffusers"


def test_conversion_errors_name_the_tensor(dummy, tmp_path):
    model = dummy["model"]
    state = {k: v.numpy() for k, v in dummy["torch_model"].state_dict().items()}
    name = "transformer_layers.0.attn2.to_k.weight"
    bad = dict(state, **{name: state[name][:, :-1]})
    with pytest.raises(ConversionError, match=name.replace(".", r"\.")):
        diffusers_uvit.params_from_diffusers(bad, model, "x.safetensors")
    name = "down_block.res_blocks.0.channelwise_norm.gamma"
    bad = dict(state, **{name: state[name].reshape(-1)[:-1]})
    with pytest.raises(ConversionError, match=name.replace(".", r"\.")):
        diffusers_uvit.params_from_diffusers(bad, model, "x.safetensors")
    missing = "up_block.attention_blocks.0.attn1.to_out.0.weight"
    with pytest.raises(ConversionError, match=missing.replace(".", r"\.") + ".*missing"):
        diffusers_uvit.params_from_diffusers(
            {k: v for k, v in state.items() if k != missing}, model, "x.safetensors"
        )
    with pytest.raises(ConversionError, match="UNet2DConditionModel"):
        uvit.config_from_diffusers({"_class_name": "UNet2DConditionModel"})
    with pytest.raises(ConversionError, match="downsample"):
        uvit.config_from_diffusers(dict(DUMMY, upsample=False))


def test_config_fields_are_diffusers():
    """The model block's fields are UVit2DModel's arguments, with its defaults."""
    signature = inspect.signature(UVit2DModel.__init__).parameters
    want = {k: p.default for k, p in signature.items() if k != "self"}
    assert uvit.DIFFUSERS_DEFAULTS == want
    assert uvit.build({"kind": "uvit"}, seq_len=64 * 64).grid_size == 0
    assert uvit.build({"sample_size": 16}, seq_len=8 * 8).seq_len == 64
    with pytest.raises(ValueError, match="square"):
        uvit.build({}, seq_len=10)


def test_every_parameter_has_logical_axes():
    block = uvit.config_from_diffusers(dict(VARIANT, ln_elementwise_affine=True))
    model = uvit.build(block, seq_len=36)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *uvit.example_inputs(model)))[
        "params"
    ]
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    assert len(leaves) == len(diffusers_uvit.table(model))
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), f"{where} has no logical axes"
        names = leaf.names
        assert len(names) == leaf.value.ndim, f"{where}: {names} for shape {leaf.value.shape}"
        assert set(names) <= VALID_AXES and len(set(names)) == len(names), f"{where}: {names}"
