"""Writes a trained model as a self-contained directory that `MusePipeline.from_pretrained` reads.

    <out>/config.json              format, the model config (everything sampling needs), stages
    <out>/tokenizer.safetensors    base tokenizer VQ model
    <out>/base.safetensors         base transformer (+ its text encoder when trained here)
    <out>/base_decoder.safetensors the base decoder, when the workdir has one
    <out>/superres_tokenizer.safetensors, superres.safetensors, decoder.safetensors  (cascade)
    <out>/vocab.model              the SentencePiece vocabulary (unless the config uses bytes)
    <out>/README.md                a model card: stages and steps, data, scores

No optimizer state and no discriminator. A frozen text encoder (T5) stays a reference to its
checkpoint, and precomputed embeddings a reference to their table, as in the training config.
`config.json` is written last: a directory without it is an unfinished export.
"""

from __future__ import annotations

import datetime
from typing import Any

import ml_collections

from muse_jax import storage
from muse_jax.data.vocabulary import CLIP_PREFIX
from muse_jax.inference import model as model_lib
from muse_jax.inference import weights
from muse_jax.text import clip_tokenizer
from muse_jax.text.conditioning import clip_tokenizer_dir

# The config keys sampling reads (see `muse_jax.models.factory` and the samplers).
_KEYS = {
    "data": ("image_size", "hr_image_size", "text_length", "vocabulary"),
    "tokenizer": ("model",),
    "superres_tokenizer": ("model",),
    "decoder": ("model",),
    "base": ("model", "sampling"),
    "superres": ("model", "sampling"),
}
_TOP = ("text_encoder", "text_embeddings", "mesh")


def sampling_config(config, vocabulary: str) -> dict[str, Any]:
    """The subset of a training config that sampling needs, as plain JSON values."""
    full = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    out: dict[str, Any] = {k: full[k] for k in _TOP if k in full}
    for block, keys in _KEYS.items():
        if block in full:
            out[block] = {k: full[block][k] for k in keys if k in full[block]}
    out["data"]["vocabulary"] = vocabulary
    return out


def _copy_vocabulary(model: model_lib.Model, out: str) -> str:
    """Copies the vocabulary file into `out`; returns the config's value for it."""
    clip_dir = clip_tokenizer_dir(model.config)
    if clip_dir is not None:
        copy_clip_tokenizer(clip_dir, storage.join(out, CLIP_TOKENIZER_DIR))
        return CLIP_PREFIX + CLIP_TOKENIZER_DIR
    vocab = model.conditioner.vocab if not model.conditioner.precomputed else None
    path = getattr(vocab, "sentencepiece_model_file", None) if vocab is not None else None
    if vocab is None:
        return model.config.data.get("vocabulary", "byte")
    if path is None:
        return "byte"
    storage.write_bytes(storage.join(out, "vocab.model"), storage.read_bytes(path))
    return "vocab.model"


CLIP_TOKENIZER_DIR = "clip_tokenizer"


def copy_clip_tokenizer(source: str, out: str) -> None:
    """Copies the files of a CLIP tokenizer directory that `CLIPTokenizer` reads."""
    copied = 0
    for name in clip_tokenizer.FILES:
        if storage.exists(storage.join(source, name)):
            data = storage.read_bytes(storage.join(source, name))
            storage.write_bytes(storage.join(out, name), data)
            copied += 1
    if not copied:
        raise FileNotFoundError(
            f"{source} holds none of CLIP's tokenizer files {clip_tokenizer.FILES}."
        )


def _card(model: model_lib.Model, source: str, scores: dict | None, sizes: dict, data: str) -> str:
    cfg = model.config
    lines = [
        "# muse_jax model",
        "",
        f"Exported {datetime.date.today().isoformat()} from `{source}`.",
        "",
        "| stage | training step | file | MB |",
        "|---|---|---|---|",
    ]
    for name, step in model.steps.items():
        if name in sizes:
            lines.append(f"| {name} | {step} | {name}.safetensors | {sizes[name] / 1e6:.2f} |")
    size = cfg.data.get("hr_image_size", 0) if model.cascade else cfg.data.image_size
    text = cfg.text_encoder
    lines += [
        "",
        f"- Output: {size}x{size} pixels ({'cascade' if model.cascade else 'base stage'}); base "
        f"resolution {cfg.data.image_size}x{cfg.data.image_size}.",
        f"- Text: `{text.name}` encoder"
        + (
            f", frozen, weights read from `{text.get('checkpoint', '')}`"
            if text.name != "tiny" and not text.get("trainable", False)
            else ", weights in the stage files"
        )
        + f"; at most {cfg.data.text_length} tokens per prompt.",
        f"- Data: {data or 'see the training config'}.",
        "",
        "Load it with `MusePipeline.from_pretrained(path)` (see the muse_jax README).",
    ]
    if scores:
        lines += ["", "## Alignment scores of the training workdir's evaluation", ""]
        lines += ["| prompts | " + " | ".join(scores["columns"]) + " |"]
        lines += ["|---" * (len(scores["columns"]) + 1) + "|"]
        for row, values in scores["rows"].items():
            cells = ("-" if v is None or v != v else f"{v:.3f}" for v in values)
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _scores(workdir: str) -> dict | None:
    """The main job's alignment table (alignment.json in the workdir), when there is one."""
    path = storage.join(workdir, "alignment.json")
    if not storage.exists(path):
        return None
    report = storage.read_json(path)
    columns = ["color", "shape", "size", "position", "relation", "count", "all"]
    rows = {}
    for split in report.get("groups", ("seen", "held_out")):
        if split not in report:
            continue
        if "base_scores" in report[split]:
            rows[f"{split}, base stage"] = [report[split]["base_scores"].get(c) for c in columns]
        name = f"{split}, cascade" if "base_scores" in report[split] else split
        rows[name] = [report[split]["scores"].get(c) for c in columns]
    return {"columns": columns, "rows": rows}


def export(model: model_lib.Model, out: str, *, source: str, data_description: str = "") -> dict:
    """Writes `model` to the directory `out`; returns the manifest (config.json)."""
    sizes = {}
    components = {}
    for name, tree in model.stage_params.items():
        blob = weights.to_bytes(tree, {"stage": name, "step": str(model.steps[name])})
        storage.write_bytes(storage.join(out, f"{name}.safetensors"), blob)
        sizes[name] = len(blob)
        components[name] = {"step": model.steps[name], "bytes": len(blob)}
    vocabulary = _copy_vocabulary(model, out)
    config = sampling_config(model.config, vocabulary)
    manifest = {
        "format": model_lib.FORMAT,
        "stages": "cascade" if model.cascade else "base",
        "components": components,
        "config": config,
    }
    card = _card(model, source, _scores(source), sizes, data_description)
    storage.write_text(storage.join(out, "README.md"), card)
    storage.write_json(storage.join(out, model_lib.MANIFEST), manifest)
    return manifest
