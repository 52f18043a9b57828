"""Transparent huge pages for XLA:CPU's per-execution buffers, via a one-time re-exec.

XLA:CPU maps each execution's temporaries afresh (394 MB for the peer-size base train step) and
unmaps them afterwards, so every step faults all those pages in again: measured on the 2-core dev
box, 100k page faults per tiny base step and 750k per peer-size one, a quarter of the CPU time in
the kernel. glibc's `glibc.malloc.hugetlb=1` tunable makes malloc ask for transparent huge pages
on its mappings (512x fewer faults); train steps run 1.1-1.4x faster (BENCHMARKS.md). Tunables
are read when a process starts, hence the re-exec before any work is done.

Imports nothing heavy (no jax), so that binaries and benchmarks can call it first.
`MUSE_JAX_HUGEPAGES=0` turns it off.
"""

from __future__ import annotations

import os
import platform
import sys

ENV = "MUSE_JAX_HUGEPAGES"
TUNABLE = "glibc.malloc.hugetlb=1"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def unavailable_reason(environ: dict[str, str] | None = None) -> str | None:
    """Why the tunable cannot or should not be applied here; None if it can."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{ENV}={environ[ENV]}"
    if sys.platform != "linux":
        return f"not Linux ({sys.platform})"
    libc, version = platform.libc_ver()
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return f"unknown C library {libc!r} {version!r}"
    if libc != "glibc" or (major, minor) < (2, 35):
        return f"needs glibc >= 2.35 (found {libc} {version})"
    try:
        with open(_THP) as f:
            mode = f.read()
    except OSError:
        return f"no {_THP}"
    if "[never]" in mode:
        return "transparent huge pages are disabled ([never])"
    return None


def applied(environ: dict[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def running_a_muse_program(argv: list[str] | None = None) -> bool:
    """Whether this process is `python -m muse_jax.<binary>` or a `muse-*` console script: the
    only processes the package re-executes (never a test runner or notebook that imported it)."""
    argv = list(getattr(sys, "orig_argv", []) if argv is None else argv)
    if argv[1:2] == ["-m"]:
        return len(argv) > 2 and argv[2].startswith("muse_jax.")
    return len(argv) > 1 and os.path.basename(argv[1]).startswith("muse-")


def reexec_with_hugepages() -> None:
    """Replaces this process by the same command with the tunable set; returns if it is set
    already or unavailable. Call first thing in a binary's main, never from library code."""
    if applied() or unavailable_reason() is not None or not getattr(sys, "orig_argv", None):
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES", ""), TUNABLE]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def _main() -> None:
    """`python -m muse_jax.host_memory`: says whether this machine runs with the tunable."""
    if applied():
        print(f"transparent huge pages: on (GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']})")
    else:
        print(f"transparent huge pages: off ({unavailable_reason() or 'not re-executed'})")


if __name__ == "__main__":
    reexec_with_hugepages()
    _main()
