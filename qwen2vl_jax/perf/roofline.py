"""Step-time estimate of a compiled TPU program, loop trip counts applied: the compiler view (THE estimate)
and the roofline (an upper bound on speed) beside it.

    text = roofline.hlo_text(compiled)            # jax `.lower(...).compile()` for (compile-only) TPU devices
    est = roofline.estimate(text, chips.get_chip("v5p"), useful_flops=..., six_nd_flops=...)
    print(roofline.format_estimate(est))          # last line: roofline.last_line(est)

Why not `compiled.cost_analysis()`: it counts every while-loop body once (layer scan, microbatch scan, loss
chunks), so its FLOPs are off by the product of the trip counts, and custom calls (Pallas / Mosaic kernels:
splash attention) and collectives carry no cost at all.

What is counted, per device and per step (every figure is multiplied by the trip counts of the loops around
it; nested loops multiply):
- matmul FLOPs: every `convolution` and `dot`, also inside fusions (the TPU compiler turns dots into
  convolutions; batch dimensions become dilated spatial dimensions, so the MACs of a convolution are counted
  tap by tap: out batch x out features x kernel input features x the (output, window) pairs per spatial
  dimension that land on a real, non-padding input element).
- kernel FLOPs: XLA gives a custom call no cost. Each `tpu_custom_call` is offered, as a `KernelCall`, to the
  caller's `kernel_costs` functions and then to `splash_cost` (jax's splash attention); the first one that
  returns a `KernelCost` wins. A kernel nobody claims is listed as unknown (no FLOPs), never dropped silently.
  Write a `KernelCostFn` for your own kernel: it gets the kernel name, the operand / result shapes and the
  values of operands that are compile-time constants (block masks), and returns FLOPs and optionally HBM
  bytes; pass it as `estimate(..., kernel_costs=[fn])`. `block_sparse_cost(segments)` is the one for
  model/block_sparse_attention.py's kernels, whose visited blocks depend on the segment ids at run time:
  the caller says which segment layout to assume (perf/aot.py: `PackedLayout`).
- HBM bytes: per top-level op (fusion, convolution, copy, custom call, collective, ...), operand + result
  bytes that live in HBM (memory space 0; `S(1)` VMEM operands are on-chip). A fusion operand that the fused
  computation only slices (a layer's weights out of the stacked [L, ...] array) counts the slices; a fusion
  whose root is a dynamic-update-slice writes only the update (in place). Layout padding to TPU tiles is
  not counted.
- collective bytes by kind (all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute) and
  replica-group size n. A collective the compiler fused with compute (async collective fusion: the same
  collective, one channel id, appears in the start fusion, in the compute fusions it overlaps and in the
  done fusion) is counted once per channel per execution of the computation around it; its HBM bytes are
  those of the fusions that hold it. ICI bytes a device sends assume the ring algorithm: all-gather (n-1) x its shard,
  reduce-scatter (n-1)/n x its input, all-reduce 2(n-1)/n x its buffer, all-to-all (n-1)/n x its buffer,
  collective-permute its buffer once. ICI time = those bytes / the chip's bidirectional ring bandwidth on
  one torus axis (one link each way, `Chip.ring_bandwidth`). Optimistic where a slice dimension has no
  wraparound (a ring becomes a line) and pessimistic where the compiler drives several torus axes at once.
- the compiler's own per-op `estimated_cycles` (each op's backend_config), summed with trip counts and
  converted at the chip clock.

The compiler view (`Estimate.compiler_view_s`, THE estimate) = the XLA ops' estimated_cycles + the ops the
compiler gives no cycles (synchronous collectives, gather / scatter fusions; not the asynchronous starts
whose transfers overlap compute) at their roofline time + the kernels' modelled time. Kernel model: a
kernel's FLOPs (the block pairs it visits) as the MXU runs them, with head_dim padded to whole 128-element
lanes (`lane_padded`: every attention matmul has head_dim as its contraction or its output dimension, so a
head_dim of 80 costs like 128, efficiency 80/128), at `kernel_fraction` of peak: by default the fraction
the compiler's own cycle model gives this program's matmul ops (their matmul FLOPs / their cycles), i.e.
a kernel is assumed to drive the MXU as well as the compiler's matmul fusions do (docs/performance.md). FlashAttention-2 reaches 50-73% of A100 peak (Dao 2023, arXiv:2307.08691), the same range.
No overlap is assumed between the three parts; overlap the compiler schedules (async collectives inside
compute fusions) is inside its cycles.

The roofline step time = max(compute, HBM, ICI) with compute = (matmul + kernel FLOPs) / peak (all FLOPs
at the bf16 peak), HBM = bytes / HBM bandwidth, ICI as above: a bound no schedule can beat; the
no-overlap time is their sum. MFU = the caller's useful FLOPs per step (qwen2vl_jax.train.flops: attended
pairs only, no remat recompute) per device / step time / peak, and the same for 6ND.

While-loop trip counts come from backend_config `known_trip_count` when present, else from the loop itself:
the condition's compare (LT, LE, GT, GE, NE; either operand order) of the induction variable against a
constant (or a loop-invariant tuple element), the induction variable's initial value in the while operand
and its constant increment in the body: `i <= n` from i0 by s runs floor((n - i0) / s) + 1 times. A
loop whose count cannot be read is counted once and listed in the estimate's warnings. Of a conditional's
branches the most expensive one is counted.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import numpy as np

from qwen2vl_jax.train.chips import Chip

# ---------------------------------------------------------------------------------------------
# HLO text

DTYPE_BYTES = {"pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
               "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8,
               "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
               "f8e4m3b11fnuz": 1, "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5, "token": 0}
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s+(ROOT )?%([^\s=]+) = ")
_COMP = re.compile(r"^(ENTRY )?%([^\s(]+) .*\{\s*$")


@dataclasses.dataclass(frozen=True)
class Array:
    dtype: str
    dims: tuple[int, ...]
    memory_space: int       # 0 = HBM; TPU: 1 = VMEM, others are on-chip scalar / semaphore memories

    @property
    def bytes(self) -> float:
        return math.prod(self.dims) * DTYPE_BYTES.get(self.dtype, 4)


def parse_shape(shape: str) -> list[Array]:
    """Arrays of an HLO shape string (an array or a nested tuple), with their memory space."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(shape):
        if dtype not in DTYPE_BYTES:
            continue
        space = re.search(r"S\((\d+)\)", layout or "")
        out.append(Array(dtype, tuple(int(d) for d in dims.split(",") if d), int(space.group(1)) if space else 0))
    return out


def shape_bytes(shape: str, hbm_only: bool = False) -> float:
    return sum(a.bytes for a in parse_shape(shape) if not hbm_only or a.memory_space == 0)


