"""Data sources: source names, the JSONL manifest schema, the ArrayRecord record format, record -> sample.

Source names (used in `DataConfig.mixture`):
  "synthetic:<kind>"     on-the-fly embedded data (formats.KINDS), infinite: index -> sample
  "arrayrecord:<DIR>"    the output folder of `launch.prepare_data`: DIR/<split>/*.array_record
  "arrayrecord:<glob>"   ArrayRecord shards; "{split}" in the glob is replaced by the split name. A glob
                         without "{split}" has only a train split (asking it for "heldout" is an error, so a
                         held-out loss is never computed on training files)
  "arrayrecord:gs://BUCKET/<folder or glob>"   the same in a Cloud Storage bucket, read through a gcsfuse
                         mount at GCS_MOUNT_ROOT/BUCKET (launch.tpu mounts every bucket of the mixture on every
                         worker; elsewhere: `gcsfuse -o ro --implicit-dirs BUCKET /mnt/gcs/BUCKET`)
Each source has a short label (`source_labels`: the kind, or the last meaningful path components of the
folder / glob, as many as it takes to be unique) for the per-source held-out losses.

Manifest (one JSON object per line with the fields MANIFEST_FIELDS; paths relative to the manifest's folder or
absolute; launch.prepare_data also reads LLaVA, chat "messages", WebDataset and Parquet corpora: importers.py):
  {"type": "caption",     "images": ["a.jpg"], "text": "a dog on a beach", "prompt": "optional unsupervised prefix"}
  {"type": "ocr",         "images": ["scan.png"], "text": "TOTAL 42.00", "prompt": "What text is in the image?\\n"}
  {"type": "grounding",   "images": ["a.jpg"], "boxes": [{"ref": "the dog", "box": [x1, y1, x2, y2]}, ...]}
                          boxes in inclusive pixels of the original image ("boxes" instead of "box" for several),
                          written as <|box_start|>(x1,y1),(x2,y2)<|box_end|> normalised to [0, 1000)
  {"type": "interleaved", "images": ["p1.jpg", "p2.jpg"], "text": "intro <image> middle <image> end"}
                          one "<image>" marker per image, in order
  {"type": "video",       "video": "clip.mp4", "text": "a man opens a door", "prompt": "optional"}
  {"type": "chat",        "images": [...], "video": "optional.mp4",
                          "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                                       {"role": "assistant", "content": "answer"}]}
                          image parts take "images" in order; a video part takes "video"
Pre-training kinds supervise the text (not the prompt, not vision tokens) and end with <|endoftext|>;
chat is ChatML with only assistant turns supervised (formats.chat_spans; DataConfig.supervise_turn_newline).

Record (one ArrayRecord entry, msgpack): {"v": 1, "type", "text", "prompt", "boxes", "messages",
"images": [raw encoded image bytes, ...], "video": absolute path or None, "origin": "manifest:line"}.
Images are embedded (small, read once); videos are referenced by path (large; decoded at read time).
"""
from __future__ import annotations

import dataclasses
import glob as globlib
import os
from typing import Any, Sequence

import msgpack

from qwen2vl_jax.data import formats, media
from qwen2vl_jax.data.formats import EOT, IMAGE, VIDEO, Span, VisionItem

RECORD_VERSION = 1
RECORD_TYPES = ("caption", "ocr", "grounding", "interleaved", "video", "chat")
MANIFEST_FIELDS = ("type", "images", "video", "text", "prompt", "boxes", "messages")
IMAGE_MARKER = "<image>"
SOURCE_KINDS = ("synthetic", "arrayrecord")
GCS_MOUNT_ROOT = "/mnt/gcs"      # gs://BUCKET/... sources are read from GCS_MOUNT_ROOT/BUCKET/... (gcsfuse)


