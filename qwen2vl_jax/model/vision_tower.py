"""Qwen2-VL vision tower (ViT with 2-D RoPE + 2x2 PatchMerger), Flax linen, batched over packed rows.

Input per row b: pixel_values [B,P,1176] (processor patch rows: uint8 raw values, normalised here in fp32 as
the processor does (pixels.py), or float values the processor already normalised), patch_segment_ids [B,P]
(one id per image / per temporal slice of a video, 0 = padding), patch_positions [B,P,2] (h, w) 2-D RoPE ids.
  x = pixel_values @ patch_embed.kernel                          [B,P,E]   (Conv3d with stride = kernel)
  cos/sin = vision_rope(patch_positions, hd)                    [B,P,hd]  fp32
  L x block:  x += proj(attn(rope(q), rope(k), v))  with q,k,v = qkv(LayerNorm1(x)), block-diagonal non-causal
              x += fc2(quick_gelu(fc1(LayerNorm2(x))))          LayerNorm eps cfg.vision.layer_norm_eps (1e-6)
  merger: LayerNorm(x) -> [B,P/4,4E] (4 consecutive rows = one 2x2 window) -> Linear -> GELU(erf) -> Linear
  output [B,P/4,D]
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.model.attention import attention
from qwen2vl_jax.model.config import ModelConfig
from qwen2vl_jax.model import pixels
from qwen2vl_jax.model.layers import LayerNorm, Linear, checkpoint_name, dtype_of, stack_layers
from qwen2vl_jax.model.partitioning import constrain
from qwen2vl_jax.model.rope import apply_rotary, vision_rope


def normalize_pixels(raw):
    """uint8 [..., C*T*p*p] raw patch values (channel-major columns) -> float32 [..., C*T*p*p], the processor's
    (v / 255 - mean[c]) / std[c] as one fp32 multiply-add with constants derived in float64. It equals the
    processor's float32 arithmetic to fp32 rounding (|difference| <= 2.4e-7 = one ulp at the values' scale,
    |x| < 2.2); the division form is no closer, since XLA turns a division by a broadcast into a multiply."""
    mean, std = np.asarray(pixels.IMAGE_MEAN, np.float64), np.asarray(pixels.IMAGE_STD, np.float64)
    scale = (pixels.RESCALE_FACTOR / std).astype(np.float32)[:, None]     # [C, 1]
    shift = (-mean / std).astype(np.float32)[:, None]
    x = raw.astype(jnp.float32).reshape(*raw.shape[:-1], len(mean), raw.shape[-1] // len(mean))   # [..., C, T*p*p]
    return (x * scale + shift).reshape(raw.shape)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


class VisionAttention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, ctx):
        v = self.cfg.vision
        lin = dict(dtype=dtype_of(self.cfg.dtype), param_dtype=dtype_of(self.cfg.param_dtype))
        E, H, hd = v.embed_dim, v.num_heads, v.head_dim
        # Head-major throughout ([3,B,H,P,hd] out of the projection, [B,H,P,hd] into and out of attention):
        # the Pallas kernels' own layout, so no transpose runs around them in the forward or backward pass
        # and the saved projection output is stacked by the layer scan as it was produced.
        qkv = Linear("bpe,ekhd->kbhpd", (E, 3, H, hd), ("vision_embed", "qkv", "vision_heads", "head_dim"),
                     (3, H, hd), ("qkv", "vision_heads", "head_dim"), **lin, name="qkv")(x)
        qkv = checkpoint_name(constrain(qkv, (None, "batch", "act_heads", "patches", None)), "qkv")
        q, k, val = qkv[0], qkv[1], qkv[2]                                          # [B,H,P,hd]
        cos, sin = ctx["cos"][:, None], ctx["sin"][:, None]                         # [B,1,P,hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        seg = ctx["segment_ids"]
        # every image (video slice) is one contiguous run of whole 2x2 merge windows: at most P / 4 runs
        a = attention(q, k, val, q_segment_ids=seg, kv_segment_ids=seg, causal=False, impl=self.cfg.attention_impl,
                      max_segments=seg.shape[1] // v.merge_unit, block=self.cfg.attention_block_vision,
                      heads_major=True)
        a = checkpoint_name(constrain(a, ("batch", "act_heads", "patches", None)), "attn_out")
        return Linear("bhpd,hde->bpe", (H, hd, E), ("vision_heads", "head_dim", "vision_embed"), (E,),
                      ("vision_embed",), **lin, name="proj")(a)


class VisionMlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        v = self.cfg.vision
        if v.hidden_act != "quick_gelu":
            raise ValueError(f"vision hidden_act {v.hidden_act!r} unsupported (Qwen2-VL uses quick_gelu)")
        lin = dict(dtype=dtype_of(self.cfg.dtype), param_dtype=dtype_of(self.cfg.param_dtype))
        E, M = v.embed_dim, v.mlp_dim
        h = Linear("bpe,em->bpm", (E, M), ("vision_embed", "vision_mlp"), (M,), ("vision_mlp",), **lin,
                   name="fc1")(x)
        h = constrain(quick_gelu(h), ("batch", "patches", "act_mlp"))
        return Linear("bpm,me->bpe", (M, E), ("vision_mlp", "vision_embed"), (E,), ("vision_embed",), **lin,
                      name="fc2")(h)


class VisionBlock(nn.Module):
    """carry x [B,P,E]; ctx {segment_ids [B,P], cos/sin [B,P,hd]} -> (x, None)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, ctx, _unused):
        v, pdt = self.cfg.vision, dtype_of(self.cfg.param_dtype)
        x = constrain(x, ("batch", "patches", "act_embed"))
        x = x + VisionAttention(self.cfg, name="attn")(LayerNorm(v.layer_norm_eps, pdt, name="norm1")(x), ctx)
        x = x + VisionMlp(self.cfg, name="mlp")(LayerNorm(v.layer_norm_eps, pdt, name="norm2")(x))
        return constrain(x, ("batch", "patches", "act_embed")), None


