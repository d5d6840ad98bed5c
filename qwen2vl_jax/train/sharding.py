"""Device mesh and logical-axis sharding rules (MaxText style).

Mesh axes, outermost first: ``dcn`` (data parallel across TPU slices, over the data-centre network: params
replicated per slice, only the gradient all-reduce crosses it), ``data`` (pure data parallel, params
replicated), ``fsdp`` (data parallel with params / optimizer state sharded, ZeRO-3), ``tensor``
(Megatron-style: heads, MLP and vocab split), ``sequence`` (activations split along the sequence). Every axis
but ``dcn`` stays within a slice (the ICI). The mesh spans every device of every process; changing the
parallelism is a change of ``MeshConfig`` only.

Every array names its dimensions with *logical* axes (the param tree in docs/architecture.md, and
``BATCH_AXES`` for the packed batch). The rules (``LOGICAL_RULES``) and the one resolver
(``logical_to_spec``: a mesh axis that does not divide the dimension, or that an earlier dimension of
the same array already uses, is dropped) live on the model floor, qwen2vl_jax/model/partitioning.py,
because the model resolves its activation constraints and attention shard_maps with them while tracing.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwen2vl_jax.model.partitioning import LOGICAL_RULES, logical_to_spec  # noqa: F401 (re-exported)

MESH_AXES = ("dcn", "data", "fsdp", "tensor", "sequence")

# logical axes of each packed-batch array (docs/architecture.md "Packed training batch")
BATCH_AXES: dict[str, tuple[str | None, ...]] = {
    "input_ids": ("batch", "length"),
    "targets": ("batch", "length"),
    "loss_mask": ("batch", "length"),
    "segment_ids": ("batch", "length"),
    "positions": ("batch", None, "length"),
    "pixel_values": ("batch", "patches", None),
    "patch_segment_ids": ("batch", "patches"),
    "patch_positions": ("batch", "patches", None),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes. At most one may be -1: it takes all remaining devices. `dcn` is the number of
    slices (each slice holds devices/dcn devices; the other axes split a slice's devices)."""
    dcn: int = 1
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1

    def shape(self, n_devices: int) -> tuple[int, ...]:
        sizes = [getattr(self, a) for a in MESH_AXES]
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % fixed:
                raise ValueError(f"{n_devices} devices not divisible by the fixed mesh axes "
                                 f"{dict(zip(MESH_AXES, sizes))} (product {fixed})")
            sizes = [n_devices // fixed if s == -1 else s for s in sizes]
        if math.prod(sizes) != n_devices:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                             f"have {n_devices}")
        return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes MESH_AXES over `devices` (default: all devices of all processes).

    dcn > 1: jax's hybrid mesh (mesh_utils.create_hybrid_device_mesh), slice i of the `dcn` axis = the devices
    whose `slice_index` is i (TPU multi-slice), laid out within the slice like a one-slice mesh. Devices
    without a slice_index (CPU) are split into `dcn` consecutive groups, which is what a test needs."""
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devices))
    from jax.experimental import mesh_utils
    slices = {getattr(d, "slice_index", None) for d in devices}
    if cfg.dcn > 1 and None not in slices:
        if len(slices) != cfg.dcn:
            raise ValueError(f"mesh.dcn={cfg.dcn} but the devices are on {len(slices)} slice(s)")
        arr = mesh_utils.create_hybrid_device_mesh((1, *shape[1:]), (cfg.dcn,) + (1,) * (len(shape) - 1),
                                                   devices, allow_split_physical_axes=True)
        return Mesh(arr, MESH_AXES)
    if len(slices) > 1 and None not in slices:
        raise ValueError(f"the devices are on {len(slices)} slices: set mesh.dcn={len(slices)} (data parallel "
                         f"across slices); got mesh.dcn={cfg.dcn}")
    try:
        arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except Exception:  # topology-unaware fallback (e.g. CPU device subsets)
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(logical_axes: Any, shapes: Any, mesh: Mesh,
                   rules: Sequence[tuple[str, tuple[str, ...]]] = LOGICAL_RULES) -> Any:
    """NamedShardings for a tree of arrays/ShapeDtypeStructs `shapes` given a tree of logical axes."""
    return jax.tree.map(lambda ax, x: NamedSharding(mesh, logical_to_spec(ax, x.shape, mesh, rules)),
                        logical_axes, shapes, is_leaf=_is_axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_shardings(batch_shapes: Mapping[str, Any], mesh: Mesh,
                    rules: Sequence[tuple[str, tuple[str, ...]]] = LOGICAL_RULES) -> dict:
    """NamedShardings for a packed batch (dict of arrays or ShapeDtypeStructs)."""
    unknown = sorted(set(batch_shapes) - set(BATCH_AXES))
    if unknown:
        raise ValueError(f"unknown batch keys {unknown}; valid: {', '.join(BATCH_AXES)}")
    return {k: NamedSharding(mesh, logical_to_spec(BATCH_AXES[k], v.shape, mesh, rules))
            for k, v in batch_shapes.items()}


def state_like_shardings(state_shapes: Any, param_structure_tree: Any, param_shardings: Any,
                         mesh: Mesh) -> Any:
    """Shardings for an optimizer state: every sub-tree shaped like the (trainable) params tree
    (Adam's mu, nu, ...) takes the params' shardings; every other leaf (counters) is replicated."""
    target = jax.tree.structure(param_structure_tree)

    def is_param_like(x):
        return jax.tree.structure(x) == target

    def pick(x):
        return param_shardings if is_param_like(x) else replicated(mesh)

    return jax.tree.map(pick, state_shapes, is_leaf=is_param_like)


def global_batch(local: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding]) -> dict:
    """Assembles this process's rows into global jax.Arrays (rows of all processes, in process order)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in local.items()}


def with_logical_constraint(x: jax.Array, axes: Sequence[str | None], mesh: Mesh,
                            rules: Sequence[tuple[str, tuple[str, ...]]] = LOGICAL_RULES) -> jax.Array:
    """Sharding constraint on an activation inside jit, by logical axes."""
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))
