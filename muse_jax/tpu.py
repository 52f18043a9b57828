"""TPU chips and topologies: what `muse_jax.aot` compiles for without owning one.

`libtpu` (the `[tpu]` extra: `pip install "jax[tpu]"`) lets JAX describe a TPU slice on any host
(`jax.experimental.topologies`) and compile programs for it; nothing runs. This module turns a
user's slice name into those devices and holds the per-chip figures the compiled programs are
judged against. The figures are the public datasheet numbers (cloud.google.com/tpu/docs,
"System architecture" of each version), per chip as JAX sees it: one device per chip (v4 and
v5p in megacore mode, the default).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from muse_jax.errors import UsageError

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int  # High-bandwidth memory per chip.
    bf16_flops: float  # Peak dense bf16 FLOP/s per chip.
    hbm_bandwidth: float  # Bytes/s per chip.
    ici_link_bandwidth: float  # One-way bytes/s of one inter-chip link.
    torus_dims: int  # 3 (v4, v5p: 3D torus) or 2 (v5e, v6e: 2D).
    chip_config: str  # libtpu's chip configuration: "megacore" fuses a chip's two cores.

    @property
    def ici_bandwidth(self) -> float:
        """Bytes/s a chip moves in a ring collective along one torus axis (both directions)."""
        return 2 * self.ici_link_bandwidth


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1.2e12, 4.5e10, 3, "megacore"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 8.1e11, 4.5e10, 2, "default"),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2.76e12, 9e10, 3, "megacore"),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1.64e12, 9e10, 2, "default"),
}

# Chip grids of the usual slices, by chip count (Cloud TPU's slice shapes).
_GRIDS_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}
_GRIDS_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named slice (or several identical slices joined by the data-center network)."""

    chip: Chip
    grid: str  # "2x2x4"
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(int(d) for d in self.grid.split("x"))

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def name(self) -> str:
        base = f"{self.chip.name}:{self.grid}"
        return base if self.num_slices == 1 else f"{base} x {self.num_slices} slices"

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.name}:{self.grid}"


def _names_hint() -> str:
    return (
        f"chips {sorted(CHIPS)}; e.g. v4-32 (Cloud TPU name: v4 and v5p count TensorCores, two "
        "per chip), v5e-16, v6e-8, or a chip grid v4:2x2x4 / v5e:4x4"
    )


def parse(name: str, num_slices: int = 1) -> Topology:
    """'v4-32' | 'v5e-16' | 'v4:2x2x4' | 'v6e:4x4' -> a Topology (ValueError in one line).

    Cloud TPU names v4 and v5p slices by TensorCores (v4-32 is 16 chips) and v5e/v6e by chips;
    a grid names the chips directly.
    """
    if num_slices < 1:
        raise UsageError(f"num_slices must be >= 1, got {num_slices}.")
    text = name.strip().lower().replace("v5litepod", "v5e").replace("v5lite", "v5e")
    m = re.fullmatch(r"(v\d+[a-z]*)[-:](\S+)", text)
    chip = CHIPS.get(m.group(1)) if m else None
    if chip is None:
        raise UsageError(f"Unknown TPU topology {name!r}; valid: {_names_hint()}.")
    size = m.group(2)
    grids = _GRIDS_3D if chip.torus_dims == 3 else _GRIDS_2D
    if re.fullmatch(r"\d+(x\d+)+", size):
        dims = size.split("x")
        if len(dims) != chip.torus_dims or any(int(d) < 1 for d in dims):
            raise UsageError(
                f"TPU {chip.name} grids have {chip.torus_dims} dimensions, got {size!r} in "
                f"{name!r}; e.g. {chip.name}:{grids[4]}."
            )
        return Topology(chip, size, num_slices)
    if not size.isdigit():
        raise UsageError(f"Unknown TPU topology {name!r}; valid: {_names_hint()}.")
    count = int(size)
    chips = count // 2 if chip.chip_config == "megacore" else count
    if chip.chip_config == "megacore" and count % 2 or chips not in grids:
        valid = sorted(c * (2 if chip.chip_config == "megacore" else 1) for c in grids)
        raise UsageError(
            f"No {chip.name} slice of {count} "
            f"{'TensorCores' if chip.chip_config == 'megacore' else 'chips'} ({name!r}); "
            f"valid sizes: {', '.join(f'{chip.name}-{v}' for v in valid)}."
        )
    return Topology(chip, grids[chips], num_slices)


def quiet_libtpu_environment() -> None:
    """Environment for describing TPUs on a host that has none: CPU for anything that runs,
    and the worker variables libtpu would otherwise look up on a TPU VM's metadata server
    (failing that, it logs a screen of errors). Must run before JAX initialises a backend."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
    # libtpu takes a host-wide lock for the chips it drives; describing a slice drives none,
    # so several compiling processes may share the host.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow (imported with the data modules, never run here) would probe for CUDA and
    # announce oneDNN: nothing of it is used.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def libtpu_missing() -> str | None:
    """Why TPU programs cannot be compiled here (None: they can)."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        return 'libtpu is not installed: pip install -e ".[tpu]" (it is jax[tpu], ~0.7 GB)'
    return None


def devices(topology: Topology) -> list:
    """The slice's TPU devices (deviceless: they can compile, not run)."""
    from jax.experimental import topologies

    kwargs = {"num_slices": topology.num_slices} if topology.num_slices > 1 else {}
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topology.libtpu_name,
        chip_config_name=topology.chip.chip_config,
        **kwargs,
    )
    return list(desc.devices)
