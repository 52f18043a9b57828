r"""Peak host memory of writing and of reading a precomputed text-embedding table, against its size.

For each N in `--counts`, a fresh process writes a table of N distinct random captions with
`precompute.TableWriter`, encoding them with the tiny T5 v1.1 preset (random weights; captions
tokenised as bytes) in chunks of `--chunk` (`--source=synthetic` writes random embeddings
instead, without JAX). A second fresh process opens the table and looks up `--batches` random
batches of `--batch` captions, the trainer's access pattern. Each reports its peak resident set
(VmHWM) and its resident set before the phase began, beside the table's size on disk and the
float32 in-RAM table that the loader before this one held; `--repeats` fresh tables per N give
the spread, and the last lines the ratio of the median peaks at the largest and smallest N.
`--arena_max=2` caps glibc's malloc arenas in the phases: tensorstore's I/O threads otherwise
spread short-lived buffers over many arenas, whose fragmentation shows up as resident memory.

  python benchmarks/embedding_rss.py --counts=10000,100000 --text_length=64 --repeats=3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

_WORDS = (
    "a an the red green blue yellow purple orange small large tiny huge round square striped "
    "dotted shiny circle triangle square star heart cube sphere cone on under beside above near "
    "left right of in with and photo drawing painting sketch dog cat bird car tree house boat "
    "mountain river city beach forest street night morning snow rain sunny cloudy old new"
).split()


def caption(i: int) -> str:
    """The i-th caption: distinct for every i, recomputable without a list of all of them."""
    n = 6 + i % 9
    words = [_WORDS[(i * 7919 + k * 104729 + k * k * 31) % len(_WORDS)] for k in range(n)]
    return " ".join(words) + f" no. {i}"


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _du_mib(directory: str) -> float:
    total = 0
    for root, _, files in os.walk(directory):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 2**20


def _encoder(source: str, length: int):
    """(width, fn(captions) -> ([N, S, D] float32, [N, S] int32)) for the chosen source."""
    if source == "synthetic":
        rng = np.random.default_rng(0)
        width = 32

        def fake(captions):
            emb = rng.standard_normal((len(captions), length, width), np.float32)
            return emb, _tokenize(captions, length)[1]

        return width, fake

    import flax.linen as nn
    import jax

    from muse_jax.models import t5

    config = t5.get_config("tiny")
    model = t5.T5Encoder(config)
    ids0 = np.zeros((1, length), np.int32)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), ids0, np.ones_like(ids0)))
    apply = jax.jit(model.apply)

    def encode(captions):
        ids, mask = _tokenize(captions, length)
        return np.asarray(apply(params, ids, mask)), mask

    return config.d_model, encode


def _tokenize(captions, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte ids in [2, 100) (the tiny preset's vocabulary) + EOS (1), zero padding."""
    ids = np.zeros((len(captions), length), np.int32)
    for i, c in enumerate(captions):
        toks = [b % 98 + 2 for b in c.encode("utf-8")][: length - 1] + [1]
        ids[i, : len(toks)] = toks
    return ids, (ids > 0).astype(np.int32)


def write(directory: str, n: int, args) -> dict:
    from muse_jax.text import precompute

    width, encode = _encoder(args.source, args.text_length)
    encode([caption(0)] * args.chunk)  # Compile before measuring.
    before = _rss_mib("VmRSS")
    t0 = time.perf_counter()
    encoder = {"name": "t5", "preset": "tiny", "weights": "random", "source": args.source}
    with precompute.TableWriter(directory, text_length=args.text_length, encoder=encoder) as w:
        todo = w.missing([caption(i) for i in range(n)])
        for start in range(0, len(todo), args.chunk):
            part = todo[start : start + args.chunk]
            emb, mask = encode(part + [""] * (args.chunk - len(part)))  # One shape.
            w.append(part, emb[: len(part)], mask[: len(part)])
    return {
        "seconds": time.perf_counter() - t0,
        "before_mib": before,
        "peak_mib": _rss_mib("VmHWM"),
        "disk_mib": _du_mib(directory),
        "dim": width,
    }


