"""Subprocess helpers shared by tests that interrupt a running binary."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sigterm_after(
    args: list[str], marker: str, *, env: dict[str, str] | None = None, timeout: float = 300
) -> tuple[int, str]:
    """Runs `python ARGS` from the repository root, sends SIGTERM once a line contains
    `marker`, and returns (exit code, everything it printed)."""
    return signal_after(args, marker, signal.SIGTERM, env=env, timeout=timeout)


def signal_after(
    args: list[str],
    marker: str,
    sig: int,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> tuple[int, str]:
    """As `sigterm_after`, with signal `sig` (e.g. SIGKILL)."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            proc.send_signal(sig)
            break
        assert time.time() < deadline, "".join(seen)
    out = "".join(seen) + proc.communicate(timeout=timeout)[0]
    return proc.returncode, out
