"""Importers: vision-language corpora in the formats they ship in -> entries of the record schema (sources.py).

Formats (FORMATS; `detect_format` picks one from the files and says which):
  llava       JSON array or JSON lines: {"id", "image": path or [paths] (or "images"), "video": path,
              "conversations": [{"from": "human" | "gpt" | "system", "value": "<image>\\nWhat is this?"}, ...]}
  messages    JSON array or JSON lines, as Qwen2-VL is fine-tuned: {"messages": [{"role": "system" | "user" |
              "assistant", "content": ...}, ...], "images": [paths], "videos": [path]}; content is a string
              with "<image>" / "<video>" placeholders, or a list of parts {"type": "text", "text"},
              {"type": "image", "image": path}, {"type": "video", "video": path}; a part without a path takes
              "images"[index] / "videos"[index] (TRL's layout) or else the next listed one
  webdataset  tar shards as img2dataset writes them: KEY.jpg|jpeg|png|webp with KEY.txt and/or KEY.json
              ({"caption": ...}; its other keys are img2dataset's metadata); one caption per KEY
  parquet     Hugging Face datasets' layout, read with pyarrow: images are {"bytes", "path"} structs (a column
              of them, or of lists of them). Rows with a "messages" or "conversations" column are read as
              above; other rows are captions: an image column, a text column, an optional prompt column
  manifest    the project's JSON-lines manifest (sources.py docstring)
llava and messages records become "chat" records: ChatML, system prompts kept (the default one where the first
turn is not a system turn), each placeholder replaced in place by its image or video, one placeholder per
medium ("placeholder_mismatch" otherwise). Media paths are relative to ImportOptions.media_root (default: the
folder of the input file) or absolute; "file://" and "data:...;base64," are understood, remote URLs are not
fetched ("remote_media"). A record may carry one video (records reference it by path).

Fields a format does not define are rejected ("unknown_field") unless ImportOptions.ignore_fields names them: a
misspelt "imgs" must not silently drop an image. Null values count as absent (Parquet fills missing struct
fields with nulls).

Input records are cut into chunks (`scan`: cheap to make and to pickle: parsed JSON rows, tar member offsets,
Parquet row groups) that worker processes read on their own (`read_chunk`). Reading yields, per input record,
its origin and an `Item` or the `sources.BadRecordError` that rejects it.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import glob as globlib
import json
import os
import re
import tarfile
from typing import Any, Iterator, Sequence

from qwen2vl_jax.data import sources
from qwen2vl_jax.data.sources import BadRecordError

FORMATS = ("llava", "messages", "webdataset", "parquet", "manifest")
FORMAT_EXTENSIONS = {"llava": (".json", ".jsonl"), "messages": (".json", ".jsonl"), "manifest": (".jsonl", ".json"),
                     "webdataset": (".tar",), "parquet": (".parquet",)}
CHUNK_RECORDS = 64                 # input records per chunk of JSON rows or tar keys (a Parquet chunk: a row group)

LLAVA_FIELDS = ("id", "image", "images", "video", "conversations")
LLAVA_TURN_FIELDS = ("from", "value")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MESSAGES_FIELDS = ("id", "messages", "images", "videos")
MESSAGE_FIELDS = ("role", "content")
PART_FIELDS = {"text": ("type", "text"), "image": ("type", "image", "index"), "video": ("type", "video", "index")}
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
WDS_FIELDS = WDS_IMAGE_EXTENSIONS + ("txt", "json")
TEXT_COLUMNS = ("text", "caption", "txt")      # a caption Parquet's text column, when not named
PLACEHOLDERS = {"<image>": "image", "<video>": "video"}
_PLACEHOLDER_RE = re.compile("(" + "|".join(map(re.escape, PLACEHOLDERS)) + ")")
_WDS_NAME_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")     # webdataset's key / extension split


@dataclasses.dataclass(frozen=True)
class ImportOptions:
    format: str                             # one of FORMATS
    media_root: str = ""                    # folder of relative media paths; "" = each input file's folder
    ignore_fields: tuple[str, ...] = ()     # fields (metadata) dropped instead of rejecting the record
    image_column: str = ""                  # Parquet caption rows: "" = the one column of image structs
    text_column: str = ""                   # Parquet caption rows: "" = the first of TEXT_COLUMNS present
    prompt_column: str = ""                 # Parquet caption rows: an unsupervised prompt before the text

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r}; valid: {', '.join(FORMATS)}")
        object.__setattr__(self, "ignore_fields", tuple(self.ignore_fields))


@dataclasses.dataclass(frozen=True)
class Item:
    """One usable input record: a validated entry (sources.validate_entry; its "images" / "video" are
    placeholders) and its media: per image the encoded bytes or an absolute path, the video's absolute path."""
    origin: str
    entry: dict
    images: tuple
    video: str | None


