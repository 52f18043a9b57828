"""Starting stages from published weights: `tokenizer.init_from='maskgit:PATH'` skips tokenizer
training (its step 0 is MaskGIT's VQGAN, exactly) and the base stage trains on its tokens."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax import checkpoints
from muse_jax.convert import maskgit
from muse_jax.models import factory
from muse_jax.train import stage, trainer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "maskgit", "tokenizer_checkpoint")
SMALL = dict(filters=32, channel_multipliers=(2, 1), num_res_blocks=1, codebook_size=64)


def _maskgit_config(smoke_config):
    config = smoke_config
    block = {**maskgit.model_block(), **SMALL, "embedding_dim": 16}
    config.tokenizer.model = type(config.tokenizer.model)(block)
    config.tokenizer.init_from = f"maskgit:{FIXTURE}"
    config.tokenizer.train.num_steps = 0
    config.base.train.num_steps = 6
    config.base.train.steps_per_call = 1
    config.base.train.log_every = 3
    return config


def test_maskgit_tokenizer_is_step_zero_and_the_base_stage_trains_on_it(smoke_config, tmp_path):
    config = _maskgit_config(smoke_config)
    workdir = str(tmp_path)
    result = trainer.train(config, workdir, "tokenizer")
    assert result.step == 0
    model = factory.tokenizer(config)
    mesh_params, step = stage.load_trained(
        config, workdir, "tokenizer", *_mesh(config), os.path.join(workdir, "tokenizer")
    )
    assert step == 0
    expected = maskgit.params_from_checkpoint(FIXTURE, model)
    got = jax.tree.map(np.asarray, mesh_params["vq"])
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    # The base stage tokenizes with it: a 2x-downsampling tokenizer gives 16x16 tokens.
    assert factory.base_transformer(config).seq_len == (config.data.image_size // 2) ** 2
    result = trainer.train(config, workdir, "base")
    assert result.step == 6 and np.isfinite(result.metrics["loss"])
    assert checkpoints.finalized_steps(os.path.join(workdir, "base", "checkpoints"))


def _mesh(config):
    from muse_jax import parallel

    return parallel.create_mesh(config), parallel.rules(config)


def test_a_maskgit_source_needs_a_maskgit_block(smoke_config, tmp_path):
    config = smoke_config
    config.tokenizer.init_from = f"maskgit:{FIXTURE}"
    config.tokenizer.train.num_steps = 0
    with pytest.raises(ValueError, match="needs tokenizer.model.kind='maskgit'"):
        trainer.train(config, str(tmp_path), "tokenizer")


def test_tokenizer_of_the_maskgit_block_decodes_what_it_encodes(smoke_config):
    """The factory builds the MaskGIT module from the config block (kind='maskgit')."""
    config = _maskgit_config(smoke_config)
    model = factory.tokenizer(config)
    params = maskgit.params_from_checkpoint(FIXTURE, model)
    x = jnp.zeros((1, 32, 32, 3))
    ids = model.apply({"params": params}, x, method=model.tokenize)
    assert ids.shape == (1, 256)


def test_user_data_maskgit_argument_describes_the_released_tokenizer():
    from configs import user_data

    config = user_data.get_config("maskgit")
    model = factory.tokenizer(config)
    assert model.downsample_factor == 16 and model.codebook_size == 1024
    assert factory.base_transformer(config).seq_len == 16 * 16
    assert config.tokenizer.train.num_steps == 0


def test_maskgit_without_a_path_is_one_clear_error(smoke_config, tmp_path):
    config = _maskgit_config(smoke_config)
    config.tokenizer.init_from = "maskgit:"
    with pytest.raises(ValueError, match="names no checkpoint"):
        trainer.train(config, str(tmp_path), "tokenizer")
