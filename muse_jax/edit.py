r"""Binary: zero-shot editing with a trained experiment (same sampler as generation).

  # Inpainting: re-generate the white pixels of MASK.png (any-pixel rule on the token grid).
  python -m muse_jax.edit --config=configs/shapes_tiny.py --workdir=runs/shapes \
      --image=IN.png --mask=MASK.png --mode=inpaint --prompt="a large blue circle on the left" \
      --output_dir=/tmp/edit
  # Outpainting: extend the image by left,top,right,bottom pixels (of IN.png).
  python -m muse_jax.edit ... --mode=outpaint --pad=0,0,16,0 --prompt="..."
  # Mask-free: 4 rounds, each re-sampling 75% of the tokens under the new prompt, those that
  # fit the rest of the image under it worst first (--critic=0: uniformly).
  python -m muse_jax.edit ... --mode=maskfree --iterations=4 --resample_fraction=0.75 \
      --prompt="..."

Images of any size are resized (shorter side) and centre-cropped to `config.data.image_size`
with a printed note (outpainting fits the padded canvas instead of cropping it). Masks are
white = re-generate, the size of the input image or of the model. Writes `edit_000.png`, ...
(native size), `input.png` and `mask.png` (what the model saw), `grid.png` (enlarged: input,
mask, edits) and `edit.json` (settings, checkpoint step, alignment score for shapes prompts).
Guidance and negative prompts work in every mode: `--negative_prompt`,
`--config.base.sampling.guidance_scale=3`.
"""

from __future__ import annotations

import io

import numpy as np
from absl import flags
from ml_collections import config_flags

from muse_jax import cli, storage

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory with trained stages.")
_IMAGE = flags.DEFINE_string("image", None, "Input image (PNG, JPEG, ...; any size).")
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt for the edited image.")
_MODE = flags.DEFINE_enum("mode", "inpaint", ["inpaint", "outpaint", "maskfree"], "Edit mode.")
_MASK = flags.DEFINE_string(
    "mask", None, "inpaint: mask image, white = re-generate; input-image or model size."
)
_PAD = flags.DEFINE_string(
    "pad", None, "outpaint: 'left,top,right,bottom' pixels (of the input) to add, or one number."
)
_ITERATIONS = flags.DEFINE_integer("iterations", 4, "maskfree: re-sampling rounds.")
_CRITIC = flags.DEFINE_float(
    "critic",
    10.0,
    "maskfree: weight of the self-critic that picks the tokens to re-sample (those least "
    "likely given the rest of the image and the new prompt first); 0 picks uniformly.",
)
_FRACTION = flags.DEFINE_float(
    "resample_fraction",
    None,
    "maskfree: fraction of the tokens re-sampled per round (default: "
    "muse_jax.sampling.editing.DEFAULT_RESAMPLE_FRACTION, 0.75).",
)
_DILATION = flags.DEFINE_integer("dilation", 0, "Token margin re-generated around the mask.")
_FEATHER = flags.DEFINE_integer(
    "feather", 1, "Pixels over which the edit fades into the original inside the mask; 0: hard."
)
_NEGATIVE = flags.DEFINE_string(
    "negative_prompt", None, "Replaces the unconditional branch (default: config's)."
)
_NUM = flags.DEFINE_integer("num_samples", 4, "Edits to generate.")
_OUT = flags.DEFINE_string("output_dir", None, "Where PNGs are written.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed; the same seed reproduces the edits.")
_STAGES = cli.define_stages_flag(
    "edit at the base resolution", "base + super-res at the high resolution"
)


def _fraction() -> float:
    from muse_jax.sampling import editing

    return editing.DEFAULT_RESAMPLE_FRACTION if _FRACTION.value is None else _FRACTION.value


def _open(path: str, what: str, mode: str):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(storage.read_bytes(path))) as im:
            return im.convert(mode)
    except FileNotFoundError:
        raise cli.UsageError(f"{what} file not found: {path!r}.") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError.
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise cli.UsageError(f"cannot read {what} {path!r}: {reason}") from None


