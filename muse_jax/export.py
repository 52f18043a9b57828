r"""Binary: exports a trained experiment as a model directory for `MusePipeline.from_pretrained`.

  python -m muse_jax.export --config=configs/shapes_tiny.py --workdir=runs/shapes \
      --out=models/shapes
  python -m muse_jax.export ... --out=gs://bucket/models/shapes --stages=base

Writes one safetensors file per stage (parameters only: no optimizer state), `config.json`
(everything sampling needs, so loading takes no config file), the vocabulary and a model card
`README.md` (stages and their training steps, data, the workdir's alignment scores when
`alignment.json` exists). `--stages=cascade` (the default when the config has the super-res
stages) exports every stage; `--stages=base` the tokenizer and base stages (and the base
decoder when the workdir has one). The output
directory must not hold an export already, unless `--overwrite`.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from muse_jax import cli, storage

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory with trained stages.")
_OUT = flags.DEFINE_string("out", None, "Model directory to write (local or gs://).")
_STAGES = cli.define_stages_flag("tokenizer + base stage", "every stage")
_STEP = flags.DEFINE_integer("step", None, "Base checkpoint step to export (default: latest).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing export in --out.")


def main(argv):
    cli.check_no_extra_args(argv)
    cli.check_reachable(_WORKDIR.value, _OUT.value)
    out = _OUT.value
    if storage.exists(storage.join(out, "config.json")) and not _OVERWRITE.value:
        raise cli.UsageError(
            f"{out} already holds an exported model; pass --overwrite to replace it."
        )
    if not storage.isdir(_WORKDIR.value):
        raise cli.UsageError(f"--workdir {_WORKDIR.value!r} does not exist.")
    from muse_jax.inference import export, model

    config = _CONFIG.value
    try:
        loaded = model.from_workdir(
            config, _WORKDIR.value, stages=_STAGES.value, base_step=_STEP.value
        )
    except FileNotFoundError as e:
        raise cli.missing_stage(e, "export", _STAGES.value != "base") from None
    data = config.data.get("dataset", "")
    manifest = export.export(loaded, out, source=_WORKDIR.value, data_description=data)
    total = sum(c["bytes"] for c in manifest["components"].values())
    steps = {k: v["step"] for k, v in manifest["components"].items()}
    print(f"exported {manifest['stages']} model to {out}: {total / 1e6:.2f} MB, steps {steps}")
    return 0


def run():
    flags.mark_flags_as_required(["config", "workdir", "out"])
    cli.run(main)


if __name__ == "__main__":
    run()
