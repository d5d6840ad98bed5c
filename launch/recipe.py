"""The paper's three-stage recipe end to end: stage 1 -> stage 2 -> stage 3, then task accuracy.

    python -m launch.recipe --model=tiny [--workdir runs/recipe_tiny] [--set key=value ...]
        [--stage_set 2:optim.peak_lr=5e-4 ...] [--eval_num 64] [--eval_after 2,3]

Each stage is the registry experiment `stage{k}` for --model, trained by qwen2vl_jax.train.trainer with its
own run dir WORKDIR/stage{k}; stage k > 1 starts from stage k-1's final checkpoint (`init_from`). A re-run
resumes: finished stages are not trained again (their checkpoints already hold the last step). While a stage
trains, its held-out loss by source and data kind is logged every `eval_every` steps (tiny: on). After each
stage in --eval_after, held-out task accuracy is printed beside chance (evaluation.evaluate_accuracy) and
beside the accuracy on blank images (the same prompts with every pixel value 0: what the text prior alone
scores), in the pre-training prompt form after stages 1-2 and in the ChatML form after stage 3 (what each
stage trained). Written to WORKDIR: eval.json (per stage: steps, losses, last held-out losses, accuracy) and
losses.png (every stage's training loss and held-out losses over the steps, one figure).
"""
from __future__ import annotations

import json
import os
import time
from typing import Sequence

from absl import flags, logging

from experiments import flags as cli
from experiments import registry
from qwen2vl_jax.eval import evaluation
from qwen2vl_jax.train import rundir, trainer

STAGES = ("1", "2", "3")

FLAGS = flags.FlagValues()
cli.define_model(FLAGS)
flags.DEFINE_string("workdir", None, "default runs/recipe_<model>", flag_values=FLAGS)
cli.define_set(FLAGS, "every stage's experiment config")
flags.DEFINE_multi_string("stage_set", [], "override for one stage: STAGE:key=value (repeatable)", flag_values=FLAGS)
cli.define_list(FLAGS, "eval_after", ("2", "3"), STAGES, "stages to evaluate after ('' = none)")
flags.DEFINE_integer("eval_num", 64, "held-out items per task kind", flag_values=FLAGS)
cli.define_list(FLAGS, "eval_kinds", ("caption", "count", "ocr", "grounding"), evaluation.ACCURACY_KINDS,
                "task kinds to score")
flags.DEFINE_integer("max_new_tokens", None, "default: longest answer + 8", flag_values=FLAGS)


def stage_experiments(model: str, workdir: str, overrides=(), stage_overrides=()):
    """[Experiment stage1, stage2, stage3] chained through init_from."""
    per_stage = {1: [], 2: [], 3: []}
    for item in stage_overrides:
        stage, sep, kv = item.partition(":")
        if not sep or stage not in STAGES:
            raise ValueError(f"--stage_set {item!r}: expected STAGE:key=value with STAGE in {', '.join(STAGES)}")
        per_stage[int(stage)].append(kv)
    exps = []
    for k in (1, 2, 3):
        sets = list(overrides) + per_stage[k] + [f"workdir={workdir}/stage{k}"]
        if k > 1:
            sets.append(f"init_from={exps[-1].checkpoint_dir}")
        exps.append(registry.get_experiment(f"stage{k}", model, sets))
    return exps


def main(argv: Sequence[str]) -> dict:
    cli.parse(FLAGS, argv, __doc__)
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    workdir = FLAGS.workdir or f"runs/recipe_{FLAGS.model}"
    eval_after = {int(s) for s in FLAGS.eval_after}
    exps = stage_experiments(FLAGS.model, workdir, FLAGS.set, FLAGS.stage_set)
    report: dict = {"model": FLAGS.model, "workdir": workdir, "stages": {}}
    curves = []
    for k, exp in enumerate(exps, start=1):
        print(f"=== stage {k}: {exp.description}\n    {exp.num_steps} steps x {exp.batch_size} x {exp.data.seq_len}, "
              f"trainable {exp.trainable}, init_from {exp.init_from or 'scratch'}", flush=True)
        t0 = time.time()
        summary = trainer.run(exp, evaluate=exp.evaluator())
        # the whole run's records, across resumes
        losses = {s: r["loss"] for s, r in rundir.read_jsonl(exp.run_dir, rundir.LOSSES_FILE).items()}
        heldout = {s: {n: v for n, v in r.items() if n != "step"}
                   for s, r in rundir.read_jsonl(exp.run_dir, rundir.HELDOUT_FILE).items()}
        curves.append((f"stage {k}", losses, heldout))
        steps = sorted(losses)
        entry = {"steps": summary["step"], "seconds": round(time.time() - t0, 1),
                 "first_loss": losses[steps[0]] if steps else None,
                 "last_loss": losses[steps[-1]] if steps else None,
                 "heldout_loss": heldout[max(heldout)] if heldout else None,
                 "checkpoint_dir": summary["checkpoint_dir"]}
        trained = ("nothing to train (already at the last step)" if summary["step"] == summary["start_step"]
                   else f"trained steps {summary['start_step'] + 1}..{summary['step']}")
        loss = f", loss {entry['first_loss']:.4f} -> {entry['last_loss']:.4f}" if steps else ""
        print(f"    stage {k}: step {entry['steps']} of {exp.num_steps}, {trained}{loss} ({entry['seconds']:.0f}s)",
              flush=True)
        if summary["preempted"]:
            report["stages"][k] = entry
            print(f"    stage {k} preempted at step {entry['steps']}: re-run the same command to resume", flush=True)
            break
        if k in eval_after:
            params = rundir.load_params(exp.model, exp.checkpoint_dir)
            chat = k == 3
            res, blank = (evaluation.evaluate_accuracy(
                exp.model, params, num=FLAGS.eval_num, kinds=FLAGS.eval_kinds, chat=chat,
                max_new_tokens=FLAGS.max_new_tokens, vision_opts=exp.data.vision_options, zero_pixels=zero,
                log=None if zero else lambda s: print("    " + s, flush=True)) for zero in (False, True))
            print(evaluation.accuracy_table(res, blank), flush=True)
            entry["eval"] = {"chat": chat, "num": FLAGS.eval_num, "accuracy": evaluation.by_metric(res),
                             "chance": evaluation.by_metric(res, "chance"),
                             "accuracy_blank_images": evaluation.by_metric(blank),
                             "examples": {r.kind: r.examples for r in res.values()}}
        report["stages"][k] = entry
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(report, f, indent=1)
    evaluation.plot_loss_curves(curves, os.path.join(workdir, "losses.png"),
                                title=f"three-stage recipe, model {FLAGS.model}")
    print(f"wrote {workdir}/eval.json and {workdir}/losses.png", flush=True)
    return report


if __name__ == "__main__":
    cli.run(main)
