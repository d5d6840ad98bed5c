"""launch/prepare_data.py end to end: manifest -> ArrayRecord shards -> samples, with skips counted."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import media
from PIL import Image

from launch import prepare_data
from qwen2vl_jax.model.config import get_config
from qwen2vl_jax.data import formats, sources, tokenizer

CFG = get_config("test")
TOK = tokenizer.load_tokenizer("embedded")
OPTS = formats.VisionOptions()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_png(path, w=84, h=56, colour=(10, 200, 30)):
    Image.new("RGB", (w, h), colour).save(path, "PNG")
    return os.path.basename(path)


def write_video(path, frames=8, fps=4):
    return os.path.basename(media.write_video(path, frames, fps))


@pytest.fixture()
def manifest(tmp_path):
    a = write_png(tmp_path / "a.png")
    b = write_png(tmp_path / "b.png", 56, 56, (200, 0, 0))
    v = write_video(tmp_path / "v.mp4")
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


def test_prepare_end_to_end(tmp_path, manifest):
    out = tmp_path / "out"
    summary = prepare_data.prepare(str(manifest), str(out), num_shards=2)
    assert summary["written"] == 6
    assert summary["skipped"] == {"bad_json": 1, "missing_file": 1, "image_corrupt": 1,
                                  "video_unreadable_video": 1, "bad_schema": 3}
    assert summary["per_type"] == {k: 1 for k in EXPECTED_TEXT}
    assert json.loads((out / "summary.json").read_text())["written"] == 6
    ds = sources.arrayrecord_source(str(out / "data-*.array_record"))
    assert len(ds) == 6
    by_type = {}
    for i in range(len(ds)):
        rec = sources.decode_record(ds[i])
        sample = sources.record_to_sample(ds[i], TOK, CFG, OPTS)
        by_type[rec["type"]] = (rec, sample)
    assert set(by_type) == set(EXPECTED_TEXT)
    pads = (CFG.image_token_id, CFG.video_token_id)
    for kind, (rec, sample) in by_type.items():
        ids = sample["input_ids"]
        assert TOK.decode(ids[~np.isin(ids, pads)]) == EXPECTED_TEXT[kind], kind
        n_pads = int(np.isin(ids, pads).sum())
        assert n_pads * 4 == sample["pixel_values"].shape[0] == int(sample["grid_thw"].prod(-1).sum())
    # supervision: pre-training text yes, prompt no; chat only the assistant turn
    rec, s = by_type["ocr"]
    sup = TOK.decode(s["input_ids"][s["loss_mask"] > 0])
    assert sup == "HELLO<|endoftext|>"
    rec, s = by_type["chat"]
    assert TOK.decode(s["input_ids"][s["loss_mask"] > 0]) == "red<|im_end|>"
    # the video: 8 frames at 4 fps sampled at 2 fps -> 4 frames -> 2 temporal slices; 56x64 frames are
    # upscaled to the 16*28*28 video minimum: beta = sqrt(12544 / 3584), 56 -> 112, 64 -> 140 px (8 x 10 patches)
    rec, s = by_type["video"]
    assert s["grid_thw"].tolist() == [[2, 8, 10]] and s["vision_kind"].tolist() == [1]
    assert rec["video"] == str(tmp_path / "v.mp4")
    # images are embedded byte for byte
    rec, _ = by_type["caption"]
    assert rec["images"][0] == (tmp_path / "a.png").read_bytes()


def test_cli_progress_and_summary(tmp_path, manifest):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "launch.prepare_data", "--manifest", str(manifest), "--out", str(out),
                        "--num_shards", "3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote 6 records" in r.stderr and "skipped 7:" in r.stderr
    for reason in ("bad_json: 1", "bad_schema: 3", "missing_file: 1", "image_corrupt: 1"):
        assert reason in r.stderr
    assert "line/s" in r.stderr or "lines/s" in r.stderr   # the progress bar reports its rate
    assert sorted(os.listdir(out)) == ["data-00000-of-00003.array_record", "data-00001-of-00003.array_record",
                                       "data-00002-of-00003.array_record", "summary.json"]


def test_empty_result_and_bad_arguments(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"type": "caption", "images": ["x.png"], "text": "t"}\n')
    r = subprocess.run([sys.executable, "-m", "launch.prepare_data", f"--manifest={m}", f"--out={tmp_path / 'o'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "wrote 0 records" in r.stderr and "missing_file: 1" in r.stderr
    r = subprocess.run([sys.executable, "-m", "launch.prepare_data", f"--manifest={tmp_path / 'none.jsonl'}",
                        f"--out={tmp_path / 'o'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr == f"ERROR: manifest {tmp_path / 'none.jsonl'} does not exist\n"
    with pytest.raises(FileNotFoundError):
        prepare_data.prepare(str(tmp_path / "none.jsonl"), str(tmp_path / "o"))
    with pytest.raises(ValueError, match="num_shards"):
        prepare_data.prepare(str(m), str(tmp_path / "o"), num_shards=0)


def test_record_schema_errors_name_the_problem():
    with pytest.raises(sources.BadRecordError, match="needs 1 image"):
        sources.validate_entry({"type": "caption", "images": [], "text": "x"})
    with pytest.raises(sources.BadRecordError, match="markers"):
        sources.validate_entry({"type": "interleaved", "images": ["a"], "text": "none"})
    with pytest.raises(sources.BadRecordError, match="messages use 0 images"):
        sources.validate_entry({"type": "chat", "images": ["a"], "messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(sources.BadRecordError) as e:
        sources.decode_record(b"\xc1garbage")
    assert e.value.reason == "bad_record"
    buf = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buf, "PNG")
    rec = sources.encode_record({"type": "grounding", "boxes": [{"ref": "r", "boxes": [[0, 0, 50, 5]]}]},
                                [buf.getvalue()], None)
    with pytest.raises(sources.BadRecordError, match="outside"):
        sources.record_to_sample(rec, TOK, CFG, OPTS)