@dataclasses.dataclass(frozen=True)
class Instr:
    name: str
    shape: str
    opcode: str
    operands: tuple[str, ...]   # instruction names
    literal: str                # the text between the parentheses (a constant's value)
    attrs: str                  # everything after the operand list
    computation: str

    def attr(self, key: str) -> str | None:
        """Value of `key=` in the attributes: a %name, a {...} block or a plain token."""
        m = re.search(r"(?:^|[ ,])" + re.escape(key) + r"=", self.attrs)
        if not m:
            return None
        i = m.end()
        if i < len(self.attrs) and self.attrs[i] in "{[":
            return self.attrs[i:_close(self.attrs, i)]
        return re.match(r'"[^"]*"|[^,\s]+', self.attrs[i:]).group(0)

    def called(self, key: str) -> list[str]:
        v = self.attr(key)
        return re.findall(r"%([^\s,{}]+)", v) if v else []


def _close(text: str, i: int) -> int:
    """Index one past the bracket that closes text[i] (quotes and escapes respected)."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack, quoted, j = [], False, i
    while j < len(text):
        c = text[j]
        if quoted:
            if c == "\\":
                j += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return j + 1
        j += 1
    raise ValueError(f"unbalanced HLO text at offset {i}: {text[i:i + 80]!r}")


def _parse_instr(text: str, computation: str) -> Instr:
    m = _INSTR.match(text)
    name, rest = m.group(2), text[m.end():]
    if rest.startswith("("):
        end = _close(rest, 0)
    else:
        end = re.match(r"\S+", rest).end()
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        raise ValueError(f"cannot parse HLO instruction %{name}: {text[:200]!r}")
    close = _close(rest, op.end() - 1)
    inner = rest[op.end():close - 1]
    operands = tuple(re.findall(r"%([^\s,()]+)", inner))
    return Instr(name, shape, op.group(1), operands, inner, rest[close:].lstrip(", "), computation)


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instr]]
    instrs: dict[str, Instr]
    roots: dict[str, Instr]
    entry: str
    num_devices: int
    while_of: dict = dataclasses.field(default_factory=dict)  # loop body computation -> its while
    users: dict = dataclasses.field(default_factory=dict)     # computation -> {value: users}, filled lazily


def parse_module(text: str) -> Module:
    """Parses `compiled.as_text()` (optimized HLO; instructions may span lines)."""
    comps: dict[str, list[Instr]] = {}
    roots: dict[str, Instr] = {}
    entry, current, pending, is_root = "", None, [], False

    def flush():
        nonlocal pending
        if pending:
            ins = _parse_instr(" ".join(pending), current)
            comps[current].append(ins)
            if is_root:
                roots[current] = ins
        pending = []

    for line in text.splitlines():
        if current is None:
            m = _COMP.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                entry = current if m.group(1) else entry
            continue
        m = _INSTR.match(line)
        if m:
            flush()
            pending, is_root = [line], bool(m.group(1))
        elif line.strip() == "}":
            flush()
            current = None
        elif pending:
            pending.append(line.strip())
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text (expected compiled.as_text())")
    header = text[:text.find("\n")]
    parts = re.search(r"num_partitions=(\d+)", header)
    replicas = re.search(r"replica_count=(\d+)", header)
    n = (int(parts.group(1)) if parts else 1) * (int(replicas.group(1)) if replicas else 1)
    instrs = {i.name: i for c in comps.values() for i in c}
    while_of = {i.called("body")[0]: i for i in instrs.values() if i.opcode == "while" and i.called("body")}
    return Module(comps, instrs, roots, entry, n, while_of)


# ---------------------------------------------------------------------------------------------
# while-loop trip counts

_PASS = ("copy", "bitcast", "convert", "reshape")


def _through(module: Module, name: str) -> Instr:
    ins = module.instrs[name]
    while ins.opcode in _PASS and ins.operands:
        ins = module.instrs[ins.operands[0]]
    return ins


def _const_int(ins: Instr) -> int | None:
    if ins.opcode != "constant" or not re.fullmatch(r"-?\d+", ins.literal.strip()):
        return None
    return int(ins.literal)


def _tuple_index(module: Module, name: str) -> int | None:
    """i when `name` is (a copy of) get-tuple-element(parameter(0), index=i)."""
    ins = _through(module, name)
    if ins.opcode == "get-tuple-element" and module.instrs[ins.operands[0]].opcode == "parameter":
        return int(ins.attr("index"))
    return None


def trip_count(module: Module, loop: Instr) -> int | None:
    """Iterations of a while loop, or None when they cannot be read (module docstring)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
    if known:
        return int(known.group(1))
    cond, body = loop.called("condition"), loop.called("body")
    if not cond or not body:
        return None
    cmp_ = _unfused(module, module.roots[cond[0]])
    if cmp_.opcode != "compare" or len(cmp_.operands) != 2:
        return None
    direction = cmp_.attr("direction")
    init_tuple = _through(module, loop.operands[0]) if loop.operands else None
    if init_tuple is None or init_tuple.opcode != "tuple":
        return None

    def value(name: str, induction: int | None) -> int | None:
        c = _const_int(_through(module, name))
        if c is not None:
            return c
        j = _tuple_index(module, name)             # a loop-invariant bound carried in the tuple
        if j is None or j == induction or j >= len(init_tuple.operands):
            return None
        return _const_int(_through(module, init_tuple.operands[j]))

    a, b = cmp_.operands
    ia, ib = _tuple_index(module, a), _tuple_index(module, b)
    for idx, bound_name, flip in ((ia, b, False), (ib, a, True)):
        if idx is None:
            continue
        limit = value(bound_name, idx)
        init = _const_int(_through(module, init_tuple.operands[idx])) if idx < len(init_tuple.operands) else None
        step = _increment(module, body[0], idx)
        if None in (limit, init, step) or step == 0:
            continue
        d = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE"}.get(direction, direction) if flip else direction
        if d == "LT":
            n = math.ceil((limit - init) / step)
        elif d == "LE":
            n = math.floor((limit - init) / step) + 1
        elif d == "GT":
            n = math.ceil((init - limit) / -step)
        elif d == "GE":
            n = math.floor((init - limit) / -step) + 1
        elif d == "NE" and (limit - init) % step == 0:
            n = (limit - init) // step
        else:
            continue
        return max(n, 0)
    return None


def _unfused(module: Module, ins: Instr) -> Instr:
    """A fusion of one op (the compiler wraps a loop's compare or increment: `wrapped_compare`) as that op on
    the fusion's own operands; any other instruction as it is."""
    if ins.opcode != "fusion":
        return ins
    inner = module.roots[ins.called("calls")[0]]
    args = [ins.operands[int(module.instrs[o].literal)] if module.instrs[o].opcode == "parameter" else o
            for o in inner.operands]
    return dataclasses.replace(inner, operands=tuple(args))


