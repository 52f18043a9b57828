"""T5 v1.1 encoder: parity with `transformers.T5EncoderModel`, the safetensors reader, sizes.

The reference is a small randomly initialised PyTorch model written with `save_pretrained`, so
the test needs no download; it exercises the same code path as the published checkpoints.
"""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from muse_jax.models import t5
from muse_jax.text import safetensors_t5
from tests.eval_fixtures import import_transformers

transformers = import_transformers()  # Hides a torchvision that cannot load.

HF_KW = dict(
    vocab_size=100,
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=3,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(transformers.T5Config(**HF_KW)).eval()
    with torch.no_grad():  # Default init makes norms exactly 1; perturb so they are tested.
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def ckpt(hf_model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("t5_single"))
    hf_model.save_pretrained(path, safe_serialization=True)
    return path


def _batch(lengths: list[int], seq_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, HF_KW["vocab_size"], size=(len(lengths), seq_len)).astype(np.int32)
    mask = (np.arange(seq_len)[None] < np.array(lengths)[:, None]).astype(np.int32)
    return ids * mask, mask


def _max_error(model, params: dict, config: t5.T5Config, ids: np.ndarray, mask: np.ndarray):
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
        ).last_hidden_state.numpy()
    ours = np.asarray(jax.jit(t5.T5Encoder(config).apply)({"params": params}, ids, mask))
    assert ours.shape == ref.shape and ours.dtype == np.float32
    valid = mask.astype(bool)
    return float(np.abs(ours - ref)[valid].max()), float(np.abs(ref[valid]).max())


def test_config_from_hf(ckpt):
    config = safetensors_t5.config_from_hf(ckpt)
    assert config == t5.T5Config(
        vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4
    )


def test_parity_padded_and_long(hf_model, ckpt):
    config = safetensors_t5.config_from_hf(ckpt)
    params = safetensors_t5.load_encoder_params(ckpt)
    expected = t5.param_shapes(config)
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, expected)
    # Different lengths per row, one row fully used; 160 > max_distance hits the log buckets
    # and the clipped last bucket.
    for lengths, seq_len in (([7, 12, 3, 12], 12), ([160, 97], 160)):
        ids, mask = _batch(lengths, seq_len)
        err, scale = _max_error(hf_model, params, config, ids, mask)
        assert err <= 1e-4, (lengths, err, scale)


def test_padding_does_not_leak(ckpt):
    config = safetensors_t5.config_from_hf(ckpt)
    params = safetensors_t5.load_encoder_params(ckpt)
    ids, mask = _batch([5], 9)
    noisy = ids.copy()
    noisy[:, 5:] = 42
    apply = jax.jit(t5.T5Encoder(config).apply)
    a = apply({"params": params}, ids, mask)[:, :5]
    b = apply({"params": params}, noisy, mask)[:, :5]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_checkpoint(hf_model, tmp_path):
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="100KB")
    assert os.path.exists(tmp_path / safetensors_t5.INDEX_FILE)
    assert not os.path.exists(tmp_path / safetensors_t5.WEIGHTS_FILE)
    config = safetensors_t5.config_from_hf(str(tmp_path))
    params = safetensors_t5.load_encoder_params(str(tmp_path))
    ids, mask = _batch([4, 10], 10)
    err, _ = _max_error(hf_model, params, config, ids, mask)
    assert err <= 1e-4


def test_bf16_checkpoint_is_upcast(hf_model, ckpt, tmp_path):
    hf_model.to(torch.bfloat16).save_pretrained(str(tmp_path), safe_serialization=True)
    hf_model.to(torch.float32)
    ours = safetensors_t5.load_encoder_params(str(tmp_path))
    full = safetensors_t5.load_encoder_params(ckpt)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(full), strict=True):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)


def test_save_roundtrip_loads_in_transformers(tmp_path):
    """Our writer produces a directory that transformers itself loads with equal outputs."""
    config = t5.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    ids, mask = _batch([6, 8], 8)
    params = nn.unbox(jax.jit(t5.T5Encoder(config).init)(jax.random.key(1), ids, mask)["params"])
    params = jax.tree.map(np.asarray, params)
    safetensors_t5.save_encoder_params(params, config, str(tmp_path))
    back = safetensors_t5.load_encoder_params(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, back, params)
    model = transformers.T5EncoderModel.from_pretrained(str(tmp_path)).eval()
    err, _ = _max_error(model, params, config, ids, mask)
    assert err <= 1e-4


