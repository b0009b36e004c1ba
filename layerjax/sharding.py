"""Device mesh, logical-axis rules, and the one resolver from logical names to PartitionSpecs.

Model code names every parameter dimension logically (`embed`, `heads`, `mlp`, ...). A rules
preset maps logical names to mesh axes; everything not named in the rules is replicated. The mesh
always has the axes ("data", "fsdp", "tensor"); a preset decides which of them get the devices.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from layerjax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes it is split over. Short on purpose: one screen says where all goes.
RULES: dict[str, dict[str, tuple[str, ...]]] = {
    # Data parallel: parameters and optimizer state replicated, batch split over all devices.
    "dp": {"batch": ("data",)},
    # Fully sharded data parallel (ZeRO-3): batch split over all devices, and every weight split
    # along its model-width dimension; XLA gathers each layer's weights where they are used.
    "fsdp": {"batch": ("fsdp",), "embed": ("fsdp",)},
}

# Which mesh axis receives the devices under each preset.
_DEVICE_AXIS = {"dp": "data", "fsdp": "fsdp"}


def make_mesh(mesh_cfg: MeshConfig) -> Mesh:
    devices = jax.devices()
    count = mesh_cfg.num_devices or len(devices)
    if count > len(devices):
        raise ConfigError(f"mesh.num_devices={count} but only {len(devices)} devices are visible")
    shape = [count if axis == _DEVICE_AXIS[mesh_cfg.rules] else 1 for axis in MESH_AXES]
    return Mesh(np.asarray(devices[:count]).reshape(shape), MESH_AXES)


def logical_to_spec(axes: tuple, shape: tuple[int, ...], rules: dict, mesh: Mesh) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    A dimension stays replicated when its rule names no mesh axis of size > 1, when those axes
    are already used by an earlier dimension, or when the dimension does not divide evenly (the
    dry-run shows which parameters that leaves replicated).
    """
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        mesh_axes = tuple(a for a in rules.get(name, ()) if mesh.shape[a] > 1 and a not in used)
        if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_shardings(tree, rules: dict, mesh: Mesh):
    """NamedShardings for a pytree holding nnx Variables (params, optimizer moments) and arrays.

    Each Variable is sharded by its `axes` metadata; any other leaf (step counters, RNG keys) is
    replicated. The result is a prefix of `tree`, usable as jit in/out shardings.
    """

    def sharding(leaf):
        axes = leaf.get_metadata().get("axes") if _is_variable(leaf) else None
        if axes is None:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, logical_to_spec(axes, leaf.shape, rules, mesh))

    return jax.tree.map(sharding, tree, is_leaf=_is_variable)


def batch_sharding(rules: dict, mesh: Mesh) -> NamedSharding:
    """Batches are [B, L] arrays split over the batch rule's mesh axes."""
    batch_axes = tuple(a for a in rules["batch"] if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(batch_axes or None))


def describe(state, rules: dict, mesh: Mesh) -> str:
    """A table of every parameter: shape, logical axes, PartitionSpec (for the dry-run)."""
    rows = [("parameter", "shape", "logical axes", "partition spec")]
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("axes", ())
        rows.append(("/".join(map(str, path)), str(tuple(var.shape)), str(tuple(axes)),
                     str(logical_to_spec(axes, var.shape, rules, mesh))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
