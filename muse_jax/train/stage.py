"""What a training stage provides to the shared trainer, and the registry of stages.

A stage is pure functions plus data: `init(rng) -> TrainState` (boxed, with logical axis
names), `train_step(state, batch, frozen) -> (state, metrics)`, its batches, and its summaries.
The trainer jits, shards, checkpoints, logs and handles preemption for all of them.
"""

from __future__ import annotations

import abc
import functools
import importlib
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import optax
from clu import metric_writers

from muse_jax import stages, storage
from muse_jax.train.state import TrainState


class Stage(abc.ABC):
    name: str = ""

    def __init__(self, config, workdir: str):
        self.config = config
        self.workdir = workdir
        self.stage_dir = storage.join(workdir, self.name)

    @property
    def stage_config(self):
        return self.config[self.name]

    @property
    def train_config(self):
        return self.stage_config.train

    @abc.abstractmethod
    def init(self, rng: jax.Array) -> TrainState:
        """A fresh (boxed) train state; pure, so the trainer can `eval_shape` and shard it."""

    @abc.abstractmethod
    def train_step(
        self, state: TrainState, batch: dict[str, jax.Array], frozen: Any
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimisation step; pure and jittable. Metrics are scalars."""

    @abc.abstractmethod
    def batches(self, seed: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless host-local training batches: exactly those an uninterrupted run would yield
        from step `start_step` on (the trainer passes the restored step)."""

    def eval_batch(
        self, images: tuple[str, ...], batch_size: int, keep_captions: bool = False
    ) -> dict[str, np.ndarray] | None:
        """The first `batch_size` examples of the held-out 'test' split, read once and kept.

        None when the data has no 'test' split (user data with config.data.test_fraction=0):
        the held-out summaries are then skipped, saying so once, and training goes on.
        """
        from muse_jax.data import tasks

        cache = self.__dict__.setdefault("_eval_batches", {})
        key = (tuple(images), batch_size, keep_captions)
        if key not in cache:
            if not tasks.has_split(self.config, self.workdir, "test"):
                print(
                    f"[{self.name}] the data has no 'test' split (config.data.test_fraction=0): "
                    "held-out summaries are skipped",
                    flush=True,
                )
                cache[key] = None
            else:
                cache[key] = next(
                    tasks.batches(
                        self.config,
                        self.workdir,
                        split="test",
                        batch_size=batch_size,
                        seed=0,
                        shuffle=False,
                        repeat=False,
                        keep_captions=keep_captions,
                        images=images,
                    )
                )
        return cache[key]

    def data_stats(self) -> dict[str, float]:
        """Scalars about the training data (e.g. records skipped at build time), written once
        at the start step as `data/...`; building the data here also fails fast on a bad source."""
        from muse_jax.data import tasks

        return tasks.data_stats(self.config, self.workdir)

    def init_from_model(self, state: TrainState, component: str, keys: tuple[str, ...]):
        """`state` with its parameters `keys` replaced by those of stage `component` of the
        model directory named by `<stage>.init_from='model:DIR'` (written by `muse_jax.export`
        or `muse_jax.convert`), placed like the state's; other init_from values: unchanged."""
        source = self.stage_config.get("init_from", "")
        if not source.startswith(MODEL_PREFIX):
            return state
        from muse_jax.inference import weights

        directory = source[len(MODEL_PREFIX) :]
        path = storage.join(directory, f"{component}.safetensors")
        if not storage.exists(path):
            raise FileNotFoundError(f"{self.name}.init_from: {path} does not exist.")
        current = {k: state.params[k] for k in keys if k in state.params}
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current
        )
        loaded = weights.load(path, abstract)
        print(f"[{self.name}] starting from {path}", flush=True)
        return state.replace(params={**state.params, **loaded})

    def warm_start(self, state: TrainState, mesh, axis_rules) -> TrainState:
        """A fresh state's starting weights (e.g. from another stage's checkpoint); called
        only when the stage has no checkpoint of its own, never on resume."""
        del mesh, axis_rules
        return state

    def frozen(self, mesh, axis_rules, abstract: bool = False) -> Any:
        """Arrays the step reads but never trains (e.g. the tokenizer for the base stage).

        `abstract`: their shapes, dtypes and shardings only (`jax.ShapeDtypeStruct`s), read
        from nothing: what `muse_jax.aot` compiles the step against.
        """
        del mesh, axis_rules, abstract
        return None

    @abc.abstractmethod
    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The device entries of a global batch of `batch_size`: the shapes and dtypes
        `batches` yields (a test holds the two together), for compiling without data."""

    def write_summaries(
        self, state: TrainState, frozen: Any, writer: metric_writers.MetricWriter, step: int
    ) -> dict[str, float]:
        """Writes image summaries; returns any evaluation scalars it computed."""
        return {}


MODEL_PREFIX = "model:"


def apply_gradients(tx, state: TrainState, grads: Any) -> tuple[Any, Any, jax.Array]:
    """The tail every train step shares: (new params, new optimizer state, gradient norm)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state, optax.global_norm(grads)


@functools.cache
def get(name: str) -> type[Stage]:
    """The `Stage` class that `muse_jax.stages.STAGES` registers under `name`."""
    spec = stages.spec(name)
    module, _, cls_name = spec.implementation.partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, Stage)) or cls.name != name:
        raise TypeError(f"{spec.implementation} is not a Stage named {name!r}.")
    return cls


def load_trained(
    config,
    workdir: str,
    name: str,
    mesh,
    axis_rules,
    stage_dir: str | None = None,
    abstract: bool = False,
) -> tuple[Any, int]:
    """The latest trained parameters of stage `name` (sharded by the rules) and their step;
    only the parameters are read, never the optimizer state.

    `abstract`: their `jax.ShapeDtypeStruct`s (with shardings) and step 0, reading nothing.
    Raises FileNotFoundError with one clear line when that stage has no checkpoint.
    """
    from muse_jax import checkpoints, parallel

    other = get(name)(config, workdir)
    state, _ = parallel.abstract_state(other.init, jax.random.PRNGKey(0), mesh, axis_rules)
    if abstract:
        return state.params, 0
    return checkpoints.load_params(stage_dir or other.stage_dir, state.params, name)
