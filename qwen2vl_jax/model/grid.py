"""Validation of vision grids: the one check of a `grid_thw` array, shared by the model's input preparation,
M-RoPE, the vision RoPE ids and the packer.

A grid row (t, h, w) counts the patches of one image or video: t temporal slices of h x w patches. The
vision tower merges spatial_merge_size x spatial_merge_size windows, so h and w are multiples of it.
"""
from __future__ import annotations

import numpy as np


def check_grid(grid, name: str, merge_size: int) -> np.ndarray:
    """grid [k, 3] (t, h, w) of positive integers with h, w multiples of `merge_size` -> int64 [k, 3].

    None means no vision items (-> [0, 3]). Raises a one-line ValueError naming `name` and the value.
    """
    if grid is None:
        return np.zeros((0, 3), np.int64)
    g = np.asarray(grid)
    if g.ndim != 2 or g.shape[1] != 3:
        raise ValueError(f"{name} must have shape [num, 3] (t, h, w); got shape {g.shape}")
    if g.size == 0:
        return g.astype(np.int64)
    if not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"{name} must hold integers; got dtype {g.dtype}: {g.tolist()}")
    if (g <= 0).any():
        raise ValueError(f"{name} {g.tolist()} has non-positive entries; t, h and w must be >= 1")
    bad = [r for r in g.tolist() if r[1] % merge_size or r[2] % merge_size]
    if bad:
        raise ValueError(f"{name} rows {bad}: h and w must be multiples of spatial_merge_size {merge_size}")
    return g.astype(np.int64)
