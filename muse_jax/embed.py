r"""Binary: precomputes text embeddings of a dataset's captions (and of prompts) once.

  python -m muse_jax.embed --config=configs/shapes_tiny.py --workdir=runs/t5 \
      --config.base.text_encoder.name=t5 --config.base.text_encoder.preset=xxl \
      --config.base.text_encoder.checkpoint=/ckpt/t5_xxl --config.data.vocabulary=/ckpt/spiece.model \
      --output_dir=runs/t5/text_emb [--prompts_file=prompts.txt] [--dtype=bfloat16]

Every distinct caption of the given splits, the config's evaluation prompts, the empty prompt
(the unconditional branch) and the lines of `--prompts_file` are encoded once with the config's
frozen text encoder and written as a caption-keyed table of chunks. Rerunning skips what is
already there: an interrupted run resumes, and new prompts are appended. Train on it with
`--config.base.text_embeddings=<output_dir>`.
"""

from __future__ import annotations

import os
import time

from absl import flags
from ml_collections import config_flags

from muse_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory (for the dataset cache).")
_OUT = flags.DEFINE_string("output_dir", None, "Directory of the embedding table.")
_SPLITS = flags.DEFINE_list(
    "splits", ["train", "test"], "Dataset splits whose captions are embedded."
)
_PROMPTS = flags.DEFINE_string("prompts_file", None, "Optional text file, one prompt per line.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Captions per encoder call.")
_CHUNK = flags.DEFINE_integer("chunk_size", 1024, "Captions per file (the unit of resumption).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Stored precision.")


def collect_captions(config, workdir: str, splits, prompts_file: str | None) -> list[str]:
    """Distinct captions in a deterministic order: "", eval prompts, prompts file, dataset splits."""
    from muse_jax.data import tasks

    captions = ["", *config.eval.seen_prompts, *config.eval.held_out_prompts]
    if prompts_file:
        if not os.path.exists(prompts_file):
            raise FileNotFoundError(f"--prompts_file {prompts_file} does not exist.")
        with open(prompts_file, encoding="utf-8") as f:
            captions += [line.strip() for line in f if line.strip()]
    for split in splits:
        it = tasks.batches(
            config,
            workdir,
            split=split,
            batch_size=1024,
            seed=0,
            shuffle=False,
            repeat=False,
            keep_captions=True,
        )
        for batch in it:
            captions += [c.decode("utf-8") for c in batch["caption"]]
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
    from muse_jax.text.conditioning import TextConditioner, encode_ids
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
    vocab = TextConditioner(stage_config, workdir).vocab

    done = set()
    chunks = embeddings.completed_chunks(output_dir) if os.path.isdir(output_dir) else []
    if chunks:
        done = set(embeddings.EmbeddingTable(output_dir).row)
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


def main(argv):
    cli.check_no_extra_args(argv)
    config, workdir = _CONFIG.value, _WORKDIR.value
    captions = collect_captions(config, workdir, _SPLITS.value, _PROMPTS.value)
    added = embed(
        config,
        workdir,
        _OUT.value,
        captions,
        batch_size=_BATCH.value,
        chunk_size=_CHUNK.value,
        dtype=_DTYPE.value,
    )
    print(f"[embed] {len(captions)} distinct captions; {added} newly embedded into {_OUT.value}")
    return 0


def run():
    flags.mark_flags_as_required(["config", "workdir", "output_dir"])
    cli.run(main)


if __name__ == "__main__":
    run()
