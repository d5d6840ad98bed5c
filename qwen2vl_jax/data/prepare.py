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

Output (OUT):
    train/data-SSSSS-of-NNNNN.array_record    the training split, records dealt round-robin over num_shards
    heldout/data-00000-of-00001.array_record  with heldout=N: N records spread evenly over the input
    summary.json                              settings, counts, rejections with examples, token / pixel stats
    summary.png                               histograms: tokens per sample, pixels per image
so the source "arrayrecord:OUT" (sources.split_pattern) reads train/ for training and heldout/ for evaluation.
The work runs in `workers` processes over chunks of input records, in input order (the output does not depend
on the worker count). Everything is written under OUT/.incomplete and moved into place at the end, summary.json
last: a killed import leaves nothing that can be read as data, and is redone from the start by the next run. A
run into an OUT prepared with the same settings and unchanged input files does nothing; with other settings it
refuses; with overwrite=True it imports again and replaces the old dataset once the new one is complete (never
mixes the two; media files are not fingerprinted, so after fixing images use overwrite).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from qwen2vl_jax.data import importers, media, packing, sources
from qwen2vl_jax.data.pipeline import DataConfig
from qwen2vl_jax.data.sources import BadRecordError
from qwen2vl_jax.data.tokenizer import default_for, load_for, load_tokenizer
from qwen2vl_jax.model.config import ModelConfig

LAYOUT_VERSION = 2                        # 1: shards directly in OUT, no splits
SPLITS = ("train", "heldout")
SUMMARY, HISTOGRAMS, INCOMPLETE = "summary.json", "summary.png", ".incomplete"
OUTPUT_NAMES = SPLITS + (SUMMARY, HISTOGRAMS, INCOMPLETE)
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


def shard_paths(folder: str, num_shards: int) -> list[str]:
    return [os.path.join(folder, f"data-{i:05d}-of-{num_shards:05d}.array_record") for i in range(num_shards)]


def heldout_positions(total: int, n: int) -> set[int]:
    """n input positions spread evenly over `total` records (the middle of each of n equal stretches)."""
    if n < 0:
        raise ValueError(f"heldout={n} must be >= 0")
    if n >= total:
        raise ValueError(f"heldout={n} leaves no training records: the input has {total} records")
    return {int((j + 0.5) * total / n) for j in range(n)}


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


def build_record(item: importers.Item, target: Target, tokenizer) -> Accepted:
    """Reads, embeds and checks one item as the training pipeline would decode it (module docstring)."""
    data, opts = target.data, target.data.vision_options
    encoded, names = [], []
    for ref in item.images:
        encoded.append(ref if isinstance(ref, bytes) else _read_media_file(ref))
        names.append("embedded image" if isinstance(ref, bytes) else ref)
    if item.video is not None:
        if not os.path.isfile(item.video):
            raise BadRecordError("missing_file", f"video {item.video} does not exist")
        if not os.access(item.video, os.R_OK):
            raise BadRecordError("unreadable_file", f"video {item.video} is not readable")
    record = sources.encode_record(item.entry, encoded, item.video, item.origin)
    rec = sources.decode_record(record)       # what training reads back
    images = []
    for name, raw in zip(names, rec["images"]):
        try:
            im = sources.load_image_bytes(raw)
            media.smart_resize(im.height, im.width, media.FACTOR, opts.min_pixels, opts.max_pixels)
        except media.BadMediaError as e:
            raise BadRecordError(f"image_{e.reason}", f"{name}: {e}") from e
        images.append(im)
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
                    int(len(sample["pixel_values"])), tuple(im.width * im.height for im in images), event,
                    item.dropped_images)


_WORKER: dict[str, Any] = {}      # per process: the import options, target and loaded tokenizer


def _init_worker(opts: importers.ImportOptions, target: Target) -> None:
    _WORKER.update(opts=opts, target=target, tokenizer=load_tokenizer(target.tokenizer))


def process_chunk(chunk) -> list[Accepted | Rejected]:
    """Every input record of a chunk -> Accepted or Rejected (in a worker set up by _init_worker)."""
    opts, target, tokenizer = _WORKER["opts"], _WORKER["target"], _WORKER["tokenizer"]
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


