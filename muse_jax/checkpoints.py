"""orbax checkpointing: async saves, keep N, restore resharded onto the current mesh.

A step is saved as two orbax items: `params` (what sampling, evaluation and export need) and
`train_state` (step, optimizer moments, rng, extras). Readers of a trained model restore the
`params` item alone, so they never read the optimizer state (twice the parameters under AdamW)
and a damaged optimizer state does not block generation. Checkpoints of the older one-item
layout (`default`) are still read.

Readers may ask for part of the `params` item (`load_params(..., partial=True)`): the inference
package reads a tokenizer's VQ model without its discriminator, so it needs to know nothing about
how a stage trains.

Directories go through `muse_jax.storage`: a `gs://` workdir is written to the bucket, never to
a local `gs:` folder.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from muse_jax import storage
from muse_jax.errors import UsageError

_PARAMS, _REST = "params", "train_state"
_LEGACY = "default"


class IncompatibleCheckpointError(UsageError):
    """The checkpoint in a directory was written by a model of another shape."""


class CheckpointSaveError(storage.StorageError):
    """A save failed (disk full, no permission): training must stop at once."""


class DamagedCheckpointError(UsageError):
    """No step of a checkpoint directory could be read (each one damaged or incomplete)."""


def _reason(e: BaseException) -> str:
    """One line saying why a step could not be read: the innermost error of the chain, where
    tensorstore names the array and the file (orbax's wrapper names neither)."""
    seen = {id(e)}
    while (inner := e.__cause__ or e.__context__) is not None and id(inner) not in seen:
        e = inner
        seen.add(id(e))
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = " ".join(lines[:2]) if lines else ""
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    # Long errors keep both ends: the head names the file, the tail says what went wrong.
    return text if len(text) <= 300 else text[:150] + " ... " + text[-145:]


def newest_intact(
    steps: list[int],
    read: Callable[[int], Any],
    where: str,
    what: str,
    log: Callable[[str], None] = print,
    on_damaged: Callable[[int], None] | None = None,
) -> tuple[Any, int]:
    """`read(step)` of the newest step that reads, newest first; each damaged or incomplete
    step is named (with why) and skipped, and `on_damaged(step)` is called for it. A checkpoint
    of another model (IncompatibleCheckpointError) is not damage: it stops at once."""
    problems = []
    for step in sorted(steps, reverse=True):
        try:
            result = read(step)
        except IncompatibleCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 -- any failure to read is damage to report.
            problems.append(f"step {step}: {_reason(e)}")
            log(f"[checkpoints] {what} step {step} in {where} cannot be read ({_reason(e)})")
            if on_damaged is not None:
                on_damaged(step)
            continue
        if problems:
            log(f"[checkpoints] {what}: using step {step}, the newest intact one in {where}")
        return result, step
    raise DamagedCheckpointError(f"No intact {what} checkpoint in {where}: " + "; ".join(problems))


def _rest(state: Any) -> dict[str, Any]:
    return {
        "step": state.step,
        "opt_state": state.opt_state,
        "rng": state.rng,
        "extra": state.extra,
    }


class _OrbaxWriteErrors(logging.Filter):
    """Drops orbax's own error logs (tracebacks from its writer threads): a failed save is
    reported once, in one line, by `CheckpointSaveError`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


_ORBAX_FILTER = _OrbaxWriteErrors()


def _quiet_closed_loop_hook(previous):
    """sys.excepthook that drops the 'Event loop is closed' errors tensorstore's callbacks
    print after a failed save has stopped orbax's writer loop (the save error itself is
    reported in one line); everything else goes to `previous`."""

    def hook(kind, value, tb):
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(kind, value, tb)

    hook.muse_jax_quiet = True
    return hook


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` holding one stage's train states."""

    def __init__(
        self, directory: str, *, keep: int = 2, asynchronous: bool = True, writer: bool = True
    ):
        """`writer=False` (readers of a trained model) creates nothing and cleans nothing;
        a writer removes the temporary folders of saves that never finished."""
        self.directory = storage.path(directory)
        self._saving: int | None = None  # The step of the latest save started.
        if writer:
            logging.getLogger("absl").addFilter(_ORBAX_FILTER)  # Idempotent.
            if not getattr(sys.excepthook, "muse_jax_quiet", False):
                sys.excepthook = _quiet_closed_loop_hook(sys.excepthook)
            if not getattr(threading.excepthook, "muse_jax_quiet", False):
                previous = threading.excepthook

                def thread_hook(args, previous=previous):
                    if not (
                        isinstance(args.exc_value, RuntimeError)
                        and str(args.exc_value) == "Event loop is closed"
                    ):
                        previous(args)

                thread_hook.muse_jax_quiet = True
                threading.excepthook = thread_hook
        with storage.checked("opening checkpoints in", directory):
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep,
                    create=writer,
                    enable_async_checkpointing=asynchronous,
                    cleanup_tmp_directories=writer,
                ),
                item_handlers={
                    _PARAMS: ocp.StandardCheckpointHandler(),
                    _REST: ocp.StandardCheckpointHandler(),
                },
            )

    def _restore_legacy(self, step: int, args: Any) -> Any:
        """A step of the older one-item layout, through a manager of that layout."""
        manager = ocp.CheckpointManager(self.directory)
        try:
            return manager.restore(step, args=args)
        finally:
            manager.close()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_newest_intact(self, abstract_state: Any, log: Callable[[str], None] = print):
        """(state, step) of the newest step that restores whole. Each damaged step is named
        and set aside as `<step>.damaged` (so training redoes it and orbax never lists it
        again); an older intact step is used, saying so."""

        def set_aside(step: int) -> None:
            dst = self.directory / f"{step}.damaged"
            if jax.process_index() == 0:  # One host renames; the others wait for it.
                if dst.exists():
                    storage.remove_tree(str(dst))
                (self.directory / str(step)).rename(dst)
                log(f"[checkpoints] moved the damaged step to {dst}")
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(f"muse_jax set aside step {step}")

        steps = list(self.manager.all_steps())
        try:
            return newest_intact(
                steps,
                lambda s: self.restore(abstract_state, s),
                str(self.directory),
                "train state",
                log,
                set_aside,
            )
        finally:
            self.manager.reload()

    def _save_failed(self, step: int | None, e: BaseException) -> CheckpointSaveError:
        """One line naming the failed step, why, and the last good checkpoint; the failed
        save's temporary folder is removed (it frees the space it took)."""
        try:  # The failed save's other writers finish (or fail) before its folder goes.
            self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001 -- the failure being reported.
            pass
        self._remove_unfinished()
        good = finalized_steps(str(self.directory))
        last = f"step {good[-1]}" if good else "none"
        return CheckpointSaveError(
            f"Saving the checkpoint of step {step} in {self.directory} failed ({_reason(e)}). "
            f"Stopped; the last good checkpoint is {last}."
        )

    def _remove_unfinished(self, settle_s: float = 0.3, limit_s: float = 15.0) -> None:
        """Removes failed saves' temporary folders. A writer thread still closing may recreate
        a file or a folder after it goes, so this returns only once the directory has stayed
        clean for `settle_s` (or after `limit_s`; the next writer's start cleans the rest)."""
        deadline = time.monotonic() + limit_s
        clean_since: float | None = None
        while time.monotonic() < deadline:
            left = [n for n in storage.listdir(str(self.directory)) if ".orbax-checkpoint-tmp" in n]
            if not left:
                now = time.monotonic()
                clean_since = now if clean_since is None else clean_since
                if now - clean_since >= settle_s:
                    return
            else:
                clean_since = None
                for name in left:
                    try:
                        storage.remove_tree(str(self.directory / name))
                    except OSError:
                        pass
            time.sleep(0.05)

    def abandon(self) -> None:
        """After a failed save: stops the manager (joining its writer threads, whatever they
        raise) and removes what the failed save left, so that nothing writes afterwards."""
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001 -- the failure was already reported.
            pass
        self._remove_unfinished()

    def check(self) -> None:
        """Raises CheckpointSaveError when an asynchronous save has failed."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 -- whatever the writer hit, in one line.
            raise self._save_failed(self._saving, e) from None

    def save(self, step: int, state: Any) -> None:
        # The previous save has had a whole checkpoint interval to finish: waiting for it here
        # costs nothing in practice and pins a failure on the step that failed.
        self.wait()
        self._saving = step
        try:
            self._save(step, state)
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(step, e) from None

    def _save(self, step: int, state: Any) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    _PARAMS: ocp.args.StandardSave(state.params),
                    _REST: ocp.args.StandardSave(_rest(state)),
                }
            ),
            force=True,
        )

    def _is_legacy(self, step: int) -> bool:
        return (self.directory / str(step) / _LEGACY).exists()

    def _check_shapes(self, step: int, item: str, abstract: Any, partial: bool = False) -> None:
        """One clear refusal when the checkpoint's arrays differ from the config's model."""
        try:
            meta = self.manager.item_metadata(step)[item]
            tree = getattr(meta, "tree", meta)
        except Exception:  # noqa: BLE001 -- no readable metadata: let the restore report it.
            return
        saved_leaves = [
            (k, tuple(v.shape))
            for k, v in jax.tree_util.tree_leaves_with_path(tree)
            if hasattr(v, "shape")
        ]
        wanted_leaves = [
            (k, tuple(v.shape)) for k, v in jax.tree_util.tree_leaves_with_path(abstract)
        ]
        if partial:
            # A reader names whole top-level subtrees (the tokenizer's 'vq', not its 'disc');
            # inside those, the checkpoint must hold exactly the config's arrays: an extra
            # layer there means another model, which would otherwise load and sample garbage.
            heads = {jax.tree_util.keystr(k[:1]) for k, _ in wanted_leaves}
            saved_leaves = [
                (k, shape) for k, shape in saved_leaves if jax.tree_util.keystr(k[:1]) in heads
            ]
        saved = {jax.tree_util.keystr(k): shape for k, shape in saved_leaves}
        wanted = {jax.tree_util.keystr(k): shape for k, shape in wanted_leaves}
        if not saved or saved == wanted:
            return
        where = self.directory / str(step)
        missing = sorted(set(wanted) - set(saved))
        extra = sorted(set(saved) - set(wanted))
        if missing or extra:
            name = (missing or extra)[0]
            detail = f"{name} is {'missing from' if missing else 'only in'} the checkpoint"
        else:
            name = next(k for k in sorted(wanted) if wanted[k] != saved[k])
            detail = f"{name} has shape {saved[name]} there but {wanted[name]} in this config"
        raise IncompatibleCheckpointError(
            f"The checkpoint {where} was written by another model configuration ({item}{detail}; "
            f"{len(missing)} missing, {len(extra)} extra arrays). Use a new workdir, or the "
            "config that wrote it."
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """The whole train state, restored onto the shardings carried by `abstract_state`
        (ShapeDtypeStructs); a checkpoint written on another mesh is resharded."""
        step = self.latest_step() if step is None else step
        if self._is_legacy(step):
            return self._restore_legacy(step, ocp.args.StandardRestore(abstract_state))
        self._check_shapes(step, _PARAMS, abstract_state.params)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    _PARAMS: ocp.args.StandardRestore(abstract_state.params),
                    _REST: ocp.args.StandardRestore(_rest(abstract_state)),
                }
            ),
        )
        return abstract_state.replace(params=restored[_PARAMS], **restored[_REST])

    def restore_params(
        self, abstract_params: Any, step: int | None = None, partial: bool = False
    ) -> Any:
        """The trained parameters alone: the optimizer state is neither read nor needed.

        `partial`: `abstract_params` may name a subset of the saved tree (e.g. {'vq': ...} of a
        tokenizer that also saved a discriminator); only that subset is read.
        """
        step = self.latest_step() if step is None else step
        if self._is_legacy(step):
            item = {"params": abstract_params}
            args = ocp.args.PyTreeRestore(
                item=item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            )
            return self._restore_legacy(step, args)["params"]
        self._check_shapes(step, _PARAMS, abstract_params, partial)
        if partial:  # StandardRestore wants the whole tree; the PyTree handler reads a subset.
            manager = ocp.CheckpointManager(
                self.directory, item_handlers={_PARAMS: ocp.PyTreeCheckpointHandler()}
            )
            args = ocp.args.PyTreeRestore(
                item=abstract_params,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_params),
                partial_restore=True,
            )
            try:
                return manager.restore(step, args=ocp.args.Composite(**{_PARAMS: args}))[_PARAMS]
            finally:
                manager.close()
        restored = self.manager.restore(
            step, args=ocp.args.Composite(**{_PARAMS: ocp.args.StandardRestore(abstract_params)})
        )
        return restored[_PARAMS]

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(self._saving, e) from None

    def close(self) -> None:
        self.wait()
        self.manager.close()


def checkpoint_dir(stage_dir: str) -> str:
    return storage.join(stage_dir, "checkpoints")


def finalized_steps(directory: str) -> list[int]:
    """The steps whose save completed (an interrupted async save is not one of them)."""
    if not storage.isdir(directory):
        return []
    return sorted(ocp.path.step.checkpoint_steps(storage.path(directory)))


def find_step(directory: str, what: str, step: int | None = None) -> int:
    """`step` (default: the latest finalized one) of the checkpoints in `directory`, or a
    FileNotFoundError with one clear line."""
    steps = finalized_steps(directory)
    if not steps:
        raise FileNotFoundError(
            f"No {what} checkpoint in {directory}. Train that stage first "
            f"(python -m muse_jax.train --config.stage={what} ...) or point the config at it."
        )
    if step is not None and step not in steps:
        raise FileNotFoundError(
            f"No {what} checkpoint at step {step} in {directory} (has {steps})."
        )
    return steps[-1] if step is None else step


def _restore_latest(
    stage_dir: str, what: str, step: int | None, restore, log: Callable[[str], None] = print
) -> tuple[Any, int]:
    """`restore(ckpt, step)` of the asked step, or (step None) of the newest intact one."""
    directory = checkpoint_dir(stage_dir)
    found = find_step(directory, what, step)
    ckpt = Checkpointer(directory, asynchronous=False, writer=False)
    try:
        if step is not None:
            try:
                return restore(ckpt, found), found
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 -- a damaged step, in one line.
                raise DamagedCheckpointError(
                    f"The {what} checkpoint at step {step} in {directory} cannot be read "
                    f"({_reason(e)})."
                ) from None
        return newest_intact(
            finalized_steps(directory), lambda s: restore(ckpt, s), directory, what, log
        )
    finally:
        ckpt.close()


def load_params(
    stage_dir: str,
    abstract_params: Any,
    what: str,
    step: int | None = None,
    partial: bool = False,
) -> tuple[Any, int]:
    """The parameters of a trained stage at `step` (default: its latest) and that step.

    Only the `params` item is read (with `partial`, only the subtree `abstract_params` names).
    Raises FileNotFoundError with one clear line when the stage has no checkpoint (or not that
    step); nothing is created on the way.
    """
    return _restore_latest(
        stage_dir, what, step, lambda ckpt, s: ckpt.restore_params(abstract_params, s, partial)
    )


def load_state(
    stage_dir: str, abstract_state: Any, what: str, step: int | None = None
) -> tuple[Any, int]:
    """The whole train state of a stage at `step` (default: its latest), optimizer included."""
    return _restore_latest(stage_dir, what, step, lambda ckpt, s: ckpt.restore(abstract_state, s))
