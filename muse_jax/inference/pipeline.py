"""`MusePipeline`: text-to-image generation and zero-shot editing from Python.

    from muse_jax import MusePipeline

    # model_dir: a directory written by `python -m muse_jax.export` or `muse_jax.convert`
    # (local or gs://); nothing is downloaded.
    pipe = MusePipeline.from_pretrained(model_dir)  # or .from_workdir(config, workdir)
    out = pipe(["a large red circle on the left"], guidance_scale=3.0, seed=0)
    out.images[0].save("circle.png")

One jitted sampler serves generation, inpainting and outpainting. The guidance scale, the
temperatures and the seed are runtime values: changing them reuses the compiled program. A new
step count, batch size or turning guidance on or off (scale 0) compiles once and is cached.

Memory is bounded per call: requests run in batches of at most `batch_size` rows (the last one
padded, so one program serves them all), and a request for more than `max_images` images is
refused before any work. Batch `i > 0` samples with `fold_in(PRNGKey(seed), i)`, so a seed
reproduces the same images for the same batch size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from muse_jax.errors import UsageError
from muse_jax.inference import images as images_lib
from muse_jax.inference import model as model_lib
from muse_jax.sampling import editing
from muse_jax.sampling.sampler import Settings

MAX_PROMPT_CHARS = 1000


@dataclasses.dataclass
class PipelineOutput:
    """Generated images, prompt-major (the images of one prompt together)."""

    array: np.ndarray  # uint8 [N, H, W, 3]
    tokens: np.ndarray  # int32 [N, L]: the last stage's tokens.
    captions: list[str]
    steps: dict[str, int | None]  # Checkpoint step of each stage used.
    lowres_array: np.ndarray | None = None  # Cascade: the base stage's own output.
    lowres_tokens: np.ndarray | None = None

    @property
    def images(self) -> list[Image.Image]:
        return [Image.fromarray(x) for x in self.array]

    @property
    def lowres_images(self) -> list[Image.Image] | None:
        if self.lowres_array is None:
            return None
        return [Image.fromarray(x) for x in self.lowres_array]


@dataclasses.dataclass
class EditOutput:
    """Edits of one input image; `result` holds every stage's tokens and token masks."""

    array: np.ndarray  # uint8 [N, S, S, 3]: the edits, blended into the input.
    input_array: np.ndarray  # uint8 [S, S, 3]: the input as the model saw it.
    mask: np.ndarray | None  # bool [S, S]: the pixels re-generated (None: mask-free).
    result: editing.EditResult
    steps: dict[str, int | None]
    notes: list[str]  # What was done to the input (resized, cropped, padded).

    @property
    def images(self) -> list[Image.Image]:
        return [Image.fromarray(x) for x in self.array]


def check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError("Empty prompt: give a caption, e.g. 'a red circle'.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UsageError(
            f"The prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted."
        )
    return prompt


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise UsageError(f"seed must be an integer in [0, 2**32), got {seed!r}.")
    return int(seed)


