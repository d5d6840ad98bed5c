"""Parity with transformers 4.57.6 (fp32, eager attention) on the "test" config, via qwen2vl_jax.model.hf.

Logits (max |diff| over real tokens <= 1e-4) for text, one image, two images of different aspect ratios, a
video, images + video in one sequence, and a left-padded batch of two layouts; the tied-embedding variant;
gradients of the LM loss (every leaf, relative 1e-4); the vision tower alone; the packed training path (forward_hidden) and the KV-cache path against per-sample
transformers forwards; get_rope_index equality; clear errors on malformed inputs.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hf_reference import build_inputs, hf_logits, hf_model, hf_rope_index, layout_tokens, state_dict_numpy  # noqa: E402
from qwen2vl_jax.data import media, packing  # noqa: E402
from qwen2vl_jax.model import hf, kv_cache  # noqa: E402
from qwen2vl_jax.model import inputs as model_inputs  # noqa: E402
from qwen2vl_jax.model import model as M  # noqa: E402
from qwen2vl_jax.model.config import get_config  # noqa: E402
from qwen2vl_jax.model.mrope import get_rope_index, sample_positions  # noqa: E402

TOL = 1e-4

CASES = {
    "text": [[("text", 10)]],
    "image": [[("text", 3), ("image", (1, 4, 6)), ("text", 4)]],
    "two_images": [[("text", 2), ("image", (1, 4, 6)), ("text", 2), ("image", (1, 8, 2)), ("text", 3)]],
    "video": [[("text", 2), ("video", (3, 4, 4)), ("text", 3)]],
    "images_video": [[("image", (1, 4, 4)), ("text", 2), ("video", (2, 4, 6)), ("image", (1, 2, 6)), ("text", 2)]],
    "left_padded": [[("text", 2), ("image", (1, 4, 6)), ("text", 5)],
                    [("video", (2, 4, 4)), ("text", 1), ("image", (1, 2, 2)), ("text", 2)]],
}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def setup(request):
    cfg = get_config("test", tie_word_embeddings=request.param)
    model = hf_model(cfg, seed=1 + request.param)
    params = hf.params_from_hf_state_dict(cfg, state_dict_numpy(model))
    assert ("lm_head" in params) != cfg.tie_word_embeddings
    return cfg, model, params


def _max_diff(ref, ours, mask):
    return float(np.abs(np.asarray(ref) - np.asarray(ours))[np.asarray(mask, bool)].max())


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(setup, case):
    cfg, model, params = setup
    if cfg.tie_word_embeddings and case not in ("image", "left_padded"):
        pytest.skip("tied variant: two cases suffice (same code path apart from the output embedding)")
    inputs = build_inputs(cfg, CASES[case], seed=len(case))
    ref = hf_logits(model, inputs)
    ours = M.forward(cfg, params, **inputs)
    assert ours.shape == ref.shape and ours.dtype == jnp.float32
    diff = _max_diff(ref, ours, inputs["attention_mask"])
    print(f"{case} tied={cfg.tie_word_embeddings}: max|dlogit| = {diff:.2e} (|logit| max {np.abs(ref).max():.2f})")
    assert diff <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_rope_index_matches_transformers(setup, case):
    cfg, model, _ = setup
    if cfg.tie_word_embeddings:
        pytest.skip("independent of the output embedding")
    inputs = build_inputs(cfg, CASES[case], seed=len(case))
    ref_pos, ref_delta = hf_rope_index(model, inputs)
    pos, delta = get_rope_index(cfg, inputs["input_ids"], inputs.get("image_grid_thw"),
                                inputs.get("video_grid_thw"), inputs["attention_mask"])
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(delta, ref_delta)


def test_vision_tower_alone(setup):
    """model.visual(pixels, grid) per item list vs encode_vision on a padded 2-row batch (row 0: two images of
    different aspect ratios, row 1: a 3-slice video; padding patches hold garbage pixels and segment 0)."""
    cfg, model, params = setup
    if cfg.tie_word_embeddings:
        pytest.skip("vision tower is identical")
    rng = np.random.default_rng(7)
    grids = [np.array([[1, 4, 6], [1, 8, 2]]), np.array([[3, 4, 4]])]
    P = 64
    px = np.full((2, P, cfg.vision.patch_dim), 3.0, np.float32)
    seg = np.zeros((2, P), np.int32)
    pos = np.zeros((2, P, 2), np.int32)
    refs = []
    for b, g in enumerate(grids):
        pix = rng.standard_normal((int(np.prod(g, 1).sum()), cfg.vision.patch_dim)).astype(np.float32)
        with torch.no_grad():
            refs.append(model.model.visual(torch.from_numpy(pix), grid_thw=torch.from_numpy(g)).numpy())
        p, s, q = model_inputs.vision_inputs(cfg, pix, g, "image")
        n = p.shape[1]
        px[b, :n], seg[b, :n], pos[b, :n] = p[0], s[0], q[0]
    out = np.asarray(M.encode_vision(cfg, params, px, seg, pos))
    assert out.shape == (2, P // 4, cfg.hidden_size) and np.isfinite(out).all()
    diffs = [float(np.abs(out[b, :len(r)] - r).max()) for b, r in enumerate(refs)]
    print(f"vision tower: max|d| images row {diffs[0]:.2e}, video row {diffs[1]:.2e}")
    assert max(diffs) <= TOL


def _processor_pixels(rng, shape):
    """float32 pixel rows as the processor makes them: random uint8 values normalised (channel-major columns)."""
    table = media.normalization_table()
    raw = rng.integers(0, 256, (shape[0], 3, shape[1] // 3))
    return np.stack([table[c][raw[:, c]] for c in range(3)], axis=1).reshape(shape)


def test_device_normalisation_of_uint8_pixels_equals_the_processor():
    """The vision tower normalises raw uint8 patch values (the packed batch) on the device: every value of every
    channel equals the processor's float32 arithmetic (media.normalization_table) to one fp32 ulp at the
    values' scale, 2.4e-7."""
    from qwen2vl_jax.model.vision_tower import normalize_pixels
    per = 392
    raw = np.stack([np.concatenate([(np.arange(per) + 97 * r + 31 * c) % 256 for c in range(3)])
                    for r in range(3)]).astype(np.uint8)                      # all 256 values in each channel
    got = np.asarray(jax.jit(normalize_pixels)(raw))
    table = media.normalization_table()
    want = np.stack([table[c][raw.reshape(3, 3, per)[:, c]] for c in range(3)], axis=1).reshape(raw.shape)
    assert got.dtype == np.float32
    assert float(np.abs(got - want).max()) <= 2.4e-7


