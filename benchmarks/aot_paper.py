r"""The paper configs compiled for TPU slices: the BENCHMARKS.md table of `muse_jax.aot` figures.

Needs libtpu (`pip install -e ".[tpu]"`); nothing runs on a TPU. Each row compiles one program
of `configs/muse_paper.py` with the settings that config carries (layer scan, rematerialisation,
bfloat16) for a named slice, and prints per-device memory against HBM, FLOPs, compile time and
the roofline estimate (an estimate, not a measurement):

  python benchmarks/aot_paper.py                      # every row (about 30 minutes on 2 cores)
  python benchmarks/aot_paper.py --rows=base-3b,sampler  # rows whose labels start with these

Each row is the same as one `python -m muse_jax.aot` command, printed beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from muse_jax import tpu  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    preset: str
    topology: str
    program: str  # base | superres | sampler
    overrides: tuple[str, ...] = ()
    sampler_batch: int = 32
    text: str = "precomputed"  # Or "graph": the frozen T5-XXL runs inside the step.

    def command(self) -> str:
        flags = [
            f"--config=configs/muse_paper.py:{self.preset}",
            f"--topology={self.topology}",
            f"--programs={self.program}",
            f"--text={self.text}",
        ]
        if self.program == "sampler":
            flags.append(f"--sampler_batch={self.sampler_batch}")
        flags += [f"--config.{o}" for o in self.overrides]
        return "python -m muse_jax.aot " + " ".join(flags)


ROWS = (
    # The 3B base stage at the paper's batch 512: the smallest v4 slice it fits, on either side.
    Row("base-3b-v4-8", "3b", "v4-8", "base"),
    Row("base-3b-v4-16", "3b", "v4-16", "base"),
    Row("base-3b-v4-32", "3b", "v4-32", "base"),
    # The paper's other route: the frozen T5-XXL encoder inside every step.
    Row("base-3b-t5-v4-32", "3b", "v4-32", "base", text="graph"),
    # The super-res stage (512x512, 64x64 tokens) at batch 512 on v4.
    Row("superres-3b-v4-64", "3b", "v4-64", "superres"),
    Row("superres-3b-v4-128", "3b", "v4-128", "superres"),
    # The 632M base stage on v5e (16 GiB per chip).
    Row("base-632m-v5e-16", "632m", "v5e-16", "base"),
    # The samplers at batch 32 on one v4 chip: 256x256 (base) and 512x512 (cascade).
    Row("sampler-3b-v4-1chip", "3b", "v4-8", "sampler"),
)


def run_row(row: Row):
    from configs import muse_paper
    from muse_jax import aot

    config = muse_paper.get_config(row.preset)
    for override in row.overrides:
        key, value = override.split("=", 1)
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = (
            type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"
        )
    return aot.run(
        config,
        tpu.parse(row.topology),
        [row.program],
        [row.text],
        sampler_batch=row.sampler_batch,
        log=lambda line: print(line, flush=True),
    )


def table_line(row: Row, r) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in r.mesh.items() if v > 1) or "1 chip"
    s = r.settings
    lever = f"remat={s['remat']}, scan={s['scan']}" if "remat" in s else f"steps {s.get('steps')}"
    per_chip = r.batch // (r.mesh["data"] * r.mesh["fsdp"])
    if r.error:
        return (
            f"| {r.program} | {row.preset} | {r.topology} | {mesh} | {lever} | {r.batch} "
            f"({per_chip}/chip) | **{r.total_bytes / tpu.GiB:.1f}** / {r.hbm_bytes / tpu.GiB:.0f} "
            f"(refused) | — | {r.compile_s:.0f} | — |"
        )
    ro = r.roofline
    return (
        f"| {r.program} | {row.preset} | {r.topology} | {mesh} | {lever} | {r.batch} "
        f"({per_chip}/chip) | {r.memory.total / tpu.GiB:.1f} / {r.hbm_bytes / tpu.GiB:.0f}"
        f"{'' if r.fits else ' **no**'} | {r.cost['flops']:.2e} | {r.compile_s:.0f} | "
        f"{ro.seconds:.2f} s ({ro.bound}) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", default="", help="Comma list of label prefixes: run only those rows."
    )
    args = parser.parse_args()
    missing = tpu.libtpu_missing()
    if missing:
        sys.exit(f"error: {missing}")
    tpu.quiet_libtpu_environment()
    lines = []
    t0 = time.time()
    for row in ROWS:
        if args.rows and not row.label.startswith(tuple(args.rows.split(","))):
            continue
        print(f"\n## {row.label}\n$ {row.command()}", flush=True)
        for r in run_row(row):
            lines.append(table_line(row, r))
    print(
        "\n| program | preset | slice | mesh | levers | batch | GiB/chip vs HBM | FLOPs/chip "
        "| compile s | roofline estimate/call |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
