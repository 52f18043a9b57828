"""aMUSEd's VQ model in Flax against diffusers' `VQModel`, through the safetensors converter.

Each reference is a diffusers VQModel with seeded random weights (norms off (1, 0) and a codebook
spread like the encoder's outputs, so that both are tested) written with `save_pretrained` and
read back with this project's reader, so nothing is downloaded and the loader runs the path the published aMUSEd weights take.
Configs: the dummy VQModel of diffusers' aMUSEd pipeline test, a small multi-level one with mid-
block attention and vq_embed_dim != latent_channels, and the real amused-256 / 512 vqvae config
(scripts/convert_amused.py) on a small image.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
try:  # diffusers imports transformers, which dies on a torchvision built for another torch.
    from tests.eval_fixtures import import_transformers

    import_transformers()
except ImportError:
    pass
diffusers = pytest.importorskip("diffusers")

from muse_jax.convert import amused_configs, diffusers_vq  # noqa: E402
from muse_jax.convert.tensors import ConversionError, read_safetensors  # noqa: E402
from muse_jax.models import amused_vq  # noqa: E402

# diffusers' tests/pipelines/amused/test_amused.py dummy vqvae.
DUMMY = dict(
    act_fn="silu",
    block_out_channels=[8],
    down_block_types=["DownEncoderBlock2D"],
    in_channels=3,
    latent_channels=8,
    layers_per_block=1,
    norm_num_groups=8,
    num_vq_embeddings=8,
    out_channels=3,
    sample_size=8,
    up_block_types=["UpDecoderBlock2D"],
    mid_block_add_attention=False,
    lookup_from_codebook=True,
)
# Three levels, width changes in both directions, mid-block attention, quant_conv 6 -> 8.
SMALL = dict(
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
AMUSED = amused_configs.VQ
# Config -> (image side, batch): images stay small so the real config runs in seconds.
CASES = {"dummy": (DUMMY, 8, 2), "small": (SMALL, 16, 2), "amused": (AMUSED, 64, 1)}

VALID_AXES = {
    "batch",
    "length",
    "embed",
    "mlp",
    "heads",
    "kv",
    "vocab",
    "conv_in",
    "conv_out",
    "codebook",
    "height",
    "width",
    "context_embed",
}


def _images(side: int, batch: int, seed: int) -> np.ndarray:
    """Images in [-1, 1], NHWC: a smooth random pattern plus per-pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, side), np.linspace(0, 1, side), indexing="ij")
    base = np.stack([np.sin(3 * xx + c) * np.cos(2 * yy - c) for c in range(3)], -1)
    noisy = 0.6 * base[None] + 0.3 * rng.uniform(-1, 1, (batch, side, side, 3))
    return noisy.clip(-1, 1).astype(np.float32)


def _random_vq(cfg: dict, images: np.ndarray, seed: int = 0):
    """A diffusers VQModel with seeded random weights: convolutions and projections drawn as
    torch's default init draws them, norms moved off (1, 0), and the codebook spread like the
    encoder's outputs so that nearest-codeword ids are decided by clear margins (diffusers'
    uniform(+-1 / n) init would put every codeword next to the origin).

    Built on the meta device and filled in place: torch's own init of the 146M parameters of
    the real config costs seconds more for the same distribution."""
    with torch.device("meta"):
        vq = diffusers.VQModel(**cfg)
    vq = vq.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    shapes = {name: p.shape for name, p in vq.named_parameters()}
    with torch.no_grad():
        for name, p in vq.named_parameters():
            if "norm" in name:
                p.copy_((name.endswith("weight")) + 0.1 * torch.randn(p.shape, generator=gen))
            else:  # kaiming_uniform(a=sqrt(5)) and the matching bias: +-1 / sqrt(fan_in).
                weight = shapes[name.rsplit(".", 1)[0] + ".weight"]
                bound = float(np.prod(weight[1:])) ** -0.5
                p.uniform_(-bound, bound, generator=gen)
        z = vq.encode(torch.from_numpy((images + 1) / 2).permute(0, 3, 1, 2)).latents
        cb = vq.quantize.embedding.weight
        cb.copy_(z.mean(dim=(0, 2, 3)) + z.std() * torch.randn(cb.shape, generator=gen))
    return vq


def _case(name: str, tmp: str):
    """(diffusers model, Flax model, Flax params) for one config, converted via safetensors."""
    cfg, side, batch = CASES[name]
    vq = _random_vq(cfg, _images(side, batch, 0))
    path = os.path.join(tmp, name)
    vq.save_pretrained(path, safe_serialization=True)
    block = amused_vq.config_from_diffusers(dict(vq.config))
    model = amused_vq.build(block)
    file = os.path.join(path, "diffusion_pytorch_model.safetensors")
    params = diffusers_vq.params_from_diffusers(read_safetensors(file), model, file)
    return vq, model, jax.device_put(params)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """name -> (diffusers model, Flax model, params), built once per module and then freed
    (the real config holds over a gigabyte between its copies)."""
    tmp = str(tmp_path_factory.mktemp("amused_vq"))
    built: dict = {}

    def get(name: str):
        if name not in built:
            built[name] = _case(name, tmp)
        return built[name]

    yield get
    built.clear()


def _apply(model, params, method: str, x):
    """`model.<method>(x)`, jitted with XLA:CPU's cheapest code generation: each graph runs
    once, so compiling dominates (optimisation levels do not change what is computed)."""
    fn = jax.jit(
        lambda p, x: model.apply({"params": p}, x, method=getattr(model, method)),
        compiler_options={"xla_backend_optimization_level": 0},
    )
    return fn(params, x)


