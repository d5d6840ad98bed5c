"""Fit L(N, D) = E + A/N^alpha + B/D^beta to a sweep's results table and plot it.

    python -m launch.fit_scaling --results=results/cpu_small.csv [--loss=mean|caption|ocr|...]
        [--budget=1e15 ...] [--plot=docs/scaling_cpu_small.png] [--bootstrap=100] [--json]
"""
from __future__ import annotations

import json
import sys

import numpy as np
from absl import flags

from experiments import flags as cli
from qwen2vl_jax.eval import scaling

FLAGS = flags.FlagValues()


flags.DEFINE_string("results", None, "CSV or JSON-lines table (params, tokens, flops, eval_loss_*)", flag_values=FLAGS)
flags.DEFINE_string("loss", "mean", "loss kind to fit: mean (default) or one eval_loss_<kind>", flag_values=FLAGS)
flags.DEFINE_string("n_column", "params", "column used as N (e.g. params or params_non_embedding)", flag_values=FLAGS)
flags.DEFINE_multi_float("budget", None, "FLOP budget C (repeatable): print the compute-optimal N and D for "
                         "C = 6ND (default: 10x the largest 6ND of the table)", flag_values=FLAGS)
flags.DEFINE_string("plot", None, "write a PNG of the data and the fitted curves", flag_values=FLAGS)
flags.DEFINE_integer("bootstrap", 50, "bootstrap replicates for the intervals (0 = none)", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_float("ci", 0.9, "central interval mass", lower_bound=0.0, upper_bound=1.0, flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the bootstrap resampling", flag_values=FLAGS)
flags.DEFINE_bool("json", False, "print one JSON object instead of text", flag_values=FLAGS)
flags.mark_flag_as_required("results", flag_values=FLAGS)


def fit(results: str, loss: str = "mean", n_column: str = "params", budgets=None, plot: str | None = None,
        bootstrap: int = 50, ci: float = 0.9, seed: int = 0) -> dict:
    """Fits the law to the table at `results`; returns the law, its intervals and the compute-optimal
    points for each budget (JSON-serialisable). Writes the PNG when `plot` is given."""
    rows = scaling.read_results(results)
    n, d, losses = scaling.points_from_results(rows, loss=loss, n_key=n_column)
    result = scaling.fit_scaling_law(n, d, losses, num_bootstrap=bootstrap, seed=seed, ci=ci)
    law = result.law
    budgets = list(budgets or [float(np.max(6 * n * d)) * 10.0])
    optimal = []
    for c in budgets:
        n_opt, d_opt = law.compute_optimal(c)
        optimal.append({"flops": c, "n_opt": float(n_opt), "d_opt": float(d_opt),
                        "loss": float(law.loss(n_opt, d_opt))})
    out = {"results": results, "law": law.as_dict(), "intervals": result.intervals, "ci": ci,
           "num_points": result.num_points, "num_starts": result.num_starts, "num_bootstrap": result.num_bootstrap,
           "objective": result.objective, "loss_column": loss, "compute_optimal": optimal}
    if plot:
        scaling.plot_fit(n, d, losses, law, plot, budget=budgets[0])
        out["plot"] = plot
    return out


def format_fit(out: dict) -> str:
    lines = [f"{out['num_points']} points from {out['results']}, loss = eval_loss_{out['loss_column']}",
             f"L(N, D) = E + A / N^alpha + B / D^beta   (Huber delta {scaling.HUBER_DELTA}, "
             f"{out['num_starts']} L-BFGS starts, {out['num_bootstrap']} bootstrap replicates)"]
    for k, v in out["law"].items():
        ci = ""
        if k in out["intervals"]:
            lo, hi = out["intervals"][k]
            ci = f"   [{lo:.4g}, {hi:.4g}] ({out['ci']:.0%})"
        lines.append(f"  {k:>5} = {v:.4g}{ci}")
    for o in out["compute_optimal"]:
        lines.append(f"  C = {o['flops']:.3g} FLOPs: N_opt = {o['n_opt']:.3g}, D_opt = {o['d_opt']:.3g}, "
                     f"predicted loss {o['loss']:.4f}")
    if "plot" in out:
        lines.append(f"plot: {out['plot']}")
    return "\n".join(lines)


def main(argv) -> int:
    cli.parse(FLAGS, argv, __doc__)
    try:
        out = fit(FLAGS.results, FLAGS.loss, FLAGS.n_column, FLAGS.budget, FLAGS.plot, FLAGS.bootstrap, FLAGS.ci,
                  FLAGS.seed)
    except (OSError, ValueError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=1) if FLAGS.json else format_fit(out))
    return 0


if __name__ == "__main__":
    cli.run(main)
