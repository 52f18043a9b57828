"""The huge-page re-exec: at the binaries' entry point only, opt-outs, fewer page faults."""

import os
import textwrap

import pytest

from muse_jax import host_memory
from tests.helpers import run_python

needs_thp = pytest.mark.skipif(
    host_memory.unavailable_reason({}) is not None,
    reason=f"huge pages unavailable: {host_memory.unavailable_reason({})}",
)
_OURS = ("GLIBC_TUNABLES", host_memory.ENV, host_memory._DONE, "JAX_PLATFORMS")


def _run(args, **env):
    environ = {k: v for k, v in os.environ.items() if k not in _OURS}
    environ.update(env)
    return run_python(*args, env=environ, check=True).stdout


def test_settings_that_turn_it_off():
    assert host_memory.applied(
        {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:" + host_memory.TUNABLE}
    )
    assert not host_memory.applied({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert host_memory.unavailable_reason({host_memory.ENV: "off"}) == f"{host_memory.ENV}=off"
    assert host_memory.unavailable_reason({"JAX_PLATFORMS": "tpu"}) == "JAX_PLATFORMS=tpu"


@needs_thp
def test_reexecutes_with_the_tunable_and_respects_the_users_settings():
    assert "on (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)" in _run(["-m", "muse_jax.host_memory"])
    assert "off (MUSE_JAX_HUGEPAGES=0)" in _run(
        ["-m", "muse_jax.host_memory"], MUSE_JAX_HUGEPAGES="0"
    )
    out = _run(["-m", "muse_jax.host_memory"], GLIBC_TUNABLES="glibc.malloc.tcache_count=7")
    assert "GLIBC_TUNABLES=glibc.malloc.tcache_count=7:glibc.malloc.hugetlb=1" in out
    out = _run(["-m", "muse_jax.host_memory"], GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    assert "as you set them (glibc.malloc.hugetlb=0)" in out


_BINARY = """
import os
from muse_jax import cli

def main(argv):
    print("TUNABLES=" + os.environ.get("GLIBC_TUNABLES", ""))

cli.run(main)
"""


@needs_thp
def test_binaries_reexecute_at_their_entry_point_and_imports_change_nothing(tmp_path):
    """`cli.run` (every binary's entry point) re-executes with the tunable; importing the
    package, or running a library module such as `muse_jax.sweep`, does not."""
    binary = tmp_path / "print_env.py"
    binary.write_text(_BINARY)
    assert f"TUNABLES={host_memory.TUNABLE}" in _run([str(binary)])
    assert "TUNABLES=\n" in _run([str(binary)], MUSE_JAX_HUGEPAGES="0")
    check = "import os, muse_jax; print('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''))"
    assert "TUNABLES=\n" in _run(["-c", check])
    sweep = tmp_path / "print_env_sweep.py"
    sweep.write_text(
        "import os\nprint('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''))\n"
        "from muse_jax.sweep import axis, product\n"
        "def get_sweep():\n    return product(axis('seed', [0]))\n"
    )
    assert "TUNABLES=\n" in _run(["-m", "muse_jax.sweep", str(sweep)])


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
