"""A diffusers aMUSEd directory -> this project's model directory (`muse-export`'s format).

    SRC (diffusers' AmusedPipeline, e.g. a download of amused/amused-256)
      model_index.json
      vqvae/{config.json, diffusion_pytorch_model.safetensors}         VQModel
      transformer/{config.json, diffusion_pytorch_model.safetensors}   UVit2DModel
      text_encoder/{config.json, model.safetensors}                    CLIPTextModelWithProjection
      tokenizer/{vocab.json, merges.txt, special_tokens_map.json, ...}
    OUT
      config.json                  format, sampling config (kinds 'amused_vq', 'uvit', 'clip')
      tokenizer.safetensors        the VQ model
      base.safetensors             the U-ViT
      text_encoder/, clip_tokenizer/   CLIP's files, copied unchanged (read as transformers'),
      README.md                    where it came from, and the weights' licence

Only safetensors are read (never a pickle), and no torch. Everything is read and checked before
anything is written, so a bad source leaves no output; `config.json` is written last.
"""

from __future__ import annotations

import datetime
from typing import Any

import ml_collections

from muse_jax import storage
from muse_jax.convert import diffusers_uvit, diffusers_vq
from muse_jax.convert.tensors import ConversionError, read_safetensors
from muse_jax.data.vocabulary import CLIP_PREFIX
from muse_jax.inference import export, weights
from muse_jax.inference import model as model_lib
from muse_jax.models import amused_vq, uvit
from muse_jax.text import clip_model, clip_tokenizer
from muse_jax.text.safetensors_t5 import CheckpointError

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_DIR = "text_encoder"

# The logical-axis rules of an unsharded model (`muse_jax.parallel`); a pod run overrides them.
_RULES = [
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("joined_kv", "tensor"),
    ("layers", None),
    ("context_embed", None),
    ("kv", None),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("codebook", None),
    ("height", None),
    ("width", None),
]


def _json(path: str) -> dict[str, Any]:
    if not storage.exists(path):
        raise ConversionError(f"{path} does not exist: is the source a diffusers aMUSEd directory?")
    try:
        return storage.read_json(path)
    except ValueError as e:
        raise ConversionError(f"{path} is not valid JSON ({e}).") from None


def _weights(directory: str, name: str) -> str:
    path = storage.join(directory, name)
    if storage.exists(path):
        return path
    pickles = [n for n in storage.listdir(directory) if n.endswith((".bin", ".pt", ".ckpt"))]
    hint = (
        f" ({pickles[0]} is a pickle, which is never read: save with safetensors)"
        if pickles
        else ""
    )
    raise ConversionError(f"{path} does not exist{hint}.")


def sampling_config(
    vq_block: dict, uvit_block: dict, text_block: dict, image_size: int
) -> ml_collections.ConfigDict:
    """The config of a converted aMUSEd: the sampling keys `muse_jax.inference.export` keeps,
    with aMUSEd's own pipeline defaults (12 steps, cosine schedule, guidance 10 in diffusers'
    convention, which is 9 in this project's l_c + s (l_c - l_u))."""
    return ml_collections.ConfigDict(
        dict(
            data=dict(
                image_size=image_size,
                hr_image_size=0,
                text_length=clip_tokenizer.MAX_LENGTH,
                vocabulary=CLIP_PREFIX + export.CLIP_TOKENIZER_DIR,
            ),
            tokenizer=dict(model=vq_block),
            text_encoder=text_block,
            text_embeddings="",
            base=dict(
                model=uvit_block,
                sampling=dict(
                    num_steps=12,
                    mask_schedule="cosine",
                    temperature=1.0,
                    temperature_final=1.0,
                    choice_temperature=2.0,
                    guidance_scale=9.0,
                    guidance_schedule="constant",
                    negative_prompt="",
                ),
            ),
            mesh=dict(shape=dict(data=-1, fsdp=1, tensor=1), rules=_RULES),
        )
    )


def _card(src: str, config, sizes: dict[str, int]) -> str:
    size = config.data.image_size
    return (
        "\n".join(
            [
                "# aMUSEd, converted for muse_jax",
                "",
                f"Converted {datetime.date.today().isoformat()} from the diffusers directory `{src}` "
                "by `python -m muse_jax.convert --from=diffusers`.",
                "",
                "| file | what | MB |",
                "|---|---|---|",
                f"| tokenizer.safetensors | VQ model (aMUSEd's VQ-GAN) | {sizes['tokenizer'] / 1e6:.1f} |",
                f"| base.safetensors | U-ViT transformer | {sizes['base'] / 1e6:.1f} |",
                "| text_encoder/ | CLIP text encoder with projection (transformers' files) | |",
                "| clip_tokenizer/ | CLIP's BPE tokenizer files | |",
                "",
                f"- Output: {size}x{size} pixels from a {config.tokenizer.model.codebook_size}-code "
                "token grid, prompts of at most 77 CLIP tokens.",
                "- Licence: the aMUSEd weights are released by Hugging Face under the OpenRAIL-M "
                "licence (see the model card of the source); its use restrictions carry over to "
                "this conversion. The CLIP text encoder is OpenAI's CLIP ViT-L/14 (MIT licence).",
                "",
                "Load it with `MusePipeline.from_pretrained(path)` (see the muse_jax README).",
            ]
        )
        + "\n"
    )


