"""orbax checkpointing: async saves, keep N, restore resharded onto the current mesh."""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` holding one stage's train states."""

    def __init__(self, directory: str, *, keep: int = 2, asynchronous: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_dir(stage_dir: str) -> str:
    return os.path.join(stage_dir, "checkpoints")


def load_params(stage_dir: str, abstract_state: Any, what: str) -> tuple[Any, int]:
    """Restores the latest train state of another stage (e.g. the tokenizer for the base stage).

    Raises:
      FileNotFoundError: with one clear line when the stage has no checkpoint yet.
    """
    directory = checkpoint_dir(stage_dir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"No {what} checkpoint: {directory} does not exist. Train that stage first "
            f"(python -m muse_jax.train --config.stage={what} ...) or point the config at it."
        )
    ckpt = Checkpointer(directory, asynchronous=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"No {what} checkpoint in {directory}: the directory is empty.")
        return ckpt.restore(abstract_state, step), step
    finally:
        ckpt.close()