def _increment(module: Module, body: str, idx: int) -> int | None:
    root = module.roots[body]
    if root.opcode != "tuple" or idx >= len(root.operands):
        return None
    upd = _unfused(module, _through(module, root.operands[idx]))
    if upd.opcode not in ("add", "subtract") or len(upd.operands) != 2:
        return None
    x, y = upd.operands
    if _tuple_index(module, x) == idx and _const_int(_through(module, y)) is not None:
        c = _const_int(_through(module, y))
    elif upd.opcode == "add" and _tuple_index(module, y) == idx and _const_int(_through(module, x)) is not None:
        c = _const_int(_through(module, x))
    else:
        return None
    return c if upd.opcode == "add" else -c


# ---------------------------------------------------------------------------------------------
# matmul FLOPs

def _window(ins: Instr, ndim: int) -> list[dict]:
    """Per spatial dimension: size, stride, pad (lo, hi), lhs / rhs dilation."""
    dims = [dict(size=1, stride=1, pad=(0, 0), lhs_dilate=1, rhs_dilate=1) for _ in range(ndim)]
    w = ins.attr("window")
    if not w:
        return dims
    for key, val in re.findall(r"(\w+)=([0-9x_\-]+)", w):
        vals = val.split("x")
        for d, v in enumerate(vals[:ndim]):
            if key == "pad":
                lo, hi = v.split("_")
                dims[d]["pad"] = (int(lo), int(hi))
            elif key in ("size", "stride", "lhs_dilate", "rhs_dilate"):
                dims[d][key] = int(v)
    return dims


def _taps(in_size: int, out_size: int, w: dict) -> int:
    """(output position, window position) pairs of one spatial dimension that read a real input element."""
    extent = (in_size - 1) * w["lhs_dilate"]       # last valid (dilated) input position
    o = np.arange(out_size, dtype=np.int64) * w["stride"] - w["pad"][0]
    total = 0
    for k in range(w["size"]):
        pos = o + k * w["rhs_dilate"]
        total += int(np.count_nonzero((pos >= 0) & (pos <= extent) & (pos % w["lhs_dilate"] == 0)))
    return total


def conv_flops(module: Module, ins: Instr) -> float:
    labels = ins.attr("dim_labels")
    lhs_l, rest = labels.split("_")
    rhs_l, out_l = rest.split("->")
    lhs = parse_shape(module.instrs[ins.operands[0]].shape)[0].dims
    rhs = parse_shape(module.instrs[ins.operands[1]].shape)[0].dims
    out = parse_shape(ins.shape)[0].dims
    spatial = sorted((c for c in out_l if c.isdigit()), key=int)   # window dims follow the spatial numbers
    windows = _window(ins, len(spatial))
    macs = out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")]
    for d, c in enumerate(spatial):
        macs *= _taps(lhs[lhs_l.index(c)], out[out_l.index(c)], windows[d])
    return 2.0 * macs


def dot_flops(module: Module, ins: Instr) -> float:
    lhs = parse_shape(module.instrs[ins.operands[0]].shape)[0].dims
    contract = ins.attr("lhs_contracting_dims")
    k = math.prod(lhs[int(d)] for d in re.findall(r"\d+", contract or ""))
    return 2.0 * math.prod(parse_shape(ins.shape)[0].dims) * k


def _fused_flops(module: Module, comp: str) -> float:
    total = 0.0
    for ins in module.computations[comp]:
        if ins.opcode == "convolution":
            total += conv_flops(module, ins)
        elif ins.opcode == "dot":
            total += dot_flops(module, ins)
        for c in ins.called("calls"):
            total += _fused_flops(module, c)
    return total


# ---------------------------------------------------------------------------------------------
# custom calls (Pallas / Mosaic kernels)

@dataclasses.dataclass(frozen=True)
class KernelCall:
    """One custom call as a kernel cost function sees it."""
    name: str                          # kernel name (Pallas `name=`), else the instruction name
    target: str                        # custom_call_target
    op_name: str                       # jax name stack of the call (metadata op_name)
    operands: tuple[str, ...]          # operand shapes (HLO shape strings)
    result: str                        # result shape
    constants: tuple                   # per operand: np.ndarray of a compile-time constant, else None
    metadata: str                      # the kernel's frontend_attributes text (Pallas kernel_metadata)

    def operand_dims(self, i: int) -> tuple[int, ...]:
        return parse_shape(self.operands[i])[0].dims


@dataclasses.dataclass(frozen=True)
class KernelCost:
    flops: float
    hbm_bytes: float | None = None     # None: operand + result bytes
    label: str = ""                    # row name in the estimate's table (default: the kernel name)
    warning: str = ""                  # shown under the estimate (an assumption the count had to make)
    mxu_flops: float | None = None     # the FLOPs the MXU runs with its lanes padded (None: `flops`)


# Vector lanes of every TPU generation: a Pallas block's last dimension is laid out over 128 lanes, so a
# head_dim of 80 occupies the MXU like 128 (`lane_padded`).
LANES = 128


