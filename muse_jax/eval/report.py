"""The embedded default's evaluation: sample seen and held-out prompts, score, write reports.

With the super-res stages trained, the same samples are scored twice: the base stage's own
output (low-res) and the cascade's (high-res), so the two numbers compare like with like.
"""

from __future__ import annotations

import numpy as np

from muse_jax import storage

ATTRIBUTES = ("color", "shape", "size", "position", "all")


def evaluate_alignment(config, workdir: str, cascade: bool = False) -> dict:
    """Samples the config's seen and held-out prompts; writes grids, JSON and TensorBoard."""
    from clu import metric_writers

    from muse_jax.data import shapes
    from muse_jax.data import shapes_alignment as alignment
    from muse_jax.eval import alignment_eval
    from muse_jax.inference import images as summaries
    from muse_jax.inference.pipeline import MusePipeline

    n = config.eval.samples_per_prompt
    splits = (
        ("seen", list(config.eval.seen_prompts)),
        ("held_out", list(config.eval.held_out_prompts)),
    )
    every_prompt = [p for _, prompts in splits for p in prompts]
    # One sampler call (one compilation) for every prompt, then split by prompt group.
    pipe = MusePipeline.from_workdir(
        config,
        workdir,
        stages="cascade" if cascade else "base",
        batch_size=n * len(every_prompt),
    )
    steps = {k: v for k, v in pipe.steps.items() if k in ("base", "superres", "decoder")}
    step = steps["superres"] if cascade else steps["base"]
    writer = metric_writers.create_default_writer(storage.join(workdir, "eval"), asynchronous=False)
    report: dict = {"steps": steps, "sampling": config.base.sampling.to_dict(), "cascade": cascade}
    if cascade:
        report["superres_sampling"] = config.superres.sampling.to_dict()
    every = alignment_eval.generate(pipe, every_prompt, samples_per_prompt=n, seed=1)
    start = 0
    for split, prompts in splits:
        out = alignment_eval.subset(every, slice(start, start + n * len(prompts)))
        start += n * len(prompts)
        outputs = {"": out.images}
        if out.lowres_images is not None:
            outputs["base_"] = out.lowres_images
            report[split] = {"base_scores": out.lowres_scores}
        for prefix, images in outputs.items():
            scale = max(1, 128 // images.shape[1])
            image = summaries.upscale(summaries.grid(images, columns=n), scale)
            storage.save_png(image, storage.join(workdir, "samples", f"{prefix}{split}.png"))
            writer.write_images(step, {f"samples/{prefix}{split}": image[None]})
        scored = {"": out.scores, "base_": out.lowres_scores or {}}
        for prefix, scores in scored.items():
            writer.write_scalars(
                step,
                {
                    f"alignment/{prefix}{split}/{k}": v
                    for k, v in scores.items()
                    if k != "count" and v == v
                },
            )
        per_prompt = {
            p: alignment.score(out.images[i * n : (i + 1) * n], [p] * n)["all"]
            for i, p in enumerate(prompts)
        }
        report.setdefault(split, {}).update(
            scores=out.scores, per_prompt_all=per_prompt, prompts=prompts
        )
        report[split]["image_size"] = int(out.images.shape[1])
    # Reference: the same checker on real renderings of the seen prompts (its ceiling).
    rng = np.random.default_rng(0)
    size = int(report["seen"]["image_size"])
    real = [
        shapes.render(shapes.scene_from_caption(p, rng), size) for p in config.eval.seen_prompts
    ]
    report["checker_on_real_images"] = alignment.score(
        np.stack(real), list(config.eval.seen_prompts)
    )
    writer.flush()
    storage.write_json(storage.join(workdir, "alignment.json"), report)
    return report


def table(report: dict) -> str:
    """Per-attribute scores of seen and held-out prompts as a fixed-width text table."""
    lines = [f"{'prompts':<22}" + "".join(f"{a:>10}" for a in ATTRIBUTES)]
    for split in ("seen", "held_out"):
        r = report[split]
        rows = [(f"{split}", r["scores"])]
        if "base_scores" in r:
            rows = [
                (f"{split} base only", r["base_scores"]),
                (f"{split} cascade {r['image_size']}px", r["scores"]),
            ]
        for name, s in rows:
            lines.append(
                f"{name:<22}" + "".join(f"{s.get(a, float('nan')):>10.3f}" for a in ATTRIBUTES)
            )
    return "\n".join(lines)
