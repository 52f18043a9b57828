r"""Fine-tuning a converted aMUSEd (`python -m muse_jax.convert --from=diffusers`) on your data.

The argument is the converted model directory; the models, text encoder, tokenizer and sampling
settings come from its config.json, the data block from configs/user_data.py:

  python -m muse_jax.convert --from=diffusers /weights/amused-256 --out=models/amused-256
  for s in tokenizer base; do
    python -m muse_jax.train --config=configs/amused.py:models/amused-256 --config.stage=$s \
        --config.data.dataset=image_folder --config.data.source_dir=/data/my_images \
        --workdir=runs/amused-ft
  done

The tokenizer stage trains nothing (`num_steps=0`): it saves the converted VQ model as its
checkpoint. The base stage starts from the converted U-ViT and trains it with the CLIP text
encoder frozen. Sample the result with `--config=configs/amused.py:<dir> --workdir=...`, or
export it with `python -m muse_jax.export`.
"""

from __future__ import annotations

import json
import os

import ml_collections

try:
    from configs import shapes_tiny, user_data
except ImportError:  # Loaded by path (config_flags) from outside the repository root.
    import importlib.util

    def _load(name: str):
        here = os.path.dirname(os.path.abspath(__file__))
        spec = importlib.util.spec_from_file_location(name, os.path.join(here, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    shapes_tiny, user_data = _load("shapes_tiny"), _load("user_data")


def _inside(directory: str, path: str) -> str:
    return path if os.path.isabs(path) or "://" in path else os.path.join(directory, path)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    directory = arg
    manifest_path = os.path.join(directory, "config.json")
    if not directory or not os.path.exists(manifest_path):
        raise ValueError(
            f"configs/amused.py needs a converted model directory (with config.json), got "
            f"{directory!r}: --config=configs/amused.py:models/amused-256"
        )
    with open(manifest_path) as f:
        model = json.load(f)["config"]
    # Directories converted before kept the text encoder under `base`, sampling at the top.
    text_block = model.get("text_encoder") or model["base"]["text_encoder"]
    sampling = model["base"].get("sampling") or model["sampling"]
    config = shapes_tiny.get_config()
    for name in ("base_decoder", "superres_tokenizer", "superres", "decoder"):
        del config[name]
    config.data = user_data.data_config()
    config.data.image_size = model["data"]["image_size"]
    config.data.hr_image_size = 0
    config.data.text_length = model["data"]["text_length"]
    vocab = model["data"]["vocabulary"]
    config.data.vocabulary = "clip:" + _inside(directory, vocab[len("clip:") :])

    config.tokenizer.model = ml_collections.ConfigDict(model["tokenizer"]["model"])
    config.tokenizer.init_from = f"model:{directory}"
    config.tokenizer.train.num_steps = 0

    config.base.model = ml_collections.ConfigDict(model["base"]["model"])
    text = ml_collections.ConfigDict(text_block)
    text.checkpoint = _inside(directory, text.checkpoint)
    config.text_encoder = text
    config.base.init_from = f"model:{directory}"
    config.base.label_smoothing = 0.0
    config.base.train = shapes_tiny._train(batch_size=8, num_steps=1000, lr=1e-5)
    config.base.train.optimizer.warmup_steps = 50
    config.base.train.steps_per_call = 1
    config.base.train.summary_every = 200
    config.base.train.checkpoint_every = 200
    config.base.sampling = ml_collections.ConfigDict(sampling)
    config.eval.metrics = ()
    return config
