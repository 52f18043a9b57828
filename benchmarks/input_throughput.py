r"""Input-pipeline throughput on users' data: examples/s at 256x256, as training reads them.

Writes a synthetic image folder (`--num_images` photo-like JPEGs of ~500x375 with captions) into
a temporary directory, builds it with the image_folder TFDS builder, then reads it through
`tasks.batches` exactly as the training stages do (JPEG decode of the crop window, random crop,
resize to `--image_size`, byte tokenisation, padding, batching, [-1, 1] floats) and prints
examples/s after `--warmup` batches. Also prints the machine load: other jobs share the cores.

  python benchmarks/input_throughput.py --num_images=2000 --batch_size=64 --image_size=256
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

_WORDS = "a an the red blue green small large dog cat car tree house on in near of with".split()


def _photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields plus texture: decodes and compresses like a photo (~40-80 KB)."""
    coarse = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 10, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def write_folder(root: str, num: int, seed: int = 0) -> int:
    """`num` JPEGs (500x375 or 375x500, some other sizes) + captions.csv; returns total bytes."""
    rng = np.random.default_rng(seed)
    total, rows = 0, ["file,caption"]
    for i in range(num):
        w, h = [(500, 375), (375, 500), (640, 427), (500, 333)][i % 4]
        name = f"{i:06d}.jpg"
        _photo(rng, w, h).save(os.path.join(root, name), "JPEG", quality=90)
        total += os.path.getsize(os.path.join(root, name))
        words = rng.choice(_WORDS, size=int(rng.integers(6, 14)))
        rows.append(f"{name},{' '.join(words)}")
    with open(os.path.join(root, "captions.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5, help="Batches before timing.")
    parser.add_argument("--batches", type=int, default=40, help="Timed batches.")
    parser.add_argument("--workdir", default="", help="Reuse a folder (default: a temp dir).")
    args = parser.parse_args()

    from configs import user_data
    from muse_jax.data import tasks

    workdir = args.workdir or tempfile.mkdtemp(prefix="input_throughput_")
    source = os.path.join(workdir, "images")
    if not os.path.exists(os.path.join(source, "captions.csv")):
        os.makedirs(source, exist_ok=True)
        t0 = time.time()
        size = write_folder(source, args.num_images)
        print(
            f"wrote {args.num_images} JPEGs ({size / args.num_images / 1e3:.0f} KB each) "
            f"in {time.time() - t0:.1f}s to {source}"
        )

    config = user_data.get_config()
    config.data.update(
        dict(
            dataset="image_folder",
            source_dir=source,
            image_size=args.image_size,
            hr_image_size=0,
            test_fraction=0.01,
        )
    )
    t0 = time.time()
    it = tasks.batches(config, workdir, split="train", batch_size=args.batch_size, seed=0)
    batch = next(it)
    print(f"build + first batch: {time.time() - t0:.1f}s; image batch {batch['image'].shape}")
    for _ in range(args.warmup):
        next(it)
    t0 = time.time()
    for _ in range(args.batches):
        next(it)
    elapsed = time.time() - t0
    rate = args.batches * args.batch_size / elapsed
    load = os.getloadavg()
    print(
        f"{rate:.0f} examples/s at {args.image_size}x{args.image_size} "
        f"({args.batches} batches of {args.batch_size}, {os.cpu_count()} CPU cores, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})"
    )


if __name__ == "__main__":
    main()