@dataclasses.dataclass(frozen=True)
class JsonChunk:
    path: str
    rows: tuple            # (origin, a JSON line (str) or a parsed object)

    def __len__(self):
        return len(self.rows)


@dataclasses.dataclass(frozen=True)
class TarChunk:
    path: str
    keys: tuple            # (key, ((extension, data offset, size), ...))

    def __len__(self):
        return len(self.keys)


@dataclasses.dataclass(frozen=True)
class ParquetChunk:
    path: str
    row_group: int
    first_row: int         # index in the file of the row group's first row
    num_rows: int
    mode: str              # "messages" | "llava" | "caption"
    columns: tuple         # caption mode: (image column, text column, prompt column or "")

    def __len__(self):
        return self.num_rows


# ----------------------------------------------------------------------------------------------
# Inputs and format detection

def resolve_inputs(pattern: str, fmt: str = "auto") -> list[str]:
    """--input -> sorted input files: a file, a glob, or a folder (its files with the format's extensions;
    with fmt "auto" the first of .tar, .parquet, .json/.jsonl present, so img2dataset's .parquet and
    _stats.json side files beside its .tar shards are not read). ValueError when nothing matches."""
    path = os.path.expanduser(pattern)
    if os.path.isdir(path):
        names = sorted(os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
        groups = [FORMAT_EXTENSIONS[fmt]] if fmt in FORMATS else [(".tar",), (".parquet",), (".json", ".jsonl")]
        for exts in groups:
            files = [n for n in names if n.endswith(exts)]
            if files:
                return files
        raise ValueError(f"--input folder {pattern!r} has no {' / '.join(e for g in groups for e in g)} files")
    files = sorted(f for f in globlib.glob(path) if os.path.isfile(f))
    if not files:
        raise ValueError(f"--input {pattern!r} matches no files")
    return files


def _first_json_record(path: str) -> Any:
    """The first record of a JSON array or JSON-lines file, read from its first MiB where it fits there."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 20).lstrip()
    if head.startswith("["):
        try:
            return json.JSONDecoder().raw_decode(head, len(head) - len(head[1:].lstrip()))[0]
        except json.JSONDecodeError:      # a first record over a MiB, or an empty / broken array
            rows = _parse_json_array(path)
            return rows[0] if rows else None
    for line in head.splitlines():
        if line.strip():
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def detect_format(files: Sequence[str]) -> str:
    """The format of the input files (by extension, and for JSON by the fields of the first record)."""
    kinds = {".tar": "webdataset", ".parquet": "parquet", ".json": "json", ".jsonl": "json"}
    found = {kinds.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in found or len(found) != 1:
        raise ValueError(f"cannot detect the format of {[os.path.basename(f) for f in files][:5]}: inputs must "
                         f"all be .json/.jsonl, .tar or .parquet files; pass --format ({', '.join(FORMATS)})")
    kind = found.pop()
    if kind != "json":
        return kind
    rec = _first_json_record(files[0])
    if isinstance(rec, dict):
        if "conversations" in rec:
            return "llava"
        if "type" in rec:
            return "manifest"
        if "messages" in rec:
            return "messages"
    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
    raise ValueError(f"cannot detect the format of {files[0]}: its first record has {keys}; expected "
                     "'conversations' (llava), 'messages' (messages) or 'type' (manifest); pass --format")


# ----------------------------------------------------------------------------------------------
# Scanning: input files -> chunks

def _parse_json_array(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected a JSON array of records or JSON lines") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: a JSON {type(data).__name__}; expected an array of records or JSON lines")
    return data


def _json_rows(path: str) -> list[tuple[str, Any]]:
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        first = f.read(4096).lstrip()
    if first.startswith("["):
        return [(f"{name}[{i}]", row) for i, row in enumerate(_parse_json_array(path))]
    with open(path, encoding="utf-8") as f:
        return [(f"{name}:{n}", line) for n, line in enumerate(f, start=1) if line.strip()]


def _tar_keys(path: str) -> list[tuple[str, tuple]]:
    """(key, ((extension, offset, size), ...)) per sample of an uncompressed tar, in order of first appearance."""
    try:
        tf = tarfile.open(path, "r:")
    except tarfile.ReadError as e:
        raise ValueError(f"{path}: not an uncompressed tar ({e}); img2dataset writes plain .tar shards "
                         "(decompress a .tar.gz first)") from e
    keys: dict[str, list] = {}
    with tf:
        for m in tf:
            if not m.isfile():
                continue
            match = _WDS_NAME_RE.match(m.name)
            key, ext = (match.group(1), match.group(2).lower()) if match else (m.name, "")
            keys.setdefault(key, []).append((ext, m.offset_data, m.size))
    return [(k, tuple(v)) for k, v in keys.items()]


def _is_image_struct(t) -> bool:
    import pyarrow as pa
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} >= {"bytes", "path"}


def _parquet_layout(path: str, schema, opts: ImportOptions) -> tuple[str, tuple]:
    """(mode, caption columns) of a Parquet file from its columns."""
    names = list(schema.names)
    if "messages" in names:
        return "messages", ()
    if "conversations" in names:
        return "llava", ()
    image_cols = [n for n in names if _is_image_struct(schema.field(n).type)]
    image = opts.image_column or (image_cols[0] if len(image_cols) == 1 else "")
    text = opts.text_column or next((n for n in TEXT_COLUMNS if n in names), "")
    missing = [f"{what} column {c!r}" for what, c in (("image", opts.image_column), ("text", opts.text_column),
                                                       ("prompt", opts.prompt_column)) if c and c not in names]
    if missing or not image or not text:
        found = f"image-struct columns {image_cols}" if image_cols else "no {'bytes', 'path'} image column"
        raise ValueError(f"{path}: cannot read caption rows from columns {names} ({found}; "
                         f"{'no ' + ' / '.join(missing) if missing else 'need one image and one text column'}): "
                         f"pass --image_column / --text_column, or give 'messages' or 'conversations' rows")
    return "caption", (image, text, opts.prompt_column)


def scan(files: Sequence[str], opts: ImportOptions) -> list:
    """Input files -> chunks (JsonChunk, TarChunk or ParquetChunk), in input order. File-level problems
    (invalid JSON file, a compressed tar, an unusable Parquet layout) are a ValueError naming the file."""
    chunks: list = []
    for path in files:
        if opts.format in ("llava", "messages", "manifest"):
            rows = _json_rows(path)
            chunks += [JsonChunk(path, tuple(rows[i:i + CHUNK_RECORDS])) for i in range(0, len(rows), CHUNK_RECORDS)]
        elif opts.format == "webdataset":
            keys = _tar_keys(path)
            chunks += [TarChunk(path, tuple(keys[i:i + CHUNK_RECORDS])) for i in range(0, len(keys), CHUNK_RECORDS)]
        else:
            import pyarrow.parquet as pq
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a file that is not Parquet
                raise ValueError(f"{path}: not a Parquet file ({e})") from e
            mode, columns = _parquet_layout(path, pf.schema_arrow, opts)
            first = 0
            for rg in range(pf.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                if n:
                    chunks.append(ParquetChunk(path, rg, first, n, mode, columns))
                first += n
    return chunks


# ----------------------------------------------------------------------------------------------
# Reading: chunk -> (origin, Item | BadRecordError)

def read_chunk(chunk, opts: ImportOptions) -> Iterator[tuple[str, Item | BadRecordError]]:
    """Every input record of a chunk, in order: (origin, Item) or (origin, the error that rejects it)."""
    base = os.path.abspath(os.path.expanduser(opts.media_root)) if opts.media_root else \
        os.path.dirname(os.path.abspath(chunk.path))
    for origin, convert in _records(chunk):
        try:
            row = convert()
            origin = _with_id(origin, row)
            item = to_item(origin, row, base, opts, chunk)
        except BadRecordError as e:
            yield origin, e
        else:
            yield origin, item


def _with_id(origin: str, row) -> str:
    ident = row.get("id") if isinstance(row, dict) else None
    return f"{origin} (id {ident})" if isinstance(ident, (str, int)) and not isinstance(ident, bool) else origin


def _records(chunk):
    """(origin, a thunk giving the row) per input record; a thunk raises BadRecordError for an unreadable one."""
    name = os.path.basename(chunk.path)
    if isinstance(chunk, JsonChunk):
        for origin, raw in chunk.rows:
            yield origin, (lambda raw=raw: _json_row(raw))
    elif isinstance(chunk, TarChunk):
        with open(chunk.path, "rb") as f:
            for key, members in chunk.keys:
                yield f"{name}/{key}", (lambda members=members: _tar_row(f, members))
    else:
        rows, error = None, None
        try:
            import pyarrow.parquet as pq
            rows = pq.ParquetFile(chunk.path).read_row_group(chunk.row_group).to_pylist()
        except Exception as e:  # a damaged row group rejects its rows, not the run
            error = BadRecordError("unreadable_file", f"row group {chunk.row_group}: {e}")
        for i in range(chunk.num_rows):
            yield f"{name}:{chunk.first_row + i}", (lambda i=i: _raise(error) if error else rows[i])


def _raise(error):
    raise error


def _json_row(raw):
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadRecordError("bad_json", str(e)) from e


def _tar_row(f, members) -> dict:
    row = {}
    for ext, offset, size in members:
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise BadRecordError("unreadable_file", f"tar member .{ext}: {len(data)} of {size} bytes")
        row[ext] = data
    return row


def to_item(origin: str, row: Any, base: str, opts: ImportOptions, chunk=None) -> Item:
    """One input record (a parsed JSON object, a tar sample {extension: bytes}, a Parquet row) -> Item."""
    if not isinstance(row, dict):
        raise BadRecordError("bad_schema", f"a record must be an object, got {type(row).__name__}")
    row = _present(row)
    fmt = opts.format
    if fmt == "parquet":
        fmt = chunk.mode if chunk is not None else "caption"
    if fmt == "llava":
        entry, images, video = from_llava(row, base, opts)
    elif fmt == "messages":
        entry, images, video = from_messages(row, base, opts)
    elif fmt == "webdataset":
        entry, images, video = from_webdataset(row, opts)
    elif fmt == "caption":
        entry, images, video = from_caption_row(row, base, opts, *chunk.columns)
    else:
        entry, images, video = from_manifest(row, base, opts)
    return Item(origin, sources.validate_entry(entry), tuple(images), video)


# ----------------------------------------------------------------------------------------------
# Per-format conversion: row -> (entry, image refs, video path)

def _present(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _check_fields(d: dict, known: Sequence[str], opts: ImportOptions, where: str = "") -> None:
    unknown = [k for k in d if k not in known and k not in opts.ignore_fields]
    if unknown:
        raise BadRecordError("unknown_field", f"unknown field{'s' if len(unknown) > 1 else ''} "
                                              f"{', '.join(map(repr, unknown))}{where} (known: {', '.join(known)}; "
                                              f"--ignore_fields={','.join(unknown)} drops them)")


def _object(value: Any, what: str, known: Sequence[str], opts: ImportOptions) -> dict:
    """A nested object of a record (a turn, a message) without its null fields, its fields checked."""
    if not isinstance(value, dict):
        raise BadRecordError("bad_schema", f"{what} must be an object; got {value!r}"[:200])
    value = _present(value)
    _check_fields(value, known, opts, f" in {what}")
    return value


def media_ref(value: Any, base: str, what: str = "image") -> bytes | str:
    """A media reference -> the encoded bytes or an absolute path: a path (relative to `base`), "file://...",
    "data:...;base64,...", raw bytes, or a Hugging Face {"bytes", "path"} struct."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return bytes(data)
        if not path:
            raise BadRecordError("bad_schema", f"{what} struct has neither 'bytes' nor 'path'")
        value = path
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise BadRecordError("bad_schema", f"{what} must be a path; got {value!r}"[:200])
    if value.startswith("data:"):
        head, sep, payload = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadRecordError("bad_schema", f"{what} data URI must be base64: {value[:60]!r}")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRecordError("bad_schema", f"{what} data URI: {e}") from e
    if value.startswith("file://"):
        value = value[len("file://"):]
    elif "://" in value:
        raise BadRecordError("remote_media", f"{what} {value!r} is a URL; download the media and give paths")
    path = os.path.expanduser(value)
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def _video_ref(value: Any, base: str) -> str:
    ref = media_ref(value, base, "video")
    if isinstance(ref, bytes):
        raise BadRecordError("bad_schema", "a video must be a file path (records reference videos by path)")
    return ref


def _text_content(text: str) -> str | list[dict]:
    """A message text -> the string itself, or parts with each placeholder as an image / video part."""
    if not _PLACEHOLDER_RE.search(text):
        return text
    parts = []
    for piece in _PLACEHOLDER_RE.split(text):
        if piece in PLACEHOLDERS:
            parts.append({"type": PLACEHOLDERS[piece]})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _count_parts(messages: Sequence[dict], kind: str) -> int:
    return sum(1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == kind)


def _chat(messages: list[dict], images: list, videos: list) -> tuple[dict, list, str | None]:
    """A chat entry after checking one placeholder / part per medium."""
    for kind, media in (("image", images), ("video", videos)):
        used = _count_parts(messages, kind)
        if used != len(media):
            raise BadRecordError("placeholder_mismatch", f"{used} <{kind}> placeholder(s) / parts for "
                                                         f"{len(media)} {kind}(s)")
    if len(videos) > 1:
        raise BadRecordError("unsupported", f"{len(videos)} videos in one record; a record carries at most one")
    entry = {"type": "chat", "images": [f"<image {i}>" for i in range(len(images))],
             "video": "<video>" if videos else None, "messages": messages}
    return entry, images, (videos[0] if videos else None)


def _as_list(value: Any, what: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, dict, bytes)):
        return [value]
    if not isinstance(value, list):
        raise BadRecordError("bad_schema", f"{what} must be a path or a list of paths; got {type(value).__name__}")
    return value