class SplitWriter:
    """Deals records, in input order, to the held-out split (the records at `positions` of the input) and
    round-robin to the train shards. A rejected held-out candidate passes its place to the next accepted record;
    the last LOOKBEHIND train-bound records are held back so that places still owed at the end go to them."""
    LOOKBEHIND = 64

    def __init__(self, writers: dict[str, list], positions: set[int]):
        self._writers, self._positions = writers, positions
        self._index = self._owed = 0
        self._held: collections.deque = collections.deque()
        self.written: collections.Counter = collections.Counter()

    def _write(self, split: str, record: bytes) -> None:
        shards = self._writers[split]
        shards[self.written[split] % len(shards)].write(record)
        self.written[split] += 1

    def reject(self) -> None:
        self._owed += self._index in self._positions
        self._index += 1

    def add(self, record: bytes) -> None:
        candidate = self._index in self._positions
        self._index += 1
        if candidate or self._owed:
            self._owed -= not candidate
            self._write("heldout", record)
            return
        self._held.append(record)
        if len(self._held) > self.LOOKBEHIND:
            self._write("train", self._held.popleft())

    def close(self) -> None:
        """Pays owed held-out places with the newest held-back records, writes the rest, closes the shards."""
        late = []
        while self._owed and self._held:
            late.append(self._held.pop())
            self._owed -= 1
        for record in reversed(late):
            self._write("heldout", record)
        while self._held:
            self._write("train", self._held.popleft())
        for shards in self._writers.values():
            for w in shards:
                w.close()


# ----------------------------------------------------------------------------------------------
# The output folder

def settings_of(files: Sequence[str], opts: importers.ImportOptions, target: Target, heldout: int,
                num_shards: int) -> dict:
    """Everything the output depends on, as JSON: inputs (path, size, mtime), import options, the checks'
    target and the split layout. A re-run with equal settings has nothing to do."""
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


def _old_layout_shards(out_dir: str) -> list[str]:
    return [n for n in os.listdir(out_dir) if n.startswith("data-") and n.endswith(sources.SHARD_SUFFIX)]


def check_out_dir(out_dir: str, settings: dict, overwrite: bool) -> dict | None:
    """The existing summary when OUT already holds this dataset (nothing to do); None when OUT is new, empty, an
    unfinished import of ours, or ours and overwrite=True (redone: media files are not fingerprinted, so a fixed
    image needs it); ValueError otherwise."""
    if not os.path.isdir(out_dir):
        if os.path.exists(out_dir):
            raise ValueError(f"--out {out_dir} is a file, not a folder")
        return None
    names = set(os.listdir(out_dir))
    foreign = sorted(names - set(OUTPUT_NAMES) - set(_old_layout_shards(out_dir)))
    if foreign:
        raise ValueError(f"--out {out_dir} holds files that launch.prepare_data did not write ({', '.join(foreign[:5])}"
                         f"{', ...' if len(foreign) > 5 else ''}): choose a new or empty folder")
    if SUMMARY not in names:
        return None            # empty, or an import killed before it finished: redone from the start
    try:
        with open(os.path.join(out_dir, SUMMARY)) as f:
            old = json.load(f)
        old_settings = old.get("settings", {})
    except (OSError, ValueError, AttributeError):
        old, old_settings = None, {"layout": "unreadable summary.json"}
    if not overwrite and old is not None and old_settings == settings and all(
            os.path.isfile(os.path.join(out_dir, split, name))
            for split, names_ in old.get("shards", {}).items() for name in names_):
        return old
    if overwrite:
        return None
    diff = _differences(old_settings, settings) or ["shards missing"]
    raise ValueError(f"--out {out_dir} holds a dataset prepared with other settings ({'; '.join(diff)}): pass "
                     "--overwrite to replace it, or choose another --out")


