"""Scaling-law sweeps: named grids of (model size x token budget [x learning rate]) training runs.

A `Sweep` expands into `SweepPoint`s. Each point is one training run of a registry experiment
(`experiment`, default stage2: everything trainable, the full data mixture) with a model config
derived from a base preset (decoder width/depth/heads from a `ModelSize`, vision tower fixed per
sweep), a number of optimizer steps (= token budget / (batch * seq_len)) and a learning rate.
`point.key` is a hash of the point's full config (model config, experiment overrides, steps, lr),
so a results table knows which points already ran, whatever order or subset is run.

Sweeps:
  cpu_small     4 tiny decoders x 3 token budgets at a fixed 2-layer ViT: the CPU-sized real sweep.
  scaling_llm   Qwen2-style decoders from ~0.1B to ~1.5B at the fixed 675M ViT (paper: one ViT for all
                sizes), each at 3 token budgets: how loss scales with the LLM.
  scaling_data  the 2B model at 6 token budgets (1B .. 32B tokens): how loss scales with data.
  scaling_llm_lr  scaling_llm's grid at 3 learning rates (one results row per learning rate).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from experiments import registry
from qwen2vl_jax.eval import evaluation
from qwen2vl_jax.model import hf
from qwen2vl_jax.model.config import ModelConfig, VisionConfig

EVAL_KINDS = evaluation.LOSS_KINDS     # a point's held-out loss: one synthetic source per kind


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """Decoder shape. head_dim = hidden_size / heads; mrope_section is derived (1/4, 3/8, 3/8 of hd/2)."""
    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    def apply(self, base: ModelConfig, vision: VisionConfig | None) -> ModelConfig:
        hd = self.hidden_size // self.num_attention_heads
        half = hd // 2
        t = half // 4
        h = (half - t) // 2
        section = (t, h, half - t - h)
        vis = dataclasses.replace(vision or base.vision, out_hidden_size=self.hidden_size)
        return base.replace(name=self.name, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                            num_attention_heads=self.num_attention_heads,
                            num_key_value_heads=self.num_key_value_heads,
                            intermediate_size=self.intermediate_size, mrope_section=section, vision=vis)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from the contract tree's shapes: total, vision (ViT + merger), decoder
    embedding (+ untied lm_head), decoder non-embedding."""
    shapes = hf.param_shapes(cfg)

    def count(tree) -> int:
        if isinstance(tree, dict):
            return sum(count(v) for v in tree.values())
        return int(np.prod(tree))

    vision = count(shapes["visual"])
    embed = count(shapes["decoder"]["embed_tokens"]) + count(shapes.get("lm_head", {}))
    decoder = count(shapes["decoder"]) - count(shapes["decoder"]["embed_tokens"])
    total = count(shapes)
    return {"params": total, "params_vision": vision, "params_embedding": embed,
            "params_decoder_non_embedding": decoder, "params_non_embedding": total - embed}


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    sweep: str
    base_model: str                  # registry model preset the experiment recipe comes from
    size: ModelSize
    model: ModelConfig
    experiment: str
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    overrides: tuple[tuple[str, str], ...] = ()   # extra experiment fields (key, value) for --set

    @property
    def tokens(self) -> int:
        """Nominal training tokens D = steps * batch * seq_len (packed rows, padding included)."""
        return self.steps * self.batch_size * self.seq_len

    @property
    def params(self) -> int:
        return param_counts(self.model)["params"]

    @property
    def flops(self) -> float:
        """C = 6 N D (Kaplan / Hoffmann approximation)."""
        return 6.0 * self.params * self.tokens

    def config_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "experiment": self.experiment,
                "base_model": self.base_model, "steps": self.steps,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "lr": self.lr,
                "overrides": [list(kv) for kv in self.overrides]}

    @property
    def key(self) -> str:
        """12 hex digits of sha256 over the canonical JSON of `config_dict()` (not the sweep name:
        the same run in two sweeps is the same point)."""
        blob = json.dumps(self.config_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def run_name(self) -> str:
        return f"{self.sweep}-{self.size.name}-D{self.tokens:.0e}-lr{self.lr:g}-{self.key}".replace("+", "")

    def result_row(self, eval_losses: dict[str, float], extra: dict | None = None) -> dict:
        """One results-table row: identity, sizes, tokens, FLOPs, eval_loss_<kind> and their mean."""
        missing = [k for k in EVAL_KINDS if k not in eval_losses]
        if missing:
            raise ValueError(f"eval losses lack kinds {missing}; got {sorted(eval_losses)}")
        row = {"key": self.key, "sweep": self.sweep, "size": self.size.name, "run_name": self.run_name,
               **param_counts(self.model), "tokens": self.tokens, "flops": self.flops, "steps": self.steps,
               "lr": self.lr, "hidden_size": self.model.hidden_size, "layers": self.model.num_hidden_layers}
        for k in EVAL_KINDS:
            row[f"eval_loss_{k}"] = float(eval_losses[k])
        row["eval_loss_mean"] = float(np.mean([eval_losses[k] for k in EVAL_KINDS]))
        row.update(extra or {})
        return row


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    description: str
    base_model: str                    # config preset the sizes modify (vocab, special tokens, rope)
    sizes: tuple[ModelSize, ...]
    token_budgets: tuple[int, ...]     # nominal tokens; steps = budget // (batch * seq_len)
    lrs: tuple[float, ...]             # every (size, budget) runs at each of these
    batch_size: int
    seq_len: int
    experiment: str = "stage2"
    vision: VisionConfig | None = None  # fixed vision tower (None: the base preset's)
    overrides: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if not self.sizes or not self.token_budgets or not self.lrs:
            raise ValueError(f"sweep {self.name!r} needs sizes, token_budgets and lrs")
        step_tokens = self.batch_size * self.seq_len
        small = [t for t in self.token_budgets if t < step_tokens]
        if small:
            raise ValueError(f"sweep {self.name!r}: token budgets {small} below one step "
                             f"({self.batch_size} x {self.seq_len} = {step_tokens} tokens)")

    def points(self) -> list[SweepPoint]:
        base = registry.get_experiment(self.experiment, self.base_model).model   # recipe's execution fields
        out = []
        for size in self.sizes:
            model = size.apply(base, self.vision)
            for budget in self.token_budgets:
                for lr in self.lrs:
                    out.append(SweepPoint(sweep=self.name, base_model=self.base_model, size=size, model=model, experiment=self.experiment,
                                          steps=budget // (self.batch_size * self.seq_len),
                                          batch_size=self.batch_size, seq_len=self.seq_len, lr=lr,
                                          overrides=self.overrides))
        return out


# ----------------------------------------------------------------------------------------------
# The named sweeps

_CPU_VISION = VisionConfig(depth=2, embed_dim=64, num_heads=2, out_hidden_size=64)
# Smaller pictures for the CPU sweep: <= 64 LLM tokens per image, 16 per video frame pair.
_CPU_DATA = (("data.image_max_pixels", str(64 * 28 * 28)), ("data.video_max_pixels", str(16 * 28 * 28)),
             ("data.video_total_pixels", str(256 * 28 * 28)))


def _cpu_size(d: int, layers: int) -> ModelSize:
    """head_dim 32, one KV head, SwiGLU width ~2.75 D rounded to 16."""
    return ModelSize(name=f"d{d}l{layers}", hidden_size=d, num_hidden_layers=layers,
                     num_attention_heads=d // 32, num_key_value_heads=1,
                     intermediate_size=int(round(2.75 * d / 16)) * 16)


def _qwen_size(name: str, d: int, layers: int, heads: int, kv: int, inter: int) -> ModelSize:
    return ModelSize(name=name, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv, intermediate_size=inter)


_LLM_SIZES = (
    _qwen_size("llm-100m", 768, 12, 6, 2, 2048),
    _qwen_size("llm-250m", 1024, 16, 8, 2, 2816),
    _qwen_size("llm-500m", 1280, 22, 10, 2, 3584),
    _qwen_size("llm-900m", 1536, 24, 12, 2, 5632),
    _qwen_size("llm-1.5b", 1536, 28, 12, 2, 8960),   # the 2B model's decoder
)

SWEEPS: dict[str, Sweep] = {s.name: s for s in (
    Sweep(name="cpu_small", description="4 tiny decoders x 3 token budgets, fixed 2-layer ViT; CPU, < 30 min",
          base_model="tiny", sizes=tuple(_cpu_size(d, l) for d, l in ((64, 1), (96, 2), (128, 2), (192, 3))),
          token_budgets=(16 * 4 * 256, 32 * 4 * 256, 64 * 4 * 256), lrs=(3e-3,), batch_size=4, seq_len=256,
          vision=_CPU_VISION, overrides=_CPU_DATA),
    Sweep(name="scaling_llm", description="decoder 0.1B..1.5B at the fixed 675M ViT x 3 token budgets",
          base_model="2b", sizes=_LLM_SIZES, token_budgets=(2 * 10**9, 8 * 10**9, 32 * 10**9), lrs=(3e-4,),
          batch_size=256, seq_len=4096),
    Sweep(name="scaling_llm_lr", description="scaling_llm at 3 learning rates",
          base_model="2b", sizes=_LLM_SIZES, token_budgets=(2 * 10**9, 8 * 10**9, 32 * 10**9),
          lrs=(1.5e-4, 3e-4, 6e-4), batch_size=256, seq_len=4096),
    Sweep(name="scaling_data", description="the 2B model at 6 token budgets (1B..32B)",
          base_model="2b", sizes=(_LLM_SIZES[-1],), token_budgets=tuple(2**i * 10**9 for i in range(6)),
          lrs=(3e-4,), batch_size=256, seq_len=4096),
)}


def get_sweep(name: str) -> Sweep:
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; valid: {', '.join(SWEEPS)}")
    return SWEEPS[name]


def point_experiment(point: SweepPoint, root: str = "runs/sweeps", eval_samples: int = 16):
    """The registry experiment of `point` with its model, batch, steps, LR and a run dir of its own
    (ROOT/<run_name>). Warmup is 10% of the steps; the cosine runs over the point's own length. The held-out
    loss runs once, at the last step, on `eval_samples` samples of each EVAL_KINDS kind."""
    exp = registry.get_experiment(point.experiment, point.base_model, ["=".join(kv) for kv in point.overrides])
    data = dataclasses.replace(exp.data, seq_len=point.seq_len, max_patches=2 * point.seq_len)
    optim_cfg = dataclasses.replace(exp.optim, peak_lr=point.lr, warmup_steps=max(1, point.steps // 10),
                                    total_steps=0)
    ckpt = dataclasses.replace(exp.checkpoint, every=max(point.steps, 1), directory="")
    return dataclasses.replace(exp, name=f"{point.sweep}-{point.key}", model=point.model, data=data,
                               batch_size=point.batch_size, steps=point.steps, token_budget=point.tokens,
                               optim=optim_cfg, checkpoint=ckpt, workdir=f"{root}/{point.run_name}",
                               log_every=max(1, point.steps // 4), eval_every=max(point.steps, 1),
                               eval_samples=eval_samples, eval_mixture=evaluation.loss_mixture(EVAL_KINDS))