class BadRecordError(ValueError):
    """A record or manifest line that does not follow the schema. `reason` names the problem class."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"[{reason}] {message}")
        self.reason = reason
        self.message = message


# ----------------------------------------------------------------------------------------------
# Source names

@dataclasses.dataclass(frozen=True)
class SourceSpec:
    kind: str       # "synthetic" | "arrayrecord"
    arg: str        # the synthetic kind, or the glob

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.arg}"


def parse_source(name: str) -> SourceSpec:
    kind, sep, arg = name.partition(":")
    if not sep or kind not in SOURCE_KINDS or not arg:
        raise ValueError(f"source {name!r} must be 'synthetic:<kind>' or 'arrayrecord:<glob>'")
    if kind == "synthetic" and arg not in formats.KINDS:
        raise ValueError(f"synthetic kind {arg!r} unknown; valid: {', '.join(formats.KINDS)}")
    return SourceSpec(kind, arg)


SHARD_SUFFIX = ".array_record"
SPLIT_PLACEHOLDER = "{split}"


def gcs_bucket(arg: str) -> str | None:
    """The bucket of a gs:// source argument, else None."""
    if not arg.startswith("gs://"):
        return None
    bucket = arg[len("gs://"):].split("/", 1)[0]
    if not bucket:
        raise ValueError(f"source {arg!r}: expected gs://BUCKET/PATH")
    return bucket


def mounted_path(arg: str) -> str:
    """A gs://BUCKET/PATH source argument as the path of its gcsfuse mount, GCS_MOUNT_ROOT/BUCKET/PATH (grain
    reads ArrayRecord files by path); other arguments unchanged. ValueError when the bucket is not mounted."""
    bucket = gcs_bucket(arg)
    if bucket is None:
        return arg
    point = os.path.join(GCS_MOUNT_ROOT, bucket)
    if not os.path.ismount(point) and not os.path.isdir(point):
        raise ValueError(f"source {arg!r}: the bucket is read through a gcsfuse mount at {point}, which does not "
                         f"exist (launch.tpu mounts it on every worker; by hand: gcsfuse -o ro --implicit-dirs "
                         f"{bucket} {point})")
    return os.path.join(point, arg[len("gs://") + len(bucket):].lstrip("/"))


def split_pattern(arg: str, split: str = "train") -> str:
    """The shard glob of an "arrayrecord:<arg>" source for `split` (module docstring): a folder means
    prepare_data's layout DIR/<split>/*.array_record; "{split}" in a glob is replaced; a glob without it
    serves the train split only (ValueError for any other, naming the two ways to give a held-out split)."""
    path = os.path.expanduser(mounted_path(arg))
    if SPLIT_PLACEHOLDER in path:
        return path.replace(SPLIT_PLACEHOLDER, split)
    if os.path.isdir(path):
        return os.path.join(path, split, "*" + SHARD_SUFFIX)
    if split != "train":
        raise ValueError(f"arrayrecord glob {arg!r} has no {split} split: give launch.prepare_data's output "
                         f"folder (it writes DIR/train/ and, with --heldout=N, DIR/heldout/) or put "
                         f"{SPLIT_PLACEHOLDER!r} in the glob (DIR/{SPLIT_PLACEHOLDER}/*{SHARD_SUFFIX})")
    return path


def arrayrecord_files(arg: str, split: str = "train") -> list[str]:
    """Sorted shard paths of an "arrayrecord:<arg>" source's `split`; ValueError if none match."""
    pattern = split_pattern(arg, split)
    files = sorted(globlib.glob(pattern))
    if not files:
        hint = " (launch.prepare_data writes a held-out split with --heldout=N)" if split != "train" else ""
        raise ValueError(f"arrayrecord source {arg!r}: {split} glob {pattern!r} matches no files{hint}")
    return files


def arrayrecord_source(arg: str, split: str = "train"):
    """grain.sources.ArrayRecordDataSource over the shards of a source's `split` (random access, picklable)."""
    import grain
    return grain.sources.ArrayRecordDataSource(arrayrecord_files(arg, split))


def _label_parts(spec: SourceSpec) -> list[str]:
    """The path components of an ArrayRecord source that name something: trailing components without a
    letter or digit once "{split}", wildcards and the shard suffix are removed ("*.array_record",
    "{split}") say nothing about the data and are dropped."""
    parts = [p for p in os.path.normpath(spec.arg).split(os.sep) if p not in ("", ".")]

    def says_something(part):
        rest = part.replace(SPLIT_PLACEHOLDER, "").replace(SHARD_SUFFIX, "")
        return any(c.isalnum() for c in rest)

    while parts and not says_something(parts[-1]):
        parts.pop()
    return parts


