"""The shared trainer: clear config errors, SIGTERM -> checkpoint -> exact resume, NaN guard."""

import os
import signal

import jax
import numpy as np
import optax
import pytest

from muse_jax import checkpoints, compilation_cache, parallel, stages
from muse_jax.train import summaries, trainer
from muse_jax.train.tokenizer_stage import TokenizerStage
from tests.helpers import ROOT, child_env, run_module, sigterm_after

CONFIG = os.path.join(ROOT, "configs", "shapes_tiny.py")


def _run(args, **kw):
    return run_module("muse_jax.train", *args, **kw)


def test_bad_config_key_fails_with_one_clear_line(tmp_path):
    proc = _run(
        [f"--config={CONFIG}:smoke", "--config.base.no_such_key=1", f"--workdir={tmp_path}"]
    )
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: unknown config key 'no_such_key' in --config.base.no_such_key; "
        "see the config file for valid keys"
    ]
    assert "Traceback" not in proc.stderr


def test_unknown_stage_lists_the_valid_ones(tmp_path):
    proc = _run([f"--config={CONFIG}:smoke", "--config.stage=superduper", f"--workdir={tmp_path}"])
    assert proc.returncode == 2
    valid = (
        "tokenizer, base, base_decoder, superres_tokenizer, superres, decoder"  # In training order.
    )
    assert f"error: Unknown stage 'superduper'; valid: {valid}" in proc.stderr
    assert "Traceback" not in proc.stderr


def _read_scalars(directory: str, tag: str) -> dict[int, float]:
    return summaries.read_scalars(directory).get(tag, {})


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues_with_identical_parameters(tmp_path):
    workdir = str(tmp_path)
    args = [
        f"--config={CONFIG}:smoke",
        "--config.stage=tokenizer",
        f"--workdir={workdir}",
        "--config.tokenizer.train.num_steps=100000",
        "--config.tokenizer.train.log_every=1",
        "--config.tokenizer.train.checkpoint_every=100000",
        "--config.tokenizer.train.summary_every=100000",
    ]
    returncode, out = sigterm_after(["-m", "muse_jax.train", *args], "[tokenizer] step 5/")
    assert returncode == 0, out
    assert "preempted" in out
    ckpt = checkpoints.Checkpointer(checkpoints.checkpoint_dir(os.path.join(workdir, "tokenizer")))
    saved = ckpt.latest_step()
    ckpt.close()
    assert saved is not None and saved >= 5

    # The norm the run logged for its last state equals the norm of what was checkpointed.
    from configs import shapes_tiny

    config = shapes_tiny.get_config("smoke")
    stage = TokenizerStage(config, workdir)
    mesh, rules = parallel.create_mesh(config), parallel.rules(config)
    abstract, _ = parallel.abstract_state(stage.init, jax.random.PRNGKey(0), mesh, rules)
    restored, step = checkpoints.load_state(stage.stage_dir, abstract, "tokenizer")
    assert step == saved and int(restored.step) == saved
    logged = _read_scalars(stage.stage_dir, "train/param_norm")
    assert saved in logged
    np.testing.assert_allclose(float(optax.global_norm(restored.params)), logged[saved], rtol=1e-6)

    # Resuming continues from exactly that state and step.
    config.tokenizer.train.num_steps = saved + 2
    config.tokenizer.train.log_every = 1
    result = trainer.train(config, workdir, "tokenizer")
    assert result.status == "completed" and result.step == saved + 2
    logged = _read_scalars(stage.stage_dir, "train/param_norm")
    assert saved + 1 in logged and saved + 2 in logged


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(smoke_config, tmp_path):
    train = smoke_config.tokenizer.train
    train.num_steps, train.log_every, train.checkpoint_every = 50, 1, 1
    train.optimizer.learning_rate, train.optimizer.warmup_steps, train.optimizer.grad_clip = (
        1e30,
        2,
        0.0,
    )
    with pytest.raises(FloatingPointError, match="last good checkpoint is step") as err:
        trainer.train(smoke_config, str(tmp_path), "tokenizer")
    stage = TokenizerStage(smoke_config, str(tmp_path))
    mesh, rules = parallel.create_mesh(smoke_config), parallel.rules(smoke_config)
    abstract, _ = parallel.abstract_state(stage.init, jax.random.PRNGKey(0), mesh, rules)
    restored, step = checkpoints.load_state(stage.stage_dir, abstract, "tokenizer")
    assert f"last good checkpoint is step {step}" in str(err.value)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored.params))
    failed_at = int(str(err.value).split("non-finite metrics at step ")[1].split(":")[0])
    assert step < failed_at


def test_missing_tokenizer_checkpoint_is_a_clear_error(smoke_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="No tokenizer checkpoint"):
        trainer.train(smoke_config, str(tmp_path), "base")


