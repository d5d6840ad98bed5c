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
  cudnn  `jax.nn.dot_product_attention(implementation="cudnn")` (bf16/fp16 only). The public API takes no
         segment ids, so: no segments -> plain causal (fastest); `single_segment=True` (each row one
         sample followed by right padding) -> query/key lengths (cheap padding mask); otherwise an explicit
         boolean mask (the slowest of the three forms, so it is the last resort).
  splash Pallas TPU splash kernel with SegmentIds (interpret mode runs it on CPU for tests). A Mosaic
         kernel cannot be partitioned by XLA, so when a mesh is active (`jax.set_mesh(mesh)` around the
         jit trace, or `mesh_context(mesh)` inside it; read with `jax.sharding.get_abstract_mesh()`) the kernel runs under `shard_map`: batch
         (and segment ids) split over the mesh axes the logical rules give "batch", query heads over
         "act_heads", kv heads over "act_kv_heads" (rules: flax `nn.logical_axis_rules` if set, else
         `sharding.LOGICAL_RULES`). Sequence axes are gathered (the kernel needs whole rows). When the kv
         heads do not divide like the query heads (2B: 2 kv heads, tensor=4), k/v stay replicated over
         the head axes and each shard slices the kv heads its query heads use. Sequence lengths must be
         multiples of 128 (block sizes). Mosaic rejects 16-bit operands under a global
         jax_default_matmul_precision="highest" (fp32 contract precision: "Bad lhs type"); leave it
         at the default for bf16 TPU runs.
  auto   cudnn on GPU with 16-bit inputs; on TPU splash when T and S are multiples of 128, else xla;
         xla elsewhere.
The KV-cache path (q_offset given) always uses xla: a decode step is memory-bound and cuDNN / splash
causal masks are top-left aligned.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

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


def _check(q, k, v, q_segment_ids, kv_segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B,T,Hq,D], k and v [B,S,Hkv,D]; got {q.shape}, {k.shape}, {v.shape}")
    B, T, Hq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if Hq % k.shape[2]:
        raise ValueError(f"query heads {Hq} not a multiple of kv heads {k.shape[2]}")
    if q_segment_ids.shape != (B, T):
        raise ValueError(f"q_segment_ids shape {q_segment_ids.shape} != (B, T) = {(B, T)}")
    if kv_segment_ids.shape != (B, k.shape[1]):
        raise ValueError(f"kv_segment_ids shape {kv_segment_ids.shape} != (B, S) = {(B, k.shape[1])}")


def _xla(q, k, v, mask, scale):
    """q [B,T,Hq,D], k/v [B,S,Hkv,D], mask [B,T,S] bool -> [B,T,Hq,D]."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, T, Hkv, Hq // Hkv, D)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    m = mask[:, None, None, :, :]
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(m, probs, 0.0).astype(v.dtype)          # fully masked rows -> exact zeros
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, Hq, D).astype(q.dtype)


def _cudnn(q, k, v, q_seg, kv_seg, causal, scale, single_segment):
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


def _splash_block(n: int) -> int:
    for b in (512, 256, 128):
        if n % b == 0:
            return b
    raise ValueError(f"splash attention needs sequence lengths that are multiples of 128; got {n}")


# Not cached: the kernel holds its mask-info arrays, which become tracers when it is built inside a
# transformation (remat, scan); a cached kernel reused by a later trace leaks them. Building it is
# host-side numpy work at trace time.
def _splash_kernel(T: int, S: int, groups: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    base = sa.CausalMask((T, S)) if causal else sa.FullMask((T, S))
    mask = sa.MultiHeadMask([base] * groups)
    bq, bkv = _splash_block(T), _splash_block(S)
    blocks = sa.BlockSizes(block_q=bq, block_kv_compute=bkv, block_kv=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                           block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    return sa.make_splash_mqa_single_device(mask=mask, block_sizes=blocks, interpret=interpret)


def _splash_local(q, k, v, q_seg, kv_seg, causal, scale, interpret, kv_head_index=None):
    """Splash on one device's arrays. q [B,T,Hq,D], k/v [B,S,Hkv,D] -> [B,T,Hq,D].

    kv_head_index: None (query head h uses kv head h // (Hq // Hkv)), or an int array [Hq] naming the kv
    head of each query head (a shard whose query heads straddle kv groups unevenly)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if kv_head_index is not None:                                  # one kv head per query head
        k, v = jnp.take(k, kv_head_index, axis=2), jnp.take(v, kv_head_index, axis=2)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kernel = _splash_kernel(T, S, G, causal, interpret)
    qh = (q * scale).astype(q.dtype).reshape(B, T, Hkv, G, D).transpose(0, 2, 3, 1, 4)   # [B,Hkv,G,T,D]
    kh = k.transpose(0, 2, 1, 3)                                                        # [B,Hkv,S,D]
    vh = v.transpose(0, 2, 1, 3)

    def one(qb, kb, vb, qs, ks):  # qb [G,T,D], kb/vb [S,D]
        return kernel(qb, kb, vb, segment_ids=sa.SegmentIds(q=qs, kv=ks))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))                 # over kv heads
    out = jax.vmap(per_head)(qh, kh, vh, q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32))  # [B,Hkv,G,T,D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(B, T, Hq, D)
    return jnp.where((q_seg != 0)[:, :, None, None], out, 0).astype(q.dtype)


