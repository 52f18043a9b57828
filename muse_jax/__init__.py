"""muse_jax: Muse (Chang et al., 2023) in JAX/Flax.

MUSE_JAX_ONEDNN=1 in the environment makes importing the package add XLA's CPU flags that route
float32 dots (attention included) through oneDNN: measured here, before the heads-major
attention of `muse_jax.models.attention`, the sampler's decoding loop ran 1.3x faster on CPU
(BENCHMARKS.md). Opt-in because with jaxlib 0.10.2 the same flags abort the base stage's train
step ("partition compile failed"). They concern only XLA's CPU backend and take effect only if
JAX has not started a backend yet.

Run as a program (`python -m muse_jax.<binary>` or a `muse-*` console script), the package first
re-executes the command with transparent huge pages for XLA:CPU's buffers (`muse_jax.host_memory`;
MUSE_JAX_HUGEPAGES=0 turns it off), before anything heavy is imported. Imported as a library, it
changes nothing.
"""

import os
import sys

ONEDNN_XLA_FLAGS = ("--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_fusion_type=dot")


def _set_cpu_flags() -> None:
    if os.environ.get("MUSE_JAX_ONEDNN", "").strip().lower() not in ("1", "true", "yes", "on"):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in ONEDNN_XLA_FLAGS if f.split("=")[0] not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


_set_cpu_flags()

# (`python -m muse_jax.host_memory` re-executes itself: importing it here would make runpy warn.)
if "muse_jax.host_memory" not in sys.orig_argv:
    from muse_jax import host_memory

    if host_memory.muse_program():
        host_memory.reexec_with_hugepages()


def __getattr__(name: str):
    """`from muse_jax import MusePipeline` without importing JAX for every binary up front."""
    if name in ("MusePipeline", "PipelineOutput", "EditOutput"):
        from muse_jax import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'muse_jax' has no attribute {name!r}")
