r"""Binary: trains one stage of Muse: `python -m muse_jax.train --config=configs/X.py --workdir=DIR`.

The stage is `config.stage` ("tokenizer" or "base"); it writes to `DIR/<stage>/` (checkpoints,
TensorBoard events, config.json) and resumes from the latest checkpoint there. SIGTERM saves a
checkpoint and exits 0; a non-finite loss exits 3 with the last good checkpoint kept.

  python -m muse_jax.train --config=configs/shapes_tiny.py --config.stage=tokenizer \
      --workdir=runs/shapes --config.tokenizer.train.num_steps=3000
"""

from absl import flags
from ml_collections import config_flags

from muse_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory (one per experiment).")


def main(argv):
    cli.check_no_extra_args(argv)
    cli.check_reachable(_WORKDIR.value)
    # Imported here: `cli.run` may re-execute the process (huge pages) before `main`.
    from muse_jax.train import trainer

    return trainer.main_train(_CONFIG.value, _WORKDIR.value)


def run():
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)


if __name__ == "__main__":
    run()
