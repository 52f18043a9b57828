"""The huge-page re-exec: applied to `python -m muse_jax.*`, opt-out, and fewer page faults."""

import os
import subprocess
import sys
import textwrap

import pytest

from muse_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_thp = pytest.mark.skipif(
    host_memory.unavailable_reason({}) is not None,
    reason=f"huge pages unavailable: {host_memory.unavailable_reason({})}",
)


def _run(args, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.ENV)}
    environ.update(env)
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=environ, capture_output=True, text=True, check=True
    )
    return out.stdout


def test_tunable_detection_and_opt_out():
    assert host_memory.applied(
        {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:" + host_memory.TUNABLE}
    )
    assert not host_memory.applied({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert host_memory.unavailable_reason({host_memory.ENV: "off"}) == f"{host_memory.ENV}=off"


def test_only_muse_programs_are_reexecuted():
    assert host_memory.running_a_muse_program(["python", "-m", "muse_jax.train", "--config=c"])
    assert host_memory.running_a_muse_program(["python", "/venv/bin/muse-sample", "--prompt=x"])
    assert not host_memory.running_a_muse_program(["python", "-m", "pytest", "tests"])
    assert not host_memory.running_a_muse_program(["python", "-c", "import muse_jax"])
    assert not host_memory.running_a_muse_program(["python"])


@needs_thp
def test_binaries_reexecute_with_the_tunable_unless_turned_off():
    assert "on (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)" in _run(["-m", "muse_jax.host_memory"])
    assert "off (MUSE_JAX_HUGEPAGES=0)" in _run(
        ["-m", "muse_jax.host_memory"], MUSE_JAX_HUGEPAGES="0"
    )
    # Other tunables the user set are kept.
    out = _run(["-m", "muse_jax.host_memory"], GLIBC_TUNABLES="glibc.malloc.tcache_count=7")
    assert "GLIBC_TUNABLES=glibc.malloc.tcache_count=7:glibc.malloc.hugetlb=1" in out


_FAULTS = textwrap.dedent(
    """
    import resource, jax, jax.numpy as jnp
    a = jnp.ones((4096, 256)); b = jnp.ones((256, 2048))
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        f(a, b).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
    """
)


@needs_thp
def test_huge_pages_cut_the_page_faults_of_a_large_xla_output():
    """A 32 MB output is mapped afresh by every call: ~8k 4-KiB faults, or ~16 huge ones."""
    plain = int(_run(["-c", _FAULTS]))
    huge = int(_run(["-c", _FAULTS], GLIBC_TUNABLES=host_memory.TUNABLE))
    assert plain > 4000, plain  # 32 MiB / 4 KiB = 8192 pages.
    assert huge < plain / 8, (huge, plain)
