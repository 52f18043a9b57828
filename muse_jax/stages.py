"""The registry of a Muse experiment's stages: the one list of them, in training order.

A stage is one file (a `muse_jax.train.stage.Stage` subclass) and one config block named like
it; `STAGES` is the only place that names it. The trainer, `muse_jax.pipeline`, `muse_jax.aot`,
the benchmarks and the tests read the stages from here. Kept free of JAX/TF imports so that
binaries can decide what to load (and reject bad input) before paying for those imports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from muse_jax import storage
from muse_jax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """`name`: the stage's config block and checkpoint directory. `implementation`:
    'module:Class' of its `Stage` subclass, imported on first use. `cascade`: one of the
    super-res stages, trained only when the config has them. `optional`: trained only when
    the config has its block (sampling uses it when its checkpoint exists)."""

    name: str
    implementation: str
    cascade: bool = False
    optional: bool = False


def check_unique(specs: Sequence[StageSpec]) -> tuple[StageSpec, ...]:
    """`specs` as a tuple; a name listed twice is an error, not a silent overwrite."""
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"Stage {spec.name!r} is registered twice.")
        seen.add(spec.name)
    return tuple(specs)


STAGES: tuple[StageSpec, ...] = check_unique(
    (
        StageSpec("tokenizer", "muse_jax.train.tokenizer_stage:TokenizerStage"),
        StageSpec("base", "muse_jax.train.base_stage:BaseStage"),
        StageSpec(
            "base_decoder", "muse_jax.train.base_decoder_stage:BaseDecoderStage", optional=True
        ),
        StageSpec(
            "superres_tokenizer",
            "muse_jax.train.tokenizer_stage:SuperResTokenizerStage",
            cascade=True,
        ),
        StageSpec("superres", "muse_jax.train.superres_stage:SuperResStage", cascade=True),
        StageSpec("decoder", "muse_jax.train.decoder_stage:DecoderStage", cascade=True),
    )
)
NAMES = tuple(s.name for s in STAGES)
BASE_STAGES = tuple(s.name for s in STAGES if not s.cascade)
SUPERRES_STAGES = tuple(s.name for s in STAGES if s.cascade)


def spec(name: str) -> StageSpec:
    for s in STAGES:
        if s.name == name:
            return s
    raise UsageError(f"Unknown stage {name!r}; valid: {', '.join(NAMES)}.")


def has_cascade(config) -> bool:
    """Whether the config describes the super-res stages (the embedded default does)."""
    return "superres" in config and config.data.get("hr_image_size", 0) > 0


def stage_dir(config, workdir: str, name: str) -> str:
    """Where stage `name` of the experiment in `workdir` keeps its checkpoints and logs: the
    tokenizer may come from another experiment (`config.tokenizer_workdir`)."""
    root = (config.get("tokenizer_workdir") or workdir) if name == "tokenizer" else workdir
    return storage.join(root, name)


def enabled(config) -> tuple[str, ...]:
    """Every stage the config trains, in order."""
    names = BASE_STAGES + (SUPERRES_STAGES if has_cascade(config) else ())
    return tuple(n for n in names if not spec(n).optional or n in config)


# A stage's run that ended for good (its last step, or its wall-clock cap) says so here, so that
# a watcher (`muse_jax.evaluate --watch`) knows the last checkpoint is coming no more.
_STOPPED = "stopped.json"


def record_stop(directory: str, step: int, status: str) -> None:
    """Writes `<stage dir>/stopped.json`: the step and why ("completed", "time_budget")."""
    storage.write_json(storage.join(directory, _STOPPED), {"step": int(step), "status": status})


def clear_stop(directory: str) -> None:
    """A (re)started run removes the record of an earlier one's end."""
    p = storage.join(directory, _STOPPED)
    if storage.exists(p):
        storage.path(p).unlink()


def stopped_at(directory: str) -> int | None:
    """The step at which the stage's latest run ended for good; None while it runs (or was
    preempted, or never recorded its end)."""
    p = storage.join(directory, _STOPPED)
    if not storage.exists(p):
        return None
    try:
        return int(storage.read_json(p)["step"])
    except (ValueError, KeyError, TypeError):
        return None
