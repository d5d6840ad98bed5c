"""KV cache for generation: a fixed-size cache pytree, the prompt prefill and the one-token decode step.

  init_cache(cfg, batch, max_len) -> cache
  prefill(cfg, params, cache, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
          video_grid_thw, position_ids) -> (last logits [B,V], cache)     (left-padded prompts)
  decode_positions(cache, steps) -> M-RoPE ids [B,3,steps] of the next tokens
  decode_step(cfg, params, cache, token [B,T], positions [B,3,T]) -> (last logits [B,V], cache)   (jittable)

Shapes are static (max_len slots), so every decode step reuses one compiled program.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.model import inputs, model
from qwen2vl_jax.model.config import ModelConfig
from qwen2vl_jax.model.layers import dtype_of


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict:
    """Empty KV cache (a pytree of arrays; static shapes):
      k, v          [L, B, max_len, Hkv, hd]  cfg.dtype   keys after RoPE / values, slot i = token i
      segment_ids   [B, max_len] int32        1 = slot holds a real token, 0 = empty or left padding
      index         [] int32                  next slot to write (= tokens so far, padding included)
      rope_deltas   [B, 1] int32              M-RoPE offset: a token in slot i has position i + delta
    """
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    dt = dtype_of(cfg.dtype)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt), "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32), "rope_deltas": jnp.zeros((batch, 1), jnp.int32)}


@functools.partial(jax.jit, static_argnums=0)
def _prefill_core(cfg, params, cache, ids, seg, positions, rope_deltas, vision):
    x = model.embed_with_vision(cfg, params, ids, vision)
    h, (k, v) = model.apply_method(cfg, params, model.Qwen2VL.run_decoder, x, seg, positions, return_kv=True)
    cache = dict(cache)
    cache["k"] = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, 0, 0, 0, 0))
    cache["v"] = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, 0, 0, 0, 0))
    cache["segment_ids"] = jax.lax.dynamic_update_slice(jnp.zeros_like(cache["segment_ids"]), seg, (0, 0))
    cache["index"] = jnp.asarray(ids.shape[1], jnp.int32)
    cache["rope_deltas"] = rope_deltas
    return model.lm_logits(cfg, params, h[:, -1]), cache


def prefill(cfg: ModelConfig, params: dict, cache: dict, input_ids, attention_mask=None, pixel_values=None,
            image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None, position_ids=None):
    """Runs a LEFT-padded prompt batch (transformers layouts, as `forward`) into an empty cache.

    Writes slots [0, S) (S = input_ids.shape[1] <= max_len), sets index = S and rope_deltas from the
    M-RoPE ids (get_rope_index, or the given position_ids). Returns (logits of the last column [B,V] fp32,
    cache). Host-side prep, then one jitted call (compiled per (S, vision shapes)).
    """
    ids = np.asarray(input_ids)
    S, M = ids.shape[-1], cache["segment_ids"].shape[1]
    if S > M:
        raise ValueError(f"prompt length {S} exceeds the cache length {M}")
    if ids.shape[0] != cache["segment_ids"].shape[0]:
        raise ValueError(f"prompt batch {ids.shape[0]} != cache batch {cache['segment_ids'].shape[0]}")
    if attention_mask is not None and not np.all(np.asarray(attention_mask)[:, -1] == 1):
        raise ValueError("prefill needs left padding: attention_mask[:, -1] must be 1 in every row; got "
                         f"{np.asarray(attention_mask)[:, -1].tolist()}")
    p = inputs.prepare_inputs(cfg, ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                              video_grid_thw, position_ids)
    return _prefill_core(cfg, params, cache, p["input_ids"], p["segment_ids"], p["positions"], p["rope_deltas"],
                         p["vision"])


def decode_positions(cache: dict, steps: int = 1):
    """M-RoPE ids [B,3,steps] for the next `steps` tokens: slot index + rope_delta on all three rows
    (transformers: cache_position + rope_deltas)."""
    pos = cache["index"] + jnp.arange(steps, dtype=jnp.int32)[None, :] + cache["rope_deltas"]     # [B,steps]
    return jnp.broadcast_to(pos[:, None, :], (pos.shape[0], 3, steps))


def decode_step(cfg: ModelConfig, params: dict, cache: dict, token, positions):
    """One cached step (jittable; cfg static). token [B,T] int (usually T=1) written at slots
    index..index+T-1; positions [B,3,T] (see decode_positions). Returns (logits of the last new token
    [B,V] fp32, cache with index += T). The caller keeps index + T <= max_len (overflow is not checked:
    dynamic_update_slice would clamp and overwrite the last slots).
    """
    token = jnp.asarray(token, jnp.int32)
    B, T = token.shape
    idx = cache["index"]
    kv_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], jnp.ones((B, T), jnp.int32), (0, idx))
    x = model.apply_method(cfg, params, model.Qwen2VL.embed, token)
    h, (k, v) = model.apply_method(cfg, params, model.Qwen2VL.run_decoder, x, jnp.ones((B, T), jnp.int32),
                                   jnp.asarray(positions), cache=(cache["k"], cache["v"]), q_offset=idx,
                                   kv_segment_ids=kv_seg, return_kv=True)
    new = dict(cache)
    new["k"] = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, 0, idx, 0, 0))
    new["v"] = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, 0, idx, 0, 0))
    new["segment_ids"] = kv_seg
    new["index"] = idx + T
    return model.lm_logits(cfg, params, h[:, -1]), new