def shard_map(f, mesh, in_specs, out_specs):
    """`jax.shard_map` (jax >= 0.7) or `jax.experimental.shard_map.shard_map` (older), replication
    checks off (the Pallas call has no replication rule)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy  # pragma: no cover - old jax
    return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def mesh_context(mesh):
    """Context that makes `mesh` visible to attention() while tracing, usable inside a jitted function
    (the train step: `with attention.mesh_context(mesh): ...` around the loss). Same effect as tracing
    under `jax.set_mesh(mesh)`."""
    return jax.sharding.use_abstract_mesh(getattr(mesh, "abstract_mesh", mesh))


def active_mesh():
    """The mesh of the enclosing `jax.set_mesh` (abstract inside jit), or None when there is none or it
    has a single device / only manual axes (already inside a shard_map)."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    if mesh is None or getattr(mesh, "empty", True) or mesh.size == 1:
        return None
    if not _free_axes(mesh):
        return None
    return mesh


def _free_axes(mesh) -> tuple[str, ...]:
    """Mesh axes of size > 1 that are not already manual (shard_map) axes."""
    types = getattr(mesh, "axis_types", None) or (None,) * len(mesh.axis_names)
    manual = getattr(getattr(jax.sharding, "AxisType", None), "Manual", object())
    return tuple(a for a, t in zip(mesh.axis_names, types) if t != manual and mesh.shape[a] > 1)


def _logical_rules() -> dict[str, tuple[str, ...]]:
    """logical axis -> mesh axes: flax's active `nn.logical_axis_rules`, else sharding.LOGICAL_RULES."""
    rules = ()
    try:
        import flax.linen as nn
        rules = tuple(nn.get_logical_axis_rules() or ())
    except ImportError:  # pragma: no cover
        pass
    if not rules:
        from qwen2vl_jax.train.sharding import LOGICAL_RULES
        rules = LOGICAL_RULES
    out: dict[str, tuple[str, ...]] = {}
    for name, axes in rules:
        if name in out:                      # flax semantics: the first rule for a name wins
            continue
        out[name] = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return out


def _dim_axes(logical: str, dim: int, mesh, rules, used: set[str]) -> tuple[str, ...]:
    """Mesh axes for one array dimension: the rule's axes, in order, each kept only if it is a free axis
    of the mesh, not used by an earlier dimension, and the product still divides `dim`."""
    free = set(_free_axes(mesh))
    chosen, size = [], 1
    for ax in rules.get(logical, ()):
        if ax not in free or ax in used or dim % (size * mesh.shape[ax]):
            continue
        chosen.append(ax)
        size *= mesh.shape[ax]
    used.update(chosen)
    return tuple(chosen)


