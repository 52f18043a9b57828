"""Fault injection: damaged checkpoints fall back to the newest intact step, saying which step
and why; a damaged step asked for by number is one line. Each test damages a copy of the
trained smoke workdir."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from muse_jax import checkpoints
from muse_jax.inference.pipeline import MusePipeline
from muse_jax.train import trainer
from tests.helpers import ROOT, child_env, run_module, signal_after

pytestmark = [pytest.mark.slow, pytest.mark.faults]
PROMPTS = ["a large red circle on the left"]


@pytest.fixture
def workdir(trained_smoke, tmp_path):
    config, source = trained_smoke
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return config, target


def _steps(workdir: Path, stage: str) -> list[int]:
    return checkpoints.finalized_steps(str(workdir / stage / "checkpoints"))


def _truncate_largest(folder: Path) -> Path:
    files = [p for p in folder.rglob("*") if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    return victim


def _images(config, workdir: Path, **kw) -> np.ndarray:
    return MusePipeline.from_workdir(config, str(workdir), stages="base", **kw)(PROMPTS, seed=1)


@pytest.mark.parametrize("damage", ["truncated params", "empty folder"])
def test_sampling_falls_back_to_the_newest_intact_step(workdir, damage, capsys):
    config, run = workdir
    older, latest = _steps(run, "base")[-2:]
    step_dir = run / "base" / "checkpoints" / str(latest)
    if damage == "truncated params":
        _truncate_largest(step_dir / "params")
    else:
        shutil.rmtree(step_dir)
        step_dir.mkdir()
    out = _images(config, run)
    said = capsys.readouterr().out
    assert f"base step {latest} in {run / 'base' / 'checkpoints'} cannot be read" in said
    assert f"base: using step {older}, the newest intact one" in said
    assert out.steps["base"] == older
    expected = _images(config, run, base_step=older)
    np.testing.assert_array_equal(out.array, expected.array)
    # Asked for by number, the damaged step is refused in one line.
    with pytest.raises(checkpoints.DamagedCheckpointError) as err:
        _images(config, run, base_step=latest)
    assert f"at step {latest}" in str(err.value) and "\n" not in str(err.value)


def test_a_deleted_tree_metadata_file_costs_nothing(workdir, capsys):
    """Readers pass the tree they expect, so `_METADATA` is not needed to read the arrays."""
    config, run = workdir
    before = _images(config, run)
    (run / "base" / "checkpoints" / str(before.steps["base"]) / "params" / "_METADATA").unlink()
    after = _images(config, run)
    assert after.steps == before.steps and "cannot be read" not in capsys.readouterr().out
    np.testing.assert_array_equal(after.array, before.array)


def test_every_step_damaged_is_one_line_naming_each(workdir):
    config, run = workdir
    for step in _steps(run, "base"):
        _truncate_largest(run / "base" / "checkpoints" / str(step) / "params")
    with pytest.raises(checkpoints.DamagedCheckpointError) as err:
        _images(config, run)
    message = str(err.value)
    assert message.startswith("No intact base checkpoint in") and "\n" not in message
    assert all(f"step {s}:" in message for s in _steps(run, "base"))


def test_damaged_optimizer_state_blocks_neither_sampling_nor_resuming(workdir, capsys):
    config, run = workdir
    older, latest = _steps(run, "base")[-2:]
    before = _images(config, run).array
    _truncate_largest(run / "base" / "checkpoints" / str(latest) / "train_state")
    np.testing.assert_array_equal(_images(config, run).array, before)  # Params only.
    capsys.readouterr()
    # Resuming falls back to the intact step, sets the damaged one aside and trains it again.
    result = trainer.train(config, str(run), "base")
    said = capsys.readouterr().out
    assert f"train state step {latest}" in said and "cannot be read" in said
    assert f"resumed from checkpoint step {older}" in said
    assert os.path.isdir(run / "base" / "checkpoints" / f"{latest}.damaged")
    assert result.status == "completed" and result.step == config.base.train.num_steps
    assert _steps(run, "base")[-1] == latest


def test_a_full_disk_stops_training_at_once_in_one_line(tmp_path):
    """Checkpoints on a 1 MiB tmpfs: a save soon fails. Training stops at once with one line
    naming the failed step, the reason and the last good step, which stays intact."""
    import subprocess

    workdir = tmp_path / "run"
    mount = workdir / "tokenizer" / "checkpoints"
    mount.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.skip("needs root to mount a small tmpfs (mount -t tmpfs -o size=1M ...)")
    try:
        proc = run_module(
            "muse_jax.train",
            f"--config={ROOT}/configs/shapes_tiny.py:smoke",
            "--config.stage=tokenizer", f"--workdir={workdir}",
            "--config.tokenizer.train.num_steps=30",
            "--config.tokenizer.train.log_every=1",
            env=child_env(TF_CPP_MIN_LOG_LEVEL="2"),
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-3000:]
        # Our report is one line. (In a minority of runs, orbax's and tensorstore's writer
        # threads also print "Event loop is closed" noise while the process shuts down.)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, proc.stderr[-6000:]
        assert "muse_jax/" not in proc.stderr  # No traceback through our code.
        last = errors[0]
        found = re.fullmatch(
            r"error: Saving the checkpoint of step (\d+) in (\S+) failed \((.*)\)\. "
            r"Stopped; the last good checkpoint is step (\d+)\.",
            last,
        )
        assert found, last
        failed, where, why, good = found.groups()
        assert where == str(mount) and "No space left on device" in why
        assert int(good) < int(failed) and int(good) % 3 == 0
        logged = [int(m) for m in re.findall(r"\[tokenizer\] step (\d+)/30", proc.stdout)]
        assert max(logged) <= int(failed) + 3  # Stopped by the next save, not at step 30.
        assert checkpoints.finalized_steps(str(mount))[-1] == int(good)
        assert not [p for p in os.listdir(mount) if "tmp" in p]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _train_args(workdir, **keys) -> list[str]:
    return [
        "-m",
        "muse_jax.train",
        f"--config={ROOT}/configs/shapes_tiny.py:smoke",
        "--config.stage=tokenizer",
        f"--workdir={workdir}",
        *(f"--config.tokenizer.train.{k}={v}" for k, v in keys.items()),
    ]


def test_sigterm_during_the_final_steps_and_close_still_checkpoints(tmp_path):
    """The signal arrives after the last step's log line: summaries, the final save and the
    close of the asynchronous writer still run; exit 0 with the last step saved."""
    import signal

    run = tmp_path / "run"
    code, out = signal_after(
        _train_args(run, num_steps=6, log_every=1), "[tokenizer] step 6/6", signal.SIGTERM
    )
    assert code == 0, out[-3000:]
    assert _steps(run, "tokenizer")[-1] == 6


def test_sigkill_during_a_checkpoint_write_then_resume_is_bit_identical(trained_smoke, tmp_path):
    """SIGKILL right as step 6's save starts; the resume (from whatever step finished) ends
    with exactly the state of an uninterrupted run."""
    import signal

    import jax

    from muse_jax import parallel
    from muse_jax.train.tokenizer_stage import TokenizerStage

    config, _ = trained_smoke
    keys = dict(num_steps=9, log_every=1, checkpoint_every=3)
    killed = tmp_path / "killed"
    code, out = signal_after(_train_args(killed, **keys), "[tokenizer] step 6/9", signal.SIGKILL)
    assert code == -signal.SIGKILL, out[-2000:]
    assert set(_steps(killed, "tokenizer")) <= {3, 6}  # Unfinished saves are not steps.
    config = config.copy_and_resolve_references()
    config.tokenizer.train.update(keys)
    whole = tmp_path / "whole"
    for workdir in (killed, whole):
        assert trainer.train(config, str(workdir), "tokenizer").step == 9
    states = []
    for workdir in (killed, whole):
        stage = TokenizerStage(config, str(workdir))
        mesh, rules = parallel.create_mesh(config), parallel.rules(config)
        abstract, _ = parallel.abstract_state(stage.init, jax.random.PRNGKey(0), mesh, rules)
        states.append(checkpoints.load_state(stage.stage_dir, abstract, "tokenizer")[0])
    jax.tree.map(np.testing.assert_array_equal, states[0], states[1])
