"""Each input format -> prepare (launch.prepare_data's library) -> the training pipeline -> packed samples whose
text is the input's text and whose pixels are the input's media preprocessed directly. The inputs are written the
way each ecosystem writes them (LLaVA JSON, chat "messages" JSONL, img2dataset WebDataset tars, Hugging Face
datasets Parquet with its image struct) with real photographs and a real PyAV video (tests/media.py)."""
import dataclasses
import io
import json
import os
import tarfile

import numpy as np
import PIL.Image
import pytest

import media as test_media
from qwen2vl_jax.data import importers, media, pipeline, prepare, tokenizer
from qwen2vl_jax.data.sources import BadRecordError
from qwen2vl_jax.model.config import get_config

CFG = get_config("test")
TOK = tokenizer.load_tokenizer("embedded")
DATA = pipeline.DataConfig(seq_len=1024, max_patches=2048, image_max_pixels=64 * 28 * 28,
                           video_min_pixels=16 * 28 * 28, video_max_pixels=64 * 28 * 28,
                           video_total_pixels=256 * 28 * 28, lookahead=4, read_threads=1, read_buffer_size=8,
                           shuffle=False)
TARGET = prepare.Target(CFG, DATA, "embedded")
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
VISION = "<|vision_start|><|vision_end|>"          # a vision block once its pads are taken out


def run_import(inputs, out, fmt, heldout=0, **opts):
    return prepare.prepare(str(inputs), str(out), opts=importers.ImportOptions(fmt, **opts), target=TARGET,
                           heldout=heldout, progress=False)


def pipeline_samples(out, n):
    """{text without vision pads: (pixel rows, supervised text)} of the rows the training pipeline packs from
    OUT's train split, read until n distinct samples were seen."""
    cfg = dataclasses.replace(DATA, mixture=((f"arrayrecord:{out}", 1.0),))
    it = pipeline.make_iterator(cfg, CFG, TOK, batch_size=1)
    seen = {}
    try:
        for _ in range(20):
            b = {k: v[0] for k, v in next(it).items()}
            seg, p0 = b["segment_ids"], 0
            for s in np.unique(seg[seg > 0]):
                ids = b["input_ids"][seg == s]
                pads = np.isin(ids, (CFG.image_token_id, CFG.video_token_id))
                rows = 4 * int(pads.sum())
                supervised = TOK.decode(b["targets"][seg == s][b["loss_mask"][seg == s] > 0])
                seen[TOK.decode(ids[~pads])] = (normalised(b["pixel_values"][p0:p0 + rows]), supervised)
                p0 += rows
            if len(seen) >= n:
                break
    finally:
        it.close()
    assert it.stats()["skipped"] == 0
    return seen


def normalised(raw):
    """Packed rows carry the uint8 patch values; the processor's normalised floats of them (its lookup table,
    channel-major columns) compare with preprocess_* output."""
    channel = np.arange(raw.shape[-1]) // (raw.shape[-1] // 3)
    return media.normalization_table()[channel[None, :], raw]


def image_pixels(*encoded):
    """The images preprocessed directly from their files' bytes, at the run's pixel budget."""
    rows = [media.preprocess_images([PIL.Image.open(io.BytesIO(b))], min_pixels=DATA.image_min_pixels,
                                    max_pixels=DATA.image_max_pixels)[0] for b in encoded]
    return np.concatenate(rows)


def video_pixels(path):
    """qwen-vl-utils' sampling of the file (2 fps) with the run's per-frame ceiling (it binds below the total)."""
    return media.preprocess_video(path, min_pixels=DATA.video_min_pixels, max_pixels=DATA.video_max_pixels)[0]


def chat(*turns, system=SYSTEM):
    """ChatML by hand: turns alternate user / assistant."""
    roles = ("user", "assistant")
    return system + "".join(f"<|im_start|>{roles[i % 2]}\n{t}<|im_end|>\n" for i, t in enumerate(turns))


def answers(*texts):
    return "".join(f"{t}<|im_end|>" for t in texts)


