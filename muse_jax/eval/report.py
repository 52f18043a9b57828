"""The embedded default's evaluation: sample every prompt group, score, write reports.

The groups are the config's (`muse_jax.prompt_groups`: seen single-object prompts, held-out
colour-shape combinations, two-object relations). With the super-res stages trained, the same
samples are scored twice: the base stage's own output (low-res) and the cascade's (high-res),
so the two numbers compare like with like. A prompt outside the shapes grammar is still
sampled; only its score is skipped, and the report lists it.
"""

from __future__ import annotations

import numpy as np

from muse_jax import storage
from muse_jax.eval import alignment_eval

COLUMNS = ("color", "shape", "size", "position", "relation", "count", "all")


def evaluate_alignment(config, workdir: str, cascade: bool = False) -> dict:
    """Samples the config's prompt groups; writes grids, JSON and TensorBoard."""
    from clu import metric_writers

    from muse_jax.data import shapes
    from muse_jax.inference import images as summaries
    from muse_jax.inference.pipeline import MusePipeline
    from muse_jax.prompt_groups import prompt_groups

    n = config.eval.samples_per_prompt
    groups = prompt_groups(config.eval)
    every_prompt = [p for _, prompts in groups for p in prompts]
    # Sampler calls of at most eval.batch_size images (one compilation: a short last call is
    # padded), then split by prompt group. One call for every image would hold every image's
    # activations at once: memory grows with the sample count, and XLA:CPU faults in the
    # larger buffers afresh on every call.
    pipe = MusePipeline.from_workdir(
        config,
        workdir,
        stages="cascade" if cascade else "base",
        batch_size=min(n * len(every_prompt), int(config.eval.batch_size)),
    )
    steps = pipe.trained_steps
    step = steps["superres"] if cascade else steps["base"]
    writer = metric_writers.create_default_writer(storage.join(workdir, "eval"), asynchronous=False)
    report: dict = {
        "steps": steps,
        "sampling": config.base.sampling.to_dict(),
        "cascade": cascade,
        "seed": int(config.eval.seed),
        "samples_per_prompt": int(n),
        "groups": [g for g, _ in groups],
    }
    if cascade:
        report["superres_sampling"] = config.superres.sampling.to_dict()
    every = alignment_eval.generate(
        pipe, every_prompt, samples_per_prompt=n, seed=int(config.eval.seed)
    )
    rng = np.random.default_rng(0)
    start = 0
    for group, prompts in groups:
        rows = slice(start, start + n * len(prompts))
        start += n * len(prompts)
        images, captions = every.images[rows], every.captions[rows]
        outputs = {"": images}
        if every.lowres_images is not None:
            outputs["base_"] = every.lowres_images[rows]
        entry: dict = {"prompts": prompts, "image_size": int(images.shape[1])}
        for prefix, shown in outputs.items():
            scale = max(1, 128 // shown.shape[1])
            grid = summaries.upscale(summaries.grid(shown, columns=n), scale)
            storage.save_png(grid, storage.join(workdir, "samples", f"{prefix}{group}.png"))
            writer.write_images(step, {f"samples/{prefix}{group}": grid[None]})
            scores, skipped = alignment_eval.readable_scores(shown, captions)
            entry[f"{prefix}scores"] = scores
            entry["skipped_prompts"] = skipped
            writer.write_scalars(
                step,
                {
                    f"alignment/{prefix}{group}/{k}": v
                    for k, v in scores.items()
                    if k != "n" and v == v
                },
            )
        entry["per_prompt_all"] = {
            p: alignment_eval.readable_scores(images[i * n : (i + 1) * n], [p] * n)[0].get("all")
            for i, p in enumerate(prompts)
        }
        # The checker's ceiling: the same prompts rendered by the dataset's own renderer.
        readable = [p for p in prompts if p not in entry["skipped_prompts"]]
        if readable:
            size = int(images.shape[1])
            real = [shapes.render(shapes.scene_from_caption(p, rng), size) for p in readable]
            entry["checker_on_real_images"] = alignment_eval.readable_scores(
                np.stack(real), readable
            )[0]
        report[group] = entry
    if cascade:
        report["frechet"] = _frechet(pipe.model, report, every, n)
        writer.write_scalars(
            step, {f"frechet/{k}": v for k, v in report["frechet"].items() if k != "n"}
        )
    writer.flush()
    storage.write_json(storage.join(workdir, "alignment.json"), report)
    return report


def _frechet(model, report: dict, every, n: int) -> dict:
    """The cascade's and the upsampled base stage's Fréchet distances to real renderings of the
    scored prompts, with the real-vs-real floor (`muse_jax.eval.tokenizer_frechet`)."""
    from muse_jax.eval import tokenizer_frechet

    keep, prompts, start = [], [], 0
    for group in report["groups"]:
        for p in report[group]["prompts"]:
            if p not in report[group]["skipped_prompts"]:
                keep.extend(range(start, start + n))
                prompts.append(p)
            start += n
    images, low = every.images[keep], every.lowres_images[keep]
    scale = images.shape[1] // low.shape[1]
    upsampled = low.repeat(scale, axis=1).repeat(scale, axis=2)
    outputs = {"cascade": images, "base_upsampled": upsampled}
    return tokenizer_frechet.distances(model, outputs, prompts, n)


def skipped_prompts(report: dict) -> list[str]:
    """The report's prompts outside the shapes grammar (sampled, not scored)."""
    return [p for g in report.get("groups", ()) for p in report[g].get("skipped_prompts", ())]


def table(report: dict) -> str:
    """Per-attribute scores of every prompt group as a fixed-width text table: the base
    stage's own samples and, with the cascade, the cascade's. '-' marks an attribute that no
    prompt of the group states."""
    lines = [f"{'prompts':<24}" + "".join(f"{a:>10}" for a in COLUMNS)]
    for group in report.get("groups", ()):
        r = report[group]
        rows = [(group, r["scores"])]
        if "base_scores" in r:
            rows = [
                (f"{group} base", r["base_scores"]),
                (f"{group} cascade {r['image_size']}px", r["scores"]),
            ]
        for name, s in rows:
            cells = []
            for a in COLUMNS:
                v = s.get(a)
                cells.append(f"{'-':>10}" if v is None or v != v else f"{v:>10.3f}")
            lines.append(f"{name:<24}" + "".join(cells))
    fd = report.get("frechet")
    if fd:
        lines.append(
            f"Fréchet distance to real renderings (high-res tokenizer features, {fd['n']} images):"
            f" cascade {fd['cascade']:.3f}, base upsampled {fd['base_upsampled']:.3f},"
            f" real vs real {fd['real_floor']:.3f}"
        )
    skipped = skipped_prompts(report)
    if skipped:
        lines.append(f"not scored (outside the shapes grammar): {', '.join(map(repr, skipped))}")
    return "\n".join(lines)
