"""Reconstruction PSNR of the high-res tokenizer's plain decoder vs the fine-tuned one.

Both decode the same frozen tokens of the held-out split, so the difference is the decoder's
alone.
"""

from __future__ import annotations

import jax
import numpy as np


def psnr(mse_pm1: float) -> float:
    """PSNR in dB from the MSE of images in [-1, 1] (peak-to-peak 2)."""
    return float(10.0 * np.log10(4.0 / max(mse_pm1, 1e-10)))


def decoder_psnr(
    config, workdir: str, max_images: int = 1000, batch_size: int = 250
) -> dict | None:
    """{'plain_db', 'finetuned_db', 'num_images', 'decoder_step'} on the test split (None when
    the data has no test split)."""
    from muse_jax.data import tasks

    if not tasks.has_split(config, workdir, "test"):
        return None
    from muse_jax.inference import modules as modules_lib
    from muse_jax.inference.model import WorkdirReader, read_stage
    from muse_jax.models import factory

    mods = modules_lib.Modules(
        tokenizer=None,
        base=None,
        text_encoder=None,
        text_trainable=False,
        superres_tokenizer=factory.superres_tokenizer(config),
        finetuned_decoder=factory.finetuned_decoder_vqgan(config),
    )
    reader = WorkdirReader(config, workdir)
    plain, _ = read_stage(config, reader, mods, "superres_tokenizer")
    decoder, step = read_stage(config, reader, mods, "decoder")
    tuned = {
        "encoder": plain["vq"]["encoder"],
        "quantizer": plain["vq"]["quantizer"],
        "decoder": decoder["decoder"],
    }
    reconstruct = jax.jit(lambda m, p, x: m.apply({"params": p}, x)[0], static_argnums=0)
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
            ("plain", mods.superres_tokenizer, plain["vq"]),
            ("finetuned", mods.finetuned_decoder, tuned),
        ):
            recon = np.clip(np.asarray(reconstruct(model, params, x)), -1, 1)
            sq[name] += float(np.sum(np.mean((recon - x) ** 2, axis=(1, 2, 3))))
        n += len(x)
        if n >= max_images:
            break
    return {
        "plain_db": psnr(sq["plain"] / n),
        "finetuned_db": psnr(sq["finetuned"] / n),
        "num_images": n,
        "decoder_step": step,
    }