def _record_batches(monkeypatch) -> list[np.ndarray]:
    """The images of every batch the trainer takes from TokenizerStage.batches, in order."""
    seen: list[np.ndarray] = []
    real_batches = TokenizerStage.batches

    def recording(self, seed, start_step=0):
        for batch in real_batches(self, seed, start_step):
            seen.append(batch["image"].copy())
            yield batch

    monkeypatch.setattr(TokenizerStage, "batches", recording)
    return seen


def test_time_budget_stops_with_a_checkpoint_and_a_rerun_resumes(
    smoke_config, tmp_path, monkeypatch
):
    uninterrupted = TokenizerStage(smoke_config, str(tmp_path)).batches(smoke_config.seed)
    seen = _record_batches(monkeypatch)
    train = smoke_config.tokenizer.train
    train.time_budget_s = 1e-3  # Already spent by the time the first step ends.
    result = trainer.train(smoke_config, str(tmp_path), "tokenizer")
    assert result.status == "time_budget" and result.step == 1
    stage_dir = os.path.join(str(tmp_path), "tokenizer")
    assert stages.stopped_at(stage_dir) == 1  # What `muse_jax.evaluate --watch` reads.
    train.time_budget_s = 0.0
    result = trainer.train(smoke_config, str(tmp_path), "tokenizer")
    assert result.status == "completed" and result.step == train.num_steps
    assert stages.stopped_at(stage_dir) == train.num_steps  # The rerun replaced the record.
    logged = _read_scalars(os.path.join(str(tmp_path), "tokenizer"), "train/loss")
    assert min(logged) == 1 and max(logged) == train.num_steps
    # Before and after the restart: exactly the batches of one uninterrupted iterator.
    assert len(seen) == train.num_steps
    for batch in seen:
        np.testing.assert_array_equal(batch, next(uninterrupted)["image"])


@pytest.mark.slow
def test_resume_sees_the_batches_and_reaches_the_state_of_an_uninterrupted_run(
    smoke_config, tmp_path, monkeypatch
):
    """Interrupted after step 1 (time budget) and resumed: the batches of steps 1.. and the final
    parameters equal those of a run that was never interrupted."""
    seen: dict[str, list[np.ndarray]] = {}
    real_batches = TokenizerStage.batches

    def recording(self, seed, start_step=0):
        log = seen.setdefault(self.workdir, [])
        for batch in real_batches(self, seed, start_step):
            log.append(batch["image"].copy())
            yield batch

    monkeypatch.setattr(TokenizerStage, "batches", recording)
    smoke_config.data.data_dir = str(tmp_path / "data")  # Build the dataset once.
    train = smoke_config.tokenizer.train
    train.num_steps, train.summary_every = 4, 1000
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert trainer.train(smoke_config, whole, "tokenizer").step == 4
    train.time_budget_s = 1e-3  # Spent by the end of the first step: stop there.
    assert trainer.train(smoke_config, parts, "tokenizer").status == "time_budget"
    train.time_budget_s = 0.0
    assert trainer.train(smoke_config, parts, "tokenizer").step == 4

    assert len(seen[whole]) == 4 and len(seen[parts]) == 1 + 3
    for a, b in zip(seen[whole], seen[parts]):
        np.testing.assert_array_equal(a, b)
    stage = TokenizerStage(smoke_config, whole)
    mesh, rules = parallel.create_mesh(smoke_config), parallel.rules(smoke_config)
    abstract, _ = parallel.abstract_state(stage.init, jax.random.PRNGKey(0), mesh, rules)
    params = [
        checkpoints.load_state(os.path.join(w, "tokenizer"), abstract, "tokenizer")[0].params
        for w in (whole, parts)
    ]
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "step,expected",
    [
        (0, 4),  # 1..4 end on log step 4: allowed.
        (4, 4),
        (6, 1),  # 7..10 would pass log step 8.
        (7, 1),
        (8, 1),  # 9..12 would pass checkpoint step 10.
        (10, 1),  # 11..14 would pass log step 12.
        (12, 4),
        (14, 1),
        (16, 1),  # 17..20 would pass the end (18).
        (17, 1),
    ],
)
def test_multi_step_calls_never_straddle_a_log_checkpoint_or_the_end(step, expected):
    every = (4, 0, 10)  # log_every, summary_every (0: never), checkpoint_every.
    assert trainer.steps_in_next_call(step, 4, 18, every) == expected
    assert trainer.steps_in_next_call(step, 1, 18, every) == 1


def test_bad_steps_per_call_is_a_clear_error(smoke_config, tmp_path):
    smoke_config.tokenizer.train.steps_per_call = 0
    with pytest.raises(ValueError, match="train.steps_per_call must be an integer >= 1, got 0"):
        trainer.train(smoke_config, str(tmp_path), "tokenizer")


