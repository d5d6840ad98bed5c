"""Generation: greedy output equals transformers 4.57.6 `generate` (do_sample=False) token for token on a
tiny random model with the same weights, for text, image, multi-image, video and left-padded mixed
batches; sampling warpers against numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from qwen2vl_jax.eval import generate as gen
from qwen2vl_jax.model import hf
from qwen2vl_jax.model.config import get_config, to_hf_config

CFG = get_config("test")
MAX_NEW = 12


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**to_hf_config(CFG))).eval()
    with torch.no_grad():
        for p in ref.parameters():          # HF init zeroes biases; random everything, moderate scale
            p.normal_(0.0, 0.15)
    sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    params = jax.tree.map(jnp.asarray, hf.params_from_hf_state_dict(CFG, sd))
    return ref, params


def _vision(rng, grid, kind):
    t, h, w = grid
    return {"pixels": rng.normal(size=(t * h * w, CFG.vision.patch_dim)).astype(np.float32),
            "grid": np.array([grid], np.int32), "kind": kind,
            "tokens": [CFG.vision_start_token_id] + [CFG.image_token_id if kind == 0 else CFG.video_token_id]
            * (t * h * w // 4) + [CFG.vision_end_token_id]}


def _prompt(seed, text_lens, visions=()):
    """Text runs of the given lengths with the vision items between them -> Tokenized sample."""
    rng = np.random.default_rng(seed)
    ids, pixels, grids, kinds = [], [], [], []
    for i, n in enumerate(text_lens):
        ids += rng.integers(0, 2000, n).tolist()
        if i < len(visions):
            v = _vision(rng, *visions[i])
            ids += v["tokens"]
            pixels.append(v["pixels"])
            grids.append(v["grid"])
            kinds.append(v["kind"])
    return {"input_ids": np.array(ids, np.int32),
            "pixel_values": np.concatenate(pixels) if pixels else np.zeros((0, CFG.vision.patch_dim), np.float32),
            "grid_thw": np.concatenate(grids) if grids else np.zeros((0, 3), np.int32),
            "vision_kind": np.array(kinds, np.int8)}


PROMPTS = {
    "text": _prompt(1, [9]),
    "image": _prompt(2, [3, 4], [((1, 4, 6), 0)]),
    "multi_image": _prompt(3, [2, 3, 2], [((1, 4, 4), 0), ((1, 2, 6), 0)]),
    "video": _prompt(4, [2, 5], [((2, 4, 4), 1)]),
}


def _vision_kwargs(pb: gen.PromptBatch) -> dict:
    """The prompt batch's pixels and grids as transformers forward/generate keyword arguments."""
    kw = {}
    if pb.pixel_values is not None:
        kw.update(pixel_values=torch.tensor(pb.pixel_values), image_grid_thw=torch.tensor(pb.image_grid_thw))
    if pb.pixel_values_videos is not None:
        kw.update(pixel_values_videos=torch.tensor(pb.pixel_values_videos),
                  video_grid_thw=torch.tensor(pb.video_grid_thw))
    return kw


def _hf_generate(ref, pb: gen.PromptBatch, eos):
    kw = {"input_ids": torch.tensor(pb.input_ids, dtype=torch.long),
          "attention_mask": torch.tensor(pb.attention_mask, dtype=torch.long), **_vision_kwargs(pb)}
    with torch.no_grad():
        out = ref.generate(**kw, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False, num_beams=1,
                           repetition_penalty=1.0, eos_token_id=list(eos), pad_token_id=CFG.pad_token_id)
    return out[:, pb.length:].numpy()


def _teacher_forced_argmax(ref, pb: gen.PromptBatch, n):
    """Greedy by full re-forwards with explicit M-RoPE ids (no cache, no generate()): the reference
    docs/qwen2vl.md §8.3 fallback, independent of transformers' decoding path."""
    ids, mask = pb.input_ids.copy(), pb.attention_mask.copy()
    deltas = pb.rope_deltas
    pos = pb.positions
    out = []
    for k in range(n):
        kw = _vision_kwargs(pb)
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                         position_ids=torch.tensor(pos, dtype=torch.long), **kw).logits[:, -1]
        nxt = logits.argmax(-1).numpy().astype(np.int32)
        out.append(nxt)
        new_pos = (ids.shape[1] + deltas).astype(pos.dtype)                # [B, 1], same on the 3 rows
        pos = np.concatenate([pos, np.broadcast_to(new_pos[None], (3, len(ids), 1))], axis=2)
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((len(ids), 1), mask.dtype)], axis=1)
    return np.stack(out, axis=1)


@pytest.mark.parametrize("names", [["text"], ["multi_image"], ["image", "text", "video"]],
                         ids=lambda n: "+".join(n))
def test_greedy_matches_transformers_generate(pair, names):
    ref, params = pair
    pb = gen.prepare_prompts(CFG, [PROMPTS[n] for n in names])
    assert len(names) == 1 or (pb.attention_mask == 0).any()           # the mixed batch is left-padded
    no_eos = (CFG.vocab_size - 1,)                                    # never produced: compare all MAX_NEW
    ours = gen.generate(CFG, params, pb, max_new_tokens=MAX_NEW, eos_ids=no_eos)
    theirs = _hf_generate(ref, pb, no_eos)
    np.testing.assert_array_equal(ours.tokens, theirs)
    assert len(set(ours.tokens.ravel().tolist())) > 1                   # not a constant output
    if names == ["image", "text", "video"]:
        np.testing.assert_array_equal(ours.tokens[:, :4], _teacher_forced_argmax(ref, pb, 4))


