r"""Attention kernels: `jax.nn.dot_product_attention` (XLA) vs muse_jax's heads-major version.

Forward and forward + backward, best of `--repeats` after compilation, at the shapes of the
models' attention (defaults: the peer-size base transformer's self-attention in a train step,
batch 32, 256 tokens, 4 heads of 64; `--keys=16 --mask` is its cross-attention to padded text).

  python benchmarks/attention.py
  python benchmarks/attention.py --batch=8 --keys=16 --mask
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from muse_jax import entry  # noqa: E402

if __name__ == "__main__":
    entry.prepare_process()  # Before jax starts: huge pages, MUSE_JAX_ONEDNN's flags.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from train_steps import wall_times  # noqa: E402

from muse_jax.models import attention  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=256, help="queries")
    parser.add_argument("--keys", type=int, default=0, help="keys (0: = length)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--mask", action="store_true", help="a key-padding mask [B, 1, 1, S]")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    b, t, n, h = args.batch, args.length, args.heads, args.head_dim
    s = args.keys or t
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    q, w = (jnp.asarray(rng.standard_normal((b, t, n, h)), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, s, n, h)), dtype) for _ in range(2))
    mask = None
    if args.mask:
        m = rng.uniform(size=(b, 1, 1, s)) < 0.7
        m[..., 0] = True
        mask = jnp.asarray(m)
    flops = 4 * b * n * t * s * h  # Two matmuls forward; the backward does twice that.
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; q [{b},{t},{n},{h}], "
        f"keys {s}, mask {args.mask}, {args.dtype}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
    )
    results = {}
    for impl in ("xla", "heads_major"):
        f = lambda q, k, v: attention.dot_product_attention(q, k, v, mask, impl)  # noqa: B023
        fwd = jax.jit(f)
        loss = lambda q, k, v: jnp.sum((f(q, k, v) * w).astype(jnp.float32))  # noqa: B023
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        tf = min(wall_times(lambda: fwd(q, k, v), args.repeats))  # noqa: B023
        tb = min(wall_times(lambda: grad(q, k, v), args.repeats))  # noqa: B023
        results[impl] = (tf, tb)
        print(
            f"{impl:<12} fwd {tf * 1e3:8.2f} ms {flops / tf / 1e9:6.0f} GFLOP/s   "
            f"fwd+bwd {tb * 1e3:8.2f} ms {3 * flops / tb / 1e9:6.0f} GFLOP/s"
        )
    (xf, xb), (hf, hb) = results["xla"], results["heads_major"]
    print(f"heads_major vs xla: forward {xf / hf:.2f}x, forward+backward {xb / hb:.2f}x faster")


if __name__ == "__main__":
    main()
