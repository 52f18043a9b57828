"""What a muse program sets up for its process before JAX starts: called by `cli.run` (every
binary) and by the benchmarks, first thing, and never by library code.

- Transparent huge pages for XLA:CPU's buffers (`muse_jax.host_memory`): glibc reads its
  tunables when a process starts, so the program re-executes itself once with them set, before
  any work. `MUSE_JAX_HUGEPAGES=0` turns this off.
- TensorFlow, which only feeds data here, stays quiet: its C++ log threshold and oneDNN notice
  are set off, and its import (which prints accelerator probes to the C stderr before any
  setting applies) runs with file descriptor 2 pointed at /dev/null.
- `MUSE_JAX_ONEDNN=1` adds XLA's CPU flags that route float32 dots through oneDNN (opt-in; see
  BENCHMARKS.md for where it helps and the train step it breaks).
"""

from __future__ import annotations

import os
import sys

from muse_jax import host_memory

ONEDNN_ENV = "MUSE_JAX_ONEDNN"
ONEDNN_XLA_FLAGS = ("--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_fusion_type=dot")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def add_onednn_flags(environ: dict[str, str] | None = None) -> None:
    """Appends the oneDNN flags to XLA_FLAGS when MUSE_JAX_ONEDNN is set (read by XLA when the
    CPU backend starts, so this must run before the first JAX computation)."""
    environ = os.environ if environ is None else environ
    if not _truthy(environ.get(ONEDNN_ENV)):
        return
    flags = environ.get("XLA_FLAGS", "")
    extra = [f for f in ONEDNN_XLA_FLAGS if f.split("=")[0] not in flags]
    if extra:
        environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow with the C-level stderr silenced (its CUDA and logging-init notices)
    and hides GPUs from it, so that later imports find it loaded and quiet. An import error is
    raised as usual, after stderr is restored."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                import tensorflow as tf

                # TF only feeds data: it probes no GPU later (the probe logs to the C stderr).
                tf.config.set_visible_devices([], "GPU")
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def prepare_process() -> None:
    """Huge pages (may replace this process by the same command), the oneDNN flags, and a
    quiet TensorFlow."""
    host_memory.reexec_with_hugepages()
    add_onednn_flags()
    import_tensorflow_quietly()
