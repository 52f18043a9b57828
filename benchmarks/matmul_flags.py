r"""Matmul / attention GFLOP/s, f32 against bf16, under the current process's XLA_FLAGS.

Exists to answer "which XLA:CPU flags make bf16 (or f32) matmuls fast here": XLA_FLAGS are read
once per process, so each setting needs a fresh process. Prints one line per case: GFLOP/s (best
of --reps x --passes after warm-up), the library XLA put the dot in (ynn / onednn / xla) with the
number of converts (3 on a bf16 matmul means XLA upcast it to f32), and the max error against a
float64 reference on the same, already bf16-rounded inputs, relative to max |reference|.
The last line is a numpy matmul rate taken before and after: on a shared machine, compare only
runs whose gauge is at its quiet value (about 250 GFLOP/s on the 2-core dev box, ~60 when a
neighbour is busy). Findings: benchmarks/xla_cpu_bf16_findings.md.

  python benchmarks/matmul_flags.py --torch          # jaxlib defaults, plus torch on the same shapes
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/matmul_flags.py  # YNNPACK off
  XLA_FLAGS="--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot" \
      python benchmarks/matmul_flags.py
  JAX_DEFAULT_MATMUL_PRECISION=bfloat16 python benchmarks/matmul_flags.py --cases=mm2048_f32
"""

import argparse
import os
import re
import time

import numpy as np

MM_SHAPES = {"mm2048": (2048, 2048, 2048), "mm_tf": (2048, 256, 1024)}  # (m, k, n)
ATTN_SHAPE = (8, 256, 4, 64)  # [batch, length, heads, head_dim]
# f32: f32 @ f32 -> f32; bf16: bf16 @ bf16 -> bf16; bf16_f32acc: bf16 @ bf16 -> f32
# (preferred_element_type); bf16_f32acc_bf16: the same, then .astype(bf16).
VARIANTS = ("f32", "bf16", "bf16_f32acc", "bf16_f32acc_bf16")


def case_names():
    names = [f"{mm}_{v}" for mm in MM_SHAPES for v in VARIANTS]
    return names + ["attn_f32", "attn_bf16"]


def best_seconds(fn, args, reps, sync, min_rep_s=0.05):
    """Best per-call seconds over `reps` timed repetitions, each long enough to time."""
    t0 = time.perf_counter()
    sync(fn(*args))
    inner = max(1, int(min_rep_s / max(time.perf_counter() - t0, 1e-6)))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        sync(out)
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def numpy_gflops(n=1024, reps=5):
    """numpy (OpenBLAS) f32 matmul rate: a flag-independent gauge of how busy the CPU is."""
    a = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    return 2 * n**3 / best_seconds(np.matmul, (a, a), reps, lambda x: x, min_rep_s=0.02) / 1e9


def make_inputs(name, rng):
    """float32 numpy inputs, already rounded to bf16 for bf16 cases, and the case's FLOPs."""
    import ml_dtypes

    kind = next(k for k in (*MM_SHAPES, "attn") if name.startswith(k + "_"))
    dtype = name[len(kind) + 1 :]
    if kind == "attn":
        b, t, h, d = ATTN_SHAPE
        arrays = [rng.standard_normal((b, t, h, d), dtype=np.float32) for _ in range(3)]
        flops = 4 * b * h * t * t * d
    else:
        m, k, n = MM_SHAPES[kind]
        arrays = [rng.standard_normal(s, dtype=np.float32) for s in ((m, k), (k, n))]
        flops = 2 * m * k * n
    if dtype != "f32":
        arrays = [a.astype(ml_dtypes.bfloat16).astype(np.float32) for a in arrays]
    return kind, dtype, arrays, flops


def reference(kind, arrays):
    a = [x.astype(np.float64) for x in arrays]
    if kind != "attn":
        return a[0] @ a[1]
    q, k, v = a
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def rel_err(out, ref):
    return float(np.max(np.abs(out.astype(np.float64) - ref)) / np.max(np.abs(ref)))


def library_of(hlo_text):
    """Which library fusions the optimized HLO uses ("xla": XLA's own dot codegen).

    `cvt=N` on the printed line counts convert ops: a bf16 dot that XLA upcasts to f32 shows 3.
    """
    found = []
    for key, label in (("__xnn_fusion", "xnn"), ("__ynn_fusion", "ynn"), ("__onednn", "onednn")):
        if key in hlo_text.lower():
            found.append(label)
    if not found and re.search(r"\bdot\(", hlo_text):
        found.append("xla")
    return "+".join(found) or "?"


