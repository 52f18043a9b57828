"""The CLIP text encoder of aMUSEd (and SDXL) against `transformers.CLIPTextModelWithProjection`.

Random PyTorch weights (LayerNorms perturbed so they count) written with `save_pretrained`, read
by the project's loader; the penultimate hidden states and the projected EOS state must match.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from tests.eval_fixtures import import_transformers

transformers = import_transformers()

from muse_jax.text import clip_model  # noqa: E402
from muse_jax.text.safetensors_t5 import CheckpointError  # noqa: E402

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    vocab_size=300,
    bos_token_id=298,
    eos_token_id=299,
    pad_token_id=299,
    projection_dim=48,
)
# openai/clip-vit-large-patch14's text tower (aMUSEd's text encoder), legacy eos id 2.
CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    vocab_size=49408,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
    projection_dim=768,
)


def _write(directory, fields) -> transformers.CLIPTextModelWithProjection:
    config = transformers.CLIPTextConfig(**fields)
    torch.manual_seed(0)
    model = transformers.CLIPTextModelWithProjection(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return model


def _ids(vocab: int, eos: int, seed: int = 0) -> np.ndarray:
    """Two rows: BOS, words, the EOS (the largest id), EOS padding; different lengths."""
    rng = np.random.default_rng(seed)
    ids = np.full((2, 77), eos, np.int64)
    ids[:, 0] = eos - 1
    for row, n in enumerate((5, 30)):
        ids[row, 1 : 1 + n] = rng.integers(0, eos - 1, n)
    return ids


@pytest.mark.parametrize("fields", [SMALL, CLIP_L], ids=["small", "clip-l"])
def test_hidden_states_and_projection_match_transformers(tmp_path, fields):
    model = _write(tmp_path, fields)
    hf = transformers.CLIPTextConfig.from_pretrained(tmp_path).to_dict()
    block = ml_collections.ConfigDict(clip_model.text_encoder_from_hf(hf, str(tmp_path)))
    encoder = clip_model.text_encoder(block)
    params = clip_model.load_text_encoder_params(str(tmp_path), encoder)
    # The largest id pools in the legacy config; a real EOS id pools at its first occurrence.
    eos = fields["vocab_size"] - 1
    ids = _ids(fields["vocab_size"], eos)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
    out = jax.jit(encoder.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
    hidden_err = np.max(np.abs(np.asarray(out["hidden"]) - ref.hidden_states[-2].numpy()))
    pooled_err = np.max(np.abs(np.asarray(out["pooled"]) - ref.text_embeds.numpy()))
    assert hidden_err <= 1e-5 and pooled_err <= 1e-5, (hidden_err, pooled_err)


def test_a_clip_model_directory_is_refused_in_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="clip_text_model"):
        clip_model.text_encoder_from_hf({"model_type": "clip"}, "x/config.json")
    _write(tmp_path, SMALL)
    hf = transformers.CLIPTextConfig.from_pretrained(tmp_path).to_dict()
    block = ml_collections.ConfigDict(clip_model.text_encoder_from_hf(hf, str(tmp_path)))
    block.clip.num_hidden_layers = 2  # The file has a third layer the config does not.
    with pytest.raises(CheckpointError, match="unexpected key 'text_model.encoder.layers.2"):
        clip_model.load_text_encoder_params(str(tmp_path), clip_model.text_encoder(block))
