"""Evaluation: metric machinery against hand cases; the held-out loss by source and by data kind against an
unpacked per-sample recomputation with model.forward, standalone and as the trainer's hook; accuracy loop and
the evaluate CLI on a random tiny model."""
import dataclasses
import io
import json

import jax
import numpy as np
import pytest
from PIL import Image

from experiments import registry
from launch import evaluate
from qwen2vl_jax.data import formats, sources
from qwen2vl_jax.data.pipeline import DataConfig
from qwen2vl_jax.data.tokenizer import load_tokenizer
from qwen2vl_jax.eval import evaluation as ev
from qwen2vl_jax.model import hf, model
from qwen2vl_jax.model.config import get_config
from qwen2vl_jax.train import rundir, sharding, trainer

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
        ev.loss_mixture(("nope",))
    with pytest.raises(ValueError, match="valid: caption"):
        ev.evaluate_accuracy(CFG, params, kinds=("nope",))


# ---------------------------------------------------------------------------------------------
# held-out loss

def _unpacked_loss(params, samples):
    """Independent reference: transformers-layout forward per sample (model.forward), numpy NLL, the
    supervised-token mean over the samples."""
    sums = _unpacked_sums(params, samples)
    return sum(nll for nll, _ in sums) / sum(n for _, n in sums)


def _unpacked_sums(params, samples):
    """[(NLL sum, supervised tokens)] per sample."""
    out = []
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
        out.append((float(((lse[:-1] - tgt) * m).sum()), float(m.sum())))
    return out


def _heldout(kind, n, tok, data):
    """The held-out samples of a synthetic kind, made directly (not through the pipeline's decoder)."""
    return [formats.make_sample(kind, i, "heldout", tok, CFG, data.vision_options, seed=data.seed) for i in range(n)]


def test_heldout_loss_matches_unpacked_forward(params, tok):
    data = DataConfig(mixture=ev.loss_mixture(("caption", "chat")), seq_len=640, max_patches=1280)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2), jax.devices()[:2])
    evaluate = ev.HeldoutEvaluator(CFG, data, num_samples=2, batch_size=2, mesh=mesh, tokenizer=tok)
    assert all(b["input_ids"].shape == (2, 640) for g in evaluate.groups for b in g.batches)
    got = evaluate(params)
    assert set(got) == {f"{by}/{k}" for by in ("source", "kind") for k in ("caption", "chat")} | {"mean"}
    captions = _heldout("caption", 2, tok, data)
    assert got["kind/caption"] == pytest.approx(_unpacked_loss(params, captions), rel=2e-4)
    assert got["source/chat"] == got["kind/chat"]                     # a synthetic source has one kind
    assert got["mean"] == pytest.approx((got["kind/caption"] + got["kind/chat"]) / 2)
    assert evaluate(params) == got                                    # fixed sets: deterministic
    # image ablation: the same batches with zeroed pixels == the unpacked forward on zeroed pixels
    zeroed = evaluate(params, zero_pixels=True)
    blank = [{**s, "pixel_values": np.zeros_like(s["pixel_values"])} for s in captions]
    assert zeroed["kind/caption"] == pytest.approx(_unpacked_loss(params, blank), rel=2e-4)
    assert zeroed["kind/caption"] != pytest.approx(got["kind/caption"], rel=1e-6)
    assert evaluate(params) == got                                    # the ablation left the batches alone
    assert abs(got["kind/caption"] - np.log(CFG.vocab_size)) < 0.5    # random init ~ uniform


def _png(w, h, colour):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "PNG")
    return buf.getvalue()


