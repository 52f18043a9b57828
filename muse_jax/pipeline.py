r"""Binary: the whole embedded-default job, data -> the six stages -> samples -> scores.

  python -m muse_jax.pipeline --config=configs/shapes_tiny.py --workdir=runs/shapes

Builds the procedural shapes dataset and trains, in order, the low-res VQ tokenizer, the base
transformer, the base decoder (the low-res decoder fine-tuned on the base stage's grids), the
high-res tokenizer, the super-res transformer and the fine-tuned decoder (each
resumable: rerunning continues where it stopped; a config without `superres` stops after the
base). Then it samples `eval.samples_per_prompt` images for every seen and held-out prompt
through the cascade and scores both the base stage's own output and the cascade's; writes
`samples/*.png`, `alignment.json` (with the plain vs fine-tuned decoder PSNR) and TensorBoard
summaries under `<workdir>/eval`. View with `tensorboard --logdir <workdir>`.
"""

from __future__ import annotations

import time

from absl import flags
from ml_collections import config_flags

from muse_jax import cli, storage

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory.")


def main(argv):
    cli.check_no_extra_args(argv)
    from muse_jax.train import trainer

    t0 = time.time()
    config, workdir = _CONFIG.value, _WORKDIR.value
    cli.check_reachable(workdir)
    from muse_jax import stages

    cascade = stages.has_cascade(config)
    for stage in stages.enabled(config):
        result = trainer.train(config, workdir, stage)
        print(
            f"[pipeline] {stage}: {result.status} at step {result.step} ({result.wall_s:.0f}s)",
            flush=True,
        )
        if result.status == "preempted":  # SIGTERM: stop here; rerunning resumes this stage.
            print("[pipeline] stopped by SIGTERM; rerun the same command to resume", flush=True)
            return 0
    from muse_jax.eval import reconstruction
    from muse_jax.eval import report as report_lib

    report = report_lib.evaluate_alignment(config, workdir, cascade=cascade)
    if cascade:
        report["decoder_psnr"] = reconstruction.decoder_psnr(config, workdir, max_images=500)
    report["wall_s"] = time.time() - t0
    storage.write_json(storage.join(workdir, "alignment.json"), report)
    print("[pipeline] text-alignment score (fraction of samples whose pixels show the attribute):")
    print(report_lib.table(report))
    if cascade and report["decoder_psnr"] is None:
        print("[pipeline] no 'test' split: the decoders' held-out PSNR is skipped")
    elif cascade:
        d = report["decoder_psnr"]
        print(
            f"[pipeline] high-res reconstruction PSNR on {d['num_images']} held-out images: "
            f"plain decoder {d['plain_db']:.2f} dB, fine-tuned decoder {d['finetuned_db']:.2f} dB"
        )
    print(f"[pipeline] grids: {storage.join(workdir, 'samples')}; tensorboard --logdir {workdir}")
    print(f"[pipeline] done in {report['wall_s'] / 60:.1f} min")
    return 0


def run():
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)


if __name__ == "__main__":
    run()