def lane_padded(flops: float, dim: int) -> float:
    """`flops` of attention matmuls whose every product has `dim` (head_dim) as its contraction (q.k, dO.v)
    or output (p.v, dS.k, dS.q, p.dO) dimension, as the MXU runs them with `dim` padded to whole lanes."""
    return flops * (-(-dim // LANES) * LANES) / dim


KernelCostFn = Callable[[KernelCall], "KernelCost | None"]

_SPLASH = re.compile(r"splash_(mqa|mha)_(fwd|dq|dkv)")
# matmuls per visited (query block, key block) pair, each 2*bq*bkv*head_dim FLOPs: forward q.k and p.v; the
# dq kernel recomputes q.k and takes dO.v and dS.k; the dkv kernel recomputes q.k and takes dO.v, p.dO, dS.q
_SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}
# block sizes per phase in the kernel's metadata (jax BlockSizes field names): (query block, key block, the
# block streamed from HBM per visited pair: key blocks (k, v) for fwd / dq, query blocks (q, dO) for dkv)
_SPLASH_BLOCKS = {"fwd": ("block_q", "block_kv", "kv"), "dq": ("block_q_dq", "block_kv_dq", "kv"),
                  "dkv": ("block_q_dkv", "block_kv_dkv", "q")}


def splash_cost(call: KernelCall) -> KernelCost | None:
    """jax's splash attention kernels (forward, dq, dkv): FLOPs of the blocks the kernel visits.

    Operands: the mask-info arrays (data_next, block_mask, ...), then q [..., heads, T, D] and k
    [..., S, D] (mqa) or [..., heads, S, D]; leading dimensions are vmapped grid dimensions. A (query
    block, key block) pair runs unless the static block mask says 0, so visited pairs = heads x T x S x
    (non-zero fraction of block_mask); with the mask's values elided (`as_text()` prints large constants
    as {...}) every pair counts (`hlo_text` keeps them). Segment ids do not skip blocks. HBM bytes: operands
    and results, plus the two blocks streamed per visited block pair (k and v for fwd / dq, q and dO for dkv)."""
    m = _SPLASH.search(call.name) or _SPLASH.search(call.op_name)
    if not m:
        return None
    phase = m.group(2)
    qi = next((i for i, s in enumerate(call.operands)
               if parse_shape(s) and parse_shape(s)[0].dtype in ("bf16", "f16", "f32")
               and len(parse_shape(s)[0].dims) >= 3), None)
    if qi is None or qi + 1 >= len(call.operands):
        return None
    q_arr = parse_shape(call.operands[qi])[0]
    q, k = q_arr.dims, call.operand_dims(qi + 1)
    heads, T, D = q[-3:]
    S = k[-2]
    label = f"{m.group(0)} q{list(q)} kv{S}"
    frac, warning, mask = 1.0, "", call.constants[1] if len(call.constants) > 1 else None
    if mask is not None and mask.size and set(np.unique(mask).tolist()) <= {0, 1, 2}:
        frac = float(np.count_nonzero(mask)) / mask.size
    else:
        warning = (f"{label}: block mask not readable (as_text() elides large constants; pass "
                   f"roofline.hlo_text(compiled)), every block pair counted")
    pairs = math.prod(q[:-3]) * heads * T * S * frac
    flops = 2.0 * pairs * D * _SPLASH_MATMULS[phase]
    hbm = sum(shape_bytes(s) for s in call.operands) + shape_bytes(call.result)
    q_key, kv_key, streamed = _SPLASH_BLOCKS[phase]
    sizes = dict((key, int(v)) for key, v in re.findall(r'(block_\w+)\\?": (\d+)', call.metadata))
    if q_key in sizes and kv_key in sizes:
        bq, bkv = sizes[q_key], sizes[kv_key]
        rows = bkv if streamed == "kv" else bq
        hbm += pairs / (bq * bkv) * 2 * rows * D * DTYPE_BYTES[q_arr.dtype]
    return KernelCost(flops, hbm, label=label, warning=warning, mxu_flops=lane_padded(flops, D))


# One row's segment ids for a kernel call with query length T and key length S: (q_segment_ids [T],
# kv_segment_ids [S], causal), or None when the caller cannot tell (perf/aot.py attention_segments).
SegmentFn = Callable[[KernelCall, int, int], "tuple[np.ndarray, np.ndarray, bool] | None"]
_BLOCK_SPARSE = re.compile(r"block_sparse_(fwd|dq|dkv)")


def block_sparse_cost(segments: SegmentFn) -> KernelCostFn:
    """Cost function for model/block_sparse_attention.py's kernels (block_sparse_fwd / _dq / _dkv): FLOPs of
    the block pairs their plan visits (its `visited_flops`) for the segment ids `segments` gives, the same
    for every row of the call (without a layout: every block pair, with a warning).

    Operands: the grid length, the visit list [rows, entries], q [B, Hq, T, D], k [B, Hkv, S, D], v, ...
    (B = this device's rows). Block sizes: the kernel's own choice for (T, S) (`block_sizes`), checked
    against the visit list, which holds B x (T / block_q) x (S / block_kv) entries. HBM bytes: operands and
    results, plus the two blocks streamed per visited block pair and query head (k and v for fwd / dq, q
    and dO for dkv)."""
    from qwen2vl_jax.model import block_sparse_attention as bsa

    def cost(call: KernelCall) -> KernelCost | None:
        m = _BLOCK_SPARSE.search(call.name) or _BLOCK_SPARSE.search(call.op_name)
        if not m or len(call.operands) < 4:
            return None
        phase = m.group(1)
        B, Hq, T, D = call.operand_dims(2)
        S = call.operand_dims(3)[2]
        label = f"{m.group(0)} q{[B, Hq, T, D]} kv{S}"
        bq, bkv = bsa.block_sizes(T, S)
        warnings = []
        entries = math.prod(call.operand_dims(1))
        if entries != B * (T // bq) * (S // bkv):
            warnings.append(f"{label}: its visit list holds {entries} entries, not {B} x {T // bq} x {S // bkv} "
                            f"for the default blocks {bq} x {bkv}; counted with those blocks")
        layout = segments(call, T, S)
        if layout is None:          # a single segment over the row: every block pair
            layout = (np.ones(T, np.int32), np.ones(S, np.int32), False)
            warnings.append(f"{label}: no segment layout for this call, every block pair counted")
        q_seg, kv_seg, causal = layout
        visits = bsa.visited_flops(np.asarray(q_seg)[None], np.asarray(kv_seg)[None], causal=causal,
                                   num_q_heads=Hq, head_dim=D, block_q=bq, block_kv=bkv)
        pairs = B * int(visits.pairs[0])
        flops = B * float(getattr(visits, phase)[0])
        dtype = parse_shape(call.operands[2])[0].dtype
        hbm = sum(shape_bytes(s) for s in call.operands) + shape_bytes(call.result)
        hbm += pairs * Hq * 2 * (bkv if phase != "dkv" else bq) * D * DTYPE_BYTES[dtype]
        return KernelCost(flops, hbm, label=label, warning="; ".join(warnings), mxu_flops=lane_padded(flops, D))
    return cost


def _source(module: Module, name: str) -> Instr | None:
    """The instruction that defines the value `name` through copies (also async), tuples and loop-invariant
    while-loop state (a constant hoisted out of a scan reaches the body as a tuple element); None where
    the value varies with the iteration."""
    ins = module.instrs[name]
    for _ in range(64):
        if ins.opcode in _PASS + ("copy-start", "copy-done") and ins.operands:
            ins = module.instrs[ins.operands[0]]
            continue
        if ins.opcode != "get-tuple-element":
            return ins
        idx, src = int(ins.attr("index")), module.instrs[ins.operands[0]]
        if src.opcode == "tuple":
            ins = module.instrs[src.operands[idx]]
            continue
        if src.opcode == "parameter":            # inside a loop body: the loop's initial value
            loop = module.while_of.get(src.computation)
        else:                                    # a loop's result: its initial value if the loop keeps it
            loop = src if src.opcode == "while" else None
        if loop is None:
            return None
        root = module.roots[loop.called("body")[0]]
        if root.opcode != "tuple" or _tuple_index(module, root.operands[idx]) != idx:
            return None                          # the body changes this element
        init = _through(module, loop.operands[0])
        if init.opcode != "tuple":
            return None
        ins = module.instrs[init.operands[idx]]
    return None


def _literal(module: Module, name: str) -> np.ndarray | None:
    """Value of a compile-time constant operand (found by `_source`), else None."""
    ins = _source(module, name)
    if ins is not None and ins.opcode == "broadcast" and ins.operands:     # a uniform constant, e.g. all 2s
        scalar = _literal(module, ins.operands[0])
        if scalar is not None and scalar.size == 1:
            return np.full(parse_shape(ins.shape)[0].dims, scalar.item())
        return None
    if ins is None or ins.opcode != "constant":
        return None
    arr = parse_shape(ins.shape)
    nums = re.findall(r"-?\d+(?:\.\d*)?(?:e[-+]?\d+)?", ins.literal)
    if not arr or len(nums) != math.prod(arr[0].dims):
        return None                                # elided ({...}) or not numeric
    return np.array([float(x) for x in nums]).reshape(arr[0].dims)


def _kernel_call(module: Module, ins: Instr) -> KernelCall:
    meta = ins.attr("metadata") or ""
    op_name = re.search(r'op_name="([^"]*)"', meta)
    op_name = op_name.group(1) if op_name else ""
    target = (ins.attr("custom_call_target") or "").strip('"')
    kernel = next((p for p in reversed(op_name.split("/")) if p and p != "pallas_call"), ins.name)
    return KernelCall(name=ins.name if _SPLASH.search(ins.name) else kernel, target=target, op_name=op_name,
                      operands=tuple(module.instrs[o].shape for o in ins.operands), result=ins.shape,
                      constants=tuple(_literal(module, o) for o in ins.operands),
                      metadata=ins.attr("frontend_attributes") or "")


# ---------------------------------------------------------------------------------------------
# collectives

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _collective_kind(opcode: str) -> str | None:
    base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
    return base if base in COLLECTIVES or base == "ragged-all-to-all" else None


def group_size(ins: Instr, num_devices: int) -> int:
    """Devices per replica group (all of them when the groups are empty)."""
    if ins.opcode.startswith("collective-permute"):
        return 2
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", ins.attrs)     # [groups, size]<=[devices]
    if iota:
        return int(iota.group(2))
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", ins.attrs)
    if mesh:                                     # mesh['axis_0'=8,'axis_1'=4] {'axis_1'}: over the listed axes
        sizes = {a: int(n) for a, n in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        axes = re.findall(r"'([^']+)'", mesh.group(2))
        if axes and all(a in sizes for a in axes):
            return math.prod(sizes[a] for a in axes)
    g = ins.attr("replica_groups")
    if not g or g in ("{}", "{{}}"):
        return num_devices
    first = re.search(r"\{([0-9,]+)\}", g)
    return len(first.group(1).split(",")) if first else num_devices


def ring_bytes(kind: str, n: int, operand_bytes: float) -> float:
    """Bytes one device sends for a collective over n devices, ring algorithm (module docstring)."""
    if kind == "collective-permute":
        return operand_bytes
    if n <= 1:
        return 0.0
    if kind == "all-gather":
        return (n - 1) * operand_bytes
    if kind == "all-reduce":
        return 2 * (n - 1) / n * operand_bytes
    return (n - 1) / n * operand_bytes               # reduce-scatter, all-to-all


def _result_bytes(kind: str, n: int, operand_bytes: float) -> float:
    return {"all-gather": n * operand_bytes, "reduce-scatter": operand_bytes / max(n, 1)}.get(kind, operand_bytes)


# ---------------------------------------------------------------------------------------------
# the walk over the program

@dataclasses.dataclass
class Analysis:
    """Per device, per step (trip counts applied)."""
    num_devices: int
    matmul_flops: float = 0.0
    kernel_flops: dict = dataclasses.field(default_factory=lambda: defaultdict(float))   # label -> FLOPs
    kernel_calls: dict = dataclasses.field(default_factory=lambda: defaultdict(float))   # label -> calls
    kernel_mxu_flops: dict = dataclasses.field(default_factory=lambda: defaultdict(float))  # label -> lane-padded
    hbm_bytes: float = 0.0
    kernel_hbm_bytes: float = 0.0                              # the custom calls' share of hbm_bytes
    collectives: dict = dataclasses.field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0, 0.0]))
    estimated_cycles: float = 0.0
    matmul_op_flops: float = 0.0       # matmul FLOPs of the XLA ops that hold matmuls and carry estimated_cycles
    matmul_op_cycles: float = 0.0      # ... and those ops' estimated_cycles (their achieved fraction of peak)
    uncosted: dict = dataclasses.field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0, 0.0, 0.0]))
    ops: dict = dataclasses.field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0, 0.0, 0.0]))
    loops: list = dataclasses.field(default_factory=list)      # (while name, trips, multiplier)
    warnings: list = dataclasses.field(default_factory=list)

    # collectives: (kind, group size) -> [calls, operand bytes, ring bytes sent]
    # uncosted: XLA ops that block the step but carry no estimated_cycles (synchronous collectives, gather /
    #   scatter fusions, ...), per op: [matmul FLOPs, HBM bytes, ICI ring bytes sent, executions]
    # ops: op_name -> [FLOPs (matmul + kernel), HBM bytes, estimated cycles, calls]: the costliest-ops table

    @property
    def total_kernel_flops(self) -> float:
        return sum(self.kernel_flops.values())

    @property
    def total_kernel_mxu_flops(self) -> float:
        return sum(self.kernel_mxu_flops.values())

    @property
    def ici_bytes(self) -> float:
        return sum(v[2] for v in self.collectives.values())

    def add(self, other: "Analysis", times: float = 1.0) -> None:
        self.matmul_flops += times * other.matmul_flops
        self.hbm_bytes += times * other.hbm_bytes
        self.kernel_hbm_bytes += times * other.kernel_hbm_bytes
        self.estimated_cycles += times * other.estimated_cycles
        self.matmul_op_flops += times * other.matmul_op_flops
        self.matmul_op_cycles += times * other.matmul_op_cycles
        for k, v in other.kernel_flops.items():
            self.kernel_flops[k] += times * v
        for k, v in other.kernel_calls.items():
            self.kernel_calls[k] += times * v
        for k, v in other.kernel_mxu_flops.items():
            self.kernel_mxu_flops[k] += times * v
        for k, v in other.uncosted.items():
            acc = self.uncosted[k]
            for i in range(4):
                acc[i] += times * v[i]
        for k, v in other.collectives.items():
            acc = self.collectives[k]
            for i in range(3):
                acc[i] += times * v[i]
        for k, v in other.ops.items():
            acc = self.ops[k]
            for i in range(4):
                acc[i] += times * v[i]
        self.loops.extend(other.loops)
        self.warnings.extend(w for w in other.warnings if w not in self.warnings)


