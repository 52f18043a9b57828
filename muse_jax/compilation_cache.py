"""A persistent JAX compilation cache beside the run, so that a restart does not recompile.

Restarts are routine: a preempted TPU VM, a stage that reached its time budget, a crash.
Without this cache, every restart compiles the stage's programs again before the first step.
With it, a restarted process loads those programs from `<workdir>/compilation_cache`.

JAX keys each entry by the program, the compile options and flags, the devices and the
jax/XLA version. A changed model, mesh or jax install therefore misses the cache and compiles
instead of loading a stale program. The options include the cache's own path (JAX hands it to
XLA as its autotuning cache), so a copied or moved cache misses too. JAX reads and writes the cache through `etils.epath`, the path
type of `muse_jax.storage`, so a `gs://` workdir keeps its cache in the bucket, not in a local
`gs:` folder. With several processes, process 0 writes the entries and every process looks its
programs up there. XLA:CPU keys entries by a topology fingerprint that differs between
processes, so on CPU only process 0 finds them. Anyone who can write to the cache can make the
job run their code, as with the checkpoints beside it.
"""

from __future__ import annotations

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from muse_jax import storage
from muse_jax.errors import UsageError

AUTO = "auto"
_SUBDIR = "compilation_cache"


def cache_dir(setting: str, workdir: str) -> str | None:
    """The directory that the `compilation_cache` config value names.

    Args:
      setting: "auto" for `<workdir>/compilation_cache`, "" for no cache, or a path (local or
        `gs://`). Runs that share a path also share the compiled programs.
      workdir: the experiment directory.

    Returns:
      The directory as a string (local paths made absolute, remote ones unchanged), or None
      when `setting` is "".
    """
    if not isinstance(setting, str):
        raise UsageError(f"compilation_cache must be 'auto', '' or a directory, got {setting!r}.")
    if not setting:
        return None
    directory = storage.join(workdir, _SUBDIR) if setting == AUTO else setting
    return str(storage.path(directory))


def setup(config, workdir: str) -> str | None:
    """Points JAX's persistent compilation cache at the directory that
    `config.compilation_cache` names; returns that directory, or None when the key is "" or
    missing.

    Call it before the first compile of the run. JAX opens its cache at the first compile
    after the directory is set, so a process that trains in two workdirs caches each run in
    its own directory. Every program is cached, however small or quick to compile: many of a
    stage's programs (metric arithmetic, orbax's slicing, the stop vote) compile faster than
    JAX's default 1 s threshold, and a restart would compile those again. With "" this function
    changes nothing, so a cache set through JAX itself (`JAX_COMPILATION_CACHE_DIR`) still
    applies.
    """
    directory = cache_dir(config.get("compilation_cache", ""), workdir)
    if directory is None:
        return None
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # -1: no size threshold, and JAX does not substitute a per-filesystem minimum.
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if jax.config.jax_compilation_cache_dir != directory:
        jax_cache.set_cache_dir(directory)
        jax_cache.reset_cache()  # Drops the cache that JAX opened for an earlier directory.
    return directory
