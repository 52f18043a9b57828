"""CLIP score: Flax CLIP parity with `transformers.CLIPModel`, tokenizer, preprocessing, formula.

The reference is a small randomly initialised PyTorch CLIP (LayerNorms and biases perturbed so they
are tested) written with `save_pretrained`, plus a hand-made byte-level BPE vocab.json/merges.txt,
so nothing is downloaded; the loader runs the same code path as for openai/clip-vit-large-patch14.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch

from tests.eval_fixtures import import_transformers  # noqa: E402

transformers = import_transformers()  # Hides a torchvision that cannot load.
from safetensors.numpy import load_file, save_file  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402

from muse_jax.eval import clip  # noqa: E402
from muse_jax.text import clip_model  # noqa: E402
from muse_jax.text.clip_tokenizer import BOS, EOS, CLIPTokenizer  # noqa: E402
from muse_jax.text.safetensors_t5 import CheckpointError  # noqa: E402

WORDS = ["a", "photo", "of", "the", "cat", "dog", "on", "red", "car", "that", "is", "'s", "12"]
CAPTIONS = [
    "A photo of a cat.",
    "the   dog's RED car\tis on the  mat!!",
    "naïve café, 3 dogs & 12 cats — ok?",
    "",
    " ".join(["a photo of the dog on a red car"] * 12),  # > 77 tokens: truncated
]
IMAGE_SIZE = 56


def _write_bpe(path: str) -> dict[str, int]:
    """A byte-level BPE with every byte (and byte</w>) plus merges spelling WORDS left to right."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:
            merges.append(f"{cur} {nxt}")
            cur += nxt
            tokens.append(cur)
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]  # EOS last: the largest id, as in CLIP
    vocab = {t: i for i, t in enumerate(tokens)}
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return vocab


def _hf_config(vocab_size: int, eos: int, hidden_act: str = "quick_gelu"):
    tower = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act=hidden_act,
    )
    return transformers.CLIPConfig(
        text_config=dict(
            **tower, vocab_size=vocab_size, bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos
        ),
        vision_config=dict(**tower, image_size=IMAGE_SIZE, patch_size=14),
        projection_dim=32,
    )


def _random_model(config) -> transformers.CLIPModel:
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # Default init makes norms 1/0 and biases 0; perturb so they are tested.
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "class_embedding" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clip"))
    vocab = _write_bpe(path)
    model = _random_model(_hf_config(len(vocab), vocab[EOS]))
    model.save_pretrained(path, safe_serialization=True)
    return path, model


@pytest.fixture(scope="module")
def loaded(ckpt):
    path, _ = ckpt
    config = clip_model.config_from_hf(path)
    return config, clip_model.load_params(path, config)


def _hf_tokenizer(path: str):
    return transformers.CLIPTokenizer.from_pretrained(path)


def _encode_text(config, params, ids: np.ndarray) -> np.ndarray:
    fn = jax.jit(
        lambda p, x: clip_model.CLIP(config).apply(
            {"params": p}, x, method=clip_model.CLIP.encode_text
        )
    )
    return np.asarray(fn(params, ids))


# ----------------------------------------------------------------------------- model parity


def test_config_and_param_shapes(ckpt, loaded):
    config, params = loaded
    assert config.vision == clip_model.VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=14,
    )
    assert config.text.eos_token_id == config.text.vocab_size - 1 and config.projection_dim == 32
    expected = jax.tree.map(lambda s: s.shape, clip_model.param_shapes(config))
    assert jax.tree.map(np.shape, params) == expected
    hf_count = sum(p.numel() for p in ckpt[1].parameters())
    assert clip_model.param_count(config) == hf_count


