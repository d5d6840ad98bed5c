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
              Rows with "texts" and "images" list columns are interleaved web documents as OBELICS (and
              MINT-1T's HTML subset) ship them: at each position exactly one of texts[i] / images[i] is not
              None; images are URLs, paths, bytes or {"bytes", "path"} structs; "metadata" /
              "general_metadata" (and "url", "id") are the corpus's metadata, not read
  mmc4        MMC4's JSON lines: {"url", "text_list": [sentence, ...], "image_info": [{"image_name",
              "raw_url", "matched_text_index", "matched_sim", "face_detections"}, ...], "similarity_matrix",
              "could_have_url_duplicate"}: each image goes before the sentence at its matched_text_index
              (OpenFlamingo's convention), the sentences joined by spaces; the image file is
              media_root/image_name (raw_url is not fetched), or "image_base64" inside image_info
  manifest    the project's JSON-lines manifest (sources.py docstring)
llava and messages records become "chat" records: ChatML, system prompts kept (the default one where the first
turn is not a system turn), each placeholder replaced in place by its image or video, one placeholder per
medium ("placeholder_mismatch" otherwise). Media paths are relative to ImportOptions.media_root (default: the
folder of the input file) or absolute; "file://" and "data:...;base64," are understood, remote URLs are not
fetched ("remote_media"). A record may carry one video (records reference it by path).
Interleaved documents (OBELICS Parquet, mmc4) become "interleaved" records: the text with one "<image>" marker
per image. An image that is a URL, missing, unreadable or undecodable is handled per
ImportOptions.missing_images: "drop" (the default: the image and its marker go, the document stays; the
reasons are counted in Item.dropped_images) or "reject" (the document is rejected with that reason). A document
left with no image is rejected ("no_images"), one with no text ("no_text").

Inputs and media may be in a bucket (gs://BUCKET/...; read through the path layer, train/paths.py): input
files, globs and folders, and media_root. Images in a bucket are read here and embedded; a video in a bucket is
"unsupported" (records reference videos by a local path, decoded at training time).

Bad input is per record: a JSON line that is not UTF-8 ("bad_encoding"), does not parse ("bad_json") or is not
an object ("bad_schema") is rejected with its file:line, and the other lines are read. A JSON array file is
one document: if it is not UTF-8 or does not parse, scan raises a ValueError naming the file and the position.

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
import posixpath
import re
import tarfile
from typing import Any, Iterator, Sequence

from qwen2vl_jax.data import media, sources
from qwen2vl_jax.data.sources import BadRecordError
from qwen2vl_jax.train import paths

FORMATS = ("llava", "messages", "webdataset", "parquet", "mmc4", "manifest")
JSON_FORMATS = ("llava", "messages", "mmc4", "manifest")
FORMAT_EXTENSIONS = {"llava": (".json", ".jsonl"), "messages": (".json", ".jsonl"), "manifest": (".jsonl", ".json"),
                     "mmc4": (".jsonl", ".json"), "webdataset": (".tar",), "parquet": (".parquet",)}
MISSING_IMAGES = ("drop", "reject")     # what an interleaved document does with an image it cannot use
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
OBELICS_FIELDS = ("texts", "images")
OBELICS_METADATA = ("metadata", "general_metadata", "url", "id")    # shipped beside them; not read
MMC4_FIELDS = ("text_list", "image_info")
MMC4_METADATA = ("url", "similarity_matrix", "could_have_url_duplicate")
MMC4_IMAGE_FIELDS = ("image_name", "image_base64", "matched_text_index")
MMC4_IMAGE_METADATA = ("raw_url", "matched_sim", "face_detections")
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
    missing_images: str = "drop"            # interleaved documents: MISSING_IMAGES (module docstring)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r}; valid: {', '.join(FORMATS)}")
        if self.missing_images not in MISSING_IMAGES:
            raise ValueError(f"missing_images {self.missing_images!r}; valid: {', '.join(MISSING_IMAGES)}")
        object.__setattr__(self, "ignore_fields", tuple(self.ignore_fields))


@dataclasses.dataclass(frozen=True)
class Item:
    """One usable input record: a validated entry (sources.validate_entry; its "images" / "video" are
    placeholders) and its media: per image the encoded bytes or an absolute path, the video's absolute path;
    `dropped_images`: the reason of each image an interleaved document dropped (ImportOptions.missing_images)."""
    origin: str
    entry: dict
    images: tuple
    video: str | None
    dropped_images: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class JsonChunk:
    path: str
    rows: tuple            # (origin, a JSON line (bytes) or a parsed object)

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
    mode: str              # "messages" | "llava" | "obelics" | "caption"
    columns: tuple         # caption mode: (image column, text column, prompt column or "")

    def __len__(self):
        return self.num_rows


# ----------------------------------------------------------------------------------------------
# Inputs and format detection

def _open(path: str, mode: str = "rb"):
    """A local file, or an object in a bucket through the path layer (seekable: tar members, Parquet)."""
    return paths.path(path).open(mode) if paths.is_remote(path) else open(path, mode)


def _name(path: str) -> str:
    return posixpath.basename(path) if paths.is_remote(path) else os.path.basename(path)


def _folder(path: str) -> str:
    return posixpath.dirname(path) if paths.is_remote(path) else os.path.dirname(os.path.abspath(path))


def _list(pattern: str) -> tuple[bool, list[str]]:
    """(is a folder, its files or the glob's matches), local or in a bucket."""
    if paths.is_remote(pattern):
        fs = paths._gcs()             # gcsfs, as epath uses it; its listing cache may be stale (paths._fresh)
        fs.invalidate_cache()
        if fs.isdir(pattern):
            return True, ["gs://" + e["name"] for e in fs.ls(pattern, detail=True) if e["type"] == "file"]
        return False, ["gs://" + f for f in fs.glob(pattern) if fs.isfile(f)]
    path = os.path.expanduser(pattern)
    if os.path.isdir(path):
        return True, [os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))]
    return False, [f for f in globlib.glob(path) if os.path.isfile(f)]


