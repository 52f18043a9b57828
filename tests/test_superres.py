"""The super-res cascade: the super-res loss and conditioning, decoder fine-tuning, cascade
sampling, and resuming the new stages."""

import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax import checkpoints, parallel
from muse_jax.data import tasks
from muse_jax.sampling.sampler import CascadeSampler
from muse_jax.train import trainer
from muse_jax.train.base_stage import BaseStage
from muse_jax.train.decoder_stage import DecoderStage
from muse_jax.train.superres_stage import SuperResStage
from muse_jax.train.tokenizer_stage import SuperResTokenizerStage, TokenizerStage
from tests.helpers import ROOT, run_module


@pytest.fixture(scope="module")
def random_cascade(tmp_path_factory):
    """Every stage of the smoke config at its random initialisation (no training)."""
    from configs import shapes_tiny

    config = shapes_tiny.get_config("smoke")
    workdir = str(tmp_path_factory.mktemp("superres"))
    base, sr = BaseStage(config, workdir), SuperResStage(config, workdir)
    init = lambda stage, seed: nn.unbox(stage.init(jax.random.PRNGKey(seed))).params
    lo_vq = init(TokenizerStage(config, workdir), 1)["vq"]
    hi_vq = init(SuperResTokenizerStage(config, workdir), 2)["vq"]
    base_p, sr_p = init(base, 3), init(sr, 4)
    # Sharpen the random transformers so that their inputs visibly matter.
    sharpen = lambda p: jax.tree.map(lambda x: x * 3, p)
    params = {
        "base": {
            "transformer": sharpen(base_p["transformer"]),
            "text_encoder": base_p["text_encoder"],
            "vq": lo_vq,
        },
        "superres": {
            "transformer": sharpen(sr_p["transformer"]),
            "text_encoder": sr_p["text_encoder"],
            "vq": hi_vq,
            "lowres_vq": lo_vq,  # The smoke config's super-res reads the low-res image.
        },
    }
    ids, mask = tasks.encode_prompts(
        config, workdir, ["a large red circle on the left", "a small blue square at the top", ""]
    )
    cond = {"text_ids": ids[:2], "text_mask": mask[:2]}
    uncond = {"text_ids": np.repeat(ids[2:], 2, 0), "text_mask": np.repeat(mask[2:], 2, 0)}
    return config, base, sr, params, cond, uncond


def _loss(sr, params, inputs, targets, masked, text, low):
    loss, _ = sr.loss(
        params, None, inputs, targets, masked, text, {"lowres": low}, jax.random.PRNGKey(0)
    )
    return float(loss)


def _random_lowres(tr, rng, batch=2):
    """A random low-res input of `tr`'s kind: token ids, or an image in [-1, 1]."""
    shape = tr.lowres_example(batch).shape
    if tr.lowres_input == "pixels":
        return rng.uniform(-1, 1, shape).astype(np.float32)
    return rng.integers(0, tr.lowres_vocab_size, shape).astype(np.int32)


def test_superres_loss_reads_the_masked_high_res_positions_only(random_cascade):
    _, _, sr, params, cond, _ = random_cascade
    p = {
        "transformer": params["superres"]["transformer"],
        "text_encoder": params["superres"]["text_encoder"],
    }
    tr = sr.transformer
    rng = np.random.default_rng(0)
    targets = rng.integers(0, tr.vocab_size, (2, tr.seq_len)).astype(np.int32)
    masked = rng.random((2, tr.seq_len)) < 0.5
    inputs = np.where(masked, tr.mask_id, targets)
    low = _random_lowres(tr, rng)
    ref = _loss(sr, p, inputs, targets, masked, cond, low)

    # Other targets where the input is visible: the loss does not move, to the bit.
    other = np.where(masked, targets, (targets + 1) % tr.vocab_size)
    assert _loss(sr, p, inputs, other, masked, cond, low) == ref
    # One other target at a masked position: it does.
    i, j = np.argwhere(masked)[0]
    changed = targets.copy()
    changed[i, j] = (changed[i, j] + 1) % tr.vocab_size
    assert abs(_loss(sr, p, inputs, changed, masked, cond, low) - ref) > 1e-6


