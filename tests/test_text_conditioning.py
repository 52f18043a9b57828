"""Frozen T5 in the base stage: in-graph, and from precomputed embeddings written by `embed`
(the table itself: tests/test_embedding_table.py)."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from muse_jax.eval import alignment_eval
from muse_jax.inference.pipeline import MusePipeline
from muse_jax.models import t5
from muse_jax.text import embeddings, precompute, safetensors_t5
from muse_jax.text.conditioning import TextConditioner
from muse_jax.train import trainer


@pytest.fixture(scope="module")
def t5_checkpoint(tmp_path_factory):
    """A random tiny T5 v1.1 encoder written as transformers-style safetensors."""
    config = t5.get_config("tiny")
    ids = np.zeros((1, 4), np.int32)
    params = nn.unbox(t5.T5Encoder(config).init(jax.random.PRNGKey(3), ids, np.ones_like(ids)))
    params = jax.tree.map(np.asarray, params["params"])
    path = str(tmp_path_factory.mktemp("t5_tiny"))
    safetensors_t5.save_encoder_params(params, config, path)
    return path, params


def _t5_config(smoke_workdir: str, checkpoint: str):
    from configs import shapes_tiny

    config = shapes_tiny.get_config("smoke")
    config.tokenizer_workdir = smoke_workdir
    config.data.data_dir = os.path.join(smoke_workdir, "data")
    t = config.text_encoder
    t.name, t.preset, t.checkpoint, t.trainable = "t5", "tiny", checkpoint, False
    return config


@pytest.mark.slow
def test_frozen_t5_in_the_graph_trains_the_base_stage_and_stays_frozen(
    trained_smoke, t5_checkpoint, tmp_path
):
    _, smoke_workdir = trained_smoke
    checkpoint, reference = t5_checkpoint
    config = _t5_config(smoke_workdir, checkpoint)
    result = trainer.train(config, str(tmp_path), "base")
    assert result.status == "completed" and np.isfinite(result.metrics["loss"])
    pipe = MusePipeline.from_workdir(config, str(tmp_path), stages="base")
    params = pipe.model.params["base"]
    assert pipe.steps["base"] == config.base.train.num_steps
    jax.tree.map(np.testing.assert_array_equal, params["text_encoder"], reference)
    out = alignment_eval.generate(pipe, ["a red circle"], samples_per_prompt=2, seed=0)
    assert out.images.shape == (2, 32, 32, 3)


@pytest.mark.slow
def test_embed_writes_a_resumable_table_that_the_base_stage_trains_on(
    trained_smoke, t5_checkpoint, tmp_path
):
    _, smoke_workdir = trained_smoke
    checkpoint, params = t5_checkpoint
    config = _t5_config(smoke_workdir, checkpoint)
    workdir, table_dir = str(tmp_path / "exp"), str(tmp_path / "emb")
    captions = precompute.collect_captions(config, workdir, ["train", "test"], None)
    assert captions[0] == "" and len(set(captions)) == len(captions)

    def embed(some):
        return precompute.embed(
            config, workdir, table_dir, some, batch_size=16, chunk_size=64, dtype="bfloat16"
        )

    # A first run over some captions, then one over all: the second embeds exactly the rest
    # (resuming and appending are the same path), a third nothing.
    assert embed(captions[:100]) == 100
    assert embed(captions) == len(captions) - 100
    assert embed(captions) == 0
    table = embeddings.EmbeddingTable(table_dir)
    assert list(table.captions()) == captions and table.dim == t5.get_config("tiny").d_model

    # Values are the encoder's outputs (to bf16 precision) on real tokens.
    ids_mask = TextConditioner(config, workdir).encode(captions[:5])
    direct = np.asarray(
        t5.T5Encoder(t5.get_config("tiny")).apply(
            {"params": params}, ids_mask["text_ids"], ids_mask["text_mask"]
        )
    )
    emb, mask = table.lookup(captions[:5])
    np.testing.assert_array_equal(mask, ids_mask["text_mask"])
    real = mask.astype(bool)
    np.testing.assert_allclose(emb[real], direct[real], rtol=2e-2, atol=2e-2)

    # The base stage trains from the table, with no text encoder in its state.
    config.text_embeddings = table_dir
    result = trainer.train(config, workdir, "base")
    assert result.status == "completed" and np.isfinite(result.metrics["loss"])
    pipe = MusePipeline.from_workdir(config, workdir, stages="base", batch_size=64)
    sparams, conditioner = pipe.model.params["base"], pipe.model.conditioner
    assert "text_encoder" not in sparams and conditioner.precomputed
    out = alignment_eval.generate(
        pipe, list(config.eval.seen_prompts), samples_per_prompt=2, seed=0
    )
    assert out.images.shape[0] == 2 * len(config.eval.seen_prompts)
    with pytest.raises(embeddings.UnknownCaptionError, match="not in the precomputed text"):
        conditioner.encode(["a never embedded prompt"])
