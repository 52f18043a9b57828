r"""Binary: zero-shot editing with a trained experiment (same sampler as generation).

  # Inpainting: re-generate the white pixels of MASK.png (any-pixel rule on the token grid).
  python -m muse_jax.edit --config=configs/shapes_tiny.py --workdir=runs/shapes \
      --image=IN.png --mask=MASK.png --mode=inpaint --prompt="a large blue circle on the left" \
      --output_dir=/tmp/edit
  # Outpainting: extend the image by left,top,right,bottom pixels (of IN.png).
  python -m muse_jax.edit ... --mode=outpaint --pad=0,0,16,0 --prompt="..."
  # Mask-free: 4 rounds, each re-sampling 25% of the tokens under the new prompt.
  python -m muse_jax.edit ... --mode=maskfree --iterations=4 --resample_fraction=0.25 \
      --prompt="..."

Images of any size are resized (shorter side) and centre-cropped to `config.data.image_size`
with a printed note (outpainting fits the padded canvas instead of cropping it). Masks are
white = re-generate, the size of the input image or of the model. Writes `edit_000.png`, ...
(native size), `input.png` and `mask.png` (what the model saw), `grid.png` (enlarged: input,
mask, edits) and `edit.json` (settings, checkpoint step, alignment score for shapes prompts).
Guidance and negative prompts work in every mode: `--negative_prompt`,
`--config.sampling.guidance_scale=3`.
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
_FRACTION = flags.DEFINE_float(
    "resample_fraction", 0.25, "maskfree: fraction of the tokens re-sampled per round."
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
_STAGES = flags.DEFINE_enum(
    "stages",
    None,
    ["base", "cascade"],
    "base: edit at the base resolution; cascade: base + super-res at the high resolution. "
    "Default: cascade when the config has the super-res stages.",
)


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


def fit_square(im, size: int, resample) -> tuple[np.ndarray, str | None]:
    """PIL image -> array [size, size, ...]: shorter side scaled to `size`, centre-cropped."""
    w, h = im.size
    if (w, h) == (size, size):
        return np.asarray(im), None
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), resample)
    x, y = (nw - size) // 2, (nh - size) // 2
    note = f"resized {w}x{h} to {nw}x{nh}"
    if (nw, nh) != (size, size):
        note += f" and centre-cropped to {size}x{size}"
    return np.asarray(im.crop((x, y, x + size, y + size))), note


def load_inputs(
    mode: str, image_path: str, mask_path: str | None, pad: str | None, size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 image [S, S, 3], pixel mask bool [S, S] or None for maskfree), with notes."""
    from PIL import Image

    from muse_jax.sampling import editing

    im = _open(image_path, "image", "RGB")
    if mode == "outpaint":
        if not pad:
            raise cli.UsageError("--mode=outpaint needs --pad=left,top,right,bottom (pixels).")
        image, mask = editing.outpaint_canvas(np.asarray(im), editing.parse_pad(pad), size)
        w, h = im.size
        print(f"note: {w}x{h} image padded by {pad} and fitted into the model's {size}x{size}")
        return image, mask
    image, note = fit_square(im, size, Image.Resampling.LANCZOS)
    if note:
        print(f"note: input image {note} (the model's resolution)")
    if mode == "maskfree":
        return image, None
    if not mask_path:
        raise cli.UsageError("--mode=inpaint needs --mask=MASK.png (white = re-generate).")
    m = _open(mask_path, "mask", "L")
    if m.size == im.size:
        mask, _ = fit_square(m, size, Image.Resampling.NEAREST)
    elif m.size == (size, size):
        mask = np.asarray(m)
    else:
        raise cli.UsageError(
            f"mask is {m.size[0]}x{m.size[1]} but the image is {im.size[0]}x{im.size[1]}: give a "
            f"mask of the image's size or the model's {size}x{size}."
        )
    mask = mask >= 128
    if not mask.any():
        raise cli.UsageError(f"mask {mask_path!r} has no white pixels: nothing to re-generate.")
    return image, mask


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
    size = config.data.hr_image_size if cascade else config.data.image_size
    image, mask = load_inputs(_MODE.value, _IMAGE.value, _MASK.value, _PAD.value, size)

    import jax

    from muse_jax.eval import alignment, report
    from muse_jax.sampling import editing
    from muse_jax.train import summaries

    try:
        sampler, params, steps, conditioner = report.load_sampler(config, _WORKDIR.value, cascade)
    except FileNotFoundError as e:
        hint = " (or edit with the base stage alone: --stages=base)" if cascade else ""
        raise cli.UsageError(f"{e}{hint}") from None
    step = steps["base"]
    if cascade:
        stages = [
            editing.SamplerStage(sampler.base, params["base"], config.data.image_size),
            editing.SamplerStage(sampler.superres, params["superres"], size),
        ]
    else:
        stages = [editing.SamplerStage(sampler, params, size)]
    n = _NUM.value
    neg = config.sampling.negative_prompt if _NEGATIVE.value is None else _NEGATIVE.value
    cond = conditioner.encode([prompt] * n)
    uncond = {k: np.repeat(v, n, 0) for k, v in conditioner.encode([neg]).items()}
    images = np.repeat(image[None].astype(np.float32) / 127.5 - 1.0, n, 0)
    rng = jax.random.PRNGKey(_SEED.value)
    if _MODE.value == "maskfree":
        res = editing.maskfree_edit(
            stages,
            images,
            cond,
            uncond,
            rng,
            iterations=_ITERATIONS.value,
            resample_fraction=_FRACTION.value,
            feather=_FEATHER.value,
        )
    else:
        res = editing.edit_with_mask(
            stages,
            images,
            np.repeat(mask[None], n, 0),
            cond,
            uncond,
            rng,
            dilation=_DILATION.value,
            feather=_FEATHER.value,
        )
    out = summaries.to_uint8(res.images)
    for i, img in enumerate(out):
        storage.save_png(img, storage.join(_OUT.value, f"edit_{i:03d}.png"))
    storage.save_png(image, storage.join(_OUT.value, "input.png"))
    # Mask panel: the token region the model re-drew (grey) and the pixel mask (white).
    tmask = res.token_masks[0][0]
    panel = editing.token_mask_to_pixels(tmask[None], stages[0].grid, size)[0]
    panel = (panel * 96 + (mask if mask is not None else 0) * 159).astype(np.uint8)
    storage.save_png(panel, storage.join(_OUT.value, "mask.png"))
    row = np.concatenate([image[None], np.repeat(panel[None, ..., None], 3, -1), out])
    storage.save_png(
        summaries.upscale(summaries.grid(row, len(row)), max(1, 128 // size)),
        storage.join(_OUT.value, "grid.png"),
    )
    try:
        scores = alignment.score(out, [prompt] * n)
    except ValueError:  # Prompts outside the shapes grammar cannot be checked.
        scores = {}
    record = {
        "mode": _MODE.value,
        "prompt": prompt,
        "negative_prompt": neg,
        "seed": _SEED.value,
        "base_step": step,
        "steps": steps,
        "image_size": size,
        "num_samples": n,
        "dilation": _DILATION.value,
        "feather": _FEATHER.value,
        "tokens_resampled": [int(m.sum()) for m in res.token_masks[0]],
        "alignment": scores,
    }
    if _MODE.value == "maskfree":
        record.update(
            iterations=_ITERATIONS.value,
            resample_fraction=_FRACTION.value,
            changed_per_iteration=[c.tolist() for c in res.changed_per_iteration],
        )
    if _MODE.value == "outpaint":
        record["pad"] = _PAD.value
    storage.write_json(storage.join(_OUT.value, "edit.json"), record)
    print(f"wrote {n} {_MODE.value} edits and grid.png to {_OUT.value} (base step {step})")
    if scores:
        print("alignment: " + " ".join(f"{k}={v:.3f}" for k, v in scores.items() if k != "count"))
    return 0


def run():
    flags.mark_flags_as_required(["config", "workdir", "image", "output_dir"])
    cli.run(main)


if __name__ == "__main__":
    run()
