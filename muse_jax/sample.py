r"""Binary: text-to-image generation with a trained experiment, one or two stages.

  python -m muse_jax.sample --config=configs/shapes_tiny.py --workdir=runs/shapes \
      --prompt="a large red circle on the left" --num_samples=8 --output_dir=/tmp/samples
  python -m muse_jax.sample --model=models/amused-256 --prompt="a fox" --output_dir=/tmp/fox

`--model` samples an exported or converted model directory (`muse_jax.export`,
`muse_jax.convert`) instead of a training workdir; its settings are in its config.json.

`--stages=cascade` (the default when the config has the super-res stages) runs base ->
super-res -> fine-tuned decoder in one jitted call and writes high-res images; `--stages=base`
keeps the one-stage path. Writes `sample_000.png`, ... (native resolution), `grid.png`
(enlarged; with the cascade also `grid_base.png`, the base stage's own output) and
`samples.json` (prompt, seed, checkpoint steps and, for prompts of the shapes grammar, the
alignment score). Sampler settings are config keys, one block per stage:
`--config.base.sampling.guidance_scale=3 --config.base.sampling.num_steps=24` (base),
`--config.superres.sampling.num_steps=8 --config.superres.sampling.temperature=1` (super-res),
`--config.base.sampling.negative_prompt="a blue square"`.

Images are generated in batches of `--batch_size` and written as each batch finishes, so memory
does not grow with `--num_samples`; a request over `--max_images` is refused before any work.
The same seed and batch size reproduce the same images. This binary is a thin user of the
Python API (`muse_jax.MusePipeline`).
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from muse_jax import cli, storage

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory with trained stages.")
_MODEL = flags.DEFINE_string("model", None, "Exported/converted model directory (no --config).")
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt.")
_NUM = flags.DEFINE_integer("num_samples", 8, "Images to generate.")
_OUT = flags.DEFINE_string("output_dir", None, "Where PNGs are written.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed; the same seed reproduces the images.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per sampler call (bounds memory).")
_MAX = flags.DEFINE_integer("max_images", 1024, "Refuse requests for more images than this.")
_GRID_MAX = 64  # grid.png shows at most this many images.
_STAGES = cli.define_stages_flag()


def _save_grid(images, path: str) -> None:
    from muse_jax.inference import images as images_lib

    storage.save_png(images_lib.preview_grid(images[:_GRID_MAX]), path)


def main(argv):
    cli.check_no_extra_args(argv)
    prompt = cli.require_prompt(_PROMPT.value)
    cli.require_positive("num_samples", _NUM.value)
    cli.require_positive("batch_size", _BATCH.value)
    if _NUM.value > _MAX.value:
        raise cli.UsageError(
            f"--num_samples={_NUM.value} is over --max_images={_MAX.value}: raise the ceiling "
            "or split the request."
        )
    if (_MODEL.value is None) == (_WORKDIR.value is None):
        raise cli.UsageError("Give either --model=DIR or --config=C --workdir=W.")
    if _MODEL.value is not None and _CONFIG.value is not None:
        raise cli.UsageError("--model reads its config from the model directory: drop --config.")
    if _WORKDIR.value is not None and _CONFIG.value is None:
        raise cli.UsageError("--workdir needs --config=configs/X.py.")
    cli.check_reachable(_WORKDIR.value, _MODEL.value, _OUT.value)
    import numpy as np

    from muse_jax.data import shapes_alignment
    from muse_jax.inference.pipeline import MusePipeline
    from muse_jax.stages import has_cascade

    kw = dict(batch_size=_BATCH.value, max_images=_MAX.value)
    if _MODEL.value is not None:
        if not storage.isdir(_MODEL.value):
            raise cli.UsageError(f"--model {_MODEL.value!r} does not exist.")
        pipe = MusePipeline.from_pretrained(_MODEL.value, stages=_STAGES.value, **kw)
        stages = "cascade" if pipe.cascade else "base"
    else:
        config = _CONFIG.value
        stages = _STAGES.value or ("cascade" if has_cascade(config) else "base")
        if stages == "cascade" and not has_cascade(config):
            raise cli.UsageError(
                "--stages=cascade needs config.superres and config.data.hr_image_size > 0."
            )
        if not storage.isdir(_WORKDIR.value):
            raise cli.UsageError(f"--workdir {_WORKDIR.value!r} does not exist.")
        try:
            pipe = MusePipeline.from_workdir(config, _WORKDIR.value, stages=stages, **kw)
        except FileNotFoundError as e:
            raise cli.missing_stage(e, "sample", stages == "cascade") from None
    steps = pipe.trained_steps
    shown, shown_low, written = [], [], 0
    for part in pipe.generate([prompt], num_images_per_prompt=_NUM.value, seed=_SEED.value):
        for image in part.array:
            storage.save_png(image, storage.join(_OUT.value, f"sample_{written:03d}.png"))
            written += 1
        shown.append(part.array)
        if part.lowres_array is not None:
            shown_low.append(part.lowres_array)
        print(f"[sample] {written}/{_NUM.value} images written", flush=True)
    images = np.concatenate(shown)
    _save_grid(images, storage.join(_OUT.value, "grid.png"))
    scores = shapes_alignment.score_or_empty(images, [prompt] * len(images))
    record = {
        "prompt": prompt,
        "seed": _SEED.value,
        "batch_size": _BATCH.value,
        "stages": stages,
        "steps": steps,
        "base_step": steps.get("base"),
        "num_samples": _NUM.value,
        "image_size": int(images.shape[1]),
        "alignment": scores,
    }
    if shown_low:
        low = np.concatenate(shown_low)
        _save_grid(low, storage.join(_OUT.value, "grid_base.png"))
        record["base_alignment"] = shapes_alignment.score_or_empty(low, [prompt] * len(low))
    storage.write_json(storage.join(_OUT.value, "samples.json"), record)
    size = images.shape[1]
    print(
        f"wrote {written} samples ({size}x{size}, {stages}) and grid.png to "
        f"{_OUT.value} (checkpoint steps {steps})"
    )
    if scores:
        print(
            "alignment: "
            + " ".join(f"{k}={v:.3f}" for k, v in scores.items() if k != "n" and v == v)
        )
    else:
        print("alignment: not scored (the pixel checker reads prompts of the shapes grammar only)")
    return 0


def run():
    flags.mark_flags_as_required(["output_dir"])
    cli.run(main)


if __name__ == "__main__":
    run()
