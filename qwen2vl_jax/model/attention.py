"""Dot-product attention with segment ids, GQA and a KV-cache offset; one function, several backends.

`attention(q [B,T,Hq,D], k [B,S,Hkv,D], v [B,S,Hkv,D], q_segment_ids [B,T], kv_segment_ids [B,S], ...)`

Masking rule (every backend implements exactly this):
  query t may attend key s  iff  q_seg[t] != 0  and  q_seg[t] == kv_seg[s]
                                  and (not causal or s <= t + q_offset)
Segment id 0 is padding: padded keys are never attended and padded query rows return exact zeros.
`q_offset` ([B] or scalar int) is the index of query 0 inside the key sequence (a KV cache whose slot i
holds token i); it is 0 for self-attention over the same sequence.

Backends:
  xla    einsum + fp32 softmax, GQA by grouping the query heads ([B,T,Hkv,G,D]); no K/V repeat.
  cudnn  cuDNN flash attention (bf16/fp16 only). Packed self-attention with `max_segments` (the vision
         tower: one contiguous run per image) -> cuDNN's packed layout, segment offsets and lengths
         computed on device (`packed_layout`; Hopper or later, else the masked form with a warning);
         `single_segment=True` (each row one sample followed by right padding) -> query/key lengths
         (cheap padding mask); otherwise an explicit boolean [B,1,T,S] mask (the slowest form, the last
         resort). Through `jax.nn.dot_product_attention(implementation="cudnn")`, except the packed
         layout, which only jax's private cuDNN module exposes.
  block_sparse  Pallas TPU kernel (model/block_sparse_attention.py) that visits only the (query block,
         key block) pairs whose segment-id ranges meet (and, causal, that are not above the diagonal):
         a packed row of many images or documents costs the pairs inside its segments, not the whole
         row squared. Forward and backward kernels; block sizes `block` (model.attention_block_vision /
         attention_block_decoder), else the largest of (512, 256, 128) dividing each length.
  splash jax's Pallas TPU splash kernel with SegmentIds: computes every block pair of the row (it
         skips blocks by its static causal mask only) and masks by segment inside them.
         Both Pallas kernels: on TPU, sequence lengths must be multiples of 128 (else a one-line
         error). They run in Pallas interpret mode (slow; for tests) when the mesh in context has CPU
         devices (`interpret=None`), so a model configured for them also runs on a CPU mesh; with no
         mesh in context they are compiled for TPU. A Mosaic kernel cannot be partitioned by XLA, so
         when a multi-device mesh is in context while tracing (`partitioning.activation_sharding(mesh)`
         inside the jitted function, or `jax.set_mesh(mesh)` around the trace) the kernel runs under
         `shard_map`, its specs from partitioning's resolver and active rules: batch (and segment ids)
         over the mesh axes of "batch", query heads over "act_heads", kv heads over "act_kv_heads";
         sequences whole. When the kv heads do not divide like the query heads (2B: 2 kv heads,
         tensor=4), k/v stay replicated over the head axes and each shard slices the kv heads its query
         heads use. Mosaic rejects 16-bit operands under a global
         jax_default_matmul_precision="highest" (fp32 contract precision: "Bad lhs type"); leave it
         at the default for bf16 TPU runs.
  auto   on the target platform (the context mesh's devices, else jax's default backend: an AOT
         compile for TPU on a CPU host resolves for TPU): cudnn on GPU with 16-bit inputs;
         block_sparse on TPU when T and S are multiples of 128, else xla; xla elsewhere.
The KV-cache path (q_offset given) always uses xla: a decode step is memory-bound and the kernels'
causal masks are top-left aligned.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwen2vl_jax.model import partitioning
from qwen2vl_jax.model.block_sparse_attention import BLOCK_CHOICES, block_sizes, block_sparse_attention
from qwen2vl_jax.model.config import ATTENTION_IMPLS


def make_mask(q_segment_ids, kv_segment_ids, *, causal: bool, q_offset=None):
    """Boolean [B, T, S] mask of the rule in the module docstring."""
    q_seg = jnp.asarray(q_segment_ids)
    kv_seg = jnp.asarray(kv_segment_ids)
    mask = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    if causal:
        t = jnp.arange(q_seg.shape[1])[None, :, None]
        s = jnp.arange(kv_seg.shape[1])[None, None, :]
        off = 0 if q_offset is None else jnp.reshape(jnp.asarray(q_offset, jnp.int32), (-1, 1, 1))
        mask = mask & (s <= t + off)
    return mask


def _check(q, k, v, q_segment_ids, kv_segment_ids, heads_major: bool):
    order = "[B,Hq,T,D], k and v [B,Hkv,S,D]" if heads_major else "[B,T,Hq,D], k and v [B,S,Hkv,D]"
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q {order}; got {q.shape}, {k.shape}, {v.shape}")
    h, t = (1, 2) if heads_major else (2, 1)
    B, T, Hq, D = q.shape[0], q.shape[t], q.shape[h], q.shape[3]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if Hq % k.shape[h]:
        raise ValueError(f"query heads {Hq} not a multiple of kv heads {k.shape[h]}")
    if q_segment_ids.shape != (B, T):
        raise ValueError(f"q_segment_ids shape {q_segment_ids.shape} != (B, T) = {(B, T)}")
    if kv_segment_ids.shape != (B, k.shape[t]):
        raise ValueError(f"kv_segment_ids shape {kv_segment_ids.shape} != (B, S) = {(B, k.shape[t])}")


def _swap_heads(x):
    """[B,T,H,D] <-> [B,H,T,D]."""
    return x.transpose(0, 2, 1, 3)


def _xla(q, k, v, mask, scale, heads_major: bool = False):
    """q [B,T,Hq,D], k/v [B,S,Hkv,D], mask [B,T,S] bool -> [B,T,Hq,D] (heads_major: [B,H,T,D] in and out)."""
    if heads_major:
        B, Hq, T, D = q.shape
        Hkv = k.shape[1]
        qg, lhs, out_eq = q.reshape(B, Hkv, Hq // Hkv, T, D), "bkgtd,bksd->bkgts", "bkgts,bksd->bkgtd"
    else:
        B, T, Hq, D = q.shape
        Hkv = k.shape[2]
        qg, lhs, out_eq = q.reshape(B, T, Hkv, Hq // Hkv, D), "btkgd,bskd->bkgts", "bkgts,bskd->btkgd"
    logits = jnp.einsum(lhs, qg, k, preferred_element_type=jnp.float32) * scale
    m = mask[:, None, None, :, :]
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(m, probs, 0.0).astype(v.dtype)          # fully masked rows -> exact zeros
    out = jnp.einsum(out_eq, probs, v, preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(q.dtype)


def packed_layout(segment_ids, max_segments: int):
    """cuDNN's packed ("ragged") description of self-attention rows whose segments are contiguous runs.

    segment_ids [B, L] int (0 = padding; each non-zero id one contiguous run, as the packer writes them)
    -> seqlens [B, M] int32 (length of the m-th run of row b, -1 past the row's last run),
       offsets [B, M + 1] int32 (its first position, -1 past the last run),
       overflow [B] bool (the row has more than M = max_segments runs: the layout is incomplete).
    The format of jax's cuDNN fused attention (`q_seqlen` / `q_offsets` of
    jax._src.cudnn.fused_attention_stablehlo.dot_product_attention): each run attends only to itself."""
    seg = jnp.asarray(segment_ids, jnp.int32)
    B, L = seg.shape
    M = max_segments
    prev = jnp.pad(seg, ((0, 0), (1, 0)))[:, :-1]
    start = (seg != 0) & (seg != prev)                                # first position of each run
    run = jnp.cumsum(start, axis=1, dtype=jnp.int32) - 1              # run index (of the last run started)
    count = jnp.sum(start, axis=1, dtype=jnp.int32)                   # [B]
    rows = jnp.arange(B)[:, None]
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    offsets = jnp.full((B, M + 1), -1, jnp.int32).at[rows, jnp.where(start, run, M + 1)].set(pos, mode="drop")
    lengths = jnp.zeros((B, M), jnp.int32).at[rows, jnp.where(seg != 0, run, M)].add(1, mode="drop")
    seqlens = jnp.where(jnp.arange(M) < count[:, None], lengths, -1)
    return seqlens, offsets.at[:, M].set(-1), count > M


def _cudnn_packed(q, k, v, seg, causal, scale, max_segments):
    """cuDNN flash attention on the packed layout: each segment attends within itself, no [T, S] mask.
    Runs only on a GPU (Hopper or later, cuDNN >= 9.6), which the test machines do not have: what is
    tested on CPU is `packed_layout` (against the mask it must equal); this call itself is not.
    The packed layout is not in jax.nn.dot_product_attention's public API, hence the private module."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    seqlens, offsets, overflow = packed_layout(seg, max_segments)
    out = fused.dot_product_attention(q, k, v, q_seqlen=seqlens, kv_seqlen=seqlens, q_offsets=offsets,
                                      kv_offsets=offsets, scale=scale,
                                      mask_type=fused.MaskType.CAUSAL if causal else fused.MaskType.NO_MASK)
    # more runs than promised: the layout misses some, so NaN (the train step skips a non-finite step)
    return jnp.where(overflow[:, None, None, None], jnp.nan, out)