@pytest.mark.parametrize("lowres_input", ["tokens", "pixels"])
def test_lowres_input_reaches_each_examples_logits(random_cascade, lowres_input):
    config, _, sr, _, cond, _ = random_cascade
    tr = sr.transformer.clone(lowres_input=lowres_input)
    rng = np.random.default_rng(1)
    low = _random_lowres(tr, rng)
    ctx = jnp.asarray(rng.normal(size=(2, cond["text_mask"].shape[1], 16)), jnp.float32)
    tokens = jnp.full((2, tr.seq_len), tr.mask_id, jnp.int32)
    init = nn.unbox(tr.init(jax.random.PRNGKey(0), tokens, ctx, cond["text_mask"], low))
    sharp = jax.tree.map(lambda x: x * 3, init)
    apply = jax.jit(lambda low: tr.apply(sharp, tokens, ctx, cond["text_mask"], low))
    before = np.asarray(apply(low))
    low2 = low.copy()
    if lowres_input == "pixels":  # One pixel of example 0 only.
        low2[0, 5, 6, 1] = -low2[0, 5, 6, 1]
        assert "Embed_0" not in init["params"]["lowres"]  # No table of token ids.
    else:  # One token of example 0 only.
        low2[0, 3] = (low2[0, 3] + 1) % tr.lowres_vocab_size
    after = np.asarray(apply(low2))
    assert np.max(np.abs(after[0] - before[0])) > 1e-3
    np.testing.assert_array_equal(after[1], before[1])
    assert before.shape == (2, tr.seq_len, config.superres_tokenizer.model.codebook_size)


def test_pixel_input_cuts_the_image_into_each_low_res_tokens_patch():
    from muse_jax.models.transformer import SuperResTransformer

    tr = SuperResTransformer(
        vocab_size=5, seq_len=16, lowres_vocab_size=7, lowres_len=4, width=8, depth=1,
        lowres_depth=1, num_heads=2, mlp_dim=16, lowres_input="pixels", lowres_patch=3,
    )  # fmt: skip
    image = np.arange(2 * 6 * 6 * 3, dtype=np.float32).reshape(2, 6, 6, 3)
    assert tr.lowres_example(2).shape == image.shape
    patches = np.asarray(tr.apply({}, jnp.asarray(image), method=lambda m, x: m._patches(x)))
    assert patches.shape == (2, 4, 27)
    for r in range(2):
        for c in range(2):  # Row-major, as the low-res token grid.
            want = image[:, 3 * r : 3 * r + 3, 3 * c : 3 * c + 3].reshape(2, -1)
            np.testing.assert_array_equal(patches[:, 2 * r + c], want)
    with pytest.raises(ValueError, match="expected 6x6"):
        tr.apply({}, jnp.zeros((1, 8, 8, 3)), method=lambda m, x: m._patches(x))
    tokens, text, text_mask = jnp.full((1, 16), 5), jnp.ones((1, 3, 6)), jnp.ones((1, 3))
    with pytest.raises(ValueError, match="valid: tokens, pixels"):
        tr.clone(lowres_input="ids").init(
            jax.random.PRNGKey(0), tokens, text, text_mask, jnp.zeros((1, 4), jnp.int32)
        )


def test_pixel_super_res_sampler_reads_the_low_res_tokens_through_lowres_vq(random_cascade):
    """The sampler decodes the base tokens with params['lowres_vq'] (the base stage's decoder):
    another decoder gives the super-res stage another image, hence other tokens."""
    from muse_jax.sampling.sampler import SuperResSampler

    config, base, sr, params, cond, uncond = random_cascade
    assert sr.sampler.reads_pixels
    low = np.asarray(base.sampler(params["base"], cond, uncond, jax.random.PRNGKey(0)).tokens)
    p = params["superres"]
    a = sr.sampler(p, cond, uncond, jax.random.PRNGKey(1), None, low)
    b = sr.sampler(p, cond, uncond, jax.random.PRNGKey(1), None, low)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    other = jax.tree.map(lambda x: -x, p["lowres_vq"]["decoder"])
    p2 = {**p, "lowres_vq": {**p["lowres_vq"], "decoder": other}}
    c = sr.sampler(p2, cond, uncond, jax.random.PRNGKey(1), None, low)
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    with pytest.raises(ValueError, match="low-res tokenizer"):
        SuperResSampler(sr.transformer, sr.text_encoder, sr.hr_tokenizer, config.superres.sampling)