_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "copy-done", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain", "async-update", "async-done",
         "all-gather-done", "all-reduce-done", "collective-permute-done", "send-done", "recv-done"}
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
# Asynchronous starts whose transfer overlaps compute: no estimated_cycles, and no time charged for them in the
# compiler view (`Estimate.uncosted_s`); async collective fusions are recognised by `_is_async_collective`.
_ASYNC = {"copy-start", "all-gather-start", "all-reduce-start", "collective-permute-start", "send", "recv"}


def _is_async_collective(module: Module, ins: Instr) -> bool:
    """A fusion the compiler made for an asynchronous collective (async collective fusion: its start and done
    fusions hold the collective and overlap the compute between them)."""
    return ins.opcode == "fusion" and bool(_fused_collectives(module, ins.called("calls")[0]))


def _users(module: Module, comp: str) -> dict[str, list[Instr]]:
    if comp not in module.users:
        users = module.users[comp] = defaultdict(list)
        for i in module.computations[comp]:
            for o in i.operands:
                users[o].append(i)
    return module.users[comp]


def _params(module: Module, comp: str) -> dict[int, Instr]:
    return {int(i.literal): i for i in module.computations[comp] if i.opcode == "parameter"}


def _read_bytes(module: Module, comp: str, name: str, full: float) -> float:
    """Bytes the fused computation `comp` reads of its value `name` (a parameter or a bitcast of one): the
    slices when every reader slices it (also inside nested fusions), else `full`."""
    total = 0.0
    for u in _users(module, comp)[name]:
        if u.opcode == "bitcast":
            total += _read_bytes(module, comp, u.name, full)
        elif u.opcode in ("dynamic-slice", "slice") and u.operands[0] == name:
            total += shape_bytes(u.shape)
        elif u.opcode == "fusion":
            inner = u.called("calls")[0]
            params = _params(module, inner)
            total += sum(_read_bytes(module, inner, params[i].name, full) for i, o in enumerate(u.operands)
                         if o == name)
        else:
            return full
    return min(total, full)