def test_heldout_loss_by_kind_within_one_source(params, tok, tmp_path):
    """An ArrayRecord source mixing data kinds: by source = all its samples, by kind = each kind's own; an
    unreadable record is passed over; only the held-out files ({split} = heldout) are read."""
    from array_record.python.array_record_module import ArrayRecordWriter

    caption = [sources.encode_record({"type": "caption", "text": f"a {c} box"}, [_png(56, 84, rgb)], None)
               for c, rgb in (("red", (200, 30, 30)), ("blue", (30, 30, 200)))]
    chat = [sources.encode_record({"type": "chat", "messages": [
        {"role": "user", "content": f"what is {i} plus {i}?"}, {"role": "assistant", "content": str(2 * i)}]},
        [], None) for i in (2, 3)]
    records = [caption[0], chat[0], b"not a record", caption[1], chat[1]]
    for split, recs in (("heldout", records), ("train", chat)):
        w = ArrayRecordWriter(str(tmp_path / f"{split}-00000.array_record"), "group_size:1")
        for r in recs:
            w.write(r)
        w.close()
    data = DataConfig(mixture=((f"arrayrecord:{tmp_path}/{{split}}-*.array_record", 1.0),), seq_len=256,
                      max_patches=512)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2), jax.devices()[:2])
    got = ev.HeldoutEvaluator(CFG, data, num_samples=4, batch_size=2, mesh=mesh, tokenizer=tok)(params)
    sums = {k: _unpacked_sums(params, [sources.record_to_sample(r, tok, CFG, data.vision_options) for r in recs])
            for k, recs in (("caption", caption), ("chat", chat))}
    label = f"source/{tmp_path.name}"       # the glob's folder: "{split}-*.array_record" names nothing
    assert set(got) == {label, "kind/caption", "kind/chat", "mean"}
    for kind, by_sample in sums.items():
        want = sum(nll for nll, _ in by_sample) / sum(n for _, n in by_sample)
        assert got[f"kind/{kind}"] == pytest.approx(want, rel=2e-4), kind
    everything = sums["caption"] + sums["chat"]
    assert got[label] == pytest.approx(
        sum(nll for nll, _ in everything) / sum(n for _, n in everything), rel=2e-4)


@pytest.mark.slow
def test_heldout_loss_inside_training(tmp_path, tok):
    """The trainer calls the evaluator hook every eval_every steps and at the end; what it logs is the
    unpacked forward loss of the final params on the held-out samples, averaged by hand."""
    exp = registry.get_experiment("stage2", "test", [
        f"workdir={tmp_path}", "steps=2", "batch_size=8", "eval_every=1", "eval_samples=2", "log_every=1",
        "data.mixture=(('synthetic:caption', 1.0), ('synthetic:video', 1.0))", "data.seq_len=512",
        "data.max_patches=1024"])
    out = io.StringIO()
    summary = trainer.run(exp, evaluate=exp.evaluator(), stream=out)
    assert sorted(summary["eval"]) == [1, 2] and "eval step 2 | source/caption" in out.getvalue()
    logged = rundir.read_jsonl(exp.run_dir, rundir.HELDOUT_FILE)
    assert {s: {k: v for k, v in r.items() if k != "step"} for s, r in logged.items()} == summary["eval"]
    final = rundir.load_params(exp.model, exp.checkpoint_dir)
    got = summary["eval"][2]
    for kind in ("caption", "video"):
        want = _unpacked_loss(final, _heldout(kind, 2, tok, exp.data))
        assert got[f"kind/{kind}"] == pytest.approx(want, rel=2e-4), kind
        assert got[f"source/{kind}"] == got[f"kind/{kind}"]
    assert summary["eval"][1] != got                                   # the hook saw the params of its step


# ---------------------------------------------------------------------------------------------
# accuracy loop + CLI on a random model (machinery only; scores are ~0)

@pytest.mark.slow
def test_evaluate_cli_on_saved_checkpoint(tmp_path, params, capsys):
    ckpt = tmp_path / "ckpt"
    hf.save_jax_checkpoint(CFG, jax.tree.map(np.asarray, params), str(ckpt))
    out_json = tmp_path / "acc.json"
    out = evaluate.main(["--checkpoint", str(ckpt), "--num", "3", "--kinds", "caption,count",
                         "--batch_size", "2", "--max_new_tokens", "6", "--ablate_pixels", "--loss_samples", "2",
                         "--json", str(out_json)])
    text = capsys.readouterr().out
    assert "chance" in text and "caption_exact" in text and "zeroed" in text and "blank images" in text
    assert set(out["accuracy_blank_images"]) == set(out["accuracy"])
    kinds = {f"kind/{k}" for k in ev.LOSS_KINDS}
    assert set(out["heldout_loss_zeroed_pixels"]) == set(out["heldout_loss"]) >= kinds | {"mean"}
    assert out["heldout_loss_zeroed_pixels"]["kind/chat"] != out["heldout_loss"]["kind/chat"]   # chat has images
    assert set(out["accuracy"]) == {"caption", "caption_exact", "caption_colours", "caption_shapes", "count"}
    # --num 3: every item's prediction is among the printed examples; the accuracy is their mean score, and the
    # count chance is the share of ordered pairs i != j of items with equal true counts, counted by hand
    assert json.loads(out_json.read_text())["chance"] == out["chance"]
    for kind, items in out["examples"].items():
        assert len(items) == 3
        for name in ev.metrics_of(kind):
            assert out["accuracy"][name] == pytest.approx(np.mean([ev.metric(name, p, e) for p, e in items])), name
    counts = [int(e) for _, e in out["examples"]["count"]]
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    assert out["chance"]["count"] == pytest.approx(sum(counts[i] == counts[j] for i, j in pairs) / len(pairs))
    with pytest.raises(ValueError, match="not a directory"):
        evaluate.main(["--checkpoint", str(tmp_path / "missing")])