def test_steps_per_call_trains_exactly_as_one_step_per_call(smoke_config, tmp_path, monkeypatch):
    """Same batches, logged means and final parameters with 4 steps per call as with 1; and
    the 4-step program really ran (steps 1-4 and 5-8 in one call each, the rest singly)."""
    smoke_config.data.data_dir = str(tmp_path / "data")
    train = smoke_config.tokenizer.train
    train.num_steps, train.log_every, train.checkpoint_every, train.summary_every = 10, 4, 10, 1000
    stacked: list[int] = []
    real_stack = trainer.stack_batches

    def counting(batches):
        stacked.append(len(batches))
        return real_stack(batches)

    monkeypatch.setattr(trainer, "stack_batches", counting)
    runs = {}
    for k in (1, 4):
        train.steps_per_call = k
        workdir = str(tmp_path / f"k{k}")
        assert trainer.train(smoke_config, workdir, "tokenizer").step == 10
        runs[k] = workdir
    assert stacked == [4, 4]  # Steps 9 and 10 (log at 8, end at 10) ran one per call.
    logs = [_read_scalars(os.path.join(runs[k], "tokenizer"), "train/loss") for k in (1, 4)]
    assert sorted(logs[0]) == sorted(logs[1]) == [4, 8, 10]
    for step in logs[0]:
        np.testing.assert_allclose(logs[1][step], logs[0][step], rtol=1e-5)
    stage = TokenizerStage(smoke_config, runs[1])
    mesh, rules = parallel.create_mesh(smoke_config), parallel.rules(smoke_config)
    abstract, _ = parallel.abstract_state(stage.init, jax.random.PRNGKey(0), mesh, rules)
    params = [
        checkpoints.load_state(os.path.join(runs[k], "tokenizer"), abstract, "tokenizer")[0]
        for k in (1, 4)
    ]
    assert int(params[0].step) == int(params[1].step) == 10
    for a, b in zip(jax.tree.leaves(params[0].params), jax.tree.leaves(params[1].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_sigterm_during_the_final_checkpoint_wait_still_saves_and_reports_it(
    smoke_config, tmp_path, monkeypatch
):
    """A SIGTERM that arrives while the trainer waits for its last async save neither kills the
    process nor loses the save; the run reports it so that a pipeline starts no next stage."""
    train = smoke_config.tokenizer.train
    train.num_steps, train.summary_every = 2, 1000
    real_close = checkpoints.Checkpointer.close

    def close_after_a_sigterm(self):
        os.kill(os.getpid(), signal.SIGTERM)  # A real signal, delivered to the trainer's handler.
        real_close(self)

    monkeypatch.setattr(checkpoints.Checkpointer, "close", close_after_a_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    result = trainer.train(smoke_config, str(tmp_path), "tokenizer")
    assert result.status == "preempted" and result.step == 2
    ckpt_dir = checkpoints.checkpoint_dir(os.path.join(str(tmp_path), "tokenizer"))
    assert checkpoints.finalized_steps(ckpt_dir)[-1] == 2
    assert signal.getsignal(signal.SIGTERM) == before  # The handler is gone after the run.


@pytest.mark.parametrize(
    "setting,workdir,expected",
    [
        ("auto", "gs://bucket/run", "gs://bucket/run/compilation_cache"),
        ("gs://bucket/shared_cache", "/runs/a", "gs://bucket/shared_cache"),
        ("auto", "/runs/a", "/runs/a/compilation_cache"),
        ("", "/runs/a", None),
    ],
)
def test_compilation_cache_directory_of_each_setting(setting, workdir, expected):
    assert compilation_cache.cache_dir(setting, workdir) == expected


def test_a_relative_compilation_cache_directory_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert compilation_cache.cache_dir("cache", "/runs/a") == str(tmp_path / "cache")


@pytest.mark.slow
def test_a_restarted_stage_on_gs_loads_its_train_step_from_the_compilation_cache_there(tmp_path):
    """Two fresh processes on a `gs://` workdir (a local GCS emulator): the first stops at its
    time budget after one step, the second resumes and takes its train step from
    `gs://.../compilation_cache`. Nothing lands in a local `gs:` folder."""
    from tests.gcs_emulator import gcs_emulator

    with gcs_emulator() as gcs:
        env = child_env(**gcs.env, JAX_DEBUG_LOG_MODULES="jax._src.compiler")
        args = [
            f"--config={CONFIG}:smoke",
            "--config.stage=tokenizer",
            f"--workdir=gs://{gcs.bucket}/run",
            f"--config.data.data_dir={tmp_path / 'data'}",  # Local: the dataset is not the point.
        ]
        first = _run([*args, "--config.tokenizer.train.time_budget_s=0.001"], env=env)
        assert first.returncode == 0, first.stderr[-4000:]
        assert "time_budget at step 1" in first.stdout
        cached = gcs.list("run/compilation_cache/")
        assert any(name.startswith("run/compilation_cache/jit_step_fn-") for name in cached)
        second = _run(args, env=env)
    assert second.returncode == 0 and "completed at step 6" in second.stdout, second.stderr[-4000:]
    assert "resumed from checkpoint step 1" in second.stdout
    assert "Persistent compilation cache hit for 'jit_step_fn'" in second.stderr
    assert "CACHE MISS for 'jit_step_fn'" not in second.stderr
    for where in (ROOT, str(tmp_path), os.getcwd()):
        assert not os.path.exists(os.path.join(where, "gs:")), where