def _fusion_hbm(module: Module, ins: Instr) -> float:
    """HBM bytes of a fusion: operands (sliced ones by their slices) + result (an in-place update by its update)."""
    comp = ins.called("calls")[0]
    params = _params(module, comp)
    root = module.roots[comp]
    outs = [module.instrs[o] for o in root.operands] if root.opcode == "tuple" else [root]
    in_place = {o.operands[0] for o in outs if o.opcode == "dynamic-update-slice"}
    total = 0.0
    for idx, name in enumerate(ins.operands):
        full = shape_bytes(module.instrs[name].shape, hbm_only=True)
        p = params.get(idx)
        if p is None or not full:
            total += full
        elif p.name not in in_place:
            total += _read_bytes(module, comp, p.name, full)
    results = parse_shape(ins.shape)
    for o, arr in zip(outs, [results] if len(outs) == 1 else [[a] for a in results]):
        if o.opcode == "dynamic-update-slice":
            total += shape_bytes(module.instrs[o.operands[1]].shape)
        else:
            total += sum(a.bytes for a in arr if a.memory_space == 0)
    return total


def _io_bytes(module: Module, ins: Instr) -> float:
    """HBM bytes of an op's operands and results."""
    return (sum(shape_bytes(module.instrs[o].shape, hbm_only=True) for o in ins.operands)
            + shape_bytes(ins.shape, hbm_only=True))


def _fused_collectives(module: Module, comp: str) -> list[Instr]:
    """Collectives inside a fused computation (and the fusions it calls)."""
    out = []
    for sub in module.computations[comp]:
        if _collective_kind(sub.opcode):
            out.append(sub)
        for c in sub.called("calls"):
            out.extend(_fused_collectives(module, c))
    return out


def _count_collective(module: Module, ins: Instr, out: "Analysis") -> float:
    """Adds the collective `ins` to out.collectives; returns its HBM bytes (operands + results)."""
    kind = _collective_kind(ins.opcode)
    n = group_size(ins, module.num_devices)
    b = sum(shape_bytes(module.instrs[o].shape) for o in ins.operands)
    acc = out.collectives[(kind, n)]
    acc[0] += 1
    acc[1] += b
    acc[2] += ring_bytes(kind, n, b)
    return b + _result_bytes(kind, n, b)


def _walk(module: Module, comp: str, kernel_costs: Sequence[KernelCostFn]) -> Analysis:
    out = Analysis(module.num_devices)
    channels = set()      # collectives run inside fusions, counted once per channel (module docstring)
    for ins in module.computations[comp]:
        op = ins.opcode
        if op in _FREE:
            continue
        if op == "while":
            trips = trip_count(module, ins)
            if trips is None:
                out.warnings.append(f"while %{ins.name}: trip count not readable, counted once")
                trips = 1
            inner = _walk(module, ins.called("body")[0], kernel_costs)
            out.loops.append((ins.name, trips))
            out.loops.extend((n, t) for n, t in inner.loops)
            inner.loops = []
            out.add(inner, trips)
            continue
        if op == "conditional":
            branches = [_walk(module, b, kernel_costs) for b in
                        (ins.called("branch_computations") or ins.called("true_computation")
                         + ins.called("false_computation"))]
            if branches:
                out.add(max(branches, key=lambda a: (a.matmul_flops + a.total_kernel_flops, a.hbm_bytes)))
            continue
        if op in ("call", "async-start") and ins.called("calls") and op != "fusion":
            out.add(_walk(module, ins.called("calls")[0], kernel_costs))
            continue
        meta = re.search(r'op_name="([^"]*)"', ins.attr("metadata") or "")
        key = meta.group(1) if meta else f"%{ins.name}"
        flops, kflops, hbm, ici = 0.0, 0.0, None, 0.0
        if _collective_kind(op):
            before = out.ici_bytes
            hbm = _count_collective(module, ins, out)
            ici = out.ici_bytes - before
        elif op == "fusion":
            flops = _fused_flops(module, ins.called("calls")[0])
            hbm = _fusion_hbm(module, ins)
            for sub in _fused_collectives(module, ins.called("calls")[0]):
                channel = sub.attr("channel_id") or sub.name
                if channel not in channels:
                    channels.add(channel)
                    _count_collective(module, sub, out)
        elif op == "convolution":
            flops = conv_flops(module, ins)
        elif op == "dot":
            flops = dot_flops(module, ins)
        elif op == "custom-call":
            call = _kernel_call(module, ins)
            cost = None
            for fn in list(kernel_costs) + [splash_cost]:
                cost = fn(call)
                if cost is not None:
                    break
            if cost is None and call.target == "tpu_custom_call":
                cost = KernelCost(0.0, label=f"{call.name} (unknown kernel: no FLOPs)",
                                  warning=f"kernel {call.name}: no KernelCostFn claims it, FLOPs not counted")
            if cost is not None:
                if cost.warning and cost.warning not in out.warnings:
                    out.warnings.append(cost.warning)
                label = cost.label or call.name
                out.kernel_flops[label] += cost.flops
                out.kernel_calls[label] += 1
                out.kernel_mxu_flops[label] += cost.flops if cost.mxu_flops is None else cost.mxu_flops
                kflops = cost.flops
                hbm = _io_bytes(module, ins) if cost.hbm_bytes is None else cost.hbm_bytes
                out.kernel_hbm_bytes += hbm
        elif op == "copy-start":
            parts = parse_shape(ins.shape)
            hbm = sum(shape_bytes(module.instrs[o].shape, hbm_only=True) for o in ins.operands)
            hbm += parts[0].bytes if parts and parts[0].memory_space == 0 else 0.0
        if hbm is None:
            hbm = _io_bytes(module, ins)
        cycles = _CYCLES.search(ins.attrs)
        if cycles is None and op not in _ASYNC and op != "custom-call" and not _is_async_collective(module, ins):
            acc = out.uncosted[key]
            acc[0] += flops
            acc[1] += hbm
            acc[2] += ici
            acc[3] += 1
        cycles = float(cycles.group(1)) if cycles else 0.0
        if flops and cycles:
            out.matmul_op_flops += flops
            out.matmul_op_cycles += cycles
        out.matmul_flops += flops
        out.hbm_bytes += hbm
        out.estimated_cycles += cycles
        acc = out.ops[key]
        acc[0] += flops + kflops
        acc[1] += hbm
        acc[2] += cycles
        acc[3] += 1
    return out


