"""Scaling-law fit L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, "approach 3").

The fit minimises sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ) over
theta = (a, b, e, alpha, beta) with A = exp(a), B = exp(b), E = exp(e), delta = 1e-3, by L-BFGS-B from a
grid of initialisations (the best local optimum wins). Bootstrap intervals refit on resampled points.

With C = 6 N D the compute-optimal allocation has the closed form
    N_opt(C) = G (C/6)^(beta/(alpha+beta)),   D_opt(C) = (C/6)^(alpha/(alpha+beta)) / G,
    G = (alpha A / (beta B))^(1/(alpha+beta)).
Pure numpy/scipy; the plot uses matplotlib's Agg backend.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np
from scipy.optimize import minimize

from qwen2vl_jax.train import paths

HUBER_DELTA = 1e-3
# Hoffmann et al.'s initialisation grid, a little coarser (the fit is refined by L-BFGS anyway).
DEFAULT_GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}


@dataclasses.dataclass(frozen=True)
class ScalingLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d) -> np.ndarray:
        n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def compute_optimal(self, flops) -> tuple[np.ndarray, np.ndarray]:
        """(N_opt, D_opt) minimising L under C = 6 N D (closed form; arrays like `flops`)."""
        c = np.asarray(flops, np.float64)
        if np.any(c <= 0):
            raise ValueError(f"FLOP budget must be positive; got {flops}")
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        n = g * (c / 6.0) ** (self.beta / s)
        return n, (c / 6.0) / n

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class FitResult:
    law: ScalingLaw
    objective: float          # Huber objective at the optimum (sum over points)
    num_points: int
    num_starts: int
    # Bootstrap percentile intervals per parameter name -> (lo, hi); empty without a bootstrap.
    intervals: dict = dataclasses.field(default_factory=dict)
    num_bootstrap: int = 0


def _theta_to_law(theta: np.ndarray) -> ScalingLaw:
    a, b, e, alpha, beta = (float(x) for x in theta)
    return ScalingLaw(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=alpha, beta=beta)


def logsumexp(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Stable log-sum-exp (plain numpy: scipy's version costs ~100x more per call on tiny arrays,
    and the fit calls this thousands of times)."""
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss and its derivative, elementwise."""
    small = np.abs(r) <= delta
    val = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    grad = np.where(small, r, delta * np.sign(r))
    return val, grad


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Huber objective and analytic gradient w.r.t. theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])   # [3, P]
    lse = logsumexp(terms, axis=0)                                                    # [P]
    w = np.exp(terms - lse)                                                           # softmax [3, P]
    val, dr = _huber(lse - log_l, delta)
    grad = np.array([
        np.sum(dr * w[0]), np.sum(dr * w[1]), np.sum(dr * w[2]),
        np.sum(dr * w[0] * -log_n), np.sum(dr * w[1] * -log_d),
    ])
    return float(np.sum(val)), grad


def _check_points(n, d, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, d, loss = (np.asarray(x, np.float64).reshape(-1) for x in (n, d, loss))
    if not (len(n) == len(d) == len(loss)):
        raise ValueError(f"n, d, loss must have equal lengths; got {len(n)}, {len(d)}, {len(loss)}")
    if len(n) < 5:
        raise ValueError(f"need at least 5 points to fit 5 parameters; got {len(n)}")
    for name, x in (("n", n), ("d", d), ("loss", loss)):
        if not np.all(np.isfinite(x)) or np.any(x <= 0):
            raise ValueError(f"{name} must be finite and positive; got {x.tolist()}")
    return n, d, loss


def _minimise(starts: np.ndarray, log_n, log_d, log_l, delta) -> tuple[np.ndarray, float]:
    best_theta, best_val = None, np.inf
    bounds = [(None, None), (None, None), (None, None), (0.0, 5.0), (0.0, 5.0)]
    for x0 in starts:
        res = minimize(_objective, x0, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B",
                       bounds=bounds, options={"maxiter": 1000, "ftol": 1e-13, "gtol": 1e-10})
        if np.isfinite(res.fun) and res.fun < best_val:
            best_theta, best_val = res.x, float(res.fun)
    if best_theta is None:
        raise RuntimeError("scaling-law fit failed from every initialisation")
    return best_theta, best_val


def _grid_starts(grid: dict, log_n, log_d, log_l, delta, top_k: int | None) -> np.ndarray:
    """All grid points (a, b, e, alpha, beta), or the `top_k` with the lowest initial objective."""
    starts = np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])),
                      np.float64)
    if top_k is None or top_k >= len(starts):
        return starts
    a, b, e, alpha, beta = (starts[:, i:i + 1] for i in range(5))                  # [G, 1] each
    lse = logsumexp(np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(starts), len(log_n)))]),
                    axis=0)                                                             # [G, P]
    vals = _huber(lse - log_l, delta)[0].sum(axis=1)                                    # [G]
    return starts[np.argsort(vals, kind="stable")[:top_k]]


def fit_scaling_law(n: Sequence[float], d: Sequence[float], loss: Sequence[float], *,
                    delta: float = HUBER_DELTA, grid: dict | None = None, top_k: int | None = 16,
                    num_bootstrap: int = 0, seed: int = 0, ci: float = 0.9) -> FitResult:
    """Fit L(N, D) to points (n[i] params, d[i] tokens, loss[i]).

    L-BFGS runs from the `top_k` grid initialisations with the lowest initial objective (all of them
    when top_k is None). Each bootstrap replicate resamples the points with replacement and restarts
    from the full fit plus its own 2 best grid points; intervals are the central `ci` percentiles.
    """
    n, d, loss = _check_points(n, d, loss)
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1); got {ci}")
    grid = dict(DEFAULT_GRID, **(grid or {}))
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    starts = _grid_starts(grid, log_n, log_d, log_l, delta, top_k)
    theta, val = _minimise(starts, log_n, log_d, log_l, delta)
    law = _theta_to_law(theta)

    intervals = {}
    if num_bootstrap > 0:
        rng = np.random.default_rng(seed)
        laws = []
        for _ in range(num_bootstrap):
            idx = rng.integers(0, len(n), len(n))
            bn, bd, bl = log_n[idx], log_d[idx], log_l[idx]
            bstarts = np.vstack([theta[None], _grid_starts(grid, bn, bd, bl, delta, 2)])
            laws.append(_theta_to_law(_minimise(bstarts, bn, bd, bl, delta)[0]))
        q = (100 * (1 - ci) / 2, 100 * (1 + ci) / 2)
        for name in ("E", "A", "B", "alpha", "beta"):
            vals = np.array([getattr(x, name) for x in laws])
            lo, hi = np.percentile(vals, q)
            intervals[name] = (float(lo), float(hi))
    return FitResult(law=law, objective=val, num_points=len(n), num_starts=len(starts),
                     intervals=intervals, num_bootstrap=num_bootstrap)


def plot_fit(n, d, loss, law: ScalingLaw, path: str, *, title: str = "", budget: float | None = None) -> None:
    """Two panels: loss vs N (one colour per token budget D) and loss vs D (one per model size N),
    points = measurements, lines = the fitted law. Optional budget marks the compute-optimal N."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, d, loss = (np.asarray(x, np.float64) for x in (n, d, loss))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    for ax, x, group, xlabel, glabel in ((axes[0], n, d, "parameters N", "D"),
                                         (axes[1], d, n, "tokens D", "N")):
        levels = np.unique(group)
        xs = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
        for i, g in enumerate(levels):
            c = cmap(i / max(1, len(levels) - 1))
            sel = group == g
            ax.scatter(x[sel], loss[sel], color=c, s=22, zorder=3)
            fitted = law.loss(xs, g) if glabel == "D" else law.loss(g, xs)
            ax.plot(xs, fitted, color=c, lw=1.2, label=f"{glabel}={g:.3g}")
        ax.axhline(law.E, color="grey", ls=":", lw=1, label=f"E={law.E:.3g}")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval loss")
        ax.legend(fontsize=7)
    if budget is not None:
        n_opt, _ = law.compute_optimal(budget)
        axes[0].axvline(float(n_opt), color="red", ls="--", lw=1, label=f"N_opt(C={budget:.2g})")
        axes[0].legend(fontsize=7)
    fig.suptitle(title or (f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Results table: one row per trained point, CSV (header row) or JSON lines (.jsonl / .json).
# Required columns: params (N), tokens (D), flops; losses in columns named `eval_loss_<type>`
# (caption, ocr, grounding, video, chat) and `eval_loss_mean`.

LOSS_PREFIX = "eval_loss_"


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json", ".ndjson"))


def read_results(path: str) -> list[dict]:
    """Rows of a results table (a local path or gs://), numeric strings converted to float."""
    import csv
    import io
    import json

    if not paths.exists(path):
        raise ValueError(f"results file {path!r} does not exist")
    text = paths.read_text(path)
    rows: list[dict] = []
    if _is_jsonl(path):
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i + 1}: not a JSON object: {e}") from None
    else:
        for row in csv.DictReader(io.StringIO(text)):
            rows.append({k: _maybe_float(v) for k, v in row.items()})
    return rows


def _maybe_float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def append_result(path: str, row: dict) -> None:
    """Append one row (a local path or gs://: the table is rewritten whole, Cloud Storage has no append); a CSV
    gets its header from the first row (later rows must use the same keys)."""
    import csv
    import io
    import json

    text = paths.read_text(path) if paths.exists(path) else ""
    if _is_jsonl(path):
        paths.write_text(path, text + json.dumps(row, sort_keys=True) + "\n")
        return
    if text:
        header = next(csv.reader(io.StringIO(text)))
        if set(header) != set(row):
            raise ValueError(f"row keys {sorted(row)} differ from {path} header {sorted(header)}")
    else:
        header = list(row)
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=header)
    if not text:
        w.writeheader()
    w.writerow(row)
    paths.write_text(path, text + out.getvalue())


