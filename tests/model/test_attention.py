"""attention(): xla backend vs a naive float64 loop (causal, packed segments, padding, GQA, KV offset)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from qwen2vl_jax.model.attention import attention, make_mask, packed_layout, resolve_impl
from qwen2vl_jax.model.partitioning import activation_sharding


def naive_attention(q, k, v, q_seg, kv_seg, causal, q_offset=0):
    """Loop reference: query t sees key s iff same non-zero segment and (not causal or s <= t + offset)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    out = np.zeros((B, T, Hq, D))
    offs = np.broadcast_to(np.asarray(q_offset), (B,))
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for t in range(T):
                ok = [s for s in range(S) if q_seg[b, t] != 0 and kv_seg[b, s] == q_seg[b, t]
                      and (not causal or s <= t + offs[b])]
                if ok:
                    lg = np.array([q[b, t, h] @ k[b, s, kh] for s in ok]) / np.sqrt(D)
                    p = np.exp(lg - lg.max())
                    out[b, t, h] = (p / p.sum()) @ v[b, ok, kh]
    return out


def _qkv(B, T, S, Hq, Hkv, D, seed=0):
    r = np.random.default_rng(seed)
    return (r.standard_normal((B, T, Hq, D)).astype(np.float32),
            r.standard_normal((B, S, Hkv, D)).astype(np.float32),
            r.standard_normal((B, S, Hkv, D)).astype(np.float32))


# row 0: two packed samples + right padding; row 1: left padding then one sample; row 2: three samples.
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0],
                     [0, 0, 0, 1, 1, 1, 1, 1, 1],
                     [1, 2, 2, 3, 3, 3, 3, 3, 3]], np.int32)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (6, 1)])
def test_xla_matches_naive(causal, heads):
    Hq, Hkv = heads
    q, k, v = _qkv(3, 9, 9, Hq, Hkv, 8)
    out = attention(q, k, v, q_segment_ids=SEGMENTS, kv_segment_ids=SEGMENTS, causal=causal, impl="xla")
    ref = naive_attention(q, k, v, SEGMENTS, SEGMENTS, causal)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5)
    pad = SEGMENTS == 0
    assert np.all(np.asarray(out)[pad] == 0.0), "padded query rows must be exact zeros"


def test_kv_cache_offset():
    """Decoding: 2 new queries at cache slots 5, 6 (row 0) and 3, 4 (row 1) over a 8-slot cache."""
    q, k, v = _qkv(2, 2, 8, 4, 2, 8, seed=1)
    kv_seg = np.array([[1, 1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0, 0]], np.int32)
    q_seg = np.ones((2, 2), np.int32)
    off = np.array([5, 3], np.int32)
    out = attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=True, q_offset=jnp.asarray(off))
    ref = naive_attention(q, k, v, q_seg, kv_seg, True, off)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=1e-5)


def test_bf16_inputs_finite_and_close():
    q, k, v = _qkv(3, 9, 9, 4, 2, 16, seed=2)
    out = attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), q_segment_ids=SEGMENTS,
                    kv_segment_ids=SEGMENTS, causal=True, impl="xla")
    assert out.dtype == jnp.bfloat16
    ref = naive_attention(q, k, v, SEGMENTS, SEGMENTS, True)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2)


def test_grad_finite_with_padding():
    q, k, v = _qkv(3, 9, 9, 4, 2, 8, seed=3)

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, q_segment_ids=SEGMENTS, kv_segment_ids=SEGMENTS, causal=True) ** 2)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    assert np.all(np.asarray(grads[0])[SEGMENTS == 0] == 0.0)


def _splash_or_skip():
    return pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")


def _packed_segments(B, T, seed):
    """[B, T] int32: 1-3 packed samples per row then right padding (row lengths differ)."""
    r = np.random.default_rng(seed)
    rows = []
    for _ in range(B):
        cuts = np.sort(r.choice(np.arange(8, T - 8), size=3, replace=False))
        rows.append(np.searchsorted(cuts, np.arange(T), side="right") + 1)
        rows[-1][cuts[-1]:] = 0
    return np.stack(rows).astype(np.int32)


