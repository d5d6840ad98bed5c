"""Corpus -> ArrayRecord dataset: import (importers.py), check every record as training would, write the splits.

    prepare(inputs, out_dir, opts=ImportOptions("llava"), target=Target(model_cfg, data_cfg), heldout=2)

Each input record is read (importers.read_chunk), its media read and embedded (images) or referenced (videos),
encoded (sources.encode_record) and then decoded, preprocessed and tokenized exactly as the training pipeline
does (sources.record_media / record_sample with the target's tokenizer, pixel budgets and video sampling, then
packing.prepare_sample), so whatever training would skip is rejected here, counted per reason with the first
example, and no accepted record is skipped later. Rejection reasons: those of the importers (bad_json,
bad_schema, unknown_field, placeholder_mismatch, remote_media, unsupported, unreadable_file), missing_file,
image_<r> / video_<r> (r a media.BAD_MEDIA_REASONS entry: corrupt, truncated, aspect_ratio, ...),
box_outside_image, bad_record, and the packer's budget-free drops (no_target, invalid_sample). Records that fit
only other row budgets (packing's too_many_patches, too_many_tokens..., text_tail truncation at the target's
seq_len / max_patches) are written and counted under "over_budget".

Output (OUT, a local folder or gs://BUCKET/PATH):
    train/data-SSSSS-of-NNNNN.array_record    the training split in num_shards shards
    heldout/data-00000-of-00001.array_record  with heldout=N: N records spread evenly over the input
    summary.json                              settings, counts, rejections with examples, token / pixel stats
    summary.png                               histograms: tokens per sample, pixels per image (source, trained)
so the source "arrayrecord:OUT" (sources.split_pattern) reads train/ for training and heldout/ for evaluation.

Where each record goes depends only on the input, never on how the work is spread (`split_chunk`): the input is
cut into chunks (importers.scan, in input order); chunk c's train records go to train shard c % num_shards; the
held-out candidates are the input positions `heldout_positions(total, N)` (the middle of N equal stretches), a
rejected candidate passes its place to the next accepted record of its chunk, and places still owed at the end
of a chunk go to its newest train records (so a place is lost only when a chunk has fewer accepted records than
candidates). Chunk by chunk, the rule is the same for the local processes here, for the Beam pipeline
(beam_import.py) and for sharded runs: with shard_index=i, a run imports only the chunks of train shard i
(c % num_shards == i) and writes train shard i, heldout/data-i-of-N and parts/summary-i-of-N.json; the part that
finds all N part summaries writes the merged summary.json / summary.png, so N hosts with shard_index 0..N-1
together write what one run writes (held-out records in N files instead of one).

The work runs in `workers` processes over chunks, train shard by train shard (each in chunk order). Everything is
written under OUT/.incomplete (a part: OUT/.incomplete-i) and moved into place at the end, summary.json last: a
killed import leaves nothing that can be read as data, and is redone from the start by the next run. A run into an
OUT prepared with the same settings and unchanged input files does nothing; with other settings it refuses; with
overwrite=True it imports again and replaces the old dataset once the new one is complete (never mixes the two;
media files are not fingerprinted, so after fixing images use overwrite). On gs:// each shard is written to a local
temporary file (ArrayRecord writes local files) and uploaded when complete: one shard at a time on local disk,
never the dataset; "moved into place" is Cloud Storage's server-side copy.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from qwen2vl_jax.data import importers, media, packing, sources
from qwen2vl_jax.data.pipeline import DataConfig
from qwen2vl_jax.data.sources import BadRecordError
from qwen2vl_jax.data.tokenizer import default_for, load_for, load_tokenizer
from qwen2vl_jax.model.config import ModelConfig
from qwen2vl_jax.train import paths

LAYOUT_VERSION = 3                        # 1: shards directly in OUT, no splits; 2: records dealt one by one
SPLITS = ("train", "heldout")
SUMMARY, HISTOGRAMS, INCOMPLETE, PARTS = "summary.json", "summary.png", ".incomplete", "parts"
OUTPUT_NAMES = SPLITS + (SUMMARY, HISTOGRAMS, INCOMPLETE, PARTS)
ALWAYS_DROPPED = (packing.DROP_EMPTY, packing.DROP_INVALID)   # packing events that no row budget avoids
CHUNKS_IN_FLIGHT = 4                      # per worker: bounds memory while keeping workers busy


@dataclasses.dataclass(frozen=True)
class Target:
    """What records are checked against: the training run's model (vision merge size), data settings (pixel
    budgets, video sampling, row budgets) and tokenizer ("embedded", "qwen2" or a path; "" = the one the
    model was built for)."""
    model: ModelConfig
    data: DataConfig
    tokenizer: str = ""

    def __post_init__(self):
        if not self.tokenizer:
            object.__setattr__(self, "tokenizer", default_for(self.model))


def shard_name(i: int, num_shards: int) -> str:
    return f"data-{i:05d}-of-{num_shards:05d}{sources.SHARD_SUFFIX}"


def part_name(i: int, num_shards: int) -> str:
    return f"summary-{i:05d}-of-{num_shards:05d}.json"


def heldout_positions(total: int, n: int) -> frozenset[int]:
    """n input positions spread evenly over `total` records (the middle of each of n equal stretches)."""
    if n < 0:
        raise ValueError(f"heldout={n} must be >= 0")
    if n >= total:
        raise ValueError(f"heldout={n} leaves no training records: the input has {total} records")
    return frozenset(int((j + 0.5) * total / n) for j in range(n))


def chunk_starts(sizes: Sequence[int]) -> list[int]:
    """The input position of each chunk's first record."""
    return [int(x) for x in np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)[:-1]])] if len(sizes) else []