def read(directory: str, n: int, args) -> dict:
    import tensorstore  # noqa: F401 -- imported before `before`, like the writer's libraries.

    from muse_jax.text import embeddings

    before = _rss_mib("VmRSS")
    t0 = time.perf_counter()
    table = embeddings.EmbeddingTable(directory)
    assert len(table) == n, (len(table), n)
    rng = np.random.default_rng(1)
    start, trace = time.perf_counter(), []
    for b in range(args.batches):
        emb, _ = table.lookup([caption(int(i)) for i in rng.integers(0, n, args.batch)])
        assert emb.shape == (args.batch, args.text_length, table.dim)
        if (b + 1) % max(args.batches // 6, 1) == 0:
            trace.append(round(_rss_mib("VmRSS"), 1))
    per_batch = (time.perf_counter() - start) / args.batches
    return {
        "seconds": time.perf_counter() - t0,
        "before_mib": before,
        "peak_mib": _rss_mib("VmHWM"),
        "ms_per_batch": 1e3 * per_batch,
        "trace_mib": trace,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", default="10000,100000")
    parser.add_argument("--text_length", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--source", default="t5", choices=["t5", "synthetic"])
    parser.add_argument("--repeats", type=int, default=3, help="Fresh write + read per N.")
    parser.add_argument(
        "--arena_max", type=int, default=0, help="MALLOC_ARENA_MAX of the phases (0: glibc's)."
    )
    parser.add_argument("--dir", default=None, help="Where tables go (default: a temp dir).")
    parser.add_argument("--child", default=None, choices=["write", "read"])
    parser.add_argument("--n", type=int, default=0)
    args = parser.parse_args()

    if args.child:
        phase = write if args.child == "write" else read
        print(json.dumps(phase(args.dir, args.n, args)))
        return

    root = args.dir or tempfile.mkdtemp(prefix="embedding_rss_")
    counts = [int(c) for c in args.counts.split(",")]
    peaks: dict[tuple[int, str], list[float]] = {}
    print(
        f"source {args.source}, text_length {args.text_length}, chunk {args.chunk}, "
        f"lookups {args.batches} x {args.batch}, MALLOC_ARENA_MAX {args.arena_max or 'unset'}; "
        "peak RSS (VmHWM) of a fresh process per phase"
    )
    for n in counts:
        directory = os.path.join(root, f"table_{n}")
        for _ in range(args.repeats):
            shutil.rmtree(directory, ignore_errors=True)  # Each write starts from nothing.
            for phase in ("write", "read"):
                r = _child(phase, n, directory, args)
                peaks.setdefault((n, phase), []).append(r["peak_mib"])
                extra = (
                    f", table on disk {r['disk_mib']:.0f} MiB, old float32 in-RAM table "
                    f"{n * args.text_length * r['dim'] * 4 / 2**20:.0f} MiB"
                    if phase == "write"
                    else f", {r['ms_per_batch']:.1f} ms per batch of {args.batch}, RSS every "
                    f"sixth of the lookups {r['trace_mib']}"
                )
                print(
                    f"N={n:>7} {phase:5}: peak {r['peak_mib']:7.1f} MiB (before the phase "
                    f"{r['before_mib']:6.1f} MiB), {r['seconds']:.1f} s{extra}",
                    flush=True,
                )
        shutil.rmtree(directory, ignore_errors=True)
    lo, hi = counts[0], counts[-1]
    for phase in ("write", "read"):
        a, b = peaks[(lo, phase)], peaks[(hi, phase)]
        print(
            f"{phase}: peak RSS {min(a):.1f}-{max(a):.1f} MiB at {lo}, {min(b):.1f}-{max(b):.1f} "
            f"MiB at {hi}; ratio of medians {np.median(b) / np.median(a):.3f}"
        )


def _child(phase: str, n: int, directory: str, args) -> dict:
    cmd = [sys.executable, __file__, f"--child={phase}", f"--n={n}", f"--dir={directory}"]
    cmd += [f"--{k}={getattr(args, k)}" for k in ("text_length", "chunk", "batch", "batches")]
    cmd += [f"--source={args.source}"]
    env = dict(os.environ)
    if args.arena_max:
        env["MALLOC_ARENA_MAX"] = str(args.arena_max)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
