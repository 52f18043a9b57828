r"""Binary: converts published weights into a model directory that muse_jax samples and trains.

  python -m muse_jax.convert --from=diffusers path/to/amused-256 --out=models/amused-256

`--from=diffusers`: a diffusers aMUSEd directory (`AmusedPipeline`: vqvae, transformer,
text_encoder, tokenizer; safetensors only, no pickle, no torch) becomes the directory
`MusePipeline.from_pretrained` and `python -m muse_jax.sample --model=...` read, in the format of
`python -m muse_jax.export`. A source that is not such a directory, a config that does not
match its tensors, or a damaged safetensors file is one line naming the file and the problem,
exit 2, and nothing is written. `--out` must not hold a model already, unless `--overwrite`.

(MaskGIT's VQGAN tokenizer is read in place instead: `--config.tokenizer.init_from=maskgit:PATH`.)
"""

from __future__ import annotations

from absl import flags

from muse_jax import cli, storage

_FROM = flags.DEFINE_enum("from", "diffusers", ["diffusers"], "Format of the source.")
_SRC = flags.DEFINE_string("src", None, "Source directory (or give it as the one argument).")
_OUT = flags.DEFINE_string("out", None, "Model directory to write (local or gs://).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing model in --out.")


def main(argv):
    if len(argv) > 2 or (len(argv) == 2 and _SRC.value):
        raise cli.UsageError("Give one source directory: SRC or --src=SRC.")
    src = argv[1] if len(argv) == 2 else _SRC.value
    if not src:
        raise cli.UsageError("No source: python -m muse_jax.convert --from=diffusers SRC --out=DIR")
    out = _OUT.value
    cli.check_reachable(src, out)
    if storage.exists(storage.join(out, "config.json")) and not _OVERWRITE.value:
        raise cli.UsageError(f"{out} already holds a model; pass --overwrite to replace it.")
    from muse_jax.convert import amused
    from muse_jax.convert.tensors import ConversionError

    try:
        manifest = amused.convert(src, out)
    except ConversionError as e:
        raise cli.UsageError(str(e)) from None
    total = sum(c["bytes"] for c in manifest["components"].values())
    size = manifest["config"]["data"]["image_size"]
    print(f"converted {src} ({size}x{size} aMUSEd) to {out}: {total / 1e6:.1f} MB of weights")
    return 0


def run():
    flags.mark_flags_as_required(["out"])
    cli.run(main)


if __name__ == "__main__":
    run()
