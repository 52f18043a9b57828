r"""Sampler speed at the real aMUSEd-256 size: our JAX sampler vs diffusers' aMUSEd loop.

Both sides run the SAME random weights: diffusers' `UVit2DModel` (aMUSEd-256's transformer,
~600M parameters) and `VQModel` (aMUSEd's VQ-GAN, f16) are drawn once from a seed and converted
to our Flax parameters by `muse_jax.convert.diffusers_uvit` / `diffusers_vq`; our side runs them
as `models.uvit_transformer.UVitTransformer` + `models.amused_vq.AmusedVQ` in `MuseSampler`.
The work per image is equal: 12 decoding steps of a 16x16 token grid with classifier-free
guidance (conditional and unconditional rows in one 2B-row call; diffusers' guidance_scale 10 is
our 9, `cond + 9 (cond - uncond)`, constant), cosine masking schedule, the pipeline's
micro-conditions (256, 256, 0, 0, 6), random CLIP-shaped text (hidden [B, 77, 768], pooled
[B, 768], the same values on both sides; no text encoder on either), then a VQ decode of the
final tokens to 256x256 pixels. diffusers' side is `benchmarks/peer_amused.py`'s copy of
`AmusedPipeline.__call__` (AmusedScheduler set_timesteps/step, then
`vqvae.decode(..., force_not_quantize=True, shape=...)`).

Printed: seconds per image for the decoding loop and for the VQ decode apart, per side and dtype
(float32; bfloat16 = our modules computing in bf16 over float32 parameters, diffusers' models
`.to(torch.bfloat16)`), our compile seconds apart, and the ratios diffusers / ours (>1: ours
faster). Each timed figure is the median of --repeats calls after one warm-up call. As a check
that both sides hold the same VQ weights, our VQ decode of diffusers' final tokens is compared
with diffusers' images.

  python benchmarks/amused_real.py                      # the real run: f32 + bf16, batch 1
  python benchmarks/amused_real.py --dtypes=float32 --batch=4 --repeats=3
  python benchmarks/amused_real.py --tiny               # a seconds-long smoke check

Needs `pip install -e '.[test,bench]'` (torch CPU + diffusers). Peak host memory at the real
size is about 10 GB (torch weights, our float32 parameters and their conversion).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from muse_jax import entry  # noqa: E402

if __name__ == "__main__":
    entry.prepare_process()  # Before jax starts: huge pages, MUSE_JAX_ONEDNN's flags.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import peer_amused  # noqa: E402  (torch only; hides a broken torchvision before diffusers)
import torch  # noqa: E402
from train_steps import wall_times  # noqa: E402

from muse_jax.convert import amused_configs, diffusers_uvit, diffusers_vq  # noqa: E402
from muse_jax.models import amused_vq, uvit, uvit_transformer  # noqa: E402
from muse_jax.sampling.sampler import MuseSampler  # noqa: E402
from tests.helpers import random_diffusers_model  # noqa: E402

AMUSED_256 = amused_configs.TRANSFORMER_256
AMUSED_VQ = amused_configs.VQ
TEXT_LENGTH = 77  # CLIP's context length: aMUSEd's pipeline pads every prompt to it.

# --tiny: the same structure at toy widths, a 4x4 grid and 8x8 pixels (a smoke check only).
TINY_UVIT = dict(
    AMUSED_256,
    hidden_size=32,
    cond_embed_dim=16,
    micro_cond_encode_dim=4,
    micro_cond_embed_dim=20,
    encoder_hidden_size=16,
    vocab_size=72,
    codebook_size=64,
    in_channels=16,
    block_out_channels=16,
    num_res_blocks=1,
    block_num_heads=2,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    sample_size=4,
)
TINY_VQ = dict(
    AMUSED_VQ,
    block_out_channels=[32, 32],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    num_vq_embeddings=64,
    sample_size=8,
)
TINY_TEXT_LENGTH = 8

GUIDANCE_SCALE = 10.0  # diffusers' (AmusedPipeline's default); ours is this - 1.
CHOICE_TEMPERATURE = peer_amused._TEMPERATURE[0]  # Gumbel noise on confidences, annealed to 0.


def machine() -> str:
    model = "?"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "?":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    bf16 = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in flags]
    return (
        f"{len(os.sched_getaffinity(0))} cores usable (os.cpu_count {os.cpu_count()}), {model}, "
        f"{platform.machine()}; cpu flags: {' '.join(bf16) or 'none of avx2/avx512f/bf16'}"
    )


# ----------------------------------------------------------------------------- the weights


def torch_models(
    uvit_cfg: dict[str, Any], vq_cfg: dict[str, Any], seed: int
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The diffusers transformer and VQ model, float32, with every parameter drawn (noise 0.1;
    see `tests.helpers.random_diffusers_model`, which tests/test_uvit.py uses too): drawing the
    750M numbers one by one is what makes torch's own init of these models slow. The same seed
    gives the same weights."""
    diffusers = peer_amused._import_diffusers()  # Hides a broken torchvision first.
    return (
        random_diffusers_model(diffusers.UVit2DModel, uvit_cfg, seed, noise=0.1),
        random_diffusers_model(diffusers.VQModel, vq_cfg, seed + 1, noise=0.1),
    )