def test_image_text_and_logit_parity(ckpt, loaded):
    path, model = ckpt
    config, params = loaded
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    hf_tok = _hf_tokenizer(path)(
        CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        ref_txt = model.get_text_features(**hf_tok).pooler_output.numpy()
        ref_logits = model(pixel_values=pixels, **hf_tok).logits_per_image.numpy()
    ids = CLIPTokenizer.from_pretrained(path)(CAPTIONS)
    img, txt, logits = jax.jit(clip_model.CLIP(config).apply)(
        {"params": params}, pixels.numpy().transpose(0, 2, 3, 1), ids
    )
    for ours, ref in ((img, ref_img), (txt, ref_txt), (logits, ref_logits)):
        assert np.abs(np.asarray(ours) - ref).max() <= 1e-4, np.abs(np.asarray(ours) - ref).max()
    # The embeddings are not degenerate: captions and images are told apart.
    assert np.ptp(ref_logits, axis=1).min() > 1e-2


def test_bfloat16_compute_close(ckpt, loaded):
    path, model = ckpt
    config, params = loaded
    pixels = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    ids = CLIPTokenizer.from_pretrained(path)(CAPTIONS[:4])
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=torch.from_numpy(ids).long())
    bf16 = dataclasses.replace(config, dtype="bfloat16")
    img, _, logits = jax.jit(clip_model.CLIP(bf16).apply)(
        {"params": params}, pixels.numpy().transpose(0, 2, 3, 1), ids
    )
    assert img.dtype == np.float32
    cos_err = (
        np.abs(np.asarray(logits) - out.logits_per_image.numpy()).max() / model.logit_scale.exp()
    )
    assert cos_err < 0.02, cos_err


@pytest.mark.parametrize("eos_token_id", [2, None], ids=["legacy_argmax", "eos_id"])
def test_text_pooling_and_activation_follow_config(ckpt, tmp_path, eos_token_id):
    """Random ids (EOS anywhere or nowhere) pool where transformers pools, with gelu MLPs."""
    vocab_size = 40
    eos = eos_token_id or 37
    model = _random_model(_hf_config(vocab_size, eos, hidden_act="gelu"))
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    config = clip_model.config_from_hf(str(tmp_path))
    assert config.text.hidden_act == "gelu" and config.text.eos_token_id == eos
    params = clip_model.load_params(str(tmp_path), config)
    ids = np.random.default_rng(0).integers(0, vocab_size, (6, 20)).astype(np.int32)
    ids[1, 5] = ids[1, 12] = 37  # two EOS: the first one counts
    ids[2] = np.where(ids[2] == 37, 3, ids[2])  # no EOS at all
    with torch.no_grad():
        ref = model.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output.numpy()
    assert np.abs(_encode_text(config, params, ids) - ref).max() <= 1e-4


def test_sharded_checkpoint(ckpt, loaded, tmp_path):
    path, model = ckpt
    model.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="100KB")
    assert os.path.exists(tmp_path / clip_model.INDEX_FILE)
    assert not os.path.exists(tmp_path / clip_model.WEIGHTS_FILE)
    jax.tree.map(np.testing.assert_array_equal, clip_model.load_params(str(tmp_path)), loaded[1])


def test_config_dict_overrides_like_transformers(ckpt, tmp_path):
    """Old OpenAI configs: text_config says eos 2, text_config_dict (with defaults) wins."""
    path, _ = ckpt
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    hf["text_config"]["eos_token_id"] = 2
    hf["text_config_dict"] = {"hidden_size": 64, "num_attention_heads": 4}
    hf["vision_config_dict"] = {"hidden_size": 64, "num_attention_heads": 4, "patch_size": 14}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf, f)
    ours = clip_model.config_from_hf(str(tmp_path))
    ref = transformers.CLIPConfig.from_pretrained(str(tmp_path))
    for mine, theirs in ((ours.text, ref.text_config), (ours.vision, ref.vision_config)):
        for field in mine.__dataclass_fields__:
            assert getattr(mine, field) == getattr(theirs, field), field
    assert ours.text.eos_token_id == 49407 and ours.vision.image_size == 224


# ----------------------------------------------------------------------------- errors


