"""Grain pipeline: batch contract, determinism, process sharding, exact resume (with worker prefetch),
mixture weights, bad input skipped and counted per reason."""
import io
import json
import logging as pylogging

import numpy as np
import pytest

from media import write_video
from PIL import Image

from qwen2vl_jax.model.config import get_config
from qwen2vl_jax.data import pipeline, sources, tokenizer
from batches import SMALL, assert_batches_equal, dcfg, take

CFG = get_config("test")
TOK = tokenizer.load_tokenizer("embedded")


def test_batch_contract_and_stats():
    it = pipeline.make_iterator(dcfg(), CFG, TOK, batch_size=2)
    batches = take(it, 2)
    S, P = 512, 1536
    want = {"input_ids": ((2, S), np.int32), "targets": ((2, S), np.int32), "loss_mask": ((2, S), np.float32),
            "segment_ids": ((2, S), np.int32), "positions": ((2, 3, S), np.int32),
            "pixel_values": ((2, P, 1176), np.uint8), "patch_segment_ids": ((2, P), np.int32),
            "patch_positions": ((2, P, 2), np.int32)}
    real_t = real_p = 0
    for b in batches:
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == want
        for r in range(2):
            pads = np.isin(b["input_ids"][r], (CFG.image_token_id, CFG.video_token_id)).sum()
            assert pads * 4 == (b["patch_segment_ids"][r] > 0).sum()
            seg = b["segment_ids"][r]
            same = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)
            np.testing.assert_array_equal(b["targets"][r][:-1][same], b["input_ids"][r][1:][same])
            assert (b["loss_mask"][r][:-1][~same] == 0).all()  # no target across samples
        real_t += int((b["segment_ids"] > 0).sum())
        real_p += int((b["patch_segment_ids"] > 0).sum())
    st = it.stats()
    assert st["batches"] == 2 and st["rows"] == 4
    assert st["real_tokens"] == real_t and st["real_patches"] == real_p
    assert st["token_efficiency"] == pytest.approx(real_t / (4 * S))
    assert st["patch_efficiency"] == pytest.approx(real_p / (4 * P))
    assert st["samples_packed"] == sum(st[k] for k in st if k.startswith("samples/"))
    json.dumps(it.get_state())


def test_deterministic_for_a_seed():
    a = take(pipeline.make_iterator(dcfg(), CFG, TOK, batch_size=1), 2)
    b = take(pipeline.make_iterator(dcfg(), CFG, TOK, batch_size=1), 2)
    assert_batches_equal(a, b)
    c = take(pipeline.make_iterator(dcfg(seed=1), CFG, TOK, batch_size=1), 1)
    assert not np.array_equal(a[0]["pixel_values"], c[0]["pixel_values"])


def _row_sample_keys(batches):
    """A content hash per packed sample (its tokens and its patch rows)."""
    keys = set()
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            seg = b["segment_ids"][r]
            p0 = 0
            for s in np.unique(seg[seg > 0]):
                ids = b["input_ids"][r][seg == s]
                n = int(np.isin(ids, (CFG.image_token_id, CFG.video_token_id)).sum()) * 4
                keys.add(hash((ids.tobytes(), b["pixel_values"][r][p0:p0 + n].tobytes())))
                p0 += n
    return keys


def test_process_shards_are_disjoint(tmp_path):
    cfg = dcfg()
    elems = [pipeline._mixed_dataset(cfg, pi, 2, "train") for pi in range(2)]
    seen = [{elems[pi][i] for i in range(300)} for pi in range(2)]
    assert not seen[0] & seen[1]
    # ArrayRecord: one epoch of each process's shard covers the records exactly once
    shard = write_shard(tmp_path / "a.array_record", [good_caption_record(i) for i in range(7)])
    ar = pipeline.DataConfig(mixture=((f"arrayrecord:{shard}", 1.0),), **SMALL)
    got = [[pipeline._mixed_dataset(ar, pi, 2, "train")[i][1] for i in range(n)] for pi, n in ((0, 4), (1, 3))]
    assert sorted(got[0] + got[1]) == sorted(good_caption_record(i) for i in range(7))
    # content level: two processes pack different samples
    b0 = take(pipeline.make_iterator(cfg, CFG, TOK, batch_size=1, process_index=0, process_count=2), 1)
    b1 = take(pipeline.make_iterator(cfg, CFG, TOK, batch_size=1, process_index=1, process_count=2), 1)
    k0, k1 = _row_sample_keys(b0), _row_sample_keys(b1)
    assert k0 and k1 and not k0 & k1
    with pytest.raises(ValueError, match="process_index"):
        pipeline.make_iterator(cfg, CFG, TOK, batch_size=1, process_index=2, process_count=2)


