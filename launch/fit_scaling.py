"""Fit L(N, D) = E + A/N^alpha + B/D^beta to a sweep's results table and plot it.

    python -m launch.fit_scaling --results results/cpu_small.csv [--loss mean|caption|ocr|...]
        [--budget 1e15] [--plot docs/scaling_cpu_small.png] [--bootstrap 100]
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from qwen2vl_jax.eval import scaling


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="CSV or JSON-lines table (params, tokens, flops, eval_loss_*)")
    p.add_argument("--loss", default="mean", help="loss kind to fit: mean (default) or one eval_loss_<kind>")
    p.add_argument("--n_column", default="params", help="column used as N (e.g. params or params_non_embedding)")
    p.add_argument("--budget", type=float, action="append", default=None,
                   help="FLOP budget C (repeatable): print the compute-optimal N and D for C = 6ND")
    p.add_argument("--plot", default=None, help="write a PNG of the data and the fitted curves")
    p.add_argument("--bootstrap", type=int, default=50, help="bootstrap replicates for the intervals (0 = none)")
    p.add_argument("--ci", type=float, default=0.9, help="central interval mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    a = p.parse_args(argv)

    rows = scaling.read_results(a.results)
    n, d, loss = scaling.points_from_results(rows, loss=a.loss, n_key=a.n_column)
    fit = scaling.fit_scaling_law(n, d, loss, num_bootstrap=a.bootstrap, seed=a.seed, ci=a.ci)
    law = fit.law
    budgets = a.budget or [float(np.max(6 * n * d)) * 10.0]
    optimal = []
    for c in budgets:
        n_opt, d_opt = law.compute_optimal(c)
        optimal.append({"flops": c, "n_opt": float(n_opt), "d_opt": float(d_opt),
                        "loss": float(law.loss(n_opt, d_opt))})
    out = {"law": law.as_dict(), "intervals": fit.intervals, "ci": a.ci, "num_points": fit.num_points,
           "objective": fit.objective, "loss_column": a.loss, "compute_optimal": optimal}
    if a.plot:
        scaling.plot_fit(n, d, loss, law, a.plot, budget=budgets[0])
        out["plot"] = a.plot
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"{fit.num_points} points from {a.results}, loss = eval_loss_{a.loss}")
        print(f"L(N, D) = E + A / N^alpha + B / D^beta   (Huber delta {scaling.HUBER_DELTA}, "
              f"{fit.num_starts} L-BFGS starts, {fit.num_bootstrap} bootstrap replicates)")
        for k, v in law.as_dict().items():
            lo, hi = fit.intervals.get(k, (float("nan"), float("nan")))
            ci = f"   [{lo:.4g}, {hi:.4g}] ({a.ci:.0%})" if k in fit.intervals else ""
            print(f"  {k:>5} = {v:.4g}{ci}")
        for o in optimal:
            print(f"  C = {o['flops']:.3g} FLOPs: N_opt = {o['n_opt']:.3g}, D_opt = {o['d_opt']:.3g}, "
                  f"predicted loss {o['loss']:.4f}")
        if a.plot:
            print(f"plot: {a.plot}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
