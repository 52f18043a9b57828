r"""Dense-layer gradients: jax's own `dot_general` vs `muse_jax.models.dense_dot`'s.

Gradient of a Dense layer (input and kernel) at the shapes of the peer-size base transformer's
projections and MLP in a train step (8192 tokens, width 256, MLP 1024), best of `--repeats`
after compilation. `--inputs=plain` differentiates at a plain input array; `gelu` at a GELU's
output (x = gelu(a), differentiated through a), as the MLP's output projection sees it: there XLA
fuses the GELU into whatever transposes x, which is why `dense_dot` transposes the cotangent.

  python benchmarks/dense_dot.py
  python benchmarks/dense_dot.py --tokens=2048 --dtype=bfloat16
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

from muse_jax.models import activations, dense_dot, layers  # noqa: E402

_DENSE = (((1,), (0,)), ((), ()))


def _grad_seconds(dot, x, w, g, repeats: int, gelu: bool) -> float:
    act = activations.gelu if gelu else (lambda v: v)
    grads = jax.jit(jax.grad(lambda x, w, g: jnp.vdot(dot(act(x), w, _DENSE), g), (0, 1)))
    return min(wall_times(lambda: grads(x, w, g), repeats))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--shapes", default="256x256,256x1024,1024x256", help="in x out, ...")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--inputs", default="plain,gelu", help="plain and/or gelu (see above)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    dtype = layers.get_dtype(args.dtype)
    print(
        f"device: {jax.devices()[0].platform} x{jax.device_count()}, {args.dtype}, "
        f"{args.tokens} tokens, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
    )
    print(
        f"{'input':>6} {'in x out':>10} {'jax ms':>8} {'dense_dot ms':>13} {'speed-up':>9} "
        f"{'GFLOP':>6}"
    )
    rng = np.random.default_rng(0)
    for kind, spec in ((i, s) for i in args.inputs.split(",") for s in args.shapes.split(",")):
        k, n = (int(v) for v in spec.split("x"))
        x = jnp.asarray(rng.standard_normal((args.tokens, k)), dtype)
        w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
        g = jnp.asarray(rng.standard_normal((args.tokens, n)), dtype)
        times = {
            name: _grad_seconds(dot, x, w, g, args.repeats, kind == "gelu")
            for name, dot in (
                ("jax", dense_dot.dot_general(dtype, transposed_weight_grad=False)),
                ("dense_dot", dense_dot.dot_general(dtype)),
            )
        }
        gflop = 2 * 2 * args.tokens * k * n / 1e9
        print(
            f"{kind:>6} {spec:>10} {times['jax'] * 1e3:8.2f} {times['dense_dot'] * 1e3:13.2f} "
            f"{times['jax'] / times['dense_dot']:8.2f}x {gflop:6.1f}"
        )


if __name__ == "__main__":
    main()
