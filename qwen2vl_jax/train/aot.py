"""Ahead-of-time compile of the train step for a TPU topology, on a CPU-only machine.

libtpu (PyPI `libtpu`, the version jax[tpu] pins: 0.0.42.x for jax 0.10.2) provides compile-only
TPU devices through `jax.experimental.topologies.get_topology_desc("v5p:4x4x8", "tpu")`. The step is
`train_step.make_train_step` (the code training runs), lowered with ShapeDtypeStruct inputs carrying
the NamedShardings of the mesh over those devices, then compiled by the TPU compiler. `AotResult` holds
the per-chip memory (`compiled.memory_analysis()`) and FLOPs (`compiled.cost_analysis()`);
`check_fits` raises DoesNotFitError when the step does not fit in the chip's HBM.

Multi-slice: `num_slices=N` asks libtpu for N copies of the slice (`get_topology_desc(..., num_slices=N)`:
devices carry a `slice_index`) and the mesh gets `dcn=N` (sharding.make_mesh: jax's hybrid mesh, data
parallel across slices); memory is per device as on one slice, FLOPs and chips count every slice.

Accelerator names: `v5p-N` / `v4-N` count TensorCores (2 per chip: v5p-256 = 128 chips = 4x4x8);
`v5litepod-N` / `v5e-N` / `v6e-N` count chips (1 core each). A topology string (`v5p:2x2x1`) is
used as is. libtpu is found as the `libtpu` package, or through TPU_LIBRARY_PATH, or under
/opt/libtpu/<version>/ (`pip install --target /opt/libtpu/0.0.42.1 libtpu==0.0.42.1`, which keeps
libtpu out of the system site-packages so other jax programs on this CPU machine do not probe for a TPU).
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import time
from typing import Any

from qwen2vl_jax.train import sharding, train_step

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Generation:
    topology_prefix: str     # name libtpu's topology API accepts
    cores_per_chip: int      # TensorCores counted by the accelerator name
    hbm_bytes: int           # per chip
    dims: int                # torus dimensions (3 for v4/v5p, 2 for v5e/v6e)


# peak FLOP/s per chip live in train/flops.py (PEAK_FLOPS); the compile needs only memory and shape
GENERATIONS = {
    "v5p": Generation("v5p", 2, 95 * GiB, 3),
    "v4": Generation("v4", 2, 32 * GiB, 3),
    "v5e": Generation("v5e", 1, 16 * GiB, 2),
    "v6e": Generation("v6e", 1, 32 * GiB, 2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: str
    shape: tuple[int, ...]   # chips per torus dimension of one slice
    num_slices: int = 1      # slices joined over the data-centre network (multi-slice)

    def __post_init__(self):
        if self.num_slices < 1:
            raise ValueError(f"num_slices={self.num_slices} must be >= 1")

    @property
    def name(self) -> str:
        """libtpu's name of one slice (v5p:4x8x8)."""
        return f"{GENERATIONS[self.generation].topology_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def label(self) -> str:
        return self.name if self.num_slices == 1 else f"{self.num_slices} x {self.name}"

    @property
    def chips(self) -> int:
        """Chips of all slices."""
        return math.prod(self.shape) * self.num_slices

    @property
    def spec(self) -> Generation:
        return GENERATIONS[self.generation]


