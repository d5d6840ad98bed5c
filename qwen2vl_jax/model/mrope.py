"""M-RoPE position ids (host side, numpy).

`get_rope_index` reproduces transformers 4.57.6 `Qwen2VLModel.get_rope_index` exactly (values, shapes,
the left-padding fill of 1, and the per-row `rope_deltas`). Text advances all three rows (temporal,
height, width) together; a vision block of LLM grid (t, h, w) gets base + (t_idx, h_idx, w_idx), and the
text after it resumes at max(block) + 1 (the paper's rule, kept by 4.57.6; 5.x differs after long videos).
"""
from __future__ import annotations

import numpy as np

from qwen2vl_jax.model.config import ModelConfig
from qwen2vl_jax.model.grid import check_grid


def vision_block_positions(t: int, h: int, w: int) -> np.ndarray:
    """[3, t*h*w] (temporal, height, width) offsets of one vision block on the LLM grid (h, w merged)."""
    ti = np.repeat(np.arange(t), h * w)
    hi = np.tile(np.repeat(np.arange(h), w), t)
    wi = np.tile(np.arange(w), t * h)
    return np.stack([ti, hi, wi])


def sample_positions(ids: np.ndarray, cfg: ModelConfig, image_grid_thw=None, video_grid_thw=None,
                     image_start: int = 0, video_start: int = 0):
    """M-RoPE positions of one unpadded sequence.

    Returns (positions [3, len(ids)] int64, images_used, videos_used). Grids are consumed in order from
    `image_start` / `video_start`, as transformers does across a batch.
    """
    ids = np.asarray(ids)
    m = cfg.vision.spatial_merge_size
    img = check_grid(image_grid_thw, "image_grid_thw", m)
    vid = check_grid(video_grid_thw, "video_grid_thw", m)
    starts = np.flatnonzero(ids == cfg.vision_start_token_id)
    starts = starts[starts + 1 < len(ids)]
    following = ids[starts + 1]
    n_img = int((following == cfg.image_token_id).sum())
    n_vid = int((following == cfg.video_token_id).sum())
    tokens = ids.tolist()
    has_img = cfg.image_token_id in tokens
    has_vid = cfg.video_token_id in tokens
    blocks: list[np.ndarray] = []
    st, ii, vi = 0, image_start, video_start
    rem_i, rem_v = n_img, n_vid

    def next_start() -> int:
        return int(blocks[-1].max()) + 1 if blocks else 0

    for _ in range(n_img + n_vid):
        ed_i = tokens.index(cfg.image_token_id, st) if has_img and rem_i > 0 else len(tokens) + 1
        ed_v = tokens.index(cfg.video_token_id, st) if has_vid and rem_v > 0 else len(tokens) + 1
        if ed_i < ed_v:
            if ii >= len(img):
                raise ValueError(f"sequence has more images than image_grid_thw rows ({len(img)})")
            t, h, w = img[ii]
            ii += 1
            rem_i -= 1
            ed = ed_i
        else:
            if vi >= len(vid):
                raise ValueError(f"sequence has more videos than video_grid_thw rows ({len(vid)})")
            t, h, w = vid[vi]
            vi += 1
            rem_v -= 1
            ed = ed_v
        lt, lh, lw = int(t), int(h) // m, int(w) // m
        text_len = ed - st
        s0 = next_start()
        blocks.append(np.broadcast_to(np.arange(text_len) + s0, (3, text_len)))
        blocks.append(vision_block_positions(lt, lh, lw) + text_len + s0)
        st = ed + lt * lh * lw
    if st < len(tokens):
        s0 = next_start()
        blocks.append(np.broadcast_to(np.arange(len(tokens) - st) + s0, (3, len(tokens) - st)))
    pos = np.concatenate(blocks, axis=1) if blocks else np.zeros((3, 0), np.int64)
    if pos.shape[1] != len(tokens):
        raise ValueError(f"vision pad tokens do not match the grids: {pos.shape[1]} positions for "
                         f"{len(tokens)} tokens (a grid's t*h*w/{m * m} differs from its pad-token run)")
    return pos.astype(np.int64), ii - image_start, vi - video_start


def get_rope_index(cfg: ModelConfig, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
    """transformers-compatible M-RoPE ids.

    input_ids: [batch, seq]. Returns (position_ids [3, batch, seq] int64, rope_deltas [batch, 1] int64).
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq]; got shape {input_ids.shape}")
    b, L = input_ids.shape
    mask = None if attention_mask is None else np.asarray(attention_mask)
    if mask is not None:
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1 (packed-segment masks are not supported)")
    if image_grid_thw is None and video_grid_thw is None:
        if mask is not None:
            pos = np.cumsum(mask.astype(np.int64), -1) - 1
            pos = np.where(mask == 0, 1, pos)
            pos = np.broadcast_to(pos[None], (3, b, L)).copy()
            deltas = pos.max(0).max(-1, keepdims=True) + 1 - L
        else:
            pos = np.broadcast_to(np.arange(L, dtype=np.int64)[None, None], (3, b, L)).copy()
            deltas = np.zeros((b, 1), np.int64)
        return pos, deltas.astype(np.int64)
    if mask is None:
        mask = np.ones_like(input_ids)
    pos = np.ones((3, b, L), np.int64)
    deltas = np.zeros((b, 1), np.int64)
    ii = vi = 0
    for r in range(b):
        keep = mask[r] == 1
        p, ni, nv = sample_positions(input_ids[r][keep], cfg, image_grid_thw, video_grid_thw, ii, vi)
        ii += ni
        vi += nv
        pos[:, r, keep] = p
        deltas[r, 0] = (p.max() + 1 if p.size else 0) - L
    return pos, deltas
