"""aMUSEd end to end: a diffusers `AmusedPipeline` directory (random weights, small config, written
by diffusers' own `save_pretrained`) -> `python -m muse_jax.convert` -> this project's sampler.

With deterministic settings on both sides (argmax instead of diffusers' multinomial draw, choice
temperature 0, the same cosine schedule, constant guidance) the two samplers must choose the same
tokens at every position and decode them to the same pixels. Also: bad sources are one line and
write nothing, and the converted model fine-tunes on an image folder.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess

import jax
import numpy as np
import pytest
import torch

from tests.eval_fixtures import import_transformers

transformers = import_transformers()  # Hides a torchvision that cannot load (before diffusers).
diffusers = pytest.importorskip("diffusers")

from muse_jax.inference import model as model_lib  # noqa: E402
from muse_jax.inference.pipeline import MusePipeline  # noqa: E402
from muse_jax.sampling.sampler import Settings  # noqa: E402
from tests.helpers import run_module  # noqa: E402

PROMPTS = ["a red cube", "two dogs on a beach at night"]
STEPS, GUIDANCE = 6, 4.0  # GUIDANCE in diffusers' convention: uncond + g (cond - uncond).

VQ = dict(
    block_out_channels=[8, 16, 16],
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    latent_channels=6,
    vq_embed_dim=8,
    layers_per_block=1,
    norm_num_groups=4,
    num_vq_embeddings=64,
    mid_block_add_attention=True,
    lookup_from_codebook=True,
)
UVIT = dict(
    hidden_size=32,
    use_bias=False,
    cond_embed_dim=32,
    micro_cond_encode_dim=4,
    micro_cond_embed_dim=20,
    encoder_hidden_size=32,
    vocab_size=65,  # 64 codes + [MASK] (id 64).
    codebook_size=64,
    in_channels=16,
    block_out_channels=16,
    num_res_blocks=1,
    downsample=False,
    upsample=False,
    block_num_heads=2,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    sample_size=8,  # 8x8 tokens: 32x32 images through the f4 VQ model.
)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (diffusers zero-initialises some), so that all of them count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _write_tokenizer(directory: str) -> transformers.CLIPTokenizer:
    from tokenizers import pre_tokenizers

    from muse_jax.text.clip_tokenizer import BOS, EOS

    os.makedirs(directory, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [BOS, EOS]
    vocab_file, merges_file = (os.path.join(directory, n) for n in ("vocab.json", "merges.txt"))
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return transformers.CLIPTokenizer(vocab_file, merges_file, model_max_length=77, pad_token=EOS)


@pytest.fixture(scope="module")
def amused(tmp_path_factory):
    """(diffusers pipeline, its saved directory, the converted directory)."""
    root = tmp_path_factory.mktemp("amused")
    tokenizer = _write_tokenizer(str(root / "vocab"))
    text_config = transformers.CLIPTextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        projection_dim=32,
    )
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModelWithProjection(text_config).eval()
    vqvae = diffusers.VQModel(**VQ).eval()
    transformer = diffusers.UVit2DModel(**UVIT).eval()
    for i, m in enumerate((text_encoder, vqvae, transformer)):
        _randomize(m, i)
    scheduler = diffusers.AmusedScheduler(mask_token_id=UVIT["vocab_size"] - 1)
    pipe = diffusers.AmusedPipeline(
        vqvae=vqvae,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        scheduler=scheduler,
    )
    src = str(root / "amused-tiny")
    pipe.save_pretrained(src, safe_serialization=True)
    out = str(root / "converted")
    proc = _convert(src, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return pipe, src, out


def _convert(src: str, out: str, *extra: str) -> subprocess.CompletedProcess:
    return run_module("muse_jax.convert", "--from=diffusers", src, f"--out={out}", *extra)


def _diffusers_tokens(pipe, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' tokens and decoded pixels ([0, 1], before clipping) with argmax sampling."""
    monkeypatch.setattr(
        torch, "multinomial", lambda probs, n, generator=None: probs.argmax(-1, keepdim=True)
    )
    with torch.no_grad():
        latents = pipe(
            PROMPTS,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            temperature=(0.0, 0.0),
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images
        side = UVIT["sample_size"]
        pixels = pipe.vqvae.decode(
            latents,
            force_not_quantize=True,
            shape=(len(PROMPTS), side, side, VQ["vq_embed_dim"]),
        ).sample
    return latents.reshape(len(PROMPTS), -1).numpy(), pixels.permute(0, 2, 3, 1).numpy()


def test_sampler_chooses_diffusers_tokens_and_pixels(amused, monkeypatch):
    pipe, _, out = amused
    ref_tokens, ref_pixels = _diffusers_tokens(pipe, monkeypatch)
    model = model_lib.from_exported(out, stages="base")
    settings = Settings.from_config(
        model.config.base.sampling,
        num_steps=STEPS,
        temperature=0.0,
        temperature_final=0.0,
        choice_temperature=0.0,
        guidance_scale=GUIDANCE - 1.0,  # This project's l_c + s (l_c - l_u).
        guidance_schedule="constant",
        mask_schedule="cosine",
    )
    cond = model.conditioner.encode(PROMPTS)
    uncond = model.conditioner.encode([""] * len(PROMPTS))
    sample = model.base_sampler(
        model.params["base"], cond, uncond, jax.random.PRNGKey(0), settings=settings
    )
    tokens = np.asarray(sample.tokens)
    assert (tokens == ref_tokens).all(), f"{(tokens != ref_tokens).sum()} tokens differ"
    pixels = (np.asarray(sample.images) + 1) / 2
    assert np.max(np.abs(pixels - ref_pixels)) <= 1e-3


def test_from_pretrained_generates(amused):
    _, _, out = amused
    pipeline = MusePipeline.from_pretrained(out)
    result = pipeline(PROMPTS, seed=3)
    assert result.array.shape == (2, 32, 32, 3)
    assert result.tokens.shape == (2, 64) and result.tokens.max() < 64


def test_sample_binary_reads_the_converted_directory(amused, tmp_path):
    _, _, out = amused
    proc = run_module(
        "muse_jax.sample", f"--model={out}", "--prompt=a red cube", "--num_samples=2",
        f"--output_dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "sample_001.png").exists() and (tmp_path / "grid.png").exists()
    record = json.loads((tmp_path / "samples.json").read_text())
    assert record["stages"] == "base" and record["image_size"] == 32


def test_bad_sources_are_one_line_and_write_nothing(amused, tmp_path):
    _, src, _ = amused
    # Not a diffusers directory.
    out = tmp_path / "o1"
    proc = _convert(str(tmp_path), str(out))
    assert proc.returncode == 2 and "model_index.json" in proc.stderr.strip().splitlines()[-1]
    assert not out.exists()
    # A truncated safetensors file.
    bad = tmp_path / "truncated"
    _copy(src, bad)
    weights = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    out = tmp_path / "o2"
    proc = _convert(str(bad), str(out))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "diffusion_pytorch_model.safetensors" in last, last
    assert "not a readable safetensors file" in last and not out.exists()
    # A config that does not match the tensors.
    bad = tmp_path / "mismatch"
    _copy(src, bad)
    cfg_path = bad / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_hidden_layers"] = 1
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "o3"
    proc = _convert(str(bad), str(out))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "transformer_layers.1" in last, last
    assert not out.exists()


def _copy(src: str, dst) -> None:
    import shutil

    shutil.copytree(src, dst)


def test_the_converted_model_fine_tunes_on_an_image_folder(amused, tmp_path):
    """configs/amused.py: the tokenizer stage saves the converted VQ model, the base stage
    trains the U-ViT on a user folder and its loss falls."""
    from PIL import Image

    _, _, out = amused
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        img = np.zeros((48, 48, 3), np.uint8)
        img[..., i % 3] = 200 + rng.integers(0, 50)
        Image.fromarray(img).save(folder / f"{i}.png")
        rows.append((f"{i}.png", ["a red square", "a green square", "a blue square"][i % 3]))
    with open(folder / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    from configs import amused as amused_config
    from muse_jax.train import trainer

    config = amused_config.get_config(out)
    config.data.dataset = "image_folder"
    config.data.source_dir = str(folder)
    config.data.test_fraction = 0.2
    config.base.train.batch_size = 4
    config.base.train.num_steps = 30
    config.base.train.log_every = 5
    config.base.train.summary_every = 1000
    config.base.train.optimizer.learning_rate = 3e-3
    config.base.train.optimizer.warmup_steps = 2
    workdir = str(tmp_path / "run")
    assert trainer.train(config, workdir, "tokenizer").step == 0
    result = trainer.train(config, workdir, "base")
    assert result.step == 30
    losses = _scalars(os.path.join(workdir, "base"), "train/loss")
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < 0.92 * first, losses  # From about ln(64): the random model knows nothing.
    # The fine-tuned model exports like any other (CLIP's tokenizer copied along) and samples.
    from muse_jax.inference import export

    exported = str(tmp_path / "exported")
    export.export(model_lib.from_workdir(config, workdir, stages="base"), exported, source=workdir)
    copied = sorted(os.listdir(tmp_path / "exported" / "clip_tokenizer"))
    assert copied == sorted(os.listdir(os.path.join(out, "clip_tokenizer"))), copied
    result = MusePipeline.from_pretrained(exported)(["a red square"], seed=0)
    assert result.array.shape == (1, 32, 32, 3)


def _scalars(directory: str, tag: str) -> dict[int, float]:
    from muse_jax.train import summaries

    return summaries.read_scalars(directory)[tag]