def _finalize(out_dir: str, tmp: str, summary: dict) -> None:
    """Moves the finished dataset from tmp into out_dir, replacing ours (summary.json first out, last in)."""
    for name in (SUMMARY,) + SPLITS + (HISTOGRAMS,):
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    for name in _old_layout_shards(out_dir):
        os.remove(os.path.join(out_dir, name))
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    with open(os.path.join(tmp, SUMMARY), "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(os.path.join(tmp, SUMMARY), os.path.join(out_dir, SUMMARY))
    os.rmdir(tmp)


# ----------------------------------------------------------------------------------------------
# Statistics

def describe(values: Sequence[float]) -> dict:
    if not len(values):
        return {"count": 0}
    v = np.asarray(values, np.float64)
    q = np.percentile(v, [50, 90, 99])
    return {"count": int(v.size), "min": int(v.min()), "p50": float(q[0]), "mean": round(float(v.mean()), 2),
            "p90": float(q[1]), "p99": float(q[2]), "max": int(v.max()), "total": int(v.sum())}


def plot_histograms(path: str, tokens: Sequence[int], pixels: Sequence[int], title: str) -> None:
    """tokens per sample and pixels per image, log-spaced bins, to a PNG (matplotlib Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, values, what in ((axes[0], tokens, "tokens per sample"), (axes[1], pixels, "pixels per image")):
        if len(values):
            lo, hi = max(min(values), 1), max(max(values), 2)
            ax.hist(values, bins=np.geomspace(lo, hi * 1.001, 40))
            ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(what)
        ax.set_ylabel("count")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The whole import

def prepare(inputs: str | Sequence[str], out_dir: str, *, opts: importers.ImportOptions, target: Target,
            heldout: int = 0, num_shards: int = 1, workers: int = 1, overwrite: bool = False,
            progress: bool = True, stream=None) -> dict:
    """Imports `inputs` (an --input string: file, glob or folder; or a list of files) into out_dir (module
    docstring) and returns the summary (also OUT/summary.json); summary["up_to_date"] is True when OUT already
    held this dataset. ValueError for unusable arguments or inputs, and when no record could be imported."""
    from array_record.python.array_record_module import ArrayRecordWriter

    stream = stream or sys.stderr
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards} must be >= 1")
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0 (0: one per core)")
    workers = workers or available_cores()
    files = importers.resolve_inputs(inputs, opts.format) if isinstance(inputs, str) else list(inputs)
    load_for(target.tokenizer, target.model)      # a tokenizer the model cannot read: one line, before any work
    settings = settings_of(files, opts, target, heldout, num_shards)
    existing = check_out_dir(out_dir, settings, overwrite)
    if existing is not None:
        return existing | {"up_to_date": True}
    t0 = time.time()
    chunks = importers.scan(files, opts)
    total = sum(len(c) for c in chunks)
    if total == 0:
        raise ValueError(f"the inputs hold no records: {[os.path.basename(f) for f in files][:5]}")
    positions = heldout_positions(total, heldout) if heldout else set()
    workers = min(workers, len(chunks))      # a worker per chunk at most: starting one costs seconds
    tmp = os.path.join(out_dir, INCOMPLETE)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "train"))
    paths = {"train": shard_paths(os.path.join(tmp, "train"), num_shards)}
    if heldout:
        os.makedirs(os.path.join(tmp, "heldout"))
        paths["heldout"] = shard_paths(os.path.join(tmp, "heldout"), 1)
    splits = SplitWriter({split: [ArrayRecordWriter(p, "group_size:1") for p in ps] for split, ps in paths.items()},
                         positions)
    per_type: collections.Counter = collections.Counter()
    rejected: collections.Counter = collections.Counter()
    over_budget: collections.Counter = collections.Counter()
    dropped_images: collections.Counter = collections.Counter()
    examples: dict[str, str] = {}
    tokens, pixels = [], []
    bar = _progress_bar(total, progress, stream)
    try:
        for results in ordered_map(process_chunk, chunks, workers, _init_worker, (opts, target)):
            for r in results:
                if isinstance(r, Rejected):
                    splits.reject()
                    rejected[r.reason] += 1
                    examples.setdefault(r.reason, f"{r.origin}: {r.message}"[:400])
                    continue
                splits.add(r.record)
                per_type[r.type] += 1
                tokens.append(r.tokens)
                pixels += r.pixels
                dropped_images.update(r.dropped_images)
                if r.budget is not None:
                    over_budget[r.budget] += 1
            if bar is not None:
                bar.update(len(results))
                bar.set_postfix(written=len(tokens), rejected=sum(rejected.values()), refresh=False)
    finally:
        if bar is not None:
            bar.close()
        splits.close()
    written = splits.written
    seconds = time.time() - t0
    summary = {
        "settings": settings, "format": opts.format, "inputs": files, "records": total,
        "written": {s: written[s] for s in paths}, "per_type": dict(sorted(per_type.items())),
        "rejected": dict(sorted(rejected.items())), "rejected_examples": dict(sorted(examples.items())),
        "over_budget": dict(sorted(over_budget.items())), "dropped_images": dict(sorted(dropped_images.items())),
        "tokens_per_sample": describe(tokens), "pixels_per_image": describe(pixels),
        "shards": {s: [os.path.basename(p) for p in ps] for s, ps in paths.items()},
        "workers": workers, "seconds": round(seconds, 3), "records_per_second": round(total / max(seconds, 1e-9), 2),
    }
    if not written["train"]:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "; ".join(f"{k} {v} (e.g. {examples[k]})" for k, v in sorted(rejected.items(), key=lambda kv: -kv[1]))
        raise ValueError(f"no usable training record in {total} input records: "
                         + (why if rejected else f"all {written['heldout']} went to the held-out split"))
    plot_histograms(os.path.join(tmp, HISTOGRAMS), tokens, pixels,
                    f"{os.path.basename(os.path.normpath(out_dir))}: {len(tokens)} samples, {len(pixels)} images "
                    f"(tokenizer {target.tokenizer})")
    _finalize(out_dir, tmp, summary)
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
    if summary.get("up_to_date"):
        lines.append(f"{out_dir} is up to date (same inputs and settings); nothing to do (--overwrite redoes it)")
    lines.append(f"wrote {sum(w.values())} records ({', '.join(f'{s} {n}' for s, n in w.items())}; {types}) from "
                 f"{summary['records']} input records of {len(summary['inputs'])} {summary['format']} file(s) in "
                 f"{summary['seconds']:.1f} s ({summary['records_per_second']:.1f} records/s, "
                 f"{summary['workers']} workers)")
    asked = summary["settings"]["heldout"]
    if asked and w.get("heldout", 0) < asked:
        lines.append(f"held-out split: {w.get('heldout', 0)} of the {asked} records asked for (rejected candidates "
                     "near the end of the input)")
    n_rej = sum(summary["rejected"].values())
    lines.append(f"rejected {n_rej}" + (":" if n_rej else ""))
    for reason, n in sorted(summary["rejected"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {reason}: {n}  (e.g. {summary['rejected_examples'][reason]})")
    if summary.get("dropped_images"):
        lines.append("images dropped from written documents (--missing_images=drop): "
                     + ", ".join(f"{k} {v}" for k, v in summary["dropped_images"].items()))
    row = summary["settings"]["row"]
    if summary["over_budget"]:
        lines.append(f"over the row budget of {row['seq_len']} tokens / {row['max_patches']} patches (written; "
                     f"training at this row size drops or truncates them): "
                     + ", ".join(f"{k} {v}" for k, v in summary["over_budget"].items()))
    t, p = summary["tokens_per_sample"], summary["pixels_per_image"]
    lines.append(f"tokens per sample ({summary['settings']['tokenizer']} tokenizer): min {t['min']}, median "
                 f"{t['p50']:.0f}, mean {t['mean']:.1f}, p99 {t['p99']:.0f}, max {t['max']}, total {t['total']}")
    if p["count"]:
        lines.append(f"pixels per image ({p['count']} images): min {p['min']}, median {p['p50']:.0f}, "
                     f"p99 {p['p99']:.0f}, max {p['max']}")
    lines.append(f"summary: {os.path.join(out_dir, SUMMARY)}, histograms: {os.path.join(out_dir, HISTOGRAMS)}")
    return "\n".join(lines)