def source_labels(names: Sequence[str]) -> list[str]:
    """Distinct short labels of a mixture's source names: a synthetic source's kind; an ArrayRecord source's
    last meaningful path component, extended leftwards while two labels coincide (the full source name
    where that is not enough). ValueError when the names themselves repeat."""
    if len(set(names)) != len(names):
        raise ValueError(f"source names repeat: {list(names)}")
    specs = [parse_source(n) for n in names]
    parts = [[] if s.kind == "synthetic" else _label_parts(s) for s in specs]
    depth = [1] * len(specs)
    full = [False] * len(specs)

    def label(i):
        if specs[i].kind == "synthetic":
            return specs[i].arg
        if full[i] or not parts[i]:
            return specs[i].name
        return "/".join(parts[i][-depth[i]:])

    while True:
        labels = [label(i) for i in range(len(specs))]
        clashing = [i for i, lab in enumerate(labels) if labels.count(lab) > 1]
        if not clashing:
            return labels
        for i in clashing:   # synthetic labels and full names are distinct among themselves: the others give way
            if specs[i].kind == "synthetic" or full[i]:
                continue
            if depth[i] < len(parts[i]):
                depth[i] += 1
            else:
                full[i] = True


# ----------------------------------------------------------------------------------------------
# Manifest lines -> validated entries

def _str(entry: dict, key: str, required: bool) -> str | None:
    v = entry.get(key)
    if v is None:
        if required:
            raise BadRecordError("bad_schema", f"{entry.get('type')!r} entry needs a string {key!r}")
        return None
    if not isinstance(v, str):
        raise BadRecordError("bad_schema", f"{key!r} must be a string, got {type(v).__name__}")
    return v


def _boxes(entry: dict) -> list[dict]:
    boxes = entry.get("boxes")
    if not isinstance(boxes, list) or not boxes:
        raise BadRecordError("bad_schema", "grounding entry needs a non-empty 'boxes' list")
    out = []
    for b in boxes:
        if not isinstance(b, dict) or not isinstance(b.get("ref"), str):
            raise BadRecordError("bad_schema", f"each box needs a string 'ref'; got {b!r}")
        many = b.get("boxes", [b.get("box")])
        if not isinstance(many, list) or not many or not all(
                isinstance(x, (list, tuple)) and len(x) == 4 and all(isinstance(c, (int, float)) for c in x)
                for x in many):
            raise BadRecordError("bad_schema", f"box of {b['ref']!r} must be [x1, y1, x2, y2]; got {many!r}")
        out.append({"ref": b["ref"], "boxes": [[int(c) for c in x] for x in many]})
    return out


def _messages(entry: dict, n_images: int, has_video: bool) -> list[dict]:
    msgs = entry.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRecordError("bad_schema", "chat entry needs a non-empty 'messages' list")
    used_img = used_vid = 0
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRecordError("bad_schema", f"message must have role system/user/assistant; got {m!r}")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise BadRecordError("bad_schema", f"message content must be a string or a list; got {content!r}")
        for p in parts:
            t = p.get("type") if isinstance(p, dict) else None
            if t == "text" and isinstance(p.get("text"), str):
                continue
            if t in ("image", "video") and m["role"] == "assistant":
                raise BadRecordError("bad_schema", f"{t} in an assistant turn (vision items go in user turns)")
            if t == "image":
                used_img += 1
            elif t == "video":
                used_vid += 1
            else:
                raise BadRecordError("bad_schema", f"content part must be text/image/video; got {p!r}")
    if used_img != n_images or used_vid != int(has_video):
        raise BadRecordError("bad_schema", f"messages use {used_img} images / {used_vid} videos but the entry "
                                           f"has {n_images} images / {int(has_video)} videos")
    return msgs


