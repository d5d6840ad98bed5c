"""Block-sparse, segment-aware flash attention for TPU (Pallas): only the (query block, key block) pairs
whose segments can meet are visited.

`block_sparse_attention(q [B,T,Hq,D], k [B,S,Hkv,D], v [B,S,Hkv,D], q_segment_ids [B,T], kv_segment_ids [B,S],
causal)` follows model/attention.py's convention and masking rule: query t sees key s iff
q_seg[t] == kv_seg[s] != 0 and (not causal or s <= t); padded query rows (segment 0) return exact zeros;
GQA by query-head groups (query head h uses kv head h // (Hq // Hkv)).

Why: a packed row holds many short segments (1024-patch images in a 32,768-row vision batch, 2048-token
documents in a 16,384-token decoder row). jax's splash kernel skips a block only by its static mask, so
it computes every block pair of the row and masks by segment inside the block. Here the plan is built on
device from the segment ids:
  1. per block, the smallest and largest non-zero segment id (`block_ranges`);
  2. a (query block i, key block j) pair is visited iff both blocks hold a non-padding row, their id
     ranges intersect, and (causal) key block j starts at or before query block i ends (`block_meets`);
  3. the visited pairs become a list of grid steps, one packed int32 each (`visit_list`): query-major for
     the forward and dq kernels, key-major for the dk/dv kernel. A block with nothing to visit gets one
     step that computes nothing and writes zeros.
The list is scalar-prefetched into SMEM and the grid's last dimension is its length, a dynamic grid
bound (the largest count over the batch): a skipped pair costs no grid step at all, not just no compute.
A fixed grid over all pairs would pay the per-step overhead of every skipped pair, which for 1024-patch
images in a 32,768 row is ~32x the steps that compute. Rows shorter than the longest row in the batch run
padding steps that repeat the previous block indices, so the pipeline issues no new DMA for them.

Range intersection is exact for sorted ids (the packer numbers segments in order) and conservative
otherwise: any pair it visits is still masked element by element, so unsorted ids cost time, never
correctness.

Kernels (Pallas TPU; `interpret=True` runs them on CPU for tests):
  forward  grid (B * Hq, steps): online softmax in fp32 (running max m, sum l, accumulator); outputs o
           and the logsumexp residual. Rows that attend nothing (padding) end with l = 0 and write 0.
  dq       same list and grid: dq = scale * sum_j dS_ij K_j, dS = P * (dO V^T - di), di = rowsum(dO * O).
  dk/dv    key-major list, grid (2 * B * Hkv, steps, G): the G query heads of a kv head accumulate into
           one dk/dv block (logits computed transposed, [bkv, bq], as in splash); the list is split into
           two lists of interleaved kv blocks so a megacore chip's two TensorCores share the work even
           with one local row and one local kv head.
Wired through jax.custom_vjp; the backward rebuilds the lists from the segment ids (a few small jnp ops).
SMEM holds the prefetched list: B * (T / block_q) * (S / block_kv) int32 per kernel.

`visited_pairs` / `visited_flops` count the plan the kernels execute (both come from `block_meets`); the
step-time estimator uses them for the FLOPs of these custom calls, which XLA's cost analysis cannot see.

Block sizes: block_q must divide T and block_kv must divide S; on TPU both must be multiples of 128
(the segment-id tiles are lane-aligned). Default: the largest of BLOCK_CHOICES that divides the length.
A smaller block wastes fewer pairs where segments shorter than the block meet, but every visited pair is
one grid step of each kernel, and a Pallas TPU grid step has a fixed cost (~0.35 us: pipeline
bookkeeping, DMA issue and wait) whatever its size. `modelled_seconds` prices a block size on packed
rows: steps x STEP_OVERHEAD_S + the visited pairs' FLOPs (head_dim padded to 128 lanes) at one
TensorCore's bf16 peak; `choose_block` takes the cheapest, per layer (vision rows are not causal, decoder
rows are), from rows packed from the data (`python -m benchmarks.estimates --mix=MODEL` prints the
figures; set model.attention_block_vision / attention_block_decoder). On short causal documents no
block size reaches visited/useful near 1: a document inside one block still costs the whole block, of
which the causal triangle uses about half.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Block sizes, largest first: a length takes the largest that divides it (the registry's rows, multiples
# of 512, take 512). Smaller blocks waste fewer pairs at segment edges; larger ones amortise a grid step's
# fixed cost and fill the MXU. At 512 x 512, 1024-patch images visit 1.0x and 2048-token causal documents
# 1.25x their useful pairs (512 x 1024: 1.0x / 1.5x) when segments start on block edges.
BLOCK_CHOICES = (512, 256, 128)

# Matmuls per visited (query row, key row, head) pair, each 2 * head_dim FLOPs:
# forward QK^T, PV; dq QK^T, dO V^T, dS K; dk/dv QK^T, dO V^T, P^T dO, dS^T Q.
MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}

_LANES, _SUBLANES = 128, 8
_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)     # finite: exp(_MASK - _MASK) never makes a NaN
_NT = (((1,), (1,)), ((), ()))                       # a @ b.T
_NN = (((1,), (0,)), ((), ()))                       # a @ b

# One grid step = one int32: major block | minor block << 14 | run << 28 | first << 29 | last << 30.
# major is the block the kernel accumulates over (query block for fwd / dq, kv block for dk/dv).
_FIELD_BITS = 14
_MAX_BLOCKS = 1 << _FIELD_BITS
_FIELD = _MAX_BLOCKS - 1
_RUN, _FIRST, _LAST = 28, 29, 30


# ---------------------------------------------------------------------------------------------
# the plan (pure jnp, jit-able; shared by the kernels and the FLOP count)

def block_ranges(segment_ids, block: int):
    """segment_ids [B, L] -> (lo, hi, nonempty) [B, L // block]: min / max non-zero id per block."""
    seg = jnp.asarray(segment_ids, jnp.int32)
    B, L = seg.shape
    s = seg.reshape(B, L // block, block)
    real = s != 0
    info = jnp.iinfo(jnp.int32)
    lo = jnp.min(jnp.where(real, s, info.max), axis=-1)
    hi = jnp.max(jnp.where(real, s, info.min), axis=-1)
    return lo, hi, jnp.any(real, axis=-1)


def block_meets(q_segment_ids, kv_segment_ids, *, causal: bool, block_q: int, block_kv: int):
    """[B, T // block_q, S // block_kv] bool: the (query block, key block) pairs the kernels visit."""
    qlo, qhi, qreal = block_ranges(q_segment_ids, block_q)
    klo, khi, kreal = block_ranges(kv_segment_ids, block_kv)
    meets = (qreal[:, :, None] & kreal[:, None, :]
             & (qlo[:, :, None] <= khi[:, None, :]) & (klo[:, None, :] <= qhi[:, :, None]))
    if causal:
        nq, nkv = qlo.shape[1], klo.shape[1]
        q_end = (jnp.arange(nq) + 1) * block_q - 1
        kv_start = jnp.arange(nkv) * block_kv
        meets = meets & (kv_start[None, :] <= q_end[:, None])[None]
    return meets


class Visits(NamedTuple):
    """Per batch row: visited block pairs, and FLOPs per kernel (summed over query heads)."""
    pairs: jax.Array      # [B] int32
    fwd: jax.Array        # [B] float32
    dq: jax.Array
    dkv: jax.Array


def _plan_blocks(q_segment_ids, kv_segment_ids, block_q, block_kv) -> tuple[int, int]:
    """The given block sizes, else the kernels' defaults for these lengths (`default_block`)."""
    T, S = q_segment_ids.shape[-1], kv_segment_ids.shape[-1]
    return (default_block(T, "T") if block_q is None else block_q,
            default_block(S, "S") if block_kv is None else block_kv)


def visited_pairs(q_segment_ids, kv_segment_ids, *, causal: bool, block_q: int | None = None,
                  block_kv: int | None = None):
    """[B] int32: (query block, key block) pairs the kernels compute for these segment ids (block sizes:
    the given ones, else the kernels' defaults for these lengths)."""
    bq, bkv = _plan_blocks(q_segment_ids, kv_segment_ids, block_q, block_kv)
    meets = block_meets(q_segment_ids, kv_segment_ids, causal=causal, block_q=bq, block_kv=bkv)
    return jnp.sum(meets, axis=(1, 2), dtype=jnp.int32)


def visited_flops(q_segment_ids, kv_segment_ids, *, causal: bool, num_q_heads: int, head_dim: int,
                  block_q: int | None = None, block_kv: int | None = None) -> Visits:
    """Visited pairs and the matmul FLOPs each kernel spends on them (every visited block pair is
    computed in full: bq x bkv rows, masked or not)."""
    bq, bkv = _plan_blocks(q_segment_ids, kv_segment_ids, block_q, block_kv)
    pairs = visited_pairs(q_segment_ids, kv_segment_ids, causal=causal, block_q=bq, block_kv=bkv)
    per_pair = float(bq) * bkv * num_q_heads * 2 * head_dim
    f = pairs.astype(jnp.float32) * per_pair
    return Visits(pairs, *(f * MATMULS[k] for k in ("fwd", "dq", "dkv")))


# The block-size cost model (`modelled_seconds`): the fixed cost of one Pallas TPU grid step, and one
# TensorCore's bf16 MXU peak (v5p: 459 TFLOP/s per chip over 2 TensorCores; the kernels' leading grid
# dimension is split over them, so each step runs on one).
STEP_OVERHEAD_S = 0.35e-6
CORE_PEAK_FLOPS = 459e12 / 2


def modelled_seconds(segment_ids, *, causal: bool, block: int, head_dim: int) -> float:
    """Modelled seconds of the three kernels (forward, dq, dk/dv) per query head, summed over the rows of
    segment_ids [B, L] (self-attention, square blocks of `block`): every visited pair is one grid step
    of each kernel (dk/dv steps once per query head of its kv head group) costing STEP_OVERHEAD_S plus its
    matmul FLOPs (MATMULS, head_dim padded to 128 lanes) at CORE_PEAK_FLOPS. Softmax VPU work, HBM
    traffic and the compute-free filler / padding steps of `visit_list` are not modelled."""
    pairs = float(jnp.sum(visited_pairs(segment_ids, segment_ids, causal=causal, block_q=block, block_kv=block)))
    lanes = -(-head_dim // _LANES) * _LANES
    flops = pairs * block * block * 2 * lanes * sum(MATMULS.values())
    return pairs * len(MATMULS) * STEP_OVERHEAD_S + flops / CORE_PEAK_FLOPS


def choose_block(segment_ids, *, causal: bool, head_dim: int, choices=BLOCK_CHOICES) -> int:
    """The block size of `choices` dividing the rows' length with the least `modelled_seconds` on these
    packed rows [B, L] (ties: the larger block). Raises (one line) when none divides L."""
    L = segment_ids.shape[-1]
    fits = sorted((b for b in choices if L % b == 0), reverse=True)
    if not fits:
        raise ValueError(f"row length {L}: no block size in {tuple(choices)} divides it")
    return min(fits, key=lambda b: modelled_seconds(segment_ids, causal=causal, block=b, head_dim=head_dim))


def visit_list(meets):
    """meets [B, n_major, n_minor] bool -> (steps [B, n_major * n_minor] int32 packed, count [B] int32).

    Steps list, per row, every visited (major, minor) pair in (major, minor) order, plus one
    compute-free step for a major block that visits nothing (so its output block is written, as zeros).
    Entries past `count` repeat the last step's block indices with no flags (no compute, no DMA)."""
    B, na, nb = meets.shape
    if na > _MAX_BLOCKS or nb > _MAX_BLOCKS:
        raise ValueError(f"{na} x {nb} blocks; at most {_MAX_BLOCKS} blocks per axis: use larger blocks")
    visits = jnp.any(meets, axis=-1)                                               # [B, na]
    last_minor = jnp.where(visits, nb - 1 - jnp.argmax(meets[..., ::-1], axis=-1), 0)
    # an empty major block points at the minor block the step before it used: no new K/V (or Q) DMA
    prev_minor = jnp.pad(lax.cummax(last_minor, axis=1), ((0, 0), (1, 0)))[:, :-1]
    filler = ~visits[..., None] & (jnp.arange(nb) == prev_minor[..., None])
    need = (meets | filler).reshape(B, na * nb)
    count = jnp.sum(need, axis=1, dtype=jnp.int32)                                 # >= na
    order = jnp.argsort(~need, axis=1, stable=True)                                # needed steps first
    n = jnp.arange(na * nb)
    src = jnp.take_along_axis(order, jnp.minimum(n[None, :], count[:, None] - 1), axis=1)
    major, minor = src // nb, src % nb
    valid = n[None, :] < count[:, None]
    run = valid & jnp.take_along_axis(meets.reshape(B, na * nb), src, axis=1)
    prev_major = jnp.pad(major, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    next_major = jnp.pad(major, ((0, 0), (0, 1)), constant_values=-1)[:, 1:]
    first = valid & (major != prev_major)
    last = valid & ((major != next_major) | (n[None, :] == count[:, None] - 1))
    steps = (major | (minor << _FIELD_BITS) | (run.astype(jnp.int32) << _RUN)
             | (first.astype(jnp.int32) << _FIRST) | (last.astype(jnp.int32) << _LAST))
    return steps.astype(jnp.int32), count


def _major(e):
    return e & _FIELD


def _minor(e):
    return (e >> _FIELD_BITS) & _FIELD


def _flag(e, bit):
    return ((e >> bit) & 1) == 1


# ---------------------------------------------------------------------------------------------
# kernels

def _mask(q_ids, kv_ids, q_pos, kv_pos, causal: bool):
    """Element mask of one block pair; the arguments broadcast to the logits' shape."""
    m = (q_ids == kv_ids) & (q_ids != 0)
    if causal:
        m = m & (kv_pos <= q_pos)
    return m


def _fwd_kernel(steps_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr,
                *, heads, scale, causal, bq, bkv):
    e = steps_ref[lax.div(pl.program_id(0), heads), pl.program_id(1)]

    @pl.when(_flag(e, _FIRST))
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, _MASK, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(_flag(e, _RUN))
    def _run():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]                       # [bq,D], [bkv,D], [bkv,D]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale      # [bq, bkv]
        q_pos = _major(e) * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        kv_pos = _minor(e) * bkv + lax.broadcasted_iota(jnp.int32, (1, bkv), 1)
        mask = _mask(qseg_ref[:, :1], kvseg_ref[:1, :], q_pos, kv_pos, causal)
        s = jnp.where(mask, s, _MASK)
        m_prev = m_scr[...]                                                  # [bq, 128] lane-broadcast
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_next[:, :1]), 0.0)                # masked rows stay exactly 0
        alpha = jnp.exp(m_prev - m_next)
        m_scr[...] = m_next
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=-1, keepdims=True)
        pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
        acc_scr[...] = alpha[:, :1] * acc_scr[...] + pv

    @pl.when(_flag(e, _LAST))
    def _finish():
        l = l_scr[...]
        seen = l > 0                                                         # rows that attended something
        inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
        o_ref[...] = (acc_scr[...] * inv[:, :1]).astype(o_ref.dtype)
        lse = jnp.where(seen, m_scr[...] + jnp.log(jnp.where(seen, l, 1.0)), 0.0)  # [bq, 128]
        lse_ref[...] = lse.T[:_SUBLANES, :]                                  # [8, bq], lane-major