def check(seen, want):
    """want: {text: (pixel rows, supervised text)}; the pipeline's samples are exactly these."""
    assert sorted(seen) == sorted(want)
    for text, (pixels, supervised) in want.items():
        got_pixels, got_supervised = seen[text]
        assert got_supervised == supervised, text
        assert got_pixels.shape == pixels.shape, text
        np.testing.assert_array_equal(got_pixels, pixels, err_msg=text)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The media, once: a JPEG and a PNG photograph, a WEBP photograph, and a 16-frame h264 video at 8 fps."""
    d = tmp_path_factory.mktemp("media")
    out = {"astronaut.jpg": test_media.photo_bytes("astronaut"), "coffee.png": test_media.photo_bytes("coffee", "PNG"),
           "chelsea.webp": test_media.photo_bytes("chelsea", "WEBP", quality=90)}
    for name, data in out.items():
        (d / name).write_bytes(data)
    out["video"] = test_media.write_panning_video(d / "pan.mp4", frames=16, fps=8)
    out["dir"] = d
    return out


def test_llava_json(tmp_path, files):
    """A LLaVA-style JSON array (paths under an image folder given as --media_root): an image conversation of
    two rounds, a two-image record, a video record and a text-only record."""
    root = tmp_path / "images"
    (root / "coco/train2017").mkdir(parents=True)
    (root / "coco/train2017/000000033471.jpg").write_bytes(files["astronaut.jpg"])
    (root / "ocr_vqa").mkdir()
    (root / "ocr_vqa/71.png").write_bytes(files["coffee.png"])
    rows = [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is the person wearing?"},
            {"from": "gpt", "value": "A white space suit."},
            {"from": "human", "value": "Is there a flag?"},
            {"from": "gpt", "value": "Yes, on the left."}]},
        {"id": "pair-1", "images": ["coco/train2017/000000033471.jpg", "ocr_vqa/71.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich one is a drink?"},
            {"from": "gpt", "value": "The second."}]},
        {"id": "v-1", "video": files["video"], "conversations": [
            {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "The camera pans."}]},
        {"id": "text-1", "conversations": [{"from": "human", "value": "What is 2+3?"}, {"from": "gpt", "value": "5"}]},
    ]
    data = tmp_path / "llava_v1_5_mix.json"
    data.write_text(json.dumps(rows, indent=2))
    assert importers.detect_format([str(data)]) == "llava"
    summary = run_import(data, tmp_path / "out", "llava", media_root=str(root))
    assert summary["written"] == {"train": 4} and summary["rejected"] == {} and summary["per_type"] == {"chat": 4}
    photo, coffee = files["astronaut.jpg"], files["coffee.png"]
    check(pipeline_samples(tmp_path / "out", 4), {
        chat(f"{VISION}\nWhat is the person wearing?", "A white space suit.", "Is there a flag?", "Yes, on the left."):
            (image_pixels(photo), answers("A white space suit.", "Yes, on the left.")),
        chat(f"{VISION}\n{VISION}\nWhich one is a drink?", "The second."):
            (image_pixels(photo, coffee), answers("The second.")),
        chat(f"{VISION}\nWhat happens?", "The camera pans."): (video_pixels(files["video"]), answers("The camera pans.")),
        chat("What is 2+3?", "5"): (np.zeros((0, 1176), np.float32), answers("5")),
    })
    assert summary["pixels_per_image"]["count"] == 3 and summary["pixels_per_image"]["max"] == 512 * 512


def test_messages_jsonl(tmp_path, files):
    """Chat "messages" JSON lines as Qwen2-VL fine-tuning data is written: string content with placeholders and an
    "images" / "videos" list, or a list of typed parts with the path in the part; a system prompt is kept."""
    d = tmp_path / "ft"
    d.mkdir()
    (d / "cat.webp").write_bytes(files["chelsea.webp"])
    lines = [
        {"messages": [{"role": "system", "content": "You are a careful annotator."},
                      {"role": "user", "content": "<image>Describe this photo."},
                      {"role": "assistant", "content": "A cat."}], "images": ["cat.webp"]},
        {"messages": [{"role": "user", "content": [
            {"type": "image", "image": "file://" + str(files["dir"] / "coffee.png")},
            {"type": "text", "text": "What drink is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Coffee."}]}]},
        {"messages": [{"role": "user", "content": "<video>What moves?"},
                      {"role": "assistant", "content": "The view."}], "videos": [files["video"]]},
    ]
    data = d / "train.jsonl"
    data.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    assert importers.detect_format([str(data)]) == "messages"
    summary = run_import(data, tmp_path / "out", "messages")
    assert summary["written"] == {"train": 3} and summary["rejected"] == {}
    check(pipeline_samples(tmp_path / "out", 3), {
        chat(f"{VISION}Describe this photo.", "A cat.",
             system="<|im_start|>system\nYou are a careful annotator.<|im_end|>\n"):
            (image_pixels(files["chelsea.webp"]), answers("A cat.")),
        chat(f"{VISION}What drink is this?", "Coffee."): (image_pixels(files["coffee.png"]), answers("Coffee.")),
        chat(f"{VISION}What moves?", "The view."): (video_pixels(files["video"]), answers("The view.")),
    })


def write_img2dataset_shard(path, samples):
    """A tar as img2dataset writes it: per sample KEY.<ext> (the image), KEY.txt (caption), KEY.json (metadata)."""
    with tarfile.open(path, "w") as tf:
        for key, ext, image, caption, txt in samples:
            meta = {"url": f"https://example.com/{key}.{ext}", "key": key, "status": "success", "error_message": None,
                    "width": 224, "height": 224, "original_width": 512, "original_height": 512, "exif": "{}",
                    "sha256": "0" * 64, "caption": caption}
            members = [(f"{key}.{ext}", image)] + ([(f"{key}.txt", caption.encode())] if txt else []) + \
                [(f"{key}.json", json.dumps(meta).encode())]
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1700000000
                tf.addfile(info, io.BytesIO(data))


def test_webdataset_img2dataset_folder(tmp_path, files):
    """img2dataset's output folder: 00000.tar, 00001.tar and their .parquet / _stats.json side files (not read);
    captions from KEY.txt, or from KEY.json's caption when there is no .txt."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path / "laion"
    d.mkdir()
    write_img2dataset_shard(d / "00000.tar", [("000000000", "jpg", files["astronaut.jpg"], "an astronaut", True),
                                              ("000000001", "png", files["coffee.png"], "a cup of coffee", True)])
    write_img2dataset_shard(d / "00001.tar", [("000010000", "webp", files["chelsea.webp"], "a tabby cat", False)])
    pq.write_table(pa.table({"key": ["000000000"], "caption": ["an astronaut"]}), d / "00000.parquet")
    (d / "00000_stats.json").write_text(json.dumps({"count": 2, "successes": 2}))
    inputs = importers.resolve_inputs(str(d))
    assert [os.path.basename(f) for f in inputs] == ["00000.tar", "00001.tar"]
    assert importers.detect_format(inputs) == "webdataset"
    summary = run_import(d, tmp_path / "out", "webdataset")
    assert summary["written"] == {"train": 3} and summary["per_type"] == {"caption": 3}
    check(pipeline_samples(tmp_path / "out", 3), {
        f"{VISION}{caption}<|endoftext|>": (image_pixels(image), f"{caption}<|endoftext|>")
        for caption, image in (("an astronaut", files["astronaut.jpg"]), ("a cup of coffee", files["coffee.png"]),
                               ("a tabby cat", files["chelsea.webp"]))})


