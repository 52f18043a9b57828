r"""CLIP-score throughput: wall time per 1k images and per 1k captions for CLIP towers.

Random weights at the real shape (throughput does not depend on their values; nothing is
downloaded): `--preset=vit-l-14` is openai/clip-vit-large-patch14 (vision 1024 wide, 24 layers,
16 heads, patch 14, 224 px; text 768 wide, 12 layers; projection 768). Times a small batch after
compilation and extrapolates linearly; also times the host preprocessing (Pillow resize, crop,
normalise) of 256 px and 512 px images, and prints the load average, since the figure on a shared
machine depends on it.

  python benchmarks/clip_throughput.py --preset=vit-l-14 --image_batch=4 --text_batch=32

`--compare_resize` prints how far `jax.image.resize(..., "bicubic")` lands from the Pillow resize
that CLIPImageProcessor (and `muse_jax.eval.clip.preprocess`) use.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from muse_jax.eval import clip  # noqa: E402
from muse_jax.text import clip_model  # noqa: E402


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} (1/5/15 min), {os.cpu_count()} cores"


def timed(fn, *args, repeats: int) -> tuple[float, float]:
    """(seconds per call after compilation, XLA's FLOP count per call)."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    jax.block_until_ready(compiled(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(compiled(*args))
    return (time.perf_counter() - t0) / repeats, float(cost.get("flops", float("nan")))


def compare_resize(size: int = 224) -> None:
    """Pillow (the reference) vs jax.image.resize bicubic with antialiasing, in uint8 levels."""
    rng = np.random.default_rng(0)
    for h, w in ((256, 256), (512, 512), (480, 640)):
        # Natural-ish content: smooth gradients plus texture, not pure noise.
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(7 * xx + c) * np.cos(5 * yy - c) for c in range(3)], -1)
        image = np.clip(127.5 * (1 + base) + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        ref = clip.resize_shortest_side(image, size).astype(np.float32)
        out = jax.image.resize(
            jnp.asarray(image, jnp.float32), ref.shape, method="bicubic", antialias=True
        )
        out = np.clip(np.round(np.asarray(out)), 0, 255)
        diff = np.abs(out - ref)
        print(
            f"resize {h}x{w} -> {ref.shape[0]}x{ref.shape[1]}: jax.image.resize vs Pillow "
            f"max {diff.max():.0f}, mean {diff.mean():.2f} uint8 levels, "
            f"{100 * (diff > 0).mean():.0f}% of values differ"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="vit-l-14")
    parser.add_argument("--image_batch", type=int, default=4)
    parser.add_argument("--text_batch", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compare_resize", action="store_true")
    args = parser.parse_args()

    if args.compare_resize:
        compare_resize()
    config = clip_model.get_config(args.preset, dtype=args.dtype)
    print(f"device: {jax.devices()[0].device_kind}, preset {args.preset}, {args.dtype}")
    print(f"before: {load()}")
    t0 = time.perf_counter()
    params = clip_model.init_params(config, jax.random.key(0))
    count = sum(x.size for x in jax.tree.leaves(params))
    print(f"{count / 1e6:.1f}M parameters, random init {time.perf_counter() - t0:.1f}s")
    model = clip_model.CLIP(config)

    v = config.vision
    pixels = jnp.asarray(
        np.random.default_rng(0).normal(size=(args.image_batch, v.image_size, v.image_size, 3)),
        jnp.float32,
    )
    image_fn = lambda p, x: model.apply({"params": p}, x, method=clip_model.CLIP.encode_image)
    dt, flops = timed(image_fn, params, pixels, repeats=args.repeats)
    per_image = dt / args.image_batch
    print(
        f"images:   {1 / per_image:7.2f} images/s, {1000 * per_image:7.0f} s per 1k images "
        f"({1000 * per_image / 60:.1f} min), {flops / args.image_batch / 1e9:.0f} GFLOP/image, "
        f"{flops / dt / 1e9:.0f} GFLOP/s (batch {args.image_batch})"
    )

    ids = np.random.default_rng(0).integers(0, config.text.vocab_size - 2, (args.text_batch, 77))
    ids[:, -1] = config.text.eos_token_id
    text_fn = lambda p, x: model.apply({"params": p}, x, method=clip_model.CLIP.encode_text)
    dt, flops = timed(text_fn, params, jnp.asarray(ids, jnp.int32), repeats=args.repeats)
    per_caption = dt / args.text_batch
    print(
        f"captions: {1 / per_caption:7.2f} captions/s, {1000 * per_caption:7.1f} s per 1k captions, "
        f"{flops / args.text_batch / 1e9:.1f} GFLOP/caption (batch {args.text_batch}, 77 tokens)"
    )

    for side in (256, 512):
        image = np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)
        t0 = time.perf_counter()
        for _ in range(20):
            clip.preprocess(image, v.image_size)
        per = (time.perf_counter() - t0) / 20
        print(f"preprocess {side}px: {1000 * per:.2f} ms/image, {per * 1000:.1f} s per 1k images")
    print(f"after:  {load()}")


if __name__ == "__main__":
    main()