def from_llava(row: dict, base: str, opts: ImportOptions) -> tuple[dict, list, str | None]:
    _check_fields(row, LLAVA_FIELDS, opts)
    if "image" in row and "images" in row:
        raise BadRecordError("bad_schema", "both 'image' and 'images'; give one")
    images = [media_ref(v, base) for v in _as_list(row.get("image", row.get("images")), "image")]
    videos = [_video_ref(v, base) for v in _as_list(row.get("video"), "video")]
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecordError("bad_schema", "'conversations' must be a non-empty list of {from, value} turns")
    messages = []
    for turn in turns:
        turn = _object(turn, "a conversations turn", LLAVA_TURN_FIELDS, opts)
        role = LLAVA_ROLES.get(turn.get("from"))
        if role is None or not isinstance(turn.get("value"), str):
            raise BadRecordError("bad_schema", f"turn needs 'from' ({', '.join(LLAVA_ROLES)}) and a string "
                                               f"'value'; got {turn!r}"[:300])
        messages.append({"role": role, "content": _text_content(turn["value"])})
    return _chat(messages, images, videos)


def from_messages(row: dict, base: str, opts: ImportOptions) -> tuple[dict, list, str | None]:
    _check_fields(row, MESSAGES_FIELDS, opts)
    listed = {"image": [media_ref(v, base) for v in _as_list(row.get("images"), "images")],
              "video": [_video_ref(v, base) for v in _as_list(row.get("videos"), "videos")]}
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRecordError("bad_schema", "'messages' must be a non-empty list of {role, content}")
    media: dict[str, list] = {"image": [], "video": []}       # in order of appearance
    used: dict[str, list] = {"image": [], "video": []}        # indices into `listed` taken so far
    implicit = {"image": 0, "video": 0}                      # parts without a path or an index so far

    def take(kind: str, part: dict) -> None:
        """A part's medium: its own path, listed[part["index"]] (TRL's layout), or the next listed one."""
        if kind in part:
            media[kind].append(media_ref(part[kind], base) if kind == "image" else _video_ref(part[kind], base))
            return
        if "index" in part:
            k = part["index"]
        else:
            k, implicit[kind] = implicit[kind], implicit[kind] + 1
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < len(listed[kind]):
            raise BadRecordError("placeholder_mismatch", f"{kind} part / placeholder {k!r} has no {kind} among "
                                                         f"the {len(listed[kind])} listed")
        used[kind].append(k)
        media[kind].append(listed[kind][k])

    messages = []
    for m in msgs:
        m = _object(m, "a message", MESSAGE_FIELDS, opts)
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise BadRecordError("bad_schema", f"message role {role!r}; valid: system, user, assistant")
        if isinstance(content, str):
            content = _text_content(content)
            for p in content if isinstance(content, list) else []:
                if p["type"] != "text":
                    take(p["type"], {})
        elif isinstance(content, list):
            parts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") not in PART_FIELDS:
                    raise BadRecordError("bad_schema", f"content part must have type text, image or video; got "
                                                       f"{p!r}"[:200])
                p = _present(p)
                kind = p["type"]
                _check_fields(p, PART_FIELDS[kind], opts, f" in a {kind} part")
                if kind == "text":
                    if not isinstance(p.get("text"), str):
                        raise BadRecordError("bad_schema", f"text part needs a string 'text'; got {p!r}"[:200])
                    parts.append({"type": "text", "text": p["text"]})
                else:
                    take(kind, p)
                    parts.append({"type": kind})
            content = parts
        else:
            raise BadRecordError("bad_schema", f"message content must be a string or a list; got {content!r}"[:200])
        messages.append({"role": role, "content": content})
    for kind in ("image", "video"):
        if sorted(used[kind]) != list(range(len(listed[kind]))):
            raise BadRecordError("placeholder_mismatch", f"{len(used[kind])} <{kind}> placeholder(s) / parts "
                                                         f"without a path for {len(listed[kind])} listed {kind}(s)")
    return _chat(messages, media["image"], media["video"])