def test_repeated_kinds_are_the_kinds_that_are_exactly_one_source(capsys):
    """A kind/<k> entry repeats a source/<label> entry when every sample of kind k is in one source and that source
    holds no other kind (each synthetic source); a kind spread over sources, or a source of several kinds (a
    prepared corpus), keeps its entry. The console line leaves the repeated ones out (MetricsLogger.log_eval)."""
    from qwen2vl_jax.train.metrics import MetricsLogger

    group = lambda source, kind: ev.HeldoutGroup(source, kind, 1, ())  # noqa: E731
    synthetic = [group("caption", "caption"), group("ocr", "ocr")]
    assert ev.repeated_kinds(synthetic) == {"kind/caption", "kind/ocr"}
    # llava holds chat and caption; caption is also a synthetic source: neither kind is one source's samples
    assert ev.repeated_kinds([group("llava", "chat"), group("llava", "caption"), group("caption", "caption")]) == set()
    assert ev.repeated_kinds([group("a", "chat"), group("b", "chat"), group("ocr", "ocr")]) == {"kind/ocr"}
    values = {"source/caption": 1.0, "kind/caption": 1.0, "source/llava": 2.0, "kind/chat": 2.5, "mean": 1.5}
    MetricsLogger(None).log_eval(7, values, hide={"kind/caption"})
    assert capsys.readouterr().out == ("eval step 7 | source/caption 1.0000 | source/llava 2.0000 | kind/chat 2.5000 | "
                                       "mean 1.5000\n")


def test_evaluate_reads_the_runs_pixel_budgets(tmp_path):
    """The run's configs are read back from beside its checkpoints (RUN/model_config.json, RUN/data_config.json),
    so launch.evaluate rebuilds the model and preprocesses held-out media at the run's pixel budgets."""
    exp = registry.get_experiment("stage2", "test", [f"workdir={tmp_path}", "data.image_max_pixels=9408",
                                                     "data.video_total_pixels=18816"])
    rundir.write_run_configs(exp)
    data, source = rundir.read_data_config(str(tmp_path / "checkpoints"))
    assert source.endswith("data_config.json") and data == exp.data
    assert (data.vision_options.max_pixels, data.vision_options.video_total_pixels) == (9408, 18816)
    assert rundir.read_model_config(str(tmp_path / "checkpoints")) == exp.model
    assert rundir.read_data_config(str(tmp_path / "elsewhere" / "ckpt")) == (None, None)
    assert rundir.read_model_config(str(tmp_path / "elsewhere" / "ckpt")) is None
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data_config.json").write_text(json.dumps({"seq_len": 128, "image_max_pixels": 9408}))
    with pytest.raises(ValueError, match="missing: mixture.*video_total_pixels"):
        rundir.read_data_config(str(bad))
    # a run folder written before DataConfig.supervise_turn_newline existed reads back with the mask it trained
    # with (False); any other field missing is still refused
    old = {k: v for k, v in exp.data.to_dict().items() if k != "supervise_turn_newline"}
    (bad / "data_config.json").write_text(json.dumps(old))
    assert rundir.read_data_config(str(bad))[0] == dataclasses.replace(exp.data, supervise_turn_newline=False)
    (bad / "data_config.json").write_text(json.dumps({k: v for k, v in old.items() if k != "shuffle"}))
    with pytest.raises(ValueError, match=r"missing: shuffle; unknown: -\)$"):
        rundir.read_data_config(str(bad))


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
