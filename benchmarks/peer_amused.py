"""Peer workload: diffusers' aMUSEd sampler (the PyTorch Muse reproduction) with random weights.

`benchmarks/sampler.py` imports this so that our sampler and the peer are timed in the same run,
on the same machine state, and their ratios mean something. It is torch-only (no jax import) so
importing it neither starts jax nor competes with it for threads until `run_peer` is called.

The decoding loop is a copy of `AmusedPipeline.__call__` (diffusers 0.42.1,
`pipelines/deprecated/amused/pipeline_amused.py`) minus the CLIP text encoder, which random text
embeddings replace: micro-conditioning, pooled text embeds, classifier-free guidance by batching
the unconditional rows (first) with the conditional ones (2B rows per transformer call),
`AmusedScheduler.set_timesteps/step`, then `VQModel.decode` of the final tokens.

Run `python benchmarks/peer_amused.py [--threads=N --repeats=N --dtypes=float32,bfloat16]` for
the figures with MFU. The aMUSEd VQ decode of 256² images (~480 GFLOP each) is most of the work.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from types import ModuleType
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# aMUSEd's VQ-GAN (diffusers scripts/convert_amused.py `make_vqvae`): five levels, 16x upsampling.
_AMUSED_VQ_CHANNELS = (128, 256, 256, 512, 768)
# Micro-conditions, in the pipeline's order: width, height, crop top, crop left, aesthetic score.
_NUM_MICRO_CONDS = 5
_AESTHETIC_SCORE = 6  # the pipeline's default
_TEMPERATURE = (2, 0)  # the pipeline's default


def _import_diffusers() -> ModuleType:
    """diffusers, with a torchvision that cannot load hidden.

    PyPI's torchvision 0.28 is a CUDA build; with torch's CPU build its import dies, and
    diffusers' lora loader (reached from UVit2DModel) imports transformers, whose image utilities
    import torchvision. Hiding it (as tests/test_clip.py does) makes transformers see none.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None
    import diffusers

    return diffusers


@dataclasses.dataclass
class PeerSpec:
    """The peer's workload; defaults mirror our own sampler benchmark's model and batch."""

    width: int = 256
    depth: int = 8
    num_heads: int = 4
    mlp_dim: int = 1024
    codebook_size: int = 1024
    grid: int = 16  # tokens per side
    text_length: int = 16
    text_dim: int = 256  # the encoder_hidden_size of the cross-attention context
    num_steps: int = 12
    guidance_scale: float = 5.0
    batch: int = 4
    image_size: int = 256  # VQ decode output size; the VQModel maps grid x grid tokens to it
    # ConvNeXt + attention blocks on each side of the transformer stack (aMUSEd: 3 at 768
    # channels). One keeps UVit2D's structure while the stack stays the bulk of the compute
    # (17.09M parameters at the defaults, 13.64M of them in the stack).
    res_blocks: int = 1


