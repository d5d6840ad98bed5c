"""Rotary position embeddings: the one rope helper (vision 2-D RoPE ids, M-RoPE cos/sin, rotate-half)."""
from __future__ import annotations

import numpy as np


def vision_position_ids(grid_thw, spatial_merge_size: int = 2) -> np.ndarray:
    """[sum(t*h*w), 2] (h, w) 2-D RoPE ids for patch rows in the processor's 2x2 merge-window order.

    Same ids for every temporal slice (the ViT has no temporal RoPE). numpy, host side.
    """
    g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    m = spatial_merge_size
    out = []
    for t, h, w in g:
        if h % m or w % m:
            raise ValueError(f"grid (t={t}, h={h}, w={w}) not divisible by spatial_merge_size {m}")
        hp = np.broadcast_to(np.arange(h)[:, None], (h, w))
        wp = np.broadcast_to(np.arange(w)[None, :], (h, w))
        hp = hp.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        wp = wp.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hp, wp], -1), (t, 1)))
    return np.concatenate(out).astype(np.int32) if out else np.zeros((0, 2), np.int32)
