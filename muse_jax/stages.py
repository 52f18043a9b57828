"""The stages of a Muse experiment in training order, and which of them a config enables.

Kept free of JAX/TF imports so that binaries can decide what to load (and reject bad input)
before paying for those imports.
"""

from __future__ import annotations

BASE_STAGES = ("tokenizer", "base")
SUPERRES_STAGES = ("superres_tokenizer", "superres", "decoder")


def has_cascade(config) -> bool:
    """Whether the config describes the super-res stages (the embedded default does)."""
    return "superres" in config and config.data.get("hr_image_size", 0) > 0


def stage_dir(config, workdir: str, name: str) -> str:
    """Where stage `name` of the experiment in `workdir` keeps its checkpoints and logs: the
    tokenizer may come from another experiment (`config.tokenizer_workdir`)."""
    from muse_jax import storage

    root = (config.get("tokenizer_workdir") or workdir) if name == "tokenizer" else workdir
    return storage.join(root, name)


def enabled(config) -> tuple[str, ...]:
    """Every stage the config trains, in order."""
    return BASE_STAGES + (SUPERRES_STAGES if has_cascade(config) else ())