def _cudnn(q, k, v, q_seg, kv_seg, causal, scale, single_segment, max_segments):
    if max_segments is not None:
        try:
            out = _cudnn_packed(q, k, v, q_seg, causal, scale, max_segments)
            return jnp.where((q_seg != 0)[:, :, None, None], out, 0).astype(q.dtype)
        except NotImplementedError as e:        # raised at trace time: GPU before Hopper, old cuDNN
            warnings.warn(f"cuDNN packed attention unavailable ({e}); using the masked form", stacklevel=3)
    if single_segment:
        q_len = jnp.sum(q_seg != 0, axis=1).astype(jnp.int32)
        kv_len = jnp.sum(kv_seg != 0, axis=1).astype(jnp.int32)
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, query_seq_lengths=q_len,
                                           key_value_seq_lengths=kv_len, implementation="cudnn")
    else:
        mask = make_mask(q_seg, kv_seg, causal=False)[:, None]           # [B,1,T,S]; causal via the kernel
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                           implementation="cudnn")
    return jnp.where((q_seg != 0)[:, :, None, None], out, 0).astype(q.dtype)


# Not cached: the kernel holds its mask-info arrays, which become tracers when it is built inside a
# transformation (remat, scan); a cached kernel reused by a later trace leaks them. Building it is
# host-side numpy work at trace time.
def _splash_kernel(T: int, S: int, groups: int, causal: bool, interpret: bool, block: int | None):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    base = sa.CausalMask((T, S)) if causal else sa.FullMask((T, S))
    mask = sa.MultiHeadMask([base] * groups)
    bq, bkv = block_sizes(T, S, block, block)
    blocks = sa.BlockSizes(block_q=bq, block_kv_compute=bkv, block_kv=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                           block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    return sa.make_splash_mqa_single_device(mask=mask, block_sizes=blocks, interpret=interpret)


def _splash_local(q, k, v, q_seg, kv_seg, causal, scale, interpret, block, heads_major):
    """Splash on one device's arrays. q [B,T,Hq,D], k/v [B,S,Hkv,D] -> [B,T,Hq,D] (heads_major: [B,H,T,D])."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if not heads_major:
        return _swap_heads(_splash_local(*map(_swap_heads, (q, k, v)), q_seg, kv_seg, causal, scale, interpret,
                                         block, True))
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kernel = _splash_kernel(T, S, G, causal, interpret, block)
    qh = (q * scale).astype(q.dtype).reshape(B, Hkv, G, T, D)
    kh, vh = k, v                                                                       # [B,Hkv,S,D]

    def one(qb, kb, vb, qs, ks):  # qb [G,T,D], kb/vb [S,D]
        return kernel(qb, kb, vb, segment_ids=sa.SegmentIds(q=qs, kv=ks))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))                 # over kv heads
    out = jax.vmap(per_head)(qh, kh, vh, q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32))  # [B,Hkv,G,T,D]
    out = out.reshape(B, Hq, T, D)
    return jnp.where((q_seg != 0)[:, None, :, None], out, 0).astype(q.dtype)


def _block_sparse_local(q, k, v, q_seg, kv_seg, causal, scale, interpret, block, heads_major):
    """The block-sparse kernel on one device's arrays (block sizes: block_sparse_attention.block_sizes)."""
    return block_sparse_attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=causal,
                                  scale=scale, block_q=block, block_kv=block, interpret=interpret,
                                  heads_major=heads_major)


