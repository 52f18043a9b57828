"""Editing (inpainting, outpainting, mask-free) through the generation sampler."""

from __future__ import annotations

import json
import os
import types

import jax
import numpy as np
import pytest
from PIL import Image

from muse_jax.sampling import editing
from tests.helpers import ROOT, run_module

CONFIG = os.path.join(ROOT, "configs", "shapes_tiny.py") + ":smoke"


def test_token_mask_regenerates_a_token_if_any_of_its_pixels_is_masked():
    m = np.zeros((1, 8, 8), bool)
    m[0, 5, 2] = True  # One pixel of token (2, 1) on a 4x4 grid (2x2 px tokens).
    t = editing.token_mask(m, grid=4).reshape(4, 4)
    assert t.sum() == 1 and t[2, 1]
    d = editing.token_mask(m, grid=4, dilation=1).reshape(4, 4)
    expected = np.zeros((4, 4), bool)
    expected[1:4, 0:3] = True
    np.testing.assert_array_equal(d, expected)
    with pytest.raises(ValueError, match="does not tile"):
        editing.token_mask(np.zeros((7, 7), bool), grid=4)


def test_blend_keeps_every_pixel_outside_the_mask_and_feathers_inside():
    rng = np.random.default_rng(0)
    orig = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    gen = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    mask = np.zeros((2, 16, 16), bool)
    mask[:, 4:12, 4:12] = True
    out = editing.blend(orig, gen, mask, feather=2)
    np.testing.assert_array_equal(out[~mask], orig[~mask])
    np.testing.assert_array_equal(out[:, 7:9, 7:9], gen[:, 7:9, 7:9])  # Deep inside: generated.
    alpha = editing.feather_alpha(mask[0], 2)
    assert 0 < alpha[4, 8] < alpha[5, 8] < alpha[6, 8] == 1.0
    np.testing.assert_array_equal(editing.blend(orig, gen, mask, 0)[mask], gen[mask])


def test_outpaint_padding_has_a_ceiling_relative_to_the_image():
    img = np.zeros((20, 10, 3), np.uint8)
    canvas, mask = editing.outpaint_canvas(img, (15, 30, 15, 30), 32)  # 80 = 4x the side.
    assert (~mask).sum() > 0
    for pad in [(0, 0, 71, 0), (100000,) * 4, (10**9, 0, 0, 0)]:
        with pytest.raises(ValueError, match="at most 4x the image's longer side"):
            editing.outpaint_canvas(img, pad, 32)


def test_outpaint_canvas_keeps_the_original_and_masks_the_padding():
    img = np.full((32, 16, 3), 200, np.uint8)
    canvas, mask = editing.outpaint_canvas(img, editing.parse_pad("0,0,16,0"), 32)
    assert canvas.shape == (32, 32, 3) and mask.shape == (32, 32)
    np.testing.assert_array_equal(canvas[:, :16], img)
    assert not mask[:, :16].any() and mask[:, 16:].all() and not canvas[:, 16:].any()
    # A canvas larger than the model is scaled down; the letterbox is generated too.
    canvas, mask = editing.outpaint_canvas(np.full((32, 32, 3), 9, np.uint8), (8, 0, 8, 0), 32)
    assert mask[:, :4].all() and mask[:4].all() and not mask[8:24, 8:24].any()
    for bad in ("1,2", "a,b,c,d", "0", "-1,0,0,0"):
        with pytest.raises(ValueError, match="--pad"):
            editing.parse_pad(bad)


class _FakeStage:
    """A `TokenStage` whose sampler fills masked positions with random ids (no model)."""

    image_size, grid, mask_id = 8, 4, 64

    def tokenize(self, images):
        return (np.abs(images).sum(-1)[:, ::2, ::2].reshape(len(images), -1) * 7 % 64).astype(int)

    def sample(self, init_tokens, cond, uncond, rng, lower=None):
        fill = np.asarray(jax.random.randint(rng, init_tokens.shape, 0, 64))
        tokens = np.where(init_tokens == self.mask_id, fill, init_tokens)
        images = np.zeros((len(tokens), 8, 8, 3), np.float32)
        return types.SimpleNamespace(tokens=tokens, images=images)


def test_maskfree_changes_at_most_the_fraction_per_iteration():
    stage = _FakeStage()
    images = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 3)), np.float32)
    res = editing.maskfree_edit(
        [stage], images, {}, {}, jax.random.PRNGKey(1), iterations=5, resample_fraction=0.25
    )
    assert len(res.changed_per_iteration) == 5
    for changed in res.changed_per_iteration:
        assert (changed <= 4).all() and changed.sum() > 0  # 0.25 * 16 tokens.
    assert (res.token_masks[0] == (res.tokens[0] != res.input_tokens[0])).all()
    # Low-score tokens are chosen first when biased.
    scores = np.tile(np.arange(16.0) * 100, (2, 1))
    pick = editing.choose_resample(jax.random.PRNGKey(2), (2, 16), 4, scores)
    assert pick.sum(-1).tolist() == [4, 4] and pick[:, :4].all()