def split_chunk(accepted: Sequence[bool], start: int, positions: frozenset[int]) -> list[str | None]:
    """The split of each record of one chunk ("train", "heldout", None for a rejected one; module docstring):
    held-out candidates are the input positions in `positions`; a rejected candidate passes its place to the
    next accepted record of the chunk, and places still owed at the chunk's end go to its newest train records."""
    out: list[str | None] = [None] * len(accepted)
    owed = 0
    for k, ok in enumerate(accepted):
        candidate = start + k in positions
        if not ok:
            owed += candidate
        elif candidate or owed:
            owed -= not candidate
            out[k] = "heldout"
        else:
            out[k] = "train"
    for k in reversed(range(len(out))):
        if not owed:
            break
        if out[k] == "train":
            out[k], owed = "heldout", owed - 1
    return out


# ----------------------------------------------------------------------------------------------
# One record: Item -> encoded record + statistics, or a rejection

@dataclasses.dataclass(frozen=True)
class Accepted:
    origin: str
    record: bytes
    type: str
    tokens: int
    patches: int
    pixels: tuple[int, ...]          # width * height of each image as stored
    trained_pixels: tuple[int, ...]  # width * height of each image as training sees it (after smart_resize)
    budget: str | None               # a packing event at the target's row budgets, or None
    dropped_images: tuple[str, ...] = ()     # reasons of the images an interleaved document dropped


@dataclasses.dataclass(frozen=True)
class Rejected:
    origin: str
    reason: str
    message: str


def _read_media_file(path: str) -> bytes:
    if not os.path.isfile(path):
        raise BadRecordError("missing_file", f"{path} does not exist")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadRecordError("unreadable_file", f"{path}: {e}") from e


_IN_MEMORY = re.compile(r"<bytes>: | ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")   # media.load_image on bytes


def build_record(item: importers.Item, target: Target, tokenizer) -> Accepted:
    """Reads, embeds and checks one item as the training pipeline would decode it (module docstring)."""
    data, opts = target.data, target.data.vision_options
    encoded, names = [], []
    for k, ref in enumerate(item.images):
        encoded.append(ref if isinstance(ref, bytes) else _read_media_file(ref))
        names.append(f"image {k + 1} of {len(item.images)} (embedded in the record)" if isinstance(ref, bytes)
                     else ref)
    if item.video is not None:
        if not os.path.isfile(item.video):
            raise BadRecordError("missing_file", f"video {item.video} does not exist")
        if not os.access(item.video, os.R_OK):
            raise BadRecordError("unreadable_file", f"video {item.video} is not readable")
    record = sources.encode_record(item.entry, encoded, item.video, item.origin)
    rec = sources.decode_record(record)       # what training reads back
    images, trained = [], []
    for name, raw in zip(names, rec["images"]):
        try:
            im = sources.load_image_bytes(raw)
            h, w = media.smart_resize(im.height, im.width, media.FACTOR, opts.min_pixels, opts.max_pixels)
        except media.BadMediaError as e:     # decoded from memory: say which image, not "<_io.BytesIO ...>"
            raise BadRecordError(f"image_{e.reason}", f"{name}: {_IN_MEMORY.sub('', str(e)).strip()}") from e
        images.append(im)
        trained.append(h * w)
    video = None
    if rec["video"]:
        try:
            _, video = sources.record_media({"images": [], "video": rec["video"]}, data.video_sampling)
        except media.BadMediaError as e:
            raise BadRecordError(f"video_{e.reason}", str(e)) from e
    try:
        sample = sources.record_sample(rec, images, video, tokenizer, target.model, opts)
    except media.BadMediaError as e:
        raise BadRecordError(f"{'video' if video is not None else 'image'}_{e.reason}", str(e)) from e
    _, event = packing.prepare_sample(sample, data.pack_config(target.model), target.model)
    if event == packing.DROP_INVALID:
        try:
            packing.validate_sample(sample, target.model)
            why = "its vision pads are not laid out as <|vision_start|> + t*h*w/4 pads per item"
        except ValueError as e:
            why = str(e)
        raise BadRecordError(event, f"the packer drops this sample: {why}")
    if event in ALWAYS_DROPPED:
        raise BadRecordError(event, f"the packer drops this sample at any row size ({event})")
    return Accepted(item.origin, record, rec["type"], int(len(sample["input_ids"])),
                    int(len(sample["pixel_values"])), tuple(im.width * im.height for im in images), tuple(trained),
                    event, item.dropped_images)


