"""Qwen2 decoder (Flax linen): GQA attention with M-RoPE, SwiGLU MLP, RMSNorm, stacked layers.

Shapes: B batch, S tokens, D hidden, Hq / Hkv query / kv heads, hd head_dim, I SwiGLU width, L layers,
M KV-cache slots. Parameter names and logical axes follow docs/architecture.md "Parameters".

Layer (pre-norm, as transformers Qwen2VLDecoderLayer):
  h = x + o_proj(attn(rope(q_proj(rms(x))), rope(k_proj(rms(x))), v_proj(rms(x))))     q/k/v with bias
  y = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))
RMSNorm: fp32 x * rsqrt(mean(x^2) + eps), cast to the input dtype, then * scale.
Attention mask: causal within a segment (packed samples never see each other; segment 0 = padding).
Layers are stacked on a leading axis: nn.scan (scan_layers=True) or a python loop over the same stacked
tree (model.py unstacks it into `layers_{i}` before apply), each optionally rematerialised.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2vl_jax.model.attention import attention
from qwen2vl_jax.model.config import ModelConfig
from qwen2vl_jax.model.layers import INIT_STD, Linear, RMSNorm, checkpoint_name, dtype_of, stack_layers
from qwen2vl_jax.model.partitioning import constrain
from qwen2vl_jax.model.rope import apply_rotary, mrope_cos_sin

# ----------------------------------------------------------------------------------------------
# decoder

class SelfAttention(nn.Module):
    """GQA self-attention with q/k/v bias and M-RoPE. h [B,T,D] -> (out [B,T,D], (k, v) [B,T,Hkv,hd]).

    ctx: q_segment_ids [B,T], cos/sin [B,T,hd]; for cached decoding also kv_segment_ids [B,M] (already
    marking the new tokens) and q_offset (int32 scalar: cache slot of query 0). layer_cache: (k, v)
    [B,M,Hkv,hd] or None; the new k/v are written at slots q_offset.. before attending.
    """
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h, ctx, layer_cache):
        cfg = self.cfg
        lin = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        D, Hq, Hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_ax, kv_ax = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim")
        q = Linear("btd,dhk->bthk", (D, Hq, hd), q_ax, (Hq, hd), q_ax[1:], **lin, name="q_proj")(h)
        k = Linear("btd,dhk->bthk", (D, Hkv, hd), kv_ax, (Hkv, hd), kv_ax[1:], **lin, name="k_proj")(h)
        v = Linear("btd,dhk->bthk", (D, Hkv, hd), kv_ax, (Hkv, hd), kv_ax[1:], **lin, name="v_proj")(h)
        q = constrain(q, ("batch", "length", "act_heads", None))
        k = constrain(k, ("batch", "length", "act_kv_heads", None))
        v = constrain(v, ("batch", "length", "act_kv_heads", None))
        cos, sin = ctx["cos"][:, :, None, :], ctx["sin"][:, :, None, :]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = checkpoint_name(k, "qkv"), checkpoint_name(v, "qkv")
        if layer_cache is None:
            a = attention(q, k, v, q_segment_ids=ctx["q_segment_ids"], kv_segment_ids=ctx["q_segment_ids"],
                          causal=True, impl=cfg.attention_impl, block=cfg.attention_block_decoder)
        else:
            ck, cv = layer_cache
            idx = ctx["q_offset"]
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, idx, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, idx, 0, 0))
            a = attention(q, ck.astype(q.dtype), cv.astype(q.dtype), q_segment_ids=ctx["q_segment_ids"],
                          kv_segment_ids=ctx["kv_segment_ids"], causal=True, q_offset=idx)
        a = checkpoint_name(constrain(a, ("batch", "length", "act_heads", None)), "attn_out")
        out = Linear("bthk,hkd->btd", (Hq, hd, D), ("heads", "head_dim", "embed"), **lin, name="o_proj")(a)
        return out, (k, v)


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases. x [B,T,D] -> [B,T,D]."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        lin = dict(dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        D, I = cfg.hidden_size, cfg.intermediate_size
        g = Linear("btd,di->bti", (D, I), ("embed", "mlp"), **lin, name="gate_proj")(x)
        u = Linear("btd,di->bti", (D, I), ("embed", "mlp"), **lin, name="up_proj")(x)
        y = constrain(jax.nn.silu(g) * u, ("batch", "length", "act_mlp"))
        return Linear("bti,id->btd", (I, D), ("mlp", "embed"), **lin, name="down_proj")(y)


class DecoderLayer(nn.Module):
    """One Qwen2 layer: carry x [B,T,D] -> (x, ys); ys = (k_new, v_new) [B,T,Hkv,hd] after RoPE (what a KV
    cache stores) when return_kv, else None (training: nothing stacked across layers)."""
    cfg: ModelConfig
    return_kv: bool = False

    @nn.compact
    def __call__(self, x, ctx, layer_cache):
        cfg = self.cfg
        pdt = dtype_of(cfg.param_dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        h = RMSNorm(cfg.rms_norm_eps, pdt, name="input_layernorm")(x)
        a, kv = SelfAttention(cfg, name="self_attn")(h, ctx, layer_cache)
        x = x + a
        h = RMSNorm(cfg.rms_norm_eps, pdt, name="post_attention_layernorm")(x)
        x = x + Mlp(cfg, name="mlp")(h)
        return constrain(x, ("batch", "length", "act_embed")), (kv if self.return_kv else None)


class Decoder(nn.Module):
    """Token embedding, L layers, final RMSNorm. Methods: embed(ids) and __call__(embeds, ...)."""
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype),
                                  name="embed_tokens")

    def embed(self, input_ids):
        """input_ids [B,T] int -> [B,T,D] cfg.dtype."""
        return self.embed_tokens(input_ids)

    @nn.compact
    def __call__(self, embeds, segment_ids, positions, cache=None, q_offset=None, kv_segment_ids=None,
                 return_kv: bool = False):
        """embeds [B,T,D], segment_ids [B,T] (0 pad), positions [B,3,T] M-RoPE ids.

        cache: None or (k, v) stacked [L,B,M,Hkv,hd] (decode: new tokens written at slots q_offset..,
        attention over all M slots masked by kv_segment_ids [B,M]).
        Returns (hidden [B,T,D] after the final norm, (k_new, v_new) [L,B,T,Hkv,hd] if return_kv else None).
        """
        cfg = self.cfg
        cos, sin = mrope_cos_sin(positions, cfg.head_dim, cfg.mrope_section, cfg.rope_theta, embeds.dtype)
        ctx = {"q_segment_ids": segment_ids, "cos": cos, "sin": sin}
        if cache is not None:
            ctx.update(kv_segment_ids=kv_segment_ids, q_offset=q_offset)
        x = constrain(embeds, ("batch", "length", "act_embed"))
        x, kv = stack_layers(DecoderLayer, cfg, cfg.num_hidden_layers, "layers", x, ctx, cache, return_kv=return_kv)
        return RMSNorm(cfg.rms_norm_eps, dtype_of(cfg.param_dtype), name="norm")(x), kv


class Embed(nn.Module):
    num: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.embedding = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(INIT_STD),
                                                                              ("vocab", "embed")),
                                    (self.num, self.features), self.param_dtype)

    def __call__(self, ids):
        """ids [B,T] -> [B,T,D]. The lookup reads the table split over "vocab" only (its FSDP split of
        "embed" gathered first, as for any FSDP weight): from a table split on its width the rows would come
        out split on D, and XLA can only move them to the activations' batch split by replicating the
        whole [B,T,D] on every device ("involuntary full rematerialization")."""
        table = constrain(self.embedding, ("vocab", None))
        return jnp.take(table, ids, axis=0).astype(self.dtype)
