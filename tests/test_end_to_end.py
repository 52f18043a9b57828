"""The binaries on a tiny trained experiment: sample, pipeline report, TensorBoard output."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from muse_jax.prompt_groups import prompt_groups
from muse_jax.train import summaries
from tests.helpers import ROOT, run_module, run_python

CONFIG = os.path.join(ROOT, "configs", "shapes_tiny.py") + ":smoke"


def _sample(*args):
    return run_module("muse_jax.sample", f"--config={CONFIG}", *args)


@pytest.mark.slow
def test_sample_binary_writes_one_png_per_sample_and_a_grid(trained_smoke, tmp_path):
    _, workdir = trained_smoke
    out = tmp_path / "out"
    proc = _sample(
        f"--workdir={workdir}",
        "--prompt=a large red circle on the left",
        "--num_samples=3",
        f"--output_dir={out}",
        "--seed=5",
        "--stages=base",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == [
        "grid.png",
        "sample_000.png",
        "sample_001.png",
        "sample_002.png",
        "samples.json",
    ]
    assert np.asarray(Image.open(out / "sample_000.png")).shape == (32, 32, 3)
    record = json.loads((out / "samples.json").read_text())
    assert record["num_samples"] == 3 and record["base_step"] == 6
    assert set(record["alignment"]) >= {"color", "shape", "all"}
    # Same seed, same pixels.
    out2 = tmp_path / "out2"
    proc = _sample(
        f"--workdir={workdir}",
        "--prompt=a large red circle on the left",
        "--num_samples=3",
        f"--output_dir={out2}",
        "--stages=base",
        "--seed=5",
    )
    assert proc.returncode == 0
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "grid.png")), np.asarray(Image.open(out2 / "grid.png"))
    )


@pytest.mark.slow
def test_sample_binary_rejects_an_empty_prompt_and_a_workdir_without_checkpoints(tmp_path):
    proc = _sample(f"--workdir={tmp_path}", "--prompt=   ", f"--output_dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and "error: --prompt is empty" in proc.stderr
    proc = _sample(
        f"--workdir={tmp_path}", "--prompt=a red circle", f"--output_dir={tmp_path / 'o'}"
    )
    assert proc.returncode == 2
    assert "error: No base checkpoint" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_pipeline_evaluation_writes_grids_json_and_tensorboard(trained_smoke):
    from muse_jax.eval import report as report_lib

    config, workdir = trained_smoke
    report = report_lib.evaluate_alignment(config, workdir)
    n = config.eval.samples_per_prompt
    groups = prompt_groups(config.eval)
    assert report["groups"] == [g for g, _ in groups] == ["seen", "held_out", "two_object"]
    for split, prompts in groups:
        scores = report[split]["scores"]
        assert scores["n"] == n * len(prompts)
        assert 0.0 <= scores["all"] <= min(scores["color"], scores["shape"]) <= 1.0
        grid = np.asarray(Image.open(os.path.join(workdir, "samples", f"{split}.png")))
        assert grid.shape[0] >= 32 * 4 * len(prompts)
        assert report[split]["checker_on_real_images"]["all"] == 1.0
    assert not np.isnan(report["two_object"]["scores"]["relation"])
    text = open(os.path.join(workdir, "alignment.json")).read()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    # NaN (an attribute no prompt states) is written as null, so every JSON reader parses it.
    finite = lambda d: {k: v for k, v in d.items() if v is not None and v == v}
    assert finite(saved["seen"]["scores"]) == finite(report["seen"]["scores"])
    nan_keys = {k for k, v in report["seen"]["scores"].items() if v != v}
    assert {k for k, v in saved["seen"]["scores"].items() if v is None} == nan_keys
    scalars = summaries.read_scalars(os.path.join(workdir, "eval"))
    np.testing.assert_allclose(
        scalars["alignment/seen/color"][6], report["seen"]["scores"]["color"], rtol=1e-6
    )
    # The trainer wrote its own curves too.
    base = summaries.read_scalars(os.path.join(workdir, "base"))
    assert sorted(base["train/loss"]) == [2, 3, 4, 6]


@pytest.mark.slow
def test_evaluation_samples_a_prompt_outside_the_grammar_and_skips_only_its_score(
    trained_smoke, tmp_path
):
    from muse_jax.eval import report as report_lib

    config, source = trained_smoke
    workdir = str(tmp_path / "w")
    shutil.copytree(source, workdir)
    config = config.copy_and_resolve_references()
    odd = "a photo of a dog on a beach"
    config.eval.held_out_prompts = [config.eval.held_out_prompts[0], odd]
    report = report_lib.evaluate_alignment(config, workdir)
    held = report["held_out"]
    assert held["skipped_prompts"] == [odd]
    # Its samples are in the grid; the scores count the other prompt's samples only.
    n = config.eval.samples_per_prompt
    assert held["scores"]["n"] == n
    assert held["per_prompt_all"][odd] is None
    grid = np.asarray(Image.open(os.path.join(workdir, "samples", "held_out.png")))
    assert grid.shape[0] >= 32 * 4 * 2
    assert f"(outside the shapes grammar): {odd!r}" in report_lib.table(report)


@pytest.mark.slow
def test_sample_binary_runs_the_cascade_by_default(trained_cascade, tmp_path):
    config, workdir = trained_cascade
    out = tmp_path / "out"
    proc = _sample(
        f"--workdir={workdir}",
        "--prompt=a large red circle on the left",
        "--num_samples=2",
        f"--output_dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    hr, lr = config.data.hr_image_size, config.data.image_size
    assert np.asarray(Image.open(out / "sample_000.png")).shape == (hr, hr, 3)
    record = json.loads((out / "samples.json").read_text())
    assert record["stages"] == "cascade" and record["image_size"] == hr
    assert record["steps"] == {"base": 6, "base_decoder": 6, "superres": 6, "decoder": 6}
    assert set(record["base_alignment"]) >= {"color", "shape"}
    base_grid = np.asarray(Image.open(out / "grid_base.png"))
    s = 128 // lr  # The base stage's own samples, in the same enlarged grid layout.
    assert base_grid.shape[:2] == ((lr + 2) * s, (2 * (lr + 1) + 1) * s)


def _check_frechet(config, workdir, report, scalars):
    """The report's Fréchet distances, and that the features tell real scenes from blanks."""
    from muse_jax.data import shapes
    from muse_jax.eval import report as report_lib
    from muse_jax.eval import tokenizer_frechet
    from muse_jax.inference.pipeline import MusePipeline

    n, fd = config.eval.samples_per_prompt, report["frechet"]
    prompts = [p for g in report["groups"] for p in report[g]["prompts"]]
    assert fd["n"] == n * len(prompts)
    for name in ("cascade", "base_upsampled", "real_floor"):
        assert np.isfinite(fd[name]) and fd[name] >= -1e-6, name
        assert scalars[f"frechet/{name}"][6] == pytest.approx(fd[name], rel=1e-5), name
    assert "real vs real" in report_lib.table(report)
    model = MusePipeline.from_workdir(config, workdir, stages="cascade").model
    rng, side = np.random.default_rng(5), config.data.hr_image_size
    scenes = [shapes.scene_from_caption(p, rng) for p in prompts for _ in range(n)]
    real = np.stack([shapes.render(scene, side) for scene in scenes])
    d = tokenizer_frechet.distances(model, {"real": real, "blank": 0 * real}, prompts, n)
    assert d["blank"] > 2 * max(d["real"], d["real_floor"]), d


