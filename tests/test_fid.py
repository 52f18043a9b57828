"""FID: the Flax FID Inception against pytorch-fid, the Fréchet distance, the cache, the converter.

The reference is pytorch-fid's own `InceptionV3` with random weights (its URL loader is patched
out, so nothing is downloaded), saved as a .pth and converted with our CLI, i.e. the path a
user's real weights take. Its BatchNorm statistics are calibrated on other images and then
rescaled per channel, so running means/variances span ~1e-3..1e2 and eps matters.
"""

from __future__ import annotations

import copy
import os
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from muse_jax.eval import convert_inception, fid, inception
from tests.helpers import run_module

_TORCHVISION_SHIM: list = []


def _pytorch_fid():
    """Imports pytorch_fid.inception, working around a CUDA torchvision wheel on CPU torch.

    PyPI's torchvision 0.28 is a CUDA build: with torch's CPU build its C++ ops do not load,
    and its import then dies registering a fake kernel for `torchvision::nms`. pytorch-fid only
    needs torchvision's Python model code, so declaring the two missing op schemas suffices.
    Another test module in the same process may have hidden torchvision (`sys.modules` entry
    None, for transformers' sake): un-hide it here.
    """
    if "torchvision" in sys.modules and sys.modules["torchvision"] is None:
        del sys.modules["torchvision"]
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_SHIM.append(lib)  # The schemas live as long as the Library object.
    from pytorch_fid import inception as pfi

    return pfi


def _random_state_dict(pfi, seed: int) -> dict[str, torch.Tensor]:
    """A state dict for pytorch-fid's FID network with random but well-scaled weights."""
    built = []
    original = pfi.fid_inception_v3

    def capture():
        built.append(original())
        return built[-1]

    # Build the architecture through pytorch-fid's own code, with its weight download disabled.
    with (
        mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(torch.nn.Module, "load_state_dict", lambda *a, **k: None),
        mock.patch.object(pfi, "fid_inception_v3", capture),
    ):
        model = pfi.InceptionV3([3])
    net = built[0]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):  # He init keeps activations O(1).
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.4 + 0.8)
                # Mostly-active ReLUs: with zero-mean biases a random net amplifies float32
                # round-off ~1000x over its 94 layers (torch's own float32 output is then 1e-3
                # from its float64 one), which would hide real mismatches behind noise.
                m.bias.copy_(m.weight * (1 + 0.3 * torch.randn(m.bias.shape, generator=g)))
                m.reset_running_stats()
                m.momentum = None  # The running statistics become the calibration batch's.
        model.train()
        model(torch.rand((4, 3, 64, 64), generator=g))
        for m in net.modules():
            if hasattr(m, "bn"):  # Exact up to eps: conv * s, mean * s, var * s^2.
                s = torch.exp(torch.empty(m.bn.running_var.shape).uniform_(-2.3, 2.3, generator=g))
                m.conv.weight.mul_(s[:, None, None, None])
                m.bn.running_mean.mul_(s)
                m.bn.running_var.mul_(s * s)
    return net.state_dict()