def test_splash_interpret_matches_xla():
    """The Pallas splash path, run in interpret mode on CPU (block sizes need T, S multiples of 128)."""
    _splash_or_skip()
    B, T, Hq, Hkv, D = 1, 128, 4, 2, 128
    q, k, v = _qkv(B, T, T, Hq, Hkv, D, seed=4)
    seg = np.concatenate([np.full(50, 1), np.full(60, 2), np.zeros(18)]).astype(np.int32)[None]
    out = attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, impl="splash", interpret=True)
    ref = naive_attention(q, k, v, seg, seg, True)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-4, rtol=1e-4)


# (impl, mesh (data, fsdp, tensor), heads (Hq, Hkv), causal): kv heads sharded with the query heads
# (4/2 over tensor 2); kv replicated, every shard's query heads in one kv group (4/2 over tensor 4); kv
# replicated, a shard's 3 query heads straddle two kv groups (6/3 over tensor 2: per-head kv gather);
# vision-shaped (non-causal, head_dim 80, all heads one kv head each). block_sparse with kv heads split like
# the query heads, non-causal and causal: tests/model/test_block_sparse_attention.py (the model on a 2x2x2 mesh).
SHARDED_CASES = [("splash", (2, 2, 2), (4, 2), True), ("splash", (2, 1, 4), (4, 2), True),
                 ("splash", (1, 4, 2), (6, 3), True), ("splash", (2, 1, 4), (4, 4), False),
                 ("block_sparse", (2, 1, 4), (4, 2), True), ("block_sparse", (1, 4, 2), (6, 3), True)]
SHARDED_CASES = [c + (False,) for c in SHARDED_CASES] + [("block_sparse", (1, 4, 2), (6, 3), False, True)]


@pytest.mark.parametrize("impl, mesh_shape, heads, causal, heads_major", SHARDED_CASES)
def test_kernel_shard_map_matches_naive(impl, mesh_shape, heads, causal, heads_major):
    """With a mesh in context (activation_sharding inside the trace, or jax.set_mesh around it) the Pallas
    kernel runs in shard_map (batch over data/fsdp, heads over tensor) and equals the float64 loop,
    forward and q/k/v gradients (vs the xla backend). heads_major: the same through the [B,H,T,D] entry
    (the vision tower's), kv heads straddling the tensor split (6:3 over tensor 2)."""
    _splash_or_skip()
    from qwen2vl_jax.train import sharding

    data, fsdp, tensor = mesh_shape
    mesh = sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    (Hq, Hkv), D = heads, (128 if causal else 80)
    B, T = 4, 128
    q, k, v = _qkv(B, T, T, Hq, Hkv, D, seed=5)
    seg = _packed_segments(B, T, seed=6)

    def run(impl, q, k, v):
        if not heads_major:
            return attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal, impl=impl,
                             interpret=True)
        hm = lambda x: jnp.swapaxes(x, 1, 2)                                 # noqa: E731
        return hm(attention(hm(q), hm(k), hm(v), q_segment_ids=seg, kv_segment_ids=seg, causal=causal,
                            impl=impl, interpret=True, heads_major=True))

    w = np.random.default_rng(7).standard_normal(q.shape).astype(np.float32)     # loss weights [B,T,Hq,D]

    def loss(impl):
        return lambda q, k, v: jnp.sum(run(impl, q, k, v) * w)

    def fwd(q, k, v):                       # the mesh entered inside the traced function (train step)
        with activation_sharding(mesh):
            return run(impl, q, k, v)

    assert "shard_map" in str(jax.make_jaxpr(fwd)(q, k, v)), f"{impl} must run under shard_map"
    rep = NamedSharding(mesh, PartitionSpec())   # the jit must span the mesh's devices
    out = jax.jit(fwd, in_shardings=(rep, rep, rep))(q, k, v)
    with jax.set_mesh(mesh):                # or the whole trace under jax.set_mesh
        g_kernel = jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2)))(q, k, v)
    ref = naive_attention(q, k, v, seg, seg, causal)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-4, rtol=1e-4)
    assert np.all(np.asarray(out)[seg == 0] == 0.0)
    g_xla = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_kernel, g_xla):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-3, rtol=1e-3, err_msg=f"d{name}")


def test_splash_rejects_lengths_off_block_and_auto_falls_back():
    _splash_or_skip()
    q, k, v = _qkv(1, 96, 96, 2, 1, 128)
    seg = np.ones((1, 96), np.int32)
    with pytest.raises(ValueError, match=r"T=96: no block size in \(512, 256, 128\) divides it"):
        attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, impl="splash", interpret=True)
    assert resolve_impl("auto", jnp.bfloat16, (96, 96)) == "xla"     # CPU: always xla


