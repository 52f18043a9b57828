r"""Binary: precomputes text embeddings of a dataset's captions (and of prompts) once.

  python -m muse_jax.embed --config=configs/shapes_tiny.py --workdir=runs/t5 \
      --config.text_encoder.name=t5 --config.text_encoder.preset=xxl \
      --config.text_encoder.checkpoint=/ckpt/t5_xxl --config.data.vocabulary=/ckpt/spiece.model \
      --output_dir=runs/t5/text_emb [--prompts_file=prompts.txt] [--dtype=bfloat16]

Every distinct caption of the given splits, the config's evaluation prompts, the empty prompt
(the unconditional branch) and the lines of `--prompts_file` are encoded once with the config's
frozen text encoder and appended, `--chunk_size` at a time, to a caption-keyed table of bf16
tensorstore arrays (`muse_jax/text/embeddings.py`; local or gs://). Rerunning skips what is
already there: an interrupted run resumes after its last chunk, and new prompts are appended.
Train on it with `--config.text_embeddings=<output_dir>`; the trainer reads only the rows
of each batch.
"""

from __future__ import annotations

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
_CHUNK = flags.DEFINE_integer("chunk_size", 1024, "Captions per append (the unit of resumption).")
_INDEX_EVERY = flags.DEFINE_integer(
    "index_every", 1 << 20, "Captions between index merges (readers see them after a merge)."
)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Stored precision.")


def main(argv):
    cli.check_no_extra_args(argv)
    config, workdir = _CONFIG.value, _WORKDIR.value
    cli.check_reachable(workdir, _OUT.value)
    from muse_jax.text import precompute

    captions = precompute.collect_captions(config, workdir, _SPLITS.value, _PROMPTS.value)
    added = precompute.embed(
        config,
        workdir,
        _OUT.value,
        captions,
        batch_size=_BATCH.value,
        chunk_size=_CHUNK.value,
        dtype=_DTYPE.value,
        index_every=_INDEX_EVERY.value,
    )
    print(f"[embed] {len(captions)} distinct captions; {added} newly embedded into {_OUT.value}")
    return 0


def run():
    flags.mark_flags_as_required(["config", "workdir", "output_dir"])
    cli.run(main)


if __name__ == "__main__":
    run()