def _images(n: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """Smooth random uint8 images (blocky low-frequency colour fields plus a little noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, size[0] // 8, size[1] // 8, 3))
    x = np.repeat(np.repeat(coarse, 8, 1), 8, 2) + rng.normal(0, 8, (n, *size, 3))
    return np.clip(x, 0, 255).astype(np.uint8)


def _torch_features(model, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = x.double() / 255 if next(model.parameters()).dtype == torch.float64 else x.float() / 255
    with torch.no_grad():
        return model(x)[0][:, :, 0, 0].numpy()


@pytest.fixture(scope="module")
def pfi():
    return _pytorch_fid()


@pytest.fixture(scope="module")
def weights(pfi, tmp_path_factory) -> dict:
    """Random weights as .pth, converted by the CLI, and pytorch-fid's network loaded from it."""
    path = tmp_path_factory.mktemp("inception")
    pth, out = str(path / "random_inception.pth"), str(path / "inception_fid.safetensors")
    torch.save(_random_state_dict(pfi, seed=0), pth)
    done = run_module(
        "muse_jax.eval.convert_inception", f"--input={pth}", f"--output={out}", timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout
    # pytorch-fid loads the .pth exactly as it loads the real download (strict load_state_dict).
    with mock.patch.object(
        pfi, "load_state_dict_from_url", lambda *a, **k: torch.load(pth, weights_only=True)
    ):
        model = pfi.InceptionV3([3]).eval()
    return {"pth": pth, "safetensors": out, "model": model}


@pytest.fixture(scope="module")
def extractor(weights) -> fid.FeatureExtractor:
    # 3 does not divide the 4-image sets below, so every call also runs a padded batch.
    return fid.FeatureExtractor(weights["safetensors"], batch_size=3, log_every=0)


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (512, 384), (299, 299), (300, 1000)])
def test_resize_matches_torch(size):
    x = np.random.default_rng(0).random((2, *size, 3), dtype=np.float32)
    ref = F.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        size=(299, 299),
        mode="bilinear",
        align_corners=False,
    )
    ours = inception.resize_bilinear(jnp.asarray(x), (299, 299))
    np.testing.assert_allclose(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_converted_file(weights):
    tensors = load_file(weights["safetensors"])
    assert set(tensors) == set(inception.key_table())  # fc.* and num_batches_tracked dropped.
    src = torch.load(weights["pth"], weights_only=True)
    np.testing.assert_array_equal(
        tensors["Mixed_7c.branch_pool.conv.weight"], src["Mixed_7c.branch_pool.conv.weight"].numpy()
    )


def test_parity_float32_with_pytorch_fid(weights, extractor):
    images = _images(4, (64, 64), seed=1)  # 64x64 -> 299x299: the resize is part of the check.
    ref = _torch_features(weights["model"], images)
    ours = extractor(images)
    assert ours.shape == (4, 2048) and ours.dtype == np.float32
    err = float(np.abs(ours - ref).max())
    assert err <= 1e-4, err
    # Meaningful activations: O(1), mostly non-zero, and different for different images.
    assert 0.1 < float(np.abs(ref).mean()) < 10, np.abs(ref).mean()
    assert (ref != 0).mean() > 0.5
    assert float(ref.std(axis=0).mean()) > 0.01
    # Float [0, 1] input is the same as uint8 / 255.
    np.testing.assert_allclose(extractor(images.astype(np.float32) / 255), ours, atol=1e-5)


def test_parity_float64_is_exact(weights):
    """In float64 both sides are exact to round-off, so any architectural slip would show."""
    images = _images(2, (48, 80), seed=2)
    ref = _torch_features(copy.deepcopy(weights["model"]).double(), images)
    with jax.enable_x64(True):
        variables = jax.tree.map(
            lambda a: np.asarray(a, np.float64), inception.load_variables(weights["safetensors"])
        )
        ours = inception.InceptionV3(dtype=jnp.float64).apply(variables, images)
        assert ours.dtype == jnp.float64
        err = float(np.abs(np.asarray(ours) - ref).max())
    assert err <= 1e-9, err


def _stats(rng, n: int, d: int, shift: float = 0.0) -> fid.Statistics:
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return fid.statistics(rng.normal(size=(n, d)) @ mix + shift)


@pytest.mark.parametrize("n", [200, 20])  # 20 < 64 dims: singular covariances, complex sqrtm.
def test_frechet_distance_matches_pytorch_fid(pfi, n):
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(n)
    a, b = _stats(rng, n, 64), _stats(rng, n, 64, shift=0.3)
    ref = calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    for method in ("eigh", "sqrtm"):
        ours = fid.frechet_distance(a, b, method=method)
        assert ours == pytest.approx(ref, abs=1e-3, rel=1e-6), method
        assert ours > 1.0


def test_frechet_distance_singular_product_adds_eps(pfi):
    from pytorch_fid.fid_score import calculate_frechet_distance

    d = 16
    a = fid.Statistics(np.zeros(d), np.ones((d, d)), 2)
    b = fid.Statistics(np.ones(d), np.outer(np.arange(d), np.arange(d)) * 1.0, 2)
    ours = fid.frechet_distance(a, b, method="sqrtm")
    assert np.isfinite(ours)
    assert ours == pytest.approx(calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma), abs=1e-3)
    # The eigendecomposition needs no eps: finite, and the exact value within eps's effect.
    exact = fid.frechet_distance(a, b, method="eigh")
    assert np.isfinite(exact) and exact == pytest.approx(ours, rel=1e-3)


