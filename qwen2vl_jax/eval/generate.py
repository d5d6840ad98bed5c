"""Autoregressive generation with the model's KV cache and M-RoPE position deltas.

Prompts are Tokenized samples (docs/architecture.md contract: `input_ids` with vision pads already expanded,
`pixel_values`, `grid_thw`, `vision_kind`; `loss_mask` ignored), so an image, several images or a video
per prompt all work. `prepare_prompts` left-pads a batch (B rows, L = longest prompt rounded up to
`pad_multiple`), concatenates the vision inputs in batch order (as the HF processor does) and computes
the prefill M-RoPE ids with `mrope.get_rope_index`: positions [3, B, L] and rope_deltas [B, 1].

Decoding (as transformers' rope_deltas): after the prefill of L slots, step k (k = 0..max_new_tokens-2) feeds the
token generated last at cache slot L + k with M-RoPE position (L + k) + rope_delta[b] on all 3 rows,
i.e. max(prefill position) + 1 + k for every row whatever its padding.

`generate` runs the model's prefill (host-side input prep + one jitted call, compiled per prompt shapes),
then one jitted decode loop per (batch, cache length, max_new_tokens, sampling): a `lax.fori_loop` over
max_new_tokens - 1 `kv_cache.decode_step`s with static shapes. A row stops at its first eos
(any of `eos_ids`): later tokens are `pad_id` and `lengths[b]` counts the tokens up to and including eos.

Sampling (`SamplingConfig`, HF warper order): temperature, then top-k, then top-p (keep the smallest
set of most likely tokens whose probability reaches top_p), then a categorical draw. temperature == 0
is greedy argmax (ties -> lowest id, like torch.argmax).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.model import kv_cache, mrope
from qwen2vl_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0     # 0 = greedy
    top_k: int = 0               # 0 = off
    top_p: float = 1.0           # 1 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0; got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0; got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingConfig()


# ----------------------------------------------------------------------------------------------
# Prompt batch (host side, numpy)

@dataclasses.dataclass(frozen=True)
class PromptBatch:
    input_ids: np.ndarray            # int32 [B, L], left-padded with pad_token_id
    attention_mask: np.ndarray       # int32 [B, L], 1 = real token
    positions: np.ndarray            # int32 [3, B, L] M-RoPE ids (padding = 1, as transformers)
    rope_deltas: np.ndarray          # int32 [B, 1]
    pixel_values: np.ndarray | None          # float32 [sum image patches, 1176]
    image_grid_thw: np.ndarray | None        # int32 [num images, 3]
    pixel_values_videos: np.ndarray | None   # float32 [sum video patches, 1176]
    video_grid_thw: np.ndarray | None        # int32 [num videos, 3]

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


def _split_vision(sample: dict, cfg: ModelConfig, i: int):
    """(image pixels, image grids, video pixels, video grids) of one prompt, in prompt order."""
    grid = np.asarray(sample.get("grid_thw", np.zeros((0, 3))), np.int64).reshape(-1, 3)
    kind = np.asarray(sample.get("vision_kind", np.zeros((0,))), np.int64).reshape(-1)
    pv = np.asarray(sample.get("pixel_values", np.zeros((0, cfg.vision.patch_dim))), np.float32)
    if len(kind) != len(grid):
        raise ValueError(f"prompt {i}: vision_kind has {len(kind)} entries, grid_thw {len(grid)}")
    sizes = grid.prod(axis=1)
    if pv.shape != (int(sizes.sum()), cfg.vision.patch_dim):
        raise ValueError(f"prompt {i}: pixel_values shape {pv.shape}, grid_thw {grid.tolist()} needs "
                         f"({int(sizes.sum())}, {cfg.vision.patch_dim})")
    ids = np.asarray(sample["input_ids"])
    for k, tok in ((0, cfg.image_token_id), (1, cfg.video_token_id)):
        want = int(sizes[kind == k].sum()) // cfg.vision.merge_unit
        got = int((ids == tok).sum())
        if want != got:
            raise ValueError(f"prompt {i}: {got} {'image' if k == 0 else 'video'} pad tokens but the grids "
                             f"give {want} merged tokens")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    parts = {0: ([], []), 1: ([], [])}
    for j, k in enumerate(kind):
        parts[int(k)][0].append(pv[offsets[j]:offsets[j + 1]])
        parts[int(k)][1].append(grid[j])
    return parts


def prepare_prompts(cfg: ModelConfig, prompts: Sequence[dict], pad_multiple: int = 8,
                    length: int | None = None) -> PromptBatch:
    """Left-pads `prompts` (Tokenized samples) into one batch; see the module docstring."""
    if not prompts:
        raise ValueError("no prompts")
    lens = [len(np.asarray(p["input_ids"]).reshape(-1)) for p in prompts]
    if min(lens) == 0:
        raise ValueError(f"empty prompt at index {lens.index(0)}")
    L = -(-max(lens) // pad_multiple) * pad_multiple if length is None else length
    if L < max(lens):
        raise ValueError(f"length {L} < longest prompt {max(lens)}")
    B = len(prompts)
    ids = np.full((B, L), cfg.pad_token_id, np.int32)
    mask = np.zeros((B, L), np.int32)
    img_pv, img_g, vid_pv, vid_g = [], [], [], []
    for i, (p, n) in enumerate(zip(prompts, lens)):
        ids[i, L - n:] = np.asarray(p["input_ids"]).reshape(-1)
        mask[i, L - n:] = 1
        parts = _split_vision(p, cfg, i)
        img_pv += parts[0][0]
        img_g += parts[0][1]
        vid_pv += parts[1][0]
        vid_g += parts[1][1]
    img_grid = np.stack(img_g).astype(np.int32) if img_g else None
    vid_grid = np.stack(vid_g).astype(np.int32) if vid_g else None
    pos, deltas = mrope.get_rope_index(cfg, ids, img_grid, vid_grid, mask)
    return PromptBatch(input_ids=ids, attention_mask=mask, positions=np.asarray(pos, np.int32),
                       rope_deltas=np.asarray(deltas, np.int32).reshape(B, 1),
                       pixel_values=np.concatenate(img_pv).astype(np.float32) if img_pv else None,
                       image_grid_thw=img_grid,
                       pixel_values_videos=np.concatenate(vid_pv).astype(np.float32) if vid_pv else None,
                       video_grid_thw=vid_grid)


# ----------------------------------------------------------------------------------------------
# Sampling

def sample_logits(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """logits [B, V] fp32 -> token ids [B] int32."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits.astype(jnp.float32) / sampling.temperature
    neg = jnp.finfo(jnp.float32).min
    if sampling.top_k > 0:
        k = min(sampling.top_k, x.shape[-1])
        kth = jax.lax.top_k(x, k)[0][:, -1:]                       # [B, 1]
        x = jnp.where(x < kth, neg, x)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-x, axis=-1)                            # descending
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs                 # mass strictly above each token
        keep_sorted = before < sampling.top_p                       # the top token is always kept
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
        x = jnp.where(keep, x, neg)
    return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Decoding loop

