r"""Binary: text-to-image generation with a trained experiment.

  python -m muse_jax.sample --config=configs/shapes_tiny.py --workdir=runs/shapes \
      --prompt="a large red circle on the left" --num_samples=8 --output_dir=/tmp/samples

Writes `sample_000.png`, ... (native resolution), `grid.png` (enlarged) and `samples.json`
(prompt, seed, checkpoint step and, for prompts of the shapes grammar, the alignment score).
Sampler settings are config keys: `--config.sampling.guidance_scale=3`, `...num_steps=12`,
`--config.sampling.negative_prompt="a blue square"`.
"""

from __future__ import annotations

import json
import os

from absl import flags
from ml_collections import config_flags

from muse_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory with trained stages.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt.")
_NUM = flags.DEFINE_integer("num_samples", 8, "Images to generate.")
_OUT = flags.DEFINE_string("output_dir", None, "Where PNGs are written.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed; the same seed reproduces the images.")


def main(argv):
    cli.check_no_extra_args(argv)
    prompt = cli.require_prompt(_PROMPT.value)
    cli.require_positive("num_samples", _NUM.value)
    from muse_jax.eval import alignment_eval
    from muse_jax.train import base_stage, summaries

    config = _CONFIG.value
    sampler, params, step, conditioner = base_stage.load_for_sampling(config, _WORKDIR.value)
    out = alignment_eval.generate(
        config,
        sampler,
        params,
        conditioner,
        [prompt],
        samples_per_prompt=_NUM.value,
        seed=_SEED.value,
    )
    os.makedirs(_OUT.value, exist_ok=True)
    for i, image in enumerate(out.images):
        summaries.save_png(image, os.path.join(_OUT.value, f"sample_{i:03d}.png"))
    columns = min(8, len(out.images))
    summaries.save_png(
        summaries.upscale(summaries.grid(out.images, columns), 4),
        os.path.join(_OUT.value, "grid.png"),
    )
    record = {
        "prompt": prompt,
        "seed": _SEED.value,
        "base_step": step,
        "num_samples": _NUM.value,
        "alignment": out.scores,
    }
    with open(os.path.join(_OUT.value, "samples.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {len(out.images)} samples and grid.png to {_OUT.value} (base step {step})")
    if out.scores:
        print(
            "alignment: " + " ".join(f"{k}={v:.3f}" for k, v in out.scores.items() if k != "count")
        )
    return 0


def run():
    flags.mark_flags_as_required(["config", "workdir", "output_dir"])
    cli.run(main)


if __name__ == "__main__":
    run()