@pytest.mark.slow
def test_cascade_evaluation_scores_base_and_cascade_and_the_decoders(trained_cascade, tmp_path):
    from muse_jax.eval import reconstruction
    from muse_jax.eval import report as report_lib

    config, workdir = trained_cascade
    report = report_lib.evaluate_alignment(config, workdir, cascade=True)
    n = config.eval.samples_per_prompt
    for split in report["groups"]:
        r = report[split]
        assert r["image_size"] == config.data.hr_image_size
        assert r["scores"]["n"] == r["base_scores"]["n"] == n * len(r["prompts"])
        for name in (split, "base_" + split):
            assert os.path.exists(os.path.join(workdir, "samples", f"{name}.png"))
    scalars = summaries.read_scalars(os.path.join(workdir, "eval"))
    np.testing.assert_allclose(
        scalars["alignment/base_seen/color"][6], report["seen"]["base_scores"]["color"], rtol=1e-6
    )
    assert "cascade" in report_lib.table(report)
    _check_frechet(config, workdir, report, scalars)
    # docs/make_pictures.py makes the README's pictures from this same run.
    done = run_python(
        "docs/make_pictures.py", f"--config={CONFIG}", f"--workdir={workdir}", f"--out={tmp_path}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    side = config.data.hr_image_size
    widths = {"edit_inpaint.png": 6, "edit_outpaint.png": 5, "edit_maskfree.png": 5}
    for name, count in widths.items():
        picture = Image.open(tmp_path / name)
        assert picture.size == (2 * (count * (side + 2) + 2), 2 * (side + 4)), name
    copies = {
        "cascade_seen.png": "seen.png",
        "shapes_held_out.png": "base_held_out.png",
        "cascade_two_object.png": "two_object.png",
    }
    for name, source in copies.items():
        scored = os.path.join(workdir, "samples", source)
        assert (tmp_path / name).read_bytes() == open(scored, "rb").read(), name
    psnr = reconstruction.decoder_psnr(config, workdir, max_images=20, batch_size=8)
    assert psnr["num_images"] == 20 and psnr["decoder_step"] == 6
    assert 0 < psnr["plain_db"] < 60 and 0 < psnr["finetuned_db"] < 60
