"""`config.kernels`: "auto" takes the hand-written CPU paths, "xla" none of them; same values."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import shapes_tiny
from muse_jax.errors import UsageError
from muse_jax.models import arg_reductions, factory, kernels
from muse_jax.train import losses


def _jaxpr(fn, *args) -> str:
    """The program `fn` traces to now (a fresh function: jax caches traces per function)."""
    return str(jax.make_jaxpr(lambda *a: fn(*a))(*args))


@pytest.fixture(scope="module")
def smoke():
    return shapes_tiny.get_config("smoke")


def _tokenizer_loss(model, params, images):
    def loss(p):
        recon, ids, quantiser = model.apply({"params": p}, images)
        return jnp.mean((recon - images) ** 2) + sum(jnp.mean(v) for v in quantiser.values()), ids

    return jax.value_and_grad(loss, has_aux=True)(params)


def _base_loss(model, params, tokens, ctx, mask):
    def loss(p):
        logits = model.apply({"params": p}, tokens, ctx, mask)
        ce, acc = losses.masked_cross_entropy(logits, tokens, tokens >= 0)
        return ce, acc

    return jax.value_and_grad(loss, has_aux=True)(params)


def test_auto_and_xla_give_the_same_steps(smoke):
    """The tokenizer's reconstruction gradient (convolutions, nearest-codeword argmin) and the
    base transformer's loss gradient (dense layers, GELU MLPs, attention) agree between the two
    settings; only the paths differ."""
    rng = np.random.default_rng(0)
    size = smoke.data.image_size
    images = jnp.asarray(rng.uniform(-1, 1, (2, size, size, 3)), jnp.float32)
    vq = factory.tokenizer(smoke)
    vq_params = nn.unbox(vq.init(jax.random.PRNGKey(0), images)["params"])
    base = factory.base_transformer(smoke)
    tokens = jnp.asarray(rng.integers(0, base.vocab_size, (2, base.seq_len)), jnp.int32)
    ctx = jnp.asarray(rng.normal(size=(2, 5, factory.text_width(smoke))), jnp.float32)
    mask = jnp.ones((2, 5), jnp.int32)
    base_params = nn.unbox(base.init(jax.random.PRNGKey(1), tokens, ctx, mask)["params"])

    out = {}
    for mode in kernels.MODES:
        with kernels.use(mode):
            # Fresh functions: jax caches a trace per function, whatever the kernels were.
            (vq_loss, aux), vq_grads = jax.jit(lambda p, x: _tokenizer_loss(vq, p, x))(
                vq_params, images
            )
            base_out = jax.jit(lambda p, *a: _base_loss(base, p, *a))(
                base_params, tokens, ctx, mask
            )
        out[mode] = (vq_loss, aux, vq_grads, base_out)
    a, b = out["auto"], out["xla"]
    np.testing.assert_array_equal(a[1], b[1])
    for x, y in zip(jax.tree.leaves((a[0], a[2], a[3])), jax.tree.leaves((b[0], b[2], b[3]))):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)


def test_xla_turns_every_hand_written_path_off(smoke):
    """Under "auto" on CPU the traced programs hold the custom paths (custom_vjp GELU, dense and
    gradients, heads-major attention; argmin as min reductions); under "xla" none of them."""
    assert jax.default_backend() == "cpu"
    x = jnp.ones((4, 8), jnp.float32)
    base = factory.base_transformer(smoke)
    tokens = jnp.zeros((1, base.seq_len), jnp.int32)
    ctx = jnp.zeros((1, 3, factory.text_width(smoke)), jnp.float32)
    mask = jnp.ones((1, 3), jnp.int32)
    params = nn.unbox(base.init(jax.random.PRNGKey(0), tokens, ctx, mask)["params"])

    def grad(p):  # A fresh jax.grad each call: jax caches traces per function.
        return jax.grad(lambda q: base.apply({"params": q}, tokens, ctx, mask).sum())(p)

    with kernels.use("auto"):
        auto_arg, auto_grad = _jaxpr(arg_reductions.argmin, x), _jaxpr(grad, params)
    with kernels.use("xla"):
        xla_arg, xla_grad = _jaxpr(arg_reductions.argmin, x), _jaxpr(grad, params)
    assert "argmin[" not in auto_arg and "argmin[" in xla_arg  # The primitive.
    assert "custom_vjp_call" in auto_grad
    assert "custom_vjp_call" not in xla_grad


def test_the_config_key_reaches_the_models(smoke):
    config = ml_collections.ConfigDict(smoke.to_dict())
    try:
        config.kernels = "xla"
        factory.base_transformer(config)
        assert kernels.mode() == "xla" and not kernels.hand_written()
        config.kernels = "auto"
        factory.tokenizer(config)
        assert kernels.mode() == "auto" and kernels.hand_written()
        with kernels.target("tpu"):
            assert not kernels.hand_written()  # muse_jax.aot traces TPU programs on CPU.
        config.kernels = "eigen"
        with pytest.raises(UsageError, match="config.kernels='eigen'; valid: auto, xla"):
            factory.base_transformer(config)
    finally:
        kernels.configure(smoke)