HF_IMAGE = {"bytes": "binary", "path": "string"}


def hf_parquet(path, table, features, row_group_size):
    """A Parquet file with Hugging Face datasets' schema metadata ("huggingface": the features)."""
    import pyarrow.parquet as pq
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path, row_group_size=row_group_size)


def test_parquet_hugging_face_layout(tmp_path, files):
    """Two Parquet files as `datasets` writes them: captions (an Image column of {"bytes", "path"} structs, one
    with only a path, beside the file; a text column; three rows in two row groups), and chat rows in TRL's
    layout (messages with typed parts and an "index" into an images list of structs)."""
    import pyarrow as pa
    d = tmp_path / "hf"
    d.mkdir()
    (d / "cat.webp").write_bytes(files["chelsea.webp"])
    image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    captions = pa.table({
        "image": pa.array([{"bytes": files["astronaut.jpg"], "path": "astronaut.jpg"},
                           {"bytes": files["coffee.png"], "path": None},
                           {"bytes": None, "path": "cat.webp"}], image_t),
        "text": ["an astronaut", "coffee beans", "a cat"]})
    hf_parquet(d / "captions-00000-of-00001.parquet", captions,
               {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}, row_group_size=2)
    part_t = pa.struct([("index", pa.int64()), ("text", pa.string()), ("type", pa.string())])
    msg_t = pa.struct([("content", pa.list_(part_t)), ("role", pa.string())])
    def text(t):
        return {"index": None, "text": t, "type": "text"}

    def image(i):
        return {"index": i, "text": None, "type": "image"}

    chats = pa.table({
        "messages": pa.array([
            [{"role": "user", "content": [image(0), text("What is shown?")]},
             {"role": "assistant", "content": [text("A drink.")]}],
            [{"role": "user", "content": [image(1), text(" and "), image(0)]},       # the index picks the image
             {"role": "assistant", "content": [text("A person, then a drink.")]}]], pa.list_(msg_t)),
        "images": pa.array([[{"bytes": files["coffee.png"], "path": None}],
                            [{"bytes": files["coffee.png"], "path": None},
                             {"bytes": files["astronaut.jpg"], "path": None}]], pa.list_(image_t))})
    hf_parquet(d / "chat-00000-of-00001.parquet", chats, {}, row_group_size=10)
    summary = run_import(d / "*.parquet", tmp_path / "out", "parquet")
    assert summary["rejected"] == {} and summary["written"] == {"train": 5}
    want = {f"{VISION}{t}<|endoftext|>": (image_pixels(image), f"{t}<|endoftext|>")
            for t, image in (("an astronaut", files["astronaut.jpg"]), ("coffee beans", files["coffee.png"]),
                             ("a cat", files["chelsea.webp"]))}
    want[chat(f"{VISION}What is shown?", "A drink.")] = (image_pixels(files["coffee.png"]), answers("A drink."))
    want[chat(f"{VISION} and {VISION}", "A person, then a drink.")] = (
        image_pixels(files["astronaut.jpg"], files["coffee.png"]), answers("A person, then a drink."))
    check(pipeline_samples(tmp_path / "out", 5), want)