def process_chunk(chunk, opts: importers.ImportOptions, target: Target, tokenizer) -> list[Accepted | Rejected]:
    """Every input record of a chunk -> Accepted or Rejected, in input order (the per-record work of every path:
    local processes, Beam workers, sharded runs)."""
    out: list[Accepted | Rejected] = []
    for origin, item in importers.read_chunk(chunk, opts):
        if isinstance(item, BadRecordError):
            out.append(Rejected(origin, item.reason, item.message))
            continue
        try:
            out.append(build_record(item, target, tokenizer))
        except BadRecordError as e:
            out.append(Rejected(origin, e.reason, e.message))
        except Exception as e:  # noqa: BLE001 -- one odd file must not end an import of millions (counted)
            out.append(Rejected(origin, f"unexpected_{type(e).__name__}", repr(e)))
    return out


_WORKER: dict[str, Any] = {}      # per process: the import options, target and loaded tokenizer


def _init_worker(opts: importers.ImportOptions, target: Target) -> None:
    _WORKER.update(opts=opts, target=target, tokenizer=load_tokenizer(target.tokenizer))


def _process_in_worker(chunk) -> list[Accepted | Rejected]:
    return process_chunk(chunk, _WORKER["opts"], _WORKER["target"], _WORKER["tokenizer"])


def ordered_map(fn: Callable, tasks: Iterable, workers: int, initializer: Callable, initargs: tuple) -> Iterator:
    """fn over tasks in `workers` spawned processes (in this one for workers <= 1), results in task order,
    at most CHUNKS_IN_FLIGHT tasks per worker submitted ahead. A worker that dies (e.g. killed for memory) ends
    the import with concurrent.futures' BrokenProcessPool instead of a hang."""
    if workers <= 1:
        initializer(*initargs)
        yield from map(fn, tasks)
        return
    # spawn: forking a process that has imported jax can deadlock the child
    with concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer,
                                                initargs) as pool:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= CHUNKS_IN_FLIGHT * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ----------------------------------------------------------------------------------------------
# Statistics: accumulated per chunk, merged in any order (Beam's combiner, sharded runs' parts)

def _counter(d: Mapping) -> collections.Counter:
    return collections.Counter({int(k): int(v) for k, v in d.items()})


@dataclasses.dataclass
class Stats:
    """What summary.json counts. `add` per record, `merge` in any order: the result does not depend on how the
    work was spread (examples are the earliest in input order)."""
    records: int = 0
    written: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    per_type: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=dict)          # reason -> [input position, text]
    over_budget: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    tokens: collections.Counter = dataclasses.field(default_factory=collections.Counter)        # value -> count
    pixels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    trained_pixels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dropped_images: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # reason -> count

    def add(self, position: int, result: Accepted | Rejected, split: str | None) -> None:
        self.records += 1
        if isinstance(result, Rejected):
            self.rejected[result.reason] += 1
            old = self.examples.get(result.reason)
            if old is None or position < old[0]:
                self.examples[result.reason] = [position, f"{result.origin}: {result.message}"[:400]]
            return
        self.written[split] += 1
        self.per_type[result.type] += 1
        self.tokens[result.tokens] += 1
        self.pixels.update(result.pixels)
        self.trained_pixels.update(result.trained_pixels)
        self.dropped_images.update(result.dropped_images)
        if result.budget is not None:
            self.over_budget[result.budget] += 1

    def add_chunk(self, start: int, results: Sequence[Accepted | Rejected], splits: Sequence[str | None]) -> None:
        for k, (r, s) in enumerate(zip(results, splits)):
            self.add(start + k, r, s)

    def merge(self, other: "Stats") -> "Stats":
        self.records += other.records
        for f in ("written", "per_type", "rejected", "over_budget", "tokens", "pixels", "trained_pixels",
                  "dropped_images"):
            getattr(self, f).update(getattr(other, f))
        for reason, ex in other.examples.items():
            if reason not in self.examples or ex[0] < self.examples[reason][0]:
                self.examples[reason] = list(ex)
        return self

    def to_json(self) -> dict:
        return {f.name: dict(getattr(self, f.name)) if f.name != "records" else self.records
                for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, d: Mapping) -> "Stats":
        return cls(d["records"], collections.Counter(d["written"]), collections.Counter(d["per_type"]),
                   collections.Counter(d["rejected"]), {k: list(v) for k, v in d["examples"].items()},
                   collections.Counter(d["over_budget"]), _counter(d["tokens"]), _counter(d["pixels"]),
                   _counter(d["trained_pixels"]), collections.Counter(d.get("dropped_images", {})))

    def summary(self, splits: Sequence[str]) -> dict:
        return {"records": self.records, "written": {s: self.written[s] for s in splits},
                "per_type": dict(sorted(self.per_type.items())), "rejected": dict(sorted(self.rejected.items())),
                "rejected_examples": {k: v[1] for k, v in sorted(self.examples.items())},
                "over_budget": dict(sorted(self.over_budget.items())),
                "dropped_images": dict(sorted(self.dropped_images.items())),
                "tokens_per_sample": describe(self.tokens), "pixels_per_image": describe(self.pixels),
                "trained_pixels_per_image": describe(self.trained_pixels)}


