"""Transparent huge pages for XLA:CPU's per-execution buffers, via a one-time re-exec.

XLA:CPU maps each execution's temporaries afresh (394 MB for the peer-size base train step) and
unmaps them afterwards, so every step faults all those pages in again: measured on the 2-core dev
box, 100k page faults per tiny base step and 750k per peer-size one, a quarter of the CPU time in
the kernel. glibc's `glibc.malloc.hugetlb=1` tunable makes malloc ask for transparent huge pages
on its mappings (27-370x fewer faults measured); train steps run 1.1-1.4x faster (BENCHMARKS.md).
Applied on CPU hosts only (not where /dev/accel* or /dev/nvidia* exist, unless JAX_PLATFORMS=cpu),
and never over a `glibc.malloc.hugetlb` setting of the user's. Tunables
are read when a process starts, hence the re-exec before any work is done.

Imports nothing heavy (no jax), so that binaries and benchmarks can call it first.
`MUSE_JAX_HUGEPAGES=0` turns it off.
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


def muse_program(argv: list[str] | None = None) -> str | None:
    """The muse program this process runs (`muse_jax.train` for `python [-u -X ...] -m
    muse_jax.train`, `muse-train` for the console script), or None: a test runner, a notebook or
    a script that merely imports the package is never re-executed."""
    argv = list(getattr(sys, "orig_argv", []) if argv is None else argv)
    args = iter(argv[1:])
    for arg in args:
        if arg == "-m" or (arg.startswith("-m") and len(arg) > 2):
            module = arg[2:] or next(args, "")
            return module if module.startswith("muse_jax.") else None
        if arg in ("-X", "-W", "--check-hash-based-pycs"):
            next(args, None)  # The option's value.
        elif arg in ("-c", "-", "--"):
            return None
        elif not arg.startswith("-"):
            name = os.path.basename(arg)
            return name if name.startswith("muse-") else None
    return None


def reexec_with_hugepages() -> None:
    """Replaces this process by the same command with the tunable set; returns if it is set
    already, if the user chose another hugetlb setting, if it is unavailable, or if the exec
    fails. Call first thing in a program, never from library code."""
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
