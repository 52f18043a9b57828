"""Sampling a trained model: loading (workdir or exported directory), the Python API, export.

This package sits above models, text and sampling and below train/eval and the binaries: it
imports nothing from `muse_jax.train` (a test holds it to that).
"""

from muse_jax.inference.pipeline import EditOutput, MusePipeline, PipelineOutput

__all__ = ["EditOutput", "MusePipeline", "PipelineOutput"]