KERNELS = {"splash": _splash_local, "block_sparse": _block_sparse_local}


def shard_map(f, mesh, in_specs, out_specs):
    """`jax.shard_map` (jax >= 0.7) or `jax.experimental.shard_map.shard_map` (older), replication
    checks off (the Pallas call has no replication rule)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy  # pragma: no cover - old jax
    return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def mesh_context(mesh):
    """partitioning.activation_sharding(mesh): kept for the callers that still enter it by this name."""
    return partitioning.activation_sharding(mesh)


def _kernel(impl, q, k, v, q_seg, kv_seg, causal, scale, interpret, block, heads_major):
    """A Pallas kernel (KERNELS[impl]) over the active mesh (shard_map), or on one device when no
    multi-device mesh is active. Specs from partitioning's resolver and active rules: batch over "batch",
    query heads over "act_heads", kv heads over "act_kv_heads" when they split like the query heads
    (else k/v stay replicated over those axes and each shard slices the kv heads its query heads use);
    sequences whole."""
    local_fn = KERNELS[impl]
    mesh = partitioning.active_mesh()
    if mesh is None:
        return local_fn(q, k, v, q_seg, kv_seg, causal, scale, interpret, block, heads_major)
    ax = 1 if heads_major else 2                                   # the heads axis
    Hq, Hkv = q.shape[ax], k.shape[ax]
    G = Hq // Hkv

    def spec(heads_name):                                          # logical names in this layout
        return ("batch", heads_name, None, None) if heads_major else ("batch", None, heads_name, None)

    rules = partitioning.active_rules()
    q_spec = partitioning.logical_to_spec(spec("act_heads"), q.shape, mesh, rules)
    kv_spec = partitioning.logical_to_spec(spec("act_kv_heads"), k.shape, mesh, rules)
    b, qh = q_spec[0], q_spec[ax]
    kvh = kv_spec[ax] if kv_spec[ax] == qh else None               # kv heads cannot follow the q split
    q_loc = Hq // partitioning.spec_size(qh, mesh)
    q_spec, kv_spec = (P(b, qh, None, None), P(b, kvh, None, None)) if heads_major else \
        (P(b, None, qh, None), P(b, None, kvh, None))
    seg_spec = P(b, None)

    def local(q, k, v, q_seg, kv_seg):
        if qh is not None and kvh is None:                         # k/v replicated: pick this shard's heads
            first = jax.lax.axis_index(qh) * q_loc                # global index of local query head 0
            if G % q_loc == 0:                                    # all local heads share one kv head
                k = jax.lax.dynamic_slice_in_dim(k, first // G, 1, axis=ax)
                v = jax.lax.dynamic_slice_in_dim(v, first // G, 1, axis=ax)
            else:                                                 # uneven straddle: one kv head per q head
                kv_index = (first + jnp.arange(q_loc)) // G
                k, v = jnp.take(k, kv_index, axis=ax), jnp.take(v, kv_index, axis=ax)
        return local_fn(q, k, v, q_seg, kv_seg, causal, scale, interpret, block, heads_major)

    fn = shard_map(local, mesh, (q_spec, kv_spec, kv_spec, seg_spec, seg_spec), q_spec)
    return fn(q, k, v, q_seg, kv_seg)


def kernel_supported(T: int, S: int) -> bool:
    """The TPU kernels (splash, block_sparse) tile both sequence lengths with BLOCK_CHOICES blocks."""
    return T % BLOCK_CHOICES[-1] == 0 and S % BLOCK_CHOICES[-1] == 0


def mesh_platform() -> str | None:
    """Platform of the context mesh's devices (a TPU mesh when compiling ahead of time on a CPU host), or
    None with no mesh in context."""
    device = getattr(partitioning.context_mesh(), "abstract_device", None)
    return getattr(device, "platform", None)


def target_platform() -> str:
    """The platform the trace is for: the context mesh's, else jax's default backend."""
    return mesh_platform() or jax.default_backend()


def resolve_impl(impl: str, dtype, lengths: tuple[int, int] | None = None) -> str:
    """Concrete backend for `impl` on the target platform ("auto" -> cudnn | block_sparse | xla).
    lengths (T, S): with "auto" on TPU, sequences the kernel cannot tile fall back to xla."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r}; valid: {', '.join(ATTENTION_IMPLS)}")
    if impl != "auto":
        return impl
    platform = target_platform()
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    if platform == "tpu":
        return "block_sparse" if lengths is None or kernel_supported(*lengths) else "xla"
    return "xla"


