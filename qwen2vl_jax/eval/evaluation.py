"""Evaluation: held-out loss by mixture source and by data kind, and task accuracy.

(a) Held-out loss (`HeldoutEvaluator`): the first `num_samples` samples of each source of a data mixture's
    held-out split, decoded as the training pipeline decodes them (pipeline.SampleDecoder: same tokenizer,
    pixel budgets and video sampling), grouped by (source, data kind = the sample's `sample_type`) and packed
    once, offline, into global batches of the training shapes [B, S] / [B, P, 1176]. evaluator(params) runs the
    train loss (train_step.loss_terms: same forward, same chunked cross entropy) on every batch, sharded over
    the mesh like the train step, and returns supervised-token mean NLLs:
        {"source/<label>": ..., "kind/<sample_type>": ..., "mean": mean over kinds}
    (label: sources.source_labels, distinct per source). `evaluator.repeated` names the "kind/<k>" entries that
    score exactly the samples of one "source/<label>" entry (a synthetic source is one kind): the trainer's
    console line leaves them out, TensorBoard and heldout.jsonl keep every entry. Deterministic, and the same for any
    process count: every process builds the same batches and feeds its own shard of each. It is the
    trainer's evaluation hook (experiments.stages.Experiment.evaluator), launch.evaluate's --loss (on
    `loss_mixture()`, one synthetic source per kind of LOSS_KINDS) and the sweeps' eval_loss_<kind>.
    evaluator(params, zero_pixels=True) scores the same batches with every pixel value 0 (image ablation).

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

(c) Curves (`plot_loss_curves`): training and held-out losses of consecutive runs (the pipeline's stages) on
    one figure.
"""
from __future__ import annotations

import collections
import dataclasses
import re
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from qwen2vl_jax.data import formats, media, pipeline, sources, synthetic
from qwen2vl_jax.data.packing import TRUNCATED, empty_row, pack_samples, prepare_sample, stack_rows
from qwen2vl_jax.data.pipeline import DataConfig, SampleDecoder
from qwen2vl_jax.data.tokenizer import load_tokenizer
from qwen2vl_jax.eval import generate as gen
from qwen2vl_jax.model import attention
from qwen2vl_jax.model.config import ModelConfig
from qwen2vl_jax.train import sharding, train_step

LOSS_KINDS = ("caption", "ocr", "grounding", "video", "chat")
ACCURACY_KINDS = ("caption", "count", "ocr", "grounding", "video", "text")
_PAIR_RE = re.compile(r"\b(" + "|".join(synthetic.COLOURS) + r")\s+(" + "|".join(synthetic.SHAPES) + r")s?\b")


# ----------------------------------------------------------------------------------------------
# (a) held-out loss

def loss_mixture(kinds: Sequence[str] = LOSS_KINDS) -> tuple[tuple[str, float], ...]:
    """A mixture of one synthetic source per data kind (a DataConfig.mixture)."""
    bad = [k for k in kinds if k not in formats.KINDS]
    if bad or not kinds:
        raise ValueError(f"loss kinds {list(kinds)}: unknown {bad}; valid: {', '.join(formats.KINDS)}")
    return tuple((f"synthetic:{k}", 1.0) for k in kinds)


