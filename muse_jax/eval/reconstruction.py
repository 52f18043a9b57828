"""Reconstruction PSNR of the high-res tokenizer's plain decoder vs the fine-tuned one.

Both decode the same frozen tokens of the held-out split, so the difference is the decoder's
alone.
"""

from __future__ import annotations

import jax
import numpy as np

from muse_jax.train import losses


def decoder_psnr(config, workdir: str, max_images: int = 1000, batch_size: int = 250) -> dict:
    """{'plain_db', 'finetuned_db', 'num_images', 'decoder_step'} on the test split."""
    from muse_jax import checkpoints, parallel
    from muse_jax.data import tasks
    from muse_jax.train.decoder_stage import DecoderStage

    mesh, axis_rules = parallel.create_mesh(config), parallel.rules(config)
    dec = DecoderStage(config, workdir)
    frozen = dec.frozen(mesh, axis_rules)
    abstract, _ = parallel.abstract_state(dec.init, jax.random.PRNGKey(0), mesh, axis_rules)
    trained, step = checkpoints.load_params(dec.stage_dir, abstract.params, "decoder")
    tuned_params = dec.finetuned_params(trained, frozen)
    sq = {"plain": 0.0, "finetuned": 0.0}
    n = 0
    for batch in tasks.batches(
        config,
        workdir,
        split="test",
        batch_size=batch_size,
        seed=0,
        shuffle=False,
        repeat=False,
        images=("image_hr",),
    ):
        x = batch["image_hr"][: max_images - n]
        for name, model, params in (
            ("plain", dec.plain, frozen["plain"]),
            ("finetuned", dec.model, tuned_params),
        ):
            recon = np.clip(np.asarray(dec.reconstruct(model, params, x)), -1, 1)
            sq[name] += float(np.sum(np.mean((recon - x) ** 2, axis=(1, 2, 3))))
        n += len(x)
        if n >= max_images:
            break
    return {
        "plain_db": float(losses.psnr(sq["plain"] / n)),
        "finetuned_db": float(losses.psnr(sq["finetuned"] / n)),
        "num_images": n,
        "decoder_step": step,
    }