class _RimStage(_FakeStage):
    """A base stage whose decoder gives token 1 (an object's rim) the colour of its neighbours,
    as a convolutional decoder can: the rim keeps its id when the object is recoloured, yet
    decodes in the new colour. Its sampler fills masked tokens with id 3 (the new colour)."""

    def tokenize(self, images):
        ids = np.zeros((len(images), 16), int)
        ids[:, 5], ids[:, 6] = 2, 1  # Object (colour 2) with its rim to its right.
        return ids

    def sample(self, init_tokens, cond, uncond, rng, lower=None):
        tokens = np.where(init_tokens == self.mask_id, 3, init_tokens)
        return types.SimpleNamespace(tokens=tokens, images=self.decode(tokens))

    def decode(self, tokens):
        grid = tokens.reshape(-1, 4, 4).astype(np.float32)
        left = np.pad(grid, ((0, 0), (0, 0), (1, 0)))[:, :, :-1]
        value = np.where(grid == 1, left, grid) / 2  # The rim takes its left neighbour's colour.
        return np.repeat(np.repeat(value, 2, 1), 2, 2)[..., None].repeat(3, -1)


class _RedrawStage(_FakeStage):
    """A super-res stage that draws every token it re-generates as 0.9."""

    def sample(self, init_tokens, cond, uncond, rng, lower=None):
        redrawn = np.repeat(np.repeat((init_tokens == self.mask_id).reshape(-1, 4, 4), 2, 1), 2, 2)
        return types.SimpleNamespace(
            tokens=init_tokens, images=np.where(redrawn[..., None], 0.9, -1.0).repeat(3, -1)
        )


def test_maskfree_redraws_pixels_whose_decoding_changed_though_their_token_did_not():
    """Recolouring the object (token 5: 2 -> 3) keeps the rim's id (token 6) but changes its
    decoded colour, so the cascade re-draws the rim's pixels too: kept, they would show the old
    colour beside the new. Tokens whose decoding did not change keep the input's pixels."""
    base = _RimStage()
    images = np.full((1, 8, 8, 3), -0.5, np.float32)
    before, after = base.tokenize(images), base.tokenize(images)
    after[:, 5] = 3
    changed = editing.decoded_change(base.decode(before), base.decode(after), base.grid)
    assert np.flatnonzero(changed[0]).tolist() == [5, 6]

    scores = np.zeros((1, 16))
    scores[:, 5] = -1e9  # Only the object's token is re-sampled; the rim keeps its id.
    res = editing.maskfree_edit(
        [base, _RedrawStage()], images, {}, {}, jax.random.PRNGKey(0), iterations=1,
        resample_fraction=1 / 16, score_fn=lambda tokens: scores, feather=0,
    )  # fmt: skip
    assert np.flatnonzero(res.token_masks[0][0]).tolist() == [5]  # Tokens that changed.
    rim, obj, far = (slice(2, 4), slice(4, 6)), (slice(2, 4), slice(2, 4)), (slice(6, 8),) * 2
    np.testing.assert_allclose(res.images[0][obj], 0.9)
    np.testing.assert_allclose(res.images[0][rim], 0.9)  # Re-drawn, not the input's -0.5.
    np.testing.assert_array_equal(res.images[0][far], -0.5)


# --- With a (tiny) trained model: the real, jitted sampler. ------------------------------------


@pytest.fixture(scope="module")
def smoke_model(trained_smoke):
    from muse_jax.inference import model as model_lib

    config, workdir = trained_smoke
    model = model_lib.from_workdir(config, workdir, stages="base")
    return config, model.base_sampler, model.params["base"], model.conditioner


def _scene_batch(n: int, size: int, seed: int = 0):
    from muse_jax.data import shapes

    rng = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(n):
        scene = shapes.scene_from_caption("a large red circle in the center", rng)
        images.append(shapes.render(scene, size))
        masks.append(shapes.object_mask(scene.objects[0], size))
    return np.stack(images).astype(np.float32) / 127.5 - 1.0, np.stack(masks)


