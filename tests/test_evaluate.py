"""The evaluation binary: metric plug-ins, TensorBoard + JSON output, the FID cache, --watch.

The binary runs on the tiny trained experiments of conftest.py with random-weight metric networks
written in the formats a user supplies (tests/eval_fixtures.py); its numbers are then checked
against the library computed in-process on the same seed.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest

from muse_jax.eval import evaluator, metrics
from muse_jax.train import summaries
from tests.helpers import ROOT, run_module

CONFIG = os.path.join(ROOT, "configs", "shapes_tiny.py") + ":smoke"


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    return run_module("muse_jax.evaluate", f"--config={CONFIG}", *args)


def _finite(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if k != "n" and v == v}


# ----------------------------------------------------------------------------- library, fast


def test_registry_and_config_errors_name_the_key(smoke_config, tmp_path):
    with pytest.raises(metrics.MetricConfigError, match="valid: alignment, clip, fid"):
        metrics.get("inception_score")

    ev = smoke_config.eval

    def build(*names: str):
        ev.metrics = names
        return metrics.build(metrics.Setup(smoke_config, str(tmp_path)))

    assert [m.name for m in build("alignment")] == ["alignment"]
    with pytest.raises(metrics.MetricConfigError, match="'bogus'.*valid: alignment, clip, fid"):
        build("alignment,bogus")  # Comma-separated names are split.
    with pytest.raises(metrics.MetricConfigError, match="--config.eval.fid.inception_weights="):
        build("fid")
    ev.clip.checkpoint = str(tmp_path / "missing")
    with pytest.raises(metrics.MetricConfigError, match="config.eval.clip.checkpoint=.*no such"):
        build("clip")
    ev.seen_prompts = ["a photo of a dog"]  # Only when no group has a prompt of the grammar.
    ev.held_out_prompts, ev.two_object_prompts = [], []
    with pytest.raises(metrics.MetricConfigError, match="shapes grammar.*'a photo of a dog'"):
        build("alignment")


def test_full_batches_feed_only_full_batches_and_keep_order():
    calls = []

    def fn(x):
        calls.append(len(x))
        return x[:, :1] * 2

    rebatch = metrics.FullBatches(fn, size=4)
    parts = [np.arange(n * 3).reshape(n, 3) + 100 * i for i, n in enumerate((3, 3, 3))]
    for p in parts:
        rebatch.add(p)
    out = rebatch.flush()
    assert calls == [4, 4, 1]
    np.testing.assert_array_equal(out, np.concatenate(parts)[:, :1] * 2)


def test_chunks_give_every_sampler_call_one_shape(smoke_config):
    ev = smoke_config.eval  # 2 seen prompts, 1 held-out, 1 two-object prompt, 2 samples each.
    got = list(evaluator.chunks(smoke_config, ""))
    assert [(c.group, c.prompts, c.seed, c.size) for c in got] == [
        ("seen", list(ev.seen_prompts), 1, 2),
        ("held_out", list(ev.held_out_prompts), 1, 2),
        ("two_object", list(ev.two_object_prompts), 1, 2),
    ]
    assert got[1].padded() == [ev.held_out_prompts[0]] * 2
    ev.batch_size = 3  # One prompt (2 images) per call; seeds count up within a group.
    got = list(evaluator.chunks(smoke_config, ""))
    assert [(c.group, len(c.prompts), c.seed, c.size) for c in got] == [
        ("seen", 1, 1, 1),
        ("seen", 1, 2, 1),
        ("held_out", 1, 1, 1),
        ("two_object", 1, 1, 1),
    ]


def test_finalized_steps_skip_a_save_in_progress(tmp_path):
    from muse_jax import checkpoints
    from muse_jax.train.state import TrainState

    ckpt = checkpoints.Checkpointer(str(tmp_path), asynchronous=False)
    for step in (3, 6):
        w = np.ones(2, np.float32) * step
        ckpt.save(
            step, TrainState(step=np.int32(step), params={"w": w}, opt_state={}, rng=w, extra={})
        )
    ckpt.close()
    os.makedirs(tmp_path / "9.orbax-checkpoint-tmp-1700000000")  # Being written.
    assert evaluator.finalized_steps(str(tmp_path)) == [3, 6]
    assert evaluator.finalized_steps(str(tmp_path / "absent")) == []


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def _watcher(config, workdir, monkeypatch, listings, fail_on=()):
    """An Evaluator whose checkpoint listing follows `listings` (one per poll) and whose
    `evaluate` only records the step (and marks it done, as the real one does)."""
    runner = evaluator.Evaluator(config, workdir, cascade=False, log=lambda s: None)
    listings = list(listings)
    monkeypatch.setattr(
        evaluator,
        "finalized_steps",
        lambda d: listings.pop(0) if len(listings) > 1 else listings[0],
    )

    def evaluate(step):
        if step in fail_on:
            raise FileNotFoundError(step)
        evaluator._mark(runner.directory, step)

    runner.evaluate = evaluate
    return runner


def test_watch_evaluates_new_steps_once_and_stops(smoke_config, tmp_path, monkeypatch):
    final = smoke_config.base.train.num_steps  # 6
    clock = _Clock()
    runner = _watcher(smoke_config, str(tmp_path), monkeypatch, [[], [3], [3], [3, final]])
    assert runner.watch(10, 100, sleep=clock.sleep, clock=clock) == [3, final]
    # Restarted: everything is done already.
    runner = _watcher(smoke_config, str(tmp_path), monkeypatch, [[3, final]])
    assert runner.watch(10, 100, sleep=clock.sleep, clock=clock) == []


def test_watch_stops_at_the_step_where_a_capped_run_ended(smoke_config, tmp_path, monkeypatch):
    """A base run stopped by its wall-clock cap before num_steps (6) ends the watch at its last
    checkpoint, not after the timeout; with no record of an end the watch waits."""
    from muse_jax import stages

    clock = _Clock()
    base_dir = str(tmp_path / "base")
    os.makedirs(base_dir)

    def sleep(s):
        clock.sleep(s)
        if clock.now >= 30:  # The run ends at step 5 while the watcher waits.
            stages.record_stop(base_dir, 5, "time_budget")

    runner = _watcher(smoke_config, str(tmp_path), monkeypatch, [[3], [3], [3, 5]])
    assert runner.watch(10, 1000, sleep=sleep, clock=clock) == [3, 5]
    assert clock.now < 100  # Stopped well before the timeout.
    stages.clear_stop(base_dir)  # A restarted run: the watch goes on to num_steps.
    runner = _watcher(smoke_config, str(tmp_path), monkeypatch, [[3, 5]])
    assert runner.watch(10, 100, sleep=clock.sleep, clock=clock) == []
    assert clock.now >= 130  # Waited for the timeout.


def test_watch_times_out_and_skips_deleted_checkpoints(smoke_config, tmp_path, monkeypatch):
    clock = _Clock()
    # Step 2 is listed, then deleted (keep N) before its evaluation could restore it.
    runner = _watcher(smoke_config, str(tmp_path), monkeypatch, [[2, 3], [3]], fail_on=(2,))
    assert runner.watch(10, 100, sleep=clock.sleep, clock=clock) == [3]
    assert 100 <= clock.now <= 110  # Stopped after the timeout without a new checkpoint.
    with open(os.path.join(runner.directory, "evaluated.json")) as f:
        assert json.load(f) == {"evaluated": [3], "skipped": [2]}


def test_captioned_grid_draws_captions_under_the_samples():
    images = np.full((3, 32, 32, 3), 200, np.uint8)
    grid = evaluator.captioned_grid(images, ["a red circle", "a blue square", "x"], columns=2)
    assert grid.dtype == np.uint8 and grid.shape[1] == 2 + 2 * (128 + 2)
    text_band = grid[2 + 128 : 2 + 128 + 20, 2 : 2 + 128]  # Under the first sample.
    assert (text_band > 200).any()  # Light text on the dark background.


# ----------------------------------------------------------------------------- the binary


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from tests import eval_fixtures

    path = tmp_path_factory.mktemp("metric_weights")
    return {
        "inception": eval_fixtures.write_random_inception(str(path / "inception_fid.safetensors")),
        "clip": eval_fixtures.write_random_clip(str(path / "clip")),
    }


def _overrides(weights) -> list[str]:
    return [
        "--config.eval.metrics=alignment,clip,fid",
        f"--config.eval.clip.checkpoint={weights['clip']}",
        "--config.eval.clip.batch_size=8",
        f"--config.eval.fid.inception_weights={weights['inception']}",
        "--config.eval.fid.num_reference=8",
        "--config.eval.fid.batch_size=8",
    ]


def _config(weights):
    """The smoke config with the same overrides the binary gets."""
    from configs import shapes_tiny

    config = shapes_tiny.get_config("smoke")
    config.eval.metrics = ("alignment", "clip", "fid")
    config.eval.clip.update(dict(checkpoint=weights["clip"], batch_size=8))
    config.eval.fid.update(
        dict(inception_weights=weights["inception"], num_reference=8, batch_size=8)
    )
    return config


@pytest.fixture(scope="module")
def cascade_run(trained_cascade, weights, tmp_path_factory):
    """The binary with all three metrics on a copy of the trained cascade (its default)."""
    _, source = trained_cascade
    workdir = str(tmp_path_factory.mktemp("evaluate") / "run")
    shutil.copytree(source, workdir)
    proc = _evaluate(f"--workdir={workdir}", *_overrides(weights))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = os.path.join(workdir, "eval", "cascade")
    with open(os.path.join(run_dir, "metrics_6.json")) as f:
        record = json.load(f)
    return workdir, run_dir, record, proc


@pytest.mark.slow
def test_binary_writes_json_and_the_same_scalars_at_the_checkpoint_step(cascade_run):
    _, run_dir, record, proc = cascade_run
    assert record["step"] == 6 and record["stages"] == "cascade"
    assert record["steps"] == {"base": 6, "base_decoder": 6, "superres": 6, "decoder": 6}
    assert record["num_images"] == 8 and record["image_size"] == 64  # 4 prompts, 2 each.
    values = record["metrics"]
    assert {"clip_score", "clip_score_01", "fid"} <= set(values)
    single, two = ("size", "position"), ("relation",)
    for group in ("seen", "held_out", "two_object", "base_only/seen", "base_only/two_object"):
        for attr in ("color", "shape", "count", "all") + (two if "two" in group else single):
            assert f"alignment/{group}/{attr}" in values, (group, attr)
    assert values["fid"] > 0 and np.isfinite(values["fid"])
    assert values["clip_score_01"] == pytest.approx(values["clip_score"] / 100)
    assert set(record["wall_s"]) == {"load", "generate", "alignment", "clip", "fid"}
    assert set(record["s_per_1k_images"]) == {"generate", "alignment", "clip", "fid"}
    assert record["sampling"]["guidance_scale"] == 2.0 and "superres_sampling" in record
    scalars = summaries.read_scalars(run_dir)
    for name, value in values.items():
        assert scalars[f"eval/{name}"] == {6: pytest.approx(value, rel=1e-6, abs=1e-7)}
    import tensorflow as tf

    tags = {
        v.tag
        for path in glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
        for event in tf.compat.v1.train.summary_iterator(path)
        for v in event.summary.value
    }
    assert {"eval/samples", "eval/samples_base_only", "eval/captions"} <= tags
    with open(os.path.join(run_dir, "evaluated.json")) as f:
        assert json.load(f)["evaluated"] == [6]
    assert "[fid] wrote reference statistics of 8 images" in proc.stdout


@pytest.mark.slow
def test_binary_alignment_and_clip_equal_the_library_on_the_same_seed(cascade_run, weights):
    from muse_jax.data import shapes_alignment as alignment
    from muse_jax.eval import alignment_eval, clip, tokenizer_frechet
    from muse_jax.inference.pipeline import MusePipeline

    workdir, _, record, _ = cascade_run
    config = _config(weights)
    pipe = MusePipeline.from_workdir(config, workdir, stages="cascade", batch_size=64)
    steps, params = pipe.steps, pipe.model.params
    assert steps["base"] == record["step"]
    seen = alignment_eval.generate(
        pipe, list(config.eval.seen_prompts), samples_per_prompt=2, seed=1
    )
    # The one-prompt groups are padded to the seen group's 2 prompts: one sampler shape.
    expected = {"seen": _finite(seen.scores), "base_only/seen": _finite(seen.lowres_scores)}
    images, lows, captions = [seen.images], [seen.lowres_images], list(seen.captions)
    for group in ("held_out", "two_object"):
        prompt = config.eval[f"{group}_prompts"][0]
        out = alignment_eval.generate(pipe, [prompt] * 2, samples_per_prompt=2, seed=1)
        expected[group] = _finite(alignment.score(out.images[:2], out.captions[:2]))
        low = alignment.score(out.lowres_images[:2], out.captions[:2])
        expected[f"base_only/{group}"] = _finite(low)
        images.append(out.images[:2])
        lows.append(out.lowres_images[:2])
        captions += out.captions[:2]
    values = record["metrics"]
    for group, scores in expected.items():
        assert {k: values[f"alignment/{group}/{k}"] for k in scores} == scores, group
    images = np.concatenate(images)
    score = clip.CLIPScorer.from_pretrained(weights["clip"], batch_size=8).score(images, captions)
    assert values["clip_score"] == pytest.approx(score.clip_score, rel=1e-5)
    # The Fréchet distance of the main job's report, on the same images.
    scale = images.shape[1] // lows[0].shape[1]
    upsampled = np.concatenate(lows).repeat(scale, axis=1).repeat(scale, axis=2)
    outputs = {"cascade": images, "base_upsampled": upsampled}
    frechet = tokenizer_frechet.distances(pipe.model, outputs, captions, 1)
    for k in ("cascade", "base_upsampled", "real_floor"):
        assert values[f"alignment/frechet/{k}"] == pytest.approx(frechet[k], rel=1e-5), k
    # `step` swaps in an older base checkpoint; the other stages stay at their latest.
    older_pipe = MusePipeline.from_workdir(config, workdir, stages="cascade", base_step=3)
    older, older_steps = older_pipe.model.params, older_pipe.steps
    # The base decoder is tuned to the latest base: an older one decodes with the tokenizer's
    # decoder, and so does the low-res image the super-res stage reads (`lowres_vq`).
    assert older_steps == {**steps, "base": 3, "base_decoder": None}
    without_lowres = lambda p: {k: v for k, v in p.items() if k != "lowres_vq"}
    pairs = [
        zip(jax.tree.leaves(without_lowres(older[k])), jax.tree.leaves(without_lowres(params[k])))
        for k in params
    ]
    same = {k: all(np.array_equal(a, b) for a, b in p) for k, p in zip(params, pairs)}
    assert same == {"base": False, "superres": True}
    decoders = [p["superres"]["lowres_vq"]["decoder"] for p in (older, params)]
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, *decoders)))
    with pytest.raises(FileNotFoundError, match="No base checkpoint at step 4 .*has \\[3, 6\\]"):
        MusePipeline.from_workdir(config, workdir, stages="cascade", base_step=4)


@pytest.mark.slow
def test_fid_reference_statistics_are_cached_and_reused(cascade_run, weights):
    workdir, _, _, _ = cascade_run
    cached = glob.glob(os.path.join(workdir, "eval", "fid_stats", "*.npz"))
    assert len(cached) == 1 and "-test-8-64px-inception" in cached[0]
    mtime = os.path.getmtime(cached[0])
    # A second run's FID setup (the binary's code path): reads the file, computes nothing.
    lines: list[str] = []
    setup = metrics.Setup(_config(weights), workdir, "image_hr", lines.append)
    fid_metric = metrics.Fid(setup)
    fid_metric.prepare()
    assert any(f"reference statistics from {cached[0]} (8 images)" in ln for ln in lines), lines
    assert os.path.getmtime(cached[0]) == mtime
    # A different reference set (count) gets its own file, never the cached one.
    setup.config.eval.fid.num_reference = 4
    assert metrics.Fid(setup).cache_key() not in cached[0]


@pytest.mark.slow
def test_watch_evaluates_each_checkpoint_once_and_a_restart_redoes_nothing(trained_smoke, tmp_path):
    _, source = trained_smoke
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    ckpt_dir = os.path.join(workdir, "base", "checkpoints")
    assert evaluator.finalized_steps(ckpt_dir) == [3, 6]  # checkpoint_every=3, keep 2.
    os.makedirs(os.path.join(ckpt_dir, "9.orbax-checkpoint-tmp-1700000000"))  # Unfinished.
    args = [f"--workdir={workdir}", "--stages=base", "--watch", "--poll_s=0.2"]
    proc = _evaluate(*args, "--watch_timeout_s=60")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final step 6 evaluated; stopping" in proc.stdout
    run_dir = os.path.join(workdir, "eval", "base")
    with open(os.path.join(run_dir, "evaluated.json")) as f:
        assert json.load(f)["evaluated"] == [3, 6]
    scalars = summaries.read_scalars(run_dir)
    for step in (3, 6):
        with open(os.path.join(run_dir, f"metrics_{step}.json")) as f:
            record = json.load(f)
        assert record["steps"] == {"base": step} and record["stages"] == "base"
        assert "alignment/seen/all" in record["metrics"]
        assert not [k for k in record["metrics"] if "frechet" in k]  # Cascade only.
        for name, value in record["metrics"].items():
            assert scalars[f"eval/{name}"][step] == pytest.approx(value, rel=1e-6)
    before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(run_dir, "*"))}
    proc = _evaluate(*args, "--watch_timeout_s=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluated steps none" in proc.stdout
    assert {p: os.path.getmtime(p) for p in glob.glob(os.path.join(run_dir, "*"))} == before


@pytest.mark.slow
def test_dataset_captions_and_fid_reference_images_come_from_the_split(trained_smoke):
    from muse_jax.data import tasks

    config, workdir = trained_smoke
    config = config.copy_and_resolve_references()
    config.eval.update(dict(captions="dataset", split="test", num_images=5, batch_size=4))
    got = list(evaluator.chunks(config, workdir))
    assert [(len(c.prompts), c.samples_per_prompt, c.seed, c.size) for c in got] == [
        (4, 1, 1, 4),
        (1, 1, 2, 4),  # Padded to the first call's shape.
    ]
    first = next(
        tasks.batches(
            config,
            workdir,
            split="test",
            batch_size=5,
            seed=0,
            shuffle=False,
            repeat=False,
            keep_captions=True,
            images=("image_hr",),
        )
    )
    assert [p for c in got for p in c.prompts] == [c.decode() for c in first["caption"]]
    setup = metrics.Setup(config, workdir, "image_hr")
    real = np.concatenate(list(metrics.reference_images(setup, "test", 5, batch_size=2)))
    np.testing.assert_array_equal(real, summaries.to_uint8(first["image_hr"]))
    with pytest.raises(ValueError, match="num_reference=65 but split 'test'.* only 64 images"):
        list(metrics.reference_images(setup, "test", 65, batch_size=32))


@pytest.mark.slow
@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.eval.metrics=alignment,inception_score", "valid: alignment, clip, fid"),
        ("--config.eval.metrics=fid", "set --config.eval.fid.inception_weights=PATH"),
    ],
)
def test_binary_config_errors_are_one_line(tmp_path, flag, message):
    proc = _evaluate(f"--workdir={tmp_path}", flag)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