def attention(q, k, v, *, q_segment_ids, kv_segment_ids, causal: bool, impl: str = "xla", q_offset=None,
              scale: float | None = None, single_segment: bool = False, max_segments: int | None = None,
              interpret: bool | None = None, block: int | None = None, heads_major: bool = False):
    """Masked attention (rule in the module docstring). q [B,T,Hq,D], k/v [B,S,Hkv,D] -> [B,T,Hq,D] in q.dtype.

    heads_major: q [B,Hq,T,D], k/v [B,Hkv,S,D] -> [B,Hq,T,D], the Pallas kernels' own layout, so a caller
    that projects straight into it has no transpose around the kernels (the xla backend computes in it
    too; cudnn transposes to its layout and back).

    q_segment_ids [B,T], kv_segment_ids [B,S]: int, 0 = padding. q_offset: None (self-attention, T == S
    aligned) or int / [B] int array, the key index of query 0 (KV-cache decoding; forces the xla backend).
    single_segment: promise that every row is one sample plus right padding (lets cudnn use lengths).
    max_segments: self-attention only (kv_segment_ids equal to q_segment_ids): promise that every non-zero
    segment id is one contiguous run and a row holds at most max_segments runs (lets cudnn use its packed
    layout instead of a [T, S] mask; a row with more runs gives NaN, never a wrong value).
    interpret: run the Pallas kernels (splash, block_sparse) in interpret mode; None: iff a mesh in
    context has non-TPU devices (`mesh_platform`: a CPU run or test).
    block: square block size of the Pallas kernels (splash, block_sparse); None or 0: their default, the
    largest of BLOCK_CHOICES dividing each length (block_sparse_attention.choose_block prices a size).
    """
    q_segment_ids = jnp.asarray(q_segment_ids)
    kv_segment_ids = jnp.asarray(kv_segment_ids)
    _check(q, k, v, q_segment_ids, kv_segment_ids, heads_major)
    scale = float(q.shape[-1]) ** -0.5 if scale is None else scale
    t = 2 if heads_major else 1
    impl = resolve_impl(impl, q.dtype, (q.shape[t], k.shape[t]))
    if heads_major and impl == "cudnn":
        return _swap_heads(attention(*map(_swap_heads, (q, k, v)), q_segment_ids=q_segment_ids,
                                     kv_segment_ids=kv_segment_ids, causal=causal, impl=impl, q_offset=q_offset,
                                     scale=scale, single_segment=single_segment, max_segments=max_segments,
                                     interpret=interpret, block=block))
    if q_offset is not None or impl == "xla":
        mask = make_mask(q_segment_ids, kv_segment_ids, causal=causal, q_offset=q_offset)
        return _xla(q, k, v, mask, scale, heads_major)
    if impl == "cudnn":
        if max_segments is not None and q.shape[1] != k.shape[1]:
            raise ValueError(f"max_segments is for self-attention; got T={q.shape[1]} != S={k.shape[1]}")
        return _cudnn(q, k, v, q_segment_ids, kv_segment_ids, causal, scale, single_segment, max_segments)
    if interpret is None:               # compiled for TPU unless a mesh in context says otherwise
        interpret = mesh_platform() not in (None, "tpu")
    return _kernel(impl, q, k, v, q_segment_ids, kv_segment_ids, causal, scale, interpret, block or None,
                   heads_major)

