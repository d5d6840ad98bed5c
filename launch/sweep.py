"""Run a scaling sweep (experiments/sweeps.py) point by point, or emit one TPU pod job per point.

    python -m launch.sweep --list
    python -m launch.sweep --sweep=cpu_small --local [--results runs/sweeps/cpu_small/results.csv]
    python -m launch.sweep --sweep=scaling_llm --tpu=sweep --zone=us-east5-a --accelerator=v5p-64 [--dry_run]

--local trains each point in turn in this process (qwen2vl_jax.train.trainer on the point's experiment),
whose held-out loss per data kind (eval.evaluation.HeldoutEvaluator on one synthetic source per kind of
sweeps.EVAL_KINDS, at the last step) goes with one row to the results table (params, tokens, FLOPs,
eval_loss_<kind>, eval_loss_mean, final_train_loss, train_seconds, eval_seconds). Points
whose key (hash of the point's full config) is already in the table are skipped, so a re-run finishes
an interrupted sweep; a point interrupted mid-training resumes from its own checkpoints.
--point=KEY runs only that point (what each TPU job runs).

--tpu emits, per point, the launch.tpu commands for its own slice `<tpu>-<key>` (reuse or create, ship
the repo, install, start) whose start command is `python3 -m launch.sweep --sweep=NAME --point=KEY
--local`; the row is written by process 0 of that slice to its --results file.
"""
from __future__ import annotations

import time
from typing import Sequence

import jax
from absl import flags, logging

from experiments import flags as cli
from experiments import sweeps
from qwen2vl_jax.cloud import tpu
from qwen2vl_jax.eval import evaluation, scaling
from qwen2vl_jax.train import distributed, paths, rundir, sharding, trainer

FLAGS = flags.FlagValues()
flags.DEFINE_enum("sweep", None, list(sweeps.SWEEPS), "the sweep", flag_values=FLAGS)
flags.DEFINE_bool("list", False, "list sweeps (with --sweep: its points) and exit", flag_values=FLAGS)
flags.DEFINE_bool("local", False, "run the points here, one after another", flag_values=FLAGS)
flags.DEFINE_list("point", None, "point keys to run (default: all)", flag_values=FLAGS)
flags.DEFINE_string("results", None, "results table (.csv or .jsonl); default runs/sweeps/<sweep>/results.csv",
                    flag_values=FLAGS)
flags.DEFINE_string("root", "runs/sweeps", "run directories go under ROOT/<run_name>", flag_values=FLAGS)
flags.DEFINE_integer("eval_samples", 16, "held-out samples per data kind", flag_values=FLAGS)
flags.DEFINE_string("tpu", None, "TPU VM name prefix: one slice <prefix>-<key> per point", flag_values=FLAGS)
flags.DEFINE_string("zone", None, "--tpu: GCP zone, e.g. us-east5-a", flag_values=FLAGS)
flags.DEFINE_string("accelerator", None, "--tpu: accelerator type, e.g. v5p-64", flag_values=FLAGS)
flags.DEFINE_string("project", None, "--tpu: GCP project (default: gcloud's configured project)", flag_values=FLAGS)
flags.DEFINE_string("version", None, "--tpu: TPU runtime version (default per generation)", flag_values=FLAGS)
flags.DEFINE_bool("spot", False, "--tpu: Spot TPU VMs", flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "with --tpu: print the commands, run nothing", flag_values=FLAGS)


def default_results(sweep: str) -> str:
    return f"runs/sweeps/{sweep}/results.csv"


def done_keys(path: str) -> set[str]:
    if not paths.exists(path):
        return set()
    return {str(r.get("key")) for r in scaling.read_results(path)}