def describe(counts: Mapping[int, int]) -> dict:
    """min / percentiles (numpy's linear interpolation) / mean / max / total of values given as value -> count."""
    counts = {k: v for k, v in counts.items() if v}
    if not counts:
        return {"count": 0}
    values = np.array(sorted(counts), np.float64)
    n_each = np.array([counts[v] for v in sorted(counts)], np.int64)
    n = int(n_each.sum())
    last = np.cumsum(n_each) - 1                      # the rank of each value's last copy

    def at(rank: int) -> float:
        return float(values[np.searchsorted(last, rank)])

    def percentile(q: float) -> float:
        pos = q / 100 * (n - 1)
        lo = int(np.floor(pos))
        a, b = at(lo), at(min(lo + 1, n - 1))
        return a + (b - a) * (pos - lo)

    total = float((values * n_each).sum())
    return {"count": n, "min": int(values[0]), "p50": percentile(50), "mean": round(total / n, 2),
            "p90": percentile(90), "p99": percentile(99), "max": int(values[-1]), "total": int(total)}


def plot_histograms(path: str, stats: Stats, title: str) -> None:
    """tokens per sample and pixels per image (as stored and as trained), log-spaced bins, to a PNG (matplotlib
    Agg; local or gs://)."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    panels = ((axes[0], ((stats.tokens, None),), "tokens per sample"),
              (axes[1], ((stats.pixels, "as stored"), (stats.trained_pixels, "as trained")), "pixels per image"))
    for ax, series, what in panels:
        present = [(c, label) for c, label in series if c]
        if present:
            lo = max(min(min(c) for c, _ in present), 1)
            hi = max(max(max(c) for c, _ in present), 2)
            for c, label in present:
                ax.hist(list(c), bins=np.geomspace(lo, hi * 1.001, 40), weights=list(c.values()), alpha=0.6,
                        label=label)
            ax.set_xscale("log")
            if any(label for _, label in present):
                ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(what)
        ax.set_ylabel("count")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    paths.path(path).write_bytes(buf.getvalue())


# ----------------------------------------------------------------------------------------------
# Writing shards, here or in a bucket

class ShardWriter:
    """One ArrayRecord file at `dest` (a local path or gs://). ArrayRecord writes local files: for gs:// the shard
    is written to a local temporary file and uploaded on close (one shard on local disk, never the dataset)."""

    def __init__(self, dest: str):
        from array_record.python.array_record_module import ArrayRecordWriter
        self.dest, self.count = dest, 0
        if paths.is_remote(dest):
            fd, self._local = tempfile.mkstemp(suffix=sources.SHARD_SUFFIX, prefix="qwen2vl_jax_shard_")
            os.close(fd)
        else:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            self._local = dest
        self._writer = ArrayRecordWriter(self._local, "group_size:1")

    def write(self, record: bytes) -> None:
        self._writer.write(record)
        self.count += 1

    def close(self) -> None:
        self._writer.close()
        if self._local != self.dest:
            try:
                with open(self._local, "rb") as src, paths.path(self.dest).open("wb") as dst:
                    shutil.copyfileobj(src, dst, 8 << 20)
            finally:
                os.remove(self._local)


def write_shard(dest: str, records: Iterable[bytes]) -> int:
    w = ShardWriter(dest)
    try:
        for r in records:
            w.write(r)
    finally:
        w.close()
    return w.count


def layout(num_shards: int, heldout: int, part: int | None) -> dict[str, list[str]]:
    """The shard files (names under OUT) a run writes: every train shard and one held-out file; a part (sharded
    run) its train shard and its held-out file."""
    train = range(num_shards) if part is None else [part]
    out = {"train": [f"train/{shard_name(i, num_shards)}" for i in train]}
    if heldout:
        out["heldout"] = [f"heldout/{shard_name(0, 1)}"] if part is None else \
            [f"heldout/{shard_name(part, num_shards)}"]
    return out


def shard_of(chunk_index: int, split: str, num_shards: int, part: int | None) -> int:
    """Which of layout(...)[split]'s files chunk `chunk_index`'s records of `split` go to."""
    return chunk_index % num_shards if split == "train" and part is None else 0


# ----------------------------------------------------------------------------------------------
# The output folder

def settings_of(files: Sequence[str], opts: importers.ImportOptions, target: Target, heldout: int,
                num_shards: int) -> dict:
    """Everything the output depends on, as JSON: inputs (path, size, mtime), import options, the checks'
    target and the split layout. A re-run with equal settings has nothing to do. (A sharded run's parts have
    the settings of the whole run: shard_index is not among them.)"""
    data = target.data
    return {
        "layout": LAYOUT_VERSION,
        "inputs": [importers.file_identity(f) for f in files],
        "import": dataclasses.asdict(opts) | {"ignore_fields": list(opts.ignore_fields)},
        "tokenizer": target.tokenizer, "model": target.model.name,
        "vision": dataclasses.asdict(data.vision_options),
        "video_sampling": dataclasses.asdict(data.video_sampling),
        "row": {"seq_len": data.seq_len, "max_patches": data.max_patches, "overflow": data.overflow},
        "heldout": heldout, "num_shards": num_shards,
    }


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        if old.get(k) != new.get(k):
            out.append("inputs changed" if k == "inputs" else
                       f"{k}: {json.dumps(old.get(k))[:80]} -> {json.dumps(new.get(k))[:80]}")
    return out


def _old_layout_shards(names: Iterable[str]) -> list[str]:
    return [n for n in names if n.startswith("data-") and n.endswith(sources.SHARD_SUFFIX)]


def incomplete_name(part: int | None) -> str:
    return INCOMPLETE if part is None else f"{INCOMPLETE}-{part:05d}"


def _read_summary(p: str) -> tuple[dict | None, dict | None]:
    """(summary, its settings); (None, None) when absent; (None, {"layout": "unreadable ..."}) when unreadable."""
    if not paths.exists(p):
        return None, None
    try:
        old = paths.read_json(p)
        return old, old.get("settings", {})
    except (OSError, ValueError, AttributeError):
        return None, {"layout": f"unreadable {os.path.basename(p)}"}


def _shards_present(out_dir: str, summary: dict) -> bool:
    return all(paths.exists(paths.join(out_dir, split, name))
               for split, names in summary.get("shards", {}).items() for name in names)


def check_out_dir(out_dir: str, settings: dict, overwrite: bool, part: int | None = None) -> dict | None:
    """The existing summary when OUT already holds this dataset (a part: this part, or the merged dataset) and
    there is nothing to do; None when OUT is new, empty, an unfinished import of ours, or ours and
    overwrite=True (redone: media files are not fingerprinted, so a fixed image needs it); ValueError otherwise."""
    if not paths.exists(out_dir):
        return None
    if not paths.is_dir(out_dir):
        raise ValueError(f"--out {out_dir} is a file, not a folder")
    names = set(paths.listdir(out_dir))
    foreign = sorted(n for n in names - set(OUTPUT_NAMES) - set(_old_layout_shards(names))
                     if not n.startswith(INCOMPLETE))
    if foreign:
        raise ValueError(f"--out {out_dir} holds files that launch.prepare_data did not write ({', '.join(foreign[:5])}"
                         f"{', ...' if len(foreign) > 5 else ''}): choose a new or empty folder")
    candidates = [paths.join(out_dir, SUMMARY)]
    if part is not None:
        candidates.insert(0, paths.join(out_dir, PARTS, part_name(part, settings["num_shards"])))
    for p in candidates:
        old, old_settings = _read_summary(p)
        if old_settings is None:
            continue
        if not overwrite and old is not None and old_settings == settings and _shards_present(out_dir, old):
            return old
        if overwrite:
            return None
        diff = _differences(old_settings, settings) or ["shards missing"]
        raise ValueError(f"--out {out_dir} holds a dataset prepared with other settings ({'; '.join(diff)}): pass "
                         "--overwrite to replace it, or choose another --out")
    return None            # empty, or an import killed before it finished: redone from the start


def _remove(p: str) -> None:
    if not paths.exists(p):
        return
    if paths.is_dir(p):
        if paths.is_remote(p):
            paths.path(p).rmtree()
        else:
            shutil.rmtree(p)
    else:
        paths.path(p).unlink()


def _move(src: str, dst: str) -> None:
    _remove(dst)
    paths.makedirs(paths.parent(dst))
    paths.rename(src, dst)


def _finalize(out_dir: str, tmp: str, written: Sequence[str], summary: dict, part: int | None) -> None:
    """Moves the finished files (names under tmp) into out_dir, summary.json last. The whole run replaces ours
    (summary.json first out); a part replaces its own files and what another layout left (summary.json and
    summary.png first out), writes its part summary and, when it is the last part, the merged summary."""
    n = summary["settings"]["num_shards"]
    _remove(paths.join(out_dir, SUMMARY))
    if part is None:
        for name in SPLITS + (PARTS, HISTOGRAMS):
            _remove(paths.join(out_dir, name))
        for name in _old_layout_shards(paths.listdir(out_dir)):
            _remove(paths.join(out_dir, name))
    else:
        _remove(paths.join(out_dir, HISTOGRAMS))
        for folder in SPLITS + (PARTS,):       # files of another shard count (an earlier layout)
            for name in paths.listdir(paths.join(out_dir, folder)):
                if not name.endswith(f"-of-{n:05d}{sources.SHARD_SUFFIX}") and not name.endswith(f"-of-{n:05d}.json"):
                    _remove(paths.join(out_dir, folder, name))
    for name in written:
        _move(paths.join(tmp, name), paths.join(out_dir, name))
    if part is None:
        paths.write_json(paths.join(out_dir, SUMMARY), summary, indent=2)
    else:
        paths.write_json(paths.join(out_dir, PARTS, part_name(part, n)), summary, indent=2)
    _remove(tmp)


def merge_parts(out_dir: str, settings: dict) -> dict | None:
    """When all num_shards parts of a sharded run are in out_dir (with these settings): the merged summary,
    written with its histograms as summary.json / summary.png (any part may do it; the result is the same).
    None while parts are missing. ValueError when the parts together hold no training record."""
    n = settings["num_shards"]
    parts = []
    for i in range(n):
        old, old_settings = _read_summary(paths.join(out_dir, PARTS, part_name(i, n)))
        if old is None or old_settings != settings:
            return None
        parts.append(old)
    stats = Stats()
    for s in parts:
        stats.merge(Stats.from_json(s["stats"]))
    shards = {split: sorted(name for s in parts for name in s["shards"].get(split, []))
              for split in parts[0]["shards"]}
    summary = _summary(settings, parts[0]["format"], parts[0]["inputs"], stats, shards,
                       sum(s["workers"] for s in parts), max(s["seconds"] for s in parts))
    _check_some_training(stats)
    plot_histograms(paths.join(out_dir, HISTOGRAMS), stats, _title(out_dir, stats, settings["tokenizer"]))
    paths.write_json(paths.join(out_dir, SUMMARY), summary, indent=2)
    return summary


def _summary(settings: dict, fmt: str, files: Sequence[str], stats: Stats, shards: dict, workers: int,
             seconds: float) -> dict:
    return {"settings": settings, "format": fmt, "inputs": list(files), **stats.summary(list(shards)),
            "shards": shards, "workers": workers, "seconds": round(seconds, 3),
            "records_per_second": round(stats.records / max(seconds, 1e-9), 2)}


def _title(out_dir: str, stats: Stats, tokenizer: str) -> str:
    return (f"{os.path.basename(os.path.normpath(out_dir))}: {sum(stats.tokens.values())} samples, "
            f"{sum(stats.pixels.values())} images (tokenizer {tokenizer})")


def _check_some_training(stats: Stats) -> None:
    if stats.written["train"]:
        return
    ex = {k: v[1] for k, v in stats.examples.items()}
    why = "; ".join(f"{k} {v} (e.g. {ex[k]})" for k, v in sorted(stats.rejected.items(), key=lambda kv: -kv[1]))
    raise ValueError(f"no usable training record in {stats.records} input records: "
                     + (why if stats.rejected else f"all {stats.written['heldout']} went to the held-out split"))


def finish(out_dir: str, tmp: str, settings: dict, fmt: str, files: Sequence[str], stats: Stats,
           shard_files: dict[str, list[str]], workers: int, seconds: float, part: int | None) -> dict:
    """The end of every path (local, Beam, a part): the summary, its histograms, the files moved into place."""
    shards = {split: [os.path.basename(n) for n in names] for split, names in shard_files.items()}
    summary = _summary(settings, fmt, files, stats, shards, workers, seconds)
    if part is None:
        try:
            _check_some_training(stats)
        except ValueError:
            _remove(tmp)
            raise
        plot_histograms(paths.join(tmp, HISTOGRAMS), stats, _title(out_dir, stats, settings["tokenizer"]))
        _finalize(out_dir, tmp, [n for names in shard_files.values() for n in names] + [HISTOGRAMS], summary, None)
        return summary
    summary |= {"part": part, "stats": stats.to_json()}
    _finalize(out_dir, tmp, [n for names in shard_files.values() for n in names], summary, part)
    merged = merge_parts(out_dir, settings)
    return summary | {"merged": merged is not None}


def plan(files: Sequence[str], opts: importers.ImportOptions, heldout: int) -> tuple[list, list[int], frozenset]:
    """(chunks, the input position of each chunk's first record, held-out candidate positions)."""
    chunks = importers.scan(files, opts)
    total = sum(len(c) for c in chunks)
    if total == 0:
        raise ValueError(f"the inputs hold no records: {[os.path.basename(f) for f in files][:5]}")
    return chunks, chunk_starts([len(c) for c in chunks]), (heldout_positions(total, heldout) if heldout
                                                             else frozenset())


def check_arguments(num_shards: int, shard_index: int | None) -> None:
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards} must be >= 1")
    if shard_index is not None and not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index={shard_index} must be in [0, num_shards={num_shards})")


def begin(inputs: str | Sequence[str], out_dir: str, opts: importers.ImportOptions, target: Target, heldout: int,
          num_shards: int, shard_index: int | None, overwrite: bool) -> tuple[list[str], dict, dict | None]:
    """The start of every path (local, Beam, a part): (input files, settings, the existing summary when OUT
    already holds this dataset, else None). Arguments, inputs, tokenizer and OUT are checked before any work."""
    check_arguments(num_shards, shard_index)
    files = importers.resolve_inputs(inputs, opts.format) if isinstance(inputs, str) else list(inputs)
    load_for(target.tokenizer, target.model)      # a tokenizer the model cannot read: one line, before any work
    settings = settings_of(files, opts, target, heldout, num_shards)
    return files, settings, check_out_dir(out_dir, settings, overwrite, shard_index)


def fresh_tmp(out_dir: str, part: int | None) -> str:
    """OUT/.incomplete (a part: OUT/.incomplete-i), emptied of what a killed run left."""
    tmp = paths.join(out_dir, incomplete_name(part))
    _remove(tmp)
    return tmp


# ----------------------------------------------------------------------------------------------
# The whole import (this machine's processes)

def prepare(inputs: str | Sequence[str], out_dir: str, *, opts: importers.ImportOptions, target: Target,
            heldout: int = 0, num_shards: int = 1, shard_index: int | None = None, workers: int = 1,
            overwrite: bool = False, progress: bool = True, stream=None) -> dict:
    """Imports `inputs` (an --input string: file, glob or folder; or a list of files) into out_dir (module
    docstring; shard_index: only that part of a sharded run) and returns the summary (also OUT/summary.json; a
    part's: OUT/parts/summary-i-of-N.json); summary["up_to_date"] is True when OUT already held this. ValueError
    for unusable arguments or inputs, and when no record could be imported."""
    stream = stream or sys.stderr
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0 (0: one per core)")
    workers = workers or available_cores()
    files, settings, existing = begin(inputs, out_dir, opts, target, heldout, num_shards, shard_index, overwrite)
    if existing is not None:
        return existing | {"up_to_date": True}
    t0 = time.time()
    chunks, starts, positions = plan(files, opts, heldout)
    mine = [c for c in range(len(chunks)) if shard_index is None or c % num_shards == shard_index]
    workers = max(1, min(workers, len(mine)))      # a worker per chunk at most: starting one costs seconds
    tmp = fresh_tmp(out_dir, shard_index)
    shard_files = layout(num_shards, heldout, shard_index)
    # Chunks in train-shard order: each train shard is written start to end and closed (for gs://: uploaded)
    # before the next opens, so local disk holds one shard, never the dataset; the held-out records (a few) wait
    # in memory and are written at the end. Each file holds its chunks in chunk order, as in input order.
    mine.sort(key=lambda c: (shard_of(c, "train", num_shards, shard_index), c))
    last = {shard_of(c, "train", num_shards, shard_index): c for c in mine}      # train shard -> its last chunk
    held: list[tuple[int, bytes]] = []
    writer = None
    stats = Stats()
    bar = _progress_bar(sum(len(chunks[c]) for c in mine), progress, stream)
    try:
        results_iter = ordered_map(_process_in_worker, (chunks[c] for c in mine), workers, _init_worker,
                                   (opts, target))
        for c, results in zip(mine, results_iter):
            splits = split_chunk([isinstance(r, Accepted) for r in results], starts[c], positions)
            stats.add_chunk(starts[c], results, splits)
            shard = shard_of(c, "train", num_shards, shard_index)
            writer = writer or ShardWriter(paths.join(tmp, shard_files["train"][shard]))
            for r, split in zip(results, splits):
                if split == "train":
                    writer.write(r.record)
                elif split == "heldout":
                    held.append((c, r.record))
            if c == last[shard]:
                writer.close()
                writer = None
            if bar is not None:
                bar.update(len(results))
                bar.set_postfix(written=sum(stats.written.values()), rejected=sum(stats.rejected.values()),
                                refresh=False)
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    for shard, name in enumerate(shard_files["train"]):
        if shard not in last:                      # more shards than chunks: an empty file
            write_shard(paths.join(tmp, name), [])
    if "heldout" in shard_files:
        write_shard(paths.join(tmp, shard_files["heldout"][0]), [r for _, r in sorted(held, key=lambda x: x[0])])
    summary = finish(out_dir, tmp, settings, opts.format, files, stats, shard_files, workers, time.time() - t0,
                     shard_index)
    return summary | {"up_to_date": False}


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _progress_bar(total: int, enabled: bool, stream):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="rec", file=stream, dynamic_ncols=True, mininterval=0.5)


