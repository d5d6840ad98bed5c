"""AdamW, learning-rate schedule and the per-stage split into trainable and frozen parameters.

Trainable parts (named groups of the param tree, docs/architecture.md):
  ``vision_tower`` = visual.patch_embed + visual.blocks, ``merger`` = visual.merger,
  ``llm`` = decoder + lm_head.
Paper stages (docs/qwen2vl.md §6.2): stage 1 trains the ViT (tower + merger), LLM frozen; stage 2 trains
everything; stage 3 freezes the ViT tower and trains merger + LLM.

Frozen parameters get no optimizer state and no gradient: the params are split into two disjoint
nested dicts (`split_params`); the optimizer is initialised on the trainable dict only and the loss
is differentiated w.r.t. it only (the frozen dict enters under `stop_gradient`).

Schedule: the paper gives none (docs/qwen2vl.md §6.3). We use linear warmup from 0 to `peak_lr` over
`warmup_steps`, then cosine decay to `min_lr_ratio * peak_lr` at `total_steps` (the Qwen2 / Llama
practice). AdamW with b1=0.9, b2=0.95, eps=1e-8; weight decay only on matrices (`kernel`,
`embedding` leaves), never on norms and biases. Gradient clipping is done by the train step (it also
reports the norm and checks it is finite).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import optax

PARTS = {
    "vision_tower": (("visual", "patch_embed"), ("visual", "blocks")),
    "merger": (("visual", "merger"),),
    "llm": (("decoder",), ("lm_head",)),
}
STAGE_TRAINABLE = {
    1: ("vision_tower", "merger"),
    2: ("vision_tower", "merger", "llm"),
    3: ("merger", "llm"),
}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    peak_lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    total_steps: int = 0      # schedule length; 0 = the run's step count (experiment token budget)
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0    # global-norm clip; <= 0 disables
    # per-part learning-rate multipliers, e.g. (("vision_tower", 5.0), ("merger", 5.0)); parts not named
    # use 1.0. The whole AdamW update (decoupled weight decay included) of a part is scaled.
    lr_scale: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):
        # NaN passes every comparison below as False, so a NaN would reach the update (and every param)
        for name in ("peak_lr", "min_lr_ratio", "weight_decay", "b1", "b2", "eps", "grad_clip"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"optim.{name}={getattr(self, name)} must be a finite number")
        if self.peak_lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"peak_lr={self.peak_lr} must be > 0 and min_lr_ratio={self.min_lr_ratio} in [0, 1]")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1) or self.eps < 0 or self.weight_decay < 0:
            raise ValueError(f"b1={self.b1} and b2={self.b2} must be in [0, 1), eps={self.eps} and "
                             f"weight_decay={self.weight_decay} >= 0")
        for item in self.lr_scale:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and item[0] in PARTS
                    and isinstance(item[1], (int, float)) and math.isfinite(item[1]) and item[1] > 0):
                raise ValueError(f"lr_scale entry {item!r}: expected (part, finite multiplier > 0) with part one of "
                                 f"{', '.join(PARTS)}")
        names = [n for n, _ in self.lr_scale]
        if len(set(names)) != len(names):
            raise ValueError(f"lr_scale names a part twice: {names}")
        if self.warmup_steps < 0 or self.total_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} and total_steps={self.total_steps} must be >= 0")


def schedule(cfg: OptimConfig) -> optax.Schedule:
    if cfg.total_steps < 1:
        raise ValueError(f"OptimConfig.total_steps={cfg.total_steps}: resolve it to the run length first")
    warm = max(0, min(cfg.warmup_steps, cfg.total_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.peak_lr, warmup_steps=warm,
        decay_steps=max(cfg.total_steps, warm + 1), end_value=cfg.peak_lr * cfg.min_lr_ratio)


def _decay_mask(params: Any) -> Any:
    def leaf(path, _):
        return getattr(path[-1], "key", None) in ("kernel", "embedding")
    return jax.tree_util.tree_map_with_path(leaf, params)


def _part_scales(params: Any, lr_scale: Sequence[tuple[str, float]]) -> Any:
    """Per-leaf float: the lr_scale multiplier of the part holding the leaf (1.0 when not named)."""
    def leaf(path, _):
        keys = tuple(getattr(k, "key", str(k)) for k in path)
        for part, mult in lr_scale:
            if _is_trainable(keys, (part,)):
                return float(mult)
        return 1.0
    return jax.tree_util.tree_map_with_path(leaf, params)


def scale_by_part(lr_scale: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiplies each leaf's update by its part's multiplier (stateless)."""
    def update(updates, state, params=None):
        del params
        scales = _part_scales(updates, lr_scale)
        return jax.tree.map(lambda u, m: u * m if m != 1.0 else u, updates, scales), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW over the *trainable* params dict (see `split_params`), then the per-part lr_scale."""
    adamw = optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=_decay_mask)
    return optax.chain(adamw, scale_by_part(cfg.lr_scale)) if cfg.lr_scale else adamw


def _validate_parts(parts: Sequence[str]) -> tuple[str, ...]:
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"trainable parts {tuple(parts)} invalid; choose a non-empty subset of {', '.join(PARTS)}")
    return tuple(parts)


def _is_trainable(path: tuple[str, ...], parts: Sequence[str]) -> bool:
    prefixes = [pre for p in parts for pre in PARTS[p]]
    return any(path[:len(pre)] == pre for pre in prefixes)


def split_params(params: dict, parts: Sequence[str]) -> tuple[dict, dict]:
    """(trainable, frozen): two disjoint nested dicts whose union is `params`. Empty dicts are pruned."""
    parts = _validate_parts(parts)

    def walk(node, path):
        if not isinstance(node, dict):
            return (node, None) if _is_trainable(path, parts) else (None, node)
        tr, fr = {}, {}
        for k, v in node.items():
            a, b = walk(v, path + (k,))
            if a is not None and not (isinstance(a, dict) and not a):
                tr[k] = a
            if b is not None and not (isinstance(b, dict) and not b):
                fr[k] = b
        return tr, fr

    return walk(params, ())


def merge_params(trainable: dict, frozen: dict) -> dict:
    """Inverse of `split_params`."""
    out = dict(frozen)
    for k, v in trainable.items():
        if k in out:
            if not (isinstance(v, dict) and isinstance(out[k], dict)):
                raise ValueError(f"key {k!r} is both trainable and frozen")
            out[k] = merge_params(v, out[k])
        else:
            out[k] = v
    return out