def main(argv):
    cli.check_no_extra_args(argv)
    prompt = cli.require_prompt(_PROMPT.value)
    cli.require_positive("num_samples", _NUM.value)
    cli.check_reachable(_WORKDIR.value, _OUT.value)
    config = _CONFIG.value
    from muse_jax.stages import has_cascade

    cascade = (_STAGES.value or ("cascade" if has_cascade(config) else "base")) == "cascade"
    if cascade and not has_cascade(config):
        raise cli.UsageError("--stages=cascade needs config.superres and data.hr_image_size > 0.")
    mode = _MODE.value
    image = _open(_IMAGE.value, "image", "RGB")
    mask = None
    if mode == "inpaint":
        if not _MASK.value:
            raise cli.UsageError("--mode=inpaint needs --mask=MASK.png (white = re-generate).")
        mask = _open(_MASK.value, "mask", "L")
    if mode == "outpaint" and not _PAD.value:
        raise cli.UsageError("--mode=outpaint needs --pad=left,top,right,bottom (pixels).")
    if not storage.isdir(_WORKDIR.value):
        raise cli.UsageError(f"--workdir {_WORKDIR.value!r} does not exist.")

    from muse_jax.inference import images as images_lib
    from muse_jax.sampling import editing

    # Bad inputs fail here, in one line, before the model (and TensorFlow) loads.
    size = config.data.hr_image_size if cascade else config.data.image_size
    if mode == "inpaint":
        images_lib.fit_mask(mask, image.size, size)
    if mode == "outpaint":
        editing.outpaint_canvas(np.asarray(image), editing.parse_pad(_PAD.value), size)

    from muse_jax.data import shapes_alignment
    from muse_jax.inference.pipeline import MusePipeline

    stages = "cascade" if cascade else "base"
    try:
        pipe = MusePipeline.from_workdir(
            config, _WORKDIR.value, stages=stages, batch_size=max(16, _NUM.value)
        )
    except FileNotFoundError as e:
        raise cli.missing_stage(e, "edit", cascade) from None
    kwargs = dict(
        num_images=_NUM.value,
        negative_prompt=_NEGATIVE.value,
        seed=_SEED.value,
        feather=_FEATHER.value,
    )
    if mode == "inpaint":
        out = pipe.inpaint(image, mask, prompt, dilation=_DILATION.value, **kwargs)
    elif mode == "outpaint":
        out = pipe.outpaint(image, _PAD.value, prompt, dilation=_DILATION.value, **kwargs)
    else:
        out = pipe.edit(
            image,
            prompt,
            iterations=_ITERATIONS.value,
            resample_fraction=_fraction(),
            critic=_CRITIC.value,
            **kwargs,
        )
    for note in out.notes:
        print(f"note: {note}")
    steps = pipe.trained_steps
    res = out.result
    for i, img in enumerate(out.array):
        storage.save_png(img, storage.join(_OUT.value, f"edit_{i:03d}.png"))
    storage.save_png(out.input_array, storage.join(_OUT.value, "input.png"))
    # Mask panel: the token region the model re-drew (grey) and the pixel mask (white).
    grid_side = int(round(res.token_masks[0].shape[1] ** 0.5))
    panel = editing.token_mask_to_pixels(res.token_masks[0][:1], grid_side, size)[0]
    pixel_mask = out.mask if out.mask is not None else 0
    panel = (panel * 96 + pixel_mask * 159).astype(np.uint8)
    storage.save_png(panel, storage.join(_OUT.value, "mask.png"))
    row = np.concatenate(
        [out.input_array[None], np.repeat(panel[None, ..., None], 3, -1), out.array]
    )
    storage.save_png(
        images_lib.upscale(images_lib.grid(row, len(row)), max(1, 128 // size)),
        storage.join(_OUT.value, "grid.png"),
    )
    n = _NUM.value
    scores = shapes_alignment.score_or_empty(out.array, [prompt] * n)
    neg = config.base.sampling.negative_prompt if _NEGATIVE.value is None else _NEGATIVE.value
    record = {
        "mode": mode,
        "prompt": prompt,
        "negative_prompt": neg,
        "seed": _SEED.value,
        "base_step": steps["base"],
        "steps": steps,
        "image_size": size,
        "num_samples": n,
        "dilation": _DILATION.value,
        "feather": _FEATHER.value,
        "tokens_resampled": [int(m.sum()) for m in res.token_masks[0]],
        "alignment": scores,
    }
    if mode == "maskfree":
        record.update(
            iterations=_ITERATIONS.value,
            resample_fraction=_fraction(),
            critic=_CRITIC.value,
            changed_per_iteration=[c.tolist() for c in res.changed_per_iteration],
        )
    if mode == "outpaint":
        record["pad"] = _PAD.value
    storage.write_json(storage.join(_OUT.value, "edit.json"), record)
    print(f"wrote {n} {mode} edits and grid.png to {_OUT.value} (base step {steps['base']})")
    if scores:
        print(
            "alignment: "
            + " ".join(f"{k}={v:.3f}" for k, v in scores.items() if k != "n" and v == v)
        )
    else:
        print("alignment: not scored (the pixel checker reads prompts of the shapes grammar only)")
    return 0


def run():
    flags.mark_flags_as_required(["config", "workdir", "image", "output_dir"])
    cli.run(main)


if __name__ == "__main__":
    run()
