"""Evaluation on the embedded data's held-out split: per-type held-out loss and task accuracy.

(a) Held-out loss (`make_eval_fn`): for each type in LOSS_KINDS (caption, ocr, grounding, video, chat),
    `num_per_kind` fixed held-out samples (formats.make_sample(kind, i, "heldout", seed=HELDOUT_SEED))
    are packed once, offline, into rows of the training shapes [B, S] / [B, P, 1176]; the returned
    fn(params) runs the train loss (train.loss_terms: same forward, same chunked cross entropy) on every
    batch and returns {kind: supervised-token mean NLL, ..., "mean": mean over kinds}. Deterministic:
    the same params give the same numbers at every call.

(b) Task accuracy (`evaluate_accuracy`): greedy decoding (generate.py) of formats.eval_prompt prompts on
    synthetic.heldout_scenes(kind, n); per kind a score in [0, 1]:
      caption      exact match of the set of (colour, shape) pairs named in the caption  ("caption")
                   and of the whole normalised caption ("caption_exact"); diagnostics: the set of colours
                   ("caption_colours") and the set of shapes ("caption_shapes") alone, which tell which
                   half of the pairs a model gets wrong
      count        the first number equals the true count
      ocr          normalised exact string match
      grounding    same number of boxes, each with IoU >= 0.5 against the truth
      video        normalised exact match of "a <colour> <shape> moving <direction>"
      text         arithmetic answer correct (chat form)
    Chance level per metric = the permutation baseline: the mean score of answering item i with the
    true answer of another held-out item j != i (an answer drawn from the answer distribution but
    independent of the input).
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from qwen2vl_jax.model.config import ModelConfig
from qwen2vl_jax.data import formats, synthetic
from qwen2vl_jax.data.packing import PackConfig, empty_row, pack_samples, stack_rows

LOSS_KINDS = ("caption", "ocr", "grounding", "video", "chat")
ACCURACY_KINDS = ("caption", "count", "ocr", "grounding", "video", "text")
_PAIR_RE = re.compile(r"\b(" + "|".join(synthetic.COLOURS) + r")\s+(" + "|".join(synthetic.SHAPES) + r")s?\b")


# ----------------------------------------------------------------------------------------------
# (a) held-out loss

def heldout_samples(kind: str, num: int, tokenizer, cfg: ModelConfig,
                    vision_opts: formats.VisionOptions | None = None) -> list[dict]:
    """The fixed held-out Tokenized samples of one data type."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind {kind!r} unknown; valid: {', '.join(LOSS_KINDS)}")
    if num < 1:
        raise ValueError(f"num_per_kind must be >= 1; got {num}")
    return [formats.make_sample(kind, i, "heldout", tokenizer, cfg, vision_opts, seed=synthetic.HELDOUT_SEED)
            for i in range(num)]