def test_stops_at_eos_per_row(pair):
    """Pick as eos a token that row 0 emits at step 3: row 0 stops there (pads after), others run on."""
    ref, params = pair
    pb = gen.prepare_prompts(CFG, [PROMPTS["image"], PROMPTS["text"]])
    free = gen.generate(CFG, params, pb, max_new_tokens=MAX_NEW, eos_ids=(CFG.vocab_size - 1,))
    eos = int(free.tokens[0, 3])
    stopped = gen.generate(CFG, params, pb, max_new_tokens=MAX_NEW, eos_ids=(eos,))
    for b in range(2):
        hits = np.flatnonzero(free.tokens[b] == eos)
        n = hits[0] + 1 if len(hits) else MAX_NEW
        assert stopped.lengths[b] == n
        np.testing.assert_array_equal(stopped.tokens[b, :n], free.tokens[b, :n])
        assert (stopped.tokens[b, n:] == CFG.pad_token_id).all()
    assert stopped.lengths[0] <= 4
    assert stopped.row(0, eos_ids=(eos,)) == free.tokens[0, :stopped.lengths[0] - 1].tolist()


def test_prepare_prompts_left_pads_and_checks():
    pb = gen.prepare_prompts(CFG, [PROMPTS["video"], PROMPTS["text"]], pad_multiple=8)
    n0, n1 = len(PROMPTS["video"]["input_ids"]), len(PROMPTS["text"]["input_ids"])
    assert pb.length % 8 == 0 and pb.length >= max(n0, n1)
    assert pb.attention_mask[1].sum() == n1 and (pb.attention_mask[1, pb.length - n1:] == 1).all()
    assert (pb.input_ids[1, :pb.length - n1] == CFG.pad_token_id).all()
    assert pb.pixel_values is None and pb.video_grid_thw.tolist() == [[2, 4, 4]]
    bad = dict(PROMPTS["image"], input_ids=PROMPTS["image"]["input_ids"][:-4])     # drop text: pads intact
    gen.prepare_prompts(CFG, [bad])
    bad = dict(PROMPTS["image"], grid_thw=np.array([[1, 4, 4]], np.int32))
    with pytest.raises(ValueError, match="pixel_values shape"):
        gen.prepare_prompts(CFG, [bad])
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(CFG, {}, [PROMPTS["text"]], max_new_tokens=0)


def _np_warp(logits, temperature, top_k, top_p):
    """numpy re-implementation of HF's TemperatureLogitsWarper -> TopK -> TopP: kept token set + probs."""
    x = logits / temperature
    if top_k:
        kth = np.sort(x)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    order = np.argsort(x)                                   # ascending, as HF TopPLogitsWarper
    p = np.exp(x[order] - x[order].max())
    p /= p.sum()
    remove = np.cumsum(p) <= 1 - top_p
    remove[-1] = False
    x[order[remove]] = -np.inf
    p = np.exp(x - x.max())
    return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.9, 8, 0.8)])
def test_sampling_distribution_matches_numpy_warpers(temperature, top_k, top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, size=(16,)).astype(np.float32)
    want = _np_warp(logits.astype(np.float64), temperature, top_k, top_p)
    n = 20000
    sc = gen.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    draws = np.asarray(gen.sample_logits(jnp.broadcast_to(jnp.asarray(logits), (n, 16)), jax.random.PRNGKey(1), sc))
    freq = np.bincount(draws, minlength=16) / n
    assert (freq[want == 0] == 0).all()                      # filtered tokens are never drawn
    np.testing.assert_allclose(freq, want, atol=0.015)


def test_sampling_degenerate_cases_equal_greedy():
    logits = jax.random.normal(jax.random.PRNGKey(3), (6, 50))
    greedy = gen.sample_logits(logits, jax.random.PRNGKey(0), gen.GREEDY)
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), -1))
    for sc in (gen.SamplingConfig(temperature=1.0, top_k=1), gen.SamplingConfig(temperature=1.0, top_p=1e-6)):
        np.testing.assert_array_equal(gen.sample_logits(logits, jax.random.PRNGKey(5), sc), greedy)
    for bad in ({"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}):
        with pytest.raises(ValueError):
            gen.SamplingConfig(**bad)


def test_sampled_generation_runs_and_is_seeded(pair):
    _, params = pair
    pb = gen.prepare_prompts(CFG, [PROMPTS["image"], PROMPTS["video"]])
    sc = gen.SamplingConfig(temperature=1.0, top_k=20, top_p=0.9)
    a = gen.generate(CFG, params, pb, max_new_tokens=6, sampling=sc, rng=jax.random.PRNGKey(7), eos_ids=(2047,))
    b = gen.generate(CFG, params, pb, max_new_tokens=6, sampling=sc, rng=jax.random.PRNGKey(7), eos_ids=(2047,))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.tokens.shape == (2, 6)
