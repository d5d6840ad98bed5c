"""block_sparse_attention (Pallas, interpret mode on CPU) against the xla reference of model/attention.py:
forward and gradients over packed rows (ragged segments, padding inside and at the end, segments that
straddle block boundaries, one segment filling a row, an all-padding row), causal and not, GQA, fp32 and
bf16; the visited-block count against a numpy hand count; skipped blocks are never computed (NaN inputs
there do not reach the outputs); the kernels lower and compile for a TPU topology (libtpu compile-only
devices; skipped without libtpu)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2vl_jax.model.attention import attention
from qwen2vl_jax.model.block_sparse_attention import (block_meets, block_sparse_attention, block_sizes,
                                                     choose_block, modelled_seconds, visited_flops, visited_pairs)

T = 128


def _row(*runs):
    """Row of length T from (segment id, length) runs; id 0 = padding."""
    row = np.concatenate([np.full(n, s, np.int32) for s, n in runs])
    assert row.size == T, row.size
    return row


# Blocks in the parity tests: 32 query rows, 16 key rows (and swapped), so block edges fall inside segments.
SEGMENTS = np.stack([
    # ragged: segment 2 straddles the q edge at 32, padding 40..51 inside a block, a 1-row segment,
    # trailing padding that is not block-aligned
    _row((1, 23), (2, 17), (0, 12), (3, 1), (4, 57), (0, 18)),
    # one segment filling the row
    _row((7, T)),
    # short segments across edges, a whole padding q block (32..63) in the middle and one at the end
    _row((1, 5), (2, 9), (3, 13), (4, 5), (0, 32), (5, 3), (6, 20), (7, 9), (0, 32)),
    # an all-padding row
    _row((0, T)),
])


def _inputs(B, T, S, Hq, Hkv, D, dtype, seed=0):
    r = np.random.default_rng(seed)
    q = r.standard_normal((B, T, Hq, D))
    k = r.standard_normal((B, S, Hkv, D))
    v = r.standard_normal((B, S, Hkv, D))
    w = r.standard_normal((B, T, Hq, D))            # cotangent of the output
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v)) + (jnp.asarray(w, jnp.float32),)


def _value_and_grads(fn, q, k, v, w):
    def loss(q, k, v):
        o = fn(q, k, v)
        return jnp.sum(o.astype(jnp.float32) * w), o
    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, grads


def _compare(q_seg, kv_seg, causal, dtype, heads, block_q, block_kv, T, S, D=16):
    Hq, Hkv = heads
    q, k, v, w = _inputs(q_seg.shape[0], T, S, Hq, Hkv, D, dtype)
    got = _value_and_grads(lambda q, k, v: block_sparse_attention(
        q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=causal, block_q=block_q, block_kv=block_kv,
        interpret=True), q, k, v, w)
    ref = _value_and_grads(lambda q, k, v: attention(
        q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=causal, impl="xla"), q, k, v, w)
    (o, (dq, dk, dv)), (o_ref, (dq_ref, dk_ref, dv_ref)) = got, ref
    assert o.dtype == q.dtype and o.shape == q.shape
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    for name, a, b in (("out", o, o_ref), ("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(a, b, atol=tol * max(1.0, np.abs(b).max()), rtol=0, err_msg=name)
    assert np.all(np.asarray(o, np.float32)[q_seg == 0] == 0), "padded query rows must be exact zeros"


@pytest.mark.parametrize("causal, dtype, heads, blocks", [
    (False, jnp.float32, (4, 2), (32, 16)),
    (True, jnp.float32, (4, 2), (16, 32)),
    (True, jnp.bfloat16, (2, 2), (32, 16)),
], ids=["noncausal-f32-gqa", "causal-f32-gqa", "causal-bf16-mha"])
def test_matches_xla_forward_and_gradients(causal, dtype, heads, blocks):
    _compare(SEGMENTS, SEGMENTS, causal, dtype, heads, *blocks, T=T, S=T)


def _plain_attention(q, k, v, q_seg, kv_seg, causal):
    """Independent reference: dense masked softmax in fp32 jnp (kv heads repeated for GQA); a query row
    with no allowed key returns 0. q [B,T,Hq,D], k/v [B,S,Hkv,D]."""
    G = q.shape[2] // k.shape[2]
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") * q.shape[-1] ** -0.5
    allowed = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    if causal:
        allowed = allowed & (np.arange(kv_seg.shape[1])[None, :] <= np.arange(q_seg.shape[1])[:, None])
    allowed = jnp.asarray(allowed)[:, None]                                  # [B,1,T,S]
    s = jnp.where(allowed, s, -1e30)
    p = jnp.where(allowed, jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)
    return jnp.einsum("bhts,bshd->bthd", p, v, precision="highest")


def _odd_layout(T, b):
    """Rows of length T (two blocks of b) : segment lengths 1, b - 1, b / 2 + 1 and others that are no
    multiple of b, length-1 segments in a row, padding inside a block and at the end; an all-padding row."""
    rest = T - (b + b // 2 + 1 + 5 + 1 + 1 + 7)
    rows = [[(1, 1), (2, b - 1), (3, b // 2 + 1), (0, 5), (4, 1), (5, 1), (6, rest), (0, 7)],
            [(0, T)],
            [(1, T // 2 + 3), (2, 1), (3, T - T // 2 - 3 - 1 - 11), (0, 11)]]
    out = np.stack([np.concatenate([np.full(n, s, np.int32) for s, n in r]) for r in rows])
    assert out.shape == (3, T)
    return out


@pytest.mark.parametrize("block, causal", [(512, False), (256, True), (128, True)],
                         ids=["vision-512", "decoder-256", "decoder-128"])
def test_tpu_block_sizes_match_plain_softmax_on_odd_layouts(block, causal):
    """At the block sizes the kernels take on TPU (BLOCK_CHOICES: 512 the default, 256 what choose_block
    picks for short documents, 128 the smallest), head_dim 80, GQA
    2:1, fp32: forward and gradients against a plain masked softmax (not model/attention.py) on segment
    lengths that are no multiple of the block (1, b - 1, b + 1, ...), length-1 segments and an all-padding
    row."""
    T = 2 * block
    seg = _odd_layout(T, block)
    q, k, v, w = _inputs(3, T, T, 2, 1, 80, jnp.float32, seed=4)
    got = _value_and_grads(lambda q, k, v: block_sparse_attention(
        q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal, block_q=block, block_kv=block,
        interpret=True), q, k, v, w)
    ref = _value_and_grads(lambda q, k, v: _plain_attention(q, k, v, seg, seg, causal), q, k, v, w)
    for name, a, b in zip(("out", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(ref)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, atol=2e-5 * max(1.0, np.abs(b).max()), rtol=0, err_msg=name)
    assert np.all(np.asarray(got[0])[seg == 0] == 0) and np.all(np.asarray(got[1][1])[seg == 0] == 0)


@pytest.mark.parametrize("causal", [False, True], ids=["vision", "causal"])
def test_heads_major_entry_matches_plain_softmax_on_odd_layouts(causal):
    """heads_major=True takes q [B,Hq,T,D], k/v [B,Hkv,S,D] and returns [B,Hq,T,D] with no transposes:
    forward and gradients against the plain masked softmax (token-major, so the reference transposes)
    on the odd layout (head_dim 80, GQA 2:1, segments no multiple of the block, length-1 segments,
    an all-padding row)."""
    block = 128
    T = 2 * block
    seg = _odd_layout(T, block)
    q, k, v, w = _inputs(3, T, T, 2, 1, 80, jnp.float32, seed=5)
    hm = lambda x: jnp.swapaxes(x, 1, 2)                                     # noqa: E731  [B,T,H,D] <-> [B,H,T,D]
    got = _value_and_grads(lambda q, k, v: block_sparse_attention(
        q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal, block_q=block, block_kv=block,
        interpret=True, heads_major=True), hm(q), hm(k), hm(v), hm(w))
    ref = _value_and_grads(lambda q, k, v: _plain_attention(q, k, v, seg, seg, causal), q, k, v, w)
    assert got[0].shape == (3, 2, T, 80)
    for name, a, b in zip(("out", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(ref)):
        a, b = np.asarray(a), np.asarray(hm(b))
        np.testing.assert_allclose(a, b, atol=2e-5 * max(1.0, np.abs(b).max()), rtol=0, err_msg=name)
    assert np.all(np.asarray(hm(got[0]))[seg == 0] == 0)


def test_cross_attention_lengths_differ():
    """T != S, different segment layouts: query rows whose segment has no key return zeros. Three key
    blocks: the dk/dv list cannot split into two interleaved parts."""
    q_seg = SEGMENTS[:2, :64]
    kv_seg = np.stack([np.repeat([2, 4, 9], [30, 40, 26]), np.repeat([0, 7], [40, 56])]).astype(np.int32)
    _compare(q_seg, kv_seg, False, jnp.float32, (4, 2), 16, 32, T=64, S=96)


def _hand_count(q_seg, kv_seg, causal, bq, bkv):
    """Numpy double loop over blocks: a pair is needed iff it holds at least one allowed (t, s) pair."""
    counts = []
    for qs, ks in zip(q_seg, kv_seg):
        n = 0
        for i in range(len(qs) // bq):
            for j in range(len(ks) // bkv):
                t = np.arange(i * bq, (i + 1) * bq)[:, None]
                s = np.arange(j * bkv, (j + 1) * bkv)[None, :]
                allowed = (qs[t] == ks[s]) & (qs[t] != 0) & ((s <= t) if causal else True)
                n += bool(allowed.any())
        counts.append(n)
    return np.array(counts)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bq, bkv", [(32, 32), (16, 32), (32, 16)])
def test_visited_pairs_equal_hand_count(causal, bq, bkv):
    """With sorted segment ids (what the packer writes) the plan visits exactly the block pairs that hold
    an allowed (query, key) pair: none is missed (correctness) and none is extra (cost)."""
    got = np.asarray(visited_pairs(SEGMENTS, SEGMENTS, causal=causal, block_q=bq, block_kv=bkv))
    np.testing.assert_array_equal(got, _hand_count(SEGMENTS, SEGMENTS, causal, bq, bkv))
    flops = visited_flops(SEGMENTS, SEGMENTS, causal=causal, num_q_heads=3, head_dim=8, block_q=bq, block_kv=bkv)
    np.testing.assert_array_equal(np.asarray(flops.fwd), got * bq * bkv * 3 * 8 * 2 * 2)   # QK^T and PV
    assert np.all(np.asarray(flops.dq) == 1.5 * np.asarray(flops.fwd))
    assert np.all(np.asarray(flops.dkv) == 2 * np.asarray(flops.fwd))


def test_unsorted_ids_are_covered():
    """Ids out of order (ranges overlap without a shared id): the plan may visit more, never less."""
    r = np.random.default_rng(1)
    seg = r.integers(0, 6, size=(3, T)).astype(np.int32)
    for causal in (False, True):
        meets = np.asarray(block_meets(seg, seg, causal=causal, block_q=16, block_kv=32))
        need = _hand_count(seg, seg, causal, 16, 32)
        assert np.all(meets.sum(axis=(1, 2)) >= need)


def test_skipped_blocks_are_not_computed():
    """NaN in K/V of all-padding key blocks and in Q of all-padding query blocks: a kernel that touched
    those blocks would multiply the NaN by a zero probability (NaN). Outputs and gradients stay finite
    and equal the reference on the same inputs with zeros there."""
    seg = SEGMENTS[2:3]                             # padding blocks 32..63 and 96..127 (q and kv)
    q, k, v, w = _inputs(1, T, T, 4, 2, 16, jnp.float32, seed=3)
    pad = jnp.asarray(seg[0] == 0)[None, :, None, None]
    poison = lambda x: jnp.where(pad, jnp.nan, x)   # noqa: E731
    clean = lambda x: jnp.where(pad, 0.0, x)        # noqa: E731
    got = _value_and_grads(lambda q, k, v: block_sparse_attention(
        q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, block_q=32, block_kv=32, interpret=True),
        poison(q), poison(k), poison(v), w)
    ref = _value_and_grads(lambda q, k, v: attention(
        q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, impl="xla"), clean(q), clean(k), clean(v), w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0)


def test_block_size_errors():
    assert block_sizes(1024, 256) == (512, 256)     # defaults capped at the lengths
    with pytest.raises(ValueError, match=r"block_q=48 must divide T=128"):
        block_sizes(128, 128, 48, 32, interpret=True)
    with pytest.raises(ValueError, match=r"block_kv=96 must divide S=128"):
        block_sizes(128, 128, 32, 96, interpret=True)
    with pytest.raises(ValueError, match=r"block_q=64 must be a multiple of 128 on TPU"):
        block_sizes(128, 128, 64, 128)
    with pytest.raises(ValueError, match=r"T=1000: no block size in \(512, 256, 128\) divides it"):
        block_sizes(1000, 1024)
    assert block_sizes(1000, 384, interpret=True) == (1000, 128)      # interpret: an untileable row is one block


def test_choose_block_weighs_grid_steps_against_wasted_flops():
    """The block-size model by hand: seconds = hand-counted block pairs x 3 kernels x 0.35 us + their FLOPs
    (9 matmuls of 2 x 128-lane-padded head_dim per row pair) at 229.5 TFLOP/s. One segment filling the row
    wastes nothing at any size: the largest block (fewest steps) wins. Eight 128-row segments: 512-row blocks
    compute 4x the useful pairs, 128-row blocks take 4x the steps; 256 wins at head_dim 80 (padded to 128),
    and 128 once the FLOPs weigh more (head_dim 512)."""
    from qwen2vl_jax.model.config import get_config

    one = np.ones((1, 1024), np.int32)
    eight = np.repeat(np.arange(1, 9, dtype=np.int32), 128)[None]
    for b in (128, 256, 512):
        pairs = int(_hand_count(eight, eight, False, b, b)[0])
        want = pairs * 3 * 0.35e-6 + pairs * b * b * 2 * 128 * 9 / 229.5e12
        assert modelled_seconds(eight, causal=False, block=b, head_dim=80) == pytest.approx(want, rel=1e-6)
    assert choose_block(one, causal=False, head_dim=80) == 512
    assert choose_block(eight, causal=False, head_dim=80) == 256
    assert choose_block(eight, causal=False, head_dim=512) == 128
    assert choose_block(eight[:, :768], causal=False, head_dim=80) == 256           # 512 does not divide 768
    with pytest.raises(ValueError, match=r"row length 100: no block size in \(512, 256, 128\) divides it"):
        choose_block(one[:, :100], causal=False, head_dim=80)
    with pytest.raises(ValueError, match=r"attention_block_decoder=-128; valid: 0"):
        get_config("test", attention_block_decoder=-128)


def test_registry_rows_take_the_largest_block():
    """Every paper-size experiment's rows (decoder seq_len, vision max_patches) tile into 512-row blocks,
    the kernels' default, so "auto" on TPU never falls back to xla for them."""
    from experiments import registry

    for model in ("2b", "7b", "72b"):
        for stage in (1, 2, 3):
            data = registry.get_experiment(f"stage{stage}", model, []).data
            assert block_sizes(data.seq_len, data.max_patches) == (512, 512), (model, stage, data.seq_len,
                                                                                data.max_patches)