def _grow(chips: int, dims: int) -> tuple[int, ...]:
    """Canonical slice shape: 3-D slices start at 2x2x1, 2-D at 1x1; then repeatedly double the last
    of the smallest dimensions (v5p: 4 chips -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4,
    64 -> 4x4x4, 128 -> 4x4x8, 256 -> 4x8x8; v5e: 4 -> 2x2, 8 -> 2x4, 16 -> 4x4)."""
    start = [2, 2, 1] if dims == 3 else [1, 1]
    if chips < math.prod(start) or chips & (chips - 1):
        raise ValueError(f"{chips} chips: expected a power of two >= {math.prod(start)}; "
                         f"pass an explicit topology like v5p:4x4x8")
    shape = start
    while math.prod(shape) < chips:
        idx = max(i for i, s in enumerate(shape) if s == min(shape))
        shape[idx] *= 2
    return tuple(shape)


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """'v5p-256' -> Topology('v5p', (4, 4, 8)); 'v5p:2x2x1' -> Topology('v5p', (2, 2, 1)); `num_slices` of them."""
    m = re.fullmatch(r"(v5p|v4|v5e|v6e|v5litepod|v5lite):(\d+(?:x\d+)+)", name or "")
    if m:
        gen = _ALIASES.get(m.group(1), m.group(1))
        shape = tuple(int(x) for x in m.group(2).split("x"))
        if len(shape) != GENERATIONS[gen].dims or min(shape) < 1:
            raise ValueError(f"topology {name!r}: {gen} slices have {GENERATIONS[gen].dims} dimensions")
        return Topology(gen, shape, num_slices)
    m = re.fullmatch(r"(v5p|v4|v5e|v6e|v5litepod|v5lite)-(\d+)", name or "")
    if not m:
        raise ValueError(f"topology {name!r}: expected an accelerator type (v5p-256, v4-64, v5litepod-16, "
                         f"v6e-8) or a topology (v5p:4x4x8, v5e:2x2)")
    gen = _ALIASES.get(m.group(1), m.group(1))
    spec, cores = GENERATIONS[gen], int(m.group(2))
    if cores % spec.cores_per_chip:
        raise ValueError(f"{name}: {cores} is not a multiple of {spec.cores_per_chip} cores per {gen} chip")
    return Topology(gen, _grow(cores // spec.cores_per_chip, spec.dims), num_slices)


# ---------------------------------------------------------------------------------------------
# libtpu

def libtpu_path() -> str:
    """Path of libtpu.so (package `libtpu`, TPU_LIBRARY_PATH, or /opt/libtpu/*). Raises with the fix."""
    env = os.environ.get("TPU_LIBRARY_PATH")
    if env and os.path.isfile(env):
        return env
    try:
        import libtpu  # type: ignore
        return libtpu.get_library_path()
    except ImportError:
        pass
    found = sorted(glob.glob("/opt/libtpu/*/libtpu/libtpu.so"))
    if found:
        return found[-1]
    raise RuntimeError("libtpu not found: `pip install libtpu==0.0.42.1` (the version jax[tpu]==0.10.2 pins), or "
                       "`pip install --target /opt/libtpu/0.0.42.1 libtpu==0.0.42.1`, or set TPU_LIBRARY_PATH")


def get_topology_devices(topo: Topology) -> list:
    """Compile-only TPU devices of `topo` (no TPU needed)."""
    path = libtpu_path()
    # libtpu reads these at plugin initialisation; on a CPU host they would otherwise be probed from the
    # GCE metadata server (slow, noisy). They do not affect the compile-only topology.
    os.environ["TPU_LIBRARY_PATH"] = path
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{topo.generation}-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # several compiles may run at once
    from jax.experimental import topologies
    kwargs = {"num_slices": topo.num_slices} if topo.num_slices > 1 else {}
    return list(topologies.get_topology_desc(topo.name, "tpu", **kwargs).devices)


# ---------------------------------------------------------------------------------------------
# compile

@dataclasses.dataclass(frozen=True)
class AotResult:
    topology: str
    n_devices: int
    chips: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops_per_device: float
    hbm_per_device: int
    compile_s: float

    @property
    def total_bytes(self) -> int:
        """Peak per device: live arguments + outputs not aliased to (donated) arguments + temps + code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_per_device

    def format(self) -> str:
        g = lambda b: f"{b / GiB:9.3f} GiB"  # noqa: E731
        return "\n".join([
            f"topology {self.topology}: {self.chips} chips, {self.n_devices} devices "
            f"(HBM {self.hbm_per_device / GiB:.1f} GiB per device); compiled in {self.compile_s:.1f} s",
            f"per device: argument {g(self.argument_bytes)}",
            f"            output   {g(self.output_bytes)}  (aliased to donated arguments: {g(self.alias_bytes).strip()})",
            f"            temp     {g(self.temp_bytes)}",
            f"            code     {g(self.code_bytes)}",
            f"            total    {g(self.total_bytes)}  ({100 * self.total_bytes / self.hbm_per_device:.1f}% of HBM)",
            f"FLOPs per step (XLA cost analysis): {self.flops_per_device:.4g} per device, "
            f"{self.flops_per_device * self.n_devices:.4g} total",
        ])


class DoesNotFitError(RuntimeError):
    """The compiled step needs more HBM per device than the topology has (the CLI exits with status 2)."""


_ADVICE = ("Use a bigger slice, more fsdp/tensor sharding (--set mesh.fsdp=.. / mesh.tensor=..), a smaller "
           "batch or more microbatches (--set microbatches=..), or remat (--set model.remat_policy=full).")


def compile_for_topology(lowerable: Any, args: tuple, topo: Topology, n_devices: int) -> AotResult:
    """Lowers `lowerable` (a jitted fn) at `args` (ShapeDtypeStructs with shardings) and compiles it."""
    t0 = time.time()
    lowered = lowerable.lower(*args)
    try:
        compiled = lowered.compile()
    except Exception as e:  # jax.errors.JaxRuntimeError; the TPU compiler refuses programs over HBM
        if "RESOURCE_EXHAUSTED" in str(e):
            raise DoesNotFitError(
                f"does not fit: the TPU compiler ran out of memory for {topo.label} "
                f"({topo.spec.hbm_bytes * topo.chips // n_devices / GiB:.1f} GiB of HBM per device): "
                f"{str(e).strip().splitlines()[0].rstrip('.')}. {_ADVICE}") from None
        raise
    dt = time.time() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
        cost = cost[0] if cost else {}
    per_dev_hbm = topo.spec.hbm_bytes * topo.chips // n_devices
    return AotResult(topology=topo.label, n_devices=n_devices, chips=topo.chips,
                     argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                     alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
                     code_bytes=int(mem.generated_code_size_in_bytes),
                     flops_per_device=float((cost or {}).get("flops", float("nan"))),
                     hbm_per_device=per_dev_hbm, compile_s=dt)


def check_fits(result: AotResult) -> None:
    if not result.fits:
        raise DoesNotFitError(
            f"does not fit: the step needs {result.total_bytes / GiB:.2f} GiB per device on {result.topology} "
            f"but there are {result.hbm_per_device / GiB:.1f} GiB of HBM per device "
            f"(argument {result.argument_bytes / GiB:.2f} + output {result.output_bytes / GiB:.2f} - aliased "
            f"{result.alias_bytes / GiB:.2f} + temp {result.temp_bytes / GiB:.2f} + code "
            f"{result.code_bytes / GiB:.2f} GiB). {_ADVICE}")


def compile_train_step(cfg, step_cfg, mesh_cfg, topo: Topology, batch_size: int, seq_len: int,
                       max_patches: int) -> AotResult:
    """AOT-compiles train_step.make_train_step for `topo` with the mesh `mesh_cfg` over its devices (a
    multi-slice topology needs mesh_cfg.dcn == topo.num_slices)."""
    if mesh_cfg.dcn != topo.num_slices:
        raise ValueError(f"mesh.dcn={mesh_cfg.dcn} but the topology has {topo.num_slices} slice(s): "
                         f"set mesh.dcn={topo.num_slices}")
    devices = get_topology_devices(topo)
    mesh = sharding.make_mesh(mesh_cfg, devices)
    # Parameter shapes do not depend on the attention kernel; the model's init traces attention on tiny
    # dummy inputs that the splash kernel rejects (block sizes < 128), so shapes come from the xla path.
    abs_state, state_sh = train_step.abstract_state(cfg.replace(attention_impl="xla"), step_cfg, mesh)
    spec = train_step.batch_spec(cfg, batch_size, seq_len, max_patches)
    batch_sh = sharding.batch_shardings(spec, mesh)
    abs_batch = {k: type(v)(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in spec.items()}
    step = train_step.make_train_step(cfg, step_cfg, mesh, state_sh, batch_sh)
    return compile_for_topology(step, (abs_state, abs_batch), topo, len(devices))


def resolve_attention(impl: str) -> str:
    """What `auto` picks on a TPU (the AOT host is a CPU, where `auto` would resolve to xla)."""
    return "splash" if impl == "auto" else impl