@pytest.mark.parametrize("name", list(CASES))
def test_decode_ids_matches_diffusers(case, name):
    vq, model, params = case(name)
    _, side, batch = CASES[name]
    h = side // model.downsample_factor
    ids = np.random.default_rng(2).integers(0, model.codebook_size, (batch, h * h))
    with torch.no_grad():
        ref = vq.decode(
            torch.from_numpy(ids).reshape(-1),
            force_not_quantize=True,
            shape=(batch, h, h, model.embed_dim),
        ).sample
    ref = ref.permute(0, 2, 3, 1).numpy()
    ours = np.asarray(_apply(model, params, "decode_ids", ids.astype(np.int32)))
    assert ours.shape == (batch, side, side, 3)
    err = np.abs((ours + 1) / 2 - ref).max()
    print(f"{name}: decode max abs error {err:.2e} (output range {ref.min():.2f}..{ref.max():.2f})")
    assert err <= 1e-4
    grid = np.asarray(
        _apply(model, params, "decode_ids", ids.reshape(batch, h, h).astype(np.int32))
    )
    np.testing.assert_array_equal(grid, ours)


@pytest.mark.parametrize("name", list(CASES))
def test_encode_matches_diffusers(case, name):
    vq, model, params = case(name)
    _, side, batch = CASES[name]
    images = _images(side, batch, 3)
    with torch.no_grad():
        z = vq.encode(torch.from_numpy((images + 1) / 2).permute(0, 3, 1, 2)).latents
        z_q, loss, (_, _, ref_ids) = vq.quantize(z)
    h = side // model.downsample_factor
    ref_ids = ref_ids.reshape(batch, h, h).numpy()
    ours_q, ids, losses = _apply(model, params, "encode", images)
    enc_err = np.abs(np.asarray(losses["encodings"]) - z.permute(0, 2, 3, 1).numpy()).max()
    same = float(np.mean(np.asarray(ids) == ref_ids))
    print(f"{name}: encoder max abs error {enc_err:.2e}, codes equal {same:.0%} of {ids.size}")
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    np.testing.assert_allclose(np.asarray(ours_q), z_q.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    np.testing.assert_allclose(float(losses["codebook"]), float(loss), rtol=1e-4)
    tokens = _apply(model, params, "tokenize", images)
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(tokens), ref_ids.reshape(batch, -1))


def test_call_reconstructs_through_codes(case):
    _, model, params = case("dummy")
    images = _images(8, 2, 4)
    recon, ids, losses = _apply(model, params, "__call__", images)
    direct = _apply(model, params, "decode_ids", ids)
    assert recon.shape == images.shape and set(losses) == {"codebook", "commitment", "encodings"}
    np.testing.assert_allclose(np.asarray(recon), np.asarray(direct), atol=1e-5)


def test_misshaped_tensor_is_named(case):
    vq, model, _ = case("dummy")
    state = {k: v.numpy() for k, v in vq.state_dict().items()}
    state["decoder.conv_out.weight"] = np.zeros((3, 8, 1, 1), np.float32)
    with pytest.raises(ConversionError, match=r"decoder\.conv_out\.weight"):
        diffusers_vq.params_from_diffusers(state, model, "vq.safetensors")


def test_missing_tensor_is_named(case):
    vq, model, _ = case("dummy")
    state = {k: v.numpy() for k, v in vq.state_dict().items()}
    del state["quantize.embedding.weight"]
    with pytest.raises(ConversionError, match=r"quantize\.embedding\.weight"):
        diffusers_vq.params_from_diffusers(state, model, "vq.safetensors")


@pytest.mark.parametrize("name", ["small", "amused"])
def test_every_parameter_has_logical_axes(name):
    cfg = CASES[name][0]
    model = amused_vq.build(amused_vq.config_from_diffusers(cfg))
    f = model.downsample_factor
    boxed = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, f, f, 3), np.float32))
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == leaf.value.ndim, leaf
        assert set(leaf.names) - {None} <= VALID_AXES, leaf.names


def test_bfloat16_compute_keeps_float32_parameters(case):
    _, model, params = case("dummy")
    block = {**amused_vq.config_from_diffusers(DUMMY), "dtype": "bfloat16"}
    half = amused_vq.build(block)
    boxed = jax.eval_shape(half.init, jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
    assert {leaf.dtype for leaf in jax.tree.leaves(nn.unbox(boxed))} == {np.dtype("float32")}
    ids = np.random.default_rng(5).integers(0, 8, (2, 64)).astype(np.int32)
    ours = _apply(half, params, "decode_ids", ids)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, _apply(model, params, "decode_ids", ids), atol=0.1)


def test_build_reads_a_model_block():
    block = amused_vq.config_from_diffusers(AMUSED)
    assert block["kind"] == "amused_vq" and block["codebook_size"] == 8192
    model = amused_vq.build(ml_collections.ConfigDict(block))
    assert model.downsample_factor == 16 and model.codebook_size == 8192
    assert model.embed_dim == 64 and not model.mid_block_add_attention


@pytest.mark.parametrize(
    "change, words",
    [
        ({"norm_type": "spatial"}, "norm_type"),
        ({"down_block_types": ["AttnDownEncoderBlock2D"]}, "down_block_types"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"lookup_from_codebook": False}, "lookup_from_codebook"),
        ({"_class_name": "AutoencoderKL"}, "AutoencoderKL"),
    ],
)
def test_unsupported_diffusers_configs_fail(change, words):
    with pytest.raises(ConversionError, match=words):
        amused_vq.config_from_diffusers({**DUMMY, **change})


def test_unsupported_module_fields_fail():
    model = amused_vq.AmusedVQ(block_out_channels=(8,), norm_num_groups=8, norm_type="spatial")
    with pytest.raises(ValueError, match="norm_type"):
        model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