def validate_entry(entry: Any) -> dict:
    """A manifest object -> normalised entry {type, images, video, text, prompt, boxes, messages}.
    Raises BadRecordError("bad_schema") naming the problem."""
    if not isinstance(entry, dict):
        raise BadRecordError("bad_schema", f"a manifest line must be a JSON object, got {type(entry).__name__}")
    kind = entry.get("type")
    if kind not in RECORD_TYPES:
        raise BadRecordError("bad_schema", f"type {kind!r}; valid: {', '.join(RECORD_TYPES)}")
    images = entry.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise BadRecordError("bad_schema", f"'images' must be a list of paths; got {images!r}")
    video = _str(entry, "video", kind == "video")
    out = {"type": kind, "images": images, "video": video, "text": None, "prompt": _str(entry, "prompt", False),
           "boxes": None, "messages": None}
    want_images = {"caption": 1, "ocr": 1, "grounding": 1, "video": 0}
    if kind in want_images and len(images) != want_images[kind]:
        raise BadRecordError("bad_schema", f"{kind} entry needs {want_images[kind]} image(s); got {len(images)}")
    if kind != "video" and kind != "chat" and video is not None:
        raise BadRecordError("bad_schema", f"{kind} entry cannot have a video")
    if kind in ("caption", "ocr", "video", "interleaved"):
        out["text"] = _str(entry, "text", True)
    if kind == "interleaved":
        if not images or out["text"].count(IMAGE_MARKER) != len(images):
            raise BadRecordError("bad_schema", f"interleaved text has {out['text'].count(IMAGE_MARKER)} "
                                               f"{IMAGE_MARKER} markers for {len(images)} images")
    if kind == "grounding":
        out["boxes"] = _boxes(entry)
    if kind == "chat":
        out["messages"] = _messages(entry, len(images), video is not None)
    return out


# ----------------------------------------------------------------------------------------------
# Record encoding

def encode_record(entry: dict, image_bytes: Sequence[bytes], video_path: str | None, origin: str = "") -> bytes:
    """A validated entry + raw image bytes (+ video path) -> one msgpack record."""
    rec = {"v": RECORD_VERSION, "type": entry["type"], "text": entry.get("text"), "prompt": entry.get("prompt"),
           "boxes": entry.get("boxes"), "messages": entry.get("messages"),
           "images": [bytes(b) for b in image_bytes], "video": video_path, "origin": origin}
    return msgpack.packb(rec, use_bin_type=True)


def decode_record(data: bytes) -> dict:
    """msgpack bytes -> record dict; BadRecordError("bad_record") when undecodable or of another version."""
    try:
        rec = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several unrelated exception types on garbage
        raise BadRecordError("bad_record", f"undecodable record ({len(data)} bytes): {e}") from e
    if not isinstance(rec, dict) or rec.get("v") != RECORD_VERSION:
        raise BadRecordError("bad_record", f"record version {rec.get('v') if isinstance(rec, dict) else None!r} "
                                           f"!= {RECORD_VERSION}")
    images = rec.get("images")
    if not isinstance(images, list) or not all(isinstance(b, bytes) for b in images):
        raise BadRecordError("bad_record", "record 'images' must be a list of bytes")
    if not (rec.get("video") is None or isinstance(rec["video"], str)):
        raise BadRecordError("bad_record", f"record 'video' must be a path or None; got {type(rec['video']).__name__}")
    try:
        validate_entry({**rec, "images": [f"<image {i}>" for i in range(len(images))]})
    except BadRecordError as e:
        raise BadRecordError("bad_record", str(e)) from e
    return rec


# ----------------------------------------------------------------------------------------------
# Record -> Tokenized sample

@dataclasses.dataclass(frozen=True)
class VideoSampling:
    """How a video file is sampled in time (qwen-vl-utils rules, media.smart_nframes)."""
    fps: float = media.VIDEO_FPS
    min_frames: int = media.FPS_MIN_FRAMES
    max_frames: int | None = None         # None: min(FPS_MAX_FRAMES, the video's frame count)


def _video_item(path: str, sampling: VideoSampling) -> VisionItem:
    frames, video_fps = media.load_video(path)
    sampled = media.sample_frames(frames, video_fps, sampling.fps, sampling.min_frames, sampling.max_frames)
    return VisionItem(VIDEO, tuple(sampled), sampling.fps)