def test_cudnn_path_builds_mask_on_cpu():
    """cudnn cannot run on CPU; its mask construction is shared with xla and checked here."""
    m = np.asarray(make_mask(SEGMENTS, SEGMENTS, causal=True))
    assert m[0, 4, 3] and not m[0, 3, 2 + 2] and not m[0, 7].any() and not m[1, :3].any()
    assert resolve_impl("auto", jnp.float32) == "xla"
    with pytest.raises(ValueError, match="attention impl 'flash'"):
        resolve_impl("flash", jnp.float32)


def _mask_from_packed_layout(seqlens, offsets, L, causal):
    """numpy: what cuDNN's packed attention computes: position i sees j iff both lie in one run
    [offsets[m], offsets[m] + seqlens[m]) (and j <= i when causal); positions in no run see nothing."""
    B, M = seqlens.shape
    mask = np.zeros((B, L, L), bool)
    for b in range(B):
        for m in range(M):
            if seqlens[b, m] < 0:
                assert offsets[b, m] == -1 and (seqlens[b, m:] == -1).all() and (offsets[b, m:] == -1).all()
                break
            idx = np.arange(offsets[b, m], offsets[b, m] + seqlens[b, m])
            mask[b, idx[:, None], idx[None, :]] = True
        assert offsets[b, M] == -1
    return mask & np.tril(np.ones((L, L), bool)) if causal else mask


def test_cudnn_packed_layout_rebuilds_the_mask():
    """The cuDNN packed path (vision tower on GPU) never builds a [P, P] mask: it hands cuDNN per-segment
    offsets and lengths computed on device. Rebuilt into a mask in numpy they give exactly the masking
    rule's mask (make_mask), non-causal and causal, for ragged runs, padding between and after runs,
    one-row runs, a run filling the row and an all-padding row; a row with more runs than promised is
    flagged. (The cuDNN call itself needs a Hopper GPU: not run here.)"""
    L = 24
    rows = [[1] * 5 + [2] * 3 + [0] * 2 + [3] + [4] * 9 + [0] * 4,
            [7] * L,
            [0] * L,
            [1, 2, 3, 4, 5, 6] + [0] * 18,
            [0] * 3 + [1] * 10 + [0] * 4 + [2] * 7]
    seg = np.array(rows, np.int32)
    for causal in (False, True):
        seqlens, offsets, overflow = (np.asarray(x) for x in packed_layout(seg, max_segments=6))
        assert seqlens.shape == (5, 6) and offsets.shape == (5, 7) and not overflow.any()
        np.testing.assert_array_equal(_mask_from_packed_layout(seqlens, offsets, L, causal),
                                      np.asarray(make_mask(seg, seg, causal=causal)))
    np.testing.assert_array_equal(np.asarray(packed_layout(seg, max_segments=5)[2]),
                                  [False, False, False, True, False])


def test_shape_errors_name_values():
    q, k, v = _qkv(1, 4, 4, 4, 2, 8)
    with pytest.raises(ValueError, match=r"q_segment_ids shape \(1, 3\)"):
        attention(q, k, v, q_segment_ids=np.ones((1, 3)), kv_segment_ids=np.ones((1, 4)), causal=True)
    with pytest.raises(ValueError, match="query heads 4 not a multiple of kv heads 3"):
        attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), q_segment_ids=np.ones((1, 4)),
                  kv_segment_ids=np.ones((1, 4)), causal=True)


def test_init_under_a_splash_config_gives_transformers_parameters():
    """A model configured for splash still initialises: init traces 4-token dummy inputs, below splash's
    128-row blocks, so it must take the xla path whatever the config says. The result has the parameter
    count transformers builds for the same architecture (on the meta device), and every leaf has axes."""
    torch = pytest.importorskip("torch")
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from qwen2vl_jax.model import config, model

    cfg = config.get_config("test").replace(attention_impl="splash")
    params = model.init_params(cfg, jax.random.key(0))
    axes = model.param_logical_axes(cfg)
    with torch.device("meta"):
        ref = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**config.to_hf_config(cfg)))
    assert sum(x.size for x in jax.tree.leaves(params)) == sum(p.numel() for p in ref.parameters())
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(params)
