"""Precomputing frozen-text-encoder embeddings of a dataset's captions (`muse_jax.embed`)."""

from __future__ import annotations

import os
import time


def collect_captions(config, workdir: str, splits, prompts_file: str | None) -> list[str]:
    """Distinct captions in a deterministic order: "", eval prompts, prompts file, dataset splits."""
    from muse_jax.data import tasks

    captions = ["", *config.eval.seen_prompts, *config.eval.held_out_prompts]
    if prompts_file:
        if not os.path.exists(prompts_file):
            raise FileNotFoundError(f"--prompts_file {prompts_file} does not exist.")
        with open(prompts_file, encoding="utf-8") as f:
            captions += [line.strip() for line in f if line.strip()]
    for split in splits:  # Every caption of every image (COCO has 5; training draws any).
        captions += tasks.all_captions(config, workdir, split)
    return list(dict.fromkeys(captions))


def embed(
    config,
    workdir: str,
    output_dir: str,
    captions: list[str],
    *,
    batch_size: int,
    chunk_size: int,
    dtype: str,
) -> int:
    """Encodes the captions not yet in the table at `output_dir`; returns how many it added."""
    import jax
    import numpy as np

    from muse_jax import parallel
    from muse_jax.text import embeddings
    from muse_jax.text.conditioning import encode_ids
    from muse_jax.train.base_stage import BaseStage

    stage_config = config.copy_and_resolve_references()
    stage_config.base.text_embeddings = ""  # Build the in-graph encoder of this config.
    base = BaseStage(stage_config, workdir)
    if base.text_encoder is None:
        raise ValueError("The config has no text encoder to embed with.")
    mesh, rules = parallel.create_mesh(config), parallel.rules(config)
    if base.text_trainable:
        raise ValueError(
            "config.base.text_encoder is trainable; precomputing needs a frozen encoder "
            "(e.g. --config.base.text_encoder.name=t5 --config.base.text_encoder.trainable=False)."
        )
    frozen_text = base.frozen_text_encoder(mesh, rules)
    encode = jax.jit(lambda p, ids, mask: base.text_encoder.apply({"params": p}, ids, mask))
    vocab = base.conditioner.vocab

    done = set()
    chunks = embeddings.completed_chunks(output_dir) if os.path.isdir(output_dir) else []
    if chunks:
        done = embeddings.embedded_captions(output_dir)
    todo = [c for c in captions if c not in done]
    next_chunk = (chunks[-1] + 1) if chunks else 0
    length = config.data.text_length
    t0, written = time.time(), 0
    for start in range(0, len(todo), chunk_size):
        part = todo[start : start + chunk_size]
        ids, mask = encode_ids(vocab, part, length)
        outs = []
        for b in range(0, len(part), batch_size):
            n = len(part[b : b + batch_size])
            # Pad the last batch: one shape, one compilation.
            batch_ids = np.pad(ids[b : b + n], [(0, batch_size - n), (0, 0)])
            batch_mask = np.pad(mask[b : b + n], [(0, batch_size - n), (0, 0)])
            outs.append(np.asarray(encode(frozen_text, batch_ids, batch_mask))[:n])
        emb = np.concatenate(outs)
        embeddings.write_chunk(output_dir, next_chunk, part, emb, mask, dtype)
        embeddings.write_meta(
            output_dir,
            {
                "dim": int(emb.shape[-1]),
                "text_length": length,
                "dtype": dtype,
                "encoder": config.base.text_encoder.to_dict(),
            },
        )
        next_chunk += 1
        written += len(part)
        rate = written / max(time.time() - t0, 1e-9)
        eta = (len(todo) - written) / max(rate, 1e-9)
        print(
            f"[embed] {written}/{len(todo)} new captions, {rate:.1f} captions/s, ETA {eta:.0f}s",
            flush=True,
        )
    return written