@pytest.mark.slow
def test_inpaint_outpaint_maskfree_with_the_generation_sampler(smoke_model):
    config, sampler, params, conditioner = smoke_model
    n, size = 2, config.data.image_size
    stage = editing.SamplerStage(sampler, params, size)
    cond = conditioner.encode(["a large blue circle in the center"] * n)
    uncond = {k: np.repeat(v, n, 0) for k, v in conditioner.encode(["a red square"]).items()}
    sampler(params, cond, uncond, jax.random.PRNGKey(0))  # Plain generation compiles once.

    images, masks = _scene_batch(n, size)
    res = editing.edit_with_mask([stage], images, masks, cond, uncond, jax.random.PRNGKey(1))
    tm, toks, ids = res.token_masks[0], res.tokens[0], res.input_tokens[0]
    assert 0 < tm.sum() < tm.size
    np.testing.assert_array_equal(toks[~tm], ids[~tm])  # Outside the mask: the input's tokens.
    np.testing.assert_array_equal(res.images[~masks], images[~masks])  # Pixels unchanged.
    assert not np.allclose(res.images[masks], images[masks])

    canvas, omask = editing.outpaint_canvas(
        np.full((size, size // 2, 3), 255, np.uint8), (0, 0, size // 2, 0), size
    )
    canvas = np.repeat(canvas[None].astype(np.float32) / 127.5 - 1, n, 0)
    out = editing.edit_with_mask(
        [stage], canvas, np.repeat(omask[None], n, 0), cond, uncond, jax.random.PRNGKey(2)
    )
    kept = ~out.token_masks[0]
    assert kept.reshape(n, stage.grid, stage.grid)[:, :, : stage.grid // 2].all()
    np.testing.assert_array_equal(out.tokens[0][kept], out.input_tokens[0][kept])

    mf = editing.maskfree_edit(
        [stage], images, cond, uncond, jax.random.PRNGKey(3), iterations=3, resample_fraction=0.2
    )
    limit = round(0.2 * stage.grid**2)
    assert all((c <= limit).all() for c in mf.changed_per_iteration)
    # Every mode ran through the one compiled sampler: fixed tokens are an input, not a retrace.
    assert sampler._jitted._cache_size() == 1


@pytest.mark.slow
def test_maskfree_critic_resamples_the_least_likely_tokens_first(smoke_model):
    config, sampler, params, conditioner = smoke_model
    n, size = 2, config.data.image_size
    cond = conditioner.encode(["a large blue square on the left"] * n)
    uncond = {k: np.repeat(v, n, 0) for k, v in conditioner.encode([""]).items()}

    class Recording(editing.SamplerStage):
        def sample(self, init_tokens, *args, **kw):
            self.masks.append(np.asarray(init_tokens) == self.mask_id)
            return super().sample(init_tokens, *args, **kw)

    stage = Recording(sampler, params, size)
    stage.masks = []
    images, _ = _scene_batch(n, size)
    ids = stage.tokenize(images)
    scores = stage.token_log_probs(ids, cond)
    assert scores.shape == ids.shape and np.isfinite(scores).all() and np.all(scores <= 0)
    other = conditioner.encode(["a small red circle at the top"] * n)
    assert np.abs(stage.token_log_probs(ids, other) - scores).max() > 1e-4  # The prompt matters.
    # A weight that outweighs the Gumbel noise: round one re-samples the lowest-scoring tokens.
    count = round(0.25 * ids.shape[1])
    editing.maskfree_edit(
        [stage], images, cond, uncond, jax.random.PRNGKey(3), iterations=1,
        resample_fraction=0.25, critic=1e6,
    )  # fmt: skip
    lowest = np.argsort(scores, axis=-1, kind="stable")[:, :count]
    expected = np.zeros_like(stage.masks[0])
    np.put_along_axis(expected, lowest, True, axis=-1)
    np.testing.assert_array_equal(stage.masks[0], expected)
    with pytest.raises(ValueError, match="critic must be >= 0"):
        editing.maskfree_edit(
            [stage], images, cond, uncond, jax.random.PRNGKey(3), iterations=1,
            resample_fraction=0.25, critic=-1.0,
        )  # fmt: skip


def _edit(*args):
    return run_module("muse_jax.edit", f"--config={CONFIG}", *args)


@pytest.mark.slow
def test_edit_binary_writes_edits_and_fails_in_one_line_on_bad_inputs(trained_smoke, tmp_path):
    _, workdir = trained_smoke
    img = np.zeros((40, 48, 3), np.uint8)  # Not the model's size: resized and cropped.
    img[10:30, 10:30] = (255, 0, 0)
    Image.fromarray(img).save(tmp_path / "in.png")
    mask = np.zeros((40, 48), np.uint8)
    mask[8:32, 8:32] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = [
        f"--workdir={workdir}",
        f"--image={tmp_path / 'in.png'}",
        "--num_samples=2",
        "--stages=base",
    ]
    out = tmp_path / "out"
    proc = _edit(
        *common,
        f"--mask={tmp_path / 'mask.png'}",
        "--prompt=a large blue square on the left",
        "--negative_prompt=a red square",
        f"--output_dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resized 48x40 to 38x32 and centre-cropped to 32x32" in proc.stdout
    assert sorted(os.listdir(out)) == [
        "edit.json",
        "edit_000.png",
        "edit_001.png",
        "grid.png",
        "input.png",
        "mask.png",
    ]
    record = json.loads((out / "edit.json").read_text())
    assert record["mode"] == "inpaint" and record["negative_prompt"] == "a red square"
    assert np.asarray(Image.open(out / "edit_000.png")).shape == (32, 32, 3)
    # Mask-free: the binary's default fraction is the library's.
    maskfree = tmp_path / "maskfree"
    proc = _edit(
        *common,
        "--mode=maskfree",
        "--iterations=2",
        "--prompt=a large red square on the left",
        f"--output_dir={maskfree}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((maskfree / "edit.json").read_text())
    assert record["mode"] == "maskfree" and record["iterations"] == 2
    assert record["resample_fraction"] == editing.DEFAULT_RESAMPLE_FRACTION

    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    for extra, msg in [
        ([f"--mask={tmp_path / 'small.png'}"], "error: mask is 10x10 but the image is 48x40"),
        ([f"--mask={tmp_path / 'bad.png'}"], "error: cannot read mask"),
        (["--mode=outpaint"], "error: --mode=outpaint needs --pad"),
        (["--mode=outpaint", "--pad=1,2"], "error: --pad must be 4"),
        (["--mode=outpaint", "--pad=100000"], "at most 4x the image's longer side"),
        (["--mode=maskfree", "--resample_fraction=0"], "resample_fraction must be in (0, 1]"),
    ]:
        proc = _edit(*common, *extra, "--prompt=a red circle", f"--output_dir={out}")
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = _edit(
        f"--workdir={workdir}",
        f"--image={tmp_path / 'bad.png'}",
        "--prompt=a red circle",
        f"--output_dir={out}",
    )
    assert proc.returncode == 2 and "error: cannot read image" in proc.stderr


# --- The colour rate on a fully trained embedded-default experiment (opt-in). ------------------

_SWAP = {"red": "blue", "blue": "green", "green": "yellow", "yellow": "magenta"}
_SOURCES = (
    "a large red circle in the center",
    "a large blue square on the left",
    "a large green triangle at the top",
    "a large yellow square on the right",
    "a large red square at the bottom",
    "a large blue triangle in the center",
    "a large green circle on the right",
    "a large yellow triangle on the left",
)


@pytest.mark.skipif(
    not os.environ.get("MUSE_EDIT_WORKDIR"),
    reason="set MUSE_EDIT_WORKDIR to a trained configs/shapes_tiny.py experiment",
)
def test_inpainting_a_shape_with_another_colour_gives_that_colour():
    """Renders a shape, masks it (1 px margin), inpaints with the caption's colour swapped and
    checks the colour with the pixel alignment checker, over 8 scenes x 8 captions = 64."""
    from scipy import ndimage

    from configs import shapes_tiny
    from muse_jax.data import shapes
    from muse_jax.data import shapes_alignment as alignment
    from muse_jax.inference import images as summaries
    from muse_jax.inference import model as model_lib

    config = shapes_tiny.get_config()
    model = model_lib.from_workdir(config, os.environ["MUSE_EDIT_WORKDIR"], stages="base")
    sampler, params, conditioner = model.base_sampler, model.params["base"], model.conditioner
    size, rng = config.data.image_size, np.random.default_rng(0)
    images, masks, targets = [], [], []
    for caption in _SOURCES:
        old = caption.split()[2]
        for _ in range(8):
            scene = shapes.scene_from_caption(caption, rng)
            images.append(shapes.render(scene, size))
            masks.append(ndimage.binary_dilation(shapes.object_mask(scene.objects[0], size)))
            targets.append(caption.replace(old, _SWAP[old]))
    images = np.stack(images).astype(np.float32) / 127.5 - 1
    cond = conditioner.encode(targets)
    uncond = {k: np.repeat(v, len(targets), 0) for k, v in conditioner.encode([""]).items()}
    res = editing.edit_with_mask(
        [editing.SamplerStage(sampler, params, size)],
        images,
        np.stack(masks),
        cond,
        uncond,
        jax.random.PRNGKey(0),
    )
    out = summaries.to_uint8(res.images)
    color = np.mean([alignment.check(o, t)["color"] for o, t in zip(out, targets)])
    # Inside the mask: fraction of pixels of the new colour (nearest palette entry).
    names = ("background", *shapes.COLORS)
    labels = [alignment.classify_pixels(o)[m] for o, m in zip(out, masks)]
    inside = np.mean([np.mean(lab == names.index(t.split()[2])) for lab, t in zip(labels, targets)])
    print(
        f"\ninpaint colour rate over {len(targets)}: {color:.3f}; new-colour pixels in mask "
        f"{inside:.3f}; all attributes {alignment.score(out, targets)['all']:.3f}"
    )
    assert color >= 0.8
