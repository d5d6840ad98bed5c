"""launch.prepare_data: the manifest end to end; every rejection reason counted with an example and no good record
lost; the held-out split that evaluation reads; re-runs that never mix; statistics; the CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import media
from PIL import Image

from launch import prepare_data
from qwen2vl_jax.data import importers, pipeline, prepare, sources, tokenizer
from qwen2vl_jax.eval import evaluation
from qwen2vl_jax.model.config import get_config
import repo

CFG = get_config("test")
TOK = tokenizer.load_tokenizer("embedded")
DATA = pipeline.DataConfig(seq_len=512, max_patches=1024, lookahead=4, read_threads=1, read_buffer_size=8)
OPTS = DATA.vision_options
TARGET = prepare.Target(CFG, DATA, "embedded")
REPO = repo.ROOT


def run(inputs, out, fmt="manifest", target=TARGET, **kw):
    opts = {k: kw.pop(k) for k in ("media_root", "ignore_fields") if k in kw}
    return prepare.prepare(str(inputs), str(out), opts=importers.ImportOptions(fmt, **opts), target=target,
                           progress=False, **kw)


def write_png(path, w=84, h=56, colour=(10, 200, 30)):
    Image.new("RGB", (w, h), colour).save(path, "PNG")
    return os.path.basename(path)


def records(out, split="train"):
    ds = sources.arrayrecord_source(str(out), split)
    return [sources.decode_record(ds[i]) for i in range(len(ds))]


@pytest.fixture()
def manifest(tmp_path):
    a = write_png(tmp_path / "a.png")
    b = write_png(tmp_path / "b.png", 56, 56, (200, 0, 0))
    v = os.path.basename(media.write_video(tmp_path / "v.mp4", 8, 4))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "notvideo.mp4").write_bytes(b"garbage" * 20)
    lines = [
        {"type": "caption", "images": [a], "text": "a green box"},
        {"type": "ocr", "images": [b], "text": "HELLO", "prompt": "Read it.\n"},
        {"type": "grounding", "images": [a], "boxes": [{"ref": "the box", "box": [0, 0, 41, 55]}]},
        {"type": "interleaved", "images": [a, b], "text": "first <image> then <image> done"},
        {"type": "video", "video": v, "text": "it gets brighter"},
        {"type": "chat", "images": [b], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "red"}]},
        "{this is not json",
        {"type": "caption", "images": ["nope.png"], "text": "missing"},
        {"type": "caption", "images": ["broken.png"], "text": "broken"},
        {"type": "video", "video": "notvideo.mp4", "text": "broken video"},
        {"type": "caption", "images": [a]},                      # no text
        {"type": "interleaved", "images": [a], "text": "no marker"},
        {"type": "poem", "text": "unknown type"},
        {"type": "caption", "images": [a], "txt": "misspelt text field"},
        {"type": "grounding", "images": [a], "boxes": [{"ref": "off the edge", "box": [0, 0, 84, 10]}]},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    return path


EXPECTED_TEXT = {
    "caption": "<|vision_start|><|vision_end|>a green box<|endoftext|>",
    "ocr": "<|vision_start|><|vision_end|>Read it.\nHELLO<|endoftext|>",
    # box [0,0,41,55] in an 84x56 image -> (0,0),(488,982) on the [0, 1000) grid
    "grounding": "<|vision_start|><|vision_end|><|object_ref_start|>the box<|object_ref_end|>"
                 "<|box_start|>(0,0),(488,982)<|box_end|><|endoftext|>",
    "interleaved": "first <|vision_start|><|vision_end|> then <|vision_start|><|vision_end|> done<|endoftext|>",
    "video": "<|vision_start|><|vision_end|>it gets brighter<|endoftext|>",
    "chat": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|vision_end|>Colour?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n",
}


def test_manifest_end_to_end(tmp_path, manifest):
    out = tmp_path / "out"
    summary = run(manifest, out, num_shards=2)
    assert summary["written"] == {"train": 6}
    assert summary["rejected"] == {"bad_json": 1, "missing_file": 1, "image_corrupt": 1, "video_unreadable_video": 1,
                                   "bad_schema": 3, "unknown_field": 1, "box_outside_image": 1}
    assert "'txt'" in summary["rejected_examples"]["unknown_field"]
    assert summary["rejected_examples"]["box_outside_image"].startswith("data.jsonl:15: ")
    assert summary["per_type"] == {k: 1 for k in EXPECTED_TEXT}
    assert sorted(os.listdir(out / "train")) == ["data-00000-of-00002.array_record", "data-00001-of-00002.array_record"]
    by_type = {}
    ds = sources.arrayrecord_source(str(out))
    for i in range(len(ds)):
        by_type[sources.decode_record(ds[i])["type"]] = (sources.decode_record(ds[i]),
                                                          sources.record_to_sample(ds[i], TOK, CFG, OPTS))
    assert set(by_type) == set(EXPECTED_TEXT)
    pads = (CFG.image_token_id, CFG.video_token_id)
    for kind, (rec, sample) in by_type.items():
        ids = sample["input_ids"]
        assert TOK.decode(ids[~np.isin(ids, pads)]) == EXPECTED_TEXT[kind], kind
        assert int(np.isin(ids, pads).sum()) * 4 == sample["pixel_values"].shape[0]
    _, s = by_type["ocr"]
    assert TOK.decode(s["input_ids"][s["loss_mask"] > 0]) == "HELLO<|endoftext|>"
    _, s = by_type["chat"]
    assert TOK.decode(s["input_ids"][s["loss_mask"] > 0]) == "red<|im_end|>"
    # 8 frames at 4 fps sampled at 2 fps -> 4 frames -> 2 temporal slices; 56x64 frames are upscaled to the
    # 16*28*28 video minimum: beta = sqrt(12544 / 3584), 56 -> 112, 64 -> 140 px (8 x 10 patches)
    rec, s = by_type["video"]
    assert s["grid_thw"].tolist() == [[2, 8, 10]] and rec["video"] == str(tmp_path / "v.mp4")
    rec, _ = by_type["caption"]
    assert rec["images"][0] == (tmp_path / "a.png").read_bytes() and rec["origin"] == "data.jsonl:1"


def write_jpeg(path, w, h):
    Image.fromarray(media.photo("astronaut")).resize((w, h)).save(path, "JPEG", quality=85)
    return os.path.basename(path)


def test_every_rejection_reason_is_counted_and_no_good_record_is_lost(tmp_path):
    """LLaVA JSONL with good records between one bad record per reason; each reason counted with its example; the
    records of the kinds training skips or drops do so in the training pipeline too (the independent check that
    import rejects what training would)."""
    good = write_jpeg(tmp_path / "good.jpg", 120, 90)
    write_png(tmp_path / "thin.png", 250, 1)                        # aspect ratio 250 > 200
    jpeg = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"GIF89a but not really an image")
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 300)
    video = os.path.basename(media.write_video(tmp_path / "v.mp4", 8, 4))

    def conv(question, image=None, answer="ok", **extra):
        turns = [{"from": "human", "value": question}] + ([{"from": "gpt", "value": answer}] if answer else [])
        return {**({"image": image} if image else {}), **extra, "conversations": turns}

    bad = {
        "bad_json": '{"conversations": [',
        "bad_schema": conv("hi", answer=None) | {"conversations": [{"from": "robot", "value": "beep"}]},
        "unknown_field": conv("<image>\nq", good, source="coco"),
        "placeholder_mismatch": conv("no placeholder", good),
        "missing_file": conv("<image>\nq", "absent.jpg"),
        "image_corrupt": conv("<image>\nq", "junk.jpg"),
        "image_truncated": conv("<image>\nq", "cut.jpg"),
        "image_aspect_ratio": conv("<image>\nq", "thin.png"),
        "remote_media": conv("<image>\nq", "https://example.com/a.jpg"),
        "unsupported": conv("<video><video>", video=[video, video]),
        "video_unreadable_video": conv("<video>\nq", video="junk.mp4"),
        "no_target": conv("<image>\nonly a question", good, answer=None),
    }
    lines, want_good = [], []
    for i, (reason, line) in enumerate(bad.items()):
        g = conv(f"<image>\ngood question {i}", good, answer=f"answer {i}")
        lines += [json.dumps(g), line if isinstance(line, str) else json.dumps(line)]
        want_good.append(f"answer {i}")
    lines.append(json.dumps(conv("<video>\nwhat changes?", video=video, answer="it brightens")))
    want_good.append("it brightens")
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    summary = run(tmp_path / "data.jsonl", tmp_path / "out", "llava")
    assert summary["rejected"] == {reason: 1 for reason in bad}
    for reason, example in summary["rejected_examples"].items():
        assert example.startswith(f"data.jsonl:{2 + 2 * list(bad).index(reason)}: "), (reason, example)
    assert "--ignore_fields=source" in summary["rejected_examples"]["unknown_field"]
    got = [m["content"] for r in records(tmp_path / "out") for m in r["messages"] if m["role"] == "assistant"]
    assert got == want_good                                             # every good record, in input order

    # what training does with records of the rejected kinds that can be written at all
    decoder = pipeline.SampleDecoder((sources.parse_source("arrayrecord:x"),), "train", 0, TOK, CFG,
                                     DATA.pack_config(CFG), OPTS, DATA.video_sampling)
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}]
    cases = {"image_corrupt": "junk.jpg", "image_truncated": "cut.jpg", "image_aspect_ratio": "thin.png",
             "no_target": "good.jpg"}
    for reason, name in cases.items():
        rec = sources.encode_record({"type": "chat", "messages": user}, [(tmp_path / name).read_bytes()], None)
        assert decoder(0, (0, rec)).sample is None, reason


def test_heldout_split_is_what_evaluation_reads(tmp_path):
    """--heldout=2 of 8 captions: positions 2 and 6 (the middle of each half); a rejected candidate passes its
    place to the next good record. The evaluator's held-out samples are exactly those records; training reads
    the other ones."""
    img = write_png(tmp_path / "a.png")
    lines = [{"type": "caption", "images": [img], "text": f"caption {i}"} for i in range(8)]
    lines[6]["images"] = ["missing.png"]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    summary = run(tmp_path / "m.jsonl", out, heldout=2)
    assert summary["written"] == {"train": 5, "heldout": 2} and summary["rejected"] == {"missing_file": 1}
    assert [r["text"] for r in records(out, "heldout")] == ["caption 2", "caption 7"]
    assert [r["text"] for r in records(out)] == ["caption 0", "caption 1", "caption 3", "caption 4", "caption 5"]
    cfg = pipeline.DataConfig(mixture=((f"arrayrecord:{out}", 1.0),), seq_len=256, max_patches=512)
    held = evaluation.heldout_samples(cfg, CFG, TOK, num_samples=8)
    assert list(held) == ["out"]
    assert [TOK.decode(s["input_ids"][s["loss_mask"] > 0]) for s in held["out"]] == \
        ["caption 2<|endoftext|>", "caption 7<|endoftext|>"]
    # the same through a "{split}" glob; a glob without it has no held-out split (an error, not the train files)
    glob = f"arrayrecord:{out}/{{split}}/*.array_record"
    assert len(evaluation.heldout_samples(pipeline.DataConfig(mixture=((glob, 1.0),)), CFG, TOK, 8)["out"]) == 2
    with pytest.raises(ValueError, match="has no heldout split"):
        sources.arrayrecord_files(f"{out}/train/*.array_record", "heldout")
    run(tmp_path / "m.jsonl", tmp_path / "no_heldout")
    with pytest.raises(ValueError, match="--heldout=N"):
        sources.arrayrecord_files(str(tmp_path / "no_heldout"), "heldout")
    with pytest.raises(ValueError, match="leaves no training records"):
        run(tmp_path / "m.jsonl", tmp_path / "all", heldout=8)


def test_source_labels_never_collide():
    names = ["arrayrecord:/data/laion/{split}/*.array_record", "arrayrecord:/mnt/laion/{split}/*.array_record",
             "arrayrecord:/data/coco", "synthetic:caption", "arrayrecord:/x/caption", "arrayrecord:/x/caption/",
             "arrayrecord:*.array_record"]
    labels = sources.source_labels(names)
    assert labels == ["data/laion", "mnt/laion", "coco", "caption", "arrayrecord:/x/caption",
                      "arrayrecord:/x/caption/", "arrayrecord:*.array_record"]
    with pytest.raises(ValueError, match="repeat"):
        sources.source_labels(["synthetic:caption", "synthetic:caption"])


def test_rerun_never_mixes_datasets(tmp_path, manifest):
    out = tmp_path / "out"
    first = run(manifest, out, num_shards=2)
    stamp = os.stat(out / "summary.json").st_mtime_ns
    again = run(manifest, out, num_shards=2)
    assert again["up_to_date"] and os.stat(out / "summary.json").st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"other settings \(num_shards: 2 -> 3\).*--overwrite"):
        run(manifest, out, num_shards=3)
    replaced = run(manifest, out, num_shards=3, overwrite=True)
    assert sorted(os.listdir(out / "train")) == [f"data-0000{i}-of-00003.array_record" for i in range(3)]
    assert len(records(out)) == replaced["written"]["train"] == first["written"]["train"] == 6
    # an import killed part way leaves no summary.json: the next run starts over instead of reading its pieces
    os.remove(out / "summary.json")
    (out / ".incomplete").mkdir()
    (out / ".incomplete" / "junk").write_text("x")
    assert not run(manifest, out, num_shards=1)["up_to_date"]
    assert sorted(os.listdir(out)) == ["summary.json", "summary.png", "train"] and len(records(out)) == 6
    # the earlier layout (shards directly in OUT) is replaced with --overwrite, never read beside the new one
    old = tmp_path / "old"
    old.mkdir()
    (old / "data-00000-of-00001.array_record").write_bytes(b"")
    (old / "summary.json").write_text(json.dumps({"written": 6}))
    with pytest.raises(ValueError, match="other settings"):
        run(manifest, old)
    run(manifest, old, overwrite=True)
    assert sorted(os.listdir(old)) == ["summary.json", "summary.png", "train"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"did not write \(notes.txt\)"):
        run(manifest, tmp_path / "mine", overwrite=True)


def test_all_records_failing_is_an_error_at_import(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"type": "caption", "images": ["x.png"], "text": "t"}) + "\n"
                                      + json.dumps({"type": "caption", "images": ["y.png"], "text": "t"}) + "\n")
    with pytest.raises(ValueError, match=r"no usable training record in 2 input records: missing_file 2 "
                                         r"\(e.g. m.jsonl:1: .*x.png does not exist\)"):
        run(tmp_path / "m.jsonl", tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []


def test_summary_statistics_and_histograms(tmp_path):
    """Tokens per sample against a hand count; pixels per image are the photographs' sizes; over-budget records
    are written and counted; the PNG holds the two histograms."""
    names = [("astronaut", 512, 512), ("coffee", 600, 400), ("chelsea", 451, 300)]
    lines = []
    for name, w, h in names:
        (tmp_path / f"{name}.jpg").write_bytes(media.photo_bytes(name))
        lines.append({"type": "caption", "images": [f"{name}.jpg"], "text": f"a photo of {name}"})
    lines.append({"type": "chat", "messages": [{"role": "user", "content": "Describe."},
                                               {"role": "assistant", "content": "long " * 600}]})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = run(tmp_path / "m.jsonl", tmp_path / "out")
    px = sorted(w * h for _, w, h in names)
    assert summary["pixels_per_image"] == {"count": 3, "min": px[0], "p50": float(px[1]), "mean": round(sum(px) / 3, 2),
                                           "p90": pytest.approx(px[1] + 0.8 * (px[2] - px[1])),
                                           "p99": pytest.approx(px[1] + 0.98 * (px[2] - px[1])), "max": px[2],
                                           "total": sum(px)}
    # caption: vision_start + 256 pads (a 448-px-class photo at 256*28*28 pixels) + vision_end + text + <|endoftext|>
    want = []
    for name, w, h in names:
        gh, gw = (int(x) for x in _grid(h, w))
        want.append(2 + gh * gw // 4 + len(TOK.encode(f"a photo of {name}")) + 1)
    chat = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nDescribe.<|im_end|>\n" \
        "<|im_start|>assistant\n" + "long " * 600 + "<|im_end|>\n"
    want.append(len(TOK.encode(chat)))
    assert summary["tokens_per_sample"]["total"] == sum(want)
    assert summary["tokens_per_sample"]["max"] == max(want) > DATA.seq_len
    assert summary["over_budget"] == {"text_tail": 1} and summary["written"] == {"train": 4}
    with Image.open(tmp_path / "out" / "summary.png") as im:
        assert im.format == "PNG" and im.size[0] > 2 * im.size[1]


def _grid(h, w):
    from qwen2vl_jax.data.media import FACTOR, smart_resize
    rh, rw = smart_resize(h, w, FACTOR, OPTS.min_pixels, OPTS.max_pixels)
    return rh // 14, rw // 14


def test_cli_workers_progress_and_errors(tmp_path, manifest, monkeypatch):
    cmd = [sys.executable, "-m", "launch.prepare_data", f"--input={manifest}", f"--out={tmp_path / 'cli'}",
           "--model=test", "--heldout=1", "--set", "data.seq_len=512"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "format: manifest (detected" in r.stderr and "rec/s" in r.stderr      # detection, progress with rate
    assert "wrote 6 records (train 5, heldout 1;" in r.stderr
    assert "  bad_schema: 3  (e.g. data.jsonl:11: " in r.stderr and "rejected 9:" in r.stderr
    assert "tokens per sample (embedded tokenizer)" in r.stderr
    # worker processes (spawned; chunks of 4 input records) write exactly what one process writes
    monkeypatch.setattr(importers, "CHUNK_RECORDS", 4)
    two = run(manifest, tmp_path / "two", heldout=1, workers=2)
    assert two["workers"] == 2 and two["written"] == {"train": 5, "heldout": 1}
    for split in ("train", "heldout"):
        assert records(tmp_path / "cli", split) == records(tmp_path / "two", split)
    # errors are one line (cli.run prints "ERROR: <message>" and exits 2)
    with pytest.raises(ValueError, match=r"^--out .* other settings \(num_shards: 1 -> 2\)"):
        prepare_data.main(cmd[3:] + ["--num_shards=2"])
    with pytest.raises(ValueError, match=r"^--input '/nonexistent/\*.json' matches no files$"):
        prepare_data.main(["--input=/nonexistent/*.json", "--out=x"])


def test_shard_parts_together_equal_one_run(tmp_path, manifest, monkeypatch):
    """--num_shards=3 --shard_index=0,1,2 (three hosts; chunks of 2 records) against one unsharded run into
    another folder: train shard i of part i is the whole run's shard i byte for byte; the parts' held-out files
    hold the whole run's held-out records; summary.json appears with the last part and counts what the whole
    run counts."""
    from array_record.python.array_record_module import ArrayRecordReader

    def read(path):
        reader = ArrayRecordReader(str(path))
        try:
            return reader.read_all()
        finally:
            reader.close()

    monkeypatch.setattr(importers, "CHUNK_RECORDS", 2)
    whole = run(manifest, tmp_path / "whole", heldout=3, num_shards=3)
    parts = tmp_path / "parts"
    for i in (2, 0, 1):                         # any order
        assert not (parts / "summary.json").exists()
        part = run(manifest, parts, heldout=3, num_shards=3, shard_index=i)
        assert part["part"] == i and part["merged"] == (i == 1)
    for i in range(3):
        name = prepare.shard_name(i, 3)
        assert (parts / "train" / name).read_bytes() == (tmp_path / "whole" / "train" / name).read_bytes()
    held = [r for i in range(3) for r in read(parts / "heldout" / prepare.shard_name(i, 3))]
    assert sorted(held) == sorted(read(tmp_path / "whole" / "heldout" / prepare.shard_name(0, 1))) and held
    merged = json.loads((parts / "summary.json").read_text())
    skip = ("seconds", "records_per_second", "workers", "shards", "up_to_date")
    assert {k: v for k, v in merged.items() if k not in skip} == {k: v for k, v in whole.items() if k not in skip}
    # held-out candidates 2, 7, 12 (chunks [2, 3], [6, 7], [12, 13]): 7 and 12 lose their places, their chunks
    # having no accepted record
    assert whole["written"] == {"train": 5, "heldout": 1} and sum(whole["rejected"].values()) == 9
