"""Scaling-law fit: recovers a known law from noisy synthetic points; closed-form optimum; table + CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from qwen2vl_jax.eval import scaling
import repo

ROOT = repo.ROOT
TRUE = scaling.ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)   # Hoffmann et al. 2022


def _synthetic(seed=0, sigma=0.001):
    rng = np.random.default_rng(seed)
    n, d = np.meshgrid(np.geomspace(1e6, 1e10, 8), np.geomspace(1e7, 1e12, 8))
    n, d = n.ravel(), d.ravel()
    return n, d, TRUE.loss(n, d) * np.exp(rng.normal(0.0, sigma, n.shape))   # 0.1% multiplicative noise


def test_recovers_known_law_within_5_percent():
    n, d, loss = _synthetic()
    fit = scaling.fit_scaling_law(n, d, loss, top_k=16)
    for k in ("E", "A", "B", "alpha", "beta"):
        got, want = getattr(fit.law, k), getattr(TRUE, k)
        assert abs(got / want - 1) < 0.05, (k, got, want)


def test_huber_gradient_matches_finite_differences():
    n, d, loss = _synthetic(seed=1, sigma=0.01)
    args = (np.log(n), np.log(d), np.log(loss), scaling.HUBER_DELTA)
    theta = np.array([5.5, 6.2, 0.4, 0.3, 0.25])
    _, g = scaling._objective(theta, *args)
    eps = 1e-6
    fd = [(scaling._objective(theta + eps * e, *args)[0] - scaling._objective(theta - eps * e, *args)[0]) / (2 * eps)
          for e in np.eye(5)]
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-6)


def test_compute_optimal_matches_numeric_minimum():
    c = 1e21
    n_opt, d_opt = TRUE.compute_optimal(c)
    assert np.isclose(6 * n_opt * d_opt, c)
    res = minimize_scalar(lambda logn: TRUE.loss(np.exp(logn), c / 6 / np.exp(logn)),
                          bounds=(np.log(1e6), np.log(1e13)), method="bounded", options={"xatol": 1e-9})
    assert abs(np.log(n_opt) - res.x) < 1e-3
    with pytest.raises(ValueError, match="positive"):
        TRUE.compute_optimal(-1.0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="at least 5"):
        scaling.fit_scaling_law([1, 2], [1, 2], [1, 2])
    with pytest.raises(ValueError, match="positive"):
        scaling.fit_scaling_law([1, 2, 3, 4, -5], [1] * 5, [1] * 5)
    with pytest.raises(ValueError, match="equal lengths"):
        scaling.fit_scaling_law([1] * 5, [1] * 6, [1] * 5)


@pytest.mark.slow
@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_results_table_and_cli(tmp_path, ext):
    n, d, loss = _synthetic(seed=2)
    path = str(tmp_path / f"results.{ext}")
    for i, (ni, di, li) in enumerate(zip(n, d, loss)):
        # two per-kind columns whose mean is the law's loss
        scaling.append_result(path, {"name": f"p{i}", "params": ni, "tokens": di, "flops": 6 * ni * di,
                                     "eval_loss_caption": li - 0.1, "eval_loss_ocr": li + 0.1})
    rows = scaling.read_results(path)
    assert len(rows) == len(n) and scaling.loss_columns(rows) == ["caption", "ocr"]
    _, _, got = scaling.points_from_results(rows, loss="mean")
    np.testing.assert_allclose(got, loss, rtol=1e-12)
    with pytest.raises(ValueError, match="valid: caption, ocr"):
        scaling.points_from_results(rows, loss="video")
    if ext == "csv":
        with pytest.raises(ValueError, match="differ"):
            scaling.append_result(path, {"params": 1.0})

    png = tmp_path / "fit.png"
    proc = subprocess.run([sys.executable, "-m", "launch.fit_scaling", "--results", path, "--budget", "1e21",
                           "--plot", str(png), "--bootstrap", "3", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.stat().st_size > 10_000
    out = printed = json.loads(proc.stdout)
    assert abs(printed["law"]["alpha"] / TRUE.alpha - 1) < 0.05
    assert set(printed["intervals"]) == {"E", "A", "B", "alpha", "beta"}
    assert np.isclose(out["compute_optimal"][0]["n_opt"], TRUE.compute_optimal(1e21)[0], rtol=0.3)
