"""InceptionV3 as FID computes it: pytorch-fid's network (the 2015 TF weights), pool3 features.

FID numbers are only comparable when they come from the same network and preprocessing, so
this reproduces `pytorch_fid.inception.InceptionV3` (use_fid_inception=True) layer by layer:
bilinear resize to 299x299 (align_corners=False, no antialias), [0, 1] -> [-1, 1], BatchNorm
with eps=1e-3 in inference mode, average pools that do not count padding in the A/C/E_1 blocks,
and the max pool of the last E block (a quirk of the TF graph that the weights were trained with).
The 1008-class head is never used.

Weights come as the PyTorch state dict of that network in a safe format (`.safetensors` or
`.npz`, local or gs://; see `muse_jax.eval.convert_inception` for the `.pth` download). Module
names equal the PyTorch ones, so `Mixed_6b.branch7x7_2.conv.weight` is
params/Mixed_6b/branch7x7_2/conv/kernel.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import storage
from muse_jax.errors import UsageError

Dtype = Any
Padding = tuple[tuple[int, int], tuple[int, int]]

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # The TF graph's head, whose weights ride along in the .pth; unused.
BN_EPS = 1e-3

# Keys of the PyTorch state dict that the feature extractor does not need.
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_HEAD_SHAPES = {"fc.weight": (NUM_CLASSES, FEATURE_DIM), "fc.bias": (NUM_CLASSES,)}


class WeightsError(UsageError):
    """A weights file does not hold the FID Inception network."""


def _pad(padding: tuple[int, int]) -> Padding:
    return ((padding[0], padding[0]), (padding[1], padding[1]))


class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=1e-3, running statistics) -> ReLU, torchvision's BasicConv2d."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.features,
            self.kernel,
            self.strides,
            padding=_pad(self.padding),
            use_bias=False,
            dtype=self.dtype,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # TF's average pool ignores the zero padding; pytorch-fid patches count_include_pad=False in.
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b-d (FIDInceptionA): 1x1, 5x5, double 3x3 and avg-pool branches."""

    pool_features: int
    conv: Any = BasicConv

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.conv
        b1 = c(64, name="branch1x1")(x)
        b5 = c(48, name="branch5x5_1")(x)
        b5 = c(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = c(64, name="branch3x3dbl_1")(x)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = c(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: the 35x35 -> 17x17 reduction."""

    conv: Any = BasicConv

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.conv
        b3 = c(384, (3, 3), (2, 2), name="branch3x3")(x)
        bd = c(64, name="branch3x3dbl_1")(x)
        bd = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = c(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b-e (FIDInceptionC): factorised 7x7 branches."""

    channels_7x7: int
    conv: Any = BasicConv

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, c7 = self.conv, self.channels_7x7
        b1 = c(192, name="branch1x1")(x)
        b7 = c(c7, name="branch7x7_1")(x)
        b7 = c(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = c(c7, name="branch7x7dbl_1")(x)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = c(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = c(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = c(192, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: the 17x17 -> 8x8 reduction."""

    conv: Any = BasicConv

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.conv
        b3 = c(192, name="branch3x3_1")(x)
        b3 = c(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
        b7 = c(192, name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = c(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (FIDInceptionE_1, avg pool) and Mixed_7c (FIDInceptionE_2, max pool)."""

    pool: str  # "avg" | "max"
    conv: Any = BasicConv

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.conv
        b1 = c(320, name="branch1x1")(x)
        b3 = c(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                c(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                c(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = c(448, name="branch3x3dbl_1")(x)
        bd = c(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                c(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                c(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        elif self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            raise UsageError(f"pool must be 'avg' or 'max', got {self.pool!r}.")
        bp = c(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resizes [N, H, W, C] float images as `F.interpolate(mode='bilinear', align_corners=False)`.

    torch samples at half-pixel centres with a 2-tap triangle kernel even when downsampling;
    `jax.image.resize` does the same only with antialias=False (and HIGHEST precision, so TPUs
    keep the pixels in float32). `tests/test_fid.py::test_resize_matches_torch` checks it
    against torch.
    """
    chex.assert_rank(images, 4)
    n, h, w, c = images.shape
    if (h, w) == tuple(size):
        return images
    return jax.image.resize(images, (n, *size, c), "bilinear", antialias=False)


def preprocess(images: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
    """uint8 [0, 255] or float [0, 1] images [N, H, W, 3] -> [N, 299, 299, 3] in [-1, 1].

    uint8 is divided by 255 as torchvision's ToTensor does in pytorch-fid's data loader. The
    result is float32, or float64 when `dtype` is (the exact-arithmetic parity check).
    """
    chex.assert_rank(images, 4)
    chex.assert_axis_dimension(images, -1, 3)
    x = images.astype(jnp.promote_types(dtype, jnp.float32))
    if images.dtype == jnp.uint8:
        x = x / 255.0
    x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    return 2 * x - 1


class InceptionV3(nn.Module):
    """pytorch-fid's FID InceptionV3 up to the final average pool.

    `dtype` is the compute dtype (float32 reproduces pytorch-fid; bfloat16 is faster on TPU
    and shifts FID slightly). `precision` defaults to HIGHEST so TPUs and TF32 GPUs compute
    the float32 convolutions in full precision, as the reference does.
    """

    dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """Pool3 features.

        Args:
          images: [N, H, W, 3], uint8 in [0, 255] or float in [0, 1], any H and W.
        Returns:
          [N, 2048] float32 (float64 for a float64 model).
        """
        x = preprocess(images, self.dtype).astype(self.dtype)
        c = functools.partial(BasicConv, dtype=self.dtype, precision=self.precision)
        x = c(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
        x = c(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = c(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = c(80, name="Conv2d_3b_1x1")(x)
        x = c(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, c, name="Mixed_5b")(x)
        x = InceptionA(64, c, name="Mixed_5c")(x)
        x = InceptionA(64, c, name="Mixed_5d")(x)
        x = InceptionB(c, name="Mixed_6a")(x)
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = InceptionC(c7, c, name=name)(x)
        x = InceptionD(c, name="Mixed_7a")(x)
        x = InceptionE("avg", c, name="Mixed_7b")(x)
        x = InceptionE("max", c, name="Mixed_7c")(x)
        features = jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))
        chex.assert_shape(features, (images.shape[0], FEATURE_DIM))
        return features


# --- Weights: the PyTorch state dict <-> the Flax variables. ---


@functools.cache
def variable_shapes() -> dict:
    """The Flax variables' shapes ({"params", "batch_stats"}), without allocating them."""
    model = InceptionV3()
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    return jax.tree.map(lambda s: tuple(s.shape), nn.unbox(shapes))


def _torch_name(collection: str, path: Sequence[str]) -> tuple[str, bool]:
    """Flax (collection, path) -> (state-dict key, whether the array is a conv kernel)."""
    *modules, layer, leaf = path
    prefix = ".".join(modules)
    names = {
        ("params", "conv", "kernel"): "conv.weight",
        ("params", "bn", "scale"): "bn.weight",
        ("params", "bn", "bias"): "bn.bias",
        ("batch_stats", "bn", "mean"): "bn.running_mean",
        ("batch_stats", "bn", "var"): "bn.running_var",
    }
    return f"{prefix}.{names[collection, layer, leaf]}", leaf == "kernel"


@functools.cache
def key_table() -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """State-dict key -> (Flax path incl. collection, Flax shape, is conv kernel)."""
    table = {}
    flat = jax.tree_util.tree_flatten_with_path(
        variable_shapes(), is_leaf=lambda x: isinstance(x, tuple)
    )
    for key_path, shape in flat[0]:
        path = tuple(k.key for k in key_path)
        name, is_kernel = _torch_name(path[0], path[1:])
        table[name] = (path, shape, is_kernel)
    return table


def _torch_shape(shape: tuple[int, ...], is_kernel: bool) -> tuple[int, ...]:
    # Flax kernels are [kh, kw, in, out]; PyTorch's are [out, in, kh, kw].
    return (shape[3], shape[2], shape[0], shape[1]) if is_kernel else shape


def check_state_dict(state: Mapping[str, Any], source: str) -> None:
    """Raises WeightsError naming the first missing, unexpected or misshapen key of `state`."""
    table = key_table()
    for k, v in state.items():
        shape = tuple(np.shape(v))
        if k in table:
            want = _torch_shape(table[k][1], table[k][2])
        elif k in _HEAD_SHAPES:
            want = _HEAD_SHAPES[k]
        elif k.endswith(_IGNORED_SUFFIXES):
            continue
        else:
            raise WeightsError(
                f"{source}: unexpected key {k!r}; this is not the FID InceptionV3 state dict "
                "(pytorch-fid's pt_inception-2015-12-05 weights)."
            )
        if shape != want:
            hint = (
                " (torchvision's ImageNet Inception has 1000 classes)" if k in _HEAD_SHAPES else ""
            )
            raise WeightsError(f"{source}: key {k!r} has shape {shape}, expected {want}{hint}.")
    for k in table:
        if k not in state:
            raise WeightsError(f"{source}: missing key {k!r}.")


def variables_from_state_dict(state: Mapping[str, np.ndarray], source: str = "state dict") -> dict:
    """Maps pytorch-fid's state dict onto {"params", "batch_stats"} (float32 numpy).

    Raises:
      WeightsError: one line naming the key, for a missing, unexpected or misshapen key.
    """
    check_state_dict(state, source)
    variables: dict = {}
    for name, (path, _, is_kernel) in key_table().items():
        value = np.asarray(state[name], dtype=np.float32)
        if is_kernel:
            value = value.transpose(2, 3, 1, 0)
        node = variables
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.ascontiguousarray(value)
    return variables


def state_dict_from_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of `variables_from_state_dict` (without the unused head)."""
    out = {}
    for name, (path, _, is_kernel) in key_table().items():
        value = variables
        for p in path:
            value = value[p]
        value = np.asarray(value, dtype=np.float32)
        out[name] = np.ascontiguousarray(value.transpose(3, 2, 0, 1) if is_kernel else value)
    return out


def sha256(path: str) -> str:
    """Hex digest of a local or gs:// file, streamed (weights files are ~100 MB)."""
    h = hashlib.sha256()
    with storage.checked("reading", path), storage.path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a local or gs:// `.safetensors` or `.npz` file of named arrays (never pickle)."""
    if not storage.exists(path):
        raise FileNotFoundError(
            f"FID Inception weights not found: {path}. Convert pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth with `python -m muse_jax.eval.convert_inception "
            f"--input=pt_inception-2015-12-05-6726825d.pth --output={path}`."
        )
    if path.endswith(".safetensors"):
        if storage.is_remote(path):  # safetensors maps local files only: read the bytes.
            from safetensors.numpy import load

            return load(storage.read_bytes(path))
        from safetensors.numpy import load_file

        return load_file(path)
    if path.endswith(".npz"):
        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    raise WeightsError(f"{path}: expected a .safetensors or .npz file.")


def load_variables(path: str) -> dict:
    """Loads the FID Inception weights from `.safetensors` / `.npz` into Flax variables."""
    return variables_from_state_dict(read_state_dict(path), path)
