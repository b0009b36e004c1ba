"""Device mesh, logical-axis rules, and the one resolver from logical names to PartitionSpecs.

Model code names every parameter dimension logically (`embed`, `heads`, `mlp`, ...) and marks
activations at block boundaries (`batch`, `length`, `act_embed`). A rules table maps logical
names to mesh axes; anything it does not name is replicated. The mesh always has the axes
("data", "fsdp", "expert", "tensor"); `mesh.shape` says how many devices each gets.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from layerjax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Every logical name the model uses: parameter dims, then activation dims.
LOGICAL_AXES = ("layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "expert",
                "batch", "length", "act_embed")

_BATCH = ("data", "fsdp", "expert")  # the batch is split over every non-tensor axis
# logical name -> mesh axes it is split over. Short on purpose: one screen says where all goes.
RULES: dict[str, dict[str, tuple[str, ...]]] = {
    # Data parallel: parameters and optimizer state replicated.
    "dp": {"batch": _BATCH},
    # Fully sharded data parallel (ZeRO-3): every weight split along its model width; XLA gathers
    # each layer's weights where they are used, inside the scan.
    "fsdp": {"batch": _BATCH, "embed": ("fsdp",), "expert": ("expert",)},
    # Megatron-style tensor parallel over attention heads and MLP width, plus FSDP over the rest.
    "fsdp_tp": {"batch": _BATCH, "embed": ("fsdp",), "heads": ("tensor",), "kv_heads": ("tensor",),
                "mlp": ("tensor",), "expert": ("expert",)},
    # Tensor parallel only: weights split over heads and MLP width, replicated along their width.
    "tp": {"batch": _BATCH, "heads": ("tensor",), "kv_heads": ("tensor",), "mlp": ("tensor",),
           "expert": ("expert",)},
}
# The axis that takes all remaining devices when mesh.shape leaves every axis unset.
_REST_AXIS = {"dp": "data", "fsdp": "fsdp", "fsdp_tp": "fsdp", "tp": "tensor", "custom": "data"}


def rules_from_config(mesh_cfg: MeshConfig) -> dict[str, tuple[str, ...]]:
    """The preset named by mesh.rules, or the table in mesh.custom_rules (rules=custom)."""
    if mesh_cfg.rules != "custom":
        if mesh_cfg.custom_rules:
            raise ConfigError("mesh.custom_rules is only read with mesh.rules=custom")
        return RULES[mesh_cfg.rules]
    rules = {}
    for entry in mesh_cfg.custom_rules:
        logical, sep, axes = entry.partition("=")
        mesh_axes = tuple(a.strip() for a in axes.split("+") if a.strip())
        if not sep or logical.strip() not in LOGICAL_AXES or not set(mesh_axes) <= set(MESH_AXES):
            raise ConfigError(f"mesh.custom_rules entry '{entry}' is not 'logical=axis[+axis]' with a logical "
                              f"name in {list(LOGICAL_AXES)} and mesh axes in {list(MESH_AXES)}")
        rules[logical.strip()] = mesh_axes
    if "batch" not in rules:
        raise ConfigError("mesh.custom_rules must say where the batch goes, e.g. 'batch=data+fsdp'")
    return rules


def mesh_sizes(mesh_cfg: MeshConfig, device_count: int) -> dict[str, int]:
    """Devices per mesh axis from mesh.shape: unset axes get 1, the -1 axis (or, when none is
    -1, the preset's batch axis if unset) gets the rest; the sizes must multiply to device_count."""
    given = {axis: getattr(mesh_cfg.shape, axis) for axis in MESH_AXES}
    if any(v < -1 for v in given.values()):
        raise ConfigError(f"mesh.shape {given}: sizes must be positive, -1 (the rest) or 0 (unset)")
    rest = [axis for axis, v in given.items() if v == -1]
    if len(rest) > 1:
        raise ConfigError(f"mesh.shape: only one axis may be -1 (the remaining devices), got {rest}")
    if not rest and given[_REST_AXIS[mesh_cfg.rules]] == 0:
        rest = [_REST_AXIS[mesh_cfg.rules]]
    sizes = {axis: (v if v > 0 else 1) for axis, v in given.items()}
    known = math.prod(v for axis, v in sizes.items() if axis not in rest)
    if rest:
        if device_count % known:
            raise ConfigError(f"mesh.shape: the fixed sizes {({a: v for a, v in sizes.items() if a not in rest})} "
                              f"multiply to {known}, which does not divide the {device_count} devices")
        sizes[rest[0]] = device_count // known
    if math.prod(sizes.values()) != device_count:
        raise ConfigError(f"mesh.shape {sizes} multiplies to {math.prod(sizes.values())} devices, but there are "
                          f"{device_count}; make one axis -1 to take the rest, or set mesh.num_devices")
    return sizes


def make_mesh(mesh_cfg: MeshConfig) -> Mesh:
    devices = jax.devices()
    count = mesh_cfg.num_devices or len(devices)
    if count > len(devices):
        raise ConfigError(f"mesh.num_devices={count} but only {len(devices)} devices are visible")
    if count != len(devices) and jax.process_count() > 1:
        raise ConfigError("mesh.num_devices must be 0 (all devices) in a multi-process run")
    sizes = mesh_sizes(mesh_cfg, count)
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices[:count])