def record_spans(rec: dict, images: Sequence, video: VisionItem | None,
                 supervise_turn_newline: bool = False) -> tuple[list[Span], list[VisionItem]]:
    """Spans of a record (see the module docstring) given its decoded PIL images and video item;
    `supervise_turn_newline`: formats.chat_spans'."""
    kind = rec["type"]
    prompt = [Span(rec["prompt"])] if rec.get("prompt") else []
    if kind in ("caption", "ocr"):
        return [Span(vision=0), *prompt, Span(rec["text"] + EOT, supervised=True)], [VisionItem(IMAGE, images[0])]
    if kind == "video":
        return [Span(vision=0), *prompt, Span(rec["text"] + EOT, supervised=True)], [video]
    if kind == "grounding":
        w, h = images[0].size
        spans = [Span(vision=0), *prompt]
        for b in rec["boxes"]:
            try:
                answer = "".join(formats.box_text(formats.normalise_box(x, w, h)) for x in b["boxes"])
            except ValueError as e:
                raise BadRecordError("box_outside_image", f"box of {b['ref']!r}: {e}") from e
            spans += [Span(formats.ref_text(b["ref"])), Span(answer, supervised=True)]
        return spans + [Span(EOT, supervised=True)], [VisionItem(IMAGE, images[0])]
    if kind == "interleaved":
        pieces = rec["text"].split(IMAGE_MARKER)
        spans = []
        for i, piece in enumerate(pieces):
            if piece:
                spans.append(Span(piece, supervised=True))
            if i < len(images):
                spans.append(Span(vision=i))
        return spans + [Span(EOT, supervised=True)], [VisionItem(IMAGE, im) for im in images]
    if kind == "chat":
        it = iter(images)
        messages = []
        for m in rec["messages"]:
            content = m["content"]
            if not isinstance(content, str):
                content = [{"type": "image", "image": next(it)} if p["type"] == "image" else
                           {"type": "video", "video": video.media, "fps": video.fps} if p["type"] == "video" else p
                           for p in content]
            messages.append({"role": m["role"], "content": content})
        return formats.chat_spans(messages, supervise_turn_newline=supervise_turn_newline)
    raise BadRecordError("bad_record", f"record type {kind!r} unknown")


def load_image_bytes(data: bytes):
    """media.load_image, with an empty file classified as BadMediaError("zero_size")."""
    if len(data) == 0:
        raise media.BadMediaError("zero_size", "the image file is empty (0 bytes)")
    return media.load_image(data)


def record_media(rec: dict, sampling: VideoSampling = VideoSampling()) -> tuple[list, VisionItem | None]:
    """The decoded media of a record: (PIL images, the sampled video item or None). Raises media.BadMediaError."""
    images = [load_image_bytes(b) for b in rec["images"]]
    return images, (_video_item(rec["video"], sampling) if rec.get("video") else None)


def record_sample(rec: dict, images: Sequence, video: VisionItem | None, tokenizer, cfg,
                  vision_opts: formats.VisionOptions, supervise_turn_newline: bool = False) -> dict:
    """A decoded record and its decoded media -> Tokenized sample (BadRecordError / media.BadMediaError)."""
    try:
        spans, items = record_spans(rec, images, video, supervise_turn_newline)
    except ValueError as e:  # e.g. a vision part in an assistant turn
        if isinstance(e, (BadRecordError, media.BadMediaError)):
            raise
        raise BadRecordError("bad_record", str(e)) from e
    return formats.assemble(spans, items, tokenizer, cfg, rec["type"], vision_opts)


def record_to_sample(data: bytes, tokenizer, cfg, vision_opts: formats.VisionOptions,
                     sampling: VideoSampling = VideoSampling(), supervise_turn_newline: bool = False) -> dict:
    """ArrayRecord bytes -> Tokenized sample. Raises BadRecordError (schema) or media.BadMediaError (media)."""
    rec = decode_record(data)
    images, video = record_media(rec, sampling)
    return record_sample(rec, images, video, tokenizer, cfg, vision_opts, supervise_turn_newline)
