"""Helpers for parity tests: a tiny transformers 4.57 Qwen2-VL in fp32 and matching random inputs.

`hf_model(cfg)` builds Qwen2VLForConditionalGeneration from `to_hf_config(cfg)` (eager attention, eval mode)
and re-randomises every tensor (biases and norm weights included, so a dropped bias cannot hide behind
transformers' zero / one init). `build_inputs(cfg, layouts)` turns per-row layouts such as
[("text", 3), ("image", (1, 4, 6)), ("text", 2)] into transformers inputs (left-padded, random pixels).
"""
from __future__ import annotations

import numpy as np

from qwen2vl_jax.model.config import ModelConfig, to_hf_config


def hf_model(cfg: ModelConfig, seed: int = 0, attn: str = "eager"):
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    hf_cfg = Qwen2VLConfig(**to_hf_config(cfg))
    model = Qwen2VLForConditionalGeneration._from_config(hf_cfg, attn_implementation=attn, torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name or "ln_q.weight" in name \
                    or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model.eval()


def state_dict_numpy(model) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def layout_tokens(cfg: ModelConfig, layout, rng) -> tuple[list[int], list, list]:
    """One row: -> (token ids, image grids, video grids) in order of appearance."""
    ids, images, videos = [], [], []
    unit = cfg.vision.merge_unit
    for kind, arg in layout:
        if kind == "text":
            ids += rng.integers(0, cfg.special_token_base, size=arg).tolist()
            continue
        t, h, w = arg
        pad = cfg.image_token_id if kind == "image" else cfg.video_token_id
        ids += [cfg.vision_start_token_id] + [pad] * (t * h * w // unit) + [cfg.vision_end_token_id]
        (images if kind == "image" else videos).append([t, h, w])
    return ids, images, videos


def build_inputs(cfg: ModelConfig, layouts, seed: int = 0) -> dict:
    """Rows described by `layouts` -> numpy transformers inputs (left padding with the pad token).

    Keys: input_ids [B,S] int64, attention_mask [B,S], and when present pixel_values [N,1176] +
    image_grid_thw [k,3], pixel_values_videos [Nv,1176] + video_grid_thw [kv,3] (random normal pixels).
    """
    rng = np.random.default_rng(seed)
    rows, images, videos = [], [], []
    for layout in layouts:
        ids, im, vi = layout_tokens(cfg, layout, rng)
        rows.append(ids)
        images += im
        videos += vi
    S = max(len(r) for r in rows)
    input_ids = np.full((len(rows), S), cfg.pad_token_id, np.int64)
    mask = np.zeros((len(rows), S), np.int64)
    for b, r in enumerate(rows):
        input_ids[b, S - len(r):] = r
        mask[b, S - len(r):] = 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    C = cfg.vision.patch_dim
    if images:
        g = np.array(images, np.int64)
        out["pixel_values"] = rng.standard_normal((int(np.prod(g, 1).sum()), C)).astype(np.float32)
        out["image_grid_thw"] = g
    if videos:
        g = np.array(videos, np.int64)
        out["pixel_values_videos"] = rng.standard_normal((int(np.prod(g, 1).sum()), C)).astype(np.float32)
        out["video_grid_thw"] = g
    return out


def hf_logits(model, inputs: dict) -> np.ndarray:
    import torch

    with torch.no_grad():
        kw = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
        return model(**kw).logits.float().numpy()


def hf_rope_index(model, inputs: dict):
    import torch

    t = {k: (None if inputs.get(k) is None else torch.from_numpy(np.asarray(inputs[k])))
         for k in ("input_ids", "image_grid_thw", "video_grid_thw", "attention_mask")}
    pos, deltas = model.model.get_rope_index(t["input_ids"], t["image_grid_thw"], t["video_grid_thw"],
                                             t["attention_mask"])
    return pos.numpy(), deltas.numpy()
