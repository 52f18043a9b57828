"""The embedded default's evaluation: sample seen and held-out prompts, score, write reports."""

from __future__ import annotations

import json
import os


def evaluate_alignment(config, workdir: str) -> dict:
    """Samples the config's seen and held-out prompts; writes grids, JSON and TensorBoard."""
    from clu import metric_writers

    from muse_jax.data import shapes
    from muse_jax.eval import alignment, alignment_eval
    from muse_jax.train import base_stage, summaries

    sampler, params, step, conditioner = base_stage.load_for_sampling(config, workdir)
    writer = metric_writers.create_default_writer(os.path.join(workdir, "eval"), asynchronous=False)
    report: dict = {"base_step": step, "sampling": config.sampling.to_dict()}
    n = config.eval.samples_per_prompt
    for split, prompts in (
        ("seen", config.eval.seen_prompts),
        ("held_out", config.eval.held_out_prompts),
    ):
        prompts = list(prompts)
        out = alignment_eval.generate(
            config, sampler, params, conditioner, prompts, samples_per_prompt=n, seed=1
        )
        image = summaries.upscale(summaries.grid(out.images, columns=n), 4)
        summaries.save_png(image, os.path.join(workdir, "samples", f"{split}.png"))
        writer.write_images(step, {f"samples/{split}": image[None]})
        writer.write_scalars(
            step,
            {f"alignment/{split}/{k}": v for k, v in out.scores.items() if k != "count" and v == v},
        )
        per_prompt = {
            p: alignment.score(out.images[i * n : (i + 1) * n], [p] * n)["all"]
            for i, p in enumerate(prompts)
        }
        report[split] = {"scores": out.scores, "per_prompt_all": per_prompt, "prompts": prompts}
    # Reference: the same checker on real renderings of the seen prompts (its ceiling).
    import numpy as np

    rng = np.random.default_rng(0)
    real = [
        shapes.render(shapes.scene_from_caption(p, rng), config.data.image_size)
        for p in config.eval.seen_prompts
    ]
    report["checker_on_real_images"] = alignment.score(
        np.stack(real), list(config.eval.seen_prompts)
    )
    writer.flush()
    with open(os.path.join(workdir, "alignment.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def table(report: dict) -> str:
    """Per-attribute scores of seen and held-out prompts as a fixed-width text table."""
    attrs = ("color", "shape", "size", "position", "all")
    lines = [f"{'prompts':<10}" + "".join(f"{a:>10}" for a in attrs)]
    for split in ("seen", "held_out"):
        s = report[split]["scores"]
        lines.append(f"{split:<10}" + "".join(f"{s.get(a, float('nan')):>10.3f}" for a in attrs))
    return "\n".join(lines)