def _edit_weights(src: str, dst: str, edit) -> None:
    tensors = load_file(os.path.join(src, clip_model.WEIGHTS_FILE))
    edit(tensors)
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, clip_model.WEIGHTS_FILE))
    shutil.copy(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda t: t.pop("text_model.encoder.layers.1.mlp.fc2.bias"), "layers.1.mlp.fc2.bias"),
        (lambda t: t.update({"vision_model.head.weight": np.zeros(3, np.float32)}), "head"),
        (
            lambda t: t.update({"visual_projection.weight": np.zeros((32, 63), np.float32)}),
            r"visual_projection.weight.*\(32, 63\).*\(32, 64\)",
        ),
        (
            lambda t: t.update(
                {"vision_model.embeddings.patch_embedding.weight": np.zeros((64, 3, 7, 7), "f4")}
            ),
            r"patch_embedding.weight.*\(64, 3, 7, 7\).*\(64, 3, 14, 14\)",
        ),
    ],
    ids=["missing", "unexpected", "shape", "conv_shape"],
)
def test_errors_name_the_key(ckpt, tmp_path, edit, key):
    _edit_weights(ckpt[0], str(tmp_path), edit)
    with pytest.raises(CheckpointError, match=key) as info:
        clip_model.load_params(str(tmp_path))
    assert "\n" not in str(info.value)


def test_missing_shard_is_named(ckpt, tmp_path):
    ckpt[1].save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="100KB")
    with open(tmp_path / clip_model.INDEX_FILE) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match=f"names {shard}, which is missing"):
        clip_model.load_params(str(tmp_path))


def test_old_position_ids_buffers_are_ignored(ckpt, loaded, tmp_path):
    def add(t):
        t["text_model.embeddings.position_ids"] = np.arange(77)[None].astype(np.int64)

    _edit_weights(ckpt[0], str(tmp_path), add)
    jax.tree.map(np.testing.assert_array_equal, clip_model.load_params(str(tmp_path)), loaded[1])


