"""Evaluation: metric machinery against hand cases; held-out loss against an unpacked per-sample
recomputation with model.forward; accuracy loop and the evaluate CLI on a random tiny model."""
import json

import jax
import numpy as np
import pytest

from qwen2vl_jax.eval import evaluation as ev
from qwen2vl_jax.model import hf, model
from qwen2vl_jax.model.config import get_config
from qwen2vl_jax.data import formats
from qwen2vl_jax.data.tokenizer import load_tokenizer

CFG = get_config("test")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded")


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------------------------
# metrics (hand cases)

def test_caption_pairs_and_match():
    assert ev.caption_pairs("a red circle, two blue squares and a green star") == {
        ("red", "circle"), ("blue", "square"), ("green", "star")}
    exp = "a red circle and two blue squares"
    assert ev.metric("caption", "two blue squares and a red circle.", exp) == 1.0       # order, count ignored
    assert ev.metric("caption", "a red circle and a blue square", exp) == 1.0            # count ignored
    assert ev.metric("caption", "a red circle", exp) == 0.0                              # missing pair
    assert ev.metric("caption", "a red circle, two blue squares and a red star", exp) == 0.0   # extra pair
    assert ev.metric("caption", "a blue circle and two red squares", exp) == 0.0         # swapped attributes
    assert ev.metric("caption_exact", "A red circle and two blue squares.", exp) == 1.0
    assert ev.metric("caption_exact", "a red circle and a blue square", exp) == 0.0
    assert ev.metric("caption", "", "") == 0.0
    # diagnostics: colours right with shapes wrong, and the reverse
    assert ev.metric("caption_colours", "a red star and two blue circles", exp) == 1.0
    assert ev.metric("caption_shapes", "a red star and two blue circles", exp) == 0.0
    assert ev.metric("caption_shapes", "a green circle and a white square", exp) == 1.0
    assert ev.metric("caption_colours", "a green circle and a white square", exp) == 0.0
    assert ev.metric("caption_colours", "", "") == 0.0


def test_count_ocr_grounding_metrics():
    assert ev.metric("count", "3", "3") == 1.0 and ev.metric("count", "three", "3") == 1.0
    assert ev.metric("count", "2", "3") == 0.0 and ev.metric("count", "none", "3") == 0.0
    assert ev.metric("ocr", "qwen jax", "QWEN JAX") == 1.0 and ev.metric("ocr", "QWEN", "QWEN JAX") == 0.0
    box = "<|box_start|>(100,100),(199,199)<|box_end|>"
    # IoU of [100,199]^2 with [150,249]x[100,199] (inclusive): 50*100 / (2*10000 - 5000) = 1/3
    assert formats.box_iou((100, 100, 199, 199), (150, 100, 249, 199)) == pytest.approx(1 / 3)
    assert ev.metric("grounding", "(150,100),(249,199)", box) == 0.0
    # [110,199]x[100,199]: 90*100 / 10000 = 0.9
    assert ev.metric("grounding", "<|box_start|>(110,100),(199,199)<|box_end|>", box) == 1.0
    assert ev.metric("grounding", "(110,100),(199,199)(110,100),(199,199)", box) == 0.0   # box count differs
    assert ev.metric("grounding", "no box", box) == 0.0


def test_chance_level_is_permutation_baseline():
    # counts 1,1,2,3: ordered pairs i != j with equal answers: (0,1),(1,0) -> 2 / 12
    assert ev.chance_level("count", ["1", "1", "2", "3"]) == pytest.approx(2 / 12)
    assert ev.chance_level("ocr", ["A", "B", "C"]) == 0.0
    with pytest.raises(ValueError, match=">= 2"):
        ev.chance_level("ocr", ["A"])


def test_bad_kinds_raise(params):
    with pytest.raises(ValueError, match="valid: caption"):
        ev.make_eval_fn(CFG, kinds=("nope",))
    with pytest.raises(ValueError, match="valid: caption"):
        ev.evaluate_accuracy(CFG, params, kinds=("nope",))


# ---------------------------------------------------------------------------------------------
# held-out loss

def _unpacked_loss(params, samples):
    """Independent reference: transformers-layout forward per sample (model.forward), numpy NLL."""
    nll, n = 0.0, 0.0
    for s in samples:
        ids = s["input_ids"][None]
        kw = {}
        img, vid = s["vision_kind"] == 0, s["vision_kind"] == 1
        sizes = np.prod(s["grid_thw"], axis=1)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        rows = lambda sel: np.concatenate([s["pixel_values"][starts[i]:starts[i + 1]] for i in np.flatnonzero(sel)])
        if img.any():
            kw.update(pixel_values=rows(img), image_grid_thw=s["grid_thw"][img])
        if vid.any():
            kw.update(pixel_values_videos=rows(vid), video_grid_thw=s["grid_thw"][vid])
        logits = np.asarray(model.forward(CFG, params, ids, **kw), np.float64)[0]     # [n, V]
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        tgt = logits[np.arange(len(ids[0]) - 1), s["input_ids"][1:]]
        m = s["loss_mask"][1:]
        nll += float(((lse[:-1] - tgt) * m).sum())
        n += float(m.sum())
    return nll / n


