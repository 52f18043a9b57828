"""Helpers shared by the tests (and by a benchmark that draws the same random torch weights).

  ROOT                          the repository root
  child_env(**extra)            os.environ, PYTHONPATH=ROOT, then `extra`: for a child process
                                that must import this checkout from another directory
  run_command(argv, ...)        `argv` run to completion, output captured as text
  run_python(*args, ...)        the same for `python ARGS` (this interpreter)
  run_module(module, *args)     the same for `python -m MODULE ARGS`
  start_python(*args, ...)      `python ARGS` started (Popen), stderr merged into stdout
  sigterm_after(args, marker)   `python ARGS`, sent SIGTERM once it prints `marker`
  signal_after(args, marker, sig)   the same with any signal (e.g. SIGKILL)
  shapes_images(n, image_size)  a small fixed batch of shapes images in [-1, 1]
  random_diffusers_model(cls, cfg, seed, noise)   a diffusers model with every parameter drawn

The runners start in ROOT unless told otherwise, so `-m muse_jax....` and `--config=configs/...`
resolve to this checkout however pytest was started.

Test modules import this as `tests.helpers`. conftest.py and the worker scripts run as
`python tests/<worker>.py` import it as `helpers`: pytest and Python put tests/ on sys.path for
them, and they need ROOT before they can put the repository there. This module therefore
imports only the standard library at load time (the workers set XLA_FLAGS before jax starts).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- processes


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with the repository on PYTHONPATH, then `extra` over both:
    what a child run outside ROOT (or in a fresh `-c` interpreter) needs to import
    `muse_jax`, `configs` and `tests` from this checkout."""
    return {**os.environ, "PYTHONPATH": ROOT, **extra}


def run_command(
    argv: list[str],
    *,
    cwd: str | os.PathLike[str] = ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Runs `argv` in `cwd` (default: the repository root) and returns the finished process with
    its stdout and stderr as text. `env` None inherits this process's environment; `timeout`
    turns a hang into a failed test instead of a stuck run."""
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=check
    )


def run_python(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """`python ARGS` with this interpreter (a script path, `-c CODE` or `-m MODULE ...`), as
    `run_command` runs it (same keyword arguments)."""
    return run_command([sys.executable, *args], **kwargs)


def run_module(module: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE ARGS`, as `run_python` runs it: how tests drive the project's binaries."""
    return run_python("-m", module, *args, **kwargs)


def start_python(
    *args: str, env: dict[str, str] | None = None, stdout: Any = subprocess.PIPE
) -> subprocess.Popen[str]:
    """Starts `python ARGS` in the repository root and returns at once, stderr merged into
    `stdout` (a pipe to read as text by default, or an open file): for a process a test talks
    to, signals, or runs beside another."""
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
    )


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
    proc = start_python(*args, env=env)
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            proc.send_signal(sig)
            break
        assert time.time() < deadline, "".join(seen)
    out = "".join(seen) + proc.communicate(timeout=timeout)[0]
    return proc.returncode, out


# ----------------------------------------------------------------------------- images


def shapes_images(n: int = 8, image_size: int = 32) -> Any:
    """The first `n` images of the shapes dataset's train split (seed 0, nothing held out, 30%
    with two objects) as float32 [n, image_size, image_size, 3] in [-1, 1]: a small batch that
    a training step can overfit, the same in every process that asks for it."""
    import numpy as np

    from muse_jax.data import shapes

    examples = [
        shapes.generate_example(
            0, "train", i, image_size=image_size, held_out=(), two_object_prob=0.3
        )[0]
        for i in range(n)
    ]
    return np.stack(examples).astype(np.float32) / 127.5 - 1


# ----------------------------------------------------------------------------- torch weights


def random_diffusers_model(cls: Any, cfg: dict[str, Any], seed: int, noise: float) -> Any:
    """`cls(**cfg)` (a diffusers model class) in eval mode with every parameter drawn, so that
    each one matters in a comparison: weights N(0, 1/fan_in), norm scales 1 + `noise` * N(0, 1),
    biases and GRN gamma/beta `noise` * N(0, 1). The same arguments give the same weights.

    Built without torch's init and filled from one seeded pool of normals at random offsets:
    drawing hundreds of millions of numbers one by one (torch's own init) is what makes the real
    aMUSEd models slow to build. The caller has imported diffusers (after hiding a torchvision
    that cannot load), as its `cls` shows; torch and diffusers are imported here, not at load."""
    import torch
    from diffusers.models.modeling_utils import no_init_weights

    with no_init_weights():
        model = cls(**cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    largest = max(p.numel() for p in model.parameters())
    pool = torch.randn(largest + 4096, generator=gen)
    with torch.no_grad():
        for name, p in model.named_parameters():
            start = int(torch.randint(0, pool.numel() - p.numel() + 1, (), generator=gen))
            values = pool[start : start + p.numel()].view(p.shape)
            if name.endswith((".gamma", ".beta", ".bias")):
                p.copy_(noise * values)
            elif p.ndim == 1:  # norm scales
                p.copy_(1 + noise * values)
            else:
                p.copy_(values * p[0].numel() ** -0.5)
    return model
