"""Qwen2-VL model API (functional wrappers around the linen modules in vision.py / decoder.py).

  init_params(cfg, rng) -> params                  plain nested dict (WORKSPACE.md "Parameters"), cfg.param_dtype
  param_logical_axes(cfg) -> same tree of tuples of logical axis names
  forward(cfg, params, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
          video_grid_thw, position_ids) -> logits [B,S,V] fp32      (transformers input layouts; host prep)
  encode_vision(cfg, params, pixel_values [B,P,1176], patch_segment_ids [B,P], patch_positions [B,P,2])
          -> [B,P/4,D]
  forward_hidden(cfg, params, batch) -> [B,S,D]   packed training batch, final norm applied (jittable)
  output_embedding(cfg, params) -> [D,V]
  init_cache / prefill / decode_step / decode_positions      KV cache for generation

Layers are stacked on a leading axis in the params whatever cfg.scan_layers says; with scan_layers=False
the stacked tree is split into per-layer subtrees (`layers_{i}`, `blocks_{i}`) just before `apply`.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.model.config import ModelConfig
from qwen2vl_jax.model.decoder import Decoder
from qwen2vl_jax.model.layers import INIT_STD, dtype_of
from qwen2vl_jax.model.mrope import get_rope_index
from qwen2vl_jax.model.rope import vision_position_ids
from qwen2vl_jax.model.vision_tower import VisionTower


class Qwen2VL(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.visual = VisionTower(cfg)
        self.decoder = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = LMHead(cfg)

    def init_all(self, pixel_values, patch_segment_ids, patch_positions, input_ids, segment_ids, positions):
        vis = self.visual(pixel_values, patch_segment_ids, patch_positions)
        h = self.hidden(input_ids, segment_ids, positions, vis)
        if not self.cfg.tie_word_embeddings:
            self.lm_head.kernel()
        return h

    def encode_vision(self, pixel_values, patch_segment_ids, patch_positions):
        return self.visual(pixel_values, patch_segment_ids, patch_positions)

    def embed(self, input_ids):
        return self.decoder.embed(input_ids)

    def hidden(self, input_ids, segment_ids, positions, vision=None):
        """Packed rule: the k-th vision pad of row b takes vision[b, k]. -> [B,S,D]."""
        x = self.decoder.embed(input_ids)
        if vision is not None:
            x = place_vision(x, _vision_slots(self.cfg, input_ids), vision)
        h, _ = self.decoder(x, segment_ids, positions)
        return h

    def run_decoder(self, embeds, segment_ids, positions, cache=None, q_offset=None, kv_segment_ids=None,
                    return_kv=False):
        return self.decoder(embeds, segment_ids, positions, cache=cache, q_offset=q_offset,
                            kv_segment_ids=kv_segment_ids, return_kv=return_kv)


class LMHead(nn.Module):
    cfg: ModelConfig

    def setup(self):
        self._kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(INIT_STD),
                                                                         ("embed", "vocab")),
                                  (self.cfg.hidden_size, self.cfg.vocab_size), dtype_of(self.cfg.param_dtype))

    def kernel(self):
        return self._kernel


def _vision_slots(cfg: ModelConfig, input_ids):
    return (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)


def place_vision(embeds, is_slot, vision):
    """embeds [B,S,D], is_slot [B,S] bool, vision [B,N,D] -> embeds with the k-th slot of row b = vision[b,k]."""
    k = jnp.cumsum(is_slot.astype(jnp.int32), axis=1) - 1
    k = jnp.clip(k, 0, vision.shape[1] - 1)
    gathered = jnp.take_along_axis(vision, k[..., None], axis=1)
    return jnp.where(is_slot[..., None], gathered.astype(embeds.dtype), embeds)


# ----------------------------------------------------------------------------------------------
# params

def _dummy_inputs(cfg: ModelConfig):
    P, S = 4, 4
    return (jnp.zeros((1, P, cfg.vision.patch_dim), jnp.float32), jnp.ones((1, P), jnp.int32),
            jnp.zeros((1, P, 2), jnp.int32), jnp.zeros((1, S), jnp.int32), jnp.ones((1, S), jnp.int32),
            jnp.zeros((1, 3, S), jnp.int32))


def _boxed_init(cfg: ModelConfig, rng):
    # the one stacked layout; parameters do not depend on the attention backend, and the tiny dummy
    # inputs (4 tokens, 4 patches) are below the splash kernel's 128-row blocks, so init traces xla
    cfg = cfg.replace(scan_layers=True, remat_policy="none", attention_impl="xla")
    return Qwen2VL(cfg).init(rng, *_dummy_inputs(cfg), method=Qwen2VL.init_all)["params"]


def init_params(cfg: ModelConfig, rng) -> dict:
    """Random init like transformers (normal(0.02) kernels/embeddings, zero biases, unit norms).
    Returns a plain nested dict of arrays in cfg.param_dtype (layers stacked on axis 0).

    `rng` (any jax key) seeds an "rbg" key: XLA's RngBitGenerator compiles several times faster than
    threefry for the ~30 initialisers (values are deterministic for a given rng and device layout)."""
    def init(r):
        r = jax.random.wrap_key_data(jax.random.bits(r, (4,), jnp.uint32), impl="rbg")
        return nn.meta.unbox(_boxed_init(cfg, r))
    return jax.jit(init)(rng)


def param_logical_axes(cfg: ModelConfig) -> dict:
    """Tree (same structure as init_params) of tuples of logical axis names."""
    boxed = jax.eval_shape(lambda: _boxed_init(cfg, jax.random.key(0)))
    return jax.tree_util.tree_map(lambda x: tuple(x.names), boxed,
                                  is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _unstack(tree: dict, key: str) -> dict:
    tree = dict(tree)
    stacked = tree.pop(key)
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    for i in range(n):
        tree[f"{key}_{i}"] = jax.tree_util.tree_map(lambda a: a[i], stacked)
    return tree


def _variables(cfg: ModelConfig, params: dict) -> dict:
    if cfg.scan_layers:
        return {"params": params}
    p = dict(params)
    p["decoder"] = _unstack(p["decoder"], "layers")
    if "visual" in p:
        p["visual"] = _unstack(p["visual"], "blocks")
    return {"params": p}


def _apply(cfg, params, method, *args, **kw):
    return Qwen2VL(cfg).apply(_variables(cfg, params), *args, method=method, **kw)


def output_embedding(cfg: ModelConfig, params: dict):
    """[D, V]: lm_head kernel, or the token embedding transposed when tie_word_embeddings."""
    if cfg.tie_word_embeddings:
        return params["decoder"]["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


def _logits(cfg, params, hidden):
    w = output_embedding(cfg, params).astype(hidden.dtype)
    return jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------
# training / packed path (jittable)

def encode_vision(cfg: ModelConfig, params: dict, pixel_values, patch_segment_ids, patch_positions):
    """pixel_values [B,P,patch_dim], patch_segment_ids [B,P] (0 pad), patch_positions [B,P,2] -> [B,P/4,D]."""
    return _apply(cfg, params, Qwen2VL.encode_vision, jnp.asarray(pixel_values), jnp.asarray(patch_segment_ids),
                  jnp.asarray(patch_positions))


def forward_hidden(cfg: ModelConfig, params: dict, batch: dict):
    """Packed batch (WORKSPACE.md) -> hidden [B,S,D] after the final norm.

    Uses input_ids, segment_ids, positions [B,3,S]; with pixel_values [B,P,1176] also patch_segment_ids and
    patch_positions: the k-th image/video pad of row b takes merged vision token k of row b.
    """
    vision = None
    if batch.get("pixel_values") is not None:
        vision = encode_vision(cfg, params, batch["pixel_values"], batch["patch_segment_ids"],
                               batch["patch_positions"])
    return _apply(cfg, params, Qwen2VL.hidden, batch["input_ids"], batch["segment_ids"], batch["positions"], vision)


# ----------------------------------------------------------------------------------------------
# transformers-layout inputs (host-side preparation)

def _as_grid(grid, name: str, m: int) -> np.ndarray:
    g = np.asarray(grid)
    if g.ndim != 2 or g.shape[1] != 3:
        raise ValueError(f"{name} must have shape [num, 3] (t, h, w); got shape {g.shape}")
    if not np.issubdtype(g.dtype, np.integer):
        raise ValueError(f"{name} must be integers; got dtype {g.dtype}")
    if (g <= 0).any():
        raise ValueError(f"{name} has non-positive entries: {g.tolist()}")
    bad = [r for r in g.tolist() if r[1] % m or r[2] % m]
    if bad:
        raise ValueError(f"{name} rows {bad}: h and w must be multiples of spatial_merge_size {m}")
    return g.astype(np.int64)


def vision_inputs(cfg: ModelConfig, pixel_values, grid_thw, name: str):
    """Validates one transformers vision input and builds the packed tower inputs for a single row.

    pixel_values [N, patch_dim] with N = sum(t*h*w); grid_thw [k, 3]. Returns (pixel_values [1,N,C],
    patch_segment_ids [1,N] (one id per temporal slice of each item, from 1), patch_positions [1,N,2]).
    """
    v = cfg.vision
    g = _as_grid(grid_thw, f"{name}_grid_thw", v.spatial_merge_size)
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
    rope_deltas [B,1], and "vision": None or the `vision_slice_rows` dict (images and videos). Raises ValueError on malformed grids, pixel rows that do not match the grids, or a
    count of <|image_pad|> / <|video_pad|> tokens that differs from the merged patch count.
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


def _embed_with_vision(cfg, params, ids, vision):
    """Token embeddings with transformers' placement: image features fill <|image_pad|> tokens in row-major
    order over the whole batch, video features fill <|video_pad|> tokens. vision: `vision_slice_rows`
    dict or None. -> [B,S,D]."""
    x = _apply(cfg, params, Qwen2VL.embed, ids)
    if vision is None:
        return x
    feats = encode_vision(cfg, params, vision["pixel_values"], vision["patch_segment_ids"],
                          vision["patch_positions"])                                     # [R, Pm/4, D]
    feats = feats.reshape(-1, feats.shape[-1])
    B, S, D = x.shape
    for name, tok in (("image", cfg.image_token_id), ("video", cfg.video_token_id)):
        if f"take_{name}" in vision:
            x = place_vision(x.reshape(1, B * S, D), (ids == tok).reshape(1, B * S),
                             feats[vision[f"take_{name}"]][None]).reshape(B, S, D)
    return x


@functools.partial(jax.jit, static_argnums=0)
def _forward_core(cfg, params, ids, seg, positions, vision):
    x = _embed_with_vision(cfg, params, ids, vision)
    h, _ = _apply(cfg, params, Qwen2VL.run_decoder, x, seg, positions)
    return _logits(cfg, params, h)


def forward(cfg: ModelConfig, params: dict, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
            pixel_values_videos=None, video_grid_thw=None, position_ids=None):
    """transformers-compatible forward -> logits [B,S,V] float32.

    input_ids [B,S]; attention_mask [B,S] 0/1 (left or right padding); pixel_values [N,1176] with
    image_grid_thw [k,3]; pixel_values_videos [Nv,1176] with video_grid_thw [kv,3]; position_ids [3,B,S]
    (computed with mrope.get_rope_index when None). Logits at padded positions are unspecified.
    """
    p = prepare_inputs(cfg, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                       video_grid_thw, position_ids)
    return _forward_core(cfg, params, p["input_ids"], p["segment_ids"], p["positions"], p["vision"])


# ----------------------------------------------------------------------------------------------
# KV cache

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
    x = _embed_with_vision(cfg, params, ids, vision)
    h, (k, v) = _apply(cfg, params, Qwen2VL.run_decoder, x, seg, positions, return_kv=True)
    cache = dict(cache)
    cache["k"] = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, 0, 0, 0, 0))
    cache["v"] = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, 0, 0, 0, 0))
    cache["segment_ids"] = jax.lax.dynamic_update_slice(jnp.zeros_like(cache["segment_ids"]), seg, (0, 0))
    cache["index"] = jnp.asarray(ids.shape[1], jnp.int32)
    cache["rope_deltas"] = rope_deltas
    return _logits(cfg, params, h[:, -1]), cache


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
    p = prepare_inputs(cfg, ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
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
    x = _apply(cfg, params, Qwen2VL.embed, token)
    h, (k, v) = _apply(cfg, params, Qwen2VL.run_decoder, x, jnp.ones((B, T), jnp.int32), jnp.asarray(positions),
                       cache=(cache["k"], cache["v"]), q_offset=idx, kv_segment_ids=kv_seg, return_kv=True)
    new = dict(cache)
    new["k"] = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, 0, idx, 0, 0))
    new["v"] = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, 0, idx, 0, 0))
    new["segment_ids"] = kv_seg
    new["index"] = idx + T
    return _logits(cfg, params, h[:, -1]), new