def _dq_kernel(steps_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, lse_ref, di_ref, do_ref, dq_ref, dq_scr,
               *, heads, scale, causal, bq, bkv):
    e = steps_ref[lax.div(pl.program_id(0), heads), pl.program_id(1)]

    @pl.when(_flag(e, _FIRST))
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(_flag(e, _RUN))
    def _run():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale      # [bq, bkv]
        q_pos = _major(e) * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        kv_pos = _minor(e) * bkv + lax.broadcasted_iota(jnp.int32, (1, bkv), 1)
        mask = _mask(qseg_ref[:, :1], kvseg_ref[:1, :], q_pos, kv_pos, causal)
        lse = lse_ref[0][:, None]                                            # [bq, 1]
        di = di_ref[0][:, None]
        p = jnp.where(mask, jnp.exp(s - lse), 0.0)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)           # [bq, bkv]
        ds = p * (dp - di)
        dq_scr[...] += lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32)

    @pl.when(_flag(e, _LAST))
    def _finish():
        dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(steps_ref, q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, lse_ref, di_ref, do_ref, dk_ref, dv_ref,
                dk_scr, dv_scr, *, heads, scale, causal, bq, bkv, groups):
    e = steps_ref[lax.div(pl.program_id(0), heads), pl.program_id(1)]
    g = pl.program_id(2)

    @pl.when(_flag(e, _FIRST) & (g == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(_flag(e, _RUN))
    def _run():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        st = lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32) * scale     # [bkv, bq]
        kv_pos = _major(e) * bkv + lax.broadcasted_iota(jnp.int32, (bkv, 1), 0)
        q_pos = _minor(e) * bq + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
        mask = _mask(qseg_ref[:1, :], kvseg_ref[:, :1], q_pos, kv_pos, causal)
        pt = jnp.where(mask, jnp.exp(st - lse_ref[:1, :]), 0.0)                          # P^T
        dv_scr[...] += lax.dot_general(pt.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32)
        dpt = lax.dot_general(v, do, _NT, preferred_element_type=jnp.float32)           # [bkv, bq]
        dst = pt * (dpt - di_ref[:1, :])
        dk_scr[...] += lax.dot_general(dst.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32)

    @pl.when(_flag(e, _LAST) & (g == groups - 1))
    def _finish():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers; arrays head-major: q [B,Hq,T,D], k/v [B,Hkv,S,D]

class _Cfg(NamedTuple):
    causal: bool
    scale: float
    block_q: int
    block_kv: int
    interpret: bool


def _seg_layouts(q_seg, kv_seg):
    """Segment ids in the tile layouts the kernels read: a column per row (ids down the sublanes,
    broadcast over 128 lanes) and a row (ids along the lanes, broadcast over 8 sublanes)."""
    B, T = q_seg.shape
    S = kv_seg.shape[1]
    return dict(q_col=lax.broadcast_in_dim(q_seg, (B, T, _LANES), (0, 1)),
                q_row=lax.broadcast_in_dim(q_seg, (B, _SUBLANES, T), (0, 2)),
                kv_col=lax.broadcast_in_dim(kv_seg, (B, S, _LANES), (0, 1)),
                kv_row=lax.broadcast_in_dim(kv_seg, (B, _SUBLANES, S), (0, 2)))


# Mosaic splits the leading parallel grid dimension over a megacore chip's two TensorCores, so it should
# stay >= 2: fwd / dq lead with B * Hq; dk/dv with parts * B * Hkv, its list split into parts of
# interleaved kv blocks (block j in part j % parts), as one row and one kv head may be local (a 2B or 72B
# decoder with its kv heads split or sliced by tensor parallelism).
_DKV_PARTS = 2


# Index maps and kernels divide with lax.div / lax.rem (truncating; every operand is >= 0): Python's `//`
# lowers through sign(), whose Mosaic rule asks for the device kind, which AOT compiles on a CPU host lack.

def _fwd_maps(Hq, G):
    """Index maps of the query-major grid (x = b * Hq + h, n): the step's row b, query head h, kv head h // G."""
    def at(x, n, s):
        return lax.div(x, Hq), lax.rem(x, Hq), s[lax.div(x, Hq), n]

    def q(x, n, s):
        b, h, e = at(x, n, s)
        return b, h, _major(e), 0

    def kv(x, n, s):
        b, h, e = at(x, n, s)
        return b, lax.div(h, G), _minor(e), 0

    def q_row(x, n, s):                   # [B, Hq, rows, T] per-query-row residuals
        b, h, e = at(x, n, s)
        return b, h, 0, _major(e)

    def q_col_seg(x, n, s):
        b, _, e = at(x, n, s)
        return b, _major(e), 0

    def kv_row_seg(x, n, s):
        b, _, e = at(x, n, s)
        return b, 0, _minor(e)

    return q, kv, q_row, q_col_seg, kv_row_seg


def _fwd_call(cfg: _Cfg, steps, n_steps, q, k, v, segs):
    B, Hq, T, D = q.shape
    bq, bkv = cfg.block_q, cfg.block_kv
    q_map, kv_map, row_map, qseg_map, kvseg_map = _fwd_maps(Hq, Hq // k.shape[1])
    kernel = functools.partial(_fwd_kernel, heads=Hq, scale=cfg.scale, causal=cfg.causal, bq=bq, bkv=bkv)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B * Hq, n_steps),
            in_specs=[pl.BlockSpec((None, None, bq, D), q_map), pl.BlockSpec((None, None, bkv, D), kv_map),
                      pl.BlockSpec((None, None, bkv, D), kv_map), pl.BlockSpec((None, bq, _LANES), qseg_map),
                      pl.BlockSpec((None, _SUBLANES, bkv), kvseg_map)],
            out_specs=[pl.BlockSpec((None, None, bq, D), q_map),
                       pl.BlockSpec((None, None, _SUBLANES, bq), row_map)],
            scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32), pltpu.VMEM((bq, _LANES), jnp.float32),
                            pltpu.VMEM((bq, D), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, Hq, _SUBLANES, T), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=cfg.interpret, name="block_sparse_fwd",
    )(steps, q, k, v, segs["q_col"], segs["kv_row"])
    return o, lse[:, :, 0, :]                                                # lse [B, Hq, T]


