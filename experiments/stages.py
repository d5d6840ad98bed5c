"""The paper's three training stages as frozen experiment configs, per model size.

What the Qwen2-VL paper (arXiv 2409.12191, §2.2) states and we follow:
  stage 1  trains the ViT only (vision tower + merger), LLM frozen; image-text pairs, OCR and image
           classification; ~600B tokens
  stage 2  trains everything; adds interleaved image-text, VQA / multitask, video and pure text; ~800B
  stage 3  ViT tower frozen, LLM (and merger) fine-tuned on ChatML instruction data; budget not stated
What the paper does not give and we chose (overridable with --set):
  sequence length  8192 (stage 1), 16384 (stage 2: a video may take 16384 tokens, paper §2.1), 32768 (stage 3,
                   the stated 32K context); max_patches = 2 x seq_len (up to half the tokens visual)
  batch            ~4M tokens per step: 512 x 8192, 256 x 16384, 128 x 32768 rows
  stage 3 budget   20B tokens
  schedule         warmup (2000 steps) + cosine to 10% of peak; peak LR 2e-4 / 1e-4 / 1e-5 per stage
                   (x0.5 for 72B); AdamW b2=0.95, wd 0.1, clip 1.0
  data mixture     STAGE_MIXTURE: the paper names each stage's data kinds but no ratios; the weights are ours
  TPU layout       TPU_LAYOUTS: per size and stage the slice, mesh, microbatches and remat policy, chosen from
                   the compiled step's memory and step-time estimate (launch.aot --estimate)
Data: the embedded synthetic sources (qwen2vl_jax.data) stand in for each category: caption (image-text
pairs), ocr, count (classification-like), grounding / count (VQA, multitask), interleaved, video,
chat (ChatML). Real corpora: `--data=DIR` (launch.prepare_data's output, see `data_source`) or a weighted
mixture `--set data.mixture="(('arrayrecord:/path/{split}/*.array_record', 1.0), ...)"`.
`tiny` / `test` run the same recipe with CPU-sized lengths, batches, budgets and image sizes
(tiny: 256 tokens x 8 rows, patch rows per row from CPU_PATCHES_PER_TOKEN, <= 16*28*28 pixels per image (48*28*28 per video),
60/400/80 steps; the ViT and merger at 5x the learning rate).
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os

from qwen2vl_jax.data import sources
from qwen2vl_jax.data.pipeline import DataConfig
from qwen2vl_jax.data import tokenizer as tokenizer_lib
from qwen2vl_jax.eval.evaluation import HeldoutEvaluator
from qwen2vl_jax.model.config import ModelConfig, get_config
from qwen2vl_jax.train import optim, sharding
from qwen2vl_jax.train.checkpoint import RUN_CHECKPOINTS, CheckpointConfig
from qwen2vl_jax.train.sharding import MeshConfig
from qwen2vl_jax.train.train_step import StepConfig

MODELS = ("test", "tiny", "2b", "7b", "72b")


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    stage: int
    model: ModelConfig
    data: DataConfig
    trainable: tuple[str, ...]
    batch_size: int                 # global packed rows per optimizer step
    token_budget: int               # packed positions (B x S per step, vision pads included)
    optim: optim.OptimConfig
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    steps: int = 0                  # 0 = ceil(token_budget / (batch_size * seq_len))
    microbatches: int = 1
    topology: str = ""              # the TPU slice mesh, microbatches and remat were sized for (launch.aot's default)
    z_loss: float = 0.0
    loss_chunk: int = 512
    max_consecutive_skips: int = 5
    init_from: str = ""             # params to start from: a run / its checkpoints, a converted or a HF folder
    workdir: str = ""               # checkpoints/ and tensorboard/ go here; "" = runs/<name>_<model>
    log_every: int = 10
    eval_every: int = 0             # held-out loss by source and by data kind every N steps (0 = off)
    eval_samples: int = 64          # held-out samples per mixture source
    eval_mixture: tuple[tuple[str, float], ...] = ()   # sources of the held-out loss; () = data.mixture
    seed: int = 0
    tokenizer: str = ""             # "embedded", "qwen2" or a tokenizer.json; "" = the one `model` was built for

    def __post_init__(self):
        if not self.tokenizer:
            object.__setattr__(self, "tokenizer", tokenizer_lib.default_for(self.model))
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage={self.stage}; valid: 1, 2, 3")
        optim.split_params({"visual": {"patch_embed": 0, "blocks": 0, "merger": 0}, "decoder": 0},
                           self.trainable)  # validates part names
        if not (math.isfinite(self.z_loss) and self.z_loss >= 0):
            raise ValueError(f"z_loss={self.z_loss} must be a finite number >= 0")
        if self.eval_every < 0:
            raise ValueError(f"eval_every={self.eval_every} must be >= 0")
        for f in ("batch_size", "microbatches", "loss_chunk", "log_every", "max_consecutive_skips", "eval_samples"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}={getattr(self, f)} must be >= 1")
        if self.batch_size % self.microbatches:
            raise ValueError(f"batch_size={self.batch_size} not divisible by microbatches={self.microbatches}")
        if self.steps < 0 or self.token_budget < 0 or (self.steps == 0 and self.token_budget == 0):
            raise ValueError(f"need steps > 0 or token_budget > 0 (got steps={self.steps}, "
                             f"token_budget={self.token_budget})")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.data.seq_len

    @property
    def num_steps(self) -> int:
        return self.steps if self.steps > 0 else math.ceil(self.token_budget / self.tokens_per_step)

    @property
    def run_dir(self) -> str:
        return self.workdir or f"runs/{self.name}_{self.model.name}"

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.directory or f"{self.run_dir}/{RUN_CHECKPOINTS}"

    @property
    def eval_data(self) -> DataConfig:
        """The held-out loss's data: `eval_mixture` (or the training mixture) at the training row shape and
        pixel budgets."""
        return dataclasses.replace(self.data, mixture=self.eval_mixture) if self.eval_mixture else self.data

    def step_config(self) -> StepConfig:
        total = self.optim.total_steps or self.num_steps
        return StepConfig(trainable=self.trainable, microbatches=self.microbatches, z_loss=self.z_loss,
                          loss_chunk=self.loss_chunk, max_consecutive_skips=self.max_consecutive_skips,
                          optim=dataclasses.replace(self.optim, total_steps=total))

    def evaluator(self) -> HeldoutEvaluator | None:
        """The trainer's evaluation hook: the held-out loss of `eval_samples` samples of each source of
        `eval_data`, in batches of the training shape on the training mesh; None when eval_every is 0."""
        if not self.eval_every:
            return None
        return HeldoutEvaluator(self.model, self.eval_data, num_samples=self.eval_samples,
                                batch_size=self.batch_size, mesh=sharding.make_mesh(self.mesh),
                                step_cfg=self.step_config(), tokenizer=tokenizer_lib.load_for(self.tokenizer, self.model))


# ----------------------------------------------------------------------------------------------
# --data

def data_source(arg: str) -> str:
    """The mixture source of `--data=DIR_OR_GLOB`: launch.prepare_data's output folder (DIR/train/ and
    DIR/heldout/ shards: training reads train, the held-out loss heldout), a folder of shards (one split), or
    a glob ("{split}" in it is replaced by the split name). ValueError when it names no shard."""
    path = os.path.abspath(os.path.expanduser(arg))
    shards = os.path.join(path, "*" + sources.SHARD_SUFFIX)
    if os.path.isdir(path) and not os.path.isdir(os.path.join(path, "train")):
        if not glob.glob(shards):
            raise ValueError(f"--data={arg}: the folder has neither train/ (launch.prepare_data's output) nor "
                             f"*{sources.SHARD_SUFFIX} shards (found {sorted(os.listdir(path))[:8]})")
        path = shards
    train = sources.split_pattern(path, "train")
    if not glob.glob(train):
        raise ValueError(f"--data={arg}: no file matches {train}")
    return f"arrayrecord:{path}"


# ----------------------------------------------------------------------------------------------
# per-stage recipe

STAGE_MIXTURE = {
    1: (("synthetic:caption", 0.5), ("synthetic:ocr", 0.3), ("synthetic:count", 0.2)),
    2: (("synthetic:caption", 0.2), ("synthetic:ocr", 0.15), ("synthetic:count", 0.1),
        ("synthetic:grounding", 0.15), ("synthetic:interleaved", 0.2), ("synthetic:video", 0.2)),
    3: (("synthetic:chat", 1.0),),
}
STAGE_DESCRIPTION = {
    1: "Stage 1: train the ViT (tower + merger), LLM frozen; image-text, OCR, classification-like data",
    2: "Stage 2: train all parameters; + interleaved, VQA/grounding, video",
    3: "Stage 3: instruction tuning (ChatML); ViT tower frozen, merger + LLM trained",
}
PAPER_SEQ_LEN = {1: 8192, 2: 16384, 3: 32768}
PAPER_BATCH = {1: 512, 2: 256, 3: 128}
PAPER_TOKENS = {1: 600_000_000_000, 2: 800_000_000_000, 3: 20_000_000_000}
PAPER_LR = {1: 2e-4, 2: 1e-4, 3: 1e-5}


# CPU sizes: at most 16 merged tokens (64 patches) per image and 48 per video. A CPU run has few steps, so an
# image must leave room in a 256-token row for several samples and their supervised text: with large images
# a row holds one or two samples and the tiny model learns to ignore the image; small ones give it several
# captions per row to learn from (more pixels did not learn faster per step and cost more per step).
CPU_VISION = dict(image_max_pixels=16 * 28 * 28, video_max_pixels=16 * 28 * 28, video_total_pixels=48 * 28 * 28)


# Patch rows per token of the embedded data's stage mixtures under CPU_VISION, measured with
# `pipeline.balanced_max_patches` (200 samples, tiny config; tests/launch/test_experiments.py re-measures it).
# A row's patch budget must follow the data's ratio, or patches bind first and token efficiency collapses
# (2 x seq_len gave 53% token efficiency on tiny stage 1).
CPU_PATCHES_PER_TOKEN = {1: 2.2, 2: 2.0, 3: 1.05}


def max_patches(model: str, stage: int, seq_len: int) -> int:
    """Patch rows per packed row: the embedded data's ratio on CPU sizes; 2 x seq_len at paper sizes (real
    corpora carry more text per image than the synthetic scenes: set data.max_patches from
    `pipeline.balanced_max_patches` on your mixture)."""
    if model in ("tiny", "test"):
        return max(256, 4 * math.ceil(CPU_PATCHES_PER_TOKEN[stage] * seq_len / 4))
    return 2 * seq_len


@dataclasses.dataclass(frozen=True)
class Scale:
    """Model-size dependent settings of a stage."""
    seq_len: int
    batch_size: int
    token_budget: int
    peak_lr: float
    warmup_steps: int
    mesh: MeshConfig
    checkpoint_every: int
    log_every: int
    eval_every: int = 0
    lr_scale: tuple[tuple[str, float], ...] = ()
    model_overrides: tuple[tuple[str, object], ...] = ()
    microbatches: int = 1
    topology: str = ""
    loss_chunk: int = 512


@dataclasses.dataclass(frozen=True)
class TpuLayout:
    """How a paper-size stage runs on TPU: the slice, the mesh over it, gradient-accumulation steps and the
    remat policy (and the loss's sequence chunk). Each was chosen from the compiled step's memory and
    `launch.aot --estimate` on that slice (docs/performance.md has the table and the commands)."""
    topology: str
    mesh: MeshConfig
    microbatches: int
    remat: str
    loss_chunk: int = 512


# Why these (estimates per device per step; docs/performance.md): every paper-size step is compute-bound, far
# from ICI-bound, so the layout with the fewest recomputed FLOPs and the least communication that fits wins.
# 2B: fsdp only (tensor parallelism adds activation all-reduces and nothing else at this size); no matmul or
# attention kernel recomputed ("dots_attention") at the microbatches that needs (stage 2: 6.85 -> 5.68 s
# against full remat in one microbatch; the weight all-gathers repeated per microbatch cost ~0.3 s of ICI).
# 7B and 72B: saving the projections does not fit, so layer inputs only ("full"). 72B stage 2 on v5p-256:
# tensor 2 (fsdp 64, 4 microbatches, 58.8 GiB) against tensor 8 (fsdp 16, 8 microbatches, 72.2 GiB): the
# same 40.2 s of compute, ICI 19.7 -> 8.2 s, HBM 16.5 -> 7.5 s, no-overlap sum 76.4 -> 55.9 s (tensor 1,
# fsdp 128: 55.7 s at 72.2 GiB). Stage 3 on v5p-512: tensor 4 (fsdp 64, 2 microbatches, 63.1 GiB) against
# tensor 8 (fsdp 32, 4 microbatches, 55.9 GiB): the same 19.8 s of compute, no-overlap sum 36.4 -> 28.9 s.
# 2B loss chunk 2048 (not 512): each chunk adds its output-embedding gradient into a full fp32 [D, V]
# accumulator, so 4x fewer chunks read and write it 4x less (stage 2 compiler view 12.29 -> 12.14 s, +1.2 GiB).
TPU_LAYOUTS: dict[tuple[str, int], TpuLayout] = {
    ("2b", 1): TpuLayout("v5p-64", MeshConfig(data=1, fsdp=-1), 8, "dots_attention", loss_chunk=2048),
    ("2b", 2): TpuLayout("v5p-64", MeshConfig(data=1, fsdp=-1), 8, "dots_attention", loss_chunk=2048),
    ("2b", 3): TpuLayout("v5p-64", MeshConfig(data=1, fsdp=-1), 4, "dots_attention", loss_chunk=2048),
    ("7b", 1): TpuLayout("v5p-128", MeshConfig(data=1, fsdp=-1), 1, "full"),
    ("7b", 2): TpuLayout("v5p-128", MeshConfig(data=1, fsdp=-1), 1, "full"),
    ("7b", 3): TpuLayout("v5p-128", MeshConfig(data=1, fsdp=-1), 1, "full"),
    ("72b", 1): TpuLayout("v5p-256", MeshConfig(data=1, fsdp=-1, tensor=2), 4, "full"),
    ("72b", 2): TpuLayout("v5p-256", MeshConfig(data=1, fsdp=-1, tensor=2), 4, "full"),
    ("72b", 3): TpuLayout("v5p-512", MeshConfig(data=1, fsdp=-1, tensor=4), 2, "full"),
}


def scale(model: str, stage: int) -> Scale:
    if model in ("tiny", "test"):
        seq = {"tiny": 256, "test": 128}[model]
        batch = {"tiny": 8, "test": 4}[model]
        steps = {"tiny": {1: 60, 2: 400, 3: 80}, "test": {1: 20, 2: 20, 3: 10}}[model][stage]
        lr = {1: 2e-3, 2: 1e-3, 3: 5e-4}[stage]
        # The from-scratch tiny ViT learns far slower than the decoder's text prior: 5x its learning rate
        # (judged by the held-out loss gap between real and zeroed pixels, which it widens).
        vision_lr = tuple((part, 5.0) for part in optim.STAGE_TRAINABLE[stage] if part != "llm")
        return Scale(seq, batch, steps * seq * batch, lr, warmup_steps=max(2, steps // 20),
                     mesh=MeshConfig(data=-1), checkpoint_every=max(5, steps // 4), log_every=max(1, steps // 20),
                     eval_every=steps // 4 if model == "tiny" else 0, lr_scale=vision_lr)
    lr = PAPER_LR[stage] * (0.5 if model == "72b" else 1.0)
    tpu = TPU_LAYOUTS[model, stage]
    return Scale(PAPER_SEQ_LEN[stage], PAPER_BATCH[stage], PAPER_TOKENS[stage], lr, warmup_steps=2000,
                 mesh=tpu.mesh, checkpoint_every=1000, log_every=10, microbatches=tpu.microbatches,
                 topology=tpu.topology, loss_chunk=tpu.loss_chunk,
                 model_overrides=(("dtype", "bfloat16"), ("remat_policy", tpu.remat), ("attention_impl", "auto")))


def stage_experiment(stage: int, model: str) -> Experiment:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; valid: {', '.join(MODELS)}")
    s = scale(model, stage)
    cfg = get_config(model, **dict(s.model_overrides))
    data = DataConfig(mixture=STAGE_MIXTURE[stage], seq_len=s.seq_len, max_patches=max_patches(model, stage, s.seq_len),
                      **(CPU_VISION if model in ("tiny", "test") else {}))
    return Experiment(
        name=f"stage{stage}", description=STAGE_DESCRIPTION[stage], stage=stage, model=cfg, data=data,
        trainable=optim.STAGE_TRAINABLE[stage], batch_size=s.batch_size, token_budget=s.token_budget,
        optim=optim.OptimConfig(peak_lr=s.peak_lr, warmup_steps=s.warmup_steps, lr_scale=s.lr_scale),
        mesh=s.mesh, checkpoint=CheckpointConfig(every=s.checkpoint_every), log_every=s.log_every,
        eval_every=s.eval_every, microbatches=s.microbatches, topology=s.topology, loss_chunk=s.loss_chunk)