def logical_to_spec(axes: tuple, shape: tuple[int, ...], rules: dict, mesh: Mesh, name: str = "",
                    strict: bool = True) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec. A dimension stays replicated when its rule
    names no mesh axis of size > 1, or only axes an earlier dimension already uses. A dimension
    the devices do not divide is an error (strict) or replicated (activations, strict=False)."""
    used: set[str] = set()
    spec = []
    for dim, (logical, size) in enumerate(zip(axes, shape)):
        mesh_axes = tuple(a for a in rules.get(logical, ()) if mesh.shape[a] > 1 and a not in used)
        devices = math.prod(mesh.shape[a] for a in mesh_axes)
        if mesh_axes and size % devices:
            if strict:
                raise ConfigError(
                    f"{name or 'an array'} {tuple(shape)}: dimension {dim} ('{logical}', size {size}) would be split "
                    f"over mesh axes {mesh_axes} = {devices} devices, which does not divide it; change mesh.shape, "
                    f"or use rules that do not split '{logical}'")
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_shardings(tree, rules: dict, mesh: Mesh):
    """NamedShardings for a pytree holding nnx Variables (params, optimizer moments) and arrays.

    Each Variable is sharded by its `axes` metadata; any other leaf (step counters, RNG keys) is
    replicated. The result is a prefix of `tree`, usable as jit in/out shardings.
    """

    def sharding(path, leaf):
        axes = leaf.get_metadata().get("axes") if _is_variable(leaf) else None
        if axes is None:
            return NamedSharding(mesh, PartitionSpec())
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        return NamedSharding(mesh, logical_to_spec(axes, leaf.shape, rules, mesh, name))

    return jax.tree_util.tree_map_with_path(sharding, tree, is_leaf=_is_variable)


def batch_sharding(rules: dict, mesh: Mesh) -> NamedSharding:
    """Batches are [B, L] arrays split over the batch rule's mesh axes."""
    batch_axes = tuple(a for a in rules["batch"] if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(batch_axes or None))


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) under a prefix tree of
    shardings: each leaf's shard shape times its item size."""
    full = jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), shardings, tree)
    return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(full)))


# ---------------------------------------------------------------- activations

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("layerjax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: dict):
    """While tracing inside this context, `constrain` pins activations to the rules."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def with_activation_sharding(fn, mesh: Mesh, rules: dict):
    """fn, traced with activation constraints on (wrap a step function before jax.jit)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def devices_in_play() -> int:
    """How many devices a traced computation spans: the active mesh's size inside
    `activation_sharding` (the train and eval steps), else every device of the process."""
    active = _ACTIVE.get()
    return active[0].size if active is not None else jax.device_count()


def constrain(x: jax.Array, logical_axes: tuple[str, ...]) -> jax.Array:
    """A sharding constraint by logical names; a no-op outside `activation_sharding` (eager
    use, generation), and dimensions the devices do not divide stay replicated."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(logical_axes, x.shape, rules, mesh, strict=False)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def describe(state, rules: dict, mesh: Mesh) -> str:
    """A table of every parameter: shape, logical axes, PartitionSpec (for the dry-run)."""
    rows = [("parameter", "shape", "logical axes", "partition spec")]
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("axes", ())
        name = "/".join(map(str, path))
        rows.append((name, str(tuple(var.shape)), str(tuple(axes)),
                     str(logical_to_spec(axes, var.shape, rules, mesh, name))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
