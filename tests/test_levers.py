"""The memory and compile-time levers (remat policy, layer scan, compute dtype) compute what the
default computes: equal logits, gradients and train-step losses on the tiny configs."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes_tiny
from muse_jax.models import factory
from muse_jax.models import transformer as transformer_lib


def _config(**model):
    config = shapes_tiny.get_config("smoke")
    config.base.model.update(dict(depth=3, **model))
    config.superres.model.update(dict(depth=2, lowres_depth=2, **model))
    return config


def _inputs(model, rng, lowres=False):
    k1, k2, k3 = jax.random.split(rng, 3)
    tokens = jax.random.randint(k1, (2, model.seq_len), 0, model.vocab_size + 1)
    ctx = jax.random.normal(k2, (2, 5, 32))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.int32)
    args = [tokens, ctx, mask]
    if lowres and model.lowres_input == "pixels":  # The low-res image.
        args.append(jax.random.uniform(k3, model.lowres_example(2).shape, minval=-1, maxval=1))
    elif lowres:
        args.append(jax.random.randint(k3, (2, model.lowres_len), 0, model.lowres_vocab_size))
    return args


def _close(actual, desired):
    """Equal to float32 summation-order noise: relative to the largest entry of the leaf."""
    scale = float(np.max(np.abs(desired))) or 1.0
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=2e-6 * scale + 5e-6)


def _loss_and_grads(model, params, args):
    def loss(p):
        logits = model.apply({"params": p}, *args)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * jnp.arange(logits.shape[1]))

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("which", ["base", "superres"])
@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_gives_the_default_loss_and_gradients(which, remat):
    build = factory.base_transformer if which == "base" else factory.superres_transformer
    default, remat_model = build(_config()), build(_config(remat=remat))
    args = _inputs(default, jax.random.key(1), lowres=which == "superres")
    params = nn.unbox(default.init(jax.random.key(0), *args)["params"])
    loss, grads = _loss_and_grads(default, params, args)
    loss_r, grads_r = _loss_and_grads(remat_model, params, args)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(_close, grads_r, grads)


@pytest.mark.parametrize("which", ["base", "superres"])
@pytest.mark.parametrize("remat", ["none", "save_dots"])
def test_scanned_layers_give_the_unrolled_loss_and_gradients(which, remat):
    build = factory.base_transformer if which == "base" else factory.superres_transformer
    unrolled = build(_config(remat=remat))
    scanned = build(_config(remat=remat, scan_layers=True))
    args = _inputs(unrolled, jax.random.key(1), lowres=which == "superres")
    params = nn.unbox(unrolled.init(jax.random.key(0), *args)["params"])
    depth = unrolled.depth
    stacked = transformer_lib.stack_layers(params, depth)
    # The scanned model's own tree has exactly this structure and these shapes.
    own = nn.unbox(jax.eval_shape(lambda r: scanned.init(r, *args), jax.random.key(0)))["params"]
    assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, stacked)
    loss, grads = _loss_and_grads(unrolled, params, args)
    loss_s, grads_s = _loss_and_grads(scanned, stacked, args)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
    grads_s = transformer_lib.unstack_layers(grads_s, depth)
    jax.tree.map(_close, grads_s, grads)
    # And the sampler's path: per-layer keys/values computed once, then logits.
    if which == "base":
        kv = scanned.apply({"params": stacked}, args[1], method="encode_context")
        logits = scanned.apply({"params": stacked}, args[0], kv, args[2], method="logits")
        np.testing.assert_allclose(
            logits, unrolled.apply({"params": params}, *args), rtol=1e-5, atol=1e-5
        )


def test_scanned_parameters_carry_the_layers_axis_name():
    model = factory.base_transformer(_config(scan_layers=True))
    args = _inputs(model, jax.random.key(1))
    boxed = jax.eval_shape(lambda r: model.init(r, *args), jax.random.key(0))["params"]
    spec = nn.get_partition_spec(boxed)["blocks"]["mlp"]["wi"]["kernel"]
    assert tuple(spec) == ("layers", "embed", "mlp")


def test_unknown_remat_policy_is_one_line():
    model = factory.base_transformer(_config(remat="sometimes"))
    with pytest.raises(ValueError, match=r"Unknown remat policy 'sometimes'; valid: \["):
        model.init(jax.random.key(0), *_inputs(model, jax.random.key(1)))


def _stage(config, workdir):
    from muse_jax.text.conditioning import ShapeConditioner
    from muse_jax.train.base_stage import BaseStage

    return BaseStage(config, workdir, conditioner=ShapeConditioner(config, precomputed=False))


def _two_steps(config, workdir, params=None):
    """(loss, grad norm) of two base train steps from the same start, on fixed batches;
    `params` replaces the stage's own initial parameters."""
    stage = _stage(config, workdir)
    state = nn.unbox(stage.init(jax.random.key(0)))
    if params is not None:
        state = state.replace(params=params, opt_state=stage.tx.init(params))
    vq = stage.tokenizer.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
    frozen = {"tokenizer": nn.unbox(vq)["params"]}
    rng = np.random.default_rng(0)
    spec = stage.batch_spec(8)
    out = []
    step = jax.jit(stage.train_step)
    for _ in range(2):
        batch = {
            "image": rng.uniform(-1, 1, spec["image"].shape).astype(np.float32),
            "text_ids": rng.integers(3, 20, spec["text_ids"].shape).astype(np.int32),
            "text_mask": np.ones(spec["text_mask"].shape, np.int32),
        }
        state, metrics = step(state, batch, frozen)
        out.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return out


def test_train_steps_with_levers_match_the_default(tmp_path):
    workdir = str(tmp_path)
    base = _two_steps(_config(), workdir)
    np.testing.assert_allclose(_two_steps(_config(remat="full"), workdir), base, rtol=1e-5)
    params = nn.unbox(_stage(_config(), workdir).init(jax.random.key(0))).params
    stacked = {**params, "transformer": transformer_lib.stack_layers(params["transformer"], 3)}
    scanned = _two_steps(_config(scan_layers=True, remat="save_dots"), workdir, stacked)
    np.testing.assert_allclose(scanned, base, rtol=1e-5)
    # bfloat16 compute: the same losses to bfloat16's precision.
    bf16 = _two_steps(_config(dtype="bfloat16"), workdir)
    np.testing.assert_allclose(np.array(bf16)[:, 0], np.array(base)[:, 0], rtol=2e-2)
