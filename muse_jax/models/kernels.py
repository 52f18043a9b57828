"""The platform the models' platform-specific paths are chosen for.

Three layers pick an implementation by platform when they are traced: attention "auto" (a
heads-major einsum on CPU, `jax.nn.dot_product_attention` elsewhere), and the CPU weight-gradient
paths of `dense_dot` and `conv_grad`. They ask `platform()`, which is the default backend unless
a caller is tracing for another one: `muse_jax.aot` compiles for TPUs from a CPU host, and its
programs must take the TPU paths.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("target", default=None)


def platform() -> str:
    """'cpu' | 'tpu' | 'gpu' ...: the platform being traced for."""
    return _TARGET.get() or jax.default_backend()


def on_cpu() -> bool:
    return platform() == "cpu"


@contextlib.contextmanager
def target(name: str) -> Iterator[None]:
    """Traces inside this block choose the paths of platform `name` (e.g. 'tpu')."""
    token = _TARGET.set(name)
    try:
        yield
    finally:
        _TARGET.reset(token)
