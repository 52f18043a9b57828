r"""Measures the tokenizer's ceiling: PSNR and alignment score of reconstructions of test images.

The base transformer can only generate what the tokenizer can draw, so the alignment checker
on reconstructions is the best score sampling can reach.

  python benchmarks/tokenizer_ceiling.py --config=configs/shapes_tiny.py --workdir=runs/shapes
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory.")
_NUM = flags.DEFINE_integer("num_images", 1000, "Test images to reconstruct.")


def main(_):
    from muse_jax import parallel
    from muse_jax.data import shapes_alignment as alignment
    from muse_jax.data import tasks
    from muse_jax.models import factory
    from muse_jax.train import base_stage, summaries

    config = _CONFIG.value
    mesh, rules = parallel.create_mesh(config), parallel.rules(config)
    params, step = base_stage.load_tokenizer_params(config, _WORKDIR.value, mesh, rules)
    model = factory.tokenizer(config)
    recon_fn = jax.jit(lambda p, x: model.apply({"params": p}, x)[:2])
    it = tasks.batches(
        config,
        _WORKDIR.value,
        split="test",
        batch_size=100,
        seed=0,
        shuffle=False,
        repeat=False,
        keep_captions=True,
    )
    originals, recons, captions, codes = [], [], [], set()
    for batch in it:
        r, ids = recon_fn(params, batch["image"])
        originals.append(summaries.to_uint8(batch["image"]))
        recons.append(summaries.to_uint8(np.asarray(r)))
        captions += [c.decode() for c in batch["caption"]]
        codes |= set(np.asarray(ids).ravel().tolist())
        if len(captions) >= _NUM.value:
            break
    x, r = np.concatenate(originals), np.concatenate(recons)
    mse = np.mean((x.astype(np.float64) - r) ** 2)
    print(
        f"tokenizer step {step}: PSNR {10 * np.log10(255**2 / mse):.2f} dB on {len(x)} test images, "
        f"{len(codes)}/{config.tokenizer.model.codebook_size} codes used"
    )
    for name, images in (("originals", x), ("reconstructions", r)):
        s = alignment.score(images, captions)
        print(f"alignment of {name}: " + " ".join(f"{k}={v:.3f}" for k, v in s.items() if k != "n"))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
