r"""What the Python API costs per call, and what changing a setting recompiles.

  python benchmarks/pipeline_api.py --model=models/shapes [--workdir=runs/shapes]

Loads an exported model with `MusePipeline.from_pretrained`, then times a sequence of calls and
counts XLA compilations during each (jax.monitoring's backend-compile events):
the first call; calls with another guidance scale, temperature, seed and negative prompt; a new
step count (twice); a new batch size (twice). With `--workdir`, also prints the exported
directory's size against the training workdir's.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Exported model directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir, for the size comparison.")
_PROMPT = flags.DEFINE_string("prompt", "a large red circle on the left", "Prompt.")
_BATCH = flags.DEFINE_integer("images", 8, "Images per call.")


def _size(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main(argv):
    del argv
    from muse_jax import MusePipeline

    compiles: list[float] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    t = time.perf_counter()
    pipe = MusePipeline.from_pretrained(_MODEL.value)
    print(f"load: {time.perf_counter() - t:.2f} s, {len(compiles)} compiles")
    n = _BATCH.value
    steps = int(pipe.config.base.sampling.num_steps)
    calls = [
        ("first call", {}),
        ("guidance 3 -> 5", {"guidance_scale": 5.0}),
        ("temperature 1 -> 0.7", {"guidance_scale": 5.0, "temperature": 0.7}),
        ("seed 0 -> 1", {"seed": 1}),
        ("negative prompt", {"negative_prompt": "a blue square"}),
        (f"num_steps {steps} -> {steps + 4}", {"num_steps": steps + 4}),
        (f"num_steps {steps + 4} again, seed 2", {"num_steps": steps + 4, "seed": 2}),
        (f"batch {n} -> {n // 2}", {"n": n // 2}),
        (f"batch {n // 2} again, seed 3", {"n": n // 2, "seed": 3}),
    ]
    print(f"{'call':<34}{'seconds':>10}{'compiles':>10}{'compile s':>11}")
    for name, kw in calls:
        count = kw.pop("n", n)
        before = len(compiles)
        t = time.perf_counter()
        out = pipe([_PROMPT.value], num_images_per_prompt=count, **kw)
        jax.block_until_ready(out.tokens)
        wall = time.perf_counter() - t
        new = compiles[before:]
        print(f"{name:<34}{wall:>10.2f}{len(new):>10}{sum(new):>11.2f}")
    if _WORKDIR.value:
        exported, trained = _size(_MODEL.value), _size(_WORKDIR.value)
        print(
            f"exported model {exported / 1e6:.2f} MB; training workdir {trained / 1e6:.2f} MB "
            f"({trained / exported:.1f}x)"
        )
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["model"])
    app.run(main)