@pytest.mark.parametrize("mode", ["parent", "subpixel"])
def test_aligned_lowres_gives_each_high_res_token_its_parents_projection(mode):
    from muse_jax.models import factory
    from muse_jax.models.transformer import SuperResTransformer

    w, f = 8, 2  # A 2x2 low-res grid under a 4x4 high-res grid.
    tr = SuperResTransformer(
        vocab_size=5, seq_len=16, lowres_vocab_size=7, lowres_len=4, width=w, depth=1,
        lowres_depth=1, num_heads=2, mlp_dim=16, aligned_lowres=mode,
    )  # fmt: skip
    low_tokens = jnp.array([[1, 2, 3, 4]], jnp.int32)
    text, text_mask = jnp.ones((1, 3, 6)), jnp.ones((1, 3), jnp.int32)
    tokens = jnp.full((1, 16), tr.mask_id, jnp.int32)
    params = nn.unbox(tr.init(jax.random.PRNGKey(0), tokens, text, text_mask, low_tokens))
    (_, aligned), _ = tr.apply(params, text, text_mask, low_tokens, method=tr.encode_context)
    feats = tr.apply(
        params, low_tokens, jnp.ones_like(low_tokens), method=lambda m, t, k: m.lowres(t, k)
    )
    proj = params["params"]["aligned_proj"]
    x = np.asarray(feats[0])
    if mode == "subpixel":  # Each token's 3x3 neighbourhood, zeros past the border.
        grid = np.pad(x.reshape(2, 2, w), ((1, 1), (1, 1), (0, 0)))
        x = np.stack([grid[r : r + 3, c : c + 3].reshape(-1) for r in range(2) for c in range(2)])
    y = x @ np.asarray(proj["kernel"]) + np.asarray(proj["bias"])
    got = np.asarray(aligned[0]).reshape(4, 4, w)
    for r in range(4):
        for c in range(4):
            parent = (r // f) * 2 + c // f
            child = (r % f) * f + c % f if mode == "subpixel" else 0
            np.testing.assert_allclose(got[r, c], y[parent, child * w : (child + 1) * w], atol=1e-5)
    # Sub-pixel children of one parent differ; "parent" children are one vector.
    assert (np.abs(got[0, 0] - got[0, 1]).max() > 1e-3) == (mode == "subpixel")
    assert factory.aligned_lowres(True) == "parent" and factory.aligned_lowres(False) == "none"
    with pytest.raises(ValueError, match="valid: none, parent, subpixel"):
        tr.clone(aligned_lowres="bilinear").init(
            jax.random.PRNGKey(0), tokens, text, text_mask, low_tokens
        )


def test_cascade_returns_high_res_images_and_keeps_fixed_tokens_at_both_levels(random_cascade):
    config, base, sr, params, cond, uncond = random_cascade
    sampler = CascadeSampler(base.sampler, sr.sampler)
    lo, hi = base.transformer, sr.transformer
    init = np.full((2, lo.seq_len), lo.mask_id, np.int32)
    init[:, :5] = [[1, 2, 3, 4, 5]]
    init_hr = np.full((2, hi.seq_len), hi.mask_id, np.int32)
    init_hr[:, -7:] = 9
    out = sampler(params, cond, uncond, jax.random.PRNGKey(0), init, init_hr)
    hr, lr = config.data.hr_image_size, config.data.image_size
    assert out.images.shape == (2, hr, hr, 3)
    assert out.lowres_images.shape == (2, lr, lr, 3)
    np.testing.assert_array_equal(np.asarray(out.lowres_tokens)[:, :5], init[:, :5])
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, -7:], 9)
    assert not np.any(np.asarray(out.tokens) == hi.mask_id)
    assert not np.any(np.asarray(out.lowres_tokens) == lo.mask_id)
    # The super-res stage ran on the base tokens it was given: re-running it alone on them
    # with the same key reproduces the cascade's high-res tokens.
    _, sr_key = jax.random.split(jax.random.PRNGKey(0))
    alone = sr.sampler(params["superres"], cond, uncond, sr_key, init_hr, out.lowres_tokens)
    np.testing.assert_array_equal(np.asarray(alone.tokens), np.asarray(out.tokens))
    # A second call with new prompts of the same shape does not compile again.
    sampler(params, uncond, cond, jax.random.PRNGKey(1), init, init_hr)
    assert sampler._jitted._cache_size() == 1


def test_cascade_in_super_res_micro_batches_runs_each_as_the_stage_alone(random_cascade):
    """micro_batch=1 on a batch of 2: each image's high-res tokens are the super-res stage's
    own on its base tokens, with the micro-batch's key."""
    config, base, sr, params, cond, uncond = random_cascade
    cfg = config.superres.sampling.copy_and_resolve_references()
    cfg.micro_batch = 1
    chunked = type(sr.sampler)(sr.transformer, sr.text_encoder, sr.hr_tokenizer, cfg, sr.tokenizer)
    out = CascadeSampler(base.sampler, chunked)(params, cond, uncond, jax.random.PRNGKey(0))
    hr = config.data.hr_image_size
    assert out.images.shape == (2, hr, hr, 3) and out.num_masked.shape == (cfg.num_steps, 2)
    _, sr_key = jax.random.split(jax.random.PRNGKey(0))
    for i, key in enumerate(jax.random.split(sr_key, 2)):
        one = lambda d, i=i: {k: v[i : i + 1] for k, v in d.items()}
        low = np.asarray(out.lowres_tokens)[i : i + 1]
        alone = sr.sampler(params["superres"], one(cond), one(uncond), key, None, low)
        np.testing.assert_array_equal(np.asarray(alone.tokens)[0], np.asarray(out.tokens)[i])
        np.testing.assert_allclose(
            np.asarray(alone.images)[0], np.asarray(out.images)[i], atol=1e-5
        )