class PatchMerger(nn.Module):
    """x [B,P,E] -> [B,P/4,D]: LayerNorm, group 4 consecutive rows, Linear(4E,4E), exact GELU, Linear(4E,D)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        v = self.cfg.vision
        lin = dict(dtype=dtype_of(self.cfg.dtype), param_dtype=dtype_of(self.cfg.param_dtype))
        B, P, E = x.shape
        F, D = v.merger_hidden, self.cfg.hidden_size
        x = LayerNorm(v.layer_norm_eps, dtype_of(self.cfg.param_dtype), name="ln_q")(x)
        x = x.reshape(B, P // v.merge_unit, F)
        x = Linear("bpf,fg->bpg", (F, F), ("merger_in", "merger_mlp"), (F,), ("merger_mlp",), **lin,
                   name="mlp_0")(x)
        x = jax.nn.gelu(x, approximate=False)
        return Linear("bpf,fd->bpd", (F, D), ("merger_mlp", "embed"), (D,), ("embed",), **lin, name="mlp_2")(x)


class VisionTower(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, pixel_values, patch_segment_ids, patch_positions):
        """pixel_values [B,P,patch_dim], patch_segment_ids [B,P], patch_positions [B,P,2] -> [B,P/4,D]."""
        cfg, v = self.cfg, self.cfg.vision
        B, P, C = pixel_values.shape
        if C != v.patch_dim:
            raise ValueError(f"pixel_values rows have {C} values; expected patch_dim {v.patch_dim}")
        if P % v.merge_unit:
            raise ValueError(f"patches per row P={P} must be a multiple of {v.merge_unit} (spatial merge)")
        if pixel_values.dtype == jnp.uint8:
            pixel_values = normalize_pixels(pixel_values)
        elif not jnp.issubdtype(pixel_values.dtype, jnp.floating):
            raise ValueError(f"pixel_values dtype {pixel_values.dtype}: expected uint8 (raw patch values) or a "
                             "float dtype (values the processor normalised)")
        dt = dtype_of(cfg.dtype)
        x = Linear("bpc,ce->bpe", (C, v.embed_dim), ("patch", "vision_embed"), dtype=dt,
                   param_dtype=dtype_of(cfg.param_dtype), name="patch_embed")(pixel_values)
        cos, sin = vision_rope(patch_positions, v.head_dim)
        ctx = {"segment_ids": patch_segment_ids, "cos": cos, "sin": sin}
        x, _ = stack_layers(VisionBlock, cfg, v.depth, "blocks", x, ctx)
        return PatchMerger(cfg, name="merger")(x)