@pytest.mark.slow
def test_fid_zero_for_itself_and_grows_with_noise(pfi, extractor):
    """On real 2048-d features (8 images: singular covariances), also against pytorch-fid."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    clean = _images(8, (64, 64), seed=3)
    ref = fid.statistics(extractor(clean))
    assert abs(fid.frechet_distance(ref, ref)) < 1e-5 * np.trace(ref.sigma)
    noise = np.random.default_rng(4).normal(size=clean.shape)
    scores = []
    for sigma in (8, 24, 64):
        noisy = fid.statistics(extractor(np.clip(clean + sigma * noise, 0, 255).astype(np.uint8)))
        scores.append(fid.frechet_distance(noisy, ref))
    assert 0 < scores[0] < scores[1] < scores[2], scores
    expected = calculate_frechet_distance(noisy.mu, noisy.sigma, ref.mu, ref.sigma)
    assert scores[-1] == pytest.approx(expected, abs=1e-3)


def test_batching_pads_and_preserves_order():
    chunks = [np.full((n, 2, 2, 3), i, np.uint8) for i, n in enumerate([5, 2, 0, 4])]
    got = list(fid._batches(iter(chunks), 4))
    assert [n for _, n in got] == [4, 4, 3]
    assert all(b.shape == (4, 2, 2, 3) for b, _ in got)
    rows = np.concatenate([b[:n] for b, n in got])[:, 0, 0, 0]
    np.testing.assert_array_equal(rows, [0] * 5 + [1] * 2 + [3] * 4)
    assert (got[-1][0][3] == 0).all()


def test_rejects_images_outside_unit_range(extractor):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extractor(np.full((2, 8, 8, 3), -1.0, np.float32))  # A [-1, 1] generator output.
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        extractor(np.zeros((2, 8, 8), np.uint8))


def test_reference_statistics_are_cached(extractor, weights, tmp_path):
    calls = []

    def images():
        calls.append(1)
        return iter([_images(2, (32, 32), seed=5), _images(3, (32, 32), seed=6)])

    key = fid.cache_key("toy", "val", 5, weights=weights["safetensors"])
    assert key.startswith("toy-val-5-inception") and key == fid.cache_key(
        "toy", "val", 5, weights=weights["safetensors"]
    )
    first = fid.reference_statistics(extractor, images, str(tmp_path), key)
    path = tmp_path / f"{key}.npz"
    mtime = os.stat(path).st_mtime_ns
    second = fid.reference_statistics(extractor, images, str(tmp_path), key)
    assert len(calls) == 1 and os.stat(path).st_mtime_ns == mtime
    assert first.count == second.count == 5
    np.testing.assert_array_equal(first.mu, second.mu)
    np.testing.assert_array_equal(first.sigma, second.sigma)
    fid.reference_statistics(extractor, images, str(tmp_path), key + "-other")
    assert len(calls) == 2 and os.path.exists(tmp_path / f"{key}-other.npz")
    # A file that holds another key's statistics is refused rather than silently reused.
    os.replace(tmp_path / f"{key}-other.npz", tmp_path / "renamed.npz")
    with pytest.raises(ValueError, match="holds statistics for"):
        fid.reference_statistics(extractor, images, str(tmp_path), "renamed")
    # pytorch-fid can read the file (it only needs mu and sigma).
    with np.load(path) as f:
        np.testing.assert_array_equal(f["mu"], first.mu)


def test_converter_and_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        convert_inception.convert(str(tmp_path / "missing.pth"), str(tmp_path / "o.safetensors"))
    with pytest.raises(FileNotFoundError, match="convert_inception"):
        inception.load_variables(str(tmp_path / "missing.safetensors"))
    wrong = str(tmp_path / "wrong.pth")
    torch.save({"foo.weight": torch.zeros(3)}, wrong)
    with pytest.raises(inception.WeightsError, match="unexpected key 'foo.weight'"):
        convert_inception.convert(wrong, str(tmp_path / "o.safetensors"))
    assert not os.path.exists(tmp_path / "o.safetensors")
    corrupt = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    torch.save({"foo.weight": torch.zeros(3)}, corrupt)
    with pytest.raises(inception.WeightsError, match="corrupt"):
        convert_inception.convert(corrupt, str(tmp_path / "o.safetensors"))

    state = {k: np.zeros(shape, np.float32) for k, shape in _torch_shapes().items()}
    bad = dict(state)
    del bad["Mixed_6b.branch7x7_2.bn.running_var"]
    with pytest.raises(
        inception.WeightsError, match="missing key 'Mixed_6b.branch7x7_2.bn.running_var'"
    ):
        inception.variables_from_state_dict(bad)
    bad = dict(state, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5), np.float32)})
    with pytest.raises(inception.WeightsError, match=r"'Conv2d_1a_3x3.conv.weight' has shape"):
        inception.variables_from_state_dict(bad)
    bad = dict(state, **{"AuxLogits.conv0.conv.weight": np.zeros((128, 768, 1, 1), np.float32)})
    with pytest.raises(inception.WeightsError, match="unexpected key 'AuxLogits"):
        inception.variables_from_state_dict(bad)
    bad = dict(state, **{"fc.weight": np.zeros((1000, 2048), np.float32)})  # torchvision's.
    with pytest.raises(inception.WeightsError, match="1000 classes"):
        inception.variables_from_state_dict(bad)
    # The npz path reads the same names; a file missing a key fails naming it.
    np.savez(
        tmp_path / "w.npz",
        **{k: v for k, v in state.items() if k != "Mixed_7c.branch1x1.conv.weight"},
    )
    with pytest.raises(
        inception.WeightsError, match="w.npz: missing key 'Mixed_7c.branch1x1.conv.weight'"
    ):
        inception.load_variables(str(tmp_path / "w.npz"))


def test_converter_cli_reports_errors_in_one_line(tmp_path):
    done = run_module(
        "muse_jax.eval.convert_inception",
        f"--input={tmp_path / 'nope.pth'}",
        f"--output={tmp_path / 'o.safetensors'}",
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error:") and "nope.pth" in done.stderr
    assert "Traceback" not in done.stderr


def _torch_shapes() -> dict[str, tuple[int, ...]]:
    out = {}
    for name, (_, shape, is_kernel) in inception.key_table().items():
        out[name] = (shape[3], shape[2], shape[0], shape[1]) if is_kernel else shape
    return out
