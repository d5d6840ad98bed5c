"""Logical-axis sharding: the rules, the one resolver (logical axes -> PartitionSpec), and the context in
which activation constraints and the attention kernels' shard_map see the mesh.

Every array names its dimensions with *logical* axes (parameters: docs/architecture.md "Parameters";
activations: the `constrain` calls in vision_tower.py / decoder.py; the packed batch: train/sharding.py
BATCH_AXES). `LOGICAL_RULES` maps each logical axis to mesh axes, tried in order; `logical_to_spec` keeps
a mesh axis only if it has size > 1, is not manual (inside a shard_map), is not already used by an
earlier dimension of the same array, and the product of the kept axes still divides the dimension.
Otherwise that dimension is replicated over it, so every rule set is valid for every model size and
mesh, and a constraint never pads or changes numerics.

Activation constraints and attention's shard_map are resolved while tracing, against the mesh and rules
made visible by `activation_sharding(mesh)` (train step, evaluator). With no mesh in context (or a
one-device mesh) `constrain` is the identity.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Sequence[str]]]

# logical axis -> mesh axes (tried in order, each kept only if it divides the dim)
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # parameters
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("layers", ()),
    ("norm", ()),
    ("patch", ()),
    ("vision_embed", ("fsdp",)),
    ("vision_mlp", ("tensor",)),
    ("vision_heads", ("tensor",)),
    ("qkv", ()),
    # the paper's TP does not split the merger; we shard it like any FSDP weight
    ("merger_in", ("fsdp",)),
    ("merger_mlp", ("tensor",)),
    # activations / batch
    ("batch", ("dcn", "data", "fsdp")),
    ("length", ("sequence",)),
    ("patches", ("sequence",)),
    ("act_embed", ()),
    ("act_heads", ("tensor",)),
    ("act_kv_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
)


def _manual_axes(mesh) -> set[str]:
    manual = getattr(getattr(jax.sharding, "AxisType", None), "Manual", object())
    types = getattr(mesh, "axis_types", None) or (None,) * len(mesh.axis_names)
    return {a for a, t in zip(mesh.axis_names, types) if t == manual}


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh, rules: Rules = LOGICAL_RULES) -> P:
    """PartitionSpec for an array of `shape` whose dims are named by logical `axes` (None: replicated).
    `mesh`: a Mesh or an AbstractMesh. The first rule for a name wins."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    table: dict[str, tuple[str, ...]] = {}
    for name, mesh_axes in rules:
        table.setdefault(name, (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ()))
    unusable = _manual_axes(mesh)
    spec = []
    for name, dim in zip(axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"no sharding rule for logical axis {name!r}; known: {', '.join(table)}")
        chosen, size = [], 1
        for ax in table[name]:
            n = mesh.shape[ax]
            if ax in unusable or n == 1 or dim % (size * n):
                continue
            chosen.append(ax)
            size *= n
        unusable.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*spec)


def spec_size(entry, mesh) -> int:
    """Number of shards of one PartitionSpec entry (None, an axis name or a tuple of names)."""
    names = () if entry is None else (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[a] for a in names)


# ---------------------------------------------------------------------------------------------
# the tracing context

_RULES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("qwen2vl_jax_logical_rules", default=None)


@contextlib.contextmanager
def activation_sharding(mesh, rules: Rules = LOGICAL_RULES):
    """Makes `mesh` and `rules` visible while tracing: enter it inside the jitted function, around the
    model call (the train step, the evaluator). Activation constraints (`constrain`) then take effect and
    the Pallas attention kernels run under shard_map over the mesh. Both are read at trace time: a
    program traced once keeps the mesh and rules it was traced with."""
    token = _RULES.set(tuple(rules))
    try:
        with jax.sharding.use_abstract_mesh(getattr(mesh, "abstract_mesh", mesh)):
            yield
    finally:
        _RULES.reset(token)


def active_rules() -> tuple:
    """The rules of the enclosing `activation_sharding`, else LOGICAL_RULES."""
    rules = _RULES.get()
    return LOGICAL_RULES if rules is None else rules


def context_mesh():
    """The abstract mesh of the enclosing `activation_sharding` / `jax.set_mesh`, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def active_mesh():
    """The context mesh when it can partition anything: more than one device and at least one axis of size
    > 1 that is not manual (already inside a shard_map over it); else None."""
    mesh = context_mesh()
    if mesh is None or mesh.size == 1:
        return None
    manual = _manual_axes(mesh)
    if not any(n > 1 and a not in manual for a, n in mesh.shape.items()):
        return None
    return mesh


def constrain(x, axes: Sequence[str | None]):
    """Sharding constraint on an activation by logical axes, resolved against the active mesh and rules
    (the identity with no multi-device mesh in context). Dims whose rule does not divide stay whole."""
    mesh = active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh,
                                                                                   active_rules())))
