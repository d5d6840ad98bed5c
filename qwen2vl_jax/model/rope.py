"""Rotary position embeddings: the one rope helper (vision 2-D RoPE ids, M-RoPE cos/sin, rotate-half)."""
from __future__ import annotations

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

def rotate_half(x):
    """NeoX half rotation: concat(-x[..., d/2:], x[..., :d/2])."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x, cos, sin):
    """x [B, S, H, D]; cos/sin broadcastable to [B, S, 1, D]. Rotation in fp32, result in x.dtype."""
    xf = x.astype(jnp.float32)
    cos = cos.astype(jnp.float32)
    sin = sin.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


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
