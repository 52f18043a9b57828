r"""Edit success rate: does an edit change the attribute it names and keep the others?

Each single-object seen prompt of the config is rendered (a real scene, at the cascade's size)
and edited three ways: its colour, its shape and its position changed in the prompt. An edit
succeeds when the pixel checker finds every attribute of the edited prompt (the new one and the
kept ones) in the result. Two editors:
  - mask-free (`MusePipeline.edit`, the README's command; `--critic=0` for the uniform choice
    of tokens to re-sample);
  - inpainting (`MusePipeline.inpaint`) with the mask a user would draw: the source object and
    the edited object's place, dilated by a few pixels.

  python benchmarks/edit_success.py --config=configs/shapes_tiny.py --workdir=runs/shapes
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory (the main job's).")
_PER_EDIT = flags.DEFINE_integer("per_edit", 4, "Edited images per source and edit kind.")
_SEED = flags.DEFINE_integer("seed", 3, "Layouts and edit sampling.")
_DILATION = flags.DEFINE_integer("mask_dilation", 3, "Pixels added around the inpainting mask.")
_ITERATIONS = flags.DEFINE_integer("iterations", 4, "Mask-free: re-sampling rounds.")
_FRACTION = flags.DEFINE_float(
    "resample_fraction", None, "Mask-free: tokens per round (default: the pipeline's)."
)
_CRITIC = flags.DEFINE_float("critic", 10.0, "Mask-free: the text critic's weight (0: uniform).")

KEPT_TOLERANCE = 32  # Of 255: a pixel counts as kept within this much in every channel.

OPPOSITE = {
    "on the left": "on the right",
    "on the right": "on the left",
    "at the top": "at the bottom",
    "at the bottom": "at the top",
    "in the center": "on the left",
}


def foreground(image: np.ndarray) -> np.ndarray:
    """Pixels that are not background (the shapes world's background is black)."""
    return image.max(axis=-1) > 64


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a & b) / max(1, np.sum(a | b)))


def edits(prompt: str) -> dict[str, str]:
    """The colour, shape and position edits of a single-object prompt of the shapes grammar."""
    from muse_jax.data import shapes

    p = shapes.parse_caption(prompt)
    colors, shape_names = list(shapes.COLORS), list(shapes.SHAPES)
    color, shape = p.colors[0], p.shapes[0]
    new_color = colors[(colors.index(color) + 1) % len(colors)]
    new_shape = shape_names[(shape_names.index(shape) + 1) % len(shape_names)]
    caption = lambda c, s, pos: f"a {p.size} {c} {s} {pos}"
    return {
        "colour": caption(new_color, shape, p.position),
        "shape": caption(color, new_shape, p.position),
        "position": caption(color, shape, OPPOSITE[p.position]),
    }


def main(_):
    from scipy import ndimage

    from muse_jax.data import shapes
    from muse_jax.data import shapes_alignment as alignment
    from muse_jax.inference.pipeline import MusePipeline
    from muse_jax.sampling import editing

    config, k = _CONFIG.value, _PER_EDIT.value
    fraction = editing.DEFAULT_RESAMPLE_FRACTION if _FRACTION.value is None else _FRACTION.value
    sources = [
        p
        for p in config.eval.seen_prompts
        if shapes.in_grammar(p) and shapes.parse_caption(p).relation is None
    ]
    pipe = MusePipeline.from_workdir(config, _WORKDIR.value, stages="cascade", batch_size=k)
    size = pipe.image_size("cascade")
    rng = np.random.default_rng(_SEED.value)
    keys = [(m, e) for m in ("mask-free", "inpaint") for e in ("colour", "shape", "position")]
    wins = {key: [] for key in keys}
    kept = {key: [] for key in keys}  # Pixels outside the edit's region left as they were.
    changed = {key: [] for key in keys}  # Base tokens the edit changed.
    # Foreground IoU of input and edit: a colour edit that keeps the object where and as it
    # was scores near 1; one that re-draws the scene from the prompt scores far less.
    footprint = {key: [] for key in keys}
    for i, source in enumerate(sources):
        scene = shapes.scene_from_caption(source, rng)
        image = shapes.render(scene, size)
        for kind, target in edits(source).items():
            obj = scene.objects[0]
            if kind == "position":
                obj_after = shapes.scene_from_caption(target, rng).objects[0]
            else:
                obj_after = obj  # Same place and extent.
            region = shapes.object_mask(obj, size) | shapes.object_mask(obj_after, size)
            region = ndimage.binary_dilation(region, iterations=_DILATION.value)
            outs = {
                "mask-free": pipe.edit(
                    image, target, num_images=k, seed=_SEED.value + i,
                    iterations=_ITERATIONS.value, resample_fraction=fraction,
                    critic=_CRITIC.value,
                ),
                "inpaint": pipe.inpaint(
                    image, region.astype(np.uint8) * 255, target, num_images=k,
                    seed=_SEED.value + i,
                ),
            }  # fmt: skip
            for mode, out in outs.items():
                wins[mode, kind] += [all(alignment.check(x, target).values()) for x in out.array]
                same = np.abs(out.array.astype(int) - image.astype(int)).max(-1) <= KEPT_TOLERANCE
                kept[mode, kind] += [float(np.mean(s[~region])) for s in same]
                changed[mode, kind] += list(np.mean(out.result.token_masks[0], axis=-1))
                footprint[mode, kind] += [iou(foreground(image), foreground(x)) for x in out.array]
        print(f"[edit_success] {i + 1}/{len(sources)} sources", flush=True)
    print(
        f"mask-free: {_ITERATIONS.value} rounds x {fraction:.0%} re-sampled, critic "
        f"{_CRITIC.value:g}"
    )
    print(f"{len(sources)} sources x {k} edits each, {size}x{size}; success = every attribute of")
    print("the edited prompt found (the edited one changed, the others kept)")
    print(f"kept: pixels outside the inpainting mask left as they were (within {KEPT_TOLERANCE}")
    print("of 255 in every channel);")
    print("changed: base tokens the edit changed; footprint: foreground IoU of input and edit")
    head = ("success", "kept", "changed", "footprint")
    print(f"{'':<10}" + "".join(f"{h:>11}" for h in head) + f"{'inpaint':>11}{'footprint':>11}")
    for kind in ("colour", "shape", "position"):
        row = [float(np.mean(d["mask-free", kind])) for d in (wins, kept, changed, footprint)]
        row += [float(np.mean(d["inpaint", kind])) for d in (wins, footprint)]
        print(f"{kind:<10}" + "".join(f"{v:>11.3f}" for v in row))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
