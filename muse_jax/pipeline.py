r"""Binary: the whole embedded-default job: data -> tokenizer -> base -> samples -> alignment.

  python -m muse_jax.pipeline --config=configs/shapes_tiny.py --workdir=runs/shapes

Builds the procedural shapes dataset, trains the VQ tokenizer and the base transformer (each
resumable: rerunning continues where it stopped), samples `eval.samples_per_prompt` images for
every seen and held-out prompt, and writes `samples/{seen,held_out}.png`, `alignment.json` and
TensorBoard summaries under `<workdir>/eval`. View with `tensorboard --logdir <workdir>`.
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
from ml_collections import config_flags

from muse_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory.")


def main(argv):
    cli.check_no_extra_args(argv)
    from muse_jax.train import trainer

    t0 = time.time()
    config, workdir = _CONFIG.value, _WORKDIR.value
    for stage in ("tokenizer", "base"):
        result = trainer.train(config, workdir, stage)
        print(
            f"[pipeline] {stage}: {result.status} at step {result.step} ({result.wall_s:.0f}s)",
            flush=True,
        )
    from muse_jax.eval import report as report_lib

    report = report_lib.evaluate_alignment(config, workdir)
    report["wall_s"] = time.time() - t0
    with open(os.path.join(workdir, "alignment.json"), "w") as f:
        json.dump(report, f, indent=2)
    print("[pipeline] text-alignment score (fraction of samples whose pixels show the attribute):")
    print(report_lib.table(report))
    print(f"[pipeline] grids: {os.path.join(workdir, 'samples')}; tensorboard --logdir {workdir}")
    print(f"[pipeline] done in {report['wall_s'] / 60:.1f} min")
    return 0


def run():
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)


if __name__ == "__main__":
    run()