def _spec_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _splash(q, k, v, q_seg, kv_seg, causal, scale, interpret):
    """Splash over the active mesh (shard_map), or on one device when no multi-device mesh is active."""
    from jax.sharding import PartitionSpec as P

    mesh = active_mesh()
    if mesh is None:
        return _splash_local(q, k, v, q_seg, kv_seg, causal, scale, interpret)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    rules = _logical_rules()
    used: set[str] = set()
    batch_ax = _dim_axes("batch", B, mesh, rules, used)
    q_head_ax = _dim_axes("act_heads", Hq, mesh, rules, set(used))
    n_q = math.prod(mesh.shape[a] for a in q_head_ax)             # query-head shards
    kv_rule = tuple(a for a in rules.get("act_kv_heads", ()) if a in q_head_ax)
    kv_head_ax = _dim_axes("act_kv_heads", Hkv, mesh, {"act_kv_heads": kv_rule}, set(used))
    if kv_head_ax != q_head_ax:                                   # kv heads cannot follow the q split
        kv_head_ax = ()
    q_loc = Hq // n_q
    b, qh, kvh = _spec_entry(batch_ax), _spec_entry(q_head_ax), _spec_entry(kv_head_ax)
    q_spec, kv_spec, seg_spec = P(b, None, qh, None), P(b, None, kvh, None), P(b, None)

    def local(q, k, v, q_seg, kv_seg):
        kv_index = None
        if q_head_ax and not kv_head_ax:                          # k/v replicated: pick this shard's heads
            # (whole kv groups per shard would mean Hkv divides like Hq, i.e. kv sharded: not this branch)
            first = jax.lax.axis_index(q_head_ax) * q_loc         # global index of local query head 0
            if G % q_loc == 0:                                    # all local heads share one kv head
                k = jax.lax.dynamic_slice_in_dim(k, first // G, 1, axis=2)
                v = jax.lax.dynamic_slice_in_dim(v, first // G, 1, axis=2)
            else:                                                 # uneven straddle: one kv head per q head
                kv_index = (first + jnp.arange(q_loc)) // G
        return _splash_local(q, k, v, q_seg, kv_seg, causal, scale, interpret, kv_index)

    fn = shard_map(local, mesh, (q_spec, kv_spec, kv_spec, seg_spec, seg_spec), q_spec)
    return fn(q, k, v, q_seg, kv_seg)


def splash_supported(T: int, S: int) -> bool:
    """Splash block sizes need both sequence lengths to be multiples of 128."""
    return T % 128 == 0 and S % 128 == 0


def resolve_impl(impl: str, dtype, lengths: tuple[int, int] | None = None) -> str:
    """Concrete backend for `impl` on the default jax backend ("auto" -> cudnn | splash | xla).
    lengths (T, S): with "auto" on TPU, sequences splash cannot tile fall back to xla."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r}; valid: {', '.join(ATTENTION_IMPLS)}")
    if impl != "auto":
        return impl
    platform = jax.default_backend()
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    if platform == "tpu":
        return "splash" if lengths is None or splash_supported(*lengths) else "xla"
    return "xla"


def attention(q, k, v, *, q_segment_ids, kv_segment_ids, causal: bool, impl: str = "xla", q_offset=None,
              scale: float | None = None, single_segment: bool = False, interpret: bool = False):
    """Masked attention (rule in the module docstring). q [B,T,Hq,D], k/v [B,S,Hkv,D] -> [B,T,Hq,D] in q.dtype.

    q_segment_ids [B,T], kv_segment_ids [B,S]: int, 0 = padding. q_offset: None (self-attention, T == S
    aligned) or int / [B] int array, the key index of query 0 (KV-cache decoding; forces the xla backend).
    single_segment: promise that every row is one sample plus right padding (lets cudnn use lengths).
    interpret: run the splash kernel in Pallas interpret mode (CPU tests).
    """
    q_segment_ids = jnp.asarray(q_segment_ids)
    kv_segment_ids = jnp.asarray(kv_segment_ids)
    _check(q, k, v, q_segment_ids, kv_segment_ids)
    scale = float(q.shape[-1]) ** -0.5 if scale is None else scale
    impl = resolve_impl(impl, q.dtype, (q.shape[1], k.shape[1]))
    if q_offset is not None or impl == "xla":
        mask = make_mask(q_segment_ids, kv_segment_ids, causal=causal, q_offset=q_offset)
        return _xla(q, k, v, mask, scale)
    if impl == "cudnn":
        return _cudnn(q, k, v, q_segment_ids, kv_segment_ids, causal, scale, single_segment)
    return _splash(q, k, v, q_segment_ids, kv_segment_ids, causal, scale, interpret)

