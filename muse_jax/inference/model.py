"""A trained Muse model ready to sample: modules, parameters, samplers and the prompt encoder.

Two sources give the same `Model`:
- a training workdir (`from_workdir`): each stage's latest checkpoint, reading only the part of
  its `params` item that sampling needs (never optimizer state, never a discriminator);
- an exported model directory (`from_exported`, written by `muse_jax.inference.export`): one
  safetensors file per stage, `config.json` and the vocabulary; no config file needed.

Nothing is written by loading: a missing stage or vocabulary is a FileNotFoundError naming it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol

import jax
import ml_collections
from jax.sharding import Mesh

from muse_jax import checkpoints, parallel, storage
from muse_jax.data.vocabulary import CLIP_PREFIX
from muse_jax.errors import UsageError
from muse_jax.inference import modules as modules_lib
from muse_jax.inference import weights
from muse_jax.sampling.sampler import CascadeSampler, MuseSampler, SuperResSampler
from muse_jax.stages import has_cascade, stage_dir
from muse_jax.text.conditioning import TextConditioner


class Reader(Protocol):
    """Where a model's stage parameters come from."""

    def has(self, component: str) -> bool: ...

    def require(self, component: str) -> None:
        """FileNotFoundError with one clear line when stage `component` cannot be read."""

    def read(self, component: str, abstract: Any) -> tuple[Any, int | None]:
        """(the subset `abstract` of stage `component`'s parameters, its training step)."""


class WorkdirReader:
    """Stage checkpoints of a training workdir (`base_step`: that base checkpoint, not the
    latest)."""

    def __init__(self, config, workdir: str, base_step: int | None = None):
        self.config, self.workdir, self.base_step = config, workdir, base_step

    def _dir(self, component: str) -> str:
        return stage_dir(self.config, self.workdir, component)

    def has(self, component: str) -> bool:
        return bool(checkpoints.finalized_steps(checkpoints.checkpoint_dir(self._dir(component))))

    def require(self, component: str) -> None:
        step = self.base_step if component == "base" else None
        checkpoints.find_step(checkpoints.checkpoint_dir(self._dir(component)), component, step)

    def read(self, component: str, abstract: Any) -> tuple[Any, int | None]:
        step = self.base_step if component == "base" else None
        return checkpoints.load_params(self._dir(component), abstract, component, step, True)


class ExportedReader:
    """`<component>.safetensors` files of an exported model directory."""

    def __init__(self, directory: str, manifest: dict[str, Any]):
        self.directory, self.manifest = directory, manifest

    def has(self, component: str) -> bool:
        return component in self.manifest["components"]

    def require(self, component: str) -> None:
        if not self.has(component):
            raise FileNotFoundError(f"The model in {self.directory} has no {component!r} stage.")

    def read(self, component: str, abstract: Any) -> tuple[Any, int | None]:
        self.require(component)
        path = storage.join(self.directory, f"{component}.safetensors")
        return weights.load(path, abstract), self.manifest["components"][component]["step"]


@dataclasses.dataclass
class Model:
    """A loaded model. `params` holds what each sampler takes ('base'; 'superres' in a
    cascade); `stage_params` the per-stage trees as read (what an export writes)."""

    config: ml_collections.ConfigDict
    modules: modules_lib.Modules | None
    conditioner: TextConditioner
    params: dict[str, Any]
    stage_params: dict[str, Any]
    steps: dict[str, int | None]
    base_sampler: MuseSampler
    superres_sampler: SuperResSampler | None = None
    cascade_sampler: CascadeSampler | None = None

    @property
    def cascade(self) -> bool:
        return self.cascade_sampler is not None

    def sampler(self, cascade: bool):
        """The base sampler, or the cascade (ValueError when the model has no super-res)."""
        if not cascade:
            return self.base_sampler
        if self.cascade_sampler is None:
            raise UsageError("This model has no super-res stages: use stages='base'.")
        return self.cascade_sampler

    def sampler_params(self, cascade: bool) -> dict[str, Any]:
        return self.params if cascade else self.params["base"]

    @classmethod
    def in_memory(cls, config, sampler, params: dict[str, Any], conditioner) -> Model:
        """A model from a sampler and its parameters already in memory (e.g. a training
        stage's summaries): a `MuseSampler` with its params, or a `CascadeSampler` with
        {'base', 'superres'}. It cannot be exported (no per-stage trees)."""
        if isinstance(sampler, CascadeSampler):
            return cls(
                config, None, conditioner, params, {}, {}, sampler.base, sampler.superres, sampler
            )
        return cls(config, None, conditioner, {"base": params}, {}, {}, sampler)


