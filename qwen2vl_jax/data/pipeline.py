"""The Grain training-data pipeline: weighted source mixture -> decode -> pack -> batches.

    per source s (sources.py)         MapDataset of (s, payload): synthetic index, or ArrayRecord bytes
      sharded by process              disjoint: range(process_index, .., process_count) / records[pi::pc]
      arrayrecord: shuffle + repeat   a new permutation every epoch (seed + s)
    MapDataset.mix(weights)           grain's deterministic weighted interleave
    .map_with_index(SampleDecoder)          -> Decoded(key=global index, sample=PreparedSample | None, event)
                                      bad media / records become skip events (counted, logged once)
    .to_iter_dataset(ReadOptions)     threads decode ahead in order
    PackIterDataset                   packing.OnlinePacker -> batches of `batch_size` packed rows
    .mp_prefetch(num_workers)         optional worker processes, each packing its own slice

Batches follow docs/architecture.md "Packed training batch" (numpy, leading batch axis; pixel_values are the
raw uint8 patch values, normalised by the model on the device: packing.py). Every batch carries the
counter increments since the previous one; `DataIterator` strips them and keeps running totals, so
`stats()` and the checkpointed state agree with exactly what was yielded.

Checkpointing: the packer holds only keys (global indices into the decoded MapDataset); on `set_state`
the buffered samples are decoded again by random access, so the state is a small JSON dict and a
restored iterator yields exactly the batch the original would have yielded next (same num_workers,
same config; a mismatch raises ValueError).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import threading
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from absl import flags, logging

from qwen2vl_jax.model.config import ModelConfig
from qwen2vl_jax.data import formats, packing, sources, media

SYNTHETIC_LENGTH = 1 << 48     # "infinite": index space of a synthetic source
MAX_UNUSABLE_RUN = 10_000      # consecutive skipped/dropped samples before the pipeline gives up (all-bad data)
STATE_VERSION = 1
SPLITS = ("train", "heldout")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # (source name, weight) pairs; names as in sources.py ("synthetic:caption", "arrayrecord:/data/*.ar");
    # the training stages' mixtures are experiments.stages.STAGE_MIXTURE
    mixture: tuple[tuple[str, float], ...] = (("synthetic:caption", 1.0),)
    seq_len: int = 2048                   # S tokens per packed row
    max_patches: int = 8192               # P patch rows per packed row (multiple of 4)
    seed: int = 0
    # resolution (pixels per image; per video frame) -- defaults suit the embedded synthetic data
    image_min_pixels: int = 4 * 28 * 28
    image_max_pixels: int = 256 * 28 * 28
    video_min_pixels: int = 16 * 28 * 28
    video_max_pixels: int = 64 * 28 * 28
    video_total_pixels: int = 1024 * 28 * 28
    video_fps: float = media.VIDEO_FPS   # frame sampling of video files
    # 0: qwen-vl-utils' default cap, min(768, the video's frames); N > 0: an explicit cap, and a video that
    # cannot give N frames at video_fps is skipped (too_few_frames), as an explicit max_frames fails there
    video_max_frames: int = 0
    # packing
    overflow: str = "truncate"            # packing.OVERFLOW_RULES
    lookahead: int = 32                   # samples buffered ahead of the open row
    # throughput
    num_workers: int = 0                  # worker processes (grain mp_prefetch); 0 = in-process
    worker_buffer_size: int = 2           # batches buffered per worker
    read_threads: int = 4                 # decode threads per process
    read_buffer_size: int = 64            # samples decoded ahead per process
    shuffle: bool = True                  # per-epoch shuffle of ArrayRecord sources
    # loss mask: also supervise the "\n" after each assistant <|im_end|> (LLaMA-Factory's qwen2_vl template);
    # off: answer + <|im_end|> only (docs/data_formats.md#loss-mask). Applied when samples are read, not baked
    # into prepared data. Run folders written before this field read back as False (rundir.read_data_config).
    supervise_turn_newline: bool = False

    def __post_init__(self):
        mixture = tuple((str(n), float(w)) for n, w in self.mixture)
        object.__setattr__(self, "mixture", mixture)
        if not mixture:
            raise ValueError("mixture is empty")
        names = [n for n, _ in mixture]
        if len(set(names)) != len(names):
            raise ValueError(f"mixture names repeat: {names}")
        bad = [(n, w) for n, w in mixture if not w > 0]
        if bad:
            raise ValueError(f"mixture weights must be > 0; got {bad}")
        for n in names:
            sources.parse_source(n)
        for f in ("num_workers", "read_threads", "read_buffer_size", "worker_buffer_size", "video_max_frames"):
            if getattr(self, f) < (0 if f in ("num_workers", "video_max_frames") else 1):
                raise ValueError(f"{f}={getattr(self, f)} out of range")
        formats.VisionOptions(**self._vision_kw())  # validates the pixel limits
        if self.video_fps <= 0:
            raise ValueError(f"video_fps must be > 0; got {self.video_fps}")

    def _vision_kw(self) -> dict:
        return dict(min_pixels=self.image_min_pixels, max_pixels=self.image_max_pixels,
                    video_min_pixels=self.video_min_pixels, video_max_pixels=self.video_max_pixels,
                    video_total_pixels=self.video_total_pixels)

    @property
    def vision_options(self) -> formats.VisionOptions:
        return formats.VisionOptions(**self._vision_kw())

    @property
    def video_sampling(self) -> sources.VideoSampling:
        return sources.VideoSampling(fps=self.video_fps, max_frames=self.video_max_frames or None)

    def pack_config(self, model_cfg: ModelConfig) -> packing.PackConfig:
        return packing.PackConfig.for_model(model_cfg, seq_len=self.seq_len, max_patches=self.max_patches,
                                            overflow=self.overflow, lookahead=self.lookahead)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mixture"] = [list(x) for x in self.mixture]
        return d


# ----------------------------------------------------------------------------------------------
# decode: (source index, payload) -> Decoded

@dataclasses.dataclass(frozen=True)
class Decoded:
    key: int                                   # global index in the decoded MapDataset
    source: int                                # index into the mixture
    sample: packing.PreparedSample | None
    event: str | None                          # "skipped/<r>", "dropped/<r>", "truncated/<r>" or None


_LOGGED_REASONS: set[str] = set()   # per process: each skip/drop reason is logged the first time only
_LOG_LOCK = threading.Lock()        # decode runs in grain's reader threads


def _log_once(event: str, message: str) -> None:
    with _LOG_LOCK:
        if event in _LOGGED_REASONS:
            return
        _LOGGED_REASONS.add(event)
    logging.warning("data: %s (%s); further %s events are counted, not logged", event, message[:300], event)


@dataclasses.dataclass(frozen=True)
class SampleDecoder:
    """map_with_index transform: raw element -> Decoded. Bad input becomes a skip event, never an error."""
    specs: tuple[sources.SourceSpec, ...]
    split: str
    seed: int
    tokenizer: Any
    model_cfg: ModelConfig
    pack_cfg: packing.PackConfig
    vision_opts: formats.VisionOptions
    sampling: sources.VideoSampling
    supervise_turn_newline: bool = False

    @classmethod
    def of(cls, data_cfg: DataConfig, split: str, tokenizer, model_cfg: ModelConfig,
           pack_cfg: packing.PackConfig) -> "SampleDecoder":
        """The decoder of `data_cfg`'s mixture, split `split`."""
        specs = tuple(sources.parse_source(n) for n, _ in data_cfg.mixture)
        return cls(specs, split, data_cfg.seed, tokenizer, model_cfg, pack_cfg, data_cfg.vision_options,
                   data_cfg.video_sampling, data_cfg.supervise_turn_newline)

    def tokenized(self, source: int, payload) -> dict:
        spec = self.specs[source]
        if spec.kind == "synthetic":
            return formats.make_sample(spec.arg, int(payload), self.split, self.tokenizer, self.model_cfg,
                                       self.vision_opts, seed=self.seed,
                                       supervise_turn_newline=self.supervise_turn_newline)
        return sources.record_to_sample(payload, self.tokenizer, self.model_cfg, self.vision_opts, self.sampling,
                                        self.supervise_turn_newline)

    def __call__(self, index: int, element) -> Decoded:
        source, payload = element
        try:
            sample = self.tokenized(source, payload)
        except (media.BadMediaError, sources.BadRecordError) as e:
            event = f"skipped/{e.reason}"
            _log_once(event, f"{self.specs[source].name}: {e}")
            return Decoded(index, source, None, event)
        except Exception as e:  # noqa: BLE001 -- real files must not stop a run; synthetic bugs must surface
            if self.specs[source].kind == "synthetic":
                raise
            event = f"skipped/unexpected_{type(e).__name__}"
            _log_once(event, f"{self.specs[source].name}: {e!r}")
            return Decoded(index, source, None, event)
        prepared, reason = packing.prepare_sample(sample, self.pack_cfg, self.model_cfg)
        if prepared is None:
            event = f"dropped/{reason}"
            _log_once(event, f"{self.specs[source].name} sample of {len(sample['input_ids'])} tokens / "
                             f"{len(sample['pixel_values'])} patches")
            return Decoded(index, source, None, event)
        return Decoded(index, source, prepared, None if reason is None else f"truncated/{reason}")


