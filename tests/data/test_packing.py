"""Packing: row invariants on random samples, efficiency, overflow rules, determinism, packer state."""
import collections

import numpy as np
import pytest

from qwen2vl_jax.model import mrope, rope
from qwen2vl_jax.model.config import get_config
from qwen2vl_jax.data import media, packing

CFG = get_config("test")
V = CFG.vision
TEXT_VOCAB = CFG.special_token_base  # ids below are plain text


TABLE = media.normalization_table()      # the processor's normalised value of each uint8, per channel


def normalized(raw):
    """uint8 [n, 1176] raw patch rows -> the processor's float32 values (channel-major columns)."""
    x = raw.reshape(raw.shape[0], 3, raw.shape[1] // 3)
    return np.stack([TABLE[c][x[:, c]] for c in range(3)], axis=1).reshape(raw.shape)


def processor_pixels(rng, n):
    """float32 [n, 1176] pixel rows as the processor makes them (random uint8 values, normalised)."""
    return normalized(rng.integers(0, 256, (n, V.patch_dim), dtype=np.uint8))


def random_sample(rng, n_text=(5, 60), items=((1, 0), (0, 1)), max_side=6, t_video=(2, 3)):
    """A Tokenized sample built by hand: text pieces around vision blocks (random images / videos)."""
    kinds = list(items[rng.integers(len(items))])
    ids, grids, kind_codes, pixels = [], [], [], []
    ids += list(rng.integers(0, TEXT_VOCAB, rng.integers(*n_text)))
    for n_img, n_vid in [kinds]:
        for code in [0] * n_img + [1] * n_vid:
            t = 1 if code == 0 else int(rng.integers(*t_video))
            h, w = 2 * int(rng.integers(1, max_side // 2 + 1)), 2 * int(rng.integers(1, max_side // 2 + 1))
            pad = CFG.image_token_id if code == 0 else CFG.video_token_id
            ids += [CFG.vision_start_token_id] + [pad] * (t * h * w // 4) + [CFG.vision_end_token_id]
            ids += list(rng.integers(0, TEXT_VOCAB, rng.integers(1, 20)))
            grids.append((t, h, w))
            kind_codes.append(code)
            pixels.append(processor_pixels(rng, t * h * w))
    ids = np.asarray(ids, np.int32)
    lm = (rng.random(len(ids)) < 0.7).astype(np.float32)
    lm[0] = 0
    lm[1] = 1
    return {"input_ids": ids, "loss_mask": lm,
            "pixel_values": np.concatenate(pixels) if pixels else np.zeros((0, V.patch_dim), np.float32),
            "grid_thw": np.asarray(grids, np.int32).reshape(-1, 3), "vision_kind": np.asarray(kind_codes, np.int8),
            "sample_type": "random"}


def text_sample(n, rng=None):
    rng = rng or np.random.default_rng(0)
    return {"input_ids": rng.integers(0, TEXT_VOCAB, n).astype(np.int32), "loss_mask": np.ones(n, np.float32),
            "pixel_values": np.zeros((0, V.patch_dim), np.float32), "grid_thw": np.zeros((0, 3), np.int32),
            "vision_kind": np.zeros((0,), np.int8), "sample_type": "text"}


def segments(row):
    """{segment id: (token slice, patch slice)} of a packed row, in row order."""
    out = {}
    seg = row["segment_ids"]
    for s in np.unique(seg[seg > 0]):
        idx = np.flatnonzero(seg == s)
        assert (np.diff(idx) == 1).all(), "a segment must be contiguous"
        out[int(s)] = slice(idx[0], idx[-1] + 1)
    return out


def check_row(row, pcfg):
    S, P = pcfg.seq_len, pcfg.max_patches
    shapes = {"input_ids": (S,), "targets": (S,), "loss_mask": (S,), "segment_ids": (S,), "positions": (3, S),
              "pixel_values": (P, V.patch_dim), "patch_segment_ids": (P,), "patch_positions": (P, 2)}
    for k, shp in shapes.items():
        assert row[k].shape == shp, k
    assert row["loss_mask"].dtype == np.float32 and row["pixel_values"].dtype == np.uint8
    for k in ("input_ids", "targets", "segment_ids", "positions", "patch_segment_ids", "patch_positions"):
        assert row[k].dtype == np.int32, k
    n_real = int((row["segment_ids"] > 0).sum())
    assert (row["segment_ids"][n_real:] == 0).all() and (row["segment_ids"][:n_real] > 0).all()
    pads = int(np.isin(row["input_ids"], (CFG.image_token_id, CFG.video_token_id)).sum())
    p_real = int((row["patch_segment_ids"] > 0).sum())
    assert pads * 4 == p_real, "pads-in-row must equal real patches / 4"
    assert (row["patch_segment_ids"][p_real:] == 0).all() and (row["patch_segment_ids"][:p_real] > 0).all()
    assert (row["loss_mask"][n_real:] == 0).all() and (row["pixel_values"][p_real:] == 0).all()


def unpack(rows):
    """Reconstructs every packed sample (ids, loss_mask, pixels, grids) from the rows alone, checking the
    per-sample invariants against independent recomputation."""
    found = []
    for row in rows:
        p0 = 0
        next_patch_seg = 1
        for s, sl in segments(row).items():
            ids = row["input_ids"][sl]
            # targets: next token of the same sample, 0 at its end (never the next sample's token)
            np.testing.assert_array_equal(row["targets"][sl][:-1], ids[1:])
            assert row["targets"][sl][-1] == 0 and row["loss_mask"][sl][-1] == 0
            # vision blocks of this sample, in order, from its own tokens
            grids = []
            n_patches = 0
            starts = np.flatnonzero(ids == CFG.vision_start_token_id)
            kinds = []
            for st in starts:
                pad = ids[st + 1]
                run = 1
                while ids[st + 1 + run] == pad:
                    run += 1
                kinds.append(0 if pad == CFG.image_token_id else 1)
                # each temporal slice is one patch segment of h*w rows
                slice_ids = []
                q = p0 + n_patches
                need = run * 4
                while need > 0:
                    seg_id = row["patch_segment_ids"][q]
                    assert seg_id == next_patch_seg, "patch segment ids must count up per (item, slice)"
                    size = int((row["patch_segment_ids"] == seg_id).sum())
                    slice_ids.append(size)
                    next_patch_seg += 1
                    q += size
                    need -= size
                assert need == 0 and len(set(slice_ids)) == 1
                hw = slice_ids[0]
                t = len(slice_ids)
                grids.append((t, hw))
                n_patches += run * 4
            pv = normalized(row["pixel_values"][p0:p0 + n_patches])       # rows carry the raw uint8 values
            found.append({"ids": ids.copy(), "loss": row["loss_mask"][sl].copy(), "pixels": pv,
                          "positions": row["positions"][:, sl].copy(),
                          "patch_positions": row["patch_positions"][p0:p0 + n_patches].copy(),
                          "slices": grids, "kinds": kinds})
            p0 += n_patches
        assert p0 == int((row["patch_segment_ids"] > 0).sum())
    return found


@pytest.fixture(scope="module")
def random_pack():
    rng = np.random.default_rng(0)
    samples = [random_sample(rng, items=((1, 0), (0, 1), (2, 0), (0, 0), (1, 1))) for _ in range(120)]
    pcfg = packing.PackConfig.for_model(CFG, seq_len=512, max_patches=1024, lookahead=8)
    rows, counts = packing.pack_samples(samples, pcfg, CFG)
    return samples, pcfg, rows, counts


def test_rows_static_shapes_and_padding(random_pack):
    samples, pcfg, rows, counts = random_pack
    assert len(rows) == counts["rows"] > 5
    for row in rows:
        check_row(row, pcfg)


def test_every_sample_appears_once_with_correct_targets_positions_and_patches(random_pack):
    samples, pcfg, rows, counts = random_pack
    found = unpack(rows)
    assert len(found) == counts["samples_packed"] == len(samples) - sum(
        v for k, v in counts.items() if k in packing.DROP_EVENTS)
    by_ids = collections.defaultdict(list)
    for f in found:
        by_ids[f["ids"].tobytes()].append(f)
    matched = 0
    for s in samples:
        key = s["input_ids"].tobytes()
        if key not in by_ids:
            continue
        f = by_ids[key].pop()
        matched += 1
        # loss mask: packed loss_mask[j] supervises target j+1 of the sample
        np.testing.assert_array_equal(f["loss"][:-1], s["loss_mask"][1:])
        np.testing.assert_array_equal(f["pixels"], s["pixel_values"])
        grid = s["grid_thw"]
        kind = s["vision_kind"]
        pos, _, _ = mrope.sample_positions(s["input_ids"], CFG, grid[kind == 0], grid[kind == 1])
        np.testing.assert_array_equal(f["positions"], pos)
        np.testing.assert_array_equal(f["patch_positions"], rope.vision_position_ids(grid))
        assert f["slices"] == [(int(t), int(h * w)) for t, h, w in grid]  # one patch segment per temporal slice
        assert f["kinds"] == kind.tolist()
    assert matched == len(found)
    assert all(not v for v in by_ids.values())


def test_positions_worked_example_from_reference():
    """The hand-worked M-RoPE example: t0 t1 <vs> [6 pads, grid (1,4,6)] <ve> t2 t3, packed after another sample."""
    ids = np.array([5, 6, CFG.vision_start_token_id] + [CFG.image_token_id] * 6 + [CFG.vision_end_token_id, 7, 8],
                   np.int32)
    img = {"input_ids": ids, "loss_mask": np.ones(len(ids), np.float32),
           "pixel_values": processor_pixels(np.random.default_rng(2), 24), "grid_thw": np.array([[1, 4, 6]], np.int32),
           "vision_kind": np.array([0], np.int8), "sample_type": "x"}
    pcfg = packing.PackConfig.for_model(CFG, seq_len=32, max_patches=32, lookahead=1)
    rows, _ = packing.pack_samples([text_sample(4), img], pcfg, CFG)
    assert len(rows) == 1
    row = rows[0]
    np.testing.assert_array_equal(row["positions"][:, :4], np.tile(np.arange(4), (3, 1)))
    want = np.array([[0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8],
                     [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8],
                     [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]])
    np.testing.assert_array_equal(row["positions"][:, 4:16], want)
    assert (row["positions"][:, 16:] == 0).all()
    # processor order (Qwen2VLImageProcessor): rows 0..3 of a 2x2 block are (0,0), (0,1), (1,0), (1,1)
    np.testing.assert_array_equal(row["patch_positions"][:6], [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3]])
    np.testing.assert_array_equal(row["segment_ids"][:16], [1] * 4 + [2] * 12)
    np.testing.assert_array_equal(row["patch_segment_ids"][:24], [1] * 24)
    assert (row["patch_segment_ids"][24:] == 0).all()


def test_video_patch_segments_per_temporal_slice():
    rng = np.random.default_rng(3)
    s = random_sample(rng, items=((0, 1),), t_video=(3, 4))  # one video, t = 3
    t, h, w = s["grid_thw"][0]
    pcfg = packing.PackConfig.for_model(CFG, seq_len=256, max_patches=512, lookahead=1)
    rows, _ = packing.pack_samples([s, s], pcfg, CFG)
    ps = rows[0]["patch_segment_ids"]
    hw = h * w
    want = np.concatenate([np.repeat(np.arange(1, 7), hw), np.zeros(512 - 6 * hw, np.int32)])
    np.testing.assert_array_equal(ps, want)


# ----------------------------------------------------------------------------------------------
# efficiency on a realistic mixture (sizes only: the packer never looks at payloads)

def realistic_sizes(n, seed=0):
    """(tokens, patches) of a stage-2-like mixture: captions, interleaved documents, OCR, grounding,
    video and chat (half of it pure text). Images of 4..32 x 4..32 merged tokens (112..896 px sides)."""
    rng = np.random.default_rng(seed)
    kinds = ["caption", "interleaved", "ocr", "grounding", "video", "chat"]
    weights = np.array([0.35, 0.2, 0.1, 0.1, 0.1, 0.15])

    def img(lo, hi):
        return int(rng.integers(lo, hi + 1)) * int(rng.integers(lo, hi + 1))

    out = []
    for _ in range(n):
        k = kinds[rng.choice(6, p=weights)]
        if k == "caption":
            v = img(4, 24); out.append((int(rng.integers(10, 80)) + v + 2, 4 * v))
        elif k == "interleaved":
            m = int(rng.integers(1, 5)); v = sum(img(4, 16) for _ in range(m))
            out.append((int(rng.integers(100, 1500)) + v + 2 * m, 4 * v))
        elif k == "ocr":
            v = img(12, 32); out.append((int(rng.integers(50, 500)) + v + 2, 4 * v))
        elif k == "grounding":
            v = img(8, 24); out.append((int(rng.integers(30, 150)) + v + 2, 4 * v))
        elif k == "video":
            t = int(rng.integers(2, 9)); v = t * img(4, 12); out.append((int(rng.integers(20, 120)) + v + 2, 4 * v))
        elif rng.random() < 0.5:
            out.append((int(rng.integers(50, 2500)), 0))
        else:
            v = img(4, 20); out.append((int(rng.integers(50, 1500)) + v + 2, 4 * v))
    return out


def measure_efficiency(sizes, seq_len, lookahead, patch_slack=1.0):
    tok = np.array([a for a, _ in sizes]); pat = np.array([b for _, b in sizes])
    max_patches = int(np.ceil(seq_len * pat.sum() / tok.sum() * patch_slack / 4)) * 4  # budgets in the mix's ratio
    packer = packing.OnlinePacker(seq_len, max_patches, lookahead)
    rows = []
    for i, (t, p) in enumerate(sizes):
        rows += packer.push(i, t, p)
    real_t = sum(tok[k] for r in rows for k in r)
    real_p = sum(pat[k] for r in rows for k in r)
    return real_t / (len(rows) * seq_len), real_p / (len(rows) * max_patches), rows, max_patches


def test_efficiency_at_least_97_percent_on_realistic_mixture():
    sizes = realistic_sizes(6000)
    tok_eff, patch_eff, rows, max_patches = measure_efficiency(sizes, seq_len=8192, lookahead=32)
    print(f"seq_len 8192 / max_patches {max_patches}, lookahead 32: token efficiency {tok_eff:.4f}, "
          f"patch efficiency {patch_eff:.4f} over {len(rows)} rows")
    assert tok_eff >= 0.97 and patch_eff >= 0.97
    # every row respects both budgets
    for r in rows:
        assert sum(sizes[k][0] for k in r) <= 8192 and sum(sizes[k][1] for k in r) <= max_patches


def test_packer_beats_first_fit_baseline():
    """The lookahead + balance + swaps matter: a plain online first-fit (next-fit) is far worse."""
    sizes = realistic_sizes(3000, seed=1)
    tok_eff, _, _, max_patches = measure_efficiency(sizes, seq_len=8192, lookahead=32)
    used_t = used_p = 0
    rows = 1
    for t, p in sizes:
        if used_t + t > 8192 or used_p + p > max_patches:
            rows += 1
            used_t = used_p = 0
        used_t += t
        used_p += p
    naive = sum(t for t, _ in sizes) / (rows * 8192)
    assert tok_eff > naive + 0.05


@pytest.mark.parametrize("max_wait_rows", [1, 3])
def test_a_starved_item_is_in_the_next_row(max_wait_rows):
    """No starvation: an item passed over for max_wait_rows rows is in the next row closed, even when the
    row-improvement swaps could fill that row better without it. Hand-built stream: one 6-token item, then
    items of 10 and 9 tokens (rows of 10): every 10 fills a row alone and a 9 fills more than the 6, so
    best fit and swaps alone would leave the 6 for the flush."""
    packer = packing.OnlinePacker(seq_len=10, max_patches=0, lookahead=2, max_wait_rows=max_wait_rows)
    rows = packer.push("starved", 6, 0)
    for i in range(12):
        rows += packer.push(f"x{i}", 10 if i % 2 == 0 else 9, 0)
    rows += packer.flush()
    where = next(n for n, row in enumerate(rows) if "starved" in row)
    assert where == max_wait_rows, (where, rows)   # rows 0..max_wait_rows-1 passed it over, then its row
    assert sorted(k for r in rows for k in r) == sorted(["starved"] + [f"x{i}" for i in range(12)])


# ----------------------------------------------------------------------------------------------
# overflow rules

def test_overflow_rules_are_counted():
    rng = np.random.default_rng(1)
    pcfg = packing.PackConfig.for_model(CFG, seq_len=64, max_patches=64, lookahead=2)
    long_text = text_sample(100, rng)
    # vision block at the start, long text tail after it: truncatable
    vis_head = random_sample(rng, n_text=(2, 3), items=((1, 0),), max_side=2)
    vis_head["input_ids"] = np.concatenate([vis_head["input_ids"], rng.integers(0, TEXT_VOCAB, 80).astype(np.int32)])
    vis_head["loss_mask"] = np.ones(len(vis_head["input_ids"]), np.float32)
    # vision block beyond the cut: dropped
    vis_tail = random_sample(rng, n_text=(70, 71), items=((1, 0),), max_side=2)
    # too many patches (an 8x10 image = 80 patch rows > 64)
    big = random_sample(rng, n_text=(2, 3), items=((1, 0),), max_side=2)
    big["pixel_values"] = processor_pixels(rng, 80)
    big["grid_thw"] = np.array([[1, 8, 10]], np.int32)
    big["input_ids"] = np.concatenate([[CFG.vision_start_token_id], [CFG.image_token_id] * 20,
                                       [CFG.vision_end_token_id], [1, 2]]).astype(np.int32)
    big["loss_mask"] = np.ones(len(big["input_ids"]), np.float32)
    # supervised only past the cut
    late = text_sample(100, rng)
    late["loss_mask"][:80] = 0
    # broken contract: pads do not match the grid
    broken = random_sample(rng, items=((1, 0),))
    broken["input_ids"] = broken["input_ids"][broken["input_ids"] != CFG.image_token_id]
    broken["loss_mask"] = np.ones(len(broken["input_ids"]), np.float32)
    samples = [long_text, vis_head, vis_tail, big, late, broken, text_sample(10, rng), text_sample(1, rng)]

    rows, counts = packing.pack_samples(samples, pcfg, CFG)
    assert counts[packing.TRUNCATED] == 2                   # long_text, vis_head
    assert counts[packing.DROP_VISION_IN_TAIL] == 1          # vis_tail
    assert counts[packing.DROP_TOO_MANY_PATCHES] == 1        # big
    assert counts[packing.DROP_NO_TARGET] == 1               # late
    assert counts[packing.DROP_INVALID] == 1                 # broken
    assert counts[packing.DROP_EMPTY] == 1                   # 1-token sample
    assert counts["samples_packed"] == 3
    for row in rows:
        check_row(row, pcfg)
    found = unpack(rows)
    lengths = sorted(len(f["ids"]) for f in found)
    assert lengths == [10, 64, 64]
    text_only = [f["ids"] for f in found if len(f["ids"]) == 64 and not len(f["pixels"])]
    np.testing.assert_array_equal(text_only[0], long_text["input_ids"][:64])  # the head is kept, the tail cut

    drop_rows, drop_counts = packing.pack_samples(samples, packing.PackConfig.for_model(
        CFG, seq_len=64, max_patches=64, lookahead=2, overflow="drop"), CFG)
    assert drop_counts[packing.DROP_TOO_MANY_TOKENS] == 4   # long_text, vis_head, vis_tail, late
    assert drop_counts["samples_packed"] == 1
    assert packing.TRUNCATED not in drop_counts


def test_validate_sample_names_the_problem():
    s = text_sample(5)
    s["loss_mask"] = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="loss_mask shape"):
        packing.validate_sample(s, CFG)
    with pytest.raises(ValueError, match="overflow"):
        packing.PackConfig(seq_len=8, max_patches=8, overflow="wrap")
    with pytest.raises(ValueError, match="multiple of 4"):
        packing.PackConfig(seq_len=8, max_patches=6)
    with pytest.raises(ValueError, match="cannot fit"):
        packing.OnlinePacker(8, 8, 2).push("a", 9, 0)
    # grids: the one model-side check (a 3-patch-high grid cannot be merged 2x2)
    for grid, msg in (([[1, 3, 4]], r"grid_thw rows \[\[1, 3, 4\]\]: h and w must be multiples of "
                                    r"spatial_merge_size 2"),
                      ([[1.0, 2.0, 4.0]], r"grid_thw must hold integers; got dtype float64"),
                      ([[0, 2, 4]], r"grid_thw \[\[0, 2, 4\]\] has non-positive entries"),
                      ([1, 2, 4], r"grid_thw must have shape \[num, 3\] \(t, h, w\); got shape \(3,\)")):
        s = {**text_sample(5), "grid_thw": np.asarray(grid), "vision_kind": np.zeros(1, np.int8)}
        with pytest.raises(ValueError, match=msg):
            packing.validate_sample(s, CFG)


# ----------------------------------------------------------------------------------------------
# resume state

def test_packer_state_roundtrip_resumes_identically():
    sizes = realistic_sizes(800, seed=2)
    ref = packing.OnlinePacker(8192, 12000, 16)
    ref_rows = []
    for i, (t, p) in enumerate(sizes):
        ref_rows += ref.push(i, t, p)
    ref_rows += ref.flush()

    first = packing.OnlinePacker(8192, 12000, 16)
    rows = []
    for i, (t, p) in enumerate(sizes[:333]):
        rows += first.push(i, t, p)
    state = first.state()
    resumed = packing.OnlinePacker(8192, 12000, 16)
    resumed.set_state(state)
    for i, (t, p) in enumerate(sizes[333:], start=333):
        rows += resumed.push(i, t, p)
    rows += resumed.flush()
    assert rows == ref_rows
    assert sorted(k for r in rows for k in r) == list(range(len(sizes)))  # nothing lost, nothing twice


def test_rows_carry_the_raw_uint8_pixels_the_processor_values_came_from():
    """raw_pixel_values inverts the processor's normalisation exactly for every uint8 value of every channel
    (media.normalization_table, the processor's arithmetic, is the reference); values that are no such level
    are refused, and a sample holding them is invalid, not silently rounded."""
    per = V.patch_dim // 3                                     # 392 columns per channel: every value 0..255
    raw = np.stack([np.concatenate([(np.arange(per) + 97 * r + 31 * c) % 256 for c in range(3)])
                    for r in range(3)]).astype(np.uint8)
    got = packing.raw_pixel_values(normalized(raw))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, raw)
    for c in range(3):                                         # all 256 levels of each channel came back
        cols = slice(c * V.patch_dim // 3, (c + 1) * V.patch_dim // 3)
        assert len(np.unique(raw[:, cols])) == 256
    x = normalized(raw)
    between = x.copy()
    between[0, 5] = (TABLE[0, 7] + TABLE[0, 8]) / 2            # half-way between two levels
    off_by_one_ulp = x.copy()
    off_by_one_ulp[2, 1000] = np.nextafter(x[2, 1000], np.float32(9))
    nan = x.copy()
    nan[1, 500] = np.nan
    for bad in (between, off_by_one_ulp, nan, np.zeros_like(x), np.ones_like(x)):
        with pytest.raises(ValueError, match="not the processor's normalised uint8 values"):
            packing.raw_pixel_values(bad)
    sample = random_sample(np.random.default_rng(5), items=((1, 0),))
    pcfg = packing.PackConfig.for_model(CFG, seq_len=512, max_patches=512)
    assert packing.prepare_sample(sample, pcfg, CFG)[0] is not None
    sample["pixel_values"] = sample["pixel_values"] * 1.001
    assert packing.prepare_sample(sample, pcfg, CFG) == (None, packing.DROP_INVALID)
