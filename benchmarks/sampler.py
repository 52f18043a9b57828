r"""Sampler speed: our guided parallel decoding + VQ decode vs diffusers' aMUSEd, same run.

Both sides get the same work: a masked transformer of equal width/depth/heads/MLP over the same
token grid, codebook, text length and text width, the same number of decoding steps with
classifier-free guidance (conditional and unconditional branches batched, 2B rows per call),
the same batch, random weights, and a VQ decode of every sample to pixels. Printed per side and
dtype: seconds per image for the decoding loop and for the VQ decode (after compilation;
compile time apart), FLOPs (XLA's cost analysis for ours, torch's FLOP counter for the peer),
MFU against the faster of the two frameworks' matmul in that dtype (both measured in the same
run: the hardware's best demonstrated rate, one denominator for both sides), seconds
per TFLOP (so that the two different VQ decoders stay comparable), and the ratios.

  python benchmarks/sampler.py                       # ours + peer (when diffusers is installed)
  python benchmarks/sampler.py --dtypes=float32 --no_peer
  python benchmarks/sampler.py --width=128 --depth=4 --batch=8   # another workload

The peer needs `pip install -e '.[test,bench]'` (torch CPU + diffusers).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from muse_jax import entry  # noqa: E402

if __name__ == "__main__":
    entry.prepare_process()  # Before jax starts: huge pages, MUSE_JAX_ONEDNN's flags.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from train_steps import cost_flops, matmul_peak, wall_times  # noqa: E402

from muse_jax.models.transformer import MaskedTransformer  # noqa: E402
from muse_jax.models.vqgan import VQGAN  # noqa: E402
from muse_jax.sampling.sampler import MuseSampler  # noqa: E402


@dataclasses.dataclass
class Workload:
    width: int = 256
    depth: int = 8
    num_heads: int = 4
    mlp_dim: int = 1024
    codebook_size: int = 8192
    grid: int = 16  # Tokens per side.
    text_length: int = 16
    text_dim: int = 256
    num_steps: int = 12
    guidance_scale: float = 5.0
    batch: int = 4
    image_size: int = 256
    # Our VQ decoder at the peer's widths (aMUSEd's VQ: 128, 256, 256, 512, 768 channels, f16);
    # configs/muse_paper.py's MaskGIT layout is (1, 1, 2, 2, 4).
    vq_channels: int = 128
    vq_channel_mult: tuple[int, ...] = (1, 2, 2, 4, 6)
    vq_embedding_dim: int = 256


def _time(fn, repeats: int) -> float:
    """Median wall seconds of `fn()` over `repeats` runs, after one warm-up."""
    return statistics.median(wall_times(fn, repeats))


def build_ours(w: Workload, dtype: str) -> tuple[MuseSampler, dict[str, Any]]:
    """A MuseSampler over precomputed text embeddings (the T5 path), random weights.

    `dtype` is the compute dtype; parameters stay float32 (the master weights of training).
    """
    dt = jnp.dtype(dtype)
    transformer = MaskedTransformer(
        vocab_size=w.codebook_size,
        seq_len=w.grid * w.grid,
        width=w.width,
        depth=w.depth,
        num_heads=w.num_heads,
        mlp_dim=w.mlp_dim,
        dtype=dt,
    )
    factor = 2 ** (len(w.vq_channel_mult) - 1)
    patch = w.image_size // w.grid // factor
    if patch < 1 or patch * factor * w.grid != w.image_size:
        raise ValueError(f"image_size {w.image_size} is not grid {w.grid} x a power of two.")
    vq = VQGAN(
        channels=w.vq_channels,
        channel_mult=w.vq_channel_mult,
        num_res_blocks=2,
        embedding_dim=w.vq_embedding_dim,
        codebook_size=w.codebook_size,
        norm_groups=32,
        patch_size=patch,
        dtype=dt,
    )
    sampling = ml_collections.ConfigDict(
        dict(
            num_steps=w.num_steps,
            mask_schedule="cosine",
            temperature=1.0,
            temperature_final=0.5,
            choice_temperature=4.5,
            guidance_scale=w.guidance_scale,
            guidance_schedule="constant",
            negative_prompt="",
        )
    )
    rng = jax.random.PRNGKey(0)
    tokens = jnp.zeros((1, w.grid * w.grid), jnp.int32)
    ctx = jnp.zeros((1, w.text_length, w.text_dim), jnp.float32)
    mask = jnp.ones((1, w.text_length), jnp.int32)
    params = {
        "transformer": jax.jit(transformer.init)(rng, tokens, ctx, mask)["params"],
        "vq": jax.jit(vq.init)(rng, jnp.zeros((1, w.image_size, w.image_size, 3)))["params"],
    }
    return MuseSampler(transformer, None, vq, sampling), params


def run_ours(w: Workload, dtype: str, repeats: int) -> dict[str, Any]:
    sampler, params = build_ours(w, dtype)
    rs = np.random.default_rng(1)
    text = lambda: {
        "text_emb": jnp.asarray(rs.standard_normal((w.batch, w.text_length, w.text_dim)), dtype),
        "text_mask": jnp.ones((w.batch, w.text_length), jnp.int32),
    }
    cond, uncond = text(), text()
    init = sampler.masked(w.batch)
    key = jax.random.PRNGKey(0)
    tr = sampler.transformer

    loop = jax.jit(lambda p, c, u, k, t: sampler.tokens(p, c, u, k, t).tokens)
    vq = jax.jit(sampler.decode_pixels)
    t0 = time.perf_counter()
    loop_c = loop.lower(params, cond, uncond, key, init).compile()
    loop_compile = time.perf_counter() - t0
    tokens = loop_c(params, cond, uncond, key, init)
    t0 = time.perf_counter()
    vq_c = vq.lower(params, tokens).compile()
    vq_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    full_c = sampler._jitted.lower(params, cond, uncond, key, init, None).compile()
    full_compile = time.perf_counter() - t0

    # One guided transformer call at 2B rows: XLA counts a while loop's body once, so the
    # loop's FLOPs are steps x this (plus the once-per-prompt text projections, counted apart).
    kv_fn = jax.jit(lambda p, c: tr.apply({"params": p}, c, method=tr.encode_context))
    both = {k: jnp.concatenate([cond[k], uncond[k]]) for k in cond}
    kv = kv_fn(params["transformer"], both["text_emb"])
    call = jax.jit(lambda p, t, kv, m: tr.apply({"params": p}, t, kv, m, method=tr.logits)).lower(
        params["transformer"], jnp.concatenate([init, init]), kv, both["text_mask"]
    )
    call_flops = cost_flops(call.compile())
    ctx_flops = cost_flops(kv_fn.lower(params["transformer"], both["text_emb"]).compile())

    loop_s = _time(lambda: loop_c(params, cond, uncond, key, init).block_until_ready(), repeats)
    vq_s = _time(lambda: vq_c(params, tokens).block_until_ready(), repeats)
    full_s = _time(
        lambda: jax.block_until_ready(full_c(params, cond, uncond, key, init, None)), repeats
    )
    n_params = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    return dict(
        side="ours",
        dtype=dtype,
        loop_s=loop_s,
        vq_s=vq_s,
        total_s=full_s,
        loop_flops=w.num_steps * call_flops + ctx_flops,
        vq_flops=cost_flops(vq_c),
        compile_s=dict(loop=loop_compile, vq=vq_compile, sampler=full_compile),
        params_transformer=n_params(params["transformer"]),
        params_vq=n_params(params["vq"]),
    )


def run_peer(w: Workload, dtype: str, repeats: int) -> dict[str, Any]:
    import peer_amused  # noqa: PLC0415 (optional: torch + diffusers)

    shared = {f.name for f in dataclasses.fields(peer_amused.PeerSpec)} & set(vars(w))
    spec = peer_amused.PeerSpec(**{k: getattr(w, k) for k in shared})
    r = peer_amused.run_peer(spec, dtype=dtype, repeats=repeats)
    return {**r, "side": "peer", "dtype": dtype, "total_s": r["loop_s"] + r["vq_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Workload):
        if f.type in ("int", "float"):
            parser.add_argument(
                f"--{f.name}", type={"int": int, "float": float}[f.type], default=f.default
            )
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_peer", action="store_true")
    args = parser.parse_args()
    w = Workload(
        **{
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(Workload)
            if f.type in ("int", "float")
        }
    )
    dtypes = args.dtypes.split(",")
    peer = not args.no_peer
    if peer:
        import importlib.util

        if not all(importlib.util.find_spec(m) for m in ("torch", "diffusers")):
            print("peer skipped: torch/diffusers not installed (pip install -e '.[test,bench]')")
            peer = False

    print(f"workload: {w}")
    print(
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} (MUSE_JAX_ONEDNN=1 adds muse_jax's oneDNN flags); "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (muse_jax.host_memory)"
    )
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}")
    peaks = {("ours", d): matmul_peak(d) for d in dtypes}
    if peer:
        import peer_amused  # Hides the broken CUDA torchvision before diffusers is imported.
        import torch

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        peaks.update({("peer", d): peer_amused.matmul_peak(d) * 1e9 for d in dtypes})
    for (side, d), p in peaks.items():
        print(f"matmul peak {side:<5}{d:<9} 2048^3: {p / 1e9:7.1f} GFLOP/s")
    # One denominator per dtype for both sides: the best matmul rate seen on this machine.
    best = {d: max(p for (_, dd), p in peaks.items() if dd == d) for d in dtypes}

    rows = []
    for d in dtypes:
        rows.append(run_ours(w, d, args.repeats))
        if peer:
            rows.append(run_peer(w, d, args.repeats))
    b = w.batch
    print(
        f"\n{'side':<6}{'dtype':<10}{'loop s/img':>11}{'vq s/img':>10}{'total s/img':>12}"
        f"{'loop GFLOP':>11}{'vq GFLOP':>10}{'loop MFU':>9}{'loop s/TFLOP':>13}{'vq s/TFLOP':>11}"
    )
    for r in rows:
        mfu = r["loop_flops"] / r["loop_s"] / best[r["dtype"]]
        print(
            f"{r['side']:<6}{r['dtype']:<10}{r['loop_s'] / b:>11.3f}{r['vq_s'] / b:>10.3f}"
            f"{r['total_s'] / b:>12.3f}{r['loop_flops'] / 1e9:>11.1f}{r['vq_flops'] / 1e9:>10.1f}"
            f"{mfu:>9.0%}{r['loop_s'] / (r['loop_flops'] / 1e12):>13.2f}"
            f"{r['vq_s'] / (r['vq_flops'] / 1e12):>11.2f}"
        )
        if r["side"] == "ours":
            c = r["compile_s"]
            print(
                f"      compile: loop {c['loop']:.1f}s, vq {c['vq']:.1f}s, whole sampler "
                f"{c['sampler']:.1f}s; params transformer {r['params_transformer']:,} "
                f"vq {r['params_vq']:,}"
            )
        else:
            print(
                f"      params transformer {r['params_transformer']:,} vq {r['params_vq']:,}; "
                f"torch threads {r.get('threads')}"
            )
    by = {(r["side"], r["dtype"]): r for r in rows}
    if peer:
        print("\nspeed-up of ours over the peer (>1: ours faster), same run:")
        for mine in dtypes:
            for theirs in dtypes:
                o, p = by[("ours", mine)], by[("peer", theirs)]
                print(
                    f"  ours {mine:<9} vs peer {theirs:<9} decoding loop "
                    f"{p['loop_s'] / o['loop_s']:5.2f}x   per TFLOP "
                    f"{(p['loop_s'] / p['loop_flops']) / (o['loop_s'] / o['loop_flops']):5.2f}x   "
                    f"whole sampler {p['total_s'] / o['total_s']:5.2f}x   VQ per TFLOP "
                    f"{(p['vq_s'] / p['vq_flops']) / (o['vq_s'] / o['vq_flops']):5.2f}x"
                )


if __name__ == "__main__":
    main()
