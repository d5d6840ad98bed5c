"""Qwen2-VL model: the linen wiring of vision tower and decoder, and its functional API.

  init_params(cfg, rng) -> params                  plain nested dict (docs/architecture.md "Parameters"), cfg.param_dtype
  param_logical_axes(cfg) -> same tree of tuples of logical axis names
  forward(cfg, params, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
          video_grid_thw, position_ids) -> logits [B,S,V] fp32      (transformers input layouts, prepared
          on the host by inputs.prepare_inputs)
  encode_vision(cfg, params, pixel_values [B,P,1176], patch_segment_ids [B,P], patch_positions [B,P,2])
          -> [B,P/4,D]     pixel_values uint8 raw (normalised on device) or normalised float
  forward_hidden(cfg, params, batch) -> [B,S,D]   packed training batch, final norm applied (jittable)
  output_embedding(cfg, params) -> [D,V]
  embed_with_vision / lm_logits / apply_method       building blocks shared with kv_cache.py

The KV cache (init_cache, prefill, decode_step) lives in kv_cache.py; host-side checks and index building
for transformers-layout inputs in inputs.py.

Layers are stacked on a leading axis in the params whatever cfg.scan_layers says; with scan_layers=False
the stacked tree is split into per-layer subtrees (`layers_{i}`, `blocks_{i}`) just before `apply`.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2vl_jax.model import inputs
from qwen2vl_jax.model.config import ModelConfig
from qwen2vl_jax.model.decoder import Decoder
from qwen2vl_jax.model.layers import INIT_STD, dtype_of
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


def apply_method(cfg: ModelConfig, params: dict, method, *args, **kw):
    """Runs one `Qwen2VL` method on the stacked params (unstacked first when cfg.scan_layers is False)."""
    return Qwen2VL(cfg).apply(_variables(cfg, params), *args, method=method, **kw)


def output_embedding(cfg: ModelConfig, params: dict):
    """[D, V]: lm_head kernel, or the token embedding transposed when tie_word_embeddings."""
    if cfg.tie_word_embeddings:
        return params["decoder"]["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


def lm_logits(cfg: ModelConfig, params: dict, hidden):
    """hidden [..., D] -> logits [..., V] float32 (dot product in the hidden dtype, fp32 accumulation)."""
    w = output_embedding(cfg, params).astype(hidden.dtype)
    return jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------
# training / packed path (jittable)

def encode_vision(cfg: ModelConfig, params: dict, pixel_values, patch_segment_ids, patch_positions):
    """pixel_values [B,P,patch_dim] (uint8 raw patch values, normalised on device, or the processor's normalised
    floats), patch_segment_ids [B,P] (0 pad), patch_positions [B,P,2] -> [B,P/4,D]."""
    return apply_method(cfg, params, Qwen2VL.encode_vision, jnp.asarray(pixel_values),
                        jnp.asarray(patch_segment_ids), jnp.asarray(patch_positions))


def forward_hidden(cfg: ModelConfig, params: dict, batch: dict):
    """Packed batch (docs/architecture.md) -> hidden [B,S,D] after the final norm.

    Uses input_ids, segment_ids, positions [B,3,S]; with pixel_values [B,P,1176] (uint8 raw patch values, as
    the packer writes them) also patch_segment_ids and patch_positions: the k-th image/video pad of row b
    takes merged vision token k of row b.
    """
    vision = None
    if batch.get("pixel_values") is not None:
        vision = encode_vision(cfg, params, batch["pixel_values"], batch["patch_segment_ids"],
                               batch["patch_positions"])
    return apply_method(cfg, params, Qwen2VL.hidden, batch["input_ids"], batch["segment_ids"], batch["positions"],
                        vision)


def embed_with_vision(cfg: ModelConfig, params: dict, ids, vision):
    """Token embeddings with transformers' placement: image features fill <|image_pad|> tokens in row-major
    order over the whole batch, video features fill <|video_pad|> tokens. ids [B,S]; vision: the
    `inputs.vision_slice_rows` dict or None. -> [B,S,D]."""
    x = apply_method(cfg, params, Qwen2VL.embed, ids)
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
    x = embed_with_vision(cfg, params, ids, vision)
    h, _ = apply_method(cfg, params, Qwen2VL.run_decoder, x, seg, positions)
    return lm_logits(cfg, params, h)


def forward(cfg: ModelConfig, params: dict, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
            pixel_values_videos=None, video_grid_thw=None, position_ids=None):
    """transformers-compatible forward -> logits [B,S,V] float32.

    input_ids [B,S]; attention_mask [B,S] 0/1 (left or right padding); pixel_values [N,1176] with
    image_grid_thw [k,3]; pixel_values_videos [Nv,1176] with video_grid_thw [kv,3]; position_ids [3,B,S]
    (computed with mrope.get_rope_index when None). Logits at padded positions are unspecified.
    """
    p = inputs.prepare_inputs(cfg, input_ids, attention_mask, pixel_values, image_grid_thw,
                              pixel_values_videos, video_grid_thw, position_ids)
    return _forward_core(cfg, params, p["input_ids"], p["segment_ids"], p["positions"], p["vision"])