def resolve_inputs(pattern: str, fmt: str = "auto") -> list[str]:
    """--input -> sorted input files: a file, a glob, or a folder, here or in a bucket (gs://...) (a folder: its
    files with the format's extensions; with fmt "auto" the first of .tar, .parquet, .json/.jsonl present, so
    img2dataset's .parquet and _stats.json side files beside its .tar shards are not read). ValueError when
    nothing matches."""
    folder, found = _list(pattern)
    names = sorted(found)
    if folder:
        groups = [FORMAT_EXTENSIONS[fmt]] if fmt in FORMATS else [(".tar",), (".parquet",), (".json", ".jsonl")]
        for exts in groups:
            files = [n for n in names if n.endswith(exts)]
            if files:
                return files
        raise ValueError(f"--input folder {pattern!r} has no {' / '.join(e for g in groups for e in g)} files")
    if not names:
        raise ValueError(f"--input {pattern!r} matches no files")
    return names


def file_identity(path: str) -> list:
    """[path, size, version] of an input file (version: the mtime in ns; in a bucket, the object's generation):
    what a re-run compares to tell an unchanged input."""
    if paths.is_remote(path):
        info = paths._gcs().info(path)
        return [path, int(info["size"]), str(info.get("generation") or info.get("mtime") or "")]
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _first_json_record(path: str) -> Any:
    """The first readable record of a JSON array or JSON-lines file, from its first MiB where it fits there
    (lines that do not decode or parse are passed over: they are rejected per record later)."""
    with _open(path) as f:
        head = f.read(1 << 20).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
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
                continue
    return None