def jax_case(name, rng):
    """Compiled case: callable, args, sync, FLOPs and the result's metadata (or raises)."""
    import jax
    import jax.numpy as jnp

    kind, dtype, arrays, flops = make_inputs(name, rng)
    in_dtype = jnp.float32 if dtype == "f32" else jnp.bfloat16
    out_dtype = jnp.float32 if dtype.startswith("bf16_f32acc") else None
    cast = jnp.bfloat16 if dtype == "bf16_f32acc_bf16" else None
    if kind == "attn":
        fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))
    else:

        def matmul(a, b):
            out = jnp.matmul(a, b, preferred_element_type=out_dtype)
            return out if cast is None else out.astype(cast)

        fn = jax.jit(matmul)
    args = [jnp.asarray(x, dtype=in_dtype) for x in arrays]
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = compiled(*args)
    hlo = compiled.as_text()
    converts = len(re.findall(r"\bconvert\(", hlo))
    return dict(
        fn=compiled,
        args=args,
        sync=jax.block_until_ready,
        flops=flops,
        lib=f"{library_of(hlo)} cvt={converts}",
        out=str(out.dtype),
        err=rel_err(np.asarray(out).astype(np.float32), reference(kind, arrays)),
        compile_s=compile_s,
    )


def torch_case(name, rng):
    import torch

    kind, dtype, arrays, flops = make_inputs(name, rng)
    if dtype.startswith("bf16_f32acc"):
        return None  # torch.mm has no bf16-in/f32-out variant; its bf16 mm accumulates in f32
    tdtype = torch.float32 if dtype == "f32" else torch.bfloat16
    args = [torch.from_numpy(x).to(tdtype) for x in arrays]
    if kind == "attn":
        args = [x.transpose(1, 2).contiguous() for x in args]  # torch wants [b, h, t, d]

        def fn(q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    else:
        fn = torch.mm
    torch.set_grad_enabled(False)
    out = fn(*args).float().numpy()
    return dict(
        fn=fn,
        args=args,
        sync=lambda x: x,
        flops=flops,
        lib=f"torch{torch.get_num_threads()}t",
        out=str(tdtype).replace("torch.", ""),
        err=rel_err(out, reference(kind, arrays)),
        compile_s=0.0,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(case_names()), help="comma-separated subset")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per pass")
    parser.add_argument("--passes", type=int, default=3, help="interleaved passes over cases")
    parser.add_argument("--torch", action="store_true", help="also time torch on the same cases")
    parser.add_argument("--no-jax", action="store_true", help="torch only (with --torch)")
    args = parser.parse_args()

    cases = args.cases.split(",")
    unknown = set(cases) - set(case_names())
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; known: {case_names()}")
    runners = []
    if not args.no_jax:
        import jax

        prec = jax.config.jax_default_matmul_precision
        print(
            f"# jax {jax.__version__}  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  "
            f"jax_default_matmul_precision={prec}"
        )
        runners.append(("jax", jax_case))
    if args.torch:
        runners.append(("torch", torch_case))
    gauge = numpy_gflops()
    prepared = []
    for tag, runner in runners:
        for name in cases:
            try:
                r = runner(name, np.random.default_rng(0))
            except Exception as e:  # a flag setting that fails to compile is a result too
                print(f"{tag:5s} {name:22s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            if r is not None:
                r["sec"] = float("inf")
                prepared.append((tag, name, r))
    # Interleaved passes spread each case's samples over the run: on a shared machine a
    # neighbour's burst then costs a pass, not a case.
    for _ in range(args.passes):
        for _, _, r in prepared:
            r["sec"] = min(r["sec"], best_seconds(r["fn"], r["args"], args.reps, r["sync"]))
    for tag, name, r in prepared:
        print(
            f"{tag:5s} {name:22s} {r['flops'] / r['sec'] / 1e9:8.1f} GFLOP/s  "
            f"lib={r['lib']:14s} out={r['out']:8s} rel_err={r['err']:.1e}  "
            f"compile={r['compile_s']:.2f}s",
            flush=True,
        )
    print(
        f"# numpy f32 1024^3 matmul (CPU-contention gauge): {gauge:.0f} GFLOP/s before, "
        f"{numpy_gflops():.0f} after"
    )


if __name__ == "__main__":
    main()
