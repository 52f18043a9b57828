"""The one training loop every stage runs through.

Sharded init, a jitted step with donated state (optionally several steps per call), orbax
checkpoints (async, keep N, resume from the latest), CLU TensorBoard summaries, progress lines
with ETA, SIGTERM -> checkpoint and a clean exit, and a non-finite loss stops the run with the
last good checkpoint kept. Compiled programs persist under the workdir
(`muse_jax.compilation_cache`), so a restart does not compile them again.

On a pod every process runs this loop and must stop at the same step: a process that stops
early leaves the others waiting in a collective. SIGTERM may reach one host only, and each
host measures its own time budget, so the processes vote on stopping (`_StopVote`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers, periodic_actions
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from muse_jax import checkpoints, compilation_cache, parallel, storage
from muse_jax import stages as stages_lib
from muse_jax.errors import UsageError
from muse_jax.train import stage as stage_lib


@dataclasses.dataclass
class TrainResult:
    stage: str
    step: int
    status: str  # "completed" | "preempted" | "time_budget" | "already_done"
    metrics: dict[str, float]
    wall_s: float


class _Preemption:
    """Turns SIGTERM (what a TPU VM or scheduler sends before eviction) into a flag."""

    def __init__(self):
        self.requested = False
        self._installed = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # Not the main thread: no signal handling, training still works.
            pass
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._installed:
            # None: the previous handler was not set from Python (JAX's distributed runtime
            # sets one in C++); it cannot be put back, so SIGTERM gets its default action.
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)


class _StopVote:
    """One stop decision for all processes from each process's SIGTERM and time-budget flags.

    With one process the flags decide at once and nothing is communicated. With several,
    every process casts a vote at every call boundary, and the vote is a tiny max-reduction
    over processes. It is read one call later, so the host never waits for the devices to
    finish the step it has just dispatched. Every process reads the same result at the same
    boundary and so stops at the same step. SIGTERM on one host stops all of them; so does a
    time budget reached on one host.

    JAX's own preemption sync point (`multihost_utils.reached_preemption_sync_point`, which
    orbax's `reached_preemption` wraps) was the other candidate. It handles SIGTERM only, so the
    time budget would need a second mechanism. It needs the C++ SIGTERM handler of JAX's
    distributed runtime, which `_Preemption` replaces. It cannot see a signal that arrives
    during the final checkpoint wait, when no more steps run.
    """

    def __init__(self):
        self._pending: jax.Array | None = None
        if jax.process_count() == 1:
            return
        # One row of flags per device, devices grouped by process: each process fills its rows.
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        mesh = Mesh(np.array(devices), ("devices",))
        self._rows = NamedSharding(mesh, PartitionSpec("devices"))
        self._max = jax.jit(
            lambda flags: jnp.max(flags, axis=0), out_shardings=NamedSharding(mesh, PartitionSpec())
        )

    def _cast(self, preempted: bool, over_budget: bool) -> jax.Array:
        flags = np.tile(
            np.array([[preempted, over_budget]], np.int32), (jax.local_device_count(), 1)
        )
        return self._max(jax.make_array_from_process_local_data(self._rows, flags))

    @staticmethod
    def _reason(preempted: bool, over_budget: bool) -> str | None:
        if preempted:
            return "preempted"
        return "time_budget" if over_budget else None

    def at_boundary(self, preempted: bool, over_budget: bool) -> str | None:
        """The agreed stop reason ("preempted", "time_budget") or None to go on. Every process
        calls this once per train call; with several, it returns the previous call's vote."""
        if jax.process_count() == 1:
            return self._reason(preempted, over_budget)
        decided, self._pending = self._pending, self._cast(preempted, over_budget)
        if decided is None:
            return None
        return self._reason(*(bool(f) for f in np.asarray(decided.addressable_data(0))))

    def now(self, preempted: bool) -> bool:
        """Whether any process has seen SIGTERM, waiting for all of them to vote. Every process
        calls this once, after the loop."""
        if jax.process_count() == 1:
            return preempted
        return bool(np.asarray(self._cast(preempted, False).addressable_data(0))[0])


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _log(msg: str) -> None:
    """Progress lines come from process 0 only: a pod's hosts would print each line N times."""
    if jax.process_index() == 0:
        print(msg, flush=True)


def _is_finite(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())


def save_config(config, directory: str) -> None:
    """The run's config beside its checkpoints (process 0 writes; every host sees one file)."""
    if jax.process_index() == 0:
        storage.write_text(
            storage.join(directory, "config.json"), config.to_json_best_effort(indent=2)
        )