def loss_columns(rows: list[dict]) -> list[str]:
    """Loss kinds present in every row (`eval_loss_<kind>` -> kind), sorted."""
    kinds = None
    for r in rows:
        ks = {k[len(LOSS_PREFIX):] for k in r if k.startswith(LOSS_PREFIX)}
        kinds = ks if kinds is None else kinds & ks
    return sorted(kinds or ())


def points_from_results(rows: list[dict], loss: str = "mean", n_key: str = "params",
                        d_key: str = "tokens") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, L) arrays for the fit. `loss` is a kind (`mean` = column eval_loss_mean, else the mean of
    the per-kind columns)."""
    if not rows:
        raise ValueError("results table is empty")
    kinds = loss_columns(rows)
    per_kind = [k for k in kinds if k != "mean"]
    if loss not in kinds and not (loss == "mean" and per_kind):
        raise ValueError(f"loss column {loss!r} not in the table; valid: {', '.join(kinds) or '(none)'}")
    for key in (n_key, d_key):
        missing = [i for i, r in enumerate(rows) if key not in r]
        if missing:
            raise ValueError(f"column {key!r} missing in rows {missing}; columns: {sorted(rows[0])}")
    n = np.array([float(r[n_key]) for r in rows])
    d = np.array([float(r[d_key]) for r in rows])
    if loss in kinds:
        L = np.array([float(r[LOSS_PREFIX + loss]) for r in rows])
    else:
        L = np.array([np.mean([float(r[LOSS_PREFIX + k]) for k in per_kind]) for r in rows])
    return n, d, L