def test_format_detection_and_file_errors_are_one_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"type": "caption", "images": ["a.jpg"], "text": "t"}\n')
    assert importers.detect_format([str(tmp_path / "m.jsonl")]) == "manifest"
    (tmp_path / "odd.json").write_text('[{"question": "?"}]')
    with pytest.raises(ValueError, match=r"first record has \['question'\].*--format"):
        importers.detect_format([str(tmp_path / "odd.json")])
    with pytest.raises(ValueError, match="inputs must all be"):
        importers.detect_format([str(tmp_path / "m.jsonl"), str(tmp_path / "x.tar")])
    with pytest.raises(ValueError, match="matches no files"):
        importers.resolve_inputs(str(tmp_path / "*.parquet"))
    (tmp_path / "broken.json").write_text('[{"conversations": ')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        importers.scan([str(tmp_path / "broken.json")], importers.ImportOptions("llava"))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"img": [b"x"], "label": [3]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"columns \['img', 'label'\].*--image_column"):
        importers.scan([str(tmp_path / "t.parquet")], importers.ImportOptions("parquet"))


# ----------------------------------------------------------------------------------------------
# Interleaved web documents

def obelics_table(texts, images, image_type):
    """Rows as OBELICS ships them: "images" / "texts" lists with None holes, "metadata" (a JSON list per
    position) and "general_metadata" (a JSON object) as strings."""
    import pyarrow as pa
    meta = [json.dumps([{"document_url": "https://example.com/doc", "src": im if isinstance(im, str) else None,
                         "alt_text": None} if im is not None else None for im in row]) for row in images]
    general = [json.dumps({"url": f"https://example.com/doc{i}", "warc_filename": "crawl-data/x.warc.gz",
                           "warc_record_offset": 1000 * i}) for i in range(len(texts))]
    return pa.table({"images": pa.array(images, pa.list_(image_type)), "metadata": meta,
                     "general_metadata": general, "texts": pa.array(texts, pa.list_(pa.string()))})


