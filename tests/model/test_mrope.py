"""M-RoPE position ids (docs/qwen2vl.md §3.4 worked example, video rule) and the rope.py cos/sin against
transformers' rotary code."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2vl_jax.model.config import get_config
from qwen2vl_jax.model.mrope import get_rope_index
from qwen2vl_jax.model.rope import apply_rotary, mrope_cos_sin, rotate_half, vision_position_ids, vision_rope

CFG = get_config("test")


def _ids(*parts):
    out = []
    for p in parts:
        out += p if isinstance(p, list) else [p]
    return np.array([out])


def test_worked_example_image():
    """t0 t1 <vs> [6 image pads, grid (1,4,6)] <ve> t2 t3, worked by hand."""
    c = CFG
    ids = _ids(10, 11, c.vision_start_token_id, [c.image_token_id] * 6, c.vision_end_token_id, 12, 13)
    pos, delta = get_rope_index(c, ids, image_grid_thw=[[1, 4, 6]])
    np.testing.assert_array_equal(pos[0, 0], [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8])
    np.testing.assert_array_equal(pos[1, 0], [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8])
    np.testing.assert_array_equal(pos[2, 0], [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8])
    assert delta.tolist() == [[-3]]


def test_video_grid_8_4_4_text_resumes_at_11():
    """Video grid (8,4,4) -> LLM grid (8,2,2) from base 3: time 3..10, so <|vision_end|> sits at 11
    (max(block)+1, the transformers 4.57.6 / paper rule), then text 12, 13."""
    c = CFG
    ids = _ids(10, 11, c.vision_start_token_id, [c.video_token_id] * 32, c.vision_end_token_id, 12, 13)
    pos, delta = get_rope_index(c, ids, video_grid_thw=[[8, 4, 4]])
    t, h, w = pos[:, 0, 3:35]
    np.testing.assert_array_equal(t, 3 + np.repeat(np.arange(8), 4))
    np.testing.assert_array_equal(h, 3 + np.tile([0, 0, 1, 1], 8))
    np.testing.assert_array_equal(w, 3 + np.tile([0, 1, 0, 1], 8))
    np.testing.assert_array_equal(pos[:, 0, 35:], [[11, 12, 13]] * 3)
    assert delta.tolist() == [[14 - 38]]


def test_rotate_half_and_apply_rotary_dtype():
    x = jnp.arange(8.0).reshape(1, 1, 1, 8)
    np.testing.assert_array_equal(rotate_half(x)[0, 0, 0], [-4, -5, -6, -7, 0, 1, 2, 3])
    xb = x.astype(jnp.bfloat16)
    out = apply_rotary(xb, jnp.ones((1, 1, 1, 8)), jnp.zeros((1, 1, 1, 8)))
    assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("d", [80, 128])
def test_rotate_half_is_exact_on_wide_values(dtype, d):
    """rotate_half (a product with a signed permutation) equals numpy's concat(-x2, x1) bit for bit on
    values spanning 1e-30..1e30 (a product at reduced precision would round them), and its gradient is
    the inverse rotation (numpy concat(x2, -x1))."""
    r = np.random.default_rng(0)
    x = (r.standard_normal((3, 5, d)) * 10.0 ** r.integers(-30, 30, (3, 5, d))).astype(np.float32)
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
    want = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    np.testing.assert_array_equal(np.asarray(rotate_half(jnp.asarray(x, dtype)), np.float32), want)
    w = jnp.asarray(r.standard_normal((3, 5, d)), dtype)
    g = jax.grad(lambda v: jnp.sum((rotate_half(v) * w).astype(jnp.float32)))(jnp.asarray(x, dtype))
    wn = np.asarray(w, np.float32)
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.concatenate([wn[..., d // 2:], -wn[..., :d // 2]], -1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mrope_matches_transformers(dtype):
    torch = pytest.importorskip("torch")
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl import modeling_qwen2_vl as hfm

    from qwen2vl_jax.model.config import to_hf_config

    hf_cfg = Qwen2VLConfig(**to_hf_config(CFG)).text_config
    rot = hfm.Qwen2VLRotaryEmbedding(hf_cfg)
    rng = np.random.default_rng(0)
    B, S, H, hd = 2, 7, 3, CFG.head_dim
    positions = rng.integers(0, 3000, size=(3, B, S))
    q = rng.standard_normal((B, S, H, hd)).astype(np.float32)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    qt = torch.from_numpy(q).to(tdt)
    cos, sin = rot(qt, torch.from_numpy(positions))
    ref, _ = hfm.apply_multimodal_rotary_pos_emb(qt.transpose(1, 2), qt.transpose(1, 2), cos, sin,
                                                 list(CFG.mrope_section))
    ref = ref.transpose(1, 2).float().numpy()
    jcos, jsin = mrope_cos_sin(np.transpose(positions, (1, 0, 2)), hd, CFG.mrope_section, CFG.rope_theta, jnp.dtype(dtype))
    assert jcos.dtype == jnp.dtype(dtype)
    sel = torch.cat([m[i % 3] for i, m in enumerate(cos.split(list(CFG.mrope_section) * 2, dim=-1))], dim=-1)
    # positions up to 3000: XLA and torch fp32 cos agree to ~1e-7 here
    np.testing.assert_allclose(np.asarray(jcos, np.float32), sel.float().numpy(), atol=1e-5 if dtype == "float32" else 1e-2)
    ours = np.asarray(apply_rotary(jnp.asarray(q, dtype), jcos[:, :, None], jsin[:, :, None]), np.float32)
    print(f"mrope {dtype}: max|dq| = {np.abs(ours - ref).max():.2e}")
    # fp32: identical up to rounding; bf16: ours rotates in fp32 (one rounding) vs transformers' bf16 ops
    np.testing.assert_allclose(ours, ref, atol=1e-5 if dtype == "float32" else 0.1)


def test_vision_rope_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers.models.qwen2_vl import modeling_qwen2_vl as hfm

    hd = 80
    grid = torch.tensor([[1, 4, 6], [2, 8, 2]])
    fake = types.SimpleNamespace(spatial_merge_size=2, rotary_pos_emb=hfm.VisionRotaryEmbedding(hd // 2))
    emb = hfm.Qwen2VisionTransformerPretrainedModel.rot_pos_emb(fake, grid)
    emb = torch.cat([emb, emb], -1)
    cos, sin = vision_rope(vision_position_ids(grid.numpy()), hd)
    assert cos.dtype == jnp.float32 and cos.shape == (24 + 32, hd)
    np.testing.assert_allclose(np.asarray(cos), emb.cos().numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), emb.sin().numpy(), atol=1e-6)