def test_packed_forward_hidden_matches_per_sample(setup):
    """Two samples packed in row 0 (image sample + text sample), one video sample in row 1, right padding:
    each sample's logits equal transformers run on that sample alone. The packed rows carry the raw uint8
    pixel values the packer recovers from the processor's normalised ones (the model normalises them)."""
    cfg, model, params = setup
    if cfg.tie_word_embeddings:
        pytest.skip("covered by the untied run")
    rng = np.random.default_rng(3)
    samples = [[[("text", 3), ("image", (1, 4, 6)), ("text", 4)]], [[("text", 6)]],
               [[("text", 2), ("video", (2, 4, 4)), ("text", 3)]]]
    placement = [0, 0, 1]
    S, P = 40, 72
    batch = {"input_ids": np.zeros((2, S), np.int32), "segment_ids": np.zeros((2, S), np.int32),
             "positions": np.zeros((2, 3, S), np.int32), "pixel_values": np.zeros((2, P, cfg.vision.patch_dim), np.uint8),
             "patch_segment_ids": np.zeros((2, P), np.int32), "patch_positions": np.zeros((2, P, 2), np.int32)}
    fill, pfill, nseg, pseg = [0, 0], [0, 0], [0, 0], [0, 0]
    spans, refs = [], []
    for lay, row in zip(samples, placement):
        inputs = build_inputs(cfg, lay, seed=int(rng.integers(1000)))
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                inputs[key] = _processor_pixels(rng, inputs[key].shape)
        refs.append(hf_logits(model, inputs)[0])
        ids = inputs["input_ids"][0]
        n, s0 = len(ids), fill[row]
        nseg[row] += 1
        batch["input_ids"][row, s0:s0 + n] = ids
        batch["segment_ids"][row, s0:s0 + n] = nseg[row]
        batch["positions"][row, :, s0:s0 + n] = sample_positions(ids, cfg, inputs.get("image_grid_thw"),
                                                                 inputs.get("video_grid_thw"))[0]
        spans.append((row, s0, n))
        fill[row] += n
        for key, gkey in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if key in inputs:
                px, seg, pos = model_inputs.vision_inputs(cfg, inputs[key], inputs[gkey], "image")
                p0, m = pfill[row], px.shape[1]
                batch["pixel_values"][row, p0:p0 + m] = packing.raw_pixel_values(px[0])
                batch["patch_segment_ids"][row, p0:p0 + m] = seg[0] + pseg[row]
                batch["patch_positions"][row, p0:p0 + m] = pos[0]
                pseg[row] += seg.max()
                pfill[row] += m
    hidden = jax.jit(M.forward_hidden, static_argnums=0)(cfg, params, batch)
    logits = np.asarray(hidden @ M.output_embedding(cfg, params))
    diffs = [float(np.abs(logits[r, s0:s0 + n] - ref).max()) for (r, s0, n), ref in zip(spans, refs)]
    print(f"packed forward_hidden: per-sample max|dlogit| {['%.2e' % d for d in diffs]}")
    assert max(diffs) <= TOL


