"""The TPU results table: per model size and stage, the registry's default layout compiled ahead of time for
its slice, with its memory and step-time estimate (no TPU needed; libtpu compiles on this CPU).

    python -m benchmarks.estimates                                  # every row; appends to estimates.jsonl
    python -m benchmarks.estimates --rows=2b/2,72b/2,72b/3          # those rows only
    python -m benchmarks.estimates --table_only                     # the table of what --results holds

Rows: 2B, 7B and 72B x stages 1-3 on v5p at the registry's slice, mesh, microbatches and remat
(experiments/stages.py TPU_LAYOUTS), and 2B on v6e (ROWS). Each row is one `python -m launch.aot --estimate
--json=<--results>` process (one compile: minutes on a 2-core CPU; a 72B one takes longest), run one after the
other; the table shows the newest record of each row. Every time in it is an ESTIMATE (launch.aot
--estimate over the compiled program), never a measurement on a chip. Two columns per row: the compiler
view, THE estimate (the TPU compiler's own per-op cycles with loop trip counts + the ops it gives no cycles
at their roofline time + the attention kernels modelled: lane-padded FLOPs at the fraction of peak the
compiler gives the program's matmuls; docs/performance.md), and beside it the roofline, an upper bound on
speed (max of compute at peak, HBM, ICI). MFU is flops.py's useful FLOPs (1024-patch images, 2048-token
documents) over the step time at the chip's bf16 peak. A record written before the compiler view existed
shows its roofline only.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

from absl import flags

from experiments import flags as cli


@dataclasses.dataclass(frozen=True)
class Row:
    model: str
    stage: int
    topology: str | None = None          # None: the registry's
    overrides: tuple[str, ...] = ()      # --set key=value of launch.aot
    microbatches: str | None = None      # launch.aot --microbatches (None: the registry's)

    @property
    def key(self) -> str:
        return f"{self.model}/{self.stage}" + (f"@{self.topology}" if self.topology else "")

    def argv(self, results: str) -> list[str]:
        args = [sys.executable, "-m", "launch.aot", f"--experiment=stage{self.stage}", f"--model={self.model}",
                "--estimate", f"--json={results}"]
        args += [f"--topology={self.topology}"] if self.topology else []
        args += [f"--set={o}" for o in self.overrides]
        args += [f"--microbatches={self.microbatches}"] if self.microbatches else []
        return args


# The rows first (2B stage 2, 72B stages 2 and 3), then the rest. 2B on v6e (32 GiB per chip): the
# registry's dots_attention row does not fit, so full remat with the microbatches that fit.
ROWS: tuple[Row, ...] = (
    Row("2b", 2), Row("72b", 2), Row("72b", 3),
    Row("2b", 1), Row("2b", 3),
    Row("7b", 1), Row("7b", 2), Row("7b", 3),
    Row("72b", 1),
    Row("2b", 1, "v6e-64", ("model.remat_policy=full",), "2"),
    Row("2b", 2, "v6e-64", ("model.remat_policy=full",), "2"),
    Row("2b", 3, "v6e-64", ("model.remat_policy=full",), "auto"),
)

FLAGS = flags.FlagValues()
flags.DEFINE_list("rows", None, f"rows to compile, as model/stage[@topology] (default: all: "
                  f"{', '.join(r.key for r in ROWS)})", flag_values=FLAGS)
flags.DEFINE_string("results", "estimates.jsonl", "JSON lines of launch.aot --json: appended to, and the "
                    "table is read from it", flag_values=FLAGS)
flags.DEFINE_bool("table_only", False, "print the table of --results without compiling", flag_values=FLAGS)
flags.DEFINE_integer("timeout_s", 3600, "per row", flag_values=FLAGS)
flags.DEFINE_string("mix", None, "instead of compiling: per block size, the attention pairs the block-sparse kernels "
                    "visit over the useful pairs, their modelled time and the block choose_block picks, on rows "
                    "packed from each stage's data mixture at this model's sizes (2b, ...) and from a LLaVA-like "
                    "length distribution", flag_values=FLAGS)
flags.DEFINE_integer("mix_rows", 4, "packed rows per mix for --mix", flag_values=FLAGS)


def row_key(rec: dict) -> str:
    """The ROWS key of a launch.aot --json record (its model, stage and, when not the registry's, slice)."""
    argv = rec.get("argv", [])
    get = lambda name: next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), None)  # noqa: E731
    model, stage, topo = get("model"), (get("experiment") or "").removeprefix("stage"), get("topology")
    return f"{model}/{stage}" + (f"@{topo}" if topo else "")


