"""Random-weight metric networks in the files a user supplies, for tests of the evaluation binary.

  write_random_inception(path)  FID InceptionV3 weights as .safetensors (the converter's output)
  write_random_clip(directory)  a small transformers CLIPModel via save_pretrained, with a
                                character-level BPE vocab.json/merges.txt

Both are deterministic; neither needs a download. The CLIP writer imports torch and
transformers (test extras); the Inception writer needs neither.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def write_random_inception(path: str, seed: int = 0) -> str:
    """He-initialised FID Inception weights (ReLUs mostly active, so features are O(1) and
    differ between images) in pytorch-fid's state-dict layout, as `convert_inception` writes."""
    import jax
    from safetensors.numpy import save_file

    from muse_jax.eval import inception

    rng = np.random.default_rng(seed)
    shapes = inception.variable_shapes()
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple)
    )
    leaves = []
    for key_path, shape in flat:
        leaf = key_path[-1].key
        if leaf == "kernel":  # [kh, kw, in, out]
            fan_in = shape[0] * shape[1] * shape[2]
            value = rng.normal(0, np.sqrt(2 / fan_in), shape)
        elif leaf == "scale":
            value = rng.uniform(0.8, 1.2, shape)
        elif leaf == "bias":
            value = rng.uniform(0.0, 0.3, shape)
        elif leaf == "mean":
            value = np.zeros(shape)
        else:  # var
            value = rng.uniform(0.5, 2.0, shape)
        leaves.append(value.astype(np.float32))
    variables = jax.tree_util.tree_unflatten(treedef, leaves)
    save_file(inception.state_dict_from_variables(variables), path)
    return path


def import_transformers():
    """transformers without a torchvision wheel that does not match torch (its import fails
    and would take transformers' image utilities down with it)."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        sys.modules["torchvision"] = None
    import transformers

    return transformers


def write_random_clip(directory: str, image_size: int = 32) -> str:
    """A 2-layer, 64-wide random CLIP (patch 8) with a byte-level character vocabulary."""
    import torch
    from tokenizers import pre_tokenizers

    from muse_jax.text.clip_tokenizer import BOS, EOS

    transformers = import_transformers()
    os.makedirs(directory, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [BOS, EOS]  # EOS last, as in CLIP.
    vocab = {t: i for i, t in enumerate(tokens)}
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    eos = vocab[EOS]
    config = transformers.CLIPConfig(
        text_config=dict(
            **tower, vocab_size=len(vocab), bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos
        ),
        vision_config=dict(**tower, image_size=image_size, patch_size=8),
        projection_dim=32,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).eval().save_pretrained(directory, safe_serialization=True)
    return directory