def test_guided_super_res_refinement_keeps_fixed_tokens(random_cascade):
    """Refinement in the super-res stage (off by default): its critic reads the prompt's half of
    the guided context, low-res tokens included, and fixed high-res tokens stay."""
    config, _, sr, params, cond, uncond = random_cascade
    cfg = config.superres.sampling.copy_and_resolve_references()
    cfg.update(guidance_scale=2.0, refine_rounds=2, refine_fraction=0.5, refine_steps=2)
    refining = type(sr.sampler)(sr.transformer, sr.text_encoder, sr.hr_tokenizer, cfg, sr.tokenizer)
    plain_cfg = cfg.copy_and_resolve_references()
    plain_cfg.refine_rounds = 0
    plain_sampler = type(sr.sampler)(
        sr.transformer, sr.text_encoder, sr.hr_tokenizer, plain_cfg, sr.tokenizer
    )
    hi = sr.transformer
    low = np.random.default_rng(0).integers(0, 8, (2, hi.lowres_len)).astype(np.int32)
    init_hr = np.full((2, hi.seq_len), hi.mask_id, np.int32)
    init_hr[:, :6] = 3
    key = jax.random.PRNGKey(0)
    out = np.asarray(refining(params["superres"], cond, uncond, key, init_hr, low).tokens)
    plain = np.asarray(plain_sampler(params["superres"], cond, uncond, key, init_hr, low).tokens)
    np.testing.assert_array_equal(out[:, :6], 3)
    assert not np.any(out == hi.mask_id) and not np.array_equal(out, plain)


@pytest.mark.slow
def test_decoder_finetuning_starts_as_the_plain_decoder_and_trains_only_the_decoder(
    trained_cascade,
):
    config, workdir = trained_cascade
    stage = DecoderStage(config, workdir)
    mesh, rules = parallel.create_mesh(config), parallel.rules(config)
    state, shardings, _ = parallel.jit_init(stage.init, jax.random.PRNGKey(0), mesh, rules)
    state = stage.warm_start(state, mesh, rules)
    frozen = stage.frozen(mesh, rules)
    x = next(
        tasks.batches(
            config, workdir, split="test", batch_size=4, seed=0, shuffle=False, images=("image_hr",)
        )
    )["image_hr"]
    recon = lambda m, p: np.asarray(m.apply({"params": p}, x)[0])
    plain = recon(stage.plain, frozen["plain"])
    np.testing.assert_allclose(
        recon(stage.model, stage.finetuned_params(state.params, frozen)), plain, atol=1e-6
    )

    assert set(state.params) == {"decoder"}  # Encoder and codebook are not trainable state.
    frozen_before = jax.tree.map(np.array, frozen)
    decoder_before = jax.tree.map(np.array, state.params["decoder"])
    step = jax.jit(stage.train_step, donate_argnums=(0,))
    for _ in range(3):  # Warm-up starts at lr 0, and a zero-init block's first conv moves last.
        state, metrics = step(state, {"image": x}, frozen)
    assert np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, frozen, frozen_before)
    changed = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != b)), state.params["decoder"], decoder_before
    )
    assert all(jax.tree.leaves(changed["extra_0_0"])), changed["extra_0_0"]
    # Same tokens in, so the plain and fine-tuned decoders see identical codes.
    ids = lambda m, p: np.asarray(m.apply({"params": p}, x, method=m.tokenize))
    np.testing.assert_array_equal(
        ids(stage.model, stage.finetuned_params(state.params, frozen)),
        ids(stage.plain, frozen["plain"]),
    )


