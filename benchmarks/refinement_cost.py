r"""What self-critic refinement costs: base-stage sampling time with and without it.

Samples the config's scored prompts (the main job's three groups) from a trained workdir through
`MusePipeline`, once per `refine_rounds` setting, and prints the best of `--repeats` timed calls
(after one untimed call that compiles) and the ratio against refinement off.

  python benchmarks/refinement_cost.py --config=configs/shapes_tiny.py --workdir=runs/shapes
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Trained workdir (the main job's).")
_PER_PROMPT = flags.DEFINE_integer("images_per_prompt", 4, "Images per scored prompt.")
_ROUNDS = flags.DEFINE_list("rounds", ["0", "4"], "refine_rounds settings to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per setting (the best is printed).")


def main(argv):
    del argv
    from muse_jax.inference.pipeline import MusePipeline
    from muse_jax.prompt_groups import all_prompts

    config = _CONFIG.value
    prompts = all_prompts(config.eval)
    n = len(prompts) * _PER_PROMPT.value
    pipe = MusePipeline.from_workdir(config, _WORKDIR.value, stages="base", batch_size=n)
    print(f"{n} images per call ({len(prompts)} prompts x {_PER_PROMPT.value}), base stage")
    baseline = None
    for rounds in (int(r) for r in _ROUNDS.value):
        times = []
        for seed in range(_REPEATS.value + 1):
            t = time.perf_counter()
            out = pipe(
                prompts, num_images_per_prompt=_PER_PROMPT.value, seed=seed, refine_rounds=rounds
            )
            jax.block_until_ready(out.tokens)
            times.append(time.perf_counter() - t)
        best = min(times[1:])  # The first call compiles.
        baseline = best if baseline is None else baseline
        print(f"refine_rounds={rounds}: {best:.2f} s per call ({best / baseline:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