def _edit_checkpoint(src: str, dst: str, edit) -> None:
    tensors = load_file(os.path.join(src, safetensors_t5.WEIGHTS_FILE))
    edit(tensors)
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, safetensors_t5.WEIGHTS_FILE))
    with (
        open(os.path.join(src, "config.json")) as f,
        open(os.path.join(dst, "config.json"), "w") as g,
    ):
        g.write(f.read())


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda t: t.pop("encoder.block.1.layer.1.DenseReluDense.wi_1.weight"), "wi_1"),
        (
            lambda t: t.update({"encoder.block.1.layer.2.extra.weight": np.zeros(3, np.float32)}),
            "extra",
        ),
        (
            lambda t: t.update(
                {"encoder.block.2.layer.0.SelfAttention.q.weight": np.zeros((64, 63), np.float32)}
            ),
            "block.2.layer.0.SelfAttention.q.weight",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_errors_name_the_key(ckpt, tmp_path, edit, key):
    _edit_checkpoint(ckpt, str(tmp_path), edit)
    with pytest.raises(safetensors_t5.CheckpointError, match=key) as info:
        safetensors_t5.load_encoder_params(str(tmp_path))
    assert "\n" not in str(info.value)


def test_decoder_keys_are_ignored(ckpt, tmp_path):
    def add_decoder(t):
        t["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((5, 5), np.float32)
        t["lm_head.weight"] = np.zeros((5, 5), np.float32)

    _edit_checkpoint(ckpt, str(tmp_path), add_decoder)
    assert "lm_head" not in json.dumps(
        jax.tree.map(np.shape, safetensors_t5.load_encoder_params(str(tmp_path)))
    )


def test_rejects_relu_t5(ckpt, tmp_path):
    with open(os.path.join(ckpt, "config.json")) as f:
        hf = json.load(f)
    hf["feed_forward_proj"] = "relu"
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf, f)
    with pytest.raises(safetensors_t5.CheckpointError, match="gated-gelu"):
        safetensors_t5.config_from_hf(str(tmp_path))


def test_bfloat16_compute_close(ckpt):
    config = safetensors_t5.config_from_hf(ckpt, dtype="bfloat16")
    params = safetensors_t5.load_encoder_params(ckpt)
    ids, mask = _batch([9, 4], 9)
    f32 = jax.jit(t5.T5Encoder(safetensors_t5.config_from_hf(ckpt)).apply)(
        {"params": params}, ids, mask
    )
    bf16 = jax.jit(t5.T5Encoder(config).apply)({"params": params}, ids, mask)
    assert bf16.dtype == jnp.float32
    valid = mask.astype(bool)
    assert float(jnp.abs(bf16 - f32)[valid].max()) < 0.1 * float(jnp.abs(f32)[valid].max())


def test_relative_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    n = 400
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    for buckets, distance in ((32, 128), (32, 64), (64, 256)):
        ref = T5Attention._relative_position_bucket(rel, True, buckets, distance).numpy()
        np.testing.assert_array_equal(t5.relative_position_buckets(n, n, buckets, distance), ref)


def test_boxed_params_have_logical_axes():
    config = t5.PRESETS["tiny"]
    ids = jnp.zeros((2, 5), jnp.int32)
    boxed = jax.eval_shape(t5.T5Encoder(config).init, jax.random.key(0), ids, jnp.ones_like(ids))
    axes = jax.tree.leaves(
        jax.tree.map(
            lambda b: b.names,
            boxed["params"],
            is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned),
        ),
        is_leaf=lambda x: isinstance(x, tuple),
    )
    assert len(axes) == len(jax.tree.leaves(boxed["params"]))
    assert {n for names in axes for n in names} == {
        "vocab",
        "embed",
        "joined_kv",
        "mlp",
        "heads",
        "relpos_buckets",
    }
    layer = boxed["params"]["encoder"]["layers_0"]
    assert layer["attention"]["query"]["kernel"].value.shape == (32, 32)
    assert layer["attention"]["out"]["kernel"].names == ("joined_kv", "embed")
    assert boxed["params"]["encoder"]["relpos_bias"]["rel_embedding"].value.shape == (4, 32)


def test_xxl_param_count_matches_transformers():
    """Like-for-like with `transformers.T5EncoderModel` built on the meta device (no memory).

    HF holds the token embedding in `shared` and ties `encoder.embed_tokens` to it; `parameters()`
    de-duplicates, so the embedding counts once, as T5X's single `token_embedder` does. Both keep
    one relative-position table (HF in block 0), and neither has the decoder or an LM head.
    """
    config = t5.PRESETS["xxl"]
    hf_config = transformers.T5Config(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        d_kv=config.d_kv,
        d_ff=config.d_ff,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        feed_forward_proj="gated-gelu",
    )
    with torch.device("meta"):
        model = transformers.T5EncoderModel(hf_config)
    assert model.encoder.embed_tokens.weight is model.shared.weight
    hf_count = sum(p.numel() for p in model.parameters())
    ours = t5.param_count(config)
    assert ours == hf_count
    assert abs(ours - 4.76e9) / 4.76e9 < 0.02


def test_get_config():
    assert t5.get_config("xxl", dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="xxl"):
        t5.get_config("huge")
