r"""Binary: evaluates a trained experiment's checkpoints (FID, CLIP score, shapes alignment).

  python -m muse_jax.evaluate --config=configs/shapes_tiny.py --workdir=runs/shapes
  python -m muse_jax.evaluate --config=configs/shapes_tiny.py --workdir=runs/shapes \
      --stages=base --step=500 \
      --config.eval.metrics=alignment,clip,fid \
      --config.eval.clip.checkpoint=/ckpt/clip-vit-large-patch14 \
      --config.eval.fid.inception_weights=/ckpt/inception_fid.safetensors
  # Side-car of a training job: evaluates each new base checkpoint as it is written.
  python -m muse_jax.evaluate --config=configs/shapes_tiny.py --workdir=runs/shapes \
      --stages=base --watch --poll_s=60 --watch_timeout_s=7200

Generates the evaluation set with the config's sampler settings (`config.base.sampling`, and
`config.superres.sampling` for the cascade): the seen and held-out prompts x
`eval.samples_per_prompt` (`eval.captions="prompts"`), or the first captions of
`eval.num_images` records of `eval.split` (`eval.captions="dataset"`). Then computes the metrics
`eval.metrics` names (plug-ins of muse_jax/eval/metrics.py): "alignment" (shapes captions only),
"clip" (needs `eval.clip.checkpoint`), "fid" (needs `eval.fid.inception_weights`; reference
statistics of `eval.fid.num_reference` real images of `eval.fid.reference_split`, cached in
`eval.fid.cache_dir`, default `<workdir>/eval/fid_stats`).

`--step` selects the base stage's checkpoint (default: the latest); with `--stages=cascade`
(the default when the config has the super-res stages) the super-res stage and the decoder are
at their latest. Outputs, in `<workdir>/eval/base` or `<workdir>/eval/cascade` (one TensorBoard
run each; `tensorboard --logdir <workdir>/eval`):
  events.out.tfevents.*   scalars `eval/fid`, `eval/clip_score`, `eval/clip_score_01`,
                          `eval/alignment/{seen,held_out,two_object}/{color,shape,...,count,all}`
                          (cascade: also `eval/alignment/base_only/...` and the Fréchet
                          distances `eval/alignment/frechet/{cascade,base_upsampled,real_floor}`
                          in the high-res tokenizer's features), a captioned sample
                          grid `eval/samples` and the captions as text, at the base step
  metrics_<step>.json     the same metrics, every stage's step, sampler settings, wall times
  evaluated.json          the steps done; `--watch` skips them, so a restarted watcher resumes

`--watch` polls the base stage's checkpoint directory every `--poll_s` seconds (finalized
checkpoints only), evaluates each new step once, oldest first, and exits once the final step
is evaluated (`base.train.num_steps`, or the step where the run's wall-clock cap stopped it:
`base/stopped.json`) or after `--watch_timeout_s` without a new checkpoint.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from muse_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory with trained stages.")
_STEP = flags.DEFINE_integer("step", None, "Base checkpoint step to evaluate (default: latest).")
_STAGES = cli.define_stages_flag()
_WATCH = flags.DEFINE_bool("watch", False, "Evaluate each new base checkpoint as it appears.")
_POLL = flags.DEFINE_float("poll_s", 60.0, "--watch: seconds between directory polls.")
_TIMEOUT = flags.DEFINE_float(
    "watch_timeout_s", 3600.0, "--watch: stop after this many seconds without a new checkpoint."
)


def main(argv):
    cli.check_no_extra_args(argv)
    if _WATCH.value and _STEP.value is not None:
        raise cli.UsageError("--step and --watch exclude each other.")
    cli.check_reachable(_WORKDIR.value)
    from muse_jax.eval import evaluator
    from muse_jax.stages import has_cascade

    config = _CONFIG.value
    cascade = has_cascade(config)
    if _STAGES.value == "cascade" and not cascade:
        raise cli.UsageError(
            "--stages=cascade needs config.superres and config.data.hr_image_size > 0."
        )
    cascade = cascade and _STAGES.value != "base"
    runner = evaluator.Evaluator(config, _WORKDIR.value, cascade)
    try:
        if _WATCH.value:
            steps = runner.watch(_POLL.value, _TIMEOUT.value)
            print(f"[evaluate] evaluated steps {steps or 'none'} in {runner.directory}")
        else:
            runner.evaluate(_STEP.value)
    except FileNotFoundError as e:
        raise cli.missing_stage(e, "evaluate", cascade) from None
    return 0


def run():
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)


if __name__ == "__main__":
    run()
