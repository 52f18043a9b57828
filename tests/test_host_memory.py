"""The huge-page re-exec: which processes it applies to, the real hooks, opt-outs, fewer faults."""

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
_OURS = ("GLIBC_TUNABLES", host_memory.ENV, host_memory._DONE, "JAX_PLATFORMS")


def _run(args, **env):
    environ = {k: v for k, v in os.environ.items() if k not in _OURS}
    environ.update(env)
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=environ, capture_output=True, text=True, check=True
    )
    return out.stdout


def test_which_processes_are_muse_programs():
    prog = host_memory.muse_program
    assert prog(["python", "-m", "muse_jax.train", "--config=c"]) == "muse_jax.train"
    assert prog(["python", "-u", "-X", "dev", "-m", "muse_jax.sample"]) == "muse_jax.sample"
    assert prog(["python", "-mmuse_jax.edit"]) == "muse_jax.edit"
    assert prog(["python", "/venv/bin/muse-sample", "--prompt=x"]) == "muse-sample"
    for argv in (
        ["python", "-m", "pytest", "tests"],
        ["python", "-c", "import muse_jax"],
        ["python", "benchmarks/sampler.py"],
        ["python"],
    ):
        assert prog(argv) is None, argv


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


_SWEEP = """
import os
print("TUNABLES=" + os.environ.get("GLIBC_TUNABLES", ""))
from muse_jax.sweep import axis, product
def get_sweep():
    return product(axis("seed", [0]))
"""


@needs_thp
def test_binaries_reexecute_at_package_import(tmp_path):
    """The hook in muse_jax/__init__.py, through a real binary (`-m` and the console script)."""
    sweep = tmp_path / "print_env_sweep.py"
    sweep.write_text(_SWEEP)
    assert f"TUNABLES={host_memory.TUNABLE}" in _run(["-m", "muse_jax.sweep", str(sweep)])
    assert "TUNABLES=\n" in _run(["-m", "muse_jax.sweep", str(sweep)], MUSE_JAX_HUGEPAGES="0")
    script = os.path.join(os.path.dirname(sys.executable), "muse-sweep")
    if os.path.exists(script):  # Installed with `pip install -e .`.
        assert f"TUNABLES={host_memory.TUNABLE}" in _run([script, str(sweep)])


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