def _mesh(mesh: dict) -> str:
    parts = [f"{k} {v}" for k, v in mesh.items() if v > 1]
    return " x ".join(parts) or "1 device"


def table(records: list[dict]) -> str:
    """Markdown table of the newest record per row, in ROWS order (rows not in ROWS after them)."""
    newest: dict[str, dict] = {}
    for rec in records:
        newest[row_key(rec)] = rec
    order = [r.key for r in ROWS] + sorted(k for k in newest if k not in {r.key for r in ROWS})
    head = ("| model | stage | slice (chips) | mesh | microbatches | remat | memory GiB / device | step s, "
            "compiler view (estimate) | MFU, compiler view (estimate) | step s, roofline (upper bound) | MFU, "
            "roofline (upper bound) | dominant term | compute / HBM / ICI s | compiled | date |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in order:
        rec = newest.get(key)
        if rec is None:
            continue
        if "memory_gib" not in rec:
            lines.append(f"| {key} | | | | | | does not fit: {rec.get('error', '')[:120]} | | | | | | | | "
                         f"{rec.get('date', '')} |")
            continue
        fits = "" if rec["fits"] else f" (over {rec['hbm_gib']:.0f})"
        terms = " / ".join(f"{rec['terms_s'][k]:.1f}" for k in ("compute", "hbm", "ici")) if "step_s" in rec else ""
        view = ("| {compiler_view_s:.2f} | {mfu_compiler_view:.2f} ".format(**rec) if "mfu_compiler_view" in rec
                else "| | ")
        est = (view + "| {step_s:.2f} | {mfu:.2f} | {bound} | {terms} ".format(terms=terms, **rec)
               if "step_s" in rec else "| | | | | | ")
        lines.append(f"| {rec['model']} | {rec['stage']} | {rec['topology']} ({rec['chips']}) | {_mesh(rec['mesh'])} "
                     f"| {rec['microbatches']} | {rec['remat']} | {rec['memory_gib']:.1f}{fits} {est}"
                     f"| {rec['compile_s']:.0f} s | {rec['date'][:10]} |")
    return "\n".join(lines)


def llava_like_rows(rows: int, seq_len: int, max_patches: int, seed: int = 0):
    """(patch segment ids [rows, max_patches], token segment ids [rows, seq_len]) packed by the packer from
    a LLaVA-like length distribution: one image per sample, a merged grid of h x w tokens (h, w in 8..20,
    64..320 tokens: 256-1280 patches), the document its image tokens + 2 vision marks + 30-280 text
    tokens (~100-600 tokens)."""
    import numpy as np
    from qwen2vl_jax.data import packing
    r = np.random.default_rng(seed)
    packer = packing.OnlinePacker(seq_len, max_patches, lookahead=32)
    sizes, done, key = {}, [], 0
    while len(done) < rows:
        while True:
            h, w = r.integers(8, 21, size=2)
            if 64 <= h * w <= 320:
                break
        sizes[key] = (int(h * w + 2 + r.integers(30, 281)), int(4 * h * w))
        done += packer.push(key, *sizes[key])
        key += 1
    vision, decoder = np.zeros((rows, max_patches), np.int32), np.zeros((rows, seq_len), np.int32)
    for row, keys in enumerate(done[:rows]):
        for seg_ids, col in ((decoder, 0), (vision, 1)):
            at = 0
            for i, k in enumerate(keys, 1):
                seg_ids[row, at:at + sizes[k][col]] = i
                at += sizes[k][col]
    return vision, decoder


def mix_rows(model: str, rows: int) -> list[tuple]:
    """(mix name, patch segment ids, token segment ids, vision head_dim, decoder head_dim): `rows` rows
    packed from each stage's mixture at `model`'s sizes, and LLaVA-like rows at stage 2's row shape."""
    from experiments import registry
    from qwen2vl_jax.data import pipeline, tokenizer as tokenizer_lib
    out = []
    for stage in (1, 2, 3):
        exp = registry.get_experiment(f"stage{stage}", model)
        batch = next(pipeline.make_iterator(exp.data, exp.model, tokenizer_lib.load_for(exp.tokenizer, exp.model),
                                            batch_size=rows))
        out.append((f"stage {stage}", batch["patch_segment_ids"], batch["segment_ids"], exp.model.vision.head_dim,
                    exp.model.head_dim))
    exp = registry.get_experiment("stage2", model)
    out.append(("llava-like", *llava_like_rows(rows, exp.data.seq_len, exp.data.max_patches),
                exp.model.vision.head_dim, exp.model.head_dim))
    return out


def attention_mix(model: str, rows: int) -> list[tuple]:
    """Per mix and tower: (mix, tower, block size, visited / useful pairs, modelled kernel seconds per query
    head over the rows, chosen, useful pairs per row, mean segment length, non-padding fraction). Visited:
    what the block-sparse kernels compute (square blocks of that size) over the (query, key) pairs that
    attend (flops.attention_pairs); modelled seconds and the chosen size: block_sparse_attention's
    `modelled_seconds` / `choose_block` (a fixed cost per grid step + FLOPs at peak)."""
    import numpy as np
    from qwen2vl_jax.model import block_sparse_attention as bsa
    from qwen2vl_jax.train import flops
    out = []
    for mix, vision, decoder, vision_hd, decoder_hd in mix_rows(model, rows):
        for tower, seg, causal, hd in (("vision", vision, False, vision_hd), ("decoder", decoder, True, decoder_hd)):
            useful = flops.attention_pairs(seg, causal)
            lengths = np.concatenate([np.bincount(r[r > 0])[1:] for r in seg])
            lengths = lengths[lengths > 0]
            chosen = bsa.choose_block(seg, causal=causal, head_dim=hd)
            for b in bsa.BLOCK_CHOICES:
                visited = int(np.sum(np.asarray(bsa.visited_pairs(seg, seg, causal=causal, block_q=b, block_kv=b),
                                                np.int64))) * b * b
                out.append((mix, tower, b, visited / max(useful, 1),
                            bsa.modelled_seconds(seg, causal=causal, block=b, head_dim=hd), b == chosen,
                            useful / rows, float(lengths.mean()), float((seg > 0).mean())))
    return out


def read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def select(keys: list[str] | None) -> list[Row]:
    if not keys:
        return list(ROWS)
    by_key = {r.key: r for r in ROWS}
    bad = [k for k in keys if k not in by_key]
    if bad:
        raise ValueError(f"--rows {','.join(bad)}: unknown; valid: {', '.join(by_key)}")
    return [by_key[k] for k in keys]


def main(argv) -> int:
    cli.parse(FLAGS, argv, __doc__)
    try:
        rows = select(FLAGS.rows)
    except ValueError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    if FLAGS.mix:
        print("| mix | tower | block | visited / useful pairs | modelled kernel ms per head (estimate) | chosen | "
              "useful pairs per row | mean segment | filled |")
        print("|---|---|---|---|---|---|---|---|---|")
        for mix, tower, b, ratio, secs, chosen, per_row, mean, fill in attention_mix(FLAGS.mix, FLAGS.mix_rows):
            print(f"| {mix} | {tower} | {b} | {ratio:.2f} | {secs * 1e3:.2f} | {'yes' if chosen else ''} | "
                  f"{per_row:.3g} | {mean:.0f} | {fill:.0%} |")
        return 0
    if not FLAGS.table_only:
        for i, row in enumerate(rows, 1):
            cmd = row.argv(FLAGS.results)
            print(f"[{i}/{len(rows)}] {row.key}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.time()
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=FLAGS.timeout_s)
                last = (done.stdout.strip().splitlines() or [""])[-1]
                err = (done.stderr.strip().splitlines() or [""])[-1] if done.returncode else ""
                print(f"    exit {done.returncode} after {time.time() - t0:.0f} s: {err or last}", flush=True)
            except subprocess.TimeoutExpired:
                print(f"    timed out after {FLAGS.timeout_s} s", flush=True)
    print(table(read(FLAGS.results)))
    return 0


if __name__ == "__main__":
    cli.run(main)
