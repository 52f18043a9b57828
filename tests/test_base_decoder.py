"""The base decoder stage: the low-res decoder fine-tuned on the base transformer's re-drawn
grids, and sampling that decodes with it."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes_tiny
from muse_jax import stages
from muse_jax.errors import UsageError
from muse_jax.train.base_decoder_stage import redraw


def test_redraw_replaces_a_bounded_share_with_the_models_tokens():
    vocab, code = 16, 7
    tokens = jax.random.randint(jax.random.PRNGKey(0), (64, 1024), 0, vocab)
    tokens = jnp.where(tokens == code, 0, tokens)  # No real token equals the model's choice.
    seen_inputs = []

    def logits_fn(t):
        seen_inputs.append(t)
        return (
            jnp.where(jnp.arange(vocab + 1) == code, 50.0, -50.0)[None, None]
            .repeat(t.shape[0], 0)
            .repeat(t.shape[1], 1)
        )

    assert np.array_equal(redraw(jax.random.PRNGKey(1), tokens, logits_fn, vocab, 0.0), tokens)
    out = np.asarray(redraw(jax.random.PRNGKey(1), tokens, logits_fn, vocab, 0.6))
    changed = out != np.asarray(tokens)
    assert np.all(out[changed] == code)  # Re-drawn positions take the model's token ...
    # ... exactly where the model's input was masked, and nowhere else.
    assert np.array_equal(np.asarray(seen_inputs[-1]) == vocab, changed)
    share = changed.mean(axis=1)
    assert share.max() <= 0.6 + 0.06 and share.mean() == pytest.approx(0.3, abs=0.06)
    with pytest.raises(UsageError, match="redraw_max"):
        redraw(jax.random.PRNGKey(1), tokens, logits_fn, vocab, 1.5)


def test_a_config_without_the_block_skips_the_stage():
    config = shapes_tiny.get_config("smoke")
    assert "base_decoder" in stages.enabled(config)
    del config.base_decoder
    assert stages.enabled(config) == tuple(n for n in stages.NAMES if n != "base_decoder")


def test_loss_terms_it_would_ignore_are_refused(tmp_path):
    from muse_jax.train.base_decoder_stage import BaseDecoderStage

    config = shapes_tiny.get_config("smoke")
    assert set(config.base_decoder.loss) == set(BaseDecoderStage.loss_keys)
    config.base_decoder.loss.codebook_weight = 1.0  # The codebook is frozen here.
    with pytest.raises(UsageError, match="codebook_weight"):
        BaseDecoderStage(config, str(tmp_path))


def test_a_discriminator_without_its_width_is_refused(tmp_path):
    from muse_jax.train.base_decoder_stage import BaseDecoderStage

    config = shapes_tiny.get_config("smoke")
    del config.base_decoder.loss.disc_channels
    config.base_decoder.loss.adversarial_weight = 0.0
    BaseDecoderStage(config, str(tmp_path))  # Off (weight 0): pixel terms need no width.
    config.base_decoder.loss.adversarial_weight = 0.1
    with pytest.raises(UsageError, match=r"base_decoder\.loss\.adversarial_weight > 0 needs"):
        BaseDecoderStage(config, str(tmp_path))


def test_summary_psnr_clips_the_reconstruction():
    from muse_jax.train import summaries

    x = np.full((2, 4, 4, 3), 0.5, np.float32)
    assert summaries.psnr(x + 0.2, x) == pytest.approx(20.0, abs=1e-4)  # MSE 0.04 of range 2.
    x[:] = 0.9
    assert summaries.psnr(x + 0.6, x) == pytest.approx(26.0206, abs=1e-3)  # Clipped: MSE 0.01.


def test_trained_base_decoder_starts_from_the_tokenizer_and_sampling_uses_it(
    trained_cascade, tmp_path
):
    from muse_jax import checkpoints, parallel, stages
    from muse_jax.inference.pipeline import MusePipeline
    from muse_jax.train import stage as stage_lib
    from muse_jax.train import trainer

    config, source = trained_cascade
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    shutil.rmtree(stages.stage_dir(config, workdir, "base_decoder"))  # Trained again below.
    before = MusePipeline.from_workdir(config, workdir, stages="base")
    before_cascade = MusePipeline.from_workdir(config, workdir, stages="cascade")
    assert before.steps["base_decoder"] is None and "base_decoder" not in before.trained_steps

    # Warm start: the fine-tuning begins at exactly the tokenizer's decoder.
    stage = stage_lib.get("base_decoder")(config, workdir)
    mesh, rules = parallel.create_mesh(config), parallel.rules(config)
    state, _ = parallel.abstract_state(stage.init, jax.random.PRNGKey(0), mesh, rules)
    state = stage.warm_start(
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state), mesh, rules
    )
    tok = checkpoints.load_params(
        os.path.join(workdir, "tokenizer"),
        stage_lib.load_trained(config, workdir, "tokenizer", mesh, rules, abstract=True)[0],
        "tokenizer",
    )[0]
    chex_equal = jax.tree.map(
        lambda a, b: bool(np.array_equal(a, b)), state.params["decoder"], tok["vq"]["decoder"]
    )
    assert all(jax.tree.leaves(chex_equal))

    result = trainer.train(config, workdir, "base_decoder")
    assert result.step == config.base_decoder.train.num_steps
    after = MusePipeline.from_workdir(config, workdir, stages="base")
    assert after.trained_steps["base_decoder"] == config.base_decoder.train.num_steps
    prompts = list(config.eval.seen_prompts)
    a, b = before(prompts, seed=3), after(prompts, seed=3)
    assert np.array_equal(a.tokens, b.tokens)  # The same tokens ...
    assert not np.array_equal(a.array, b.array)  # ... decoded by the fine-tuned decoder.
    # In the cascade it draws the base stage's images, and the super-res stage reads those
    # images (`superres.model.lowres_input="pixels"`): the same base tokens, other high-res ones.
    assert config.superres.model.lowres_input == "pixels"
    c = before_cascade(prompts, seed=3)
    d = MusePipeline.from_workdir(config, workdir, stages="cascade")(prompts, seed=3)
    assert np.array_equal(c.lowres_tokens, d.lowres_tokens)
    assert not np.array_equal(c.lowres_array, d.lowres_array)
    assert not np.array_equal(c.tokens, d.tokens)


def test_adversarial_weight_trains_a_discriminator_beside_the_decoder(trained_cascade, tmp_path):
    from muse_jax import stages
    from muse_jax.inference.pipeline import MusePipeline
    from muse_jax.train import trainer

    config, source = trained_cascade
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    shutil.rmtree(stages.stage_dir(config, workdir, "base_decoder"))
    config = config.copy_and_resolve_references()
    config.base_decoder.loss.adversarial_weight = 0.0
    plain = trainer.train(config, workdir, "base_decoder")
    plain_pipe = MusePipeline.from_workdir(config, workdir, stages="base")
    plain_images = plain_pipe(["a red circle"], seed=1)
    assert "d_loss" not in plain.metrics

    shutil.rmtree(stages.stage_dir(config, workdir, "base_decoder"))
    config.base_decoder.loss.adversarial_weight = 1.0
    result = trainer.train(config, workdir, "base_decoder")
    assert result.step == config.base_decoder.train.num_steps
    # Its hinge terms are trained and logged; sampling loads the decoder beside it.
    assert np.isfinite(result.metrics["d_loss"]) and "g_adv" in result.metrics
    pipe = MusePipeline.from_workdir(config, workdir, stages="base")
    assert pipe.trained_steps["base_decoder"] == config.base_decoder.train.num_steps
    adv_images = pipe(["a red circle"], seed=1)
    assert np.array_equal(plain_images.tokens, adv_images.tokens)
    assert not np.array_equal(plain_images.array, adv_images.array)