def _tag(source: int, payload):
    return source, payload


# ----------------------------------------------------------------------------------------------
# packing as a Grain IterDataset

class PackIterDataset(grain.IterDataset):
    """Decoded elements -> batches (dicts of [batch_size, ...] arrays + "_stats" counter increments).

    `lookup` is the decoded MapDataset the parent iterates over: on set_state the buffered samples are
    re-decoded from it by key."""

    def __init__(self, parent: grain.IterDataset, lookup: grain.MapDataset, pack_cfg: packing.PackConfig,
                 batch_size: int, pad_token_id: int, source_names: Sequence[str]):
        super().__init__(parent)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self._lookup = lookup
        self._pack_cfg = pack_cfg
        self._batch_size = batch_size
        self._pad = pad_token_id
        self._names = tuple(source_names)

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self._lookup, self._pack_cfg, self._batch_size, self._pad,
                             self._names)

    def __str__(self) -> str:
        return f"PackIterDataset(batch_size={self._batch_size}, pack={self._pack_cfg})"


class _PackIterator(grain.DatasetIterator):

    def __init__(self, parent, lookup, pack_cfg: packing.PackConfig, batch_size: int, pad: int, names):
        super().__init__(parent)
        self._lookup, self._cfg, self._bs, self._pad, self._names = lookup, pack_cfg, batch_size, pad, names
        self._reset()

    def _reset(self):
        c = self._cfg
        self._packer = packing.OnlinePacker(c.seq_len, c.max_patches, c.lookahead, c.max_wait_rows)
        self._held: dict[int, Decoded] = {}          # key -> decoded sample in the packer or in _ready
        self._ready: list[list[int]] = []             # closed rows not yet batched
        self._pending: collections.Counter = collections.Counter()
        self._exhausted = False
        self._unusable_run = 0                        # consecutive samples without a packable result

    def _consume(self, d: Decoded) -> None:
        if d.event is not None:
            self._pending[d.event] += 1
        if d.sample is None:
            self._unusable_run += 1
            if self._unusable_run >= MAX_UNUSABLE_RUN:
                raise ValueError(f"{self._unusable_run} consecutive samples were skipped or dropped "
                                 f"(counts since the last batch: {dict(self._pending)}): the data or the "
                                 "packing budgets are unusable")
            return
        self._unusable_run = 0
        self._held[d.key] = d
        self._ready += self._packer.push(d.key, d.sample.num_tokens, d.sample.num_patches)

    def __next__(self) -> dict:
        while len(self._ready) < self._bs and not self._exhausted:
            try:
                d = next(self._parent)
            except StopIteration:
                self._exhausted = True
                self._ready += self._packer.flush()
                break
            self._consume(d)
        if not self._ready:
            raise StopIteration
        rows_keys, self._ready = self._ready[:self._bs], self._ready[self._bs:]
        rows = []
        stats = self._pending
        self._pending = collections.Counter()
        for keys in rows_keys:
            items = [self._held.pop(k) for k in keys]
            rows.append(packing.assemble_row([d.sample for d in items], self._cfg, self._pad))
            stats["rows"] += 1
            stats["samples_packed"] += len(items)
            stats["real_tokens"] += sum(d.sample.num_tokens for d in items)
            stats["real_patches"] += sum(d.sample.num_patches for d in items)
            for d in items:
                stats[f"samples/{self._names[d.source]}"] += 1
        while len(rows) < self._bs:  # only at the end of a finite stream
            rows.append(packing.empty_row(self._cfg))
        stats["batches"] += 1
        stats["total_tokens"] += self._bs * self._cfg.seq_len
        stats["total_patches"] += self._bs * self._cfg.max_patches
        batch = packing.stack_rows(rows)
        batch["_stats"] = dict(stats)
        return batch

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "packer": self._packer.state(),
                "ready": [list(r) for r in self._ready], "pending": dict(self._pending),
                "exhausted": self._exhausted}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._reset()
        self._packer.set_state(state["packer"])
        self._ready = [list(r) for r in state["ready"]]
        self._pending = collections.Counter(state["pending"])
        self._exhausted = bool(state["exhausted"])
        for key in self._packer.keys() + [k for r in self._ready for k in r]:
            d = self._lookup[key]
            if d.sample is None:
                raise ValueError(f"state refers to sample {key}, which now decodes to {d.event}: the data or "
                                 "the config changed since the state was saved")
            self._held[key] = d