def from_webdataset(row: dict, opts: ImportOptions) -> tuple[dict, list, None]:
    _check_fields(row, WDS_FIELDS, opts, " (tar members of the key)")
    found = [ext for ext in WDS_IMAGE_EXTENSIONS if ext in row]
    if len(found) != 1:
        raise BadRecordError("bad_schema", f"a sample needs one image (.{', .'.join(WDS_IMAGE_EXTENSIONS)}); "
                                           f"got {len(found)}")
    text = None
    if "txt" in row:
        try:
            text = row["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecordError("bad_schema", f".txt is not UTF-8: {e}") from e
    elif "json" in row:
        try:
            meta = json.loads(row["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRecordError("bad_json", f".json: {e}") from e
        text = meta.get("caption") if isinstance(meta, dict) else None
    if not isinstance(text, str):
        raise BadRecordError("bad_schema", "no caption: a sample needs a .txt or a .json with a string 'caption'")
    return {"type": "caption", "images": ["<image 0>"], "text": text}, [row[found[0]]], None


def from_caption_row(row: dict, base: str, opts: ImportOptions, image_col: str, text_col: str,
                     prompt_col: str) -> tuple[dict, list, None]:
    _check_fields(row, tuple(c for c in (image_col, text_col, prompt_col) if c), opts)
    images = _as_list(row.get(image_col), image_col)
    if len(images) != 1:
        raise BadRecordError("bad_schema", f"column {image_col!r} holds {len(images)} images; a caption row needs 1")
    entry = {"type": "caption", "images": ["<image 0>"], "text": row.get(text_col)}
    if prompt_col:
        entry["prompt"] = row.get(prompt_col)
    return entry, [media_ref(images[0], base)], None


def from_manifest(row: dict, base: str, opts: ImportOptions) -> tuple[dict, list, str | None]:
    _check_fields(row, sources.MANIFEST_FIELDS, opts)
    entry = sources.validate_entry(row)
    video = _video_ref(entry["video"], base) if entry["video"] is not None else None
    return entry, [media_ref(p, base) for p in entry["images"]], video
