"""Sampling a trained model: loading (workdir or exported directory), the Python API, export.

This package sits above models, text and sampling and below train/eval and the binaries: it
imports nothing from `muse_jax.train` (a test holds it to that). Its names load lazily, so a
binary can use the light helpers (`images`) before paying for JAX and TensorFlow.
"""

_EXPORTS = ("EditOutput", "MusePipeline", "PipelineOutput")
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        from muse_jax.inference import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'muse_jax.inference' has no attribute {name!r}")
