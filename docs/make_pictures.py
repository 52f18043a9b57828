r"""Makes the README's pictures in docs/ from one main-job run, so pictures and scores agree.

    python -m muse_jax.pipeline --config=configs/shapes_tiny.py --workdir=runs/shapes
    python docs/make_pictures.py --config=configs/shapes_tiny.py --workdir=runs/shapes

Writes, from that workdir:
- `cascade_<group>.png` and `shapes_<group>.png` for the prompt groups seen, held_out and
  two_object: the grids the main job scored (`<workdir>/samples/`: the cascade's, and the base
  stage's own);
- `edit_inpaint.png` (input, mask, 4 edits), `edit_outpaint.png` (input, 4 outpaintings) and
  `edit_maskfree.png` (input, 4 edits): the README's editing examples on the cascade's sample of
  "a large red circle on the left" at seed 0.
`docs/serve.png` is made by `docs/serve_screenshot.py` (it needs a browser).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GROUPS = ("seen", "held_out", "two_object")
GRIDS = {  # docs name -> the main job's grid under <workdir>/samples.
    **{f"cascade_{g}.png": f"{g}.png" for g in GROUPS},
    **{f"shapes_{g}.png": f"base_{g}.png" for g in GROUPS},
}
PROMPT = "a large red circle on the left"


def _row(images, pad: int = 2):
    import numpy as np

    from muse_jax.inference import images as images_lib

    return images_lib.upscale(images_lib.grid(np.stack(images), columns=len(images), pad=pad), 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/shapes_tiny.py")
    parser.add_argument("--workdir", default="runs/shapes")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs"))
    args = parser.parse_args()
    samples = os.path.join(args.workdir, "samples")
    missing = [p for p in GRIDS.values() if not os.path.exists(os.path.join(samples, p))]
    if missing:
        sys.stderr.write(f"error: {samples} lacks {missing[0]}: run the main job first.\n")
        return 2

    import numpy as np

    from muse_jax import MusePipeline, config_files, storage

    for name, source in GRIDS.items():
        shutil.copyfile(os.path.join(samples, source), os.path.join(args.out, name))

    pipe = MusePipeline.from_workdir(config_files.load(args.config), args.workdir)
    image = pipe([PROMPT], seed=0).images[0]
    size = image.size[0]
    mask = np.zeros((size, size), np.uint8)
    mask[:, : size // 2] = 255  # The left half: where the circle is.
    inpaint = pipe.inpaint(image, mask, "a large blue circle on the left", num_images=4, seed=0)
    shown_mask = np.repeat((inpaint.mask * 255).astype(np.uint8)[..., None], 3, -1)
    rows = {
        "edit_inpaint.png": [inpaint.input_array, shown_mask, *inpaint.array],
        "edit_outpaint.png": [
            np.asarray(image),
            *pipe.outpaint(
                image, (0, 0, size // 2, 0), "a red circle left of a blue square", num_images=4
            ).array,
        ],
        "edit_maskfree.png": [
            np.asarray(image),
            *pipe.edit(image, "a large red square on the left", num_images=4, seed=0).array,
        ],
    }
    for name, images in rows.items():
        storage.save_png(_row(images), os.path.join(args.out, name))
    print(f"wrote {len(GRIDS) + len(rows)} pictures to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
