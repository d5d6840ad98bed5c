"""Sample formats: synthetic ground truth -> "Tokenized sample" dicts (docs/architecture.md contract).

A sample is first described as a list of `Span`s (text that may contain special-token strings, whether
its tokens are supervised, or a reference to a vision item), then `assemble` tokenizes the text,
expands every vision item into <|vision_start|> + t*h*w/4 pads + <|vision_end|> and preprocesses the
pixels with `qwen2vl_jax.data.media`. The same spans render to the chat-template string (one pad per
item, as the HF template writes it) and to the tokenizer-training corpus.

Kinds (paper stages, docs/qwen2vl.md §6.2):
  stage 1/2 pre-training, text tokens supervised, prompt prefixes and vision tokens not:
    caption      <vision>a red circle and two blue squares<|endoftext|>
    ocr          <vision>What text is in the image?\n | QWEN 42<|endoftext|>
    count        <vision>How many squares are there?\n | 2<|endoftext|>                  (VQA, stage 2)
    grounding    <vision><ref>the red circle</ref> | <box>(x1,y1),(x2,y2)</box> ... <|endoftext|>
    video        <video>a red circle moving left<|endoftext|>
    interleaved  Picture 1: <vision>a red circle\nPicture 2: <vision>two blue squares\n<|endoftext|>
  stage 3 instruction tuning, ChatML, only assistant turns (with their <|im_end|>) supervised:
    chat         image QA (1-2 turns), video QA, or pure-text arithmetic dialogue
                 (supervise_turn_newline=True also supervises the "\n" after each assistant <|im_end|>, as
                 LLaMA-Factory's qwen2_vl template does; docs/data_formats.md#loss-mask)
(" | " marks where supervision starts.) Boxes are normalised to integers in [0, 1000) (docs/qwen2vl.md §5.3).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from qwen2vl_jax.model.config import SPECIAL_TOKENS
from qwen2vl_jax.data import synthetic, media
from qwen2vl_jax.data.synthetic import Arithmetic, Clip, Scene

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
PRETRAIN_KINDS = ("caption", "ocr", "count", "grounding", "video", "interleaved")
KINDS = PRETRAIN_KINDS + ("chat",)
EVAL_KINDS = ("caption", "count", "ocr", "grounding", "video", "text")
IMAGE, VIDEO = 0, 1                          # vision_kind codes
EOT = "<|endoftext|>"
_NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
_QUESTIONS = {
    "caption": "Describe the image.",
    "ocr": "What text is in the image?",
    "count": "How many {plural} are there?",
    "grounding": "Find {ref}",
    "video": "What moves in the video?",
    "text": "What is {a} {op} {b}?",
}


# ---------------------------------------------------------------------------------------------------
# Language: ground truth -> strings

def plural(shape: str) -> str:
    return shape + "s"


def object_phrase(colour: str, shape: str, n: int) -> str:
    """'a red circle', 'two blue squares'."""
    if n not in _NUMBER_WORDS:
        raise ValueError(f"object count {n} outside 1..{max(_NUMBER_WORDS)}")
    article = ("an" if colour[0] in "aeiou" else "a") if n == 1 else _NUMBER_WORDS[n]
    return f"{article} {colour} {shape if n == 1 else plural(shape)}"


def join_phrases(phrases: Sequence[str]) -> str:
    if not phrases:
        raise ValueError("nothing to join")
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene) -> str:
    """Groups left to right: 'a red circle, two blue squares and a green star'."""
    return join_phrases([object_phrase(c, s, len(objs)) for c, s, objs in scene.groups()])


def video_caption(clip: Clip) -> str:
    return f"{object_phrase(clip.colour, clip.shape, 1)} moving {clip.direction}"


def ocr_answer(scene: Scene) -> str:
    return " ".join(w.text for w in scene.reading_order())


def ref_phrase(colour: str, shape: str, n: int) -> str:
    return f"the {colour} {shape if n == 1 else plural(shape)}"


def ref_text(phrase: str) -> str:
    return f"<|object_ref_start|>{phrase}<|object_ref_end|>"


def normalise_box(box: Sequence[int], width: int, height: int) -> tuple[int, int, int, int]:
    """Inclusive pixel box -> integers in [0, 1000): floor(v * 1000 / side)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    if not (0 <= x1 <= x2 < width and 0 <= y1 <= y2 < height):
        raise ValueError(f"box {tuple(box)} outside a {width}x{height} image")
    return (x1 * 1000 // width, y1 * 1000 // height, x2 * 1000 // width, y2 * 1000 // height)


def box_text(nbox: Sequence[int]) -> str:
    x1, y1, x2, y2 = nbox
    return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


def grounding_answer(scene: Scene, objects: Sequence[synthetic.Obj]) -> str:
    return "".join(box_text(normalise_box(o.box, scene.width, scene.height)) for o in objects)


# ---------------------------------------------------------------------------------------------------
# Tasks: one question/answer about a source

@dataclasses.dataclass(frozen=True)
class Task:
    kind: str
    question: str       # the user turn of the chat form
    prompt: str         # the unsupervised prefix of the pre-training form ("" = none)
    answer: str


def make_task(kind: str, source, rng: np.random.Generator) -> Task:
    """The question/answer of eval kind `kind` about `source` (Scene, Clip, or Arithmetic for "text")."""
    if kind == "caption":
        return Task(kind, _QUESTIONS["caption"], "", caption(_need(source, Scene, kind)))
    if kind == "ocr":
        q = _QUESTIONS["ocr"]
        return Task(kind, q, q + "\n", ocr_answer(_need(source, Scene, kind)))
    if kind == "count":
        scene = _need(source, Scene, kind)
        present = sorted({o.shape for o in scene.objects})
        absent = [s for s in synthetic.SHAPES if s not in present]
        shape = present[int(rng.integers(len(present)))] if rng.random() < 0.8 or not absent \
            else absent[int(rng.integers(len(absent)))]
        q = _QUESTIONS["count"].format(plural=plural(shape))
        return Task(kind, q, q + "\n", str(scene.count(shape=shape)))
    if kind == "grounding":
        scene = _need(source, Scene, kind)
        groups = scene.groups()
        colour, shape, objs = groups[int(rng.integers(len(groups)))]
        ref = ref_text(ref_phrase(colour, shape, len(objs)))
        return Task(kind, _QUESTIONS["grounding"].format(ref=ref), ref, grounding_answer(scene, objs))
    if kind == "video":
        return Task(kind, _QUESTIONS["video"], "", video_caption(_need(source, Clip, kind)))
    if kind == "text":
        a = _need(source, Arithmetic, kind)
        q = _QUESTIONS["text"].format(a=a.a, op=a.op, b=a.b)
        return Task(kind, q, q + "\n", str(a.answer))
    raise ValueError(f"task kind {kind!r} unknown; valid: {', '.join(EVAL_KINDS)}")


def _need(source, cls, kind):
    if not isinstance(source, cls):
        raise ValueError(f"kind {kind!r} needs a {cls.__name__}, got {type(source).__name__}")
    return source


def _task_rng(source, purpose: str) -> np.random.Generator:
    """Choices made while formatting (which shape to count, turn order) come from the source's own
    (seed, index, split) under a derived stream, so a sample is a pure function of its source."""
    return synthetic.rng_for(source.seed, source.index, source.split, f"{source.stream}/{purpose}")


# ---------------------------------------------------------------------------------------------------
# Spans

@dataclasses.dataclass(frozen=True)
class Span:
    text: str = ""                 # may contain special-token strings
    supervised: bool = False
    vision: int | None = None      # index into the sample's vision items (then `text` is unused)


@dataclasses.dataclass(frozen=True)
class VisionItem:
    kind: int                      # IMAGE | VIDEO
    media: Any = dataclasses.field(compare=False)   # a PIL image, or a tuple of PIL frames
    fps: float = synthetic.CLIP_FPS


def vision_placeholder(kind: int) -> str:
    pad = "<|image_pad|>" if kind == IMAGE else "<|video_pad|>"
    return f"<|vision_start|>{pad}<|vision_end|>"


def render(spans: Sequence[Span], items: Sequence[VisionItem]) -> str:
    """The text as the HF chat template writes it: one pad per vision item."""
    return "".join(vision_placeholder(items[s.vision].kind) if s.vision is not None else s.text for s in spans)


def plain_spans(task: Task, item: VisionItem) -> tuple[list[Span], list[VisionItem]]:
    spans = [Span(vision=0)]
    if task.prompt:
        spans.append(Span(task.prompt))
    spans.append(Span(task.answer + EOT, supervised=True))
    return spans, [item]


def grounding_spans(scene: Scene) -> tuple[list[Span], list[VisionItem]]:
    """Every group, in a random order: its reference (prompt) then its boxes (supervised)."""
    groups = list(scene.groups())
    order = _task_rng(scene, "grounding").permutation(len(groups))
    spans = [Span(vision=0)]
    for g in order:
        colour, shape, objs = groups[int(g)]
        spans += [Span(ref_text(ref_phrase(colour, shape, len(objs)))),
                  Span(grounding_answer(scene, objs), supervised=True)]
    spans.append(Span(EOT, supervised=True))
    return spans, [VisionItem(IMAGE, scene.image)]


def interleaved_spans(scenes: Sequence[Scene]) -> tuple[list[Span], list[VisionItem]]:
    spans, items = [], []
    for i, sc in enumerate(scenes):
        spans += [Span(f"Picture {i + 1}: ", supervised=True), Span(vision=i),
                  Span(caption(sc) + "\n", supervised=True)]
        items.append(VisionItem(IMAGE, sc.image))
    spans.append(Span(EOT, supervised=True))
    return spans, items


def chat_spans(messages: Sequence[dict], add_generation_prompt: bool = False,
               system_prompt: str = DEFAULT_SYSTEM_PROMPT,
               supervise_turn_newline: bool = False) -> tuple[list[Span], list[VisionItem]]:
    """ChatML as the Qwen2-VL instruct template renders it. `messages`: HF-style dicts
    {"role": ..., "content": str | [{"type": "image", "image": PIL} | {"type": "video", "video": frames,
    "fps": f} | {"type": "text", "text": str}]}. Assistant content and its <|im_end|> are supervised, and with
    `supervise_turn_newline` the template's "\n" after that <|im_end|> too."""
    spans: list[Span] = []
    items: list[VisionItem] = []
    if not messages or messages[0]["role"] != "system":
        spans.append(Span(f"<|im_start|>system\n{system_prompt}<|im_end|>\n"))
    for m in messages:
        role, content = m["role"], m["content"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message role {role!r}; valid: system, user, assistant")
        spans.append(Span(f"<|im_start|>{role}\n"))
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            if part["type"] == "text":
                spans.append(Span(part["text"], supervised=role == "assistant"))
            elif part["type"] in ("image", "video"):
                if role == "assistant":
                    raise ValueError("vision items in assistant turns are not supported")
                kind = IMAGE if part["type"] == "image" else VIDEO
                spans.append(Span(vision=len(items)))
                items.append(VisionItem(kind, part[part["type"]], float(part.get("fps", synthetic.CLIP_FPS))))
            else:
                raise ValueError(f"content type {part['type']!r}; valid: text, image, video")
        spans += [Span("<|im_end|>", supervised=role == "assistant"),
                  Span("\n", supervised=supervise_turn_newline and role == "assistant")]
    if add_generation_prompt:
        spans.append(Span("<|im_start|>assistant\n"))
    return spans, items


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False,
                system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    return render(*chat_spans(messages, add_generation_prompt, system_prompt))


def _vision_part(source) -> dict:
    if isinstance(source, Scene):
        return {"type": "image", "image": source.image}
    return {"type": "video", "video": source.frames, "fps": source.fps}


def chat_messages(source) -> list[dict]:
    """A conversation about `source`: Scene -> 1-2 image QA turns; Clip -> one video turn;
    Arithmetic -> one pure-text turn. The first user turn carries the vision item, before its text."""
    if isinstance(source, Arithmetic):
        task = make_task("text", source, _task_rng(source, "chat"))
        return [{"role": "user", "content": task.question}, {"role": "assistant", "content": task.answer}]
    rng = _task_rng(source, "chat")
    if isinstance(source, Clip):
        kinds = ["video"]
    elif isinstance(source, Scene):
        pool = ["caption", "count", "ocr", "grounding"]
        kinds = [pool[int(i)] for i in rng.permutation(len(pool))[:int(rng.integers(1, 3))]]
    else:
        raise ValueError(f"chat needs a Scene, Clip or Arithmetic, got {type(source).__name__}")
    messages = []
    for t, kind in enumerate(kinds):
        task = make_task(kind, source, rng)
        text = {"type": "text", "text": task.question}
        messages.append({"role": "user", "content": [_vision_part(source), text] if t == 0 else [text]})
        messages.append({"role": "assistant", "content": task.answer})
    return messages


def sample_spans(kind: str, source, supervise_turn_newline: bool = False) -> tuple[list[Span], list[VisionItem]]:
    """The spans of a training sample of `kind` (KINDS) built from `source` (see `make_source`);
    `supervise_turn_newline`: chat_spans'."""
    if kind in ("caption", "ocr", "count"):
        return plain_spans(make_task(kind, source, _task_rng(source, kind)), VisionItem(IMAGE, source.image))
    if kind == "video":
        return plain_spans(make_task(kind, source, _task_rng(source, kind)),
                           VisionItem(VIDEO, _need(source, Clip, kind).frames, source.fps))
    if kind == "grounding":
        return grounding_spans(_need(source, Scene, kind))
    if kind == "interleaved":
        if not (isinstance(source, (tuple, list)) and source and all(isinstance(s, Scene) for s in source)):
            raise ValueError(f"interleaved needs a non-empty sequence of Scenes, got {type(source).__name__}")
        return interleaved_spans(source)
    if kind == "chat":
        return chat_spans(chat_messages(source), supervise_turn_newline=supervise_turn_newline)
    raise ValueError(f"sample kind {kind!r} unknown; valid: {', '.join(KINDS)}")


# ---------------------------------------------------------------------------------------------------
# Tokenization and pixels

@dataclasses.dataclass(frozen=True)
class VisionOptions:
    """Resolution limits for the synthetic data (pixels per image / per video frame)."""
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 256 * 28 * 28           # a 448x448 scene -> 256 LLM tokens
    video_min_pixels: int = 16 * 28 * 28
    video_max_pixels: int = 64 * 28 * 28      # a 224x224 frame pair -> 64 LLM tokens
    video_total_pixels: int = 1024 * 28 * 28

    def __post_init__(self):
        if not (0 < self.min_pixels <= self.max_pixels and 0 < self.video_min_pixels <= self.video_max_pixels):
            raise ValueError(f"bad pixel limits {self}")


def preprocess_item(item: VisionItem, opts: VisionOptions) -> tuple[np.ndarray, np.ndarray]:
    """-> (pixel_values float32 [t*h*w, 1176], grid_thw [1, 3])."""
    if item.kind == IMAGE:
        return media.preprocess_images([item.media], min_pixels=opts.min_pixels, max_pixels=opts.max_pixels)
    # Clips arrive sampled (synthetic ones at item.fps, files by sources.VideoSampling): every frame kept, one
    # per-frame budget from the total with video_max_pixels as its ceiling.
    cap = media.frame_max_pixels(len(item.media), opts.video_min_pixels, opts.video_max_pixels,
                                 opts.video_total_pixels)
    return media.preprocess_video_frames(list(item.media), opts.video_min_pixels, cap)


def assemble(spans: Sequence[Span], items: Sequence[VisionItem], tokenizer, cfg, sample_type: str,
             vision_opts: VisionOptions | None = None) -> dict:
    """Spans -> Tokenized sample. loss_mask[i] = 1 when input_ids[i] is a supervised target."""
    opts = vision_opts or VisionOptions()
    merge_unit = cfg.vision.merge_unit
    pads = {IMAGE: tokenizer.image_pad_id, VIDEO: tokenizer.video_pad_id}
    pixels, grids = [], []
    ids: list[int] = []
    mask: list[float] = []
    for span in spans:
        if span.vision is None:
            toks = tokenizer.encode(span.text)
            ids += toks
            mask += [float(span.supervised)] * len(toks)
            continue
        item = items[span.vision]
        pv, grid = preprocess_item(item, opts)
        n_patches = int(np.prod(grid[0]))
        if grid.shape != (1, 3) or pv.shape[0] != n_patches or n_patches % merge_unit:
            raise ValueError(f"vision item {span.vision}: grid {grid.tolist()} / pixel rows {pv.shape[0]} "
                             f"inconsistent with merge unit {merge_unit}")
        toks = [tokenizer.vision_start_id] + [pads[item.kind]] * (n_patches // merge_unit) + [tokenizer.vision_end_id]
        ids += toks
        mask += [0.0] * len(toks)
        pixels.append(pv.astype(np.float32))
        grids.append(grid.astype(np.int32))
    if mask:
        mask[0] = 0.0                       # the first token has no predecessor inside the sample
    patch_dim = cfg.vision.patch_dim
    return {
        "input_ids": np.asarray(ids, np.int32),
        "loss_mask": np.asarray(mask, np.float32),
        "pixel_values": np.concatenate(pixels) if pixels else np.zeros((0, patch_dim), np.float32),
        "grid_thw": np.concatenate(grids) if grids else np.zeros((0, 3), np.int32),
        "vision_kind": np.asarray([items[s.vision].kind for s in spans if s.vision is not None], np.int8),
        "sample_type": sample_type,
    }


# ---------------------------------------------------------------------------------------------------
# Entry points used by the pipeline and the evaluator

def make_source(kind: str, index: int, split: str = "train", seed: int = 0):
    """The synthetic ground truth behind sample `index` of `kind`; each kind has its own stream."""
    if kind in ("caption", "ocr", "count", "grounding"):
        return synthetic.scene(seed, index, split, stream=kind)
    if kind == "video":
        return synthetic.clip(seed, index, split, stream=kind)
    if kind == "interleaved":
        n = int(synthetic.rng_for(seed, index, split, "interleaved").integers(2, 4))
        return tuple(synthetic.scene(seed, index, split, stream=f"interleaved/{j}") for j in range(n))
    if kind == "chat":
        u = synthetic.rng_for(seed, index, split, "chat").random()
        if u < 0.6:
            return synthetic.scene(seed, index, split, stream="chat")
        if u < 0.8:
            return synthetic.clip(seed, index, split, stream="chat")
        return synthetic.arithmetic(seed, index, split, stream="chat")
    raise ValueError(f"sample kind {kind!r} unknown; valid: {', '.join(KINDS)}")


def build_sample(kind: str, source, tokenizer, cfg, vision_opts: VisionOptions | None = None,
                 supervise_turn_newline: bool = False) -> dict:
    spans, items = sample_spans(kind, source, supervise_turn_newline)
    return assemble(spans, items, tokenizer, cfg, kind, vision_opts)


def make_sample(kind: str, index: int, split: str, tokenizer, cfg, vision_opts: VisionOptions | None = None,
                seed: int = 0, supervise_turn_newline: bool = False) -> dict:
    return build_sample(kind, make_source(kind, index, split, seed), tokenizer, cfg, vision_opts,
                        supervise_turn_newline)


def sample_text(kind: str, index: int, split: str = "train", seed: int = 0) -> str:
    """The rendered text of a sample (one pad per vision item); no tokenizer or pixels needed."""
    return render(*sample_spans(kind, make_source(kind, index, split, seed)))


def eval_prompt(kind: str, source, tokenizer, cfg, vision_opts: VisionOptions | None = None,
                chat: bool = False) -> tuple[dict, str]:
    """(prompt sample ending where the model must answer, expected answer string) for an eval kind
    (EVAL_KINDS). Pre-training form by default; `chat=True` gives the ChatML form with the generation
    prompt. The sample's loss_mask is all zero. Greedy-decode until a tokenizer.stop_ids token, then
    score the decoded text with `score(kind, text, expected)`."""
    task = make_task(kind, source, _task_rng(source, f"eval/{kind}"))
    if chat or kind == "text":
        content = task.question if kind == "text" else [_vision_part(source), {"type": "text", "text": task.question}]
        spans, items = chat_spans([{"role": "user", "content": content}], add_generation_prompt=True)
    else:
        item = VisionItem(IMAGE, source.image) if kind != "video" else VisionItem(VIDEO, source.frames, source.fps)
        spans, items = [Span(vision=0)] + ([Span(task.prompt)] if task.prompt else []), [item]
    sample = assemble(spans, items, tokenizer, cfg, f"eval/{kind}", vision_opts)
    sample["loss_mask"][:] = 0.0
    return sample, task.answer


# ---------------------------------------------------------------------------------------------------
# Parsing and scoring decoded answers

_BOX_RE = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)")
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_WORD_NUMBERS = {"zero": 0, "no": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
    """Every '(x1,y1),(x2,y2)' in `text`, in order."""
    return [tuple(int(v) for v in m.groups()) for m in _BOX_RE.finditer(text)]


def parse_box(text: str) -> tuple[int, int, int, int] | None:
    boxes = parse_boxes(text)
    return boxes[0] if boxes else None


def parse_count(text: str) -> int | None:
    """The first integer (digits or a number word up to five) in `text`."""
    for tok in re.findall(r"\d+|[A-Za-z]+", strip_special(text)):
        if tok.isdigit():
            return int(tok)
        if tok.lower() in _WORD_NUMBERS:
            return _WORD_NUMBERS[tok.lower()]
    return None


def strip_special(text: str) -> str:
    return _SPECIAL_RE.sub("", text)


def normalise_answer(text: str) -> str:
    return " ".join(strip_special(text).strip().rstrip(".").lower().split())


def box_iou(a: Sequence[int], b: Sequence[int]) -> float:
    """IoU of two inclusive integer boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)
    return inter / (area(a) + area(b) - inter)


def score(kind: str, prediction: str, expected: str, iou_threshold: float = 0.5) -> float:
    """1.0 when the decoded `prediction` answers correctly, else 0.0. caption/ocr/video: normalised
    exact match; count/text: the first number; grounding: same number of boxes, each (in order) with
    IoU >= iou_threshold against the expected box."""
    if kind in ("caption", "ocr", "video"):
        return float(normalise_answer(prediction) == normalise_answer(expected))
    if kind in ("count", "text"):
        got = parse_count(prediction)
        return float(got is not None and got == parse_count(expected))
    if kind == "grounding":
        got, want = parse_boxes(prediction), parse_boxes(expected)
        return float(len(got) == len(want) > 0 and all(box_iou(g, w) >= iou_threshold for g, w in zip(got, want)))
    raise ValueError(f"eval kind {kind!r} unknown; valid: {', '.join(EVAL_KINDS)}")