def _numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def flax_params(transformer: torch.nn.Module, vqvae: torch.nn.Module) -> dict[str, Any]:
    """Our float32 parameters {'transformer', 'tokenizer'} from the torch models' weights."""
    uvit_net = uvit.build(uvit.config_from_diffusers(dict(transformer.config)))
    vq_net = amused_vq.build(amused_vq.config_from_diffusers(dict(vqvae.config)))
    params = {
        "transformer": diffusers_uvit.params_from_diffusers(
            _numpy_state(transformer), uvit_net, "random UVit2DModel"
        ),
        "vq": diffusers_vq.params_from_diffusers(_numpy_state(vqvae), vq_net, "random VQModel"),
    }
    return jax.device_put(params)


# ----------------------------------------------------------------------------- the inputs


def text_inputs(uvit_cfg: dict[str, Any], batch: int, length: int) -> dict[str, np.ndarray]:
    """Random stand-ins for CLIP's penultimate hidden states and projected pooled embeds, 2B
    rows: [:B] unconditional (the pipeline concatenates those first), [B:] conditional."""
    rng = np.random.default_rng(1)
    return {
        "hidden": rng.standard_normal((2 * batch, length, uvit_cfg["encoder_hidden_size"])).astype(
            np.float32
        ),
        "pooled": rng.standard_normal((2 * batch, uvit_cfg["cond_embed_dim"])).astype(np.float32),
    }


def micro_conds(image_size: int) -> tuple[float, ...]:
    """The pipeline's micro-conditions: width, height, crop top, crop left, aesthetic score."""
    return (image_size, image_size, 0, 0, peer_amused._AESTHETIC_SCORE)


# ----------------------------------------------------------------------------- our side


def build_ours(
    uvit_cfg: dict[str, Any], vq_cfg: dict[str, Any], dtype: str, steps: int, image_size: int
) -> MuseSampler:
    """MuseSampler over CLIP-shaped precomputed text; modules compute in `dtype` (their
    parameters stay float32, the converted ones)."""
    vq_block = dict(amused_vq.config_from_diffusers(vq_cfg), dtype=dtype)
    vq = amused_vq.build(vq_block)
    block = dict(
        uvit.config_from_diffusers(uvit_cfg), dtype=dtype, micro_conds=micro_conds(image_size)
    )
    grid = uvit_cfg["sample_size"]
    transformer = uvit_transformer.build(block, grid * grid, vq.codebook_size)
    sampling = ml_collections.ConfigDict(
        dict(
            num_steps=steps,
            mask_schedule="cosine",
            temperature=1.0,  # AmusedScheduler samples the softmax as it is
            temperature_final=1.0,
            choice_temperature=CHOICE_TEMPERATURE,
            guidance_scale=GUIDANCE_SCALE - 1.0,
            guidance_schedule="constant",
            negative_prompt="",
        )
    )
    return MuseSampler(transformer, None, vq, sampling)


def run_ours(
    sampler: MuseSampler, params: dict[str, Any], text: dict[str, np.ndarray], repeats: int
) -> dict[str, Any]:
    batch = text["pooled"].shape[0] // 2
    length = text["hidden"].shape[1]

    def side(rows: slice) -> dict[str, Any]:
        return {
            "text_emb": {k: jnp.asarray(v[rows]) for k, v in text.items()},
            "text_mask": jnp.ones((batch, length), jnp.int32),  # ignored by the U-ViT
        }

    uncond, cond = side(slice(0, batch)), side(slice(batch, None))
    init = sampler.masked(batch)
    key = jax.random.PRNGKey(0)

    loop = jax.jit(lambda p, c, u, k, t: sampler.tokens(p, c, u, k, t).tokens)
    vq = jax.jit(sampler.decode_pixels)
    t0 = time.perf_counter()
    loop_c = loop.lower(params, cond, uncond, key, init).compile()
    loop_compile = time.perf_counter() - t0
    tokens = loop_c(params, cond, uncond, key, init)
    t0 = time.perf_counter()
    vq_c = vq.lower(params, tokens).compile()
    vq_compile = time.perf_counter() - t0

    loop_times = wall_times(lambda: loop_c(params, cond, uncond, key, init), repeats)
    vq_times = wall_times(lambda: vq_c(params, tokens), repeats)
    tokens = np.asarray(tokens)
    mask_id = sampler.transformer.mask_id
    codebook = sampler.tokenizer.codebook_size
    assert ((tokens >= 0) & (tokens < codebook)).all(), f"tokens left masked ({mask_id})"
    return dict(
        side="ours",
        loop_s=statistics.median(loop_times),
        vq_s=statistics.median(vq_times),
        compile_s=(loop_compile, vq_compile),
        vq_fn=lambda ids: np.asarray(vq_c(params, jnp.asarray(ids, jnp.int32))),
    )


