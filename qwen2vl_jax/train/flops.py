"""Analytic FLOPs of a training step and MFU.

A multiply-add counts 2 FLOPs. Notation: D hidden, L layers, Hq / Hkv heads, hd head dim, I MLP width,
V vocab; vision: E width, M MLP width, Lv depth, Pd = 1176 values per patch row, merger width 4E.

Forward FLOPs
  per decoder token and layer : 2*D*Hq*hd (q) + 2*2*D*Hkv*hd (k, v) + 2*Hq*hd*D (o) + 3*2*D*I (SwiGLU)
  per decoder token (lm head) : 2*D*V                       (every position of the packed rows)
  per attended text pair      : 4*Hq*hd per layer           (q.k scores + probs @ v)
  per patch                   : 2*Pd*E (patch embed) + Lv * (2*E*3E + 2*E*E + 2*E*M + 2*M*E)
  per attended patch pair     : 4*E per ViT layer
  per merged token            : 2*4E*4E + 2*4E*D
Attended pairs are the useful ones: causal within each packed text segment (n(n+1)/2 per segment) and
all pairs within each vision segment (n^2 per image / temporal slice); padding (segment 0) is not
counted. The embedding lookup is free.

Backward (per stage, `trainable` parts of optim.PARTS): a weight matmul costs 1x (forward)
+ 1x if its input gradient is needed (anything upstream, or an earlier layer of its own part, is
trainable) + 1x if its weight is trainable; attention costs 1x + 2x if gradients flow through it.
So stage 2 is 3x forward everywhere; stage 1 (ViT trained, LLM frozen) runs the LLM at 2x (input
gradients only); stage 3 (ViT tower frozen) runs the tower forward only. Remat recomputation is not
counted (model FLOPs, not hardware FLOPs).

`six_nd` is the usual 6 x params x tokens, per part: 6*(N_tower*patches + N_merger*merged tokens
+ N_decoder*tokens), N_decoder without the input embedding table (a lookup) but with the lm head
(for tied embeddings the table is counted once, as the head).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from qwen2vl_jax.model.config import ModelConfig
from qwen2vl_jax.train import chips

@dataclasses.dataclass(frozen=True)
class StepFlops:
    vision: float          # patch embed + ViT blocks (matmuls)
    vision_attention: float
    merger: float
    decoder: float         # decoder layer matmuls
    attention: float       # decoder attention
    lm_head: float

    @property
    def total(self) -> float:
        return self.vision + self.vision_attention + self.merger + self.decoder + self.attention + self.lm_head


def forward_per_unit(cfg: ModelConfig) -> dict[str, float]:
    """Forward FLOPs per token / patch / merged token / attended pair (module docstring)."""
    D, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    v = cfg.vision
    E, M = v.embed_dim, v.mlp_dim
    return {
        "decoder_token": L * (2 * D * q + 2 * 2 * D * kv + 2 * q * D + 3 * 2 * D * I),
        "lm_head_token": 2 * D * V,
        "text_pair": L * 4 * q,
        "patch_embed": 2 * v.patch_dim * E,
        "vit_patch": v.depth * (2 * E * 3 * E + 2 * E * E + 2 * E * M + 2 * M * E),
        "patch_pair": v.depth * 4 * E,
        "merged_token": 2 * v.merger_hidden * v.merger_hidden + 2 * v.merger_hidden * D,
    }


def step_flops(cfg: ModelConfig, tokens: float, patches: float, text_pairs: float, patch_pairs: float,
               trainable: Sequence[str] = ("vision_tower", "merger", "llm")) -> StepFlops:
    """Forward + backward FLOPs of one step over `tokens` decoder positions and `patches` patch rows."""
    f = forward_per_unit(cfg)
    tv, tm, tl = ("vision_tower" in trainable), ("merger" in trainable), ("llm" in trainable)
    vis_mm = 1 + 2 * tv               # blocks: dX (earlier blocks) + dW
    patch_embed = 1 + tv              # input is pixels: dW only
    merger_mm = 1 + (tv or tm) + tm
    dec_dx = tv or tm or tl
    dec_mm = 1 + dec_dx + tl
    return StepFlops(
        vision=patches * (f["patch_embed"] * patch_embed + f["vit_patch"] * vis_mm),
        vision_attention=patch_pairs * f["patch_pair"] * (1 + 2 * tv),
        merger=patches / cfg.vision.merge_unit * f["merged_token"] * merger_mm,
        decoder=tokens * f["decoder_token"] * dec_mm,
        attention=text_pairs * f["text_pair"] * (1 + 2 * dec_dx),
        lm_head=tokens * f["lm_head_token"] * dec_mm,
    )


def attention_pairs(segment_ids: np.ndarray, causal: bool) -> int:
    """Attended (query, key) pairs of packed rows [..., n] (segment 0 = padding, not counted)."""
    seg = np.asarray(segment_ids).reshape(-1, np.shape(segment_ids)[-1])
    total = 0
    for row in seg:
        counts = np.bincount(row[row > 0])
        counts = counts[counts > 0].astype(np.int64)
        total += int(np.sum(counts * (counts + 1) // 2 if causal else counts * counts))
    return total


def batch_flops(cfg: ModelConfig, batch: Mapping[str, np.ndarray],
                trainable: Sequence[str] = ("vision_tower", "merger", "llm")) -> StepFlops:
    """Step FLOPs of a packed numpy batch: every position is computed (tokens = B*S, patches = B*P)."""
    ids, pseg = np.asarray(batch["input_ids"]), np.asarray(batch["patch_segment_ids"])
    return step_flops(cfg, tokens=ids.size, patches=pseg.size,
                      text_pairs=attention_pairs(batch["segment_ids"], causal=True),
                      patch_pairs=attention_pairs(pseg, causal=False), trainable=trainable)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts per part from the contract's shapes (docs/architecture.md param tree)."""
    D, I, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    v = cfg.vision
    E, M, H4 = v.embed_dim, v.mlp_dim, v.merger_hidden
    tower = v.patch_dim * E + v.depth * (4 * E + (E * 3 * E + 3 * E) + (E * E + E) + (E * M + M) + (M * E + E))
    merger = 2 * E + (H4 * H4 + H4) + (H4 * D + D)
    layer = 2 * D + (D * q + q) + 2 * (D * kv + kv) + q * D + 3 * D * I
    embed = V * D
    head = 0 if cfg.tie_word_embeddings else D * V
    decoder = L * layer + D + head      # without the input embedding table
    return {"vision_tower": tower, "merger": merger, "embedding": embed, "decoder": decoder,
            "total": tower + merger + embed + decoder}


def six_nd(cfg: ModelConfig, tokens: float, patches: float) -> float:
    """6 x params x tokens, per part (module docstring)."""
    n = param_counts(cfg)
    dec = n["decoder"] + (cfg.vocab_size * cfg.hidden_size if cfg.tie_word_embeddings else 0)
    return 6.0 * (n["vision_tower"] * patches + n["merger"] * patches / cfg.vision.merge_unit + dec * tokens)


def mfu(flops_per_step: float, seconds_per_step: float, n_devices: int, device_kind: str) -> float | None:
    """Model FLOPs utilisation, or None where the chip's peak is unknown (CPU: n/a)."""
    peak = chips.peak_flops(device_kind)
    if peak is None or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / (peak * n_devices)
