"""Evaluates checkpoints: generate the evaluation captions, run the metric plug-ins, write results.

One evaluation = one base-stage checkpoint step (with the cascade, the super-res stage and the
decoder at their latest). Results of `--stages=base` and `--stages=cascade` go to separate
TensorBoard runs, `<workdir>/eval/base` and `<workdir>/eval/cascade`, since the same tag at the
same step would otherwise mean two different image sets:

  events.out.tfevents.*   scalars eval/<metric> and a captioned grid eval/samples at the step
  metrics_<step>.json     metrics, steps of each stage, sampler settings, wall time per part
  evaluated.json          steps done, so a restarted `watch` does not redo them
"""

from __future__ import annotations

import dataclasses
import textwrap
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np

from muse_jax import storage
from muse_jax.errors import UsageError
from muse_jax.eval import metrics as metrics_lib
from muse_jax.prompt_groups import prompt_groups

Log = Callable[[str], None]
CAPTION_SOURCES = ("prompts", "dataset")


def _print(line: str) -> None:
    print(line, flush=True)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One sampler call: `samples_per_prompt` images of each prompt, from `seed`.

    The call gets `size` prompts (the last one repeated), so that every call of an evaluation
    has one shape and the sampler compiles once; the padding's images are dropped.
    """

    group: str
    prompts: list[str]
    samples_per_prompt: int
    seed: int
    size: int

    def padded(self) -> list[str]:
        return self.prompts + [self.prompts[-1]] * (self.size - len(self.prompts))


def chunks(config, workdir: str) -> Iterator[Chunk]:
    """The evaluation set, in sampler calls of at most `eval.batch_size` images.

    captions="prompts": the config's prompt groups (`muse_jax.prompt_groups`: seen, held-out,
    two-object), `samples_per_prompt` each; chunk k of a group samples with seed `eval.seed + k`. captions="dataset": the first
    caption of each of the first `eval.num_images` records of `eval.split`, in storage order,
    one image each; chunk k samples with seed `eval.seed + k`.
    """
    ev = config.eval
    source = ev.captions
    batch_size = int(ev.batch_size)
    if source == "prompts":
        n = int(ev.samples_per_prompt)
        groups = prompt_groups(ev)
        if not groups:
            raise UsageError("config.eval names no prompts (seen_prompts, held_out_prompts, ...).")
        per_chunk = max(1, batch_size // n)
        size = min(per_chunk, max(len(p) for _, p in groups))
        for group, prompts in groups:
            for k, start in enumerate(range(0, len(prompts), per_chunk)):
                yield Chunk(group, prompts[start : start + per_chunk], n, int(ev.seed) + k, size)
    elif source == "dataset":
        from muse_jax.data import tasks

        left = int(ev.num_images)
        batches = tasks.batches(
            config,
            workdir,
            split=ev.split,
            batch_size=batch_size,
            seed=0,
            shuffle=False,
            repeat=False,
            keep_captions=True,
        )
        for k, batch in enumerate(batches):
            if left <= 0:
                return
            captions = [c.decode("utf-8") for c in batch["caption"][:left]]
            left -= len(captions)
            size = min(batch_size, int(ev.num_images))
            yield Chunk(ev.split, captions, 1, int(ev.seed) + k, size)
    else:
        raise UsageError(f"config.eval.captions={source!r}; valid: {', '.join(CAPTION_SOURCES)}.")


def _generate(config, loaded, chunk: Chunk) -> metrics_lib.Batch:
    """Images of one chunk's prompts (the padding's images dropped)."""
    from muse_jax.eval import alignment_eval

    real = len(chunk.prompts) * chunk.samples_per_prompt
    out = alignment_eval.generate(
        loaded, chunk.padded(), samples_per_prompt=chunk.samples_per_prompt, seed=chunk.seed
    )
    low = None if out.lowres_images is None else out.lowres_images[:real]
    return metrics_lib.Batch(out.images[:real], out.captions[:real], chunk.group, low)


def captioned_grid(
    images: np.ndarray, captions: list[str], columns: int = 4, cell: int = 128, lines: int = 3
) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 image: each sample enlarged to ~`cell` px (nearest
    neighbour) above its caption, wrapped to `lines` lines in PIL's default font."""
    from PIL import Image, ImageDraw, ImageFont

    from muse_jax.inference import images as summaries

    n, h, w, _ = images.shape
    scale = max(1, cell // max(h, w))
    h, w = h * scale, w * scale
    font = ImageFont.load_default()
    line_h, pad = 12, 2
    text_h = lines * line_h + 2 * pad
    columns = min(columns, n)
    rows = -(-n // columns)
    canvas = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + text_h + pad)), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    chars = max(8, int(w / max(draw.textlength("x", font=font), 1)))
    for i, (image, caption) in enumerate(zip(images, captions)):
        r, c = divmod(i, columns)
        x, y = pad + c * (w + pad), pad + r * (h + text_h + pad)
        canvas.paste(Image.fromarray(summaries.upscale(image, scale)), (x, y))
        wrapped = textwrap.wrap(caption, chars, max_lines=lines, placeholder="...")
        for j, text in enumerate(wrapped):
            draw.text((x + pad, y + h + pad + j * line_h), text, fill=(235, 235, 235), font=font)
    return np.asarray(canvas)