# ----------------------------------------------------------------------------- diffusers' side


def run_diffusers(
    transformer: torch.nn.Module,
    vqvae: torch.nn.Module,
    text: dict[str, np.ndarray],
    steps: int,
    image_size: int,
    repeats: int,
    seed: int = 0,
) -> dict[str, Any]:
    """`peer_amused.run_peer`'s loop (AmusedPipeline.__call__ without CLIP) on given models."""
    diffusers = peer_amused._import_diffusers()
    dtype = transformer.dtype
    batch = text["pooled"].shape[0] // 2
    grid = transformer.config.sample_size
    mask_id = transformer.config.vocab_size - 1
    scheduler = diffusers.AmusedScheduler(mask_token_id=mask_id)
    cond = {
        "encoder_hidden_states": torch.from_numpy(text["hidden"]).to(dtype),
        "pooled_text_emb": torch.from_numpy(text["pooled"]).to(dtype),
        "micro_conds": torch.tensor([micro_conds(image_size)]).to(dtype).expand(2 * batch, -1),
    }

    def decode_tokens(generator: torch.Generator) -> torch.Tensor:
        latents = torch.full((batch, grid, grid), mask_id, dtype=torch.long)
        scheduler.set_timesteps(steps, peer_amused._TEMPERATURE)
        for timestep in scheduler.timesteps:
            logits = transformer(torch.cat([latents] * 2), **cond)
            uncond_logits, cond_logits = logits.chunk(2)
            logits = uncond_logits + GUIDANCE_SCALE * (cond_logits - uncond_logits)
            latents = scheduler.step(
                model_output=logits, timestep=timestep, sample=latents, generator=generator
            ).prev_sample
        return latents

    loop_times: list[float] = []
    vq_times: list[float] = []
    with torch.inference_mode():
        for run in range(repeats + 1):
            generator = torch.Generator().manual_seed(seed)
            start = time.perf_counter()
            latents = decode_tokens(generator)
            mid = time.perf_counter()
            images = peer_amused._decode_image(vqvae, latents)
            end = time.perf_counter()
            if run:  # run 0 warms up allocators and oneDNN kernel choices
                loop_times.append(mid - start)
                vq_times.append(end - mid)
    codebook = transformer.config.codebook_size
    assert bool(((latents >= 0) & (latents < codebook)).all()), "tokens left masked"
    assert images.shape == (batch, 3, image_size, image_size), images.shape
    return dict(
        side="diffusers",
        loop_s=statistics.median(loop_times),
        vq_s=statistics.median(vq_times),
        tokens=latents.reshape(batch, -1).numpy(),
        images=images.float().permute(0, 2, 3, 1).numpy(),
    )


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--steps", type=int, default=12, help="decoding steps")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after one warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--tiny", action="store_true", help="toy configs: a smoke check")
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in ("float32", "bfloat16"):
            parser.error(f"unknown dtype {d!r}")
    uvit_cfg, vq_cfg = (TINY_UVIT, TINY_VQ) if args.tiny else (AMUSED_256, AMUSED_VQ)
    length = TINY_TEXT_LENGTH if args.tiny else TEXT_LENGTH
    grid = uvit_cfg["sample_size"]
    image_size = grid * 2 ** (len(vq_cfg["block_out_channels"]) - 1)
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    diffusers = peer_amused._import_diffusers()

    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine: {machine()}")
    print(
        f"python {platform.python_version()}, jax {jax.__version__} "
        f"({jax.devices()[0].platform} x{jax.device_count()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), diffusers {diffusers.__version__}"
    )
    print(
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (muse_jax.host_memory)"
    )
    print(
        f"workload: {'TINY configs' if args.tiny else 'aMUSEd-256'}, batch {args.batch}, "
        f"{args.steps} steps, guidance {GUIDANCE_SCALE:g} (diffusers) = {GUIDANCE_SCALE - 1:g} "
        f"(ours) constant, cosine schedule, text {length} x {uvit_cfg['encoder_hidden_size']}, "
        f"{grid}x{grid} tokens -> {image_size}x{image_size} pixels, micro-conds "
        f"{micro_conds(image_size)}, repeats {args.repeats} (+1 warm-up), dtypes {dtypes}",
        flush=True,
    )

    t0 = time.perf_counter()
    transformer, vqvae = torch_models(uvit_cfg, vq_cfg, args.seed)
    n_tr = sum(p.numel() for p in transformer.parameters())
    n_vq = sum(
        p.numel()
        for m in (vqvae.quantize, vqvae.post_quant_conv, vqvae.decoder)
        for p in m.parameters()
    )
    t1 = time.perf_counter()
    params = flax_params(transformer, vqvae)
    t2 = time.perf_counter()
    print(
        f"random weights: transformer {n_tr / 1e6:.1f}M, VQ decode path {n_vq / 1e6:.1f}M params; "
        f"drawn in {t1 - t0:.1f}s, converted to Flax in {t2 - t1:.1f}s",
        flush=True,
    )
    text = text_inputs(uvit_cfg, args.batch, length)

    rows = []
    for index, dtype in enumerate(dtypes):
        sampler = build_ours(uvit_cfg, vq_cfg, dtype, args.steps, image_size)
        ours = dict(run_ours(sampler, params, text, args.repeats), dtype=dtype)
        c = ours["compile_s"]
        print(
            f"ours {dtype}: loop {ours['loop_s']:.3f}s, VQ {ours['vq_s']:.3f}s per call "
            f"(compile {c[0]:.1f}s + {c[1]:.1f}s)",
            flush=True,
        )
        if index:  # The same seed redraws the same float32 weights.
            transformer, vqvae = torch_models(uvit_cfg, vq_cfg, args.seed)
        # `.to(dtype)` logs a hint meant for from_pretrained; nothing here is loaded.
        verbosity = diffusers.utils.logging.get_verbosity()
        diffusers.utils.logging.set_verbosity_error()
        transformer = transformer.to(peer_amused._DTYPES[dtype])
        vqvae = vqvae.to(peer_amused._DTYPES[dtype])
        diffusers.utils.logging.set_verbosity(verbosity)
        theirs = dict(
            run_diffusers(transformer, vqvae, text, args.steps, image_size, args.repeats),
            dtype=dtype,
        )
        print(
            f"diffusers {dtype}: loop {theirs['loop_s']:.3f}s, VQ {theirs['vq_s']:.3f}s per call",
            flush=True,
        )
        # Same weights: our VQ decode of diffusers' final tokens against diffusers' pixels.
        mine = (ours["vq_fn"](theirs["tokens"]) + 1.0) / 2.0
        err = float(np.max(np.abs(np.clip(mine, 0, 1) - theirs["images"])))
        print(f"  check: our VQ decode of diffusers' tokens vs its images, max |diff| {err:.2e}")
        ours.pop("vq_fn")
        theirs["vq_check"] = err
        rows += [ours, theirs]
        # Free the torch models (and everything of this dtype) before the next.
        del transformer, vqvae, sampler, theirs, ours
        gc.collect()

    b = args.batch
    print(
        "\n| side | dtype | loop s/image | VQ decode s/image | total s/image | compile s |\n"
        "|---|---|---:|---:|---:|---:|"
    )
    for r in rows:
        compile_s = "-" if r["side"] != "ours" else f"{sum(r['compile_s']):.1f}"
        print(
            f"| {r['side']} | {r['dtype']} | {r['loop_s'] / b:.3f} | {r['vq_s'] / b:.3f} | "
            f"{(r['loop_s'] + r['vq_s']) / b:.3f} | {compile_s} |"
        )
    print(
        "\nratio diffusers / ours (>1: ours faster)\n\n"
        "| dtype | loop | VQ decode | total |\n|---|---:|---:|---:|"
    )
    by = {(r["side"], r["dtype"]): r for r in rows}
    for d in dtypes:
        o, p = by[("ours", d)], by[("diffusers", d)]
        print(
            f"| {d} | {p['loop_s'] / o['loop_s']:.2f} | {p['vq_s'] / o['vq_s']:.2f} | "
            f"{(p['loop_s'] + p['vq_s']) / (o['loop_s'] + o['vq_s']):.2f} |"
        )


if __name__ == "__main__":
    main()
