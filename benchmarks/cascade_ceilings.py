r"""Where the cascade loses quality: the pixel checker on real scenes passed through each part.

For every prompt group of the config (seen, held-out, two-object), real renderings of its
prompts go through, one part at a time:
  - the low-res tokenizer (32 px reconstructions: the most the base stage can draw);
  - the high-res tokenizer with the decoder the cascade uses (64 px reconstructions);
  - the super-res transformer given the real scenes' low-res tokens (the super-res stage alone,
    without the base stage's mistakes).
A part that scores below the one before it is where the cascade loses.

  python benchmarks/cascade_ceilings.py --config=configs/shapes_tiny.py --workdir=runs/shapes
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory (the main job's).")
_PER_PROMPT = flags.DEFINE_integer("per_prompt", 4, "Real scenes per prompt (random layouts).")
_SEED = flags.DEFINE_integer("seed", 7, "Layouts and super-res sampling.")


def main(_):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from muse_jax.data import shapes
    from muse_jax.data import shapes_alignment as alignment
    from muse_jax.inference import images as images_lib
    from muse_jax.inference.pipeline import MusePipeline
    from muse_jax.prompt_groups import prompt_groups

    config, k = _CONFIG.value, _PER_PROMPT.value
    groups = [(g, [p for p in ps if shapes.in_grammar(p)]) for g, ps in prompt_groups(config.eval)]
    captions = [p for _, ps in groups for p in ps for _ in range(k)]
    rng = np.random.default_rng(_SEED.value)
    scenes = [shapes.scene_from_caption(c, rng) for c in captions]
    lo_size, hi_size = config.data.image_size, config.data.hr_image_size
    real_lo = np.stack([shapes.render(s, lo_size) for s in scenes])
    real_hi = np.stack([shapes.render(s, hi_size) for s in scenes])

    model = MusePipeline.from_workdir(config, _WORKDIR.value, stages="cascade").model
    base, sr = model.base_sampler, model.superres_sampler
    base_p, sr_p = model.params["base"], model.params["superres"]
    pm1 = lambda x: jnp.asarray(x, jnp.float32) / 127.5 - 1
    tokenize = jax.jit(
        lambda s, p, x: s.tokenizer.apply({"params": p["vq"]}, x, method=s.tokenizer.tokenize),
        static_argnums=0,
    )
    pixels = lambda s, p, t: images_lib.to_uint8(np.asarray(s.decode_pixels(p, t)))
    low_tokens = tokenize(base, base_p, pm1(real_lo))
    text = model.conditioner.encode(captions)
    empty = {k: np.repeat(v, len(captions), 0) for k, v in model.conditioner.encode([""]).items()}
    superres = sr(sr_p, text, empty, jax.random.PRNGKey(_SEED.value), lowres_tokens=low_tokens)
    parts = {
        f"real {lo_size} px": real_lo,
        f"real {hi_size} px": real_hi,
        "low-res tokenizer": pixels(base, base_p, low_tokens),
        "high-res tokenizer + decoder": pixels(sr, sr_p, tokenize(sr, sr_p, pm1(real_hi))),
        "super-res on real low tokens": images_lib.to_uint8(np.asarray(superres.images)),
    }
    print(f"steps {model.steps}; {k} real scenes per prompt; 'all' (shape) per group")
    print(f"{'part':<32}" + "".join(f"{g:>22}" for g, _ in groups))
    for name, images in parts.items():
        cells, start = [], 0
        for _, prompts in groups:
            rows = slice(start, start + k * len(prompts))
            start += k * len(prompts)
            s = alignment.score(images[rows], captions[rows])
            cells.append(f"{s['all']:.3f} ({s['shape']:.3f})")
        print(f"{name:<32}" + "".join(f"{c:>22}" for c in cells), flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
