"""Rotary position embeddings: the one rope helper (vision 2-D RoPE ids, M-RoPE cos/sin, rotate-half)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.model.grid import check_grid


def vision_position_ids(grid_thw, spatial_merge_size: int = 2) -> np.ndarray:
    """[sum(t*h*w), 2] (h, w) 2-D RoPE ids for patch rows in the processor's 2x2 merge-window order.

    Same ids for every temporal slice (the ViT has no temporal RoPE). numpy, host side.
    """
    m = spatial_merge_size
    g = check_grid(grid_thw, "grid_thw", m)
    out = []
    for t, h, w in g:
        hp = np.broadcast_to(np.arange(h)[:, None], (h, w))
        wp = np.broadcast_to(np.arange(w)[None, :], (h, w))
        hp = hp.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        wp = wp.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hp, wp], -1), (t, 1)))
    return np.concatenate(out).astype(np.int32) if out else np.zeros((0, 2), np.int32)


# ----------------------------------------------------------------------------------------------
# jax side

def half_rotation(d: int) -> np.ndarray:
    """[d, d] signed permutation R with x @ R == rotate_half(x): column i takes -x[d/2 + i], column d/2 + i
    takes x[i]."""
    h = d // 2
    r = np.zeros((d, d), np.float32)
    r[h + np.arange(h), np.arange(h)] = -1.0
    r[np.arange(h), h + np.arange(h)] = 1.0
    return r


def rotate_half(x):
    """NeoX half rotation concat(-x[..., d/2:], x[..., :d/2]), as a product with a signed permutation
    (`half_rotation`), exact in any dtype: each output is one input times +-1. Why a matmul: slicing the
    head dim at d/2 (40 of head_dim 80, 64 of 128) splits lane tiles, and the TPU compiler then writes the
    halves and their fp32 casts to HBM as separate fusions (about 0.8 s per 2B stage-2 step); a dot with
    a small constant operand fuses like any projection. The product carries a size-1 batch dimension so
    the remat policies that save projections (dots_with_no_batch_dims: "dots_attention") do not save it:
    recomputing it from the saved projection costs nothing, saving it costs a stacked copy per layer."""
    r = jnp.asarray(half_rotation(x.shape[-1]), x.dtype)[None]                    # [1, D, D]
    out = jax.lax.dot_general(x[None], r, (((x.ndim,), (1,)), ((0,), (0,))),
                              precision=jax.lax.Precision.HIGHEST, preferred_element_type=x.dtype)
    return out[0]


def apply_rotary(x, cos, sin):
    """x [..., D] (e.g. [B, S, H, D] or head-major [B, H, S, D]); cos/sin broadcastable to it (e.g.
    [B, S, 1, D] / [B, 1, S, D]). x * cos + rotate_half(x) * sin in fp32, result in x.dtype (rotate_half
    is exact, so rotating x before the fp32 cast equals rotating the fp32 copy)."""
    f32 = jnp.float32
    return (x.astype(f32) * cos.astype(f32) + rotate_half(x).astype(f32) * sin.astype(f32)).astype(x.dtype)


def vision_rope(patch_positions, head_dim: int, theta: float = 10000.0):
    """2-D vision RoPE: patch_positions [..., 2] (h, w) int -> (cos, sin) [..., head_dim] float32.

    d = head_dim / 2 rotary dims per axis pair; inv_freq = 1 / theta^(arange(0, d, 2) / d) (d/2 frequencies);
    angles = [h * inv_freq | w * inv_freq] (d values), duplicated to head_dim. Always fp32: in bf16,
    positions above 256 round and the phases drift in proportion to the position.
    """
    d = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    pos = jnp.asarray(patch_positions).astype(jnp.float32)
    ang = (pos[..., :, None] * inv_freq).reshape(*pos.shape[:-1], d)      # [..., 2, d/2] -> [..., d]
    emb = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def mrope_cos_sin(positions, head_dim: int, mrope_section, theta: float, dtype):
    """M-RoPE: positions [B, 3, S] (t, h, w) int -> (cos, sin) [B, S, head_dim] in `dtype`.

    Angles in fp32 (positions * inv_freq, inv_freq = 1/theta^(arange(0, hd, 2)/hd)); frequency j takes its
    position from axis t if j < s0, h if j < s0+s1, else w; duplicated to head_dim; cos/sin are cast to
    the activation dtype, as transformers does.
    """
    if 2 * sum(mrope_section) != head_dim:
        raise ValueError(f"mrope_section {tuple(mrope_section)} must sum to head_dim/2 = {head_dim // 2}")
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))   # [hd/2]
    axis_of_freq = np.repeat(np.arange(3), np.asarray(mrope_section))                          # [hd/2]
    pos = jnp.asarray(positions).astype(jnp.float32)                                           # [B,3,S]
    pos = jnp.take(pos, jnp.asarray(axis_of_freq), axis=1)                                      # [B,hd/2,S]
    ang = jnp.swapaxes(pos, 1, 2) * inv_freq                                                   # [B,S,hd/2]
    emb = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)