def _eos_hit(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    return jnp.any(tokens[:, None] == jnp.asarray(eos_ids, jnp.int32)[None, :], axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling", "eos_ids", "pad_id"))
def _decode_loop(cfg: ModelConfig, params: dict, cache: dict, logits: jax.Array, rng: jax.Array, *,
                 max_new_tokens: int, sampling: SamplingConfig, eos_ids: tuple[int, ...], pad_id: int):
    """From the prefill's last logits [B, V] and cache: tokens [B, max_new_tokens], lengths [B]."""
    B = logits.shape[0]
    rngs = jax.random.split(rng, max_new_tokens)
    first = sample_logits(logits, rngs[0], sampling)
    out = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = _eos_hit(first, eos_ids)

    def body(k, carry):
        out, done, cache = carry
        token = jax.lax.dynamic_slice_in_dim(out, k, 1, axis=1)                 # [B, 1] generated at step k
        pos = kv_cache.decode_positions(cache)                                  # [B, 3, 1] slot + rope_delta
        logits, cache = kv_cache.decode_step(cfg, params, cache, token, pos)
        nxt = jnp.where(done, pad_id, sample_logits(logits, rngs[k + 1], sampling))
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], k + 1, axis=1)
        return out, done | _eos_hit(nxt, eos_ids), cache

    out, done, _ = jax.lax.fori_loop(0, max_new_tokens - 1, body, (out, done, cache))
    is_eos = jnp.any(out[..., None] == jnp.asarray(eos_ids, jnp.int32), axis=-1)     # [B, T]
    lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
    return out, lengths.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: np.ndarray      # int32 [B, max_new_tokens]; pad_id after a row's eos
    lengths: np.ndarray     # int32 [B]; generated tokens up to and including the first eos

    def row(self, b: int, strip_eos: bool = True, eos_ids: Sequence[int] = ()) -> list[int]:
        toks = self.tokens[b, :self.lengths[b]].tolist()
        if strip_eos and toks and toks[-1] in tuple(eos_ids):
            toks = toks[:-1]
        return toks


def default_eos_ids(cfg: ModelConfig) -> tuple[int, ...]:
    """<|im_end|> (the model's eos) and <|endoftext|>, as Qwen2-VL's generation_config."""
    return tuple(dict.fromkeys((cfg.eos_token_id, cfg.pad_token_id)))


def generate(cfg: ModelConfig, params: dict, prompts: PromptBatch | Sequence[dict], *, max_new_tokens: int,
             sampling: SamplingConfig = GREEDY, rng: jax.Array | None = None,
             eos_ids: Sequence[int] | None = None) -> Generation:
    """Generates up to `max_new_tokens` tokens for every prompt (a PromptBatch or Tokenized samples)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    pb = prompts if isinstance(prompts, PromptBatch) else prepare_prompts(cfg, prompts)
    if pb.length + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt length {pb.length} + max_new_tokens {max_new_tokens} exceeds "
                         f"max_position_embeddings {cfg.max_position_embeddings}")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    eos = tuple(int(e) for e in (default_eos_ids(cfg) if eos_ids is None else eos_ids))
    cache = kv_cache.init_cache(cfg, pb.batch_size, pb.length + max_new_tokens)
    logits, cache = kv_cache.prefill(cfg, params, cache, pb.input_ids, pb.attention_mask,
                                     pixel_values=pb.pixel_values, image_grid_thw=pb.image_grid_thw,
                                     pixel_values_videos=pb.pixel_values_videos, video_grid_thw=pb.video_grid_thw,
                                     position_ids=pb.positions)                # [B, V], cache
    tokens, lengths = _decode_loop(cfg, params, cache, logits, rng, max_new_tokens=max_new_tokens,
                                   sampling=sampling, eos_ids=eos, pad_id=int(cfg.pad_token_id))
    return Generation(tokens=np.asarray(tokens), lengths=np.asarray(lengths))