OBELICS_FEATURES = {"images": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"},
                    "metadata": {"dtype": "string", "_type": "Value"},
                    "general_metadata": {"dtype": "string", "_type": "Value"},
                    "texts": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"}}


def after_first_token(text):
    """The supervised text of a sample that starts with text: all of it but its first token (no predecessor)."""
    return TOK.decode(TOK.encode(text)[1:])


def test_obelics_parquet_documents(tmp_path, files):
    """OBELICS-layout Parquet (images as paths / URLs in one file, as bytes in another) -> interleaved records
    with each image in its place (text by hand, pixels preprocessed from the files directly). The default
    policy drops a URL image and a corrupt one with their places and counts them; a document left with no
    image, and a position with both a text and an image, are rejected; --missing_images=reject rejects the
    documents that had a dropped image instead."""
    import pyarrow as pa
    d = tmp_path / "obelics"
    (d / "photos").mkdir(parents=True)
    (d / "photos/a.jpg").write_bytes(files["astronaut.jpg"])
    url = "https://cdn.example.com/img/lamborghini.jpg"
    paths_file = obelics_table(
        texts=[["Intro text.", None, "After the photo.", None, "The end."], [None, "Only a remote image."],
               ["Both set.", "x"], ["Caption first.", None]],
        images=[[None, "photos/a.jpg", None, url, None], [url, None], ["photos/a.jpg", None], [None, "photos/a.jpg"]],
        image_type=pa.string())
    hf_parquet(d / "train-00000-of-00002.parquet", paths_file, OBELICS_FEATURES, row_group_size=2)
    bytes_file = obelics_table(texts=[[None, "A cup.", None, "More text."]],
                               images=[[files["coffee.png"], None, b"not an image", None]], image_type=pa.binary())
    hf_parquet(d / "train-00001-of-00002.parquet", bytes_file, {}, row_group_size=10)

    assert importers.detect_format(importers.resolve_inputs(str(d))) == "parquet"
    summary = run_import(d, tmp_path / "out", "parquet")
    assert summary["written"] == {"train": 3} and summary["per_type"] == {"interleaved": 3}
    assert summary["rejected"] == {"bad_schema": 1, "no_images": 1}
    assert "train-00000-of-00002.parquet:2" in summary["rejected_examples"]["bad_schema"]
    assert summary["dropped_images"] == {"image_corrupt": 1, "remote_media": 1}
    check(pipeline_samples(tmp_path / "out", 3), {
        f"Intro text.{VISION}After the photo.\n\nThe end.<|endoftext|>":
            (image_pixels(files["astronaut.jpg"]),
             after_first_token("Intro text.After the photo.\n\nThe end.<|endoftext|>")),
        f"Caption first.{VISION}<|endoftext|>":
            (image_pixels(files["astronaut.jpg"]), after_first_token("Caption first.<|endoftext|>")),
        f"{VISION}A cup.\n\nMore text.<|endoftext|>":
            (image_pixels(files["coffee.png"]), "A cup.\n\nMore text.<|endoftext|>"),
    })
    summary = run_import(d, tmp_path / "out_reject", "parquet", missing_images="reject")
    assert summary["written"] == {"train": 1} and summary["dropped_images"] == {}
    assert summary["rejected"] == {"bad_schema": 1, "image_corrupt": 1, "remote_media": 2}
    assert "image 1:" in summary["rejected_examples"]["image_corrupt"]


def mmc4_document(url, sentences, images):
    """A document as mmc4's shards hold it; images: (image_name, matched_text_index)."""
    sims = [[0.2] * len(sentences) for _ in images]
    return {"url": url, "text_list": sentences,
            "image_info": [{"image_name": name, "raw_url": f"https://example.com/{name}", "face_detections": None,
                            "matched_text_index": j, "matched_sim": 0.31} for name, j in images],
            "similarity_matrix": sims, "could_have_url_duplicate": 0}


def test_mmc4_jsonl_documents(tmp_path, files):
    """mmc4 JSON lines (images downloaded to --media_root under their image_name) -> interleaved records with
    each image before the sentence it is matched to, the sentences joined by spaces (OpenFlamingo's layout);
    an image whose file was never downloaded is dropped and counted; a matched_text_index outside text_list
    rejects its document."""
    images = tmp_path / "mmc4_images"
    images.mkdir()
    (images / "a1b2.jpg").write_bytes(files["astronaut.jpg"])
    (images / "c3d4.png").write_bytes(files["coffee.png"])
    docs = [mmc4_document("https://example.com/space", ["A launch.", "The crew waves.", "Coffee after landing."],
                          [("c3d4.png", 2), ("a1b2.jpg", 0), ("never-downloaded.jpg", 1)]),
            mmc4_document("https://example.com/bad", ["One sentence."], [("a1b2.jpg", 1)])]
    data = tmp_path / "docs_no_face_shard_0_v2.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in docs))
    assert importers.detect_format([str(data)]) == "mmc4"
    summary = run_import(data, tmp_path / "out", "mmc4", media_root=str(images))
    assert summary["written"] == {"train": 1} and summary["per_type"] == {"interleaved": 1}
    assert summary["rejected"] == {"bad_schema": 1} and summary["dropped_images"] == {"missing_file": 1}
    assert "docs_no_face_shard_0_v2.jsonl:2" in summary["rejected_examples"]["bad_schema"]
    text = "A launch. The crew waves. Coffee after landing.<|endoftext|>"
    check(pipeline_samples(tmp_path / "out", 1), {
        f"{VISION}A launch. The crew waves. {VISION}Coffee after landing.<|endoftext|>":
            (image_pixels(files["astronaut.jpg"], files["coffee.png"]), text)})


# ----------------------------------------------------------------------------------------------
# Bad input is per record

def test_bad_json_lines_are_rejected_one_by_one(tmp_path):
    """A JSON-lines file with a latin-1 line (real 0xe9 bytes), a line that does not parse and lines whose JSON
    is not an object: each is rejected with its file:line and reason, and every good line is written (by hand:
    lines 2 and 6). Detection passes over a bad first line. A JSON array file that is not UTF-8, or does not
    parse, is one document: a ValueError naming the file and the position."""
    good = {"messages": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]}
    other = {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]}
    latin1 = json.dumps({"messages": [{"role": "user", "content": "Café?"},
                                      {"role": "assistant", "content": "Oui"}]}, ensure_ascii=False).encode("latin-1")
    assert b"\xe9" in latin1
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(b"{not json\n" + json.dumps(good).encode() + b"\n" + latin1 + b"\n[1, 2]\n\n7\n"
                     + json.dumps(other).encode() + b"\n")
    assert importers.detect_format([str(data)]) == "messages"
    summary = run_import(data, tmp_path / "out", "messages")
    assert summary["written"] == {"train": 2}
    assert summary["rejected"] == {"bad_encoding": 1, "bad_json": 1, "bad_schema": 2}
    ex = summary["rejected_examples"]
    assert ex["bad_encoding"].startswith("mixed.jsonl:3: ") and "0xe9" in ex["bad_encoding"]
    assert ex["bad_json"].startswith("mixed.jsonl:1: ") and ex["bad_schema"].startswith("mixed.jsonl:4: ")
    assert sorted(pipeline_samples(tmp_path / "out", 2)) == sorted([chat("What is 2+3?", "5"),
                                                                    chat("Capital of France?", "Paris")])
    array = tmp_path / "array.json"
    array.write_bytes(b'[{"messages": []},\n ' + latin1 + b"]")
    with pytest.raises(ValueError, match=r"array\.json: not UTF-8 at byte \d+ \(0xe9\)"):
        importers.scan([str(array)], importers.ImportOptions("messages"))
    array.write_bytes(b'[{"messages": []},\n {"messages": }]')
    with pytest.raises(ValueError, match=r"array\.json: not valid JSON \(.*line 2 column 15"):
        importers.scan([str(array)], importers.ImportOptions("messages"))


