"""Device mesh, logical-axis rules and shardings: the only module that names mesh axes.

Model code names logical axes ("embed", "mlp", "batch", ...); `config.mesh.rules` maps them to
the mesh axes `data`, `fsdp`, `tensor`. What `pjit` used to do is `jax.jit` with these shardings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from muse_jax.errors import UsageError

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, Any]]


def mesh_shape(shape_cfg, num_devices: int) -> tuple[int, ...]:
    """Resolves the config's axis sizes; one -1 takes the devices the others leave."""
    sizes = [int(shape_cfg[a]) for a in MESH_AXES]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise UsageError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if unknown:
        if num_devices % known:
            raise UsageError(f"{num_devices} devices do not divide by the fixed mesh axes {known}.")
        sizes[unknown[0]] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise UsageError(
            f"Mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
            f"{num_devices} are available."
        )
    return tuple(sizes)


def create_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config.mesh.shape, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules(config) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in config.mesh.rules
    )


def logical_shardings(abstract_tree: Any, mesh: Mesh, axis_rules: Rules) -> Any:
    """Shardings for a (boxed) tree from its logical axis names; unnamed leaves replicate.

    A dimension that its mesh axes do not divide (a 27-word vocabulary over tensor=2) is
    replicated instead of failing: small tables cost nothing replicated, big ones divide.
    """
    specs = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, list(axis_rules))
    return jax.tree.map(_divisible, nn.unbox(abstract_tree), shardings)


def _divisible(leaf: Any, sharding: NamedSharding) -> NamedSharding:
    sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.devices.shape))
    spec = []
    for dim, axes in zip(
        leaf.shape, tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
    ):
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        div = int(np.prod([sizes[a] for a in names])) if names else 1
        spec.append(axes if dim % div == 0 else None)
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def batch_sharding(mesh: Mesh, axis_rules: Rules) -> NamedSharding:
    """Leading (batch) dimension split over the axes that "batch" maps to."""
    spec = nn.logical_to_mesh_axes(("batch",), list(axis_rules))
    return NamedSharding(mesh, PartitionSpec(*spec))


def stacked(sharding: NamedSharding) -> NamedSharding:
    """`sharding` behind a new, unsplit leading axis (batches of several steps, stacked)."""
    return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))


def abstract_state(
    init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh, axis_rules: Rules
) -> tuple[Any, Any]:
    """(abstract unboxed state whose ShapeDtypeStructs carry shardings, shardings); no FLOPs.

    The abstract state is what orbax restores onto: a checkpoint written on another mesh is
    resharded to this one.
    """
    with mesh, nn.logical_axis_rules(list(axis_rules)):
        boxed = jax.eval_shape(init_fn, rng)
        shardings = logical_shardings(boxed, mesh, axis_rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    return abstract, shardings


def jit_init(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh, axis_rules: Rules):
    """Initialises a (boxed) state directly sharded: no full copy ever sits on one device.

    Returns:
      (state, shardings, abstract_state): the unboxed state, its shardings, and its abstract
      state (see `abstract_state`).
    """
    abstract, shardings = abstract_state(init_fn, rng, mesh, axis_rules)
    with mesh, nn.logical_axis_rules(list(axis_rules)):
        state = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return state, shardings, abstract


def device_entries(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """The entries of a host batch that go to devices: numeric arrays (not captions)."""
    return {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype != object}


def shard_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Places a host-local batch on the mesh (multi-host: each process passes its own slice)."""
    return {
        k: jax.make_array_from_process_local_data(sharding, v)
        for k, v in device_entries(batch).items()
    }