def run_dir(workdir: str, cascade: bool) -> str:
    return storage.join(workdir, "eval", "cascade" if cascade else "base")


def _read_done(directory: str) -> dict[str, list[int]]:
    path = storage.join(directory, "evaluated.json")
    if not storage.exists(path):
        return {"evaluated": [], "skipped": []}
    return storage.read_json(path)


def _write_json(path: str, obj) -> None:
    """Atomically, so a killed evaluator never leaves half a file for the next to trip on."""
    storage.write_json(path, obj)


def _mark(directory: str, step: int, key: str = "evaluated") -> None:
    done = _read_done(directory)
    done[key] = sorted(set(done.get(key, [])) | {step})
    _write_json(storage.join(directory, "evaluated.json"), done)


class Evaluator:
    """Holds the metric plug-ins (their weights and reference statistics load once) and
    evaluates checkpoints of one experiment, one stages setting."""

    def __init__(self, config, workdir: str, cascade: bool, log: Log = _print):
        self.config, self.workdir, self.cascade, self.log = config, workdir, cascade, log
        self.directory = run_dir(workdir, cascade)
        if config.eval.captions not in CAPTION_SOURCES:
            raise UsageError(
                f"config.eval.captions={config.eval.captions!r}; valid: {', '.join(CAPTION_SOURCES)}."
            )
        setup = metrics_lib.Setup(config, workdir, "image_hr" if cascade else "image", log)
        self.metrics = metrics_lib.build(setup)  # Validates names and paths: fails fast.
        self.setup_s: dict[str, float] = {}

    def _prepare(self) -> None:
        for m in self.metrics:
            if m.name not in self.setup_s:
                t0 = time.perf_counter()
                m.prepare()
                self.setup_s[m.name] = time.perf_counter() - t0

    def evaluate(self, step: int | None = None) -> dict:
        """Evaluates the base checkpoint `step` (default: the latest); returns the JSON record."""
        from muse_jax.inference.pipeline import MusePipeline

        t0 = time.perf_counter()
        ev = self.config.eval
        loaded = MusePipeline.from_workdir(
            self.config,
            self.workdir,
            stages="cascade" if self.cascade else "base",
            base_step=step,
            # Every chunk is one sampler call (see `chunks`).
            batch_size=max(int(ev.batch_size), int(ev.get("samples_per_prompt", 1))),
            max_images=1 << 30,
        )
        steps = loaded.trained_steps
        step = int(steps["base"])
        wall = {"load": time.perf_counter() - t0, "generate": 0.0}
        self._prepare()  # After the checkpoint loads: a missing one fails before this work.
        for m in self.metrics:
            m.reset()
            m.bind(loaded.model)
            wall[m.name] = 0.0
        grid: dict[str, list] = {"images": [], "lowres": [], "captions": []}
        count = image_size = 0
        for chunk in chunks(self.config, self.workdir):
            t = time.perf_counter()
            batch = _generate(self.config, loaded, chunk)
            wall["generate"] += time.perf_counter() - t
            count, image_size = count + len(batch.images), int(batch.images.shape[1])
            self._keep_for_grid(grid, batch)
            for m in self.metrics:
                t = time.perf_counter()
                m.update(batch)
                wall[m.name] += time.perf_counter() - t
            rate = count / max(wall["generate"], 1e-9)
            self.log(f"[evaluate] step {step}: {count} images generated ({rate:.2f}/s)")
        values: dict[str, float] = {}
        for m in self.metrics:
            t = time.perf_counter()
            values.update({k: float(v) for k, v in m.result().items()})
            wall[m.name] += time.perf_counter() - t
        record = {
            "step": step,
            "stages": "cascade" if self.cascade else "base",
            "steps": steps,
            "metrics": values,
            "num_images": count,
            "image_size": image_size,
            "eval": self.config.eval.to_dict(),
            "sampling": self.config.base.sampling.to_dict(),
            "wall_s": wall,
            "s_per_1k_images": {k: 1000 * v / count for k, v in wall.items() if k != "load"},
            "setup_s": dict(self.setup_s),  # One-time: weights, FID reference statistics.
        }
        if self.cascade:
            record["superres_sampling"] = self.config.superres.sampling.to_dict()
        if jax.process_index() == 0:
            self._write(step, record, grid)
        shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        self.log(f"[evaluate] step {step} ({self.directory}): {shown}")
        return record

    def _keep_for_grid(self, grid: dict, batch: metrics_lib.Batch) -> None:
        """The first sample of each of the first `eval.grid_size` distinct captions."""
        for i, caption in enumerate(batch.captions):
            if len(grid["captions"]) >= int(self.config.eval.grid_size):
                return
            if caption not in grid["captions"]:
                grid["captions"].append(caption)
                grid["images"].append(batch.images[i])
                if batch.lowres_images is not None:
                    grid["lowres"].append(batch.lowres_images[i])

    def _write(self, step: int, record: dict, grid: dict) -> None:
        from clu import metric_writers

        writer = metric_writers.create_default_writer(self.directory, asynchronous=False)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in record["metrics"].items()})
        if grid["captions"]:
            images = {"eval/samples": captioned_grid(np.stack(grid["images"]), grid["captions"])}
            if grid["lowres"]:
                images["eval/samples_base_only"] = captioned_grid(
                    np.stack(grid["lowres"]), grid["captions"]
                )
            writer.write_images(step, {k: v[None] for k, v in images.items()})
            captions = "\n".join(f"{i}. {c}" for i, c in enumerate(grid["captions"]))
            writer.write_texts(step, {"eval/captions": captions})
        writer.flush()
        writer.close()
        _write_json(storage.join(self.directory, f"metrics_{step}.json"), record)
        _mark(self.directory, step)

    def watch(
        self,
        poll_s: float,
        timeout_s: float,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> list[int]:
        """Evaluates each new finalized base checkpoint once, oldest first; returns the steps
        evaluated. Stops after the stage's final step is evaluated (`base.train.num_steps`, or
        the step its run ended at when its wall-clock cap stopped it), or after `timeout_s`
        seconds without a new checkpoint."""
        from muse_jax import checkpoints, stages

        base_dir = stages.stage_dir(self.config, self.workdir, "base")
        directory = checkpoints.checkpoint_dir(base_dir)

        def final_step() -> int:
            ended = stages.stopped_at(base_dir)
            last = int(self.config.base.train.num_steps)
            return last if ended is None else min(ended, last)

        final = final_step()
        done = _read_done(self.directory)
        finished = set(done["evaluated"]) | set(done.get("skipped", []))
        self.log(
            f"[evaluate] watching {directory} every {poll_s:g}s until step {final} "
            f"(already evaluated: {sorted(finished) or 'none'})"
        )
        evaluated: list[int] = []
        last_new = clock()
        while not any(s >= final for s in finished):
            pending = [s for s in finalized_steps(directory) if s not in finished]
            if not pending:
                if clock() - last_new >= timeout_s:
                    self.log(f"[evaluate] no new checkpoint for {timeout_s:g}s; stopping")
                    return evaluated
                sleep(poll_s)
                final = final_step()  # The run may have ended at its wall-clock cap.
                continue
            step = pending[0]
            try:
                self.evaluate(step)
                evaluated.append(step)
            except Exception:
                if step in finalized_steps(directory):
                    raise
                # Training keeps only the last N checkpoints; this one went before we got to it.
                self.log(f"[evaluate] step {step} was deleted before it could be evaluated")
                _mark(self.directory, step, "skipped")
            finished.add(step)
            last_new = clock()
        self.log(f"[evaluate] final step {final} evaluated; stopping")
        return evaluated


def finalized_steps(directory: str) -> list[int]:
    """Sorted steps of the complete checkpoints in an orbax directory. A save in progress is a
    temporary directory (renamed to `<step>` only when complete), so it is never listed."""
    from muse_jax import checkpoints

    return checkpoints.finalized_steps(directory)