def analyze(text: str, kernel_costs: Iterable[KernelCostFn] = ()) -> Analysis:
    """Counts of the optimized HLO text `text` per device per step (module docstring)."""
    module = parse_module(text)
    return _walk(module, module.entry, tuple(kernel_costs))


def hlo_text(compiled) -> str:
    """Optimized HLO of a jax Compiled with large constants printed (block masks for `splash_cost`);
    `compiled.as_text()` where the executable does not expose its modules."""
    try:
        from jax._src.lib import hlo
        opts = hlo.HloPrintOptions()
        opts.print_large_constants = True
        return "\n\n".join(m.to_string(opts) for m in compiled.runtime_executable().hlo_modules())
    except (ImportError, AttributeError, NotImplementedError, TypeError):
        return compiled.as_text()


# ---------------------------------------------------------------------------------------------
# the estimate

def check_kernel_efficiency(fraction: float | None) -> None:
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"kernel_efficiency={fraction}; valid: 0 < fraction <= 1")


@dataclasses.dataclass(frozen=True)
class Estimate:
    analysis: Analysis
    chip: Chip
    useful_flops: float | None        # per device per step (flops.py), None if not given
    six_nd_flops: float | None        # per device per step
    kernel_efficiency: float | None = None   # kernels' fraction of MXU peak; None: `matmul_efficiency`

    def __post_init__(self):
        check_kernel_efficiency(self.kernel_efficiency)

    @property
    def flops(self) -> float:
        return self.analysis.matmul_flops + self.analysis.total_kernel_flops

    @property
    def compute_s(self) -> float:
        return self.flops / self.chip.peak_bf16_flops

    @property
    def hbm_s(self) -> float:
        return self.analysis.hbm_bytes / self.chip.hbm_bandwidth

    @property
    def ici_s(self) -> float:
        return self.analysis.ici_bytes / self.chip.ring_bandwidth

    @property
    def compiler_s(self) -> float:
        """The compiler's estimated_cycles of the XLA ops at the chip clock (kernels, collectives excluded)."""
        return self.analysis.estimated_cycles / self.chip.clock_hz

    @property
    def matmul_efficiency(self) -> float | None:
        """The fraction of MXU peak the compiler's own cycle model gives its matmul ops in this program: their
        matmul FLOPs / (their estimated_cycles at the clock x peak); None when no op holds both."""
        a = self.analysis
        if not a.matmul_op_flops or not a.matmul_op_cycles:
            return None
        return a.matmul_op_flops / (a.matmul_op_cycles / self.chip.clock_hz * self.chip.peak_bf16_flops)

    @property
    def kernel_fraction(self) -> float:
        """The fraction of MXU peak the kernels are costed at: `kernel_efficiency` if given, else the program's
        `matmul_efficiency` (1.0 when the program has no costed matmul)."""
        return self.kernel_efficiency or self.matmul_efficiency or 1.0

    @property
    def kernel_s(self) -> float:
        """Modelled time of the Pallas kernels: their lane-padded MXU FLOPs at `kernel_fraction` of peak."""
        return self.analysis.total_kernel_mxu_flops / (self.kernel_fraction * self.chip.peak_bf16_flops)

    @property
    def uncosted_s(self) -> float:
        """Ops that block the step but carry no estimated_cycles, each at its roofline time (the largest of its
        FLOPs at peak, its HBM bytes, its ICI ring bytes)."""
        c = self.chip
        return sum(max(f / c.peak_bf16_flops, b / c.hbm_bandwidth, i / c.ring_bandwidth)
                   for f, b, i, _ in self.analysis.uncosted.values())

    @property
    def compiler_view_s(self) -> float:
        """The step time in the compiler's own terms, THE estimate: its XLA-op cycles (x trip counts) + the ops
        it gives no cycles at their roofline time + the kernels' modelled time (`kernel_s`); no overlap
        between them (overlap the compiler schedules is inside its cycles: async collectives)."""
        return self.compiler_s + self.uncosted_s + self.kernel_s

    @property
    def terms(self) -> dict[str, float]:
        return {"compute": self.compute_s, "hbm": self.hbm_s, "ici": self.ici_s}

    @property
    def bound(self) -> str:
        return max(self.terms, key=self.terms.get)

    @property
    def step_s(self) -> float:
        return max(self.terms.values())

    @property
    def no_overlap_s(self) -> float:
        return sum(self.terms.values())

    def mfu(self, flops: float | None, seconds: float) -> float | None:
        if flops is None or seconds <= 0:
            return None
        return flops / seconds / self.chip.peak_bf16_flops


