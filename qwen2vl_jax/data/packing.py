"""Sequence packing: Tokenized samples -> rows of exactly `seq_len` tokens and `max_patches` patch rows.

Three pure stages, each usable on its own:

1. `prepare_sample(sample, pack_cfg, model_cfg) -> (PreparedSample | None, event)`: validates one Tokenized
   sample (docs/architecture.md contract), applies the overflow rule, and precomputes everything that is per
   sample: next-token targets and their loss mask, M-RoPE positions ([3, n], `mrope.sample_positions`,
   restarting at 0), 2-D patch RoPE ids ([p, 2], `rope.vision_position_ids`) and the sizes of the ViT
   attention segments (one per vision item and temporal slice, h*w patch rows each).
2. `OnlinePacker`: the greedy online packer. It keeps one open row and a lookahead buffer of prepared
   samples; it fills the row with the buffered sample that best fits both remaining budgets (tokens and
   patches, kept level), improves the row by swaps when nothing more fits, then closes it.
   It only sees sizes and opaque keys, so its state is a small JSON list of keys.
3. `assemble_row(samples, pack_cfg) -> dict of arrays`: concatenates prepared samples into one row of
   the "Packed training batch" contract (no batch axis); padding tokens and patch rows go after the real
   ones, so the k-th vision pad of a row takes patch rows 4k..4k+3.

Pixels: a Tokenized sample holds the processor's normalised float32 patch values (what preprocess_images
returns); rows hold the raw uint8 values they came from (a quarter of the bytes to copy to the device; the
model normalises them, model/pixels.py). `raw_pixel_values` inverts the normalisation exactly and rejects
values that are not the normalisation of a uint8 (such a sample is invalid).

Overflow rule (`PackConfig.overflow`): a sample with more than `max_patches` patch rows is always dropped
("too_many_patches"): patches cannot be cut. A sample with more than `seq_len` tokens is dropped under
"drop" ("too_many_tokens"); under "truncate" its tail is cut to `seq_len` tokens when the cut tail holds
only text, otherwise (the cut would go through or before a vision block) it is dropped
("too_many_tokens_vision_in_tail"); a truncated sample with no supervised target left is dropped
("no_target_after_truncation"). A sample with no supervised target at all is dropped ("no_target").
A truncation is the event "text_tail". The caller counts every event.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Hashable, Sequence

import numpy as np

from qwen2vl_jax.data import media
from qwen2vl_jax.model import mrope, rope
from qwen2vl_jax.model.config import ModelConfig
from qwen2vl_jax.model.grid import check_grid

OVERFLOW_RULES = ("truncate", "drop")

# Events returned by prepare_sample (None = packed unchanged).
TRUNCATED = "text_tail"
DROP_TOO_MANY_PATCHES = "too_many_patches"
DROP_TOO_MANY_TOKENS = "too_many_tokens"
DROP_VISION_IN_TAIL = "too_many_tokens_vision_in_tail"
DROP_NO_TARGET = "no_target_after_truncation"
DROP_EMPTY = "no_target"             # < 2 tokens, or no supervised target at all
DROP_INVALID = "invalid_sample"
DROP_EVENTS = (DROP_TOO_MANY_PATCHES, DROP_TOO_MANY_TOKENS, DROP_VISION_IN_TAIL, DROP_NO_TARGET, DROP_EMPTY,
               DROP_INVALID)

ROW_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "pixel_values",
            "patch_segment_ids", "patch_positions")


@dataclasses.dataclass(frozen=True)
class PackConfig:
    seq_len: int                 # S: tokens per row
    max_patches: int             # P: patch rows per row (multiple of the merge unit, 4)
    patch_dim: int = 1176        # values per patch row (C * T * p * p)
    merge_unit: int = 4          # patch rows per LLM token (spatial_merge_size ** 2)
    overflow: str = "truncate"   # one of OVERFLOW_RULES
    lookahead: int = 32          # samples buffered ahead of the open row
    max_wait_rows: int = 8       # a buffered sample passed over for this many rows goes into the next row first

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2; got {self.seq_len}")
        if self.max_patches < 0 or self.max_patches % self.merge_unit:
            raise ValueError(f"max_patches {self.max_patches} must be >= 0 and a multiple of {self.merge_unit}")
        if self.overflow not in OVERFLOW_RULES:
            raise ValueError(f"overflow={self.overflow!r}; valid: {', '.join(OVERFLOW_RULES)}")
        if self.lookahead < 1:
            raise ValueError(f"lookahead must be >= 1; got {self.lookahead}")
        if self.max_wait_rows < 1:
            raise ValueError(f"max_wait_rows must be >= 1; got {self.max_wait_rows}")

    @classmethod
    def for_model(cls, model_cfg: ModelConfig, **kw) -> "PackConfig":
        v = model_cfg.vision
        return cls(patch_dim=v.patch_dim, merge_unit=v.merge_unit, **kw)


@dataclasses.dataclass(frozen=True)
class PreparedSample:
    """One sample ready to be copied into a row. n tokens, p patch rows."""
    input_ids: np.ndarray        # int32 [n]
    targets: np.ndarray          # int32 [n]   ids[j+1], 0 at the last token
    loss_mask: np.ndarray        # float32 [n] sample loss_mask[j+1], 0 at the last token
    positions: np.ndarray        # int32 [3, n] M-RoPE, from 0
    pixel_values: np.ndarray     # uint8 [p, patch_dim] raw patch values
    patch_positions: np.ndarray  # int32 [p, 2]
    slice_sizes: np.ndarray      # int32 [m]  patch rows of each (vision item, temporal slice), sum = p

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values.shape[0])


# ----------------------------------------------------------------------------------------------
# 1. per-sample preparation

def raw_pixel_values(pixel_values: np.ndarray) -> np.ndarray:
    """float32 [p, C*T*p*p] normalised patch rows (processor output) -> the uint8 values they were made from.

    Exact: each value is rounded to the nearest level of media.normalization_table (levels are 0.014 apart,
    the affine estimate is off by < 1e-5) and the level's table value must equal it bit for bit, else
    ValueError. Per channel on contiguous planes (a strided gather is ~10x slower): a few ms per 1000
    patch rows, about the cost of the patchify that made them."""
    table = media.normalization_table()                                    # float32 [C, 256], increasing
    x = np.asarray(pixel_values, np.float32)
    x = x.reshape(x.shape[0], table.shape[0], x.shape[1] // table.shape[0])  # [p, C, T*p*p]: channel-major
    raw = np.empty(x.shape, np.uint8)
    for ch, levels in enumerate(table):
        plane = np.ascontiguousarray(x[:, ch])
        scale = np.float32(255 / (np.float64(levels[255]) - levels[0]))
        level = plane * scale
        level += np.float32(0.5 - levels[0] * scale)                       # + 0.5: the cast truncates
        with np.errstate(invalid="ignore", over="ignore"):                 # NaN / out of range: caught below
            raw_plane = level.astype(np.uint8)
        back = np.take(levels, raw_plane, mode="wrap")
        if not np.array_equal(back, plane):
            bad = plane.ravel()[np.flatnonzero(back.ravel() != plane.ravel())[0]]
            raise ValueError(f"pixel_values are not the processor's normalised uint8 values: {bad!r} in channel "
                             f"{ch} is no level of media.normalization_table")
        raw[:, ch] = raw_plane
    return raw.reshape(np.asarray(pixel_values).shape)


def validate_sample(sample: dict, model_cfg: ModelConfig) -> np.ndarray:
    """Raises ValueError naming the offending values if `sample` breaks the Tokenized-sample contract; returns
    its raw uint8 pixel values (`raw_pixel_values`)."""
    for key in ("input_ids", "loss_mask", "pixel_values", "grid_thw", "vision_kind"):
        if key not in sample:
            raise ValueError(f"sample lacks {key!r}; has {sorted(sample)}")
    ids = np.asarray(sample["input_ids"])
    lm = np.asarray(sample["loss_mask"])
    pv = np.asarray(sample["pixel_values"])
    grid = check_grid(sample["grid_thw"], "grid_thw", model_cfg.vision.spatial_merge_size)
    kind = np.asarray(sample["vision_kind"])
    v = model_cfg.vision
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a 1-D integer array; got {ids.dtype} {ids.shape}")
    if lm.shape != ids.shape:
        raise ValueError(f"loss_mask shape {lm.shape} != input_ids shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= model_cfg.vocab_size):
        raise ValueError(f"input_ids outside [0, {model_cfg.vocab_size}): min {ids.min()} max {ids.max()}")
    if pv.ndim != 2 or pv.shape[1] != v.patch_dim:
        raise ValueError(f"pixel_values must be [p, {v.patch_dim}]; got {pv.shape}")
    if kind.shape != (grid.shape[0],):
        raise ValueError(f"vision_kind must be [k] for grid_thw [k, 3] = {grid.shape}; got shape {kind.shape}")
    if not np.isin(kind, (0, 1)).all():
        raise ValueError(f"vision_kind must hold 0 (image) or 1 (video); got {kind.tolist()}")
    sizes = grid.prod(-1)
    if int(sizes.sum()) != pv.shape[0]:
        raise ValueError(f"pixel_values has {pv.shape[0]} rows but grid_thw {grid.tolist()} needs {int(sizes.sum())}")
    for k, (token, name) in enumerate(((model_cfg.image_token_id, "image"), (model_cfg.video_token_id, "video"))):
        pads = int((ids == token).sum())
        want = int(sizes[kind == k].sum()) // v.merge_unit
        if pads != want:
            raise ValueError(f"{pads} <|{name}_pad|> tokens but the {name} grids need {want} "
                             f"(sum t*h*w / {v.merge_unit})")
    return raw_pixel_values(pv)


def _vision_token_mask(ids: np.ndarray, model_cfg: ModelConfig) -> np.ndarray:
    return np.isin(ids, (model_cfg.vision_start_token_id, model_cfg.vision_end_token_id,
                         model_cfg.image_token_id, model_cfg.video_token_id))


def _fit(sample: dict, pack_cfg: PackConfig, model_cfg: ModelConfig):
    """Applies the overflow rule. Returns (ids, loss_mask, event) or (None, None, drop_event)."""
    ids = np.asarray(sample["input_ids"])
    lm = np.asarray(sample["loss_mask"], np.float32)
    p = int(np.asarray(sample["pixel_values"]).shape[0])
    if ids.size < 2 or not lm[1:].any():
        return None, None, DROP_EMPTY
    if p > pack_cfg.max_patches:
        return None, None, DROP_TOO_MANY_PATCHES
    if ids.size <= pack_cfg.seq_len:
        return ids, lm, None
    if pack_cfg.overflow == "drop":
        return None, None, DROP_TOO_MANY_TOKENS
    if _vision_token_mask(ids[pack_cfg.seq_len:], model_cfg).any():
        return None, None, DROP_VISION_IN_TAIL
    ids, lm = ids[:pack_cfg.seq_len], lm[:pack_cfg.seq_len]
    if not lm[1:].any():
        return None, None, DROP_NO_TARGET
    return ids, lm, TRUNCATED


def prepare_sample(sample: dict, pack_cfg: PackConfig, model_cfg: ModelConfig):
    """Tokenized sample -> (PreparedSample or None, event). event: None, TRUNCATED or a DROP_* string.

    A sample that breaks the contract gives (None, DROP_INVALID) rather than raising: one bad record must
    not stop a run (the caller counts it). Use `validate_sample` to get the reason as a ValueError.
    """
    try:
        raw = validate_sample(sample, model_cfg)
    except ValueError:
        return None, DROP_INVALID
    ids, lm, event = _fit(sample, pack_cfg, model_cfg)
    if ids is None:
        return None, event
    grid = np.asarray(sample["grid_thw"], np.int64).reshape(-1, 3)
    kind = np.asarray(sample["vision_kind"]).reshape(-1)
    try:
        pos, _, _ = mrope.sample_positions(ids, model_cfg, grid[kind == 0], grid[kind == 1])
    except ValueError:  # pads not laid out as <|vision_start|> + t*h*w/4 pads per item
        return None, DROP_INVALID
    m = model_cfg.vision.spatial_merge_size
    n = ids.shape[0]
    targets = np.zeros((n,), np.int32)
    targets[:-1] = ids[1:]
    loss = np.zeros((n,), np.float32)
    loss[:-1] = lm[1:]
    slices = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]).astype(np.int32)
    prepared = PreparedSample(
        input_ids=ids.astype(np.int32), targets=targets, loss_mask=loss, positions=pos.astype(np.int32),
        pixel_values=raw, patch_positions=rope.vision_position_ids(grid, m), slice_sizes=slices)
    return prepared, event


# ----------------------------------------------------------------------------------------------
# 2. the online packer (sizes and keys only)

@dataclasses.dataclass
class _Item:
    key: Hashable
    tokens: int
    patches: int
    waited: int = 0   # rows closed while this item sat in the buffer


class OnlinePacker:
    """Greedy best-fit packer with a lookahead buffer, over two budgets (tokens, patch rows).

    `push(key, tokens, patches)` buffers one item and, once `lookahead` items are buffered, moves items
    into the open row and returns the rows completed meanwhile (lists of keys in row order); `flush()`
    empties buffer and open row. Deterministic: the same pushes give the same rows. Every pushed item must
    fit an empty row (1 <= tokens <= seq_len, patches <= max_patches).

    Choice rule: among buffered items that fit the open row, take the one minimising
    `rt + rp + BALANCE * |rt - rp|` (rt, rp: the row's free token / patch fractions after placing it): it
    fills the row while keeping the two budgets level, so neither runs out while the other has room.
    When nothing fits, single swaps of a row item for a buffered item that lower `rt + rp` are applied
    (then the row is refilled) before the row is closed: this closes most of the remaining gaps.
    A fresh row starts with any item that has been passed over for `max_wait_rows` rows, and the swaps never
    take such an item back out (no starvation: it is in the next row closed).
    """

    BALANCE = 2.0      # weight of the |rt - rp| imbalance term (1 = minimise max(rt, rp); 2 measured best)
    SWAP_ROUNDS = 8    # max improving swaps per closed row

    def __init__(self, seq_len: int, max_patches: int, lookahead: int, max_wait_rows: int = 8):
        self.seq_len, self.max_patches = seq_len, max_patches
        self.lookahead, self.max_wait_rows = lookahead, max_wait_rows
        self._buffer: list[_Item] = []
        self._row: list[_Item] = []
        self._row_tokens = self._row_patches = 0

    # -- state (keys only; the caller keeps the payloads) --
    def state(self) -> dict:
        return {"buffer": [[it.key, it.tokens, it.patches, it.waited] for it in self._buffer],
                "row": [[it.key, it.tokens, it.patches, it.waited] for it in self._row]}

    def set_state(self, state: dict) -> None:
        self._buffer = [_Item(*x) for x in state["buffer"]]
        self._row = [_Item(*x) for x in state["row"]]
        self._row_tokens = sum(it.tokens for it in self._row)
        self._row_patches = sum(it.patches for it in self._row)

    def keys(self) -> list:
        """Keys of every item held (open row first, then buffer)."""
        return [it.key for it in self._row] + [it.key for it in self._buffer]

    # -- packing --
    def push(self, key: Hashable, tokens: int, patches: int) -> list[list]:
        if not 1 <= tokens <= self.seq_len or not 0 <= patches <= self.max_patches:
            raise ValueError(f"item {key!r} of {tokens} tokens / {patches} patches cannot fit a row of "
                             f"{self.seq_len} tokens / {self.max_patches} patches")
        self._buffer.append(_Item(key, int(tokens), int(patches)))
        rows = []
        while len(self._buffer) >= self.lookahead:
            rows += self._step()
        return rows

    def flush(self) -> list[list]:
        rows = []
        while self._buffer:
            rows += self._step()
        if self._row:
            rows.append(self._close())
        return rows

    def _free(self, tokens: int, patches: int) -> tuple[float, float]:
        """Free (token, patch) fractions of the open row after adding `tokens`/`patches` to it."""
        rp = (self.max_patches - self._row_patches - patches) / self.max_patches if self.max_patches else 0.0
        return (self.seq_len - self._row_tokens - tokens) / self.seq_len, rp

    def _fits(self, tokens: int, patches: int) -> bool:
        return (self._row_tokens + tokens <= self.seq_len) and (self._row_patches + patches <= self.max_patches)

    def _add(self, i: int) -> None:
        it = self._buffer.pop(i)
        self._row.append(it)
        self._row_tokens += it.tokens
        self._row_patches += it.patches

    def _close(self) -> list:
        row = [it.key for it in self._row]
        self._row, self._row_tokens, self._row_patches = [], 0, 0
        for it in self._buffer:
            it.waited += 1
        return row

    def _step(self) -> list[list]:
        """Moves one buffered item into the open row, closing the row first if nothing fits."""
        best = self._choose()
        closed = []
        if best is None:
            self._improve()
            closed.append(self._close())
            if not self._buffer:  # the swaps' refill may have taken the last buffered items
                return closed
            best = self._choose()
        self._add(best)
        return closed

    def _starved(self, it: _Item) -> bool:
        return it.waited >= self.max_wait_rows

    def _choose(self) -> int | None:
        """Index of the buffered item to place next, or None if none fits the open row."""
        if not self._row:  # a fresh row first takes the longest-waiting starved item, if any
            for i, it in enumerate(self._buffer):
                if self._starved(it):
                    return i
        best, best_cost = None, float("inf")
        for i, it in enumerate(self._buffer):
            if self._fits(it.tokens, it.patches):
                rt, rp = self._free(it.tokens, it.patches)
                cost = rt + rp + self.BALANCE * abs(rt - rp)
                if cost < best_cost:  # strict: ties go to the oldest item
                    best, best_cost = i, cost
        return best

    def _improve(self) -> None:
        """Swaps row items for buffered ones while that lowers the free space, refilling after each swap."""
        for _ in range(self.SWAP_ROUNDS):
            base = sum(self._free(0, 0))
            best, best_free = None, base - 1e-12
            for ri, r in enumerate(self._row):
                if self._starved(r):       # placed because it waited too long: it stays in this row
                    continue
                for bi, b in enumerate(self._buffer):
                    dt, dp = b.tokens - r.tokens, b.patches - r.patches
                    if self._fits(dt, dp):
                        free = sum(self._free(dt, dp))
                        if free < best_free:
                            best, best_free = (ri, bi), free
            if best is None:
                return
            ri, bi = best
            r, b = self._row[ri], self._buffer[bi]
            self._row[ri], self._buffer[bi] = b, r
            self._row_tokens += b.tokens - r.tokens
            self._row_patches += b.patches - r.patches
            while (i := self._choose()) is not None:
                self._add(i)


# ----------------------------------------------------------------------------------------------
# 3. row assembly

def empty_row(pack_cfg: PackConfig) -> dict[str, np.ndarray]:
    """An all-padding row (segment 0 everywhere): shapes and dtypes of the contract, no batch axis."""
    S, P = pack_cfg.seq_len, pack_cfg.max_patches
    return {
        "input_ids": np.zeros((S,), np.int32),
        "targets": np.zeros((S,), np.int32),
        "loss_mask": np.zeros((S,), np.float32),
        "segment_ids": np.zeros((S,), np.int32),
        "positions": np.zeros((3, S), np.int32),
        "pixel_values": np.zeros((P, pack_cfg.patch_dim), np.uint8),
        "patch_segment_ids": np.zeros((P,), np.int32),
        "patch_positions": np.zeros((P, 2), np.int32),
    }


def assemble_row(samples: Sequence[PreparedSample], pack_cfg: PackConfig,
                 pad_token_id: int = 0) -> dict[str, np.ndarray]:
    """Concatenates prepared samples (in order) into one padded row. Raises ValueError if they overflow."""
    n = sum(s.num_tokens for s in samples)
    p = sum(s.num_patches for s in samples)
    if n > pack_cfg.seq_len or p > pack_cfg.max_patches:
        raise ValueError(f"{len(samples)} samples hold {n} tokens / {p} patches; row holds "
                         f"{pack_cfg.seq_len} / {pack_cfg.max_patches}")
    row = empty_row(pack_cfg)
    row["input_ids"][n:] = pad_token_id
    t0 = p0 = 0
    seg = 0
    for i, s in enumerate(samples, start=1):
        t1, p1 = t0 + s.num_tokens, p0 + s.num_patches
        row["input_ids"][t0:t1] = s.input_ids
        row["targets"][t0:t1] = s.targets
        row["loss_mask"][t0:t1] = s.loss_mask
        row["segment_ids"][t0:t1] = i
        row["positions"][:, t0:t1] = s.positions
        row["pixel_values"][p0:p1] = s.pixel_values
        row["patch_positions"][p0:p1] = s.patch_positions
        row["patch_segment_ids"][p0:p1] = np.repeat(np.arange(seg + 1, seg + 1 + len(s.slice_sizes)), s.slice_sizes)
        seg += len(s.slice_sizes)
        t0, p0 = t1, p1
    return row


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """[row dicts] -> batch dict with a leading batch axis."""
    return {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}


def pack_samples(samples: Sequence[dict], pack_cfg: PackConfig, model_cfg: ModelConfig) -> tuple[list[dict], dict]:
    """Offline convenience: packs a finite list of Tokenized samples. Returns (rows, counters)."""
    counts: dict[str, Any] = {"samples_packed": 0, "real_tokens": 0, "real_patches": 0, "rows": 0}
    packer = OnlinePacker(pack_cfg.seq_len, pack_cfg.max_patches, pack_cfg.lookahead, pack_cfg.max_wait_rows)
    prepared: dict[int, PreparedSample] = {}
    rows: list[dict] = []

    def emit(keys):
        row_samples = [prepared.pop(k) for k in keys]
        rows.append(assemble_row(row_samples, pack_cfg, model_cfg.pad_token_id))
        counts["rows"] += 1
        counts["samples_packed"] += len(row_samples)
        counts["real_tokens"] += sum(s.num_tokens for s in row_samples)
        counts["real_patches"] += sum(s.num_patches for s in row_samples)

    for i, sample in enumerate(samples):
        ps, event = prepare_sample(sample, pack_cfg, model_cfg)
        if event is not None:
            counts[event] = counts.get(event, 0) + 1
        if ps is None:
            continue
        prepared[i] = ps
        for keys in packer.push(i, ps.num_tokens, ps.num_patches):
            emit(keys)
    for keys in packer.flush():
        emit(keys)
    return rows, counts
