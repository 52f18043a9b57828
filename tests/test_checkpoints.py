"""Checkpoint layout: readers of a trained model restore parameters only, and a workdir written
by another model configuration is refused in one line."""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest

from muse_jax import checkpoints
from muse_jax.inference.pipeline import MusePipeline
from muse_jax.stages import NAMES as STAGE_NAMES
from muse_jax.train import trainer

PROMPTS = ["a large red circle on the left", "a small blue square"]


def _images(config, workdir: str, cascade: bool) -> np.ndarray:
    pipe = MusePipeline.from_workdir(config, workdir, stages="cascade" if cascade else "base")
    return pipe(PROMPTS, seed=3).array


@pytest.mark.slow
def test_sampling_reads_parameters_only(trained_cascade, tmp_path):
    """With every optimizer state deleted, the cascade samples exactly as before."""
    config, source = trained_cascade
    workdir = str(tmp_path / "params_only")
    shutil.copytree(source, workdir)
    removed = glob.glob(os.path.join(workdir, "*", "checkpoints", "*", "train_state"))
    assert {p.split(os.sep)[-4] for p in removed} == set(STAGE_NAMES)  # Every stage.
    for path in removed:
        shutil.rmtree(path)
    np.testing.assert_array_equal(
        _images(config, workdir, cascade=True), _images(config, source, cascade=True)
    )
    # Training does need the optimizer state: resuming says which checkpoint is damaged.
    with pytest.raises(Exception, match="train_state|No such file|not found"):
        trainer.train(config, workdir, "base")


@pytest.mark.slow
def test_a_workdir_of_another_model_is_refused_in_one_line(trained_smoke, tmp_path):
    config, source = trained_smoke
    workdir = str(tmp_path / "other")
    shutil.copytree(source, workdir)
    other = config.copy_and_resolve_references()
    other.base.model.mlp_dim = 2 * other.base.model.mlp_dim
    with pytest.raises(checkpoints.IncompatibleCheckpointError) as err:
        MusePipeline.from_workdir(other, workdir, stages="base")
    message = str(err.value)
    assert "\n" not in message and "another model configuration" in message
    assert os.path.join(workdir, "base", "checkpoints") in message and "shape" in message
    with pytest.raises(checkpoints.IncompatibleCheckpointError):
        trainer.train(other, workdir, "base")  # Resuming is refused the same way.


def test_legacy_single_item_checkpoints_still_restore(tmp_path):
    """Checkpoints written before the params/train_state split (one `default` item)."""
    import jax
    import orbax.checkpoint as ocp

    from muse_jax.train.state import TrainState

    state = TrainState(
        step=np.int32(7),
        params={"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
        opt_state={"mu": np.ones((2, 3), np.float32)},
        rng=np.zeros(2, np.uint32),
        extra={},
    )
    directory = str(tmp_path / "stage" / "checkpoints")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True))
    manager.save(7, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    manager.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
    params, step = checkpoints.load_params(str(tmp_path / "stage"), abstract.params, "stage")
    assert step == 7
    np.testing.assert_array_equal(params["w"], state.params["w"])
    restored, _ = checkpoints.load_state(str(tmp_path / "stage"), abstract, "stage")
    np.testing.assert_array_equal(restored.opt_state["mu"], state.opt_state["mu"])


def test_reading_part_of_a_checkpoint_refuses_extra_arrays_inside_that_part(tmp_path):
    """A reader may skip whole subtrees (a tokenizer's discriminator), but a checkpoint with
    more arrays inside the subtree it reads (a deeper model) is another model: refused, since
    it would otherwise load silently and sample garbage."""
    import jax

    from muse_jax.train.state import TrainState

    def layer(i):
        return {"kernel": np.full((2, 3), i, np.float32)}

    params = {"model": {"layer_0": layer(0), "layer_1": layer(1)}, "disc": {"w": np.ones(4)}}
    state = TrainState(
        step=np.int32(5), params=params, opt_state={}, rng=np.zeros(2, np.uint32), extra={}
    )
    ckpt = checkpoints.Checkpointer(str(tmp_path / "stage" / "checkpoints"), asynchronous=False)
    ckpt.save(5, state)
    ckpt.wait()
    ckpt.close()

    def spec(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)

    read, step = checkpoints.load_params(
        str(tmp_path / "stage"), spec({"model": params["model"]}), "stage", partial=True
    )
    assert step == 5 and set(read) == {"model"}
    np.testing.assert_array_equal(read["model"]["layer_1"]["kernel"], layer(1)["kernel"])
    shallower = spec({"model": {"layer_0": layer(0)}})
    with pytest.raises(checkpoints.IncompatibleCheckpointError) as err:
        checkpoints.load_params(str(tmp_path / "stage"), shallower, "stage", partial=True)
    message = str(err.value)
    assert "\n" not in message and "['model']['layer_1']['kernel'] is only in" in message
    assert "1 extra" in message
