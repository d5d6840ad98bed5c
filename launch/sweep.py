"""Run a scaling sweep (experiments/sweeps.py) point by point, or emit one TPU pod job per point.

    python -m launch.sweep --list
    python -m launch.sweep --sweep=cpu_small --local [--results runs/sweeps/cpu_small/results.csv]
    python -m launch.sweep --sweep=scaling_llm --tpu=sweep --zone=us-east5-a --accelerator=v5p-64 [--dry_run]

--local trains each point in turn in this process (launch.pretrain.run on the point's experiment),
then computes the held-out loss per data type (evaluation.make_eval_fn) on the final params and appends
one row to the results table (params, tokens, FLOPs, eval_loss_<type>, eval_loss_mean, ...). Points
whose key (hash of the point's full config) is already in the table are skipped, so a re-run finishes
an interrupted sweep; a point interrupted mid-training resumes from its own checkpoints.
--point=KEY runs only that point (what each TPU job runs).

--tpu emits, per point, the launch.tpu commands for its own slice `<tpu>-<key>` (reuse or create, ship
the repo, install, start) whose start command is `python3 -m launch.sweep --sweep=NAME --point=KEY
--local`; the row is written by process 0 of that slice to its --results file.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from experiments import sweeps
from qwen2vl_jax.eval import scaling


def default_results(sweep: str) -> str:
    return f"runs/sweeps/{sweep}/results.csv"


def done_keys(path: str) -> set[str]:
    if not os.path.exists(path):
        return set()
    return {str(r.get("key")) for r in scaling.read_results(path)}


def _final_params(exp, checkpoint_dir: str):
    from qwen2vl_jax.train import checkpoint, sharding, train_step
    mesh = sharding.make_mesh(exp.mesh)
    abstract, _ = train_step.abstract_state(exp.model, exp.step_config(), mesh)
    return checkpoint.load_params(checkpoint_dir, abstract.params)


def run_point(point: sweeps.SweepPoint, results: str, root: str, eval_num: int, log=print) -> dict:
    """Trains one point, evaluates it, appends its row (process 0). Returns the row."""
    import jax

    from launch import pretrain
    from qwen2vl_jax.eval import evaluation

    exp = sweeps.point_experiment(point, root)
    os.makedirs(exp.run_dir, exist_ok=True)
    t0 = time.time()
    summary = pretrain.run(exp)
    train_s = time.time() - t0
    params = _final_params(exp, summary["checkpoint_dir"])
    eval_fn = evaluation.make_eval_fn(exp.model, exp.data, num_per_kind=eval_num, batch_size=exp.batch_size)
    losses = eval_fn(params)
    last = summary["losses"].get(summary["step"], float("nan"))
    row = point.result_row(losses, extra={"final_train_loss": float(last), "train_seconds": round(train_s, 1),
                                          "eval_seconds": round(time.time() - t0 - train_s, 1)})
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
        scaling.append_result(results, row)
    log(f"[{point.run_name}] N={row['params']:,} D={row['tokens']:,} train loss {last:.4f} eval loss "
        f"{row['eval_loss_mean']:.4f} ({train_s:.0f}s train, {row['eval_seconds']:.0f}s eval)")
    return row


def run_local(sweep: sweeps.Sweep, results: str, root: str, eval_num: int, only: set[str] | None = None,
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
        rows.append(run_point(p, results, root, eval_num, log))
    return rows


def tpu_jobs(sweep: sweeps.Sweep, tpu_prefix: str, zone: str, accelerator: str, project: str | None = None,
             version: str | None = None, spot: bool = False, results: str | None = None,
             eval_num: int = 16) -> list[tuple[object, list[list[str]]]]:
    """[(TpuVm, commands)] per point; commands = launch.tpu.job_commands with the start step replaced by
    `launch.sweep --point=KEY --local`."""
    from qwen2vl_jax.cloud import tpu

    out = []
    for p in sweep.points():
        vm = tpu.TpuVm(name=f"{tpu_prefix}-{p.key}", zone=zone, accelerator=accelerator, project=project,
                       version=version, spot=spot)
        cmds = tpu.job_commands(vm, p.experiment, model=p.base_model, run_name=p.run_name.replace("/", "_"))
        argv = ["python3", "-m", "launch.sweep", f"--sweep={sweep.name}", f"--point={p.key}", "--local",
                f"--results={results or default_results(sweep.name)}", f"--eval_num={eval_num}"]
        start = (f"cd {tpu.REMOTE_DIR} && mkdir -p logs && nohup {shlex.join(argv)} > "
                 f"logs/{p.run_name}.log 2>&1 < /dev/null &")
        out.append((vm, cmds[:-1] + [vm.ssh_all(start)]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default=None, help=f"one of {', '.join(sweeps.SWEEPS)}")
    ap.add_argument("--list", action="store_true", help="list sweeps (with --sweep: its points) and exit")
    ap.add_argument("--local", action="store_true", help="run the points here, one after another")
    ap.add_argument("--point", default=None, help="comma list of point keys to run (default: all)")
    ap.add_argument("--results", default=None, help="results table (.csv or .jsonl)")
    ap.add_argument("--root", default="runs/sweeps", help="run directories go under ROOT/<run_name>")
    ap.add_argument("--eval_num", type=int, default=16, help="held-out samples per data type")
    ap.add_argument("--tpu", default=None, help="TPU VM name prefix: one slice <prefix>-<key> per point")
    ap.add_argument("--zone", default=None)
    ap.add_argument("--accelerator", default=None)
    ap.add_argument("--project", default=None)
    ap.add_argument("--version", default=None)
    ap.add_argument("--spot", action="store_true")
    ap.add_argument("--dry_run", action="store_true", help="with --tpu: print the commands, run nothing")
    a = ap.parse_args(argv)

    if a.list and not a.sweep:
        for s in sweeps.SWEEPS.values():
            print(f"{s.name:16s} {len(s.points()):3d} points  {s.description}")
        return 0
    if not a.sweep:
        raise ValueError(f"--sweep is required; valid: {', '.join(sweeps.SWEEPS)}")
    sweep = sweeps.get_sweep(a.sweep)
    results = a.results or default_results(sweep.name)
    if a.list:
        done = done_keys(results)
        for p in sweep.points():
            print(f"{p.key}  {p.run_name:50s} params {p.params:>13,}  tokens {p.tokens:>15,}  flops {p.flops:.3g}"
                  + ("  [done]" if p.key in done else ""))
        return 0
    if a.local == bool(a.tpu):
        raise ValueError("pass exactly one of --local or --tpu=PREFIX")
    if a.local:
        if a.point:
            from launch import pretrain
            pretrain.initialize_distributed()
        only = set(a.point.split(",")) if a.point else None
        run_local(sweep, results, a.root, a.eval_num, only)
        return 0
    from qwen2vl_jax.cloud import tpu
    if not (a.zone and a.accelerator):
        raise ValueError("--tpu needs --zone and --accelerator")
    jobs = tpu_jobs(sweep, a.tpu, a.zone, a.accelerator, a.project, a.version, a.spot, a.results, a.eval_num)
    for vm, cmds in jobs:
        if a.dry_run:
            print(tpu.dry_run_script(vm, cmds))
        else:
            tpu.launch(vm, cmds)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
