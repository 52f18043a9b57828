r"""FID feature-extraction throughput: images/s and seconds per 1k images on this machine.

Random weights (throughput does not depend on their values) are written to a temporary
.safetensors and read back through `fid.FeatureExtractor`, the path an evaluation takes; no
download, no torch. Images are random uint8 at `--size` (resized to 299 inside the network).
Reports compile time, then the steady rate over `--batches` batches, XLA's FLOP count per image
and the machine's load average (other jobs on a shared machine make the rate a lower bound).

  python benchmarks/fid_throughput.py --batch=50 --size=256 --batches=4
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from muse_jax.eval import fid, inception  # noqa: E402


def random_weights(path: str) -> None:
    model = inception.InceptionV3()
    x = jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3), jnp.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    save_file(inception.state_dict_from_variables(variables), path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--size", type=int, default=256, help="Input image side before resize.")
    parser.add_argument("--batches", type=int, default=4, help="Timed batches after compiling.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inception_random.safetensors")
        random_weights(path)
        extractor = fid.FeatureExtractor(
            path, batch_size=args.batch, dtype=getattr(jnp, args.dtype), log_every=0
        )
    images = np.random.default_rng(0).integers(
        0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8
    )
    cost = extractor._apply.lower(extractor.variables, images).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    gflop = float(cost.get("flops", float("nan"))) / args.batch / 1e9

    start = time.perf_counter()
    extractor(images)  # Compiles.
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    extractor(iter([images] * args.batches))
    wall = time.perf_counter() - start
    n = args.batch * args.batches
    rate = n / wall
    load = os.getloadavg()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs")
    print(f"dtype {args.dtype}, batch {args.batch}, input {args.size}x{args.size} -> 299x299")
    print(f"first batch (compile + run): {compile_s:.1f} s")
    print(f"{n} images in {wall:.1f} s: {rate:.2f} images/s, {1000 / rate:.0f} s per 1k images")
    print(f"XLA: {gflop:.2f} GFLOP/image, {gflop * rate:.1f} GFLOP/s achieved")
    print(f"load average (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