@pytest.mark.slow
def test_super_res_trains_on_the_low_res_image_the_loaded_model_gives_it(trained_cascade):
    """Training's low-res input (`SuperResStage.targets`) is, to the bit, what the model loaded
    for inference feeds its transformer for the same tokens: the base decoder's image, not the
    plain tokenizer decoder's."""
    from muse_jax.inference import model as model_lib

    config, workdir = trained_cascade
    stage = SuperResStage(config, workdir)
    mesh, rules = parallel.create_mesh(config), parallel.rules(config)
    frozen = stage.frozen(mesh, rules)
    batch = next(
        tasks.batches(
            config, workdir, split="test", batch_size=4, seed=0, shuffle=False,
            images=stage.image_keys,
        )
    )  # fmt: skip
    _, inputs = stage.targets(batch, frozen)
    tk = stage.tokenizer
    ids = tk.apply({"params": frozen["tokenizer"]}, batch["image"], method=tk.tokenize)
    model = model_lib.from_workdir(config, workdir, stages="cascade")
    served = model.superres_sampler.lowres_input(model.params["superres"], ids)
    np.testing.assert_array_equal(np.asarray(inputs["lowres"]), np.asarray(served))
    plain = tk.apply({"params": frozen["tokenizer"]}, ids, method=tk.decode_ids)
    assert np.abs(np.asarray(served) - np.asarray(plain)).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["superres", "decoder"])
def test_new_stages_resume_exactly_where_they_stopped(trained_cascade, tmp_path, name):
    """Stopped at step 3 and resumed to 5 == trained straight to 5, to the bit."""
    config, source = trained_cascade
    config = config.copy_and_resolve_references()
    config[name].train.summary_every = 1000
    runs = {}
    for how in ("straight", "resumed"):
        workdir = str(tmp_path / how)
        shutil.copytree(source, workdir)
        shutil.rmtree(os.path.join(workdir, name))
        if how == "resumed":
            config[name].train.num_steps = 3
            first = trainer.train(config, workdir, name)
            assert (first.status, first.step) == ("completed", 3)
        config[name].train.num_steps = 5
        result = trainer.train(config, workdir, name)
        assert (result.status, result.step) == ("completed", 5)
        runs[how] = workdir

    stage = {"superres": SuperResStage, "decoder": DecoderStage}[name](config, runs["straight"])
    mesh, rules = parallel.create_mesh(config), parallel.rules(config)
    abstract, _ = parallel.abstract_state(stage.init, jax.random.PRNGKey(0), mesh, rules)
    final = {
        how: checkpoints.load_state(os.path.join(w, name), abstract, name)[0]
        for how, w in runs.items()
    }
    jax.tree.map(np.testing.assert_array_equal, final["resumed"].params, final["straight"].params)
    jax.tree.map(
        np.testing.assert_array_equal, final["resumed"].opt_state, final["straight"].opt_state
    )


@pytest.mark.slow
def test_inpainting_through_the_cascade_keeps_unmasked_tokens_and_pixels(trained_cascade, tmp_path):
    from PIL import Image

    from muse_jax.data import shapes
    from muse_jax.inference import model as model_lib
    from muse_jax.sampling import editing

    config, workdir = trained_cascade
    model = model_lib.from_workdir(config, workdir, stages="cascade")
    params, conditioner = model.params, model.conditioner
    lr, hr = config.data.image_size, config.data.hr_image_size
    stages = [
        editing.SamplerStage(model.base_sampler, params["base"], lr),
        editing.SamplerStage(model.superres_sampler, params["superres"], hr),
    ]
    scene = shapes.scene_from_caption("a large red circle in the center", np.random.default_rng(0))
    image = shapes.render(scene, hr).astype(np.float32)[None] / 127.5 - 1
    mask = shapes.object_mask(scene.objects[0], hr)[None]
    cond = conditioner.encode(["a large blue circle in the center"])
    uncond = conditioner.encode([""])
    res = editing.edit_with_mask(stages, image, mask, cond, uncond, jax.random.PRNGKey(0))
    assert res.images.shape == (1, hr, hr, 3)
    for level in range(2):  # Base and super-res tokens outside each level's mask: the input's.
        tm = res.token_masks[level]
        assert 0 < tm.sum() < tm.size
        np.testing.assert_array_equal(res.tokens[level][~tm], res.input_tokens[level][~tm])
    np.testing.assert_array_equal(res.images[~mask], image[~mask])

    Image.fromarray(shapes.render(scene, hr)).save(tmp_path / "in.png")
    Image.fromarray((mask[0] * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    proc = run_module(
        "muse_jax.edit",
        f"--config={os.path.join(ROOT, 'configs', 'shapes_tiny.py')}:smoke",
        f"--workdir={workdir}", f"--image={tmp_path / 'in.png'}",
        f"--mask={tmp_path / 'mask.png'}", "--prompt=a large blue circle in the center",
        "--num_samples=1", f"--output_dir={tmp_path / 'out'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.asarray(Image.open(tmp_path / "out" / "edit_000.png")).shape == (hr, hr, 3)