# ----------------------------------------------------------------------------------------------
# assembly and the user-facing iterator

def _mixed_dataset(data_cfg: DataConfig, process_index: int, process_count: int, split: str) -> grain.MapDataset:
    parts = []
    for s, (name, _) in enumerate(data_cfg.mixture):
        spec = sources.parse_source(name)
        if spec.kind == "synthetic":
            ds = grain.MapDataset.range(process_index, SYNTHETIC_LENGTH, process_count)
        else:
            ds = grain.MapDataset.source(sources.arrayrecord_source(spec.arg, split))
            if len(ds) < process_count:
                raise ValueError(f"{name}: {len(ds)} records cannot be sharded over {process_count} processes")
            ds = ds.slice(slice(process_index, None, process_count))
            if data_cfg.shuffle:
                ds = ds.shuffle(seed=data_cfg.seed * 1000 + s)
            ds = ds.repeat()
        parts.append(ds.map(functools.partial(_tag, s)))
    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(parts, [w for _, w in data_cfg.mixture])


def build_dataset(data_cfg: DataConfig, model_cfg: ModelConfig, tokenizer, *, batch_size: int,
                  process_index: int = 0, process_count: int = 1, split: str = "train") -> grain.IterDataset:
    """The Grain IterDataset of batches (with "_stats"); `make_iterator` wraps it."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    if split not in SPLITS:
        raise ValueError(f"split {split!r}; valid: {', '.join(SPLITS)}")
    tokenizer.check_model_config(model_cfg)
    pack_cfg = data_cfg.pack_config(model_cfg)
    decoder = SampleDecoder.of(data_cfg, split, tokenizer, model_cfg, pack_cfg)
    decoded = _mixed_dataset(data_cfg, process_index, process_count, split).map_with_index(decoder)
    it_ds = decoded.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.read_threads,
                                                      prefetch_buffer_size=data_cfg.read_buffer_size))
    ds = PackIterDataset(it_ds, decoded, pack_cfg, batch_size, model_cfg.pad_token_id,
                         [s.name for s in decoder.specs])
    if data_cfg.num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's mp_prefetch reads its absl flags; outside absl.app use defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers,
                                                         per_worker_buffer_size=data_cfg.worker_buffer_size))
    return ds


class DataIterator:
    """Iterator of packed batches with JSON-serialisable `get_state`/`set_state` and running `stats()`."""

    def __init__(self, dataset: grain.IterDataset, fingerprint: str, pack_cfg: packing.PackConfig):
        self._it = iter(dataset)
        self._fingerprint = fingerprint
        self._pack_cfg = pack_cfg
        self._totals: collections.Counter = collections.Counter()

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._it))
        self._totals.update(batch.pop("_stats"))
        return batch

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "fingerprint": self._fingerprint,
                "pipeline": self._it.get_state(), "stats": dict(self._totals)}

    def set_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r} != {STATE_VERSION}")
        if state.get("fingerprint") != self._fingerprint:
            raise ValueError(f"data state fingerprint {state.get('fingerprint')!r} != this iterator's "
                             f"{self._fingerprint!r}: the data config, batch size, split or process layout changed")
        self._it.set_state(state["pipeline"])
        self._totals = collections.Counter(state["stats"])

    def stats(self) -> dict[str, float]:
        """Running counters (flat names, for metrics) and the packing efficiencies of what was yielded."""
        t = self._totals
        out: dict[str, float] = {k: float(v) for k, v in sorted(t.items())}
        out["token_efficiency"] = t["real_tokens"] / t["total_tokens"] if t["total_tokens"] else 0.0
        out["patch_efficiency"] = t["real_patches"] / t["total_patches"] if t["total_patches"] else 0.0
        out["skipped"] = float(sum(v for k, v in t.items() if k.startswith("skipped/")))
        out["dropped"] = float(sum(v for k, v in t.items() if k.startswith("dropped/")))
        out["truncated"] = float(sum(v for k, v in t.items() if k.startswith("truncated/")))
        return out

    def close(self) -> None:
        """Stops worker processes (if any)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def make_iterator(data_cfg: DataConfig, model_cfg: ModelConfig, tokenizer, *, batch_size: int,
                  process_index: int = 0, process_count: int = 1, split: str = "train") -> DataIterator:
    """Iterator of packed training batches (numpy dicts, contract dtypes, leading batch axis `batch_size`).

    Each process gets a disjoint shard of every source; the mixture, packing and batching run per process.
    Deterministic for (data_cfg, model_cfg, tokenizer, batch_size, process layout, split)."""
    ds = build_dataset(data_cfg, model_cfg, tokenizer, batch_size=batch_size, process_index=process_index,
                       process_count=process_count, split=split)
    key = json.dumps({"data": data_cfg.to_dict(), "batch_size": batch_size, "process": [process_index, process_count],
                      "split": split, "model": model_cfg.name, "tokenizer": getattr(tokenizer, "name", "")},
                     sort_keys=True)
    return DataIterator(ds, hashlib.sha256(key.encode()).hexdigest()[:16], data_cfg.pack_config(model_cfg))