def uvit_config(spec: PeerSpec) -> dict[str, Any]:
    """UVit2DModel kwargs: our width/depth/heads/MLP; the rest scaled from aMUSEd-256.

    aMUSEd-256 has hidden 1024 and micro-cond encoding 256 per condition, so the encoding is
    width // 4 here. Its FFN is GEGLU, so `intermediate_size` = mlp_dim gives 1.5x the
    parameters of a plain GELU MLP of that inner size. The vocabulary is codebook + mask token,
    rounded up to 64 as aMUSEd's 8256 = 8192 + 64, and the mask token is the last id.
    """
    micro_dim = spec.width // 4
    return dict(
        hidden_size=spec.width,
        use_bias=False,
        hidden_dropout=0.0,
        cond_embed_dim=spec.text_dim,
        micro_cond_encode_dim=micro_dim,
        micro_cond_embed_dim=_NUM_MICRO_CONDS * micro_dim,
        encoder_hidden_size=spec.text_dim,
        vocab_size=-(-(spec.codebook_size + 1) // 64) * 64,
        codebook_size=spec.codebook_size,
        in_channels=spec.width,
        block_out_channels=spec.width,
        num_res_blocks=spec.res_blocks,
        downsample=False,  # aMUSEd-256 (16x16 tokens) runs the stack at token resolution
        upsample=False,
        block_num_heads=spec.num_heads,
        num_hidden_layers=spec.depth,
        num_attention_heads=spec.num_heads,
        attention_dropout=0.0,
        intermediate_size=spec.mlp_dim,
        layer_norm_eps=1e-6,
        ln_elementwise_affine=True,
        sample_size=spec.grid,
    )


def vq_config(spec: PeerSpec) -> dict[str, Any]:
    """VQModel kwargs as aMUSEd's, with as many levels as image_size / grid needs.

    Each level but the last upsamples 2x, so 16x (aMUSEd-256) uses all five; smaller factors keep
    the leading (full-resolution) channel counts, where most of the decoder's FLOPs are.
    """
    factor, rest = divmod(spec.image_size, spec.grid)
    levels = factor.bit_length()
    if rest or factor & (factor - 1) or levels > len(_AMUSED_VQ_CHANNELS):
        raise ValueError(
            f"image_size / grid must be a power of two <= 16: {spec.image_size} / {spec.grid}"
        )
    return dict(
        act_fn="silu",
        block_out_channels=list(_AMUSED_VQ_CHANNELS[:levels]),
        down_block_types=["DownEncoderBlock2D"] * levels,
        in_channels=3,
        latent_channels=64,
        layers_per_block=2,
        norm_num_groups=32,
        num_vq_embeddings=spec.codebook_size,
        out_channels=3,
        sample_size=spec.image_size,
        up_block_types=["UpDecoderBlock2D"] * levels,
        mid_block_add_attention=False,
        lookup_from_codebook=True,
    )


def _count_params(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def _conditioning(spec: PeerSpec, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """The transformer's conditioning kwargs, 2B rows under guidance, as the pipeline builds them.

    Random stand-ins for CLIP's penultimate hidden states and projected pooled embeds; rows [:B]
    are the unconditional (negative prompt) ones, as the pipeline concatenates those first. The
    micro-conditions (width, height, crop, crop, score) are in the text embeddings' dtype.
    """
    rows = 2 * spec.batch if spec.guidance_scale > 1.0 else spec.batch
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, spec.text_length, spec.text_dim, generator=generator)
    pooled = torch.randn(rows, spec.text_dim, generator=generator)
    micro_conds = torch.tensor([[spec.image_size, spec.image_size, 0, 0, _AESTHETIC_SCORE]])
    return {
        "encoder_hidden_states": hidden.to(dtype),
        "pooled_text_emb": pooled.to(dtype),
        "micro_conds": micro_conds.to(dtype).expand(rows, -1),
    }


def _decode_image(vqvae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's VQ decode: codebook lookup of the final tokens, no re-quantisation."""
    shape = (*latents.shape, vqvae.config.latent_channels)
    return vqvae.decode(latents, force_not_quantize=True, shape=shape).sample.clip(0, 1)


def _count_flops(
    diffusers: ModuleType, spec: PeerSpec, config: dict[str, Any], vq_kwargs: dict[str, Any]
) -> tuple[int, int]:
    """FLOPs of one transformer call (2B rows) and one VQ decode of B images.

    Counted on meta-device copies: the count does not depend on dtype or weights, and the VQ
    decode alone costs seconds of CPU to run for real.
    """
    cond = {k: v.to("meta") for k, v in _conditioning(spec, torch.float32, 0).items()}
    with torch.device("meta"), torch.inference_mode():
        transformer = diffusers.UVit2DModel(**config)
        vqvae = diffusers.VQModel(**vq_kwargs)
        tokens = torch.zeros((spec.batch, spec.grid, spec.grid), dtype=torch.long)
        guided = spec.guidance_scale > 1.0
        with FlopCounterMode(display=False) as counter:
            transformer(torch.cat([tokens] * 2) if guided else tokens, **cond)
        call_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            _decode_image(vqvae, tokens)
        return call_flops, counter.get_total_flops()


def run_peer(
    spec: PeerSpec, dtype: str = "float32", repeats: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Times aMUSEd's decoding loop and VQ decode for one batch: one warm-up, median of `repeats`.

    Every run reseeds the sampling generator, so all runs do the same work. `params_vq` counts the
    decode path only (codebook, post-quant conv, decoder): the encoder is never run. Threads are
    the caller's (`torch.set_num_threads`).
    """
    diffusers = _import_diffusers()
    torch_dtype = _DTYPES[dtype]
    config = uvit_config(spec)
    vq_kwargs = vq_config(spec)
    torch.manual_seed(seed)
    # `.to(dtype)` on a diffusers model logs a hint meant for from_pretrained; nothing here is
    # loaded, so it is muted for the cast.
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        transformer = diffusers.UVit2DModel(**config).eval().to(torch_dtype)
        vqvae = diffusers.VQModel(**vq_kwargs).eval().to(torch_dtype)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    mask_id = config["vocab_size"] - 1
    scheduler = diffusers.AmusedScheduler(mask_token_id=mask_id)
    cond = _conditioning(spec, torch_dtype, seed)
    guided = spec.guidance_scale > 1.0

    def decode_tokens(generator: torch.Generator) -> torch.Tensor:
        latents = torch.full((spec.batch, spec.grid, spec.grid), mask_id, dtype=torch.long)
        scheduler.set_timesteps(spec.num_steps, _TEMPERATURE)
        for timestep in scheduler.timesteps:
            logits = transformer(torch.cat([latents] * 2) if guided else latents, **cond)
            if guided:
                uncond, cond_logits = logits.chunk(2)
                logits = uncond + spec.guidance_scale * (cond_logits - uncond)
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
            images = _decode_image(vqvae, latents)
            end = time.perf_counter()
            if run:  # run 0 warms up allocators and oneDNN kernel choices
                loop_times.append(mid - start)
                vq_times.append(end - mid)
    # Cheap checks that the copied loop and the VQ layout did what the pipeline's would.
    assert bool(((latents >= 0) & (latents < spec.codebook_size)).all()), "tokens left masked"
    assert images.shape == (spec.batch, 3, spec.image_size, spec.image_size), images.shape

    call_flops, vq_flops = _count_flops(diffusers, spec, config, vq_kwargs)
    loop_s = statistics.median(loop_times)
    vq_s = statistics.median(vq_times)
    return {
        "loop_s": loop_s,
        "vq_s": vq_s,
        "s_per_image": (loop_s + vq_s) / spec.batch,
        "loop_flops": spec.num_steps * call_flops,
        "vq_flops": vq_flops,
        "params_transformer": _count_params(transformer),
        "params_vq": _count_params(vqvae.quantize, vqvae.post_quant_conv, vqvae.decoder),
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "config": config,
        "vq_config": vq_kwargs,
    }


def matmul_peak(dtype: str, n: int = 2048, repeats: int = 5) -> float:
    """torch GFLOP/s of an n x n x n matmul (best of `repeats`): the denominator for peer MFU."""
    torch_dtype = _DTYPES[dtype]
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(torch_dtype)
    b = torch.randn(n, n, generator=generator).to(torch_dtype)
    best = float("inf")
    with torch.inference_mode():
        torch.mm(a, b)  # warm-up: thread pool and kernel selection
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def main() -> None:
    """Prints the peer's f32 and bf16 figures.

    --threads matters on a shared machine: torch's intra-op pool spins at barriers, so with a
    core taken by another process two threads ran a transformer call 3-6x slower than one.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = PeerSpec()
    print(f"peer: diffusers aMUSEd, random weights, {spec}", flush=True)
    for index, dtype in enumerate(args.dtypes.split(",")):
        result = run_peer(spec, dtype, repeats=args.repeats)
        peak = matmul_peak(dtype)
        if index == 0:
            print(f"UVit2DModel config: {result['config']}")
            print(f"VQModel config: {result['vq_config']}")
            print(
                f"params: transformer {result['params_transformer'] / 1e6:.2f}M, "
                f"VQ decode path {result['params_vq'] / 1e6:.2f}M; threads {result['threads']}; "
                f"repeats {args.repeats}"
            )
        loop_rate = result["loop_flops"] / result["loop_s"] / 1e9
        vq_rate = result["vq_flops"] / result["vq_s"] / 1e9
        total_flops = result["loop_flops"] + result["vq_flops"]
        total_rate = total_flops / (result["loop_s"] + result["vq_s"]) / 1e9
        print(
            f"{dtype}: {result['s_per_image']:.3f} s/image, MFU {total_rate / peak:.1%} "
            f"of matmul peak {peak:.1f} GFLOP/s\n"
            f"  loop {result['loop_s']:.3f} s/batch, {result['loop_flops'] / 1e9:.1f} GFLOP, "
            f"{loop_rate:.1f} GFLOP/s, MFU {loop_rate / peak:.1%}\n"
            f"  VQ   {result['vq_s']:.3f} s/batch, {result['vq_flops'] / 1e9:.1f} GFLOP, "
            f"{vq_rate:.1f} GFLOP/s, MFU {vq_rate / peak:.1%}",
            flush=True,
        )
        if max(loop_rate, vq_rate) > peak:
            # Seen on AMD EPYC: MKL's sgemm behind torch.mm runs well below oneDNN's convolutions.
            print("  (MFU > 100%: this torch.mm falls short of what the model's kernels reach)")


if __name__ == "__main__":
    main()