def steps_per_call_of(train_config) -> int:
    """The stage's `train.steps_per_call` (default 1), checked."""
    k = train_config.get("steps_per_call", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise UsageError(f"train.steps_per_call must be an integer >= 1, got {k!r}.")
    return k


def _boundaries(train_config) -> tuple[int, ...]:
    return tuple(
        int(train_config[key]) for key in ("log_every", "summary_every", "checkpoint_every")
    )


def steps_in_next_call(step: int, steps_per_call: int, num_steps: int, every: tuple[int, ...]):
    """`steps_per_call` when that many steps from `step` reach no log/summary/checkpoint step
    (or the end) before their last one, else 1: the trainer compiles just these two programs."""
    if steps_per_call == 1:
        return 1
    end = step + steps_per_call
    if end > num_steps:
        return 1
    for e in every:
        if e > 0 and (step // e + 1) * e < end:
            return 1
    return steps_per_call


def multi_step(step_fn: Callable) -> Callable:
    """(state, batches stacked on a leading axis, frozen) -> (state, metrics summed over them):
    `step_fn` in a scan, the same steps and random streams as one call per batch."""

    def steps(state, batches, frozen):
        def body(s, batch):
            return step_fn(s, batch, frozen)

        state, metrics = jax.lax.scan(body, state, batches)
        return state, jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)

    return steps


def stack_batches(batches: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Host batches -> one dict of arrays with a leading steps axis (array entries only)."""
    keys = parallel.device_entries(batches[0])
    return {k: np.stack([b[k] for b in batches]) for k in keys}


def jit_train_step(
    stage: stage_lib.Stage, shardings: Any, batch_sharding, axis_rules, multi: bool = False
) -> Callable:
    """The stage's jitted train step, (state, batch, frozen) -> (state, metrics), with the
    state sharded and donated and the batch split over the data axes: the program `train` runs
    and `muse_jax.aot` compiles. `multi`: several steps per call (`multi_step`).

    The models' logical sharding constraints (activations split over the batch axes, weights
    gathered at use) resolve against the mesh set while tracing: flax reads JAX's abstract
    mesh, which a `with mesh:` block no longer sets.
    """
    abstract_mesh = batch_sharding.mesh.abstract_mesh

    def step_fn(state, batch, frozen):
        with jax.sharding.use_abstract_mesh(abstract_mesh), nn.logical_axis_rules(list(axis_rules)):
            return stage.train_step(state, batch, frozen)

    return jax.jit(
        multi_step(step_fn) if multi else step_fn,
        in_shardings=(shardings, batch_sharding, None),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )


def train(config, workdir: str, stage_name: str | None = None) -> TrainResult:
    """Runs (or resumes) the stage `stage_name` (default `config.stage`) in `workdir/<stage>`.

    Returns with status "preempted" when SIGTERM arrived while it trained, even during the final
    checkpoint wait: the caller should then start no further work.
    """
    t_start = time.time()
    compilation_cache.setup(config, workdir)  # Before the first compile.
    stage = stage_lib.get(stage_name or config.stage)(config, workdir)
    tc = stage.train_config
    steps_per_call = steps_per_call_of(tc)  # A bad value fails before any data or jit work.
    storage.makedirs(stage.stage_dir)
    save_config(config, stage.stage_dir)
    data_stats = stage.data_stats()  # Builds the data first: a bad source fails before any jit.

    mesh = parallel.create_mesh(config)
    axis_rules = parallel.rules(config)
    rng = jax.random.PRNGKey(config.seed)
    state, shardings, abstract = parallel.jit_init(stage.init, rng, mesh, axis_rules)
    ckpt = checkpoints.Checkpointer(
        checkpoints.checkpoint_dir(stage.stage_dir), keep=tc.keep_checkpoints
    )
    fresh = ckpt.latest_step() is None
    if not fresh:
        state, step = ckpt.restore_newest_intact(abstract, _log)
        _log(f"[{stage.name}] resumed from checkpoint step {step}")
    else:
        state = stage.warm_start(state, mesh, axis_rules)
    start = int(state.step)
    num_steps = int(tc.num_steps)
    if fresh and num_steps == 0:  # Nothing to train: keep the starting (warm) weights.
        ckpt.save(0, state)
        ckpt.close()
        _log(f"[{stage.name}] num_steps=0: saved the starting weights as step 0")
        return TrainResult(stage.name, 0, "completed", {}, time.time() - t_start)
    if start >= num_steps:
        _log(
            f"[{stage.name}] already trained to step {start} >= num_steps {num_steps}; nothing to do"
        )
        ckpt.close()
        return TrainResult(stage.name, start, "already_done", {}, time.time() - t_start)

    if jax.process_index() == 0:
        stages_lib.clear_stop(stage.stage_dir)  # Training again: the earlier end no longer holds.
    frozen = stage.frozen(mesh, axis_rules)
    batch_sharding = parallel.batch_sharding(mesh, axis_rules)
    train_step = jit_train_step(stage, shardings, batch_sharding, axis_rules)
    train_steps, stacked_sharding = None, parallel.stacked(batch_sharding)
    if steps_per_call > 1:
        train_steps = jit_train_step(stage, shardings, stacked_sharding, axis_rules, multi=True)
    writer = metric_writers.create_default_writer(
        stage.stage_dir, just_logging=jax.process_index() > 0, asynchronous=True
    )
    report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
    # Exact resume: the batches an uninterrupted run would see from step `start` on.
    batches = stage.batches(seed=config.seed, start_step=start)
    if data_stats:
        writer.write_scalars(start, data_stats)

    _log(f"[{stage.name}] training steps {start} -> {num_steps} in {stage.stage_dir}")
    status, last_metrics = "completed", {}
    acc: dict[str, Any] | None = None
    acc_count = 0
    t_log, step_log = time.time(), start
    budget = float(tc.get("time_budget_s", 0.0))
    step = start
    boundaries = _boundaries(tc)
    vote = _StopVote()
    with _Preemption() as preemption, mesh:
        try:
            while step < num_steps:
                ckpt.check()  # A failed asynchronous save stops training at once, in one line.
                k = steps_in_next_call(step, steps_per_call, num_steps, boundaries)
                if k == 1:
                    batch = parallel.shard_batch(next(batches), batch_sharding)
                    state, metrics = train_step(state, batch, frozen)
                else:
                    stacked = stack_batches([next(batches) for _ in range(k)])
                    batch = parallel.shard_batch(stacked, stacked_sharding)
                    state, metrics = train_steps(state, batch, frozen)  # Summed over the k steps.
                step += k
                acc = metrics if acc is None else jax.tree.map(lambda a, b: a + b, acc, metrics)
                acc_count += k
                report(step, time.time())

                over_budget = budget > 0 and time.time() - t_start > budget
                stop_reason = vote.at_boundary(preemption.requested, over_budget)
                is_last = step == num_steps or stop_reason is not None
                save_now = is_last or step % tc.checkpoint_every == 0
                if step % tc.log_every == 0 or save_now:
                    last_metrics = {k: float(v) / acc_count for k, v in jax.device_get(acc).items()}
                    acc, acc_count = None, 0
                    if not _is_finite(last_metrics):
                        ckpt.wait()
                        writer.flush()
                        raise FloatingPointError(
                            f"[{stage.name}] non-finite metrics at step {step}: {last_metrics}. "
                            f"Stopped; the last good checkpoint is step {ckpt.latest_step()}."
                        )
                    writer.write_scalars(step, {f"train/{k}": v for k, v in last_metrics.items()})
                    now = time.time()
                    rate = (step - step_log) / max(now - t_log, 1e-9)
                    t_log, step_log = now, step
                    shown = " ".join(f"{k}={last_metrics[k]:.4g}" for k in _shown(last_metrics))
                    _log(
                        f"[{stage.name}] step {step}/{num_steps} {shown} "
                        f"{rate:.2f} steps/s ETA {_format_eta((num_steps - step) / max(rate, 1e-9))}"
                    )
                # Image summaries evaluate host-local batches: single-controller only (a side-car
                # evaluator serves multi-host jobs).
                if (step % tc.summary_every == 0 or is_last) and jax.process_count() == 1:
                    evals = stage.write_summaries(state, frozen, writer, step)
                    evals = {k: v for k, v in evals.items() if math.isfinite(v)}
                    if evals:
                        writer.write_scalars(step, evals)
                        _log(
                            f"[{stage.name}] step {step} "
                            + " ".join(f"{k}={v:.4g}" for k, v in evals.items())
                        )
                        last_metrics.update(evals)
                if save_now:
                    ckpt.save(step, state)
                if stop_reason is not None:
                    status = stop_reason
                    _log(
                        f"[{stage.name}] stopping at step {step} ({stop_reason}); checkpoint saved"
                    )
                    break
            # Still under the SIGTERM handler: a notice that arrives now waits for the last save.
            ckpt.close()
        except checkpoints.CheckpointSaveError:
            ckpt.abandon()  # Its writers stopped and their temporary folder removed.
            raise
        writer.flush()
        writer.close()
        if vote.now(preemption.requested):
            status = "preempted"
    if status != "preempted" and jax.process_index() == 0:
        stages_lib.record_stop(stage.stage_dir, step, status)
    return TrainResult(stage.name, step, status, last_metrics, time.time() - t_start)


_SHOWN_FIRST = ("loss", "psnr", "masked_accuracy", "codebook_usage")


def _shown(metrics: dict[str, float]) -> list[str]:
    return [k for k in _SHOWN_FIRST if k in metrics]


def maybe_initialize_distributed(config) -> None:
    """Multi-host: `jax.distributed.initialize()` when MUSE_DISTRIBUTED=1 (set by
    launch/tpu_train.sh) or `config.distributed`; on TPU VMs the coordinator, process count and
    process id are detected. Must run before any other JAX call."""
    if os.environ.get("MUSE_DISTRIBUTED", "") not in ("", "0") or config.get("distributed", False):
        jax.distributed.initialize()


def main_train(config, workdir: str) -> int:
    """Entry point body shared by the `train` binary; returns a process exit code."""
    maybe_initialize_distributed(config)
    try:
        result = train(config, workdir)
    except FloatingPointError as e:
        print(str(e), file=sys.stderr)
        return 3
    _log(f"[{result.stage}] {result.status} at step {result.step} after {result.wall_s:.0f}s")
    return 0
