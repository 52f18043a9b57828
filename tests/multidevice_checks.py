"""Checks that need 8 CPU devices; run by tests/test_parallel.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must precede JAX's backend init).

Usage: python tests/multidevice_checks.py {shardings,step,restore} TMPDIR -> one JSON line.
"""

import json
import os
import sys

from helpers import ROOT, shapes_images  # Run as a script: tests/ is sys.path[0].

sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import shapes_tiny  # noqa: E402
from muse_jax import (
    checkpoints,  # noqa: E402
    parallel,  # noqa: E402
)
from muse_jax.train.base_stage import BaseStage  # noqa: E402
from muse_jax.train.tokenizer_stage import TokenizerStage  # noqa: E402


def _config(data: int, fsdp: int, tensor: int):
    config = shapes_tiny.get_config("smoke")
    config.mesh.shape.data, config.mesh.shape.fsdp, config.mesh.shape.tensor = data, fsdp, tensor
    # Widths divisible by every mesh axis so that each rule really shards.
    config.base.model.width, config.base.model.mlp_dim, config.base.model.num_heads = 32, 64, 4
    return config


def _mesh(config, n: int):
    return parallel.create_mesh(config, jax.devices()[:n])


def _batch(config, workdir):
    images = shapes_images()
    cond = BaseStage(config, workdir).conditioner.encode(["a red circle on the left"] * 8)
    return {"image": images, **cond}


def check_shardings(workdir):
    """Every parameter's shards are the global shape divided as the rules say."""
    config = _config(2, 2, 2)
    stage = BaseStage(config, workdir)
    mesh, rules = _mesh(config, 8), parallel.rules(config)
    boxed = jax.eval_shape(stage.init, jax.random.PRNGKey(0))
    names = jax.tree.map(
        lambda x: x.names if isinstance(x, nn.LogicallyPartitioned) else None,
        boxed.params,
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )
    state, _, _ = parallel.jit_init(stage.init, jax.random.PRNGKey(0), mesh, rules)
    table = dict(rules)
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    checked, sharded = 0, 0
    for (path, arr), (_, logical) in zip(
        jax.tree_util.tree_leaves_with_path(state.params),
        jax.tree_util.tree_leaves_with_path(names, is_leaf=lambda x: isinstance(x, tuple)),
    ):
        expected = []
        for dim, name in zip(arr.shape, logical):
            axes = table.get(name)
            axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
            div = int(np.prod([sizes[a] for a in axes])) if axes else 1
            expected.append(dim // div if dim % div == 0 else dim)
        shard = arr.addressable_shards[0].data.shape
        assert tuple(shard) == tuple(expected), (
            jax.tree_util.keystr(path),
            logical,
            arr.shape,
            shard,
            expected,
        )
        checked += 1
        sharded += int(tuple(shard) != tuple(arr.shape))
    return {"checked": checked, "sharded": sharded}


def _one_step(config, workdir, n_devices):
    stage = BaseStage(config, workdir)
    mesh, rules = _mesh(config, n_devices), parallel.rules(config)
    state, shardings, _ = parallel.jit_init(stage.init, jax.random.PRNGKey(0), mesh, rules)
    tok = TokenizerStage(config, workdir)
    tok_state, _, _ = parallel.jit_init(tok.init, jax.random.PRNGKey(1), mesh, rules)
    frozen = {"tokenizer": tok_state.params["vq"]}
    batch = parallel.shard_batch(_batch(config, workdir), parallel.batch_sharding(mesh, rules))

    def step(s, b, f):
        with nn.logical_axis_rules(list(rules)):
            return stage.train_step(s, b, f)

    with mesh:
        new, metrics = jax.jit(
            step, in_shardings=(shardings, None, None), out_shardings=(shardings, None)
        )(state, batch, frozen)
    return float(metrics["loss"]), jax.tree.map(np.asarray, new.params)


def check_step(workdir):
    """One base train step on a (2, 2, 2) mesh equals the same step on one device."""
    loss8, params8 = _one_step(_config(2, 2, 2), workdir, 8)
    loss1, params1 = _one_step(_config(1, 1, 1), workdir, 1)
    diffs = jax.tree.leaves(
        jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params8, params1)
    )
    return {"loss8": loss8, "loss1": loss1, "max_param_diff": max(diffs)}


def check_restore(workdir):
    """A state saved from a (2, 2, 2) mesh restores onto (8, 1, 1) and (1, 4, 2) meshes."""
    config = _config(2, 2, 2)
    stage = BaseStage(config, workdir)
    mesh, rules = _mesh(config, 8), parallel.rules(config)
    state, _, _ = parallel.jit_init(stage.init, jax.random.PRNGKey(0), mesh, rules)
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "ckpt"))
    ckpt.save(0, state)
    ckpt.close()
    reference = jax.tree.map(np.asarray, state)
    out = {}
    for shape in ((8, 1, 1), (1, 4, 2)):
        other = _config(*shape)
        o_mesh = _mesh(other, 8)
        abstract, _ = parallel.abstract_state(stage.init, jax.random.PRNGKey(0), o_mesh, rules)
        ck = checkpoints.Checkpointer(os.path.join(workdir, "ckpt"), asynchronous=False)
        restored = ck.restore(abstract, 0)
        ck.close()
        same = all(
            jax.tree.leaves(
                jax.tree.map(
                    lambda a, b: bool(np.array_equal(np.asarray(a), b)), restored, reference
                )
            )
        )
        kernel = restored.params["transformer"]["blocks_0"]["mlp"]["wi"]["kernel"]
        out[str(shape)] = {
            "equal": same,
            "mesh": dict(zip(kernel.sharding.mesh.axis_names, kernel.sharding.mesh.devices.shape)),
            "spec": str(kernel.sharding.spec),
        }
    return out


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    check, workdir = sys.argv[1], sys.argv[2]
    result = {"shardings": check_shardings, "step": check_step, "restore": check_restore}[check](
        workdir
    )
    print("RESULT " + json.dumps(result))