def test_missing_and_foreign_checkpoints(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        clip_model.config_from_hf(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="missing config.json"):
        clip_model.config_from_hf(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "t5", "d_model": 8}, f)
    with pytest.raises(CheckpointError, match="not a CLIP config.*'t5'"):
        clip_model.config_from_hf(str(tmp_path))
    with open(os.path.join(ckpt[0], "config.json")) as f:
        hf = json.load(f)
    hf["vision_config"]["hidden_act"] = "swish"
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf, f)
    with pytest.raises(CheckpointError, match="vision_config.hidden_act 'swish'"):
        clip_model.config_from_hf(str(tmp_path))
    shutil.copy(os.path.join(ckpt[0], "config.json"), tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        clip_model.load_params(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt"):
        CLIPTokenizer.from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_matches_transformers(ckpt, tmp_path):
    path, _ = ckpt
    ref = _hf_tokenizer(path)(CAPTIONS, padding="max_length", max_length=77, truncation=True)
    ref = np.asarray(ref["input_ids"])
    ours = CLIPTokenizer.from_pretrained(path)
    ids = ours(CAPTIONS)
    np.testing.assert_array_equal(ids, ref)
    assert ids.shape == (len(CAPTIONS), 77) and ids.dtype == np.int32
    assert (ids[:, 0] == ours.bos_id).all()
    # The long caption is cut to 75 tokens + EOS; merges were applied ("photo</w>" is one token).
    assert ids[4, -1] == ours.eos_id and ours.eos_id not in ids[4, :-1]
    with open(os.path.join(path, "vocab.json")) as f:
        assert json.load(f)["photo</w>"] in ids[0]
    # tokenizer.json (what the published checkpoints also ship) gives the same ids.
    _hf_tokenizer(path).save_pretrained(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):
        if os.path.exists(tmp_path / name):
            os.remove(tmp_path / name)
    np.testing.assert_array_equal(CLIPTokenizer.from_pretrained(str(tmp_path))(CAPTIONS), ref)


# ----------------------------------------------------------------------------- preprocessing


def _pil_image_processor(**kwargs):
    """transformers' PIL-backend CLIPImageProcessor: OpenAI's preprocessing, and the default
    whenever torchvision is absent (see the module docstring of `muse_jax.eval.clip`)."""
    return transformers.CLIPImageProcessorPil(**kwargs)


@pytest.mark.parametrize(
    "shape, size",
    [((100, 150), 224), ((333, 250), 224), ((256, 256), 224), ((97, 61), IMAGE_SIZE)],
)
def test_preprocess_matches_clip_image_processor(shape, size):
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    processor = _pil_image_processor(size={"shortest_edge": size}, crop_size=size)
    ref = processor(images=[image], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = clip.preprocess(image, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)  # same Pillow resize, same float32 arithmetic


def test_preprocess_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        clip.preprocess(np.zeros((32, 32, 3), np.float32))


# ----------------------------------------------------------------------------- the score


def test_score_formula_known_answers():
    e = np.array([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    same = clip.clip_score(e, 3.0 * e)  # identical directions, any length
    assert same.clip_score == pytest.approx(100.0) and same.clip_score_01 == pytest.approx(1.0)
    opposite = clip.clip_score(e, -e)
    assert opposite.clip_score == 0.0 and opposite.mean_cosine == pytest.approx(-1.0)
    assert opposite.torchmetrics_clip_score == 0.0
    orthogonal = clip.clip_score(e[1:], e[[2, 1]])
    assert orthogonal.clip_score == pytest.approx(0.0)
    # cos = 1 and -0.5: per-pair clamp gives 50; torchmetrics clamps the mean, 25.
    mixed = clip.clip_score(
        np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([[2.0, 0.0], [-1.0, 3**0.5]])
    )
    assert mixed.clip_score == pytest.approx(50.0) and mixed.clip_score_01 == pytest.approx(0.5)
    assert mixed.torchmetrics_clip_score == pytest.approx(25.0)
    assert mixed.mean_cosine == pytest.approx(0.25) and mixed.count == 2
    assert set(mixed.to_dict()) == {
        "clip_score",
        "clip_score_01",
        "mean_cosine",
        "torchmetrics_clip_score",
        "count",
    }


def test_scorer_end_to_end_matches_transformers(ckpt):
    """6 images of mixed sizes, batch 4 (one padded batch), repeated captions."""
    path, model = ckpt
    rng = np.random.default_rng(3)
    images = [
        rng.integers(0, 256, shape, dtype=np.uint8)
        for shape in [
            (64, 80, 3),
            (56, 56, 3),
            (120, 70, 3),
            (64, 64, 3),
            (90, 90, 3),
            (57, 200, 3),
        ]
    ]
    captions = [CAPTIONS[i] for i in (0, 1, 0, 2, 4, 1)]
    calls = []
    scorer = clip.CLIPScorer.from_pretrained(
        path, batch_size=4, progress=lambda *a: calls.append(a)
    )
    result = scorer.score(images, captions)

    processor = _pil_image_processor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE)
    pixels = torch.from_numpy(processor(images=images, return_tensors="np")["pixel_values"])
    tok = _hf_tokenizer(path)(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(pixel_values=pixels, **tok)
    ref_cos = (out.image_embeds * out.text_embeds).sum(-1).numpy()
    assert np.abs(result.cosines - ref_cos).max() <= 1e-5
    assert result.count == 6
    assert result.clip_score == pytest.approx(100 * np.maximum(ref_cos, 0).mean(), abs=1e-3)
    # One compilation per tower for all batches, the last one padded.
    assert scorer._image_fn._cache_size() == 1 and scorer._text_fn._cache_size() == 1
    assert calls[-1] == ("images", 6, 6) and ("captions", 4, 4) in calls
    with pytest.raises(ValueError, match="5 images but 6 captions"):
        scorer.score(images[:5], captions)