def format_summary(summary: dict, out_dir: str) -> str:
    """The console report of a summary (counts, rejections with an example each, statistics, files)."""
    w = summary["written"]
    types = ", ".join(f"{k} {v}" for k, v in summary["per_type"].items())
    lines = []
    n = summary["settings"]["num_shards"]
    part = f"part {summary['part']} of {n} (train shard {summary['part']}): " if "part" in summary else ""
    if summary.get("up_to_date"):
        lines.append(f"{out_dir} is up to date (same inputs and settings); nothing to do (--overwrite redoes it)")
    lines.append(f"{part}wrote {sum(w.values())} records ({', '.join(f'{s} {n}' for s, n in w.items())}; {types}) "
                 f"from {summary['records']} input records of {len(summary['inputs'])} {summary['format']} file(s) "
                 f"in {summary['seconds']:.1f} s ({summary['records_per_second']:.1f} records/s, "
                 f"{summary['workers']} workers)")
    asked = summary["settings"]["heldout"]
    if asked and not part and w.get("heldout", 0) < asked:
        lines.append(f"held-out split: {w.get('heldout', 0)} of the {asked} records asked for (chunks with fewer "
                     "accepted records than held-out candidates)")
    n_rej = sum(summary["rejected"].values())
    lines.append(f"rejected {n_rej}" + (":" if n_rej else ""))
    for reason, k in sorted(summary["rejected"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {reason}: {k}  (e.g. {summary['rejected_examples'][reason]})")
    if summary.get("dropped_images"):
        lines.append("images dropped from written documents (--missing_images=drop): "
                     + ", ".join(f"{k} {v}" for k, v in summary["dropped_images"].items()))
    row = summary["settings"]["row"]
    if summary["over_budget"]:
        lines.append(f"over the row budget of {row['seq_len']} tokens / {row['max_patches']} patches (written; "
                     f"training at this row size drops or truncates them): "
                     + ", ".join(f"{k} {v}" for k, v in summary["over_budget"].items()))
    t, p, q = summary["tokens_per_sample"], summary["pixels_per_image"], summary["trained_pixels_per_image"]
    if t["count"]:
        lines.append(f"tokens per sample ({summary['settings']['tokenizer']} tokenizer): min {t['min']}, median "
                     f"{t['p50']:.0f}, mean {t['mean']:.1f}, p99 {t['p99']:.0f}, max {t['max']}, total {t['total']}")
    if p["count"]:
        v = summary["settings"]["vision"]
        lines.append(f"pixels per image ({p['count']} images) as stored: min {p['min']}, median {p['p50']:.0f}, "
                     f"p99 {p['p99']:.0f}, max {p['max']}; as trained (resized into [{v['min_pixels']}, "
                     f"{v['max_pixels']}]): min {q['min']}, median {q['p50']:.0f}, p99 {q['p99']:.0f}, max {q['max']}")
    if part:
        lines.append(f"part summary: {paths.join(out_dir, PARTS, part_name(summary['part'], n))}"
                     + ("; all parts are in: merged summary.json written" if summary.get("merged") else
                        "; summary.json is written by the last part to finish"))
    else:
        lines.append(f"summary: {paths.join(out_dir, SUMMARY)}, histograms: {paths.join(out_dir, HISTOGRAMS)}")
    return "\n".join(lines)