def test_kv_cache_prefill_decode_matches_forward(setup):
    """Left-padded prompts with vision, prefill, then two decode steps of the known continuation: the
    logits equal transformers' full-sequence logits at those columns; unrolled layers + remat agree too."""
    cfg, model, params = setup
    if cfg.tie_word_embeddings:
        pytest.skip("covered by the untied run")
    inputs = build_inputs(cfg, CASES["left_padded"], seed=11)
    ref = hf_logits(model, inputs)
    S, k = inputs["input_ids"].shape[1], 2
    prompt = {key: v for key, v in inputs.items()}
    prompt["input_ids"], prompt["attention_mask"] = inputs["input_ids"][:, :S - k], inputs["attention_mask"][:, :S - k]
    ucfg = cfg.replace(scan_layers=False, remat_policy="full")
    cache = kv_cache.init_cache(ucfg, 2, S + 3)
    logits, cache = kv_cache.prefill(ucfg, params, cache, **prompt)
    got = [np.asarray(logits)]
    step = jax.jit(kv_cache.decode_step, static_argnums=0)
    for j in range(k):
        tok = jnp.asarray(inputs["input_ids"][:, S - k + j:S - k + j + 1])
        logits, cache = step(ucfg, params, cache, tok, kv_cache.decode_positions(cache))
        got.append(np.asarray(logits))
    want = ref[:, S - k - 1:S]
    diff = float(np.abs(np.stack(got, 1) - want).max())
    print(f"KV cache (unrolled layers, full remat): max|dlogit| {diff:.2e}")
    assert int(cache["index"]) == S and diff <= TOL


# ---------------------------------------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def tiny():
    """Input checks run on the host before any parameter is touched, so no weights are needed."""
    return get_config("test"), None


def test_error_grid_shape(tiny):
    cfg, params = tiny
    inputs = build_inputs(cfg, CASES["image"])
    with pytest.raises(ValueError, match=r"image_grid_thw must have shape \[num, 3\].*\(3,\)"):
        M.forward(cfg, params, **{**inputs, "image_grid_thw": inputs["image_grid_thw"][0]})
    with pytest.raises(ValueError, match=r"multiples of spatial_merge_size 2"):
        M.forward(cfg, params, **{**inputs, "image_grid_thw": np.array([[1, 3, 8]])})


def test_error_pixel_rows_do_not_match_grid(tiny):
    cfg, params = tiny
    inputs = build_inputs(cfg, CASES["image"])
    with pytest.raises(ValueError, match=r"have 20 patch rows but image_grid_thw \[\[1, 4, 6\]\] needs .* = 24"):
        M.forward(cfg, params, **{**inputs, "pixel_values": inputs["pixel_values"][:20]})
    with pytest.raises(ValueError, match=r"shape \[num_patches, 1176\]; got \(24, 1000\)"):
        M.forward(cfg, params, **{**inputs, "pixel_values": inputs["pixel_values"][:, :1000]})


def test_error_pad_count_mismatch(tiny):
    cfg, params = tiny
    inputs = build_inputs(cfg, CASES["image"])
    ids = inputs["input_ids"].copy()
    ids[0, np.flatnonzero(ids[0] == cfg.image_token_id)[0]] = 5
    with pytest.raises(ValueError, match=r"image features and image tokens do not match: tokens: 5, features: 6"):
        M.forward(cfg, params, **{**inputs, "input_ids": ids})
    with pytest.raises(ValueError, match=r"hold 6 image pad tokens but no image pixel values"):
        M.forward(cfg, params, input_ids=inputs["input_ids"])


def test_prefill_rejects_right_padding(tiny):
    cfg, params = tiny
    ids, _, _ = layout_tokens(cfg, [("text", 4)], np.random.default_rng(0))
    mask = np.array([[1, 1, 1, 0]])
    with pytest.raises(ValueError, match="left padding"):
        kv_cache.prefill(cfg, params, kv_cache.init_cache(cfg, 1, 8), np.array([ids]), mask)


def test_gradients_match_transformers(setup):
    """Mean next-token cross-entropy on images + video: d loss / d params equals torch autograd for every
    leaf (transformers grads mapped through the same linear converter), with remat and scan on."""
    cfg, model, params = setup
    if cfg.tie_word_embeddings:
        pytest.skip("covered by the untied run")
    inputs = build_inputs(cfg, CASES["images_video"], seed=5)
    ids = inputs["input_ids"]
    model.zero_grad()
    out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, labels=torch.from_numpy(ids))
    out.loss.backward()
    ref = hf.params_from_hf_state_dict(cfg, {k: p.grad.numpy() for k, p in model.named_parameters()})
    rcfg = cfg.replace(remat_policy="dots")

    def loss(p):
        logits = M.forward(rcfg, p, **inputs)[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids[:, 1:, None]), axis=-1))

    val, grads = jax.value_and_grad(loss)(params)
    assert abs(float(val) - out.loss.item()) <= 1e-5
    worst = max((float(np.abs(np.asarray(g) - r).max()) / (float(np.abs(r).max()) + 1e-12), path)
                for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref)))
    print(f"gradients: loss {float(val):.6f} vs {out.loss.item():.6f}; worst leaf max|dg|/max|g| {worst[0]:.2e} "
          f"at {jax.tree_util.keystr(worst[1])}")
    assert worst[0] <= 1e-4
