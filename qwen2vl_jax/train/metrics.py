"""Training metrics: one console line per logged step and TensorBoard scalars (tensorboardX).

Only process 0 writes. The TensorBoard folder may be local or gs:// (tensorboardX uploads event files to Cloud
Storage itself; `tensorboard --logdir gs://BUCKET/RUN/tensorboard` reads them). Console line:
  step 120/400 | loss 3.2514 | lr 9.8e-04 | gnorm 0.84 | 11.2k tok/s | mfu n/a | pack 0.93 | skip smp 0 | skip stp 0
TensorBoard tags: ``train/<metric>`` for step metrics, ``data/<counter>`` for pipeline counters,
``eval/<name>`` for anything passed to `log_eval`.
"""
from __future__ import annotations

import sys
from typing import Collection, Mapping, TextIO

import jax

from qwen2vl_jax.train import paths


def _fmt_rate(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def format_line(step: int, total: int, m: Mapping[str, float]) -> str:
    mfu = m.get("mfu")
    parts = [
        f"step {step}/{total}",
        f"loss {m['loss']:.4f}",
        f"lr {m['lr']:.2e}",
        f"gnorm {m['grad_norm']:.3g}",
        f"{_fmt_rate(m.get('tokens_per_s', 0.0))} tok/s",
        "mfu n/a" if mfu is None else f"mfu {100 * mfu:.1f}%",
        f"pack {m.get('packing_efficiency', 0.0):.2f}",
        f"skip smp {int(m.get('skipped_samples', 0))}",
        f"skip stp {int(m.get('skipped_steps', 0))}",
    ]
    return " | ".join(parts)


class MetricsLogger:
    """Console + TensorBoard writer (no-op on processes other than 0)."""

    def __init__(self, logdir: str | None, stream: TextIO | None = None):
        self.active = jax.process_index() == 0
        self.stream = stream or sys.stdout
        self.writer = None
        if self.active and logdir:
            from tensorboardX import SummaryWriter
            paths.makedirs(logdir)
            self.writer = SummaryWriter(logdir)

    def log_train(self, step: int, total: int, metrics: Mapping[str, float], data_stats: Mapping[str, float] = ()):
        if not self.active:
            return
        print(format_line(step, total, metrics), file=self.stream, flush=True)
        if self.writer is not None:
            for k, v in metrics.items():
                if v is not None and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", float(v), step)
            for k, v in dict(data_stats).items():
                self.writer.add_scalar(f"data/{k}", float(v), step)

    def log_eval(self, step: int, values: Mapping[str, float], hide: Collection[str] = ()):
        """`hide`: names left off the console line (an evaluator's entries that repeat another one's samples);
        TensorBoard gets every value."""
        if not self.active:
            return
        print(f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in values.items() if k not in hide),
              file=self.stream, flush=True)
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"eval/{k}", float(v), step)

    def message(self, text: str):
        if self.active:
            print(text, file=self.stream, flush=True)

    def close(self):
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