def _pad_rows(tree: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Repeats the last row so every leading dimension is `rows`."""
    return {
        k: np.concatenate([v, np.repeat(v[-1:], rows - len(v), 0)]) if len(v) < rows else v
        for k, v in tree.items()
    }


class MusePipeline:
    """Generation and editing with a trained or exported Muse model.

    One pipeline serves one caller at a time (editing keeps per-stage settings on the
    pipeline); a server runs its calls on a single worker (see `muse_jax.serve`).
    """

    def __init__(self, model: model_lib.Model, *, batch_size: int = 16, max_images: int = 1024):
        if batch_size < 1 or max_images < 1:
            raise UsageError(
                f"batch_size and max_images must be >= 1, got {batch_size}, {max_images}."
            )
        self.model = model
        self.batch_size = batch_size
        self.max_images = max_images
        self._edit_stages: dict[bool, list[editing.SamplerStage]] = {}

    @classmethod
    def from_workdir(
        cls,
        config,
        workdir: str,
        *,
        stages: str | None = None,
        base_step: int | None = None,
        **kwargs,
    ) -> MusePipeline:
        """The model trained in `workdir` with `config`. `stages`: 'base', 'cascade', or None
        (the cascade when the config has it); `base_step`: a base checkpoint (default latest)."""
        return cls(
            model_lib.from_workdir(config, workdir, stages=stages, base_step=base_step), **kwargs
        )

    @classmethod
    def from_pretrained(cls, path: str, *, stages: str | None = None, **kwargs) -> MusePipeline:
        """An exported model directory (`python -m muse_jax.export`), local or gs://."""
        return cls(model_lib.from_exported(path, stages=stages), **kwargs)

    # ------------------------------------------------------------------------- properties

    @property
    def config(self):
        return self.model.config

    @property
    def cascade(self) -> bool:
        """Whether the loaded model includes the super-res stages."""
        return self.model.cascade

    @property
    def steps(self) -> dict[str, int | None]:
        return dict(self.model.steps)

    @property
    def trained_steps(self) -> dict[str, int | None]:
        """The checkpoint steps a record of samples names: the base, super-res and decoder
        stages (None where not loaded), and the base decoder when one decodes."""
        steps = {k: v for k, v in self.model.steps.items() if k in ("base", "superres", "decoder")}
        if self.model.steps.get("base_decoder") is not None:
            steps["base_decoder"] = self.model.steps["base_decoder"]
        return steps

    def image_size(self, stages: str | None = None) -> int:
        cfg = self.config.data
        return cfg.hr_image_size if self._cascade(stages) else cfg.image_size

    def _cascade(self, stages: str | None) -> bool:
        if stages is None:
            return self.cascade
        if stages not in ("base", "cascade"):
            raise UsageError(f"stages must be 'base' or 'cascade', got {stages!r}.")
        if stages == "cascade" and not self.cascade:
            raise UsageError(
                "This pipeline was loaded without the super-res stages: stages='base'."
            )
        return stages == "cascade"

    def settings(
        self,
        cascade: bool,
        *,
        guidance_scale: float | None = None,
        num_steps: int | None = None,
        temperature: float | tuple[float, float] | None = None,
        superres: dict[str, Any] | None = None,
        refine_rounds: int | None = None,
    ):
        """The sampler's `Settings`: the config's with the given overrides (base stage), and
        `superres` overrides for the super-res stage of a cascade. `temperature` is one value
        (constant over the steps) or (first step, last step), linear in between;
        `refine_rounds` sets the base stage's self-critic refinement (0: off)."""
        first = last = temperature
        if isinstance(temperature, tuple | list):
            first, last = temperature
        base = Settings.from_config(
            self.config.base.sampling,
            guidance_scale=guidance_scale,
            num_steps=num_steps,
            temperature=first,
            temperature_final=last,
            refine_rounds=refine_rounds,
        )
        if not cascade:
            return base
        return base, Settings.from_config(self.config.superres.sampling, **(superres or {}))

    def _plan(self, stages: str | None, seed: int, **settings) -> tuple[bool, Any, jax.Array]:
        """(cascade?, the samplers' settings, the PRNG key) of one call, validated."""
        cascade = self._cascade(stages)
        return cascade, self.settings(cascade, **settings), jax.random.PRNGKey(check_seed(seed))

    def _encode(self, captions: list[str], negative: str | None, rows: int):
        if negative is not None and len(negative) > MAX_PROMPT_CHARS:
            raise UsageError(
                f"The negative prompt has {len(negative)} characters; at most "
                f"{MAX_PROMPT_CHARS} are accepted."
            )
        cond_enc = self.model.conditioner
        neg = self.config.base.sampling.negative_prompt if negative is None else negative
        cond = cond_enc.encode(captions)
        uncond = {k: np.repeat(v, len(captions), 0) for k, v in cond_enc.encode([neg]).items()}
        return _pad_rows(cond, rows), _pad_rows(uncond, rows)

    def _check_count(self, n: int) -> None:
        if n > self.max_images:
            raise UsageError(
                f"{n} images requested; this pipeline makes at most {self.max_images} per call "
                "(max_images): split the request."
            )

    # ------------------------------------------------------------------------- generation

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        negative_prompt: str | None = None,
        guidance_scale: float | None = None,
        num_steps: int | None = None,
        temperature: float | tuple[float, float] | None = None,
        seed: int = 0,
        stages: str | None = None,
        num_images_per_prompt: int = 1,
        superres: dict[str, Any] | None = None,
        refine_rounds: int | None = None,
    ) -> Iterator[PipelineOutput]:
        """As `__call__`, one batch at a time (for writing results as they come)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise UsageError("No prompts given.")
        for p in prompts:
            check_prompt(p)
        if num_images_per_prompt < 1:
            raise UsageError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}.")
        captions = [p for p in prompts for _ in range(num_images_per_prompt)]
        self._check_count(len(captions))
        cascade, settings, key = self._plan(
            stages, seed, guidance_scale=guidance_scale, num_steps=num_steps,
            temperature=temperature, superres=superres, refine_rounds=refine_rounds,
        )  # fmt: skip
        sampler, params = self.model.sampler(cascade), self.model.sampler_params(cascade)
        n = len(captions)
        rows = n if n <= self.batch_size else self.batch_size
        for i, start in enumerate(range(0, n, rows)):
            part = captions[start : start + rows]
            cond, uncond = self._encode(part, negative_prompt, rows)
            rng = key if i == 0 else jax.random.fold_in(key, i)
            out = sampler(params, cond, uncond, rng, settings=settings)
            k = len(part)
            low = getattr(out, "lowres_images", None)
            yield PipelineOutput(
                array=images_lib.to_uint8(np.asarray(out.images)[:k]),
                tokens=np.asarray(out.tokens)[:k],
                captions=part,
                steps=self.steps,
                lowres_array=None if low is None else images_lib.to_uint8(np.asarray(low)[:k]),
                lowres_tokens=None if low is None else np.asarray(out.lowres_tokens)[:k],
            )

    def __call__(self, prompts: str | Sequence[str], **kwargs) -> PipelineOutput:
        """Images for `prompts` (`num_images_per_prompt` each, prompt-major).

        Keyword arguments: `negative_prompt` (replaces the unconditional branch; default the
        config's), `guidance_scale`, `num_steps`, `temperature` (one value, or (first, last)
        annealed linearly over the steps) for the base stage (default: the config's sampling
        block), `seed`, `stages` ('base' | 'cascade'), `num_images_per_prompt`, `superres` (a
        dict of sampling settings for the super-res stage, e.g. {'num_steps': 8}),
        `refine_rounds` (the base stage's self-critic refinement rounds; 0 turns it off).
        """
        parts = list(self.generate(prompts, **kwargs))

        def cat(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else np.concatenate(values)

        return PipelineOutput(
            array=cat("array"),
            tokens=cat("tokens"),
            captions=[c for p in parts for c in p.captions],
            steps=self.steps,
            lowres_array=cat("lowres_array"),
            lowres_tokens=cat("lowres_tokens"),
        )

    # ------------------------------------------------------------------------- editing

    def _stages(self, cascade: bool, settings) -> list[editing.SamplerStage]:
        if cascade not in self._edit_stages:
            m = self.model
            if cascade:
                built = [
                    editing.SamplerStage(
                        m.base_sampler, m.params["base"], self.config.data.image_size
                    ),
                    editing.SamplerStage(
                        m.superres_sampler, m.params["superres"], self.config.data.hr_image_size
                    ),
                ]
            else:
                built = [
                    editing.SamplerStage(
                        m.base_sampler, m.params["base"], self.config.data.image_size
                    )
                ]
            self._edit_stages[cascade] = built
        stages = self._edit_stages[cascade]
        for stage, s in zip(stages, settings if cascade else (settings,)):
            stage.settings = s
        return stages

    def _edit(
        self,
        mode: str,
        image: np.ndarray,
        mask: np.ndarray | None,
        prompt: str,
        notes: list[str],
        *,
        num_images: int = 1,
        negative_prompt: str | None = None,
        guidance_scale: float | None = None,
        num_steps: int | None = None,
        temperature: float | tuple[float, float] | None = None,
        refine_rounds: int | None = None,
        seed: int = 0,
        stages: str | None = None,
        superres: dict[str, Any] | None = None,
        dilation: int = 0,
        feather: int = 1,
        iterations: int = 4,
        resample_fraction: float = editing.DEFAULT_RESAMPLE_FRACTION,
        critic: float = 10.0,
    ) -> EditOutput:
        check_prompt(prompt)
        if num_images < 1:
            raise UsageError(f"num_images must be >= 1, got {num_images}.")
        if num_images > min(self.batch_size, self.max_images):
            raise UsageError(
                f"{num_images} edits requested; one edit call makes at most "
                f"{min(self.batch_size, self.max_images)} (the pipeline's batch_size)."
            )
        cascade, settings, rng = self._plan(
            stages, seed, guidance_scale=guidance_scale, num_steps=num_steps,
            temperature=temperature, superres=superres, refine_rounds=refine_rounds,
        )  # fmt: skip
        token_stages = self._stages(cascade, settings)
        cond, uncond = self._encode([prompt] * num_images, negative_prompt, num_images)
        batch = np.repeat(image[None].astype(np.float32) / 127.5 - 1.0, num_images, 0)
        if mode == "maskfree":
            res = editing.maskfree_edit(
                token_stages,
                batch,
                cond,
                uncond,
                rng,
                iterations=iterations,
                resample_fraction=resample_fraction,
                critic=critic,
                feather=feather,
            )
        else:
            res = editing.edit_with_mask(
                token_stages,
                batch,
                np.repeat(mask[None], num_images, 0),
                cond,
                uncond,
                rng,
                dilation=dilation,
                feather=feather,
            )
        return EditOutput(
            array=images_lib.to_uint8(res.images),
            input_array=image,
            mask=mask,
            result=res,
            steps=self.steps,
            notes=notes,
        )

    def inpaint(self, image, mask, prompt: str, **kwargs) -> EditOutput:
        """Re-generates the white pixels of `mask` under `prompt`, keeps the rest.

        `image`: PIL image or uint8 array, any size (resized and centre-cropped to the model's
        square); `mask`: the image's size or the model's, white = re-generate. Keyword
        arguments as `__call__` (`num_images` instead of `num_images_per_prompt`), plus
        `dilation` (token margin around the mask) and `feather` (blend ramp in pixels).
        """
        size = self.image_size(kwargs.get("stages"))
        im = images_lib.as_pil(image).convert("RGB")
        arr, note = images_lib.fit_square(im, size, Image.Resampling.LANCZOS)
        pixel_mask = images_lib.fit_mask(images_lib.as_pil(mask), im.size, size)
        return self._edit("inpaint", arr, pixel_mask, prompt, [note] if note else [], **kwargs)

    def outpaint(self, image, pad: int | Sequence[int] | str, prompt: str, **kwargs) -> EditOutput:
        """Extends `image` by `pad` = (left, top, right, bottom) pixels of the input (or one
        number for all sides) and generates the new border; the canvas is fitted into the
        model's square. Keyword arguments as `inpaint`."""
        size = self.image_size(kwargs.get("stages"))
        im = images_lib.as_pil(image).convert("RGB")
        if isinstance(pad, str):
            pads = editing.parse_pad(pad)
        else:
            pads = editing.parse_pad(",".join(str(int(p)) for p in np.atleast_1d(pad)))
        canvas, pixel_mask = editing.outpaint_canvas(np.asarray(im), pads, size)
        w, h = im.size
        note = f"{w}x{h} image padded by {pads} and fitted into the model's {size}x{size}"
        return self._edit("outpaint", canvas, pixel_mask, prompt, [note], **kwargs)

    def edit(self, image, prompt: str, **kwargs) -> EditOutput:
        """Mask-free editing: `iterations` rounds each re-sampling `resample_fraction` of the
        base tokens under `prompt`, chosen first where they fit the rest under it worst (weight
        `critic`; 0 chooses uniformly). A smaller fraction keeps more of the input (its
        object's footprint) and edits shape and position less often (BENCHMARKS.md, "Edit success"). Keyword
        arguments as `inpaint`."""
        size = self.image_size(kwargs.get("stages"))
        im = images_lib.as_pil(image).convert("RGB")
        arr, note = images_lib.fit_square(im, size, Image.Resampling.LANCZOS)
        return self._edit("maskfree", arr, None, prompt, [note] if note else [], **kwargs)