def test_heldout_loss_matches_unpacked_forward(params, tok):
    fn = ev.make_eval_fn(CFG, {"seq_len": 640, "max_patches": 1280, "batch_size": 2}, num_per_kind=3,
                         kinds=("caption", "video", "chat"), tokenizer=tok)
    assert all(b["input_ids"].shape == (2, 640) for bs in fn.batches.values() for b in bs)
    got = fn(params)
    assert set(got) == {"caption", "video", "chat", "mean"}
    for kind in ("caption", "video"):
        want = _unpacked_loss(params, ev.heldout_samples(kind, 3, tok, CFG))
        assert got[kind] == pytest.approx(want, rel=2e-4), kind
    assert got["mean"] == pytest.approx(np.mean([got[k] for k in ("caption", "video", "chat")]))
    assert fn(params) == got                                    # fixed sets: deterministic
    # image ablation: the same batches with zeroed pixels == the unpacked forward on zeroed pixels
    zeroed = fn(params, zero_pixels=True)
    blank = [{**s, "pixel_values": np.zeros_like(s["pixel_values"])} for s in ev.heldout_samples("caption", 3, tok, CFG)]
    assert zeroed["caption"] == pytest.approx(_unpacked_loss(params, blank), rel=2e-4)
    assert zeroed["caption"] != pytest.approx(got["caption"], rel=1e-6)
    assert fn(params) == got                                    # the ablation left the batches alone
    assert abs(got["caption"] - np.log(CFG.vocab_size)) < 0.5   # random init ~ uniform


# ---------------------------------------------------------------------------------------------
# accuracy loop + CLI on a random model (machinery only; scores are ~0)

def test_evaluate_cli_on_saved_checkpoint(tmp_path, params, capsys):
    from launch import evaluate

    ckpt = tmp_path / "ckpt"
    hf.save_jax_checkpoint(CFG, jax.tree.map(np.asarray, params), str(ckpt))
    out_json = tmp_path / "acc.json"
    out = evaluate.main(["--checkpoint", str(ckpt), "--num", "3", "--kinds", "caption,count",
                         "--batch_size", "2", "--max_new_tokens", "6", "--ablate_pixels", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert "chance" in text and "caption_exact" in text and "zeroed" in text and "blank images" in text
    assert set(out["accuracy_blank_images"]) == set(out["accuracy"])
    assert set(out["heldout_loss_zeroed_pixels"]) == set(out["heldout_loss"]) == {*ev.LOSS_KINDS, "mean"}
    assert out["heldout_loss_zeroed_pixels"]["chat"] != out["heldout_loss"]["chat"]     # chat has images
    assert set(out["accuracy"]) == {"caption", "caption_exact", "caption_colours", "caption_shapes", "count"}
    assert all(0.0 <= v <= 1.0 for v in out["accuracy"].values())
    assert json.loads(out_json.read_text())["chance"] == out["chance"]
    with pytest.raises(ValueError, match="not a directory"):
        evaluate.main(["--checkpoint", str(tmp_path / "missing")])


def test_evaluate_reads_the_runs_pixel_budgets(tmp_path):
    """launch.evaluate preprocesses held-out media at the budgets of the run that wrote the checkpoint
    (RUN/data_config.json from launch.pretrain), and says when it falls back to the defaults."""
    from experiments import registry
    from launch import evaluate, pretrain
    from qwen2vl_jax.data import formats

    exp = registry.get_experiment("stage2", "test", [f"workdir={tmp_path}", "data.image_max_pixels=9408",
                                                     "data.video_total_pixels=18816"])
    pretrain.write_run_configs(exp)
    opts, source = evaluate.vision_options_for(str(tmp_path / "checkpoints"))
    assert source.endswith("data_config.json")
    assert (opts.max_pixels, opts.video_total_pixels) == (9408, 18816)
    assert opts == exp.data.vision_options
    assert evaluate.model_config_for(str(tmp_path / "checkpoints"), "tiny") == exp.model
    opts, source = evaluate.vision_options_for(str(tmp_path / "elsewhere" / "ckpt"))
    assert opts == formats.VisionOptions() and "defaults" in source
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data_config.json").write_text(json.dumps({"seq_len": 128, "image_max_pixels": 9408}))
    with pytest.raises(ValueError, match="missing: mixture.*video_total_pixels"):
        evaluate.vision_options_for(str(bad))


def test_accuracy_on_blank_images_decodes_zeroed_pixels(params, monkeypatch):
    """zero_pixels=True decodes the same prompts with every pixel value 0 (the text-prior baseline)."""
    from qwen2vl_jax.eval import generate as gen

    seen = []
    orig = gen.prepare_prompts

    def spy(cfg, samples, **kw):
        seen.append([np.asarray(s["pixel_values"]) for s in samples])
        return orig(cfg, samples, **kw)

    monkeypatch.setattr(gen, "prepare_prompts", spy)
    for zero in (False, True):
        res = ev.evaluate_accuracy(CFG, params, num=2, kinds=("caption",), batch_size=2, max_new_tokens=2,
                                   zero_pixels=zero)
        assert set(res["caption"].scores) == set(ev.metrics_of("caption"))
    real, blank = seen
    assert all(p.any() for p in real) and not any(p.any() for p in blank)
    assert [p.shape for p in real] == [p.shape for p in blank]