def load(
    config,
    reader: Reader | None,
    conditioner: TextConditioner,
    cascade: bool,
    mesh: Mesh | None = None,
) -> Model:
    """Builds `config`'s modules and reads their parameters from `reader`.

    With `cascade`, the super-res stage and high-res tokenizer are required; the fine-tuned
    decoder is used when the reader has one (otherwise the tokenizer's own decoder decodes).
    Likewise the base decoder (`muse_jax.train.base_decoder_stage`) decodes the base stage's
    tokens when the reader has one; a super-res stage that reads pixels
    (`superres.model.lowres_input="pixels"`) gets that same low-res image.
    `reader` None: an abstract model, every parameter a `jax.ShapeDtypeStruct` with its
    sharding on `mesh` (default: the config's mesh on this host's devices), the fine-tuned
    decoder included; nothing is read. `muse_jax.aot` compiles its samplers.
    """
    # A missing stage is the first thing to report, before any work: the transformers first
    # (what a user most likely forgot to train), then their tokenizers.
    required = ["base", "tokenizer"] + (["superres", "superres_tokenizer"] if cascade else [])
    for name in required if reader is not None else ():
        reader.require(name)
    mesh = mesh or parallel.create_mesh(config)
    rules = parallel.rules(config)
    emb_shape = None
    vocab_size = None
    if conditioner.precomputed:
        emb_shape = conditioner.encode([""])["text_emb"].shape
    else:
        vocab_size = conditioner.vocab.vocab_size
    mods = modules_lib.build(config, vocab_size, conditioner.precomputed, cascade)
    names = list(modules_lib.BASE_COMPONENTS)
    # A base decoder is tuned to the latest base checkpoint: an older one (`base_step`) decodes
    # with the tokenizer's own decoder.
    if reader is not None and getattr(reader, "base_step", None) is None:
        if reader.has("base_decoder"):
            names.append("base_decoder")
    if cascade:
        names += ["superres_tokenizer", "superres"]
        if mods.finetuned_decoder is not None and (reader is None or reader.has("decoder")):
            names.append("decoder")
    stage_params: dict[str, Any] = {}
    steps: dict[str, int | None] = {}
    for name in names:
        stage_params[name], steps[name] = read_stage(config, reader, mods, name, emb_shape, mesh)
    frozen_text = None
    if mods.text_encoder is not None and not mods.text_trainable:
        frozen_text = _frozen_text_encoder(config, mods, mesh, rules, abstract=reader is None)

    def sampler_params(stage: str, vq: Any) -> dict[str, Any]:
        p = {"transformer": stage_params[stage]["transformer"], "vq": vq}
        if mods.text_encoder is not None:
            p["text_encoder"] = stage_params[stage].get("text_encoder", frozen_text)
        return p

    base = MuseSampler(mods.base, mods.text_encoder, mods.tokenizer, config.base.sampling)
    base_vq = stage_params["tokenizer"]["vq"]
    steps.setdefault("base_decoder", None)
    if "base_decoder" in stage_params:  # The decoder fine-tuned on the base stage's grids.
        base_vq = {**base_vq, "decoder": stage_params["base_decoder"]["decoder"]}
    params = {"base": sampler_params("base", base_vq)}
    model = Model(config, mods, conditioner, params, stage_params, steps, base)
    if cascade:
        hr_vq, decoder = stage_params["superres_tokenizer"]["vq"], mods.superres_tokenizer
        steps.setdefault("decoder", None)
        if "decoder" in stage_params:
            hr_vq = {
                "encoder": hr_vq["encoder"],
                "quantizer": hr_vq["quantizer"],
                "decoder": stage_params["decoder"]["decoder"],
            }
            decoder = mods.finetuned_decoder
        model.superres_sampler = SuperResSampler(
            mods.superres, mods.text_encoder, decoder, config.superres.sampling, mods.tokenizer
        )
        params["superres"] = sampler_params("superres", hr_vq)
        if model.superres_sampler.reads_pixels:  # The base stage's pixels, as in training.
            params["superres"]["lowres_vq"] = base_vq
        model.cascade_sampler = CascadeSampler(base, model.superres_sampler)
    return model


