"""Ahead-of-time compile of the train step for a TPU topology, on a CPU-only machine.

libtpu (PyPI `libtpu`, the version jax[tpu] pins: 0.0.42.x for jax 0.10.2) provides compile-only
TPU devices through `jax.experimental.topologies.get_topology_desc("v5p:4x4x8", "tpu")`. The step is
`train_step.make_train_step` (the code training runs), lowered with ShapeDtypeStruct inputs carrying
the NamedShardings of the mesh over those devices, then compiled by the TPU compiler. `AotResult` holds
the per-chip memory (`compiled.memory_analysis()`), FLOPs (`compiled.cost_analysis()`) and the compiled
program; `check_fits` raises DoesNotFitError when the step does not fit in the chip's HBM;
`fit_microbatches` searches the smallest microbatch count that fits; `estimate_train_step` is the
step-time estimate of the compiled step (perf/roofline.py: the compiler view, and the roofline bound
beside it) with the useful FLOPs of flops.py for an assumed packing (`PackedLayout`).

Compile time: on a 2-core CPU nearly all of it is the TPU compiler's code generation for each distinct
fusion (lowering to its low-level IR, scheduling, register allocation), not the HLO passes nor jax's
lowering; the layer scans compile their body once, so a model cut to fewer layers compiles barely faster
(docs/performance.md). jax's persistent compilation cache cannot serve these compile-only devices (an
executable is deserialized only with a real TPU client), so every run compiles.

TPU compiler flags: `TPU_COMPILER_FLAGS` go into LIBTPU_INIT_ARGS before libtpu starts, followed by the
caller's own LIBTPU_INIT_ARGS (libtpu takes a flag's last value, so the caller's win). The compile-only
devices read them like a TPU VM does; cloud/tpu.py puts the same flags into a training job's environment.

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
from typing import Any, Callable, Sequence

import numpy as np

from qwen2vl_jax.model import attention
from qwen2vl_jax.perf import roofline
from qwen2vl_jax.train import flops, sharding, train_step
from qwen2vl_jax.train.chips import CHIPS, Chip, GiB

_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
_GENERATION = "(" + "|".join(list(CHIPS) + list(_ALIASES)) + ")"

# TPU compiler flags (LIBTPU_INIT_ARGS), one set for every generation (libtpu accepts each on v4, v5e, v5p
# and v6e). Each group was measured with the estimate (launch.aot --estimate) on the 2B stage-2 step on
# v5p-64 before it became a default; the figures, and the groups left out, are in docs/performance.md.
TPU_COMPILER_FLAGS: tuple[str, ...] = (
    # No windowed einsum: under FSDP the partitioner otherwise splits each weight all-gather + matmul into
    # per-shard matmuls of contraction 80-96 accumulated through HBM (2.1x the step's HBM bytes).
    "--xla_jf_spmd_threshold_for_windowed_einsum_mib=1000000",
    # Async collective fusion (MaxText's continuation fusion for all-gather and all-reduce): collectives
    # run inside the compute fusions they overlap. On that step: the same FLOPs, ~1% more HBM bytes and
    # 16% less compiled memory per device.
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_reduce=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
    "--xla_enable_async_all_reduce=true",
)


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
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def label(self) -> str:
        return self.name if self.num_slices == 1 else f"{self.num_slices} x {self.name}"

    @property
    def chips(self) -> int:
        """Chips of all slices."""
        return math.prod(self.shape) * self.num_slices

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]


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
    m = re.fullmatch(_GENERATION + r":(\d+(?:x\d+)+)", name or "")
    if m:
        gen = _ALIASES.get(m.group(1), m.group(1))
        shape = tuple(int(x) for x in m.group(2).split("x"))
        if len(shape) != CHIPS[gen].torus_dims or min(shape) < 1:
            raise ValueError(f"topology {name!r}: {gen} slices have {CHIPS[gen].torus_dims} dimensions")
        return Topology(gen, shape, num_slices)
    m = re.fullmatch(_GENERATION + r"-(\d+)", name or "")
    if not m:
        raise ValueError(f"topology {name!r}: expected an accelerator type (v5p-256, v4-64, v5litepod-16, "
                         f"v6e-8) or a topology (v5p:4x4x8, v5e:2x2)")
    gen = _ALIASES.get(m.group(1), m.group(1))
    chip, cores = CHIPS[gen], int(m.group(2))
    if cores % chip.tensorcores:
        raise ValueError(f"{name}: {cores} is not a multiple of {chip.tensorcores} cores per {gen} chip")
    return Topology(gen, _grow(cores // chip.tensorcores, chip.torus_dims), num_slices)


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


def libtpu_init_args(user: str = "", compiler_flags: bool = True) -> str:
    """LIBTPU_INIT_ARGS for a compile or a training job: TPU_COMPILER_FLAGS (unless `compiler_flags` is
    False), then the caller's own flags `user`, which win (libtpu takes a flag's last value)."""
    return " ".join((list(TPU_COMPILER_FLAGS) if compiler_flags else []) + user.split())


_LIBTPU: dict = {}    # how this process started libtpu: {"args": LIBTPU_INIT_ARGS, "compiler_flags": bool}


def get_topology_devices(topo: Topology, compiler_flags: bool = True) -> list:
    """Compile-only TPU devices of `topo` (no TPU needed). The first call starts libtpu with
    `libtpu_init_args(<the environment's LIBTPU_INIT_ARGS>, compiler_flags)`; libtpu reads its flags once per
    process, so a later call asking for the other `compiler_flags` raises."""
    path = libtpu_path()
    if _LIBTPU and _LIBTPU["compiler_flags"] != compiler_flags:
        raise RuntimeError(f"libtpu already started in this process with compiler_flags="
                           f"{_LIBTPU['compiler_flags']} (LIBTPU_INIT_ARGS={_LIBTPU['args']!r}); it reads its flags "
                           f"once per process: compile with compiler_flags={compiler_flags} in a new process")
    # libtpu reads these at plugin initialisation; on a CPU host they would otherwise be probed from the
    # GCE metadata server (slow, noisy). They do not affect the compile-only topology.
    os.environ["TPU_LIBRARY_PATH"] = path
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{topo.generation}-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # several compiles may run at once
    from jax.experimental import topologies
    slices = {"num_slices": topo.num_slices} if topo.num_slices > 1 else {}
    if _LIBTPU:
        return list(topologies.get_topology_desc(topo.name, "tpu", **slices).devices)
    user = os.environ.get("LIBTPU_INIT_ARGS")
    args = libtpu_init_args(user or "", compiler_flags)
    os.environ["LIBTPU_INIT_ARGS"] = args
    try:
        devices = list(topologies.get_topology_desc(topo.name, "tpu", **slices).devices)
    finally:   # child processes (a CLI started from here) see the caller's value, not ours
        if user is None:
            del os.environ["LIBTPU_INIT_ARGS"]
        else:
            os.environ["LIBTPU_INIT_ARGS"] = user
    _LIBTPU.update(args=args, compiler_flags=compiler_flags)
    return devices


def libtpu_args_in_effect() -> str | None:
    """The LIBTPU_INIT_ARGS this process started libtpu with (None before `get_topology_devices`)."""
    return _LIBTPU.get("args")


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
    compile_s: float         # lowering (jax trace + StableHLO) + the TPU compiler
    compiled: Any = dataclasses.field(default=None, repr=False, compare=False)   # the jax Compiled
    generation: str = ""   # the chip generation (v5p); "" when `topology` names it (one slice)
    lower_s: float = 0.0     # of compile_s: jax's lowering

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
            f"(HBM {self.hbm_per_device / GiB:.1f} GiB per device); compiled in {self.compile_s:.1f} s "
            f"(jax lowering {self.lower_s:.1f} s, TPU compiler {self.compile_s - self.lower_s:.1f} s)",
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
           "batch or more microbatches (--microbatches=auto, --set microbatches=..), or remat "
           "(--set model.remat_policy=full).")


def compile_for_topology(lowerable: Any, args: tuple, topo: Topology, n_devices: int,
                         hbm_per_device: int | None = None) -> AotResult:
    """Lowers `lowerable` (a jitted fn) at `args` (ShapeDtypeStructs with shardings) and compiles it.
    hbm_per_device: the HBM the result is checked against (default: the chip's)."""
    per_dev_hbm = hbm_per_device or topo.chip.hbm_bytes * topo.chips // n_devices
    t0 = time.time()
    lowered = lowerable.lower(*args)
    lower_s = time.time() - t0
    try:
        compiled = lowered.compile()
    except Exception as e:  # jax.errors.JaxRuntimeError; the TPU compiler refuses programs over HBM
        if "RESOURCE_EXHAUSTED" in str(e):
            raise DoesNotFitError(
                f"does not fit: the TPU compiler ran out of memory for {topo.label} "
                f"({topo.chip.hbm_bytes * topo.chips // n_devices / GiB:.1f} GiB of HBM per device): "
                f"{str(e).strip().splitlines()[0].rstrip('.')}. {_ADVICE}") from None
        raise
    dt = time.time() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
        cost = cost[0] if cost else {}
    return AotResult(topology=topo.label, generation=topo.generation, n_devices=n_devices, chips=topo.chips,
                     argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                     alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
                     code_bytes=int(mem.generated_code_size_in_bytes),
                     flops_per_device=float((cost or {}).get("flops", float("nan"))),
                     hbm_per_device=per_dev_hbm, compile_s=dt, compiled=compiled, lower_s=lower_s)


def check_fits(result: AotResult) -> None:
    if not result.fits:
        raise DoesNotFitError(
            f"does not fit: the step needs {result.total_bytes / GiB:.2f} GiB per device on {result.topology} "
            f"but there are {result.hbm_per_device / GiB:.1f} GiB of HBM per device "
            f"(argument {result.argument_bytes / GiB:.2f} + output {result.output_bytes / GiB:.2f} - aliased "
            f"{result.alias_bytes / GiB:.2f} + temp {result.temp_bytes / GiB:.2f} + code "
            f"{result.code_bytes / GiB:.2f} GiB). {_ADVICE}")


def compile_train_step(cfg, step_cfg, mesh_cfg, topo: Topology, batch_size: int, seq_len: int,
                       max_patches: int, compiler_flags: bool = True,
                       hbm_per_device: int | None = None) -> AotResult:
    """AOT-compiles train_step.make_train_step for `topo` with the mesh `mesh_cfg` over its devices (a
    multi-slice topology needs mesh_cfg.dcn == topo.num_slices). The result holds the compiled program
    (`estimate_train_step` reads it)."""
    if mesh_cfg.dcn != topo.num_slices:
        raise ValueError(f"mesh.dcn={mesh_cfg.dcn} but the topology has {topo.num_slices} slice(s): "
                         f"set mesh.dcn={topo.num_slices}")
    devices = get_topology_devices(topo, compiler_flags)
    mesh = sharding.make_mesh(mesh_cfg, devices)
    # Parameter shapes do not depend on the attention kernel; the model's init traces attention on tiny
    # dummy inputs that the splash kernel rejects (block sizes < 128), so shapes come from the xla path.
    abs_state, state_sh = train_step.abstract_state(cfg.replace(attention_impl="xla"), step_cfg, mesh)
    spec = train_step.batch_spec(cfg, batch_size, seq_len, max_patches)
    batch_sh = sharding.batch_shardings(spec, mesh)
    abs_batch = {k: type(v)(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in spec.items()}
    step = train_step.make_train_step(cfg, step_cfg, mesh, state_sh, batch_sh)
    return compile_for_topology(step, (abs_state, abs_batch), topo, len(devices), hbm_per_device)


def describe_attention(impl: str, seq_len: int, max_patches: int) -> str:
    """What a TPU step runs for attention_impl `impl`. The model resolves `auto` while it is traced, for the
    platform of the mesh in context (model/attention.py resolve_impl), so a compile here for TPU devices
    gets what a TPU run gets: block_sparse where the lengths tile, else xla."""
    if impl != "auto":
        return impl
    def pick(n):
        return "block_sparse" if attention.kernel_supported(n, n) else "xla"
    return f"auto (on TPU: vision {pick(max_patches)}, decoder {pick(seq_len)})"


# ---------------------------------------------------------------------------------------------
# microbatches that fit

microbatch_candidates = train_step.microbatch_counts     # the counts the train step accepts


def fit_microbatches(compile_fn: Callable[[int], AotResult], candidates: Sequence[int], limit_bytes: float,
                     progress: Callable[[str], None] = print) -> tuple[int, AotResult]:
    """(the smallest of `candidates` whose compiled step needs <= limit_bytes per device, its AotResult).
    Binary search: a step's memory does not grow with the microbatch count (each microbatch holds fewer
    rows), so about log2(len(candidates)) compiles. `progress` gets one line per try with its memory."""
    if not candidates:
        raise ValueError("no microbatch count divides the batch into equal per-device batches; change "
                         "batch_size or the mesh (--set batch_size=.. / mesh.fsdp=..)")
    lo, hi, best, tried = 0, len(candidates) - 1, None, []
    while lo <= hi:
        mid = (lo + hi) // 2
        m = candidates[mid]
        try:
            result = compile_fn(m)
            need, fits = f"{result.total_bytes / GiB:.2f} GiB", result.total_bytes <= limit_bytes
        except DoesNotFitError:
            result, need, fits = None, "more than the chip's HBM (the compiler ran out of memory)", False
        tried.append(f"{m}: {need}")
        progress(f"microbatches={m}: {need} per device, {'fits' if fits else 'does not fit'} "
                 f"in {limit_bytes / GiB:.2f} GiB")
        if fits:
            best, hi = (m, result), mid - 1
        else:
            lo = mid + 1
    if best is None:
        raise DoesNotFitError(f"does not fit with any microbatch count (tried {'; '.join(tried)}; limit "
                              f"{limit_bytes / GiB:.2f} GiB per device). {_ADVICE}")
    return best


# ---------------------------------------------------------------------------------------------
# the step-time estimate

@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """What the estimate assumes a packed row holds, for flops.py's useful FLOPs and for the FLOPs of
    attention kernels that skip by segment: the patch rows are images of `image_patches` patches each (ids
    1, 2, ...), the token row documents of `doc_tokens` tokens; a remainder shorter than one image or
    document is padding (segment 0)."""
    image_patches: int = 1024
    doc_tokens: int = 2048

    def __post_init__(self):
        for f in ("image_patches", "doc_tokens"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}={getattr(self, f)} must be >= 1")

    def segment_ids(self, length: int, vision: bool) -> np.ndarray:
        """[length] int32 segment ids of one row of patches (vision) or tokens."""
        n = self.image_patches if vision else self.doc_tokens
        ids = np.zeros(length, np.int32)
        full = length // n
        ids[:full * n] = np.repeat(np.arange(1, full + 1, dtype=np.int32), n)
        return ids

    def check(self, seq_len: int, max_patches: int) -> None:
        if self.image_patches > max_patches or self.doc_tokens > seq_len:
            raise ValueError(f"image_patches={self.image_patches} / doc_tokens={self.doc_tokens}: a row holds "
                             f"{max_patches} patches and {seq_len} tokens; valid: at most those")

    def describe(self) -> str:
        return f"{self.image_patches}-patch images, {self.doc_tokens}-token documents"


def useful_flops(cfg, trainable: Sequence[str], batch_size: int, seq_len: int, max_patches: int,
                 layout: PackedLayout) -> flops.StepFlops:
    """flops.py's model FLOPs of one step whose rows are packed as `layout` says."""
    layout.check(seq_len, max_patches)
    text = flops.attention_pairs(layout.segment_ids(seq_len, vision=False), causal=True)
    patch = flops.attention_pairs(layout.segment_ids(max_patches, vision=True), causal=False)
    return flops.step_flops(cfg, tokens=batch_size * seq_len, patches=batch_size * max_patches,
                            text_pairs=batch_size * text, patch_pairs=batch_size * patch, trainable=trainable)


def attention_segments(layout: PackedLayout, seq_len: int, max_patches: int) -> roofline.SegmentFn:
    """The segment ids of one row that an attention kernel call sees (roofline.SegmentFn): the vision
    tower's calls (their jax name stack holds `visual`) attend within images, without a causal mask; the
    decoder's (`decoder`) within documents, causally. A call whose name tells neither is placed by its
    length (max_patches: vision, seq_len: decoder)."""
    def segments(call: roofline.KernelCall, T: int, S: int):
        names = call.op_name.split("/")
        if "visual" in names:
            vision = True
        elif "decoder" in names:
            vision = False
        elif max_patches != seq_len and T in (max_patches, seq_len):
            vision = T == max_patches
        else:
            return None
        return layout.segment_ids(T, vision), layout.segment_ids(S, vision), not vision
    return segments


def estimate_train_step(result: AotResult, cfg, trainable: Sequence[str], batch_size: int, seq_len: int,
                        max_patches: int, layout: PackedLayout = PackedLayout(),
                        kernel_efficiency: float | None = None) -> roofline.Estimate:
    """Estimate of a compiled train step (`result` from compile_train_step) with flops.py's useful FLOPs and
    6ND for `batch_size` rows packed as `layout` says; the block-sparse attention kernels are costed from the
    block pairs they visit for that layout, at `kernel_efficiency` of peak (roofline.estimate)."""
    useful = useful_flops(cfg, trainable, batch_size, seq_len, max_patches, layout).total
    six = flops.six_nd(cfg, tokens=batch_size * seq_len, patches=batch_size * max_patches)
    chip = CHIPS[result.generation or parse_topology(result.topology).generation]
    costs = [roofline.block_sparse_cost(attention_segments(layout, seq_len, max_patches))]
    return roofline.estimate(result.compiled, chip, useful_flops=useful, six_nd_flops=six, kernel_costs=costs,
                             num_devices=result.n_devices, kernel_efficiency=kernel_efficiency)
