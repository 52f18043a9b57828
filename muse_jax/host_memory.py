"""Transparent huge pages for XLA:CPU's per-execution buffers, via a one-time re-exec.

XLA:CPU maps each execution's temporaries afresh and unmaps them afterwards, so every step
faults all those pages in again, and much of a CPU step's time goes to the kernel. glibc's
`glibc.malloc.hugetlb=1` tunable makes malloc ask for transparent huge pages on its mappings:
far fewer faults and faster train steps (figures in BENCHMARKS.md, section "Page faults:
XLA:CPU maps every execution's buffers afresh").
Applied on CPU hosts only (not where /dev/accel* or /dev/nvidia* exist, unless JAX_PLATFORMS=cpu),
and never over a `glibc.malloc.hugetlb` setting of the user's. Tunables are read when a process
starts, hence the re-exec, done by `muse_jax.entry.prepare_process` at a binary's entry point
(`cli.run`) before any work; importing the package changes nothing.

Imports nothing heavy (no jax), so that binaries and benchmarks can call it first.
`MUSE_JAX_HUGEPAGES=0` turns it off. `python -m muse_jax.host_memory` says whether it applies.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

ENV = "MUSE_JAX_HUGEPAGES"
TUNABLE = "glibc.malloc.hugetlb=1"
# Set in the re-executed process: never exec twice, even where glibc drops GLIBC_TUNABLES
# (AT_SECURE processes, e.g. a setcap'd python).
_DONE = "MUSE_JAX_HUGEPAGES_REEXECUTED"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _accelerator_device() -> str | None:
    found = glob.glob("/dev/accel[0-9]*") + glob.glob("/dev/nvidia[0-9]*")
    return found[0] if found else None


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
    # Only XLA:CPU maps its buffers per execution; on TPU/GPU hosts the case is unmeasured.
    platforms = environ.get("JAX_PLATFORMS", "").lower()
    if platforms and "cpu" not in platforms.split(","):
        return f"JAX_PLATFORMS={platforms}"
    if not platforms.startswith("cpu") and (device := _accelerator_device()):
        return f"an accelerator is present ({device}; JAX_PLATFORMS=cpu forces it)"
    try:
        with open(_THP) as f:
            mode = f.read()
    except OSError:
        return f"no {_THP}"
    if "[never]" in mode:
        return "transparent huge pages are disabled ([never])"
    return None


def _hugetlb_setting(environ: dict[str, str]) -> str | None:
    for item in environ.get("GLIBC_TUNABLES", "").split(":"):
        if item.startswith("glibc.malloc.hugetlb="):
            return item
    return None


def applied(environ: dict[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    return _hugetlb_setting(environ) == TUNABLE


def reexec_with_hugepages() -> None:
    """Replaces this process by the same command with the tunable set; returns if it is set
    already, if the user chose another hugetlb setting, if it is unavailable, or if the exec
    fails. Called first thing by `muse_jax.entry.prepare_process`, never from library code."""
    if os.environ.get(_DONE) or _hugetlb_setting(os.environ) is not None:
        return
    if unavailable_reason() is not None or not getattr(sys, "orig_argv", None):
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES", ""), TUNABLE]))
    env[_DONE] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError as e:  # A sandbox that forbids exec, say: run on without huge pages.
        sys.stderr.write(f"muse_jax: running without huge pages (re-exec failed: {e})\n")


def _main() -> None:
    """`python -m muse_jax.host_memory`: says whether this machine runs with the tunable."""
    if applied():
        print(f"transparent huge pages: on (GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']})")
    elif setting := _hugetlb_setting(os.environ):
        print(f"transparent huge pages: as you set them ({setting})")
    else:
        print(f"transparent huge pages: off ({unavailable_reason() or 'not re-executed'})")


if __name__ == "__main__":
    reexec_with_hugepages()
    _main()