def detect_format(files: Sequence[str]) -> str:
    """The format of the input files (by extension, and for JSON by the fields of the first record)."""
    kinds = {".tar": "webdataset", ".parquet": "parquet", ".json": "json", ".jsonl": "json"}
    found = {kinds.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in found or len(found) != 1:
        raise ValueError(f"cannot detect the format of {[_name(f) for f in files][:5]}: inputs must "
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
        if set(MMC4_FIELDS) <= set(rec):
            return "mmc4"
    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
    raise ValueError(f"cannot detect the format of {files[0]}: its first record has {keys}; expected "
                     "'conversations' (llava), 'messages' (messages), 'text_list' + 'image_info' (mmc4) or 'type' "
                     "(manifest); pass --format")


# ----------------------------------------------------------------------------------------------
# Scanning: input files -> chunks

def _decode_utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 at byte {e.start} (0x{raw[e.start]:02x}); JSON must be UTF-8 "
                         f"(re-encode the file, e.g. iconv -f latin1 -t utf-8)") from e


def _parse_json_array(path: str) -> list:
    """A JSON array file, whole: a ValueError naming the file and the position when it is not UTF-8 or does
    not parse (one broken byte or bracket leaves no record boundaries to trust)."""
    with _open(path) as f:
        text = _decode_utf8(f.read(), path).lstrip("\ufeff")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected a JSON array of records or JSON lines") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: a JSON {type(data).__name__}; expected an array of records or JSON lines")
    return data


def _json_rows(path: str) -> list[tuple[str, Any]]:
    """(origin, row) per record: a JSON array's parsed rows, or a JSON-lines file's raw lines (bytes, decoded and
    parsed per record by _json_row, so one bad line rejects that line only)."""
    name = _name(path)
    with _open(path) as f:
        data = f.read()
    if data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return [(f"{name}[{i}]", row) for i, row in enumerate(_parse_json_array(path))]
    return [(f"{name}:{n}", line) for n, line in enumerate(data.split(b"\n"), start=1) if line.strip()]


def _tar_keys(path: str) -> list[tuple[str, tuple]]:
    """(key, ((extension, offset, size), ...)) per sample of an uncompressed tar, in order of first appearance."""
    keys: dict[str, list] = {}
    with _open(path) as f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            raise ValueError(f"{path}: not an uncompressed tar ({e}); img2dataset writes plain .tar shards "
                             "(decompress a .tar.gz first)") from e
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
    import pyarrow as pa
    names = list(schema.names)
    if "messages" in names:
        return "messages", ()
    if "conversations" in names:
        return "llava", ()
    if all(n in names and (pa.types.is_list(schema.field(n).type) or pa.types.is_large_list(schema.field(n).type))
           for n in OBELICS_FIELDS):
        return "obelics", ()
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
        if opts.format in JSON_FORMATS:
            rows = _json_rows(path)
            chunks += [JsonChunk(path, tuple(rows[i:i + CHUNK_RECORDS])) for i in range(0, len(rows), CHUNK_RECORDS)]
        elif opts.format == "webdataset":
            keys = _tar_keys(path)
            chunks += [TarChunk(path, tuple(keys[i:i + CHUNK_RECORDS])) for i in range(0, len(keys), CHUNK_RECORDS)]
        else:
            import pyarrow.parquet as pq
            with _open(path) as f:
                try:
                    meta = pq.ParquetFile(f).metadata
                except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a file that is not Parquet
                    raise ValueError(f"{path}: not a Parquet file ({e})") from e
            mode, columns = _parquet_layout(path, meta.schema.to_arrow_schema(), opts)
            first = 0
            for rg in range(meta.num_row_groups):
                n = meta.row_group(rg).num_rows
                if n:
                    chunks.append(ParquetChunk(path, rg, first, n, mode, columns))
                first += n
    return chunks


# ----------------------------------------------------------------------------------------------
# Reading: chunk -> (origin, Item | BadRecordError)

def read_chunk(chunk, opts: ImportOptions) -> Iterator[tuple[str, Item | BadRecordError]]:
    """Every input record of a chunk, in order: (origin, Item) or (origin, the error that rejects it)."""
    root = opts.media_root
    base = (root.rstrip("/") if paths.is_remote(root) else os.path.abspath(os.path.expanduser(root))) if root \
        else _folder(chunk.path)
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
    name = _name(chunk.path)
    if isinstance(chunk, JsonChunk):
        for origin, raw in chunk.rows:
            yield origin, (lambda raw=raw: _json_row(raw))
    elif isinstance(chunk, TarChunk):
        with _open(chunk.path) as f:
            for key, members in chunk.keys:
                yield f"{name}/{key}", (lambda members=members: _tar_row(f, members))
    else:
        rows, error = None, None
        try:
            import pyarrow.parquet as pq
            with _open(chunk.path) as f:
                rows = pq.ParquetFile(f).read_row_group(chunk.row_group).to_pylist()
        except Exception as e:  # a damaged row group rejects its rows, not the run
            error = BadRecordError("unreadable_file", f"row group {chunk.row_group}: {e}")
        for i in range(chunk.num_rows):
            yield f"{name}:{chunk.first_row + i}", (lambda i=i: _raise(error) if error else rows[i])