def run_point(point: sweeps.SweepPoint, results: str, root: str, eval_samples: int, log=print) -> dict:
    """Trains one point (its held-out loss is the trainer's evaluation at the last step), appends its row
    (process 0). Returns the row."""
    exp = sweeps.point_experiment(point, root, eval_samples)
    heldout = exp.evaluator()
    eval_s = [0.0]

    def evaluate(params):
        t = time.time()
        out = heldout(params)
        eval_s[0] += time.time() - t
        return out

    t0 = time.time()
    summary = trainer.run(exp, evaluate=evaluate)
    losses = summary["eval"].get(exp.num_steps)
    if losses is None:         # trained by an earlier invocation that stopped before writing the row
        losses = evaluate(rundir.load_params(exp.model, summary["checkpoint_dir"], sharding.make_mesh(exp.mesh)))
    train_s = time.time() - t0 - eval_s[0]
    last = rundir.read_jsonl(exp.run_dir, rundir.LOSSES_FILE).get(exp.num_steps, {}).get("loss", float("nan"))
    row = point.result_row(evaluation.kind_losses(losses), extra={
        "final_train_loss": float(last), "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s[0], 1)})
    if jax.process_index() == 0:
        scaling.append_result(results, row)
    log(f"[{point.run_name}] N={row['params']:,} D={row['tokens']:,} train loss {last:.4f} eval loss "
        f"{row['eval_loss_mean']:.4f} ({train_s:.0f}s train, {eval_s[0]:.0f}s eval)")
    return row


def run_local(sweep: sweeps.Sweep, results: str, root: str, eval_samples: int, only: set[str] | None = None,
              log=print) -> list[dict]:
    points = [p for p in sweep.points() if only is None or p.key in only]
    if only is not None and len(points) != len(only):
        valid = ", ".join(p.key for p in sweep.points())
        raise ValueError(f"unknown point keys {sorted(only - {p.key for p in points})}; valid: {valid}")
    done = done_keys(results)
    rows = []
    for i, p in enumerate(points):
        if p.key in done:
            log(f"[{i + 1}/{len(points)}] {p.run_name}: done (in {results}), skipped")
            continue
        log(f"[{i + 1}/{len(points)}] {p.run_name}: {p.steps} steps x {p.batch_size} x {p.seq_len}")
        rows.append(run_point(p, results, root, eval_samples, log))
    return rows


def tpu_jobs(sweep: sweeps.Sweep, tpu_prefix: str, zone: str, accelerator: str, project: str | None = None,
             version: str | None = None, spot: bool = False, results: str | None = None,
             eval_samples: int = 16) -> list[tuple[object, list[list[str]]]]:
    """[(TpuVm, commands)] per point: tpu.make_job's commands with `launch.sweep --point=KEY --local` as the
    run (its exit status in logs/RUN.exit like any job's)."""
    out = []
    for p in sweep.points():
        vm = tpu.TpuVm(name=f"{tpu_prefix}-{p.key}", zone=zone, accelerator=accelerator, project=project,
                       version=version, spot=spot)
        argv = ["python3", "-m", "launch.sweep", f"--sweep={sweep.name}", f"--point={p.key}", "--local",
                f"--results={results or default_results(sweep.name)}", f"--eval_samples={eval_samples}"]
        job = tpu.make_job(vm, p.experiment, model=p.base_model, run_name=p.run_name.replace("/", "_"), train=argv)
        out.append((vm, job.commands))
    return out


def main(argv: Sequence[str]) -> int:
    cli.parse(FLAGS, argv, __doc__)
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    if FLAGS.list and not FLAGS.sweep:
        for s in sweeps.SWEEPS.values():
            print(f"{s.name:16s} {len(s.points()):3d} points  {s.description}")
        return 0
    if not FLAGS.sweep:
        raise ValueError(f"--sweep is required; valid: {', '.join(sweeps.SWEEPS)}")
    sweep = sweeps.get_sweep(FLAGS.sweep)
    results = FLAGS.results or default_results(sweep.name)
    if FLAGS.list:
        done = done_keys(results)
        for p in sweep.points():
            print(f"{p.key}  {p.run_name:50s} params {p.params:>13,}  tokens {p.tokens:>15,}  flops {p.flops:.3g}"
                  + ("  [done]" if p.key in done else ""))
        return 0
    if FLAGS.local == bool(FLAGS.tpu):
        raise ValueError("pass exactly one of --local or --tpu=PREFIX")
    if FLAGS.local:
        if FLAGS.point:
            distributed.initialize_distributed()
        run_local(sweep, results, FLAGS.root, FLAGS.eval_samples, set(FLAGS.point) if FLAGS.point else None)
        return 0
    if not (FLAGS.zone and FLAGS.accelerator):
        raise ValueError("--tpu needs --zone and --accelerator")
    jobs = tpu_jobs(sweep, FLAGS.tpu, FLAGS.zone, FLAGS.accelerator, FLAGS.project, FLAGS.version, FLAGS.spot,
                    FLAGS.results, FLAGS.eval_samples)
    for vm, cmds in jobs:
        if FLAGS.dry_run:
            print(tpu.dry_run_script(vm, cmds))
        else:
            tpu.launch(vm, cmds)
    return 0


if __name__ == "__main__":
    cli.run(main)