def estimate(program, chip: Chip, *, useful_flops: float | None = None, six_nd_flops: float | None = None,
             kernel_costs: Iterable[KernelCostFn] = (), num_devices: int | None = None,
             kernel_efficiency: float | None = None) -> Estimate:
    """Estimate of a compiled step. `program`: a jax Compiled or its HLO text (`hlo_text`).
    useful_flops / six_nd_flops: the model FLOPs of one step over ALL devices (flops.py); divided by the
    number of devices (the module's num_partitions x replica_count unless `num_devices` is given).
    kernel_efficiency: the kernels' fraction of MXU peak (default: the program's `matmul_efficiency`)."""
    text = program if isinstance(program, str) else hlo_text(program)
    an = analyze(text, kernel_costs)
    if num_devices is not None:
        an.num_devices = num_devices
    n = an.num_devices
    return Estimate(an, chip, None if useful_flops is None else useful_flops / n,
                    None if six_nd_flops is None else six_nd_flops / n, kernel_efficiency)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def last_line(est: Estimate) -> str:
    """`estimate (compiler view): <s> s/step, MFU <f> [upper bound (roofline): <s> s/step, MFU <f>, <term>-bound]`:
    THE estimate (the compiler view), then the roofline bound beside it. MFU against the useful FLOPs ("n/a"
    without them)."""
    def mfu(seconds):
        m = est.mfu(est.useful_flops, seconds)
        return "n/a" if m is None else f"{m:.3f}"
    return (f"estimate (compiler view): {est.compiler_view_s:.4g} s/step, MFU {mfu(est.compiler_view_s)} "
            f"[upper bound (roofline): {est.step_s:.4g} s/step, MFU {mfu(est.step_s)}, {est.bound}-bound]")


def format_estimate(est: Estimate, top: int = 8) -> str:
    """A table of the estimate: the roofline terms, then the compiler view; the last line is `last_line`."""
    a, c = est.analysis, est.chip
    peak = c.peak_bf16_flops
    w = 66
    rows = [f"estimate per device per step ({a.num_devices} devices, {c.name}: "
            f"{peak / 1e12:.0f} TFLOP/s bf16, HBM {c.hbm_bandwidth / 1e9:.0f} GB/s, "
            f"ICI ring {c.ring_bandwidth / 1e9:.0f} GB/s)",
            f"  {'roofline (upper bound: every FLOP at peak, overlap assumed)':<{w}} {'amount':>10} {'seconds':>9}",
            f"  {'matmul FLOPs (XLA convolutions and dots, x trip counts)':<{w}} {_fmt(a.matmul_flops):>10} "
            f"{a.matmul_flops / peak:9.3f}"]
    for label in sorted(a.kernel_flops, key=lambda k: -a.kernel_flops[k]):
        f = a.kernel_flops[label]
        rows.append(f"  {'kernel ' + label + f' x{a.kernel_calls[label]:.0f}':<{w}} {_fmt(f):>10} {f / peak:9.3f}")
    rows.append(f"  {'compute (all FLOPs at peak)':<{w}} {_fmt(est.flops):>10} {est.compute_s:9.3f}")
    rows.append(f"  {'HBM bytes (operands + results of each op)':<{w}} {_fmt(a.hbm_bytes):>10} {est.hbm_s:9.3f}")
    if a.kernel_hbm_bytes:
        rows.append(f"  {'  of which kernels (operands, results, streamed blocks)':<{w}} "
                    f"{_fmt(a.kernel_hbm_bytes):>10} {a.kernel_hbm_bytes / c.hbm_bandwidth:9.3f}")
    for (kind, n), (calls, b, sent) in sorted(a.collectives.items(), key=lambda kv: -kv[1][2]):
        rows.append(f"  {f'ICI {kind} over {n} x{calls:.0f} (buffer {_fmt(b)} B), ring bytes':<{w}} "
                    f"{_fmt(sent):>10} {sent / c.ring_bandwidth:9.3f}")
    rows.append(f"  {'ICI bytes sent (ring algorithm)':<{w}} {_fmt(a.ici_bytes):>10} {est.ici_s:9.3f}")
    rows.append(f"  {'roofline: max(compute, HBM, ICI) (' + est.bound + '-bound)':<{w}} {'':>10} {est.step_s:9.3f}")
    eff = est.matmul_efficiency
    source = ("given" if est.kernel_efficiency else "as its matmul ops" if eff else "peak: no costed matmul")
    rows += [f"  {'compiler view (THE estimate: the compiler cycle model, no overlap)':<{w}} {'':>10} {'':>9}",
             f"  {'XLA ops, compiler estimated_cycles at ' + f'{c.clock_hz / 1e9:.2f} GHz, x trip counts':<{w}} "
             f"{_fmt(a.estimated_cycles):>10} {est.compiler_s:9.3f}"]
    if eff:
        rows.append(f"  {f'  its matmul ops run at {eff:.3f} of peak (matmul FLOPs / their cycles)':<{w}} "
                    f"{_fmt(a.matmul_op_flops):>10} {a.matmul_op_cycles / c.clock_hz:9.3f}")
    rows.append(f"  {'ops without cycles at their roofline time (sync collectives, ...)':<{w}} "
                f"{sum(v[3] for v in a.uncosted.values()):>10.0f} {est.uncosted_s:9.3f}")
    if a.kernel_flops:
        rows.append(f"  {f'kernels: lane-padded MXU FLOPs at {est.kernel_fraction:.3f} of peak ({source})':<{w}} "
                    f"{_fmt(a.total_kernel_mxu_flops):>10} {est.kernel_s:9.3f}")
    rows.append(f"  {'compiler view: XLA op cycles + ops without cycles + kernels':<{w}} {'':>10} "
                f"{est.compiler_view_s:9.3f}")
    loops = ", ".join(f"%{n} x{t}" for n, t in a.loops[:12]) + (" ..." if len(a.loops) > 12 else "")
    rows.append(f"  loops: {loops or 'none'}")
    if top:
        rows.append("  costliest ops (by max of FLOP time and HBM time, x trip counts):")
        ranked = sorted(a.ops.items(), key=lambda kv: -max(kv[1][0] / peak, kv[1][1] / c.hbm_bandwidth))
        for name, (f, b, cyc, calls) in ranked[:top]:
            short = name if len(name) <= 70 else "..." + name[-67:]
            rows.append(f"    {short:<70} x{calls:<6.0f} {_fmt(f):>9} FLOP {_fmt(b):>9} B "
                        f"{max(f / peak, b / c.hbm_bandwidth):8.3f} s")
    for w in a.warnings:
        rows.append(f"  WARNING: {w}")
    for name, flops in (("useful FLOPs (flops.py)", est.useful_flops), ("6ND", est.six_nd_flops)):
        if flops is not None:
            rows.append(f"  MFU vs {name} {_fmt(flops)}: {est.mfu(flops, est.compiler_view_s):.3f} compiler view; "
                        f"{est.mfu(flops, est.step_s):.3f} roofline bound, "
                        f"{est.mfu(flops, est.no_overlap_s):.3f} roofline terms without overlap")
    rows.append(last_line(est))
    return "\n".join(rows)