def _dq_call(cfg: _Cfg, steps, n_steps, q, k, v, segs, lse, di, do):
    B, Hq, T, D = q.shape
    bq, bkv = cfg.block_q, cfg.block_kv
    q_map, kv_map, row_map, qseg_map, kvseg_map = _fwd_maps(Hq, Hq // k.shape[1])
    kernel = functools.partial(_dq_kernel, heads=Hq, scale=cfg.scale, causal=cfg.causal, bq=bq, bkv=bkv)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B * Hq, n_steps),
            in_specs=[pl.BlockSpec((None, None, bq, D), q_map), pl.BlockSpec((None, None, bkv, D), kv_map),
                      pl.BlockSpec((None, None, bkv, D), kv_map), pl.BlockSpec((None, bq, _LANES), qseg_map),
                      pl.BlockSpec((None, _SUBLANES, bkv), kvseg_map), pl.BlockSpec((None, None, 1, bq), row_map),
                      pl.BlockSpec((None, None, 1, bq), row_map), pl.BlockSpec((None, None, bq, D), q_map)],
            out_specs=pl.BlockSpec((None, None, bq, D), q_map),
            scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=cfg.interpret, name="block_sparse_dq",
    )(steps, q, k, v, segs["q_col"], segs["kv_row"], lse[:, :, None, :], di[:, :, None, :], do)