@pytest.mark.parametrize("skip", [0, 3])
def test_resume_gives_the_identical_next_batch(skip):
    cfg = dcfg()
    it = pipeline.make_iterator(cfg, CFG, TOK, batch_size=2)
    take(it, skip)
    state = json.loads(json.dumps(it.get_state()))
    want = take(it, 2)
    stats_want = it.stats()
    fresh = pipeline.make_iterator(cfg, CFG, TOK, batch_size=2)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 2), want)
    assert fresh.stats() == stats_want
    other = pipeline.make_iterator(cfg, CFG, TOK, batch_size=1)
    with pytest.raises(ValueError, match="fingerprint"):
        other.set_state(state)


def test_resume_with_worker_prefetch():
    """Two worker processes prefetching batches: a saved state restores exactly, in the running iterator
    (workers get the state) and in a fresh one."""
    cfg = dcfg(mixture=(("synthetic:chat", 1.0), ("synthetic:caption", 1.0)), num_workers=2, worker_buffer_size=1,
               seq_len=256, max_patches=1024)
    it = pipeline.make_iterator(cfg, CFG, TOK, batch_size=1)
    try:
        take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        want = take(it, 3)
        it.set_state(state)
        assert_batches_equal(take(it, 3), want)
    finally:
        it.close()
    fresh = pipeline.make_iterator(cfg, CFG, TOK, batch_size=1)
    try:
        fresh.set_state(state)
        assert_batches_equal(take(fresh, 1), want[:1])
    finally:
        fresh.close()


def test_mixture_converges_to_weights():
    cfg = pipeline.DataConfig(mixture=(("synthetic:chat", 3.0), ("synthetic:caption", 1.0)),
                              **{**SMALL, "seq_len": 2048, "max_patches": 4096})
    mixed = pipeline._mixed_dataset(cfg, 0, 1, "train")
    src = np.array([mixed[i][0] for i in range(4000)])
    assert abs((src == 0).mean() - 0.75) < 0.005
    it = pipeline.make_iterator(cfg, CFG, TOK, batch_size=2)
    take(it, 5)
    st = it.stats()
    frac = st["samples/synthetic:chat"] / st["samples_packed"]
    assert st["samples_packed"] > 60 and abs(frac - 0.75) < 0.08, (frac, st)


# ----------------------------------------------------------------------------------------------
# ArrayRecord sources with bad input

def png_bytes(w=64, h=48, colour=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "PNG")
    return buf.getvalue()


def good_caption_record(i=0):
    return sources.encode_record({"type": "caption", "text": f"a red box number {i}"},
                                 [png_bytes(56 + 28 * (i % 3), 56)], None, f"test:{i}")


def write_shard(path, records):
    from array_record.python.array_record_module import ArrayRecordWriter
    w = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        w.write(r)
    w.close()
    return str(path)




