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
         boolean mask (about 2x slower than causal-only, see shared/reference/baselines.md).
  splash Pallas TPU splash kernel with SegmentIds (interpret mode runs it on CPU for tests).
  auto   cudnn on GPU with 16-bit inputs, splash on TPU, else xla.
The KV-cache path (q_offset given) always uses xla: a decode step is memory-bound and cuDNN / splash
causal masks are top-left aligned.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLS = ("xla", "cudnn", "splash", "auto")


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


@functools.lru_cache(maxsize=64)
def _splash_kernel(T: int, S: int, groups: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    base = sa.CausalMask((T, S)) if causal else sa.FullMask((T, S))
    mask = sa.MultiHeadMask([base] * groups)
    bq, bkv = _splash_block(T), _splash_block(S)
    blocks = sa.BlockSizes(block_q=bq, block_kv_compute=bkv, block_kv=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                           block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    return sa.make_splash_mqa_single_device(mask=mask, block_sizes=blocks, interpret=interpret)


def _splash(q, k, v, q_seg, kv_seg, causal, scale, interpret):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

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


def resolve_impl(impl: str, dtype) -> str:
    """Concrete backend for `impl` on the default jax backend ("auto" -> cudnn | splash | xla)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r}; valid: {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    platform = jax.default_backend()
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    if platform == "tpu":
        return "splash"
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
    impl = resolve_impl(impl, q.dtype)
    if q_offset is not None or impl == "xla":
        mask = make_mask(q_segment_ids, kv_segment_ids, causal=causal, q_offset=q_offset)
        return _xla(q, k, v, mask, scale)
    if impl == "cudnn":
        return _cudnn(q, k, v, q_segment_ids, kv_segment_ids, causal, scale, single_segment)
    return _splash(q, k, v, q_segment_ids, kv_segment_ids, causal, scale, interpret)