def _raise(error):
    raise error


def _json_row(raw):
    """A JSON line (bytes) -> its value; BadRecordError "bad_encoding" (not UTF-8) or "bad_json"."""
    if not isinstance(raw, bytes):
        return raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecordError("bad_encoding", f"not UTF-8 at column {e.start + 1} (byte 0x{raw[e.start]:02x}); "
                                             "JSON lines must be UTF-8") from e
    try:
        return json.loads(text.lstrip("\ufeff"))
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
    if fmt in ("obelics", "mmc4"):
        entry, images, dropped = (from_obelics if fmt == "obelics" else from_mmc4)(row, base, opts)
        return Item(origin, sources.validate_entry(entry), tuple(images), None, tuple(dropped))
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
    return Item(origin, sources.validate_entry(entry), tuple(_bucket_bytes(r) for r in images), video)


def read_media(ref: bytes | str) -> bytes:
    """A media reference's bytes: the bytes themselves, or the file's (local or in a bucket); BadRecordError
    "missing_file" / "unreadable_file"."""
    if isinstance(ref, bytes):
        return ref
    try:
        with _open(ref) as f:
            return f.read()
    except FileNotFoundError as e:
        raise BadRecordError("missing_file", f"{ref} does not exist") from e
    except OSError as e:
        raise BadRecordError("unreadable_file", f"{ref}: {e}") from e


def _bucket_bytes(ref: bytes | str) -> bytes | str:
    """An image in a bucket, read now (the record embeds its bytes; prepare reads local paths itself)."""
    return read_media(ref) if isinstance(ref, str) and paths.is_remote(ref) else ref


def _join(base: str, path: str) -> str:
    if paths.is_remote(path):
        return path
    if paths.is_remote(base) and not os.path.isabs(path):
        return posixpath.join(base, posixpath.normpath(path))
    return os.path.normpath(os.path.join(base, path))


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
    elif "://" in value and not paths.is_remote(value):
        raise BadRecordError("remote_media", f"{what} {value!r} is a URL; download the media and give paths")
    return _join(base, os.path.expanduser(value))


def _video_ref(value: Any, base: str) -> str:
    ref = media_ref(value, base, "video")
    if isinstance(ref, bytes):
        raise BadRecordError("bad_schema", "a video must be a file path (records reference videos by path)")
    if paths.is_remote(ref):
        raise BadRecordError("unsupported", f"video {ref} is in a bucket: records reference videos by a local path "
                                            "(decoded at training time); copy the videos to a local disk")
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


def _document_images(values: Sequence, base: str, opts: ImportOptions) -> tuple[list, list[str]]:
    """The images of an interleaved document -> (per image its checked bytes, or None where it is dropped;
    the reasons of the dropped ones). An image is usable when it is not a URL, its file can be read and it
    decodes (media.load_image); otherwise, per opts.missing_images, it is dropped or it rejects the document."""
    out, dropped = [], []
    for k, value in enumerate(values):
        try:
            data = read_media(media_ref(value, base))
            try:
                sources.load_image_bytes(data)
            except media.BadMediaError as e:
                raise BadRecordError(f"image_{e.reason}", str(e)) from e
        except BadRecordError as e:
            if opts.missing_images == "reject":
                raise BadRecordError(e.reason, f"image {k}: {e.message} (--missing_images=drop keeps the "
                                               "document without it)") from e
            out.append(None)
            dropped.append(e.reason)
        else:
            out.append(data)
    return out, dropped


