r"""Binary: text-to-image generation with a trained experiment, one or two stages.

  python -m muse_jax.sample --config=configs/shapes_tiny.py --workdir=runs/shapes \
      --prompt="a large red circle on the left" --num_samples=8 --output_dir=/tmp/samples

`--stages=cascade` (the default when the config has the super-res stages) runs base ->
super-res -> fine-tuned decoder in one jitted call and writes high-res images; `--stages=base`
keeps the one-stage path. Writes `sample_000.png`, ... (native resolution), `grid.png`
(enlarged; with the cascade also `grid_base.png`, the base stage's own output) and
`samples.json` (prompt, seed, checkpoint steps and, for prompts of the shapes grammar, the
alignment score). Sampler settings are config keys, one block per stage:
`--config.sampling.guidance_scale=3 --config.sampling.num_steps=24` (base),
`--config.superres.sampling.num_steps=8 --config.superres.sampling.temperature=1` (super-res),
`--config.sampling.negative_prompt="a blue square"`.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from muse_jax import cli, storage

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory with trained stages.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt.")
_NUM = flags.DEFINE_integer("num_samples", 8, "Images to generate.")
_OUT = flags.DEFINE_string("output_dir", None, "Where PNGs are written.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed; the same seed reproduces the images.")
_STAGES = flags.DEFINE_enum(
    "stages",
    None,
    ["base", "cascade"],
    "base: the base stage alone; cascade: base -> super-res -> decoder. Default: cascade when "
    "the config has the super-res stages.",
)


def _save_grid(images, path: str) -> None:
    from muse_jax.train import summaries

    columns = min(8, len(images))
    scale = max(1, 128 // images.shape[1])
    storage.save_png(summaries.upscale(summaries.grid(images, columns), scale), path)


def main(argv):
    cli.check_no_extra_args(argv)
    prompt = cli.require_prompt(_PROMPT.value)
    cli.require_positive("num_samples", _NUM.value)
    cli.check_reachable(_WORKDIR.value, _OUT.value)
    from muse_jax.stages import has_cascade

    config = _CONFIG.value
    stages = _STAGES.value or ("cascade" if has_cascade(config) else "base")
    if stages == "cascade" and not has_cascade(config):
        raise cli.UsageError(
            "--stages=cascade needs config.superres and config.data.hr_image_size > 0."
        )
    from muse_jax.eval import alignment_eval, report

    try:
        sampler, params, steps, conditioner = report.load_sampler(
            config, _WORKDIR.value, stages == "cascade"
        )
    except FileNotFoundError as e:
        hint = " (or sample the base stage alone: --stages=base)" if stages == "cascade" else ""
        raise cli.UsageError(f"{e}{hint}") from None
    out = alignment_eval.generate(
        config,
        sampler,
        params,
        conditioner,
        [prompt],
        samples_per_prompt=_NUM.value,
        seed=_SEED.value,
    )
    for i, image in enumerate(out.images):
        storage.save_png(image, storage.join(_OUT.value, f"sample_{i:03d}.png"))
    _save_grid(out.images, storage.join(_OUT.value, "grid.png"))
    record = {
        "prompt": prompt,
        "seed": _SEED.value,
        "stages": stages,
        "steps": steps,
        "base_step": steps["base"],
        "num_samples": _NUM.value,
        "image_size": int(out.images.shape[1]),
        "alignment": out.scores,
    }
    if out.lowres_images is not None:
        _save_grid(out.lowres_images, storage.join(_OUT.value, "grid_base.png"))
        record["base_alignment"] = out.lowres_scores
    storage.write_json(storage.join(_OUT.value, "samples.json"), record)
    size = out.images.shape[1]
    print(
        f"wrote {len(out.images)} samples ({size}x{size}, {stages}) and grid.png to "
        f"{_OUT.value} (checkpoint steps {steps})"
    )
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