# ----------------------------------------------------------------------------------------------
# Issue 20: chat importer contracts

def read_one(row, fmt, base):
    """The Item (or the BadRecordError) of one record, read as the import reads it."""
    (origin, item), = importers.read_chunk(importers.JsonChunk(str(base / "x.jsonl"), (("x.jsonl:1", row),)),
                                           importers.ImportOptions(fmt))
    return item


def test_messages_each_listed_image_is_used_once(tmp_path):
    """TRL's layout: an index used twice while another is never used is rejected (not one image duplicated and
    the other dropped); the same record with the indices [1, 0] takes each image once, in that order."""
    def record(i, j):
        return {"messages": [{"role": "user", "content": [{"type": "image", "index": i}, {"type": "image", "index": j},
                                                          {"type": "text", "text": "Compare."}]},
                             {"role": "assistant", "content": "Same."}], "images": ["a.jpg", "b.jpg"]}
    bad = read_one(record(0, 0), "messages", tmp_path)
    assert isinstance(bad, BadRecordError) and bad.reason == "placeholder_mismatch", bad
    good = read_one(record(1, 0), "messages", tmp_path)
    assert good.images == (str(tmp_path / "b.jpg"), str(tmp_path / "a.jpg"))


def test_llava_system_turn_placeholder(tmp_path, files):
    """An <image> in a LLaVA system turn counts like one in a user turn: with one image the record is written
    and the image lands where the placeholder is (the system turn's ChatML, by hand)."""
    (tmp_path / "a.jpg").write_bytes(files["astronaut.jpg"])
    row = {"id": "s1", "image": "a.jpg", "conversations": [
        {"from": "system", "value": "<image>\nYou describe this photo."},
        {"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "An astronaut."}]}
    item = read_one(row, "llava", tmp_path)
    assert item.entry["messages"][0] == {"role": "system", "content": [
        {"type": "image"}, {"type": "text", "text": "\nYou describe this photo."}]}
    data = tmp_path / "sys.json"
    data.write_text(json.dumps([row]))
    summary = run_import(data, tmp_path / "out", "llava")
    assert summary["written"] == {"train": 1}
    check(pipeline_samples(tmp_path / "out", 1), {
        chat("What is it?", "An astronaut.",
             system=f"<|im_start|>system\n{VISION}\nYou describe this photo.<|im_end|>\n"):
            (image_pixels(files["astronaut.jpg"]), answers("An astronaut."))})


# ----------------------------------------------------------------------------------------------
# Inputs in a bucket

def written_records(out):
    """{origin: record} of both splits of a prepared dataset (ArrayRecord, read back as training reads it)."""
    from array_record.python.array_record_module import ArrayRecordReader
    from qwen2vl_jax.data import sources
    recs = {}
    for split in ("train", "heldout"):
        for name in sorted(os.listdir(out / split)) if (out / split).is_dir() else []:
            reader = ArrayRecordReader(str(out / split / name))
            for data in reader.read_all():
                recs[sources.decode_record(data)["origin"]] = data
            reader.close()
    return recs


def test_inputs_and_media_in_a_bucket(gcs_bucket, tmp_path, files):
    """On the Cloud Storage emulator: --input as a bucket folder, glob or file (JSON lines, tar shards,
    Parquet), --media_root in the bucket: each import writes byte for byte the records that the import of the
    same files on a local disk writes (tested above against the training pipeline), and an image missing from
    the bucket is rejected as missing_file."""
    from qwen2vl_jax.train import paths
    bucket, _ = gcs_bucket
    local = tmp_path / "local"
    (local / "media/img").mkdir(parents=True)
    (local / "media/img/cat.webp").write_bytes(files["chelsea.webp"])
    (local / "media/img/a.jpg").write_bytes(files["astronaut.jpg"])
    (local / "chat").mkdir()
    lines = [{"messages": [{"role": "user", "content": "<image>What animal?"},
                           {"role": "assistant", "content": "A cat."}], "images": ["img/cat.webp"]},
             {"messages": [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "Nobody."}],
              "images": ["img/gone.jpg"]}]
    (local / "chat/train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (local / "shards").mkdir()
    write_img2dataset_shard(local / "shards/00000.tar",
                            [("000000000", "jpg", files["astronaut.jpg"], "a person", True)])
    write_img2dataset_shard(local / "shards/00001.tar", [("000010000", "png", files["coffee.png"], "a cup", False)])
    import pyarrow as pa
    (local / "docs").mkdir()
    hf_parquet(local / "docs/train-00000-of-00001.parquet",
               obelics_table([["Intro.", None, "More."]], [[None, "img/a.jpg", None]], pa.string()),
               OBELICS_FEATURES, row_group_size=1)
    gcs = paths._gcs()
    for f in sorted(local.rglob("*")):
        if f.is_file():
            gcs.pipe(f"{bucket}/{f.relative_to(local)}", f.read_bytes())

    for remote, fmt, local_input, want in (
            (f"{bucket}/chat/train.jsonl", "messages", local / "chat/train.jsonl", 1),
            (f"{bucket}/shards/*.tar", "webdataset", local / "shards", 2),
            (f"{bucket}/docs", "parquet", local / "docs", 1)):
        inputs = importers.resolve_inputs(remote)
        assert [f.rsplit("/", 1)[1] for f in inputs] == [f.name for f in sorted(local_input.parent.glob(
            local_input.name if local_input.is_file() else local_input.name + "/*"))], inputs
        assert importers.detect_format(inputs) == fmt
        got = run_import(remote, tmp_path / f"out_{fmt}_gcs", fmt, media_root=f"{bucket}/media")
        ref = run_import(local_input, tmp_path / f"out_{fmt}_local", fmt, media_root=str(local / "media"))
        assert got["written"] == ref["written"] == {"train": want} and got["rejected"] == ref["rejected"]
        assert written_records(tmp_path / f"out_{fmt}_gcs") == written_records(tmp_path / f"out_{fmt}_local")
        if fmt == "messages":
            assert got["rejected"] == {"missing_file": 1}
            assert f"{bucket}/media/img/gone.jpg does not exist" in got["rejected_examples"]["missing_file"]
