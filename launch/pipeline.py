"""The paper's three-stage recipe end to end: stage 1 -> stage 2 -> stage 3, then task accuracy.

    python -m launch.pipeline --model=tiny [--workdir runs/pipeline_tiny] [--set key=value ...]
        [--stage_set 2:optim.peak_lr=5e-4 ...] [--eval_num 64] [--eval_after 2,3]

Each stage is the registry experiment `stage{k}` for --model (launch.pretrain.run), with its own run dir
WORKDIR/stage{k}; stage k > 1 starts from stage k-1's final checkpoint (`init_from`). A re-run resumes:
finished stages are not trained again (their checkpoints already hold the last step). After each stage in
--eval_after, held-out task accuracy is printed beside chance (evaluation.evaluate_accuracy) and beside the
accuracy on blank images (the same prompts with every pixel value 0: what the text prior alone scores), in
the pre-training prompt form after stages 1-2 and in the ChatML form after stage 3 (what each stage
trained); the figures are also written to WORKDIR/eval.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def stage_experiments(model: str, workdir: str, overrides=(), stage_overrides=()):
    """[Experiment stage1, stage2, stage3] chained through init_from."""
    from experiments import registry

    per_stage = {1: [], 2: [], 3: []}
    for item in stage_overrides:
        stage, sep, kv = item.partition(":")
        if not sep or stage not in ("1", "2", "3"):
            raise ValueError(f"--stage_set {item!r}: expected STAGE:key=value with STAGE in 1, 2, 3")
        per_stage[int(stage)].append(kv)
    exps = []
    for k in (1, 2, 3):
        sets = list(overrides) + per_stage[k] + [f"workdir={workdir}/stage{k}"]
        if k > 1:
            sets.append(f"init_from={exps[-1].checkpoint_dir}")
        exps.append(registry.get_experiment(f"stage{k}", model, sets))
    return exps


def _logged_losses(run_dir: str) -> dict[int, float]:
    """{step: loss} from launch.pretrain's losses.jsonl (the last record of a step wins)."""
    path = os.path.join(run_dir, "losses.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {int(r["step"]): float(r["loss"]) for r in map(json.loads, filter(str.strip, f))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--workdir", default=None, help="default runs/pipeline_<model>")
    ap.add_argument("--set", action="append", default=[], help="override for every stage (key=value)")
    ap.add_argument("--stage_set", action="append", default=[], help="override for one stage: STAGE:key=value")
    ap.add_argument("--eval_after", default="2,3", help="comma list of stages to evaluate after ('' = none)")
    ap.add_argument("--eval_num", type=int, default=64, help="held-out items per task")
    ap.add_argument("--eval_kinds", default="caption,count,ocr,grounding")
    ap.add_argument("--max_new_tokens", type=int, default=None, help="default: longest answer + 8")
    a = ap.parse_args(argv)

    from launch import evaluate, pretrain
    from qwen2vl_jax.eval import evaluation

    workdir = a.workdir or f"runs/pipeline_{a.model}"
    eval_after = {int(s) for s in a.eval_after.split(",") if s}
    if not eval_after <= {1, 2, 3}:
        raise ValueError(f"--eval_after {a.eval_after!r}: stages are 1, 2, 3")
    kinds = tuple(k for k in a.eval_kinds.split(",") if k)
    exps = stage_experiments(a.model, workdir, a.set, a.stage_set)
    report: dict = {"model": a.model, "workdir": workdir, "stages": {}}
    for k, exp in enumerate(exps, start=1):
        os.makedirs(exp.run_dir, exist_ok=True)
        print(f"=== stage {k}: {exp.description}\n    {exp.num_steps} steps x {exp.batch_size} x {exp.data.seq_len}, "
              f"trainable {exp.trainable}, init_from {exp.init_from or 'scratch'}", flush=True)
        t0 = time.time()
        summary = pretrain.run(exp)
        losses = _logged_losses(exp.run_dir) or summary["losses"]        # whole run, across resumes
        steps = sorted(losses)
        entry = {"steps": summary["step"], "seconds": round(time.time() - t0, 1),
                 "first_loss": losses[steps[0]] if steps else None,
                 "last_loss": losses[steps[-1]] if steps else None,
                 "checkpoint_dir": summary["checkpoint_dir"]}
        print(f"    stage {k} done: step {entry['steps']}, loss {entry['first_loss']} -> {entry['last_loss']} "
              f"({entry['seconds']:.0f}s)", flush=True)
        if summary["preempted"]:
            report["stages"][k] = entry
            print(f"    stage {k} preempted at step {entry['steps']}: re-run the same command to resume", flush=True)
            break
        if k in eval_after:
            params = evaluate.load_params(exp.model, exp.checkpoint_dir)
            chat = k == 3
            res, blank = (evaluation.evaluate_accuracy(
                exp.model, params, num=a.eval_num, kinds=kinds, chat=chat, max_new_tokens=a.max_new_tokens,
                vision_opts=exp.data.vision_options, zero_pixels=zero,
                log=None if zero else lambda s: print("    " + s, flush=True)) for zero in (False, True))
            print(evaluation.accuracy_table(res, blank), flush=True)
            entry["eval"] = {"chat": chat, "num": a.eval_num, "accuracy": evaluation.by_metric(res),
                             "chance": evaluation.by_metric(res, "chance"),
                             "accuracy_blank_images": evaluation.by_metric(blank),
                             "examples": {r.kind: r.examples for r in res.values()}}
        report["stages"][k] = entry
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