# ---------------------------------------------------------------------------------------------
# TPU lowering

@pytest.fixture(scope="module")
def tpu_device(tpu_devices):
    return tpu_devices[0]


# (B, T, Hq, Hkv, head_dim, causal, block): vision-tower-shaped (MHA, head_dim 80) at the default block (512)
# and decoder-shaped (GQA 6:1) at the smaller blocks choose_block picks for short documents
TPU_CASES = [(2, 2048, 4, 4, 80, False, None), (1, 2048, 12, 2, 128, True, 256), (1, 2048, 12, 2, 128, True, 128)]


@pytest.mark.parametrize("B, T, Hq, Hkv, D, causal, block", TPU_CASES, ids=["vision", "decoder-256", "decoder-128"])
def test_fwd_bwd_compile_for_v5p(tpu_device, B, T, Hq, Hkv, D, causal, block):
    from jax.sharding import SingleDeviceSharding
    sh = SingleDeviceSharding(tpu_device)

    def loss(q, k, v, seg):
        o = block_sparse_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal, block_q=block,
                                   block_kv=block)
        return jnp.mean(jnp.square(o.astype(jnp.float32)))

    bf16 = jnp.bfloat16
    args = (jax.ShapeDtypeStruct((B, T, Hq, D), bf16, sharding=sh),
            jax.ShapeDtypeStruct((B, T, Hkv, D), bf16, sharding=sh),
            jax.ShapeDtypeStruct((B, T, Hkv, D), bf16, sharding=sh),
            jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sh))
    # tests/conftest.py sets matmul precision "highest", which Mosaic refuses for bf16 operands
    with jax.default_matmul_precision("default"):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    text = compiled.as_text()
    for kernel in ("block_sparse_fwd", "block_sparse_dq", "block_sparse_dkv"):
        assert kernel in text, f"{kernel} missing from the compiled program"
    scores = B * Hq * T * T * 4                     # what materialising fp32 scores would take
    assert compiled.memory_analysis().temp_size_in_bytes < scores / 4