def heldout_batches(kind: str, num: int, tokenizer, cfg: ModelConfig, pack_cfg: PackConfig, batch_size: int,
                    vision_opts: formats.VisionOptions | None = None) -> list[dict]:
    """Packed batches (numpy, leading axis batch_size; the last one filled with all-padding rows)."""
    rows, counts = pack_samples(heldout_samples(kind, num, tokenizer, cfg, vision_opts), pack_cfg, cfg)
    if not rows:
        raise ValueError(f"no held-out {kind} sample fits seq_len={pack_cfg.seq_len} / "
                         f"max_patches={pack_cfg.max_patches} (packer events: {counts})")
    while len(rows) % batch_size:
        rows.append(empty_row(pack_cfg))
    return [stack_rows(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def _data_field(data_cfg, name: str, default):
    if data_cfg is None:
        return default
    if isinstance(data_cfg, dict):
        return data_cfg.get(name, default)
    return getattr(data_cfg, name, default)


def make_eval_fn(cfg: ModelConfig, data_cfg: Any = None, *, num_per_kind: int = 16,
                 kinds: Sequence[str] = LOSS_KINDS, batch_size: int | None = None, seq_len: int | None = None,
                 max_patches: int | None = None, tokenizer: Any = None, step_cfg: Any = None) -> Callable[[dict], dict]:
    """-> fn(params) -> {kind: held-out loss, "mean": mean over kinds}.

    Shapes come from `data_cfg` (an object or dict with seq_len / max_patches / batch_size, e.g. the
    pipeline's data config) unless given explicitly. The batches are built here, once; fn jits one
    loss step for the [batch_size, seq_len] shape and reuses it for every kind and call.
    fn(params, zero_pixels=True) scores the same batches with every pixel value 0: the image ablation (a
    model that reads its images has a clearly higher loss without them).
    """
    from qwen2vl_jax.train import train_step
    from qwen2vl_jax.data.tokenizer import load_tokenizer

    seq_len = seq_len or _data_field(data_cfg, "seq_len", 1024)
    max_patches = max_patches or _data_field(data_cfg, "max_patches", 2048)
    batch_size = batch_size or _data_field(data_cfg, "batch_size", 4)
    bad = [k for k in kinds if k not in LOSS_KINDS]
    if bad:
        raise ValueError(f"loss kinds {bad} unknown; valid: {', '.join(LOSS_KINDS)}")
    tokenizer = tokenizer or load_tokenizer(_data_field(data_cfg, "tokenizer", "embedded"))
    vision_opts = _data_field(data_cfg, "vision_options", None)       # pipeline.DataConfig property
    pack_cfg = PackConfig.for_model(cfg, seq_len=seq_len, max_patches=max_patches, overflow="truncate")
    batches = {k: heldout_batches(k, num_per_kind, tokenizer, cfg, pack_cfg, batch_size, vision_opts) for k in kinds}
    step_cfg = step_cfg or train_step.StepConfig()

    @jax.jit
    def loss_sums(params, batch):
        _, (nll, _, n) = train_step.loss_terms(cfg, params, batch, step_cfg)
        return nll, n

    def eval_fn(params, zero_pixels: bool = False) -> dict:
        out = {}
        for k, bs in batches.items():
            nll = n = 0.0
            for b in bs:
                if zero_pixels:
                    b = {**b, "pixel_values": np.zeros_like(b["pixel_values"])}
                s, c = loss_sums(params, b)
                nll += float(s)
                n += float(c)
            out[k] = nll / max(n, 1.0)
        out["mean"] = float(np.mean([out[k] for k in kinds]))
        return out

    eval_fn.batches = batches          # exposed for inspection / tests
    return eval_fn


# ----------------------------------------------------------------------------------------------
# (b) task accuracy: metrics

def caption_pairs(text: str) -> frozenset[tuple[str, str]]:
    """The (colour, shape) pairs named in a caption ('two blue squares' -> ('blue', 'square'))."""
    return frozenset(_PAIR_RE.findall(formats.normalise_answer(text)))


def caption_pairs_match(prediction: str, expected: str) -> float:
    want = caption_pairs(expected)
    return float(bool(want) and caption_pairs(prediction) == want)


def caption_part_match(prediction: str, expected: str, part: int) -> float:
    """Exact match of the set of colours (part 0) or shapes (part 1) named in the caption."""
    want = {p[part] for p in caption_pairs(expected)}
    return float(bool(want) and {p[part] for p in caption_pairs(prediction)} == want)


def metric(name: str, prediction: str, expected: str) -> float:
    """Score in {0, 1} of one decoded answer for metric `name` (see the module docstring)."""
    if name == "caption":
        return caption_pairs_match(prediction, expected)
    if name in ("caption_colours", "caption_shapes"):
        return caption_part_match(prediction, expected, 0 if name == "caption_colours" else 1)
    if name == "caption_exact":
        return formats.score("caption", prediction, expected)
    return formats.score(name, prediction, expected)


def metrics_of(kind: str) -> tuple[str, ...]:
    return ("caption", "caption_exact", "caption_colours", "caption_shapes") if kind == "caption" else (kind,)


def chance_level(name: str, expected: Sequence[str]) -> float:
    """Permutation baseline: mean over ordered pairs i != j of metric(answer_j, answer_i)."""
    n = len(expected)
    if n < 2:
        raise ValueError(f"chance level needs >= 2 items; got {n}")
    total = sum(metric(name, expected[j], expected[i]) for i in range(n) for j in range(n) if i != j)
    return total / (n * (n - 1))


@dataclasses.dataclass(frozen=True)
class KindResult:
    kind: str
    scores: dict                 # metric -> accuracy in [0, 1]
    chance: dict                 # metric -> permutation-baseline accuracy
    examples: tuple              # (prediction, expected) of the first few items
    num: int


def evaluate_accuracy(cfg: ModelConfig, params: dict, *, num: int = 64, kinds: Sequence[str] = ACCURACY_KINDS,
                      tokenizer: Any = None, batch_size: int = 16, max_new_tokens: int | None = None, chat: bool = False,
                      vision_opts: formats.VisionOptions | None = None,
                      zero_pixels: bool = False, log: Callable[[str], None] | None = None) -> dict[str, KindResult]:
    """Greedy-decodes the held-out eval prompts and scores them (module docstring). max_new_tokens
    None = per kind, the longest expected answer + 8 tokens (room for eos and a little more).
    zero_pixels=True: the same prompts with every pixel value 0 (image ablation): what the model scores from
    the text prior alone, the baseline a model that reads its images must beat."""
    from qwen2vl_jax.eval import generate as gen
    from qwen2vl_jax.data.tokenizer import load_tokenizer

    bad = [k for k in kinds if k not in ACCURACY_KINDS]
    if bad:
        raise ValueError(f"accuracy kinds {bad} unknown; valid: {', '.join(ACCURACY_KINDS)}")
    if num < 2:
        raise ValueError(f"num must be >= 2 (chance levels need pairs); got {num}")
    tokenizer = tokenizer or load_tokenizer("embedded")
    stop = tuple(tokenizer.stop_ids)
    results = {}
    for kind in kinds:
        t0 = time.time()
        pairs = [formats.eval_prompt(kind, src, tokenizer, cfg, vision_opts, chat=chat)
                 for src in synthetic.heldout_scenes(kind, num)]
        prompts, expected = [p for p, _ in pairs], [e for _, e in pairs]
        if zero_pixels:
            prompts = [{**p, "pixel_values": np.zeros_like(p["pixel_values"])} for p in prompts]
        # one padded length per kind: every batch of this kind reuses the same compiled decode loop
        length = -(-max(len(p["input_ids"]) for p in prompts) // 8) * 8
        new_tokens = max_new_tokens or max(len(tokenizer.encode(e)) for e in expected) + 8
        preds = []
        for i in range(0, num, batch_size):
            chunk = prompts[i:i + batch_size]
            chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))          # static batch shape
            pb = gen.prepare_prompts(cfg, chunk, length=length)
            out = gen.generate(cfg, params, pb, max_new_tokens=new_tokens, eos_ids=stop)
            for b in range(min(batch_size, num - i)):
                ids = [t for t in out.row(b, eos_ids=stop) if t < tokenizer.vocab_size]   # drop embedding padding ids
                preds.append(tokenizer.decode(ids))
        scores, chance = {}, {}
        for name in metrics_of(kind):
            scores[name] = float(np.mean([metric(name, p, e) for p, e in zip(preds, expected)]))
            chance[name] = chance_level(name, expected)
        results[kind] = KindResult(kind=kind, scores=scores, chance=chance,
                                   examples=tuple(zip(preds[:3], expected[:3])), num=num)
        if log:
            log(f"{kind}: " + ", ".join(f"{n} {scores[n]:.3f} (chance {chance[n]:.3f})" for n in scores)
                + f"  [{time.time() - t0:.0f}s]")
    return results


def by_metric(results: dict[str, KindResult], field: str = "scores") -> dict[str, float]:
    """{metric: value} over all kinds of an evaluate_accuracy result (field "scores" or "chance")."""
    return {name: v for r in results.values() for name, v in getattr(r, field).items()}


def accuracy_table(results: dict[str, KindResult], zeroed: dict[str, KindResult] | None = None) -> str:
    """One line per metric: accuracy, chance; with `zeroed` (the same evaluation with zero_pixels=True) also
    the accuracy on blank images."""
    lines = [f"{'metric':<16} {'accuracy':>9} {'chance':>8}" + (f" {'blank images':>13}" if zeroed else "") + "   n"]
    for kind, r in results.items():
        for name in r.scores:
            blank = f" {zeroed[kind].scores[name]:>13.3f}" if zeroed else ""
            lines.append(f"{name:<16} {r.scores[name]:>9.3f} {r.chance[name]:>8.3f}{blank}   {r.num}")
    return "\n".join(lines)