def convert(src: str, out: str) -> dict[str, Any]:
    """Converts the aMUSEd pipeline directory `src` into the model directory `out`; returns
    the manifest. Raises ConversionError (one line) for a source it cannot convert."""
    if not storage.isdir(src):
        raise ConversionError(f"{src} is not a directory.")
    index = _json(storage.join(src, "model_index.json"))
    if index.get("_class_name") != "AmusedPipeline":
        raise ConversionError(
            f"{storage.join(src, 'model_index.json')}: _class_name "
            f"{index.get('_class_name')!r}, expected 'AmusedPipeline'."
        )
    vq_dir, tr_dir = storage.join(src, "vqvae"), storage.join(src, "transformer")
    text_dir, tok_dir = storage.join(src, TEXT_ENCODER_DIR), storage.join(src, "tokenizer")

    vq_block = amused_vq.config_from_diffusers(_json(storage.join(vq_dir, "config.json")))
    vq = amused_vq.build(ml_collections.ConfigDict(vq_block))
    vq_file = _weights(vq_dir, DIFFUSERS_WEIGHTS)
    vq_params = diffusers_vq.params_from_diffusers(read_safetensors(vq_file), vq, vq_file)

    tr_cfg = _json(storage.join(tr_dir, "config.json"))
    uvit_block = uvit.config_from_diffusers(tr_cfg)
    if uvit_block["codebook_size"] != vq_block["codebook_size"]:
        raise ConversionError(
            f"{storage.join(tr_dir, 'config.json')}: codebook_size {uvit_block['codebook_size']} "
            f"but the VQ model has {vq_block['codebook_size']} codes."
        )
    side = int(tr_cfg.get("sample_size", 16))
    image_size = side * vq.downsample_factor
    uvit_block["micro_conds"] = [float(image_size), float(image_size), 0.0, 0.0, 6.0]
    net = uvit.build(ml_collections.ConfigDict(uvit_block), side * side)
    tr_file = _weights(tr_dir, DIFFUSERS_WEIGHTS)
    tr_params = diffusers_uvit.params_from_diffusers(read_safetensors(tr_file), net, tr_file)

    text_json = storage.join(text_dir, "config.json")
    try:
        text_block = clip_model.text_encoder_from_hf(_json(text_json), text_json)
        encoder = clip_model.text_encoder(ml_collections.ConfigDict(text_block))
        clip_model.load_text_encoder_params(text_dir, encoder)  # Checks names and shapes.
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    if text_block["clip"]["hidden_size"] != uvit_block["encoder_hidden_size"]:
        raise ConversionError(
            f"{text_json}: hidden_size {text_block['clip']['hidden_size']}, but the transformer "
            f"reads encoder states of width {uvit_block['encoder_hidden_size']}."
        )
    text_block.update(trainable=False, checkpoint=TEXT_ENCODER_DIR, dtype="float32")
    try:
        clip_tokenizer.CLIPTokenizer.from_pretrained(tok_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConversionError(f"{tok_dir}: {e}") from None

    config = sampling_config(vq_block, uvit_block, text_block, image_size)
    blobs = {
        "tokenizer": weights.to_bytes({"vq": vq_params}, {"stage": "tokenizer", "step": "None"}),
        "base": weights.to_bytes({"transformer": tr_params}, {"stage": "base", "step": "None"}),
    }
    # Everything is read and checked: write.
    for name, blob in blobs.items():
        storage.write_bytes(storage.join(out, f"{name}.safetensors"), blob)
    for name in storage.listdir(text_dir):
        if name == "config.json" or name.endswith((".safetensors", ".safetensors.index.json")):
            data = storage.read_bytes(storage.join(text_dir, name))
            storage.write_bytes(storage.join(out, TEXT_ENCODER_DIR, name), data)
    export.copy_clip_tokenizer(tok_dir, storage.join(out, export.CLIP_TOKENIZER_DIR))
    sizes = {k: len(v) for k, v in blobs.items()}
    storage.write_text(storage.join(out, "README.md"), _card(src, config, sizes))
    manifest = {
        "format": model_lib.FORMAT,
        "stages": "base",
        "components": {k: {"step": None, "bytes": n} for k, n in sizes.items()},
        "config": config.to_dict(),
        "source": {"diffusers": src},
    }
    storage.write_json(storage.join(out, model_lib.MANIFEST), manifest)
    return manifest