# ---------------------------------------------------------------------------------------------
# in the model: vision tower (block-diagonal by patch segment) and decoder (causal + segments)

def _packed_model_batch(cfg, B, S, P, seed=0):
    """A packed batch [B rows]: per row, images of varied grids (segment ids 1, 2, ... in order, edges
    inside 128-patch blocks) then patch padding; documents of varied lengths (the first carries the row's
    image pad tokens) then token padding."""
    from qwen2vl_jax.model.rope import vision_position_ids
    r = np.random.default_rng(seed)
    batch = {"input_ids": np.zeros((B, S), np.int32), "segment_ids": np.zeros((B, S), np.int32),
             "positions": np.zeros((B, 3, S), np.int32),
             "pixel_values": r.standard_normal((B, P, cfg.vision.patch_dim)).astype(np.float32),
             "patch_segment_ids": np.zeros((B, P), np.int32), "patch_positions": np.zeros((B, P, 2), np.int32)}
    for b in range(B):
        p = 0
        for sid, (h, w) in enumerate([(6, 10), (4, 4), (8, 12), (2, 8)][: 2 + b % 3], start=1):
            batch["patch_segment_ids"][b, p:p + h * w] = sid
            batch["patch_positions"][b, p:p + h * w] = vision_position_ids(np.array([[1, h, w]]))
            p += h * w
        t = 0
        for sid, n in enumerate([90 + 7 * b, 150, 61 - 9 * b], start=1):
            batch["segment_ids"][b, t:t + n] = sid
            batch["positions"][b, :, t:t + n] = np.arange(n)
            batch["input_ids"][b, t:t + n] = r.integers(0, cfg.special_token_base, n)
            t += n
        batch["input_ids"][b, 1:1 + p // cfg.vision.merge_unit] = cfg.image_token_id
    return batch


def test_model_forward_and_gradients_match_xla_on_a_packed_batch():
    """The test model with attention_impl=block_sparse (kernels in Pallas interpret mode on CPU, under
    shard_map on the data x fsdp x tensor = 2x2x2 mesh, activation constraints in effect) against
    attention_impl=xla on the same packed batch: vision tower output, decoder hidden states and the
    gradients of a weighted sum of them w.r.t. every parameter. Rows of 384 patches / 384 tokens take
    128-row blocks: images and documents straddle block edges, padding fills the ends."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from qwen2vl_jax.model import model
    from qwen2vl_jax.model.config import get_config
    from qwen2vl_jax.model.partitioning import activation_sharding
    from qwen2vl_jax.train import sharding

    cfg = get_config("test")
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    # random parameters placed directly (no init program to compile): weights N(0, 0.05), norm scales ~1
    r = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(r.standard_normal(a.shape) * 0.05
                                    + ("scale" in jax.tree_util.keystr(path)), a.dtype),
        jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0))))
    batch = _packed_model_batch(cfg, 4, 384, 384)
    b_sh = sharding.batch_shardings(batch, mesh)
    batch = sharding.global_batch(batch, b_sh)
    wv = jax.random.normal(jax.random.key(1), (4, 96, cfg.hidden_size))
    wh = jax.random.normal(jax.random.key(2), (4, 384, cfg.hidden_size))

    def run(impl):
        c = cfg.replace(attention_impl=impl)

        def f(params, batch):               # model.forward_hidden, keeping the vision tower's output
            with activation_sharding(mesh):
                vis = model.encode_vision(c, params, batch["pixel_values"], batch["patch_segment_ids"],
                                          batch["patch_positions"])
                hidden = model.apply_method(c, params, model.Qwen2VL.hidden, batch["input_ids"],
                                            batch["segment_ids"], batch["positions"], vis)
            return jnp.sum(vis * wv) + jnp.sum(hidden * wh), (vis, hidden)

        rep = NamedSharding(mesh, P())
        fn = jax.jit(jax.value_and_grad(f, has_aux=True), in_shardings=(rep, b_sh))
        (_, (vis, hidden)), grads = fn(params, batch)
        return str(jax.make_jaxpr(fn)(params, batch)), vis, hidden, grads

    jaxpr, vis, hidden, grads = run("block_sparse")
    _, vis_ref, hidden_ref, grads_ref = run("xla")
    for kernel in ("block_sparse_fwd", "block_sparse_dq", "block_sparse_dkv"):
        assert jaxpr.count(f"name={kernel}") == 2, kernel          # vision and decoder, under shard_map
    errors = {}
    for name, a, b in [("vision", vis, vis_ref), ("hidden", hidden, hidden_ref)] + [
            (jax.tree_util.keystr(k), a, b) for (k, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                                                               jax.tree.leaves(grads_ref))]:
        a, b = np.asarray(a), np.asarray(b)
        errors[name] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    print("max |block_sparse - xla| / max |xla|:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < 1e-5, errors
