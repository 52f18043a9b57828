"""The one switch for the models' hand-written CPU paths, and the platform they are chosen for.

`config.kernels` (default "auto") chooses, for every model built from the config:
- "auto": the hand-written paths where they pay, on XLA:CPU: heads-major attention for
  `attention="auto"` layers, the transposed weight gradients of `dense_dot` and `conv_grad`,
  the input-only-residual GELU of `activations`, and the two-reduction `arg_reductions`.
  Elsewhere (TPU, GPU) plain XLA.
- "xla": plain XLA everywhere (`jax.nn.dot_product_attention`, jax's own gradients, `nn.gelu`,
  `jnp.argmin`), for comparison or when a path misbehaves. Both give the same values
  (`tests/test_kernels.py`).

Each path asks `hand_written()` when it is traced. The choice is read from the config by
`models.factory` whenever it builds a model (`configure`), so training, sampling, evaluation and
`muse_jax.aot` follow the same key; `use(mode)` overrides it inside a block (tests,
benchmarks). jax caches a function's trace, so the choice must be made before the first trace:
a program traced once keeps its paths.
`target('tpu')` makes traces choose the paths of another platform: `muse_jax.aot` compiles for
TPUs from a CPU host, and its programs must take the TPU paths.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

from muse_jax.errors import UsageError

MODES = ("auto", "xla")

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("target", default=None)
_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("kernels", default=None)
_configured = "auto"  # The last config's choice; process-wide, so sampler threads see it too.


def check(mode: str) -> str:
    if mode not in MODES:
        raise UsageError(f"config.kernels={mode!r}; valid: {', '.join(MODES)}.")
    return mode


def configure(config) -> None:
    """Makes models traced from now on follow `config.kernels` ("auto" when absent)."""
    global _configured
    _configured = check(config.get("kernels", "auto"))


def mode() -> str:
    return _OVERRIDE.get() or _configured


@contextlib.contextmanager
def _scoped(var: contextvars.ContextVar, value: str) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def use(name: str) -> contextlib.AbstractContextManager[None]:
    """Traces inside this block use kernels `name`, whatever the config said."""
    return _scoped(_OVERRIDE, check(name))


def platform() -> str:
    """'cpu' | 'tpu' | 'gpu' ...: the platform being traced for."""
    return _TARGET.get() or jax.default_backend()


def on_cpu() -> bool:
    return platform() == "cpu"


def hand_written() -> bool:
    """Whether a trace now takes the hand-written CPU paths: kernels "auto" on CPU."""
    return mode() == "auto" and on_cpu()


def target(name: str) -> contextlib.AbstractContextManager[None]:
    """Traces inside this block choose the paths of platform `name` (e.g. 'tpu')."""
    return _scoped(_TARGET, name)