def bomb_png(w=30000, h=30000):
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_bad_files_are_skipped_and_counted(tmp_path, caplog):
    good = png_bytes()
    cap = {"type": "caption", "text": "a red box"}
    vid = {"type": "video", "text": "a fading square"}
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 50)
    records = [
        sources.encode_record(cap, [good], None),                               # good
        sources.encode_record(cap, [b"definitely not an image"], None),         # corrupt
        sources.encode_record(cap, [good[: len(good) // 2]], None),             # truncated
        sources.encode_record(cap, [b""], None),                                # zero-size
        sources.encode_record(cap, [bomb_png()], None),                         # decompression bomb
        sources.encode_record(vid, [], str(tmp_path / "missing.mp4")),          # missing file
        sources.encode_record(vid, [], str(garbage)),                           # unreadable video
        sources.encode_record(vid, [], write_video(tmp_path / "ok.mp4")),       # good video
        b"\x93\x01\x02 not msgpack \xff",                                       # corrupt record
        sources.encode_record({"type": "caption"}, [good], None),               # schema: no text
    ]
    shard = write_shard(tmp_path / "bad-00000.array_record", records)
    cfg = pipeline.DataConfig(mixture=((f"arrayrecord:{tmp_path}/bad-*.array_record", 1.0),),
                              **{**SMALL, "seq_len": 128, "max_patches": 256, "lookahead": 2})
    pipeline._LOGGED_REASONS.clear()
    caplog.set_level(pylogging.WARNING)
    it = pipeline.make_iterator(cfg, CFG, TOK, batch_size=1)
    take(it, 6)  # 2 good records per epoch: 6 batches span >= 3 epochs of the 10 records
    st = it.stats()
    expected = {"corrupt", "truncated", "zero_size", "too_large", "missing", "unreadable_video", "bad_record"}
    skipped = {k.split("/", 1)[1]: v for k, v in st.items() if k.startswith("skipped/")}
    assert set(skipped) == expected, skipped
    # the packer consumed a prefix of the per-epoch-shuffled records: E whole epochs plus part of one, each
    # epoch holding one record of every bad kind and two bad records
    epochs = min(skipped[r] for r in expected - {"bad_record"})
    assert epochs >= 2
    assert all(skipped[r] in (epochs, epochs + 1) for r in expected - {"bad_record"})
    assert 2 * epochs <= skipped["bad_record"] <= 2 * epochs + 2
    assert st["samples_packed"] >= 6 and st["dropped"] == 0
    # logged once per reason although counted several times
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: skipped/")]
    assert sorted(m.split()[1] for m in messages) == sorted(f"skipped/{r}" for r in expected)
    assert shard.endswith(".array_record")


def test_arrayrecord_samples_decode_to_their_text(tmp_path):
    shard = write_shard(tmp_path / "ok.array_record", [good_caption_record(i) for i in range(3)])
    cfg = pipeline.DataConfig(mixture=((f"arrayrecord:{shard}", 1.0),), shuffle=False,
                              **{**SMALL, "seq_len": 256, "max_patches": 512})
    b = next(pipeline.make_iterator(cfg, CFG, TOK, batch_size=1))
    texts = []
    for s in np.unique(b["segment_ids"][0][b["segment_ids"][0] > 0]):
        ids = b["input_ids"][0][b["segment_ids"][0] == s]
        texts.append(TOK.decode(ids[~np.isin(ids, (CFG.image_token_id,))]))
    assert len(texts) > 3  # the 3 records repeat (epochs) and all fit one row
    assert set(texts) == {f"<|vision_start|><|vision_end|>a red box number {i}<|endoftext|>" for i in range(3)}


def test_config_errors_name_the_values():
    with pytest.raises(ValueError, match="weights must be > 0"):
        pipeline.DataConfig(mixture=(("synthetic:caption", 0.0),))
    with pytest.raises(ValueError, match="unknown"):
        pipeline.DataConfig(mixture=(("synthetic:nope", 1.0),))
    with pytest.raises(ValueError, match="matches no files"):
        pipeline.make_iterator(pipeline.DataConfig(mixture=(("arrayrecord:/nonexistent/*.ar", 1.0),)), CFG, TOK,
                               batch_size=1)


def test_all_bad_data_fails_loudly_instead_of_hanging(tmp_path, monkeypatch):
    shard = write_shard(tmp_path / "allbad.array_record", [b"junk"] * 3)
    monkeypatch.setattr(pipeline, "MAX_UNUSABLE_RUN", 20)
    cfg = pipeline.DataConfig(mixture=((f"arrayrecord:{shard}", 1.0),), **SMALL)
    with pytest.raises(ValueError, match="20 consecutive samples"):
        next(pipeline.make_iterator(cfg, CFG, TOK, batch_size=1))


def test_balanced_max_patches_matches_the_mixture_ratio():
    from qwen2vl_jax.data import formats
    cfg = dcfg(mixture=(("synthetic:caption", 1.0), ("synthetic:chat", 1.0)), seq_len=1000)
    got = pipeline.balanced_max_patches(cfg, CFG, TOK, num_samples=16)
    # independent: the mix alternates caption / chat, process 0 reads indices 0, 1, 2, ... of each
    samples = [formats.make_sample(k, i, "train", TOK, CFG, cfg.vision_options) for i in range(8)
               for k in ("caption", "chat")]
    ratio = sum(len(s["pixel_values"]) for s in samples) / sum(len(s["input_ids"]) for s in samples)
    assert got % 4 == 0 and abs(got - 1000 * ratio) <= 4


# ----------------------------------------------------------------------------------------------
# a finite stream: state saved after the last record while rows are still pending

def _finite_iterator(shard: str, cfg: pipeline.DataConfig) -> pipeline.DataIterator:
    """make_iterator's chain (decode -> read threads -> PackIterDataset -> DataIterator), batch size 1, over
    one ArrayRecord file read once in order: without build_dataset's shuffle and repeat, the stream ends."""
    import grain
    pack_cfg = cfg.pack_config(CFG)
    spec = sources.parse_source(cfg.mixture[0][0])
    decoder = pipeline.SampleDecoder((spec,), "train", cfg.seed, TOK, CFG, pack_cfg, cfg.vision_options,
                                     cfg.video_sampling)
    decoded = grain.MapDataset.source(sources.arrayrecord_source(shard)).map(lambda r: (0, r))
    decoded = decoded.map_with_index(decoder)
    reader = decoded.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                       prefetch_buffer_size=cfg.read_buffer_size))
    packed = pipeline.PackIterDataset(reader, decoded, pack_cfg, 1, CFG.pad_token_id, [spec.name])
    return pipeline.DataIterator(packed, "finite", pack_cfg)


def _drain(it, limit=50):
    """(batches, the iterator state saved before each) until StopIteration; fails if the stream does not end."""
    batches, states = [], []
    for _ in range(limit):
        states.append(json.loads(json.dumps(it.get_state())))
        try:
            batches.append(next(it))
        except StopIteration:
            return batches, states
    raise AssertionError(f"no end after {limit} batches of a finite source")


def _row_texts(batch):
    seg, ids = batch["segment_ids"][0], batch["input_ids"][0]
    return [TOK.decode(ids[(seg == s) & (ids != CFG.image_token_id)]) for s in np.unique(seg[seg > 0])]


def test_finite_source_state_at_the_end_restores_the_remaining_rows(tmp_path):
    n = 10
    shard = write_shard(tmp_path / "finite.array_record", [good_caption_record(i) for i in range(n)])
    # rows of 48 tokens hold 2-3 of these samples, so the packer still holds samples when the source ends
    cfg = pipeline.DataConfig(mixture=((f"arrayrecord:{shard}", 1.0),), shuffle=False,
                              **{**SMALL, "seq_len": 48, "max_patches": 96, "lookahead": 4})
    it = _finite_iterator(shard, cfg)
    batches, states = _drain(it)
    with pytest.raises(StopIteration):       # the end is final
        next(it)
    # every record exactly once, none lost at the end
    got = sorted(t for b in batches for t in _row_texts(b))
    assert got == sorted(f"<|vision_start|><|vision_end|>a red box number {i}<|endoftext|>" for i in range(n))
    assert it.stats()["samples_packed"] == n and it.stats()["rows"] == len(batches)

    # states saved after the reader passed the last record; those before batches[-1] still have rows to give,
    # held in the packer (the source's end not yet seen) or flushed into unbatched rows (end seen): both occur
    at_end = [k for k, s in enumerate(states) if s["pipeline"]["parent"]["next_index"] == n]
    assert {states[k]["pipeline"]["exhausted"] for k in at_end if k < len(batches)} == {False, True}, states
    for k in at_end:
        resumed = _finite_iterator(shard, cfg)
        resumed.set_state(states[k])
        rest, _ = _drain(resumed)
        assert_batches_equal(rest, batches[k:])
        with pytest.raises(StopIteration):
            next(resumed)
        assert resumed.stats() == it.stats()