def balanced_max_patches(data_cfg: DataConfig, model_cfg: ModelConfig, tokenizer, num_samples: int = 64,
                         split: str = "train") -> int:
    """max_patches that matches the mixture's patch/token ratio at data_cfg.seq_len (multiple of the merge
    unit), measured on the first `num_samples` decoded samples of the mixture (process 0). With the ratio
    matched, neither budget binds early and both packing efficiencies can approach 1; a smaller value makes
    patches the bottleneck (token efficiency ~ max_patches / (ratio * seq_len)), a larger one wastes patches."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    probe = dataclasses.replace(data_cfg, max_patches=1 << 30, overflow="truncate")
    pack_cfg = probe.pack_config(model_cfg)
    decoder = SampleDecoder.of(probe, split, tokenizer, model_cfg, pack_cfg)
    mixed = _mixed_dataset(probe, 0, 1, split)
    tokens = patches = largest = 0
    for i in range(num_samples):
        d = decoder(i, mixed[i])
        if d.sample is not None:
            tokens += d.sample.num_tokens
            patches += d.sample.num_patches
            largest = max(largest, d.sample.num_patches)
    if not tokens:
        raise ValueError(f"none of the first {num_samples} samples of {probe.mixture} is usable")
    unit = model_cfg.vision.merge_unit
    balanced = -(-int(np.ceil(data_cfg.seq_len * patches / tokens)) // unit) * unit
    return max(balanced, -(-largest // unit) * unit, unit)

