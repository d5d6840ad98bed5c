"""Host-side preparation of transformers-layout inputs (numpy; runs before any jitted call).

  vision_inputs(cfg, pixel_values [N,1176], grid_thw [k,3], name) -> one row of vision-tower inputs
  vision_slice_rows(cfg, items) -> every temporal slice as its own tower row, plus per-item gather indices
  prepare_inputs(cfg, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                 video_grid_thw, position_ids) -> packed arrays for `model.forward` / `kv_cache.prefill`

All checks of user inputs (shapes, grids, pad-token counts) happen here, so a bad call fails with a
one-line ValueError before any parameter is touched.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from qwen2vl_jax.model.config import ModelConfig
from qwen2vl_jax.model.grid import check_grid
from qwen2vl_jax.model.mrope import get_rope_index
from qwen2vl_jax.model.rope import vision_position_ids


def vision_inputs(cfg: ModelConfig, pixel_values, grid_thw, name: str):
    """Validates one transformers vision input and builds the packed tower inputs for a single row.

    pixel_values [N, patch_dim] with N = sum(t*h*w); grid_thw [k, 3]. Returns (pixel_values [1,N,C],
    patch_segment_ids [1,N] (one id per temporal slice of each item, from 1), patch_positions [1,N,2]).
    """
    v = cfg.vision
    g = check_grid(grid_thw, f"{name}_grid_thw", v.spatial_merge_size)
    px = np.asarray(pixel_values)
    if px.ndim != 2 or px.shape[1] != v.patch_dim:
        raise ValueError(f"{name} pixel values must have shape [num_patches, {v.patch_dim}]; got {px.shape}")
    expected = int(np.sum(g[:, 0] * g[:, 1] * g[:, 2]))
    if px.shape[0] != expected:
        raise ValueError(f"{name} pixel values have {px.shape[0]} patch rows but {name}_grid_thw "
                         f"{g.tolist()} needs sum(t*h*w) = {expected}")
    slice_sizes = np.repeat(g[:, 1] * g[:, 2], g[:, 0])
    seg = np.repeat(np.arange(1, len(slice_sizes) + 1), slice_sizes).astype(np.int32)
    pos = vision_position_ids(g, v.spatial_merge_size)
    return px[None].astype(np.float32), seg[None], pos[None]


def vision_slice_rows(cfg: ModelConfig, items) -> dict:
    """Lays every temporal slice of the given vision items out as its own tower row.

    items: [(name, (pixel_values [1,N,C], patch_segment_ids [1,N], patch_positions [1,N,2]))] as from
    `vision_inputs`. Rows are padded to the largest slice Pm (segment 0), so tower attention costs
    sum(slice^2) rather than (all patches)^2 (a long video would otherwise build an N x N mask).
    Returns pixel_values [R,Pm,C], patch_segment_ids [R,Pm] (1 real, 0 pad), patch_positions [R,Pm,2] and
    `take_{name}` [N/4] int32: the rows of the flattened merged output [R*Pm/4, D] for that item's tokens,
    in transformers order.
    """
    unit = cfg.vision.merge_unit
    slices = []                                        # (name, pixels [n,C], positions [n,2])
    for name, (px, seg, pos) in items:
        bounds = np.flatnonzero(np.diff(seg[0], prepend=-1, append=-1))
        slices += [(name, px[0, a:b], pos[0, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    Pm = max(len(p) for _, p, _ in slices)
    R = len(slices)
    out = {"pixel_values": np.zeros((R, Pm, cfg.vision.patch_dim), np.float32),
           "patch_segment_ids": np.zeros((R, Pm), np.int32), "patch_positions": np.zeros((R, Pm, 2), np.int32)}
    take: dict[str, list] = {name: [] for name, _ in items}
    for r, (name, px, pos) in enumerate(slices):
        n = len(px)
        out["pixel_values"][r, :n], out["patch_segment_ids"][r, :n], out["patch_positions"][r, :n] = px, 1, pos
        take[name].append(r * (Pm // unit) + np.arange(n // unit))
    for name, parts in take.items():
        out[f"take_{name}"] = np.concatenate(parts).astype(np.int32)
    return out


def prepare_inputs(cfg: ModelConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   pixel_values_videos=None, video_grid_thw=None, position_ids=None) -> dict:
    """Host-side checks and index building for transformers-layout inputs.

    Returns numpy arrays: input_ids [B,S] int32, segment_ids [B,S] (= attention_mask), positions [B,3,S],
    rope_deltas [B,1], and "vision": None or the `vision_slice_rows` dict (images and videos). Raises
    ValueError on malformed grids, pixel rows that do not match the grids, or a count of <|image_pad|> /
    <|video_pad|> tokens that differs from the merged patch count.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq]; got shape {ids.shape}")
    B, S = ids.shape
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    out: dict[str, Any] = {}
    items = []
    unit = cfg.vision.merge_unit
    for name, px, grid, tok in (("image", pixel_values, image_grid_thw, cfg.image_token_id),
                                ("video", pixel_values_videos, video_grid_thw, cfg.video_token_id)):
        n_tok = int((ids == tok).sum())
        if (px is None) != (grid is None):
            raise ValueError(f"pass both pixel_values{'_videos' if name == 'video' else ''} and {name}_grid_thw, "
                             f"or neither")
        if px is None:
            if n_tok:
                raise ValueError(f"input_ids hold {n_tok} {name} pad tokens but no {name} pixel values were given")
            continue
        triple = vision_inputs(cfg, px, grid, name)
        n_feat = triple[0].shape[1] // unit
        if n_tok != n_feat:
            raise ValueError(f"{name} features and {name} tokens do not match: tokens: {n_tok}, "
                             f"features: {n_feat}")
        items.append((name, triple))
    out["vision"] = vision_slice_rows(cfg, items) if items else None
    if position_ids is None:
        pos, _ = get_rope_index(cfg, ids, image_grid_thw, video_grid_thw, mask)
    else:
        pos = np.asarray(position_ids)
        if pos.shape != (3, B, S):
            raise ValueError(f"position_ids must be [3, batch, seq] = {(3, B, S)}; got {pos.shape}")
    real = np.where(mask[None] == 1, pos, np.iinfo(np.int64).min).max(axis=(0, 2))
    out["rope_deltas"] = (np.maximum(real, -1) + 1 - S).astype(np.int32)[:, None]
    out["input_ids"] = ids.astype(np.int32)
    out["segment_ids"] = (mask != 0).astype(np.int32)
    out["positions"] = np.transpose(pos, (1, 0, 2)).astype(np.int32)
    return out