def read_stage(
    config,
    reader: Reader | None,
    mods: modules_lib.Modules,
    name: str,
    emb_shape=None,
    mesh: Mesh | None = None,
) -> tuple[Any, int | None]:
    """(the parameters sampling needs of stage `name`, placed on `mesh` (default: the config's),
    its step); `reader` None: their abstract shapes and shardings, step None."""
    mesh, rules = mesh or parallel.create_mesh(config), parallel.rules(config)
    init = modules_lib.param_tree(config, mods, name, emb_shape)
    abstract, _ = parallel.abstract_state(init, jax.random.PRNGKey(0), mesh, rules)
    if reader is None:
        return abstract, None
    return reader.read(name, abstract)


def _frozen_text_encoder(config, mods, mesh, rules, abstract: bool = False) -> Any:
    """The frozen (e.g. T5) encoder's weights from config.text_encoder.checkpoint
    (`abstract`: their shapes and shardings only)."""
    from muse_jax.text import loading

    length = config.data.text_length
    shapes, shardings = parallel.abstract_state(
        lambda r: modules_lib.init_text(mods.text_encoder, length, r),
        jax.random.PRNGKey(0),
        mesh,
        rules,
    )
    if abstract:
        return shapes
    return loading.load_text_encoder(config, shapes, shardings)


def resolve_stages(config, stages: str | None) -> bool:
    """`stages` ('base' | 'cascade' | None: the cascade when the config has it) -> cascade?"""
    if stages not in (None, "base", "cascade"):
        raise UsageError(f"stages must be 'base' or 'cascade', got {stages!r}.")
    if stages is None:
        return has_cascade(config)
    if stages == "cascade" and not has_cascade(config):
        raise UsageError(
            "stages='cascade' needs config.superres and config.data.hr_image_size > 0."
        )
    return stages == "cascade"


def from_workdir(
    config, workdir: str, *, stages: str | None = None, base_step: int | None = None
) -> Model:
    """The model trained in `workdir` with `config` (base stage at `base_step`, default latest)."""
    cascade = resolve_stages(config, stages)
    conditioner = TextConditioner(config, workdir, create_vocab=False)
    return load(config, WorkdirReader(config, workdir, base_step), conditioner, cascade)


MANIFEST = "config.json"
FORMAT = "muse_jax.model/1"


def read_manifest(directory: str) -> dict[str, Any]:
    path = storage.join(directory, MANIFEST)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"{directory} is not an exported muse_jax model (no {MANIFEST}); write one with "
            "python -m muse_jax.export."
        )
    manifest = storage.read_json(path)
    if manifest.get("format") != FORMAT:
        raise UsageError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}.")
    return manifest


def upgrade_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A model directory's config.json config in the current layout: directories written
    before kept the sampling block at the top level and the text encoder under `base`."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    base = out.setdefault("base", {})
    if "sampling" in out:
        base["sampling"] = out.pop("sampling")
    for key in ("text_encoder", "text_embeddings"):
        if key in base:
            out[key] = base.pop(key)
    return out


def exported_config(directory: str, manifest: dict[str, Any]) -> ml_collections.ConfigDict:
    """config.json's model config, with the vocabulary file resolved inside `directory`."""
    config = ml_collections.ConfigDict(upgrade_config(manifest["config"]))
    config.data.data_dir = ""  # Read by nothing: the vocabulary is a file or bytes.
    vocab = config.data.get("vocabulary", "byte")
    if vocab.startswith(CLIP_PREFIX):
        config.data.vocabulary = CLIP_PREFIX + _inside(directory, vocab[len(CLIP_PREFIX) :])
    elif vocab != "byte":
        config.data.vocabulary = storage.join(directory, vocab)
    text = config.text_encoder
    if text.name == "clip" and text.get("checkpoint"):  # Converted models hold their encoder.
        text.checkpoint = _inside(directory, text.checkpoint)
    return config


def _inside(directory: str, path: str) -> str:
    """`path` of config.json, resolved against the model directory when it is relative."""
    if storage.is_remote(path) or os.path.isabs(path):
        return path
    return storage.join(directory, path)


def from_exported(directory: str, *, stages: str | None = None) -> Model:
    """The model exported to `directory` (local or gs://)."""
    manifest = read_manifest(directory)
    config = exported_config(directory, manifest)
    cascade = resolve_stages(config, stages)
    if cascade and "superres" not in manifest["components"]:
        raise UsageError(f"The model in {directory} has no super-res stages: use stages='base'.")
    conditioner = TextConditioner(config, directory, create_vocab=False)
    return load(config, ExportedReader(directory, manifest), conditioner, cascade)
