"""Fault injection: damaged checkpoints fall back to the newest intact step, saying which step
and why; a damaged step asked for by number is one line. Each test damages a copy of the
trained smoke workdir."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from muse_jax import checkpoints
from muse_jax.inference.pipeline import MusePipeline
from muse_jax.train import trainer

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