def heldout_samples(data_cfg: DataConfig, model_cfg: ModelConfig, tokenizer, num_samples: int
                    ) -> dict[str, list[dict]]:
    """{source label: the first `num_samples` Tokenized samples of the source's held-out split that the
    training pipeline would pack} (synthetic: indices 0, 1, ...; ArrayRecord: the held-out files' records in
    order). Like the pipeline, unreadable records and samples that cannot fit a row (packing.prepare_sample:
    too many patches, vision cut by seq_len) are passed over; a source with none usable is a ValueError."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    pack_cfg = data_cfg.pack_config(model_cfg)
    decoder = SampleDecoder.of(data_cfg, "heldout", tokenizer, model_cfg, pack_cfg)
    specs = decoder.specs
    out = {}
    for s, (spec, label) in enumerate(zip(specs, sources.source_labels([n for n, _ in data_cfg.mixture]))):
        records = (range(pipeline.SYNTHETIC_LENGTH) if spec.kind == "synthetic"
                   else sources.arrayrecord_source(spec.arg, "heldout"))
        samples, passed_over = [], collections.Counter()
        for i in range(len(records)):
            try:
                sample = decoder.tokenized(s, records[i])
            except (media.BadMediaError, sources.BadRecordError) as e:
                passed_over[f"unreadable/{type(e).__name__}"] += 1
            else:
                _, event = prepare_sample(sample, pack_cfg, model_cfg)
                if event is None or event == TRUNCATED:
                    samples.append(sample)
                else:
                    passed_over[event] += 1
            if len(samples) == num_samples or sum(passed_over.values()) >= pipeline.MAX_UNUSABLE_RUN:
                break
        if not samples:
            raise ValueError(f"held-out split of {spec.name}: no sample fits seq_len={pack_cfg.seq_len} / "
                             f"max_patches={pack_cfg.max_patches} (passed over: {dict(passed_over)})")
        out[label] = samples
    return out


@dataclasses.dataclass(frozen=True)
class HeldoutGroup:
    """The held-out samples of one (source, data kind), packed into global batches."""
    source: str
    kind: str
    num_samples: int
    batches: tuple[dict, ...]      # numpy {key: [batch_size, ...]}; the last one padded with empty rows


class HeldoutEvaluator:
    """evaluator(params, zero_pixels=False) -> {"source/<label>", "kind/<kind>", "mean": held-out mean NLL}
    (module docstring (a)). Built once: the batches are decoded and packed here; one loss step is jitted for
    the [batch_size, seq_len] shape and reused for every group and call."""

    def __init__(self, model_cfg: ModelConfig, data_cfg: DataConfig, *, num_samples: int, batch_size: int,
                 mesh: jax.sharding.Mesh | None = None, step_cfg: train_step.StepConfig | None = None,
                 tokenizer: Any = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        tokenizer = tokenizer or load_tokenizer("embedded")
        mesh = mesh or sharding.make_mesh()
        step_cfg = step_cfg or train_step.StepConfig()
        pack_cfg = data_cfg.pack_config(model_cfg)
        groups = []
        for label, samples in heldout_samples(data_cfg, model_cfg, tokenizer, num_samples).items():
            by_kind = collections.defaultdict(list)
            for sample in samples:
                by_kind[sample["sample_type"]].append(sample)
            for kind, group in by_kind.items():
                rows, _ = pack_samples(group, pack_cfg, model_cfg)     # every sample fits (heldout_samples)
                rows += [empty_row(pack_cfg)] * (-len(rows) % batch_size)
                groups.append(HeldoutGroup(label, kind, len(group), tuple(
                    stack_rows(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size))))
        self.groups = tuple(groups)
        self.repeated = repeated_kinds(self.groups)
        self.param_shardings = train_step.param_shardings(model_cfg, mesh)
        self.batch_shardings = sharding.batch_shardings(
            train_step.batch_spec(model_cfg, batch_size, data_cfg.seq_len, data_cfg.max_patches), mesh)

        def loss_sums(params, batch):
            with attention.mesh_context(mesh):        # as in the train step (splash attention runs on it)
                _, (nll, _, n) = train_step.loss_terms(model_cfg, params, batch, step_cfg)
            return nll, n

        self._loss_sums = jax.jit(loss_sums)          # in/out shardings: those of the placed arguments

    def _place(self, batch: Mapping[str, np.ndarray]) -> dict:
        """A global batch every process holds whole -> jax.Arrays sharded like the train step's batches."""
        return {k: jax.make_array_from_callback(v.shape, self.batch_shardings[k], lambda idx, v=v: v[idx])
                for k, v in batch.items()}

    def __call__(self, params: dict, zero_pixels: bool = False) -> dict[str, float]:
        params = jax.device_put(params, self.param_shardings)       # no-op for the trainer's state.params
        sums: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])   # name -> [nll, tokens]
        for g in self.groups:
            for b in g.batches:
                if zero_pixels:      # normalised zeros (the mean image) as floats; uint8 zeros would be black
                    b = {**b, "pixel_values": np.zeros(b["pixel_values"].shape, np.float32)}
                nll, n = (float(x) for x in self._loss_sums(params, self._place(b)))
                for name in (f"source/{g.source}", f"kind/{g.kind}"):
                    sums[name][0] += nll
                    sums[name][1] += n
        out = {name: nll / max(n, 1.0) for name, (nll, n) in sums.items()}
        out["mean"] = float(np.mean([v for k, v in out.items() if k.startswith("kind/")]))
        return out


def repeated_kinds(groups: Sequence[HeldoutGroup]) -> frozenset[str]:
    """The "kind/<k>" names whose samples are exactly those of one source: every group of kind k is of one
    source, and that source holds no other kind (its "source/<label>" entry is the same loss)."""
    sources_of, kinds_of = collections.defaultdict(set), collections.defaultdict(set)
    for g in groups:
        sources_of[g.kind].add(g.source)
        kinds_of[g.source].add(g.kind)
    return frozenset(f"kind/{k}" for k, srcs in sources_of.items()
                     if len(srcs) == 1 and kinds_of[next(iter(srcs))] == {k})


def kind_losses(losses: Mapping[str, float]) -> dict[str, float]:
    """{kind: loss} of an evaluator result."""
    return {k.split("/", 1)[1]: v for k, v in losses.items() if k.startswith("kind/")}


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


# ----------------------------------------------------------------------------------------------
# (c) curves

def plot_loss_curves(runs: Sequence[tuple[str, Mapping[int, float], Mapping[int, Mapping[str, float]]]],
                     path: str, title: str = "") -> None:
    """One figure of consecutive runs [(name, {step: training loss}, {step: evaluator result})], each run's
    steps after the previous run's last: the training loss (grey) and the held-out loss of every data kind
    ("kind/<kind>" entries; one colour per kind across runs), a dashed line where a run starts. PNG at `path`."""
    import matplotlib                     # imported here: a plotting backend is needed only for this figure
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({k for _, _, evals in runs for e in evals.values() for k in kind_losses(e)})
    colour = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(11, 4.5))
    offset, labelled = 0, set()
    for name, losses, evals in runs:
        if offset:
            ax.axvline(offset, color="0.6", linestyle="--", linewidth=0.8)
        ax.text(offset, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top", fontsize=9)
        steps = sorted(losses)
        ax.plot([offset + s for s in steps], [losses[s] for s in steps], color="0.55", linewidth=0.8,
                label=None if "train" in labelled else "training loss")
        labelled.add("train")
        eval_steps = sorted(evals)
        for k in kinds:
            pts = [(offset + s, kind_losses(evals[s])[k]) for s in eval_steps if k in kind_losses(evals[s])]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3.5, color=colour[k],
                        label=None if k in labelled else f"held-out {k}")
                labelled.add(k)
        offset += max(steps + eval_steps, default=0)
    ax.set_xlabel("step (runs one after another)")
    ax.set_ylabel("loss (mean NLL per supervised token)")
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
