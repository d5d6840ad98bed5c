"""Analytic FLOPs against a hand count for the "test" config; param counts against the model and docs/qwen2vl.md §1.3."""
import math

import numpy as np
import pytest

from qwen2vl_jax.train import chips, flops
from qwen2vl_jax.model.config import get_config

CFG = get_config("test")  # D=64 I=128 L=2 Hq=4 Hkv=2 hd=16 V=2048; ViT E=32 M=128 depth 2


def _hand_batch():
    # one row, S=16: text segments of 10 and 4 tokens + 2 padding; P=8 patches: one image of 8 patches
    seg = np.array([[1] * 10 + [2] * 4 + [0] * 2])
    pseg = np.array([[1] * 8])
    return {"input_ids": np.zeros((1, 16), np.int32), "segment_ids": seg, "patch_segment_ids": pseg}


def test_hand_count_test_config():
    # per decoder token, one layer: q 2*64*64=8192, k+v 2*2*64*32=8192, o 8192, MLP 3*2*64*128=49152
    dec_tok = 2 * (8192 + 8192 + 8192 + 49152)                     # = 147456 for 2 layers
    head_tok = 2 * 64 * 2048                                       # = 262144
    text_pair = 2 * (4 * 4 * 16)                                   # 2 layers x 4*Hq*hd = 512
    patch_embed = 2 * 1176 * 32                                    # = 75264
    vit_patch = 2 * (2 * 32 * 96 + 2 * 32 * 32 + 2 * 32 * 128 + 2 * 128 * 32)   # = 49152
    patch_pair = 2 * (4 * 32)                                      # = 256
    merged = 2 * 128 * 128 + 2 * 128 * 64                          # = 49152
    assert flops.forward_per_unit(CFG) == {
        "decoder_token": dec_tok, "lm_head_token": head_tok, "text_pair": text_pair,
        "patch_embed": patch_embed, "vit_patch": vit_patch, "patch_pair": patch_pair, "merged_token": merged}

    b = _hand_batch()
    tokens, patches = 16, 8
    text_pairs = 10 * 11 // 2 + 4 * 5 // 2                         # 55 + 10 = 65 causal pairs
    patch_pairs = 8 * 8                                            # 64 bidirectional pairs
    assert flops.attention_pairs(b["segment_ids"], causal=True) == 65
    assert flops.attention_pairs(b["patch_segment_ids"], causal=False) == 64

    fwd = (tokens * (dec_tok + head_tok) + text_pairs * text_pair + patches * (patch_embed + vit_patch)
           + patch_pairs * patch_pair + patches // 4 * merged)
    # stage 2: 3x forward, except the patch embedding (no input gradient: 2x)
    stage2 = 3 * fwd - patches * patch_embed
    assert flops.batch_flops(CFG, b, ("vision_tower", "merger", "llm")).total == stage2
    # stage 1: LLM frozen -> decoder, head and attention at 2x (input gradients only); ViT and merger 3x
    stage1 = (2 * (tokens * (dec_tok + head_tok)) + 3 * text_pairs * text_pair
              + patches * (2 * patch_embed + 3 * vit_patch) + 3 * patch_pairs * patch_pair + 3 * 2 * merged)
    assert flops.batch_flops(CFG, b, ("vision_tower", "merger")).total == stage1
    # stage 3: tower frozen -> forward only; merger 3x (dX for its 2nd matmul + dW), LLM 3x
    stage3 = (3 * tokens * (dec_tok + head_tok) + 3 * text_pairs * text_pair
              + patches * (patch_embed + vit_patch) + patch_pairs * patch_pair + 3 * 2 * merged)
    assert flops.batch_flops(CFG, b, ("merger", "llm")).total == stage3


def test_param_counts_match_reference_table():
    # docs/qwen2vl.md §1.3 (official checkpoints)
    for name, vit, merger, llm, total in (("2b", 631_183_360, 34_087_936, 1_543_714_304, 2_208_985_600),
                                          ("7b", 631_183_360, 44_575_744, 7_615_616_512, 8_291_375_616),
                                          ("72b", 631_183_360, 68_173_312, 72_706_203_648, 73_405_560_320)):
        n = flops.param_counts(get_config(name))
        assert n["vision_tower"] == vit and n["merger"] == merger
        assert n["embedding"] + n["decoder"] == llm and n["total"] == total


def test_param_counts_match_model_init():
    model = pytest.importorskip("qwen2vl_jax.model.model")
    import jax
    for name in ("test", "tiny"):
        cfg = get_config(name)
        shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
        assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == flops.param_counts(cfg)["total"]


def test_six_nd_and_mfu():
    cfg = get_config("7b")
    n = flops.param_counts(cfg)
    assert flops.six_nd(cfg, tokens=4096, patches=0) == 6 * 4096 * n["decoder"]
    # the analytic stage-2 count without attention equals 6ND up to the patch-embed input gradient
    f = flops.step_flops(cfg, tokens=4096, patches=4 * 1024, text_pairs=0, patch_pairs=0)
    six = flops.six_nd(cfg, tokens=4096, patches=4 * 1024)
    assert abs(f.total - six) / six < 0.01
    # device kinds as jax (and torch, for GPUs) print them -> the one accelerator table's dense bf16 peak
    assert chips.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and chips.peak_flops("NVIDIA H200") == 989e12
    assert chips.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and chips.peak_flops("NVIDIA L4") == 121e12
    assert chips.peak_flops("NVIDIA L40S") is None                     # not an L4
    assert chips.peak_flops("TPU v5") == 459e12 and chips.peak_flops("TPU v5 lite") == 197e12
    assert chips.peak_flops("TPU v6 lite") == 918e12 and chips.peak_flops("TPU v4") == 275e12
    assert chips.peak_flops("cpu") is None and chips.peak_flops("TPU v9") is None
    assert flops.mfu(1e12, 1.0, 1, "cpu") is None
    assert flops.mfu(989e12 * 0.5, 1.0, 2, "NVIDIA H100 80GB HBM3") == pytest.approx(0.25)