def _interleaved(text: str, images: list, dropped: list[str]) -> tuple[dict, list, list[str]]:
    """An interleaved entry: a document left with no image or no text is rejected."""
    if not images:
        raise BadRecordError("no_images", f"no usable image left ({len(dropped)} dropped: "
                                          f"{', '.join(sorted(set(dropped))) or 'none listed'})")
    if not text.replace(sources.IMAGE_MARKER, "").strip():
        raise BadRecordError("no_text", f"a document of {len(images)} image(s) and no text")
    return {"type": "interleaved", "images": [f"<image {i}>" for i in range(len(images))], "text": text}, images, \
        dropped


def from_obelics(row: dict, base: str, opts: ImportOptions) -> tuple[dict, list, list[str]]:
    """OBELICS / MINT-1T rows: parallel "texts" / "images" lists with exactly one of the two set per position;
    images in place, adjacent texts joined by a blank line."""
    _check_fields(row, OBELICS_FIELDS + OBELICS_METADATA, opts)
    texts, images = row.get("texts"), row.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        lengths = [len(v) if isinstance(v, list) else type(v).__name__ for v in (texts, images)]
        raise BadRecordError("bad_schema", f"'texts' and 'images' must be lists of one length; got {lengths}")
    for i, (t, im) in enumerate(zip(texts, images)):
        if (t is None) == (im is None) or not (t is None or isinstance(t, str)):
            raise BadRecordError("bad_schema", f"position {i}: exactly one of texts[{i}] (a string) / images[{i}] "
                                               f"must be set; got {t!r:.40} / {im!r:.40}")
    found, dropped = _document_images([im for im in images if im is not None], base, opts)
    pieces, kept, k, previous = [], [], 0, None
    for t in texts:
        if t is None:
            if found[k] is not None:
                pieces.append(sources.IMAGE_MARKER)
                kept.append(found[k])
                previous = "image"
            k += 1
        else:
            pieces.append(("\n\n" if previous == "text" else "") + t)
            previous = "text"
    return _interleaved("".join(pieces), kept, dropped)


def from_mmc4(row: dict, base: str, opts: ImportOptions) -> tuple[dict, list, list[str]]:
    """An mmc4 document: each image before the sentence at its matched_text_index (in image_info order), the
    sentences joined by spaces. An image is media_root/image_name, or its "image_base64" where given."""
    _check_fields(row, MMC4_FIELDS + MMC4_METADATA, opts)
    sentences, infos = row.get("text_list"), row.get("image_info")
    if not isinstance(sentences, list) or not all(isinstance(t, str) for t in sentences) or \
            not isinstance(infos, list):
        raise BadRecordError("bad_schema", "'text_list' must be a list of strings and 'image_info' a list")
    refs, at = [], []
    for k, info in enumerate(infos):
        info = _object(info, f"image_info[{k}]", MMC4_IMAGE_FIELDS + MMC4_IMAGE_METADATA, opts)
        j = info.get("matched_text_index")
        if not isinstance(j, int) or isinstance(j, bool) or not 0 <= j < len(sentences):
            raise BadRecordError("bad_schema", f"image_info[{k}]: matched_text_index {j!r} is not an index into "
                                               f"the {len(sentences)} sentences of text_list")
        if isinstance(info.get("image_base64"), str):
            refs.append("data:image;base64," + info["image_base64"])
        elif isinstance(info.get("image_name"), str) and info["image_name"]:
            refs.append(info["image_name"])
        else:
            raise BadRecordError("bad_schema", f"image_info[{k}] needs an 'image_name' (a file under --media_root)")
        at.append(j)
    found, dropped = _document_images(refs, base, opts)
    before: dict[int, list] = {}
    for j, data in zip(at, found):
        if data is not None:
            before.setdefault(j, []).append(data)
    text = " ".join(sources.IMAGE_MARKER * len(before.get(j, ())) + t for j, t in enumerate(sentences))
    return _interleaved(text, [d for j in range(len(sentences)) for d in before.get(j, ())], dropped)


def from_manifest(row: dict, base: str, opts: ImportOptions) -> tuple[dict, list, str | None]:
    _check_fields(row, sources.MANIFEST_FIELDS, opts)
    entry = sources.validate_entry(row)
    video = _video_ref(entry["video"], base) if entry["video"] is not None else None
    return entry, [media_ref(p, base) for p in entry["images"]], video
