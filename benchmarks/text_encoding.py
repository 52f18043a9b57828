r"""Text-encoding throughput of the T5 v1.1 encoder presets that fit here, extrapolated to XXL.

Random weights (throughput does not depend on their values), batch of `--batch` captions of
`--length` tokens, float32 or bfloat16 compute. Prints captions/s after compilation, XLA's FLOP
count per caption, the achieved GFLOP/s, and the XXL time per 1k captions extrapolated by FLOPs
at the same achieved rate, plus XXL's weight memory.

  python benchmarks/text_encoding.py --presets=small,base --length=64 --batch=32
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from muse_jax.models import t5  # noqa: E402


def flops_per_call(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", float("nan")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="small,base")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    ids = jnp.asarray(
        np.random.default_rng(0).integers(2, 32000, (args.batch, args.length)), jnp.int32
    )
    mask = jnp.ones_like(ids)
    rates = {}
    print(
        f"device: {jax.devices()[0].device_kind}, batch {args.batch}, length {args.length}, {args.dtype}"
    )
    for name in args.presets.split(","):
        config = t5.get_config(name, dtype=args.dtype)
        model = t5.T5Encoder(config)
        params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), ids, mask))
        fn = jax.jit(model.apply)
        flops = flops_per_call(model.apply, params, ids, mask)
        fn(params, ids, mask).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            fn(params, ids, mask).block_until_ready()
        dt = (time.perf_counter() - t0) / args.repeats
        rate = args.batch / dt
        rates[name] = (rate, flops / args.batch, flops / dt)
        print(
            f"{name:<6} {t5.param_count(config) / 1e6:8.1f}M params  {rate:8.1f} captions/s  "
            f"{flops / args.batch / 1e9:7.2f} GFLOP/caption  {flops / dt / 1e9:6.1f} GFLOP/s"
        )
    xxl = t5.get_config("xxl")
    # FLOPs per token scale with the non-embedding parameters (2 FLOPs per weight per token).
    name, (rate, fpc, achieved) = max(rates.items(), key=lambda kv: kv[1][1])
    scale = (t5.param_count(xxl) - xxl.vocab_size * xxl.d_model) / (
        t5.param_count(t5.get_config(name))
        - t5.get_config(name).vocab_size * t5.get_config(name).d_model
    )
    xxl_fpc = fpc * scale
    print(
        f"xxl    {t5.param_count(xxl) / 1e9:.2f}B params, weights {t5.param_count(xxl) * 2 / 2**30:.1f} GiB in "
        f"bf16; ~{xxl_fpc / 1e9:.0f} GFLOP/caption; at {name}'s {achieved / 1e9:.0f} GFLOP/s: "
        f"{1000 * xxl_fpc / achieved / 60:.1f} min per 1k captions on this machine"
    )


if __name__ == "__main__":
    main()
