"""muse_jax: Muse (Chang et al., 2023) in JAX/Flax.

`from muse_jax import MusePipeline` is the Python API (`muse_jax.inference`); it is loaded on
first use, so importing the package costs nothing. Importing it changes nothing in the process:
what a program sets up for itself (huge pages, XLA flags) happens in `muse_jax.entry`, called by
the binaries' entry point.
"""

_API = ("MusePipeline", "PipelineOutput", "EditOutput")


def __getattr__(name: str):
    if name in _API:
        from muse_jax import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'muse_jax' has no attribute {name!r}")