def _dkv_call(cfg: _Cfg, steps, n_steps, q, k, v, segs, lse, di, do):
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    bq, bkv = cfg.block_q, cfg.block_kv

    def at(x, n, s):                      # x = (part * B + b) * Hkv + kv head
        return lax.rem(lax.div(x, Hkv), B), lax.rem(x, Hkv), s[lax.div(x, Hkv), n]

    def q_map(x, n, g, s):
        b, h, e = at(x, n, s)
        return b, h * G + g, _minor(e), 0

    def kv_map(x, n, g, s):
        b, h, e = at(x, n, s)
        return b, h, _major(e), 0

    def row_map(x, n, g, s):
        b, h, e = at(x, n, s)
        return b, h * G + g, 0, _minor(e)

    def qseg_map(x, n, g, s):
        b, _, e = at(x, n, s)
        return b, 0, _minor(e)

    def kvseg_map(x, n, g, s):
        b, _, e = at(x, n, s)
        return b, _major(e), 0

    rows = (B, Hq, _SUBLANES, T)
    kernel = functools.partial(_dkv_kernel, heads=Hkv, scale=cfg.scale, causal=cfg.causal, bq=bq, bkv=bkv,
                               groups=G)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(steps.shape[0] * Hkv, n_steps, G),
            in_specs=[pl.BlockSpec((None, None, bq, D), q_map), pl.BlockSpec((None, None, bkv, D), kv_map),
                      pl.BlockSpec((None, None, bkv, D), kv_map), pl.BlockSpec((None, _SUBLANES, bq), qseg_map),
                      pl.BlockSpec((None, bkv, _LANES), kvseg_map), pl.BlockSpec((None, None, _SUBLANES, bq), row_map),
                      pl.BlockSpec((None, None, _SUBLANES, bq), row_map), pl.BlockSpec((None, None, bq, D), q_map)],
            out_specs=[pl.BlockSpec((None, None, bkv, D), kv_map), pl.BlockSpec((None, None, bkv, D), kv_map)],
            scratch_shapes=[pltpu.VMEM((bkv, D), jnp.float32), pltpu.VMEM((bkv, D), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=cfg.interpret, name="block_sparse_dkv",
    )(steps, q, k, v, segs["q_row"], segs["kv_col"],
      jnp.broadcast_to(lse[:, :, None, :], rows), jnp.broadcast_to(di[:, :, None, :], rows), do)


def _plan(cfg: _Cfg, q_seg, kv_seg, major: str):
    """(steps [rows, n] int32, n_steps scalar): the query-major list (rows = B) or the key-major list
    split into _DKV_PARTS interleaved parts (rows = parts * B, part-major) when the kv blocks divide."""
    meets = block_meets(q_seg, kv_seg, causal=cfg.causal, block_q=cfg.block_q, block_kv=cfg.block_kv)
    if major == "q":
        steps, count = visit_list(meets)
        return steps, jnp.max(count)
    meets = jnp.swapaxes(meets, 1, 2)                                        # [B, nkv, nq]
    B, nkv, nq = meets.shape
    P = _DKV_PARTS if nkv % _DKV_PARTS == 0 else 1
    parts = meets.reshape(B, nkv // P, P, nq).transpose(2, 0, 1, 3).reshape(P * B, nkv // P, nq)
    steps, count = visit_list(parts)
    part = (jnp.arange(P * B, dtype=jnp.int32) // B)[:, None]
    steps = steps + (P - 1) * _major(steps) + part                           # local kv block l -> l * P + part
    return steps, jnp.max(count)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(cfg: _Cfg, q, k, v, q_seg, kv_seg):
    return _attend_fwd(cfg, q, k, v, q_seg, kv_seg)[0]


def _attend_fwd(cfg, q, k, v, q_seg, kv_seg):
    segs = _seg_layouts(q_seg, kv_seg)
    steps, n = _plan(cfg, q_seg, kv_seg, "q")
    o, lse = _fwd_call(cfg, steps, n, q, k, v, segs)
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _attend_bwd(cfg, res, do):
    q, k, v, q_seg, kv_seg, o, lse = res
    segs = _seg_layouts(q_seg, kv_seg)
    di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)      # [B, Hq, T]
    q_steps, q_n = _plan(cfg, q_seg, kv_seg, "q")
    kv_steps, kv_n = _plan(cfg, q_seg, kv_seg, "kv")
    dq = _dq_call(cfg, q_steps, q_n, q, k, v, segs, lse, di, do)
    dk, dv = _dkv_call(cfg, kv_steps, kv_n, q, k, v, segs, lse, di, do)
    return dq, dk, dv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


# ---------------------------------------------------------------------------------------------
# public entry point

def default_block(length: int, length_name: str = "length", interpret: bool = False) -> int:
    """The largest of BLOCK_CHOICES that divides `length`. In interpret mode (CPU tests, no TPU tiling)
    a length none divides is one block. Raises (one line) otherwise."""
    for block in BLOCK_CHOICES:
        if length % block == 0:
            return block
    if interpret:
        return length
    raise ValueError(f"{length_name}={length}: no block size in {BLOCK_CHOICES} divides it; the TPU attention "
                     f"kernels need sequence lengths that are multiples of {BLOCK_CHOICES[-1]}")


def _block(name: str, given: int | None, length_name: str, length: int, interpret: bool) -> int:
    block = default_block(length, length_name, interpret) if given is None else given
    if block <= 0 or length % block:
        raise ValueError(f"{name}={block} must divide {length_name}={length}; pass a {name} that divides it")
    if not interpret and block % _LANES:
        raise ValueError(f"{name}={block} must be a multiple of {_LANES} on TPU (segment-id tiles are "
                         f"lane-aligned); valid: multiples of {_LANES} dividing {length_name}={length}")
    return block


def block_sizes(T: int, S: int, block_q: int | None = None, block_kv: int | None = None,
                interpret: bool = False) -> tuple[int, int]:
    """(block_q, block_kv) the kernels use for lengths T, S: the given sizes, else `default_block`.
    Raises (one line) when a size does not divide its length or is not TPU-tileable."""
    return (_block("block_q", block_q, "T", T, interpret), _block("block_kv", block_kv, "S", S, interpret))


def block_sparse_attention(q, k, v, *, q_segment_ids, kv_segment_ids, causal: bool, scale: float | None = None,
                           block_q: int | None = None, block_kv: int | None = None, interpret: bool = False,
                           heads_major: bool = False):
    """Masked attention visiting only the block pairs whose segments meet (module docstring).

    q [B,T,Hq,D], k/v [B,S,Hkv,D], segment ids [B,T] / [B,S] int (0 = padding) -> [B,T,Hq,D] in q.dtype.
    heads_major: q [B,Hq,T,D], k/v [B,Hkv,S,D] -> [B,Hq,T,D], the kernels' own layout (no transposes:
    a caller that projects straight to it saves a transpose in and out of every kernel, forward and
    backward). Differentiable in q, k, v (Pallas backward). block_q / block_kv: None = the largest of
    BLOCK_CHOICES dividing T / S (`block_sizes`). interpret: run the kernels in Pallas interpret mode (CPU)."""
    order = "[B,H,T,D]" if heads_major else "[B,T,H,D]"
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q, k and v {order} (k and v alike); got {q.shape}, {k.shape}, {v.shape}")
    if not heads_major:
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or Hq % Hkv:
        raise ValueError(f"q {q.shape} and k {k.shape}: batch and head_dim must match and kv heads divide "
                         f"query heads")
    q_seg = jnp.asarray(q_segment_ids, jnp.int32)
    kv_seg = jnp.asarray(kv_segment_ids, jnp.int32)
    if q_seg.shape != (B, T) or kv_seg.shape != (B, S):
        raise ValueError(f"segment ids {q_seg.shape}, {kv_seg.shape}; expected {(B, T)}, {(B, S)}")
    bq, bkv = block_sizes(T, S, block_q, block_kv, interpret)
    cfg = _Cfg(bool(causal), float(D) ** -0.5 if scale is None else float(scale), bq, bkv, bool(interpret))
    out = _attend(cfg, q, k, v, q_seg, kv_seg)
    return out if heads_major else out.transpose(0, 2, 1, 3)
