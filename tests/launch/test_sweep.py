"""Sweeps: grids, point keys, param counts vs the initialised model, experiment mapping, skip-on-rerun,
TPU job emission, and one real (2-step) point trained and evaluated end to end."""
import dataclasses

import jax
import numpy as np
import pytest

from experiments import sweeps
from launch import sweep as sweep_cli
from qwen2vl_jax.model import model
from qwen2vl_jax.eval import scaling
from qwen2vl_jax.model.config import VisionConfig


def test_named_sweeps_and_cpu_small_grid():
    assert {"cpu_small", "scaling_llm", "scaling_data", "scaling_llm_lr"} <= set(sweeps.SWEEPS)
    s = sweeps.get_sweep("cpu_small")
    pts = s.points()
    assert len({p.size.name for p in pts}) >= 4 and len({p.tokens for p in pts}) == 3
    assert len(pts) == len(s.sizes) * len(s.token_budgets)
    assert len({p.key for p in pts}) == len(pts)
    # scaling_llm: the decoder varies, the vision tower is the same for every point
    llm = sweeps.get_sweep("scaling_llm").points()
    assert len({p.model.vision.embed_dim for p in llm}) == 1 and len({p.model.hidden_size for p in llm}) > 1
    assert len({p.model.vision.depth for p in llm}) == 1
    data = sweeps.get_sweep("scaling_data").points()
    assert len({p.model for p in data}) == 1 and len({p.tokens for p in data}) == 6
    with pytest.raises(ValueError, match="valid: cpu_small"):
        sweeps.get_sweep("nope")


def test_point_key_depends_on_config_not_sweep_name():
    p = sweeps.get_sweep("cpu_small").points()[0]
    assert p.key == dataclasses.replace(p, sweep="other").key
    assert p.key != dataclasses.replace(p, lr=p.lr * 2).key
    assert p.key != dataclasses.replace(p, steps=p.steps + 1).key
    assert p.key != dataclasses.replace(p, model=p.model.replace(rms_norm_eps=1e-5)).key


@pytest.mark.parametrize("i", [0, -1])
def test_param_counts_match_initialised_model(i):
    p = sweeps.get_sweep("cpu_small").points()[i]
    shapes = jax.eval_shape(lambda r: model.init_params(p.model, r), jax.random.PRNGKey(0))
    assert p.params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    c = sweeps.param_counts(p.model)
    assert c["params_non_embedding"] + c["params_embedding"] == c["params"]
    assert c["params_embedding"] == p.model.vocab_size * p.model.hidden_size     # tied in the tiny recipe
    assert p.flops == 6.0 * p.params * p.tokens


def test_point_experiment_fields():
    p = sweeps.get_sweep("cpu_small").points()[4]
    exp = sweeps.point_experiment(p, root="/tmp/r")
    assert exp.model == p.model and exp.num_steps == p.steps and exp.batch_size == p.batch_size
    assert exp.data.seq_len == p.seq_len and exp.optim.peak_lr == p.lr
    assert exp.tokens_per_step * exp.num_steps == p.tokens
    assert exp.run_dir == f"/tmp/r/{p.run_name}" and exp.stage == 2
    assert exp.data.image_max_pixels == 64 * 28 * 28            # the sweep's data override applied
    # the held-out loss: once, at the last step, on one synthetic source per EVAL_KINDS kind at the point's shapes
    assert exp.eval_every == p.steps and exp.eval_data.seq_len == p.seq_len
    assert [n for n, _ in exp.eval_data.mixture] == [f"synthetic:{k}" for k in sweeps.EVAL_KINDS]


def test_result_row_and_bad_budget():
    p = sweeps.get_sweep("cpu_small").points()[0]
    losses = {k: float(i) for i, k in enumerate(sweeps.EVAL_KINDS)}
    row = p.result_row(losses)
    assert row["eval_loss_mean"] == pytest.approx(np.mean(list(losses.values())))
    assert row["key"] == p.key and row["tokens"] == p.tokens
    with pytest.raises(ValueError, match="lack kinds"):
        p.result_row({"caption": 1.0})
    with pytest.raises(ValueError, match="below one step"):
        dataclasses.replace(sweeps.get_sweep("cpu_small"), token_budgets=(10,))


def test_rerun_skips_finished_points(tmp_path, monkeypatch):
    results = str(tmp_path / "r.csv")
    s = sweeps.get_sweep("cpu_small")
    ran = []

    def fake_run_point(point, results, root, eval_samples, log=print):
        ran.append(point.key)
        row = point.result_row({k: 3.0 for k in sweeps.EVAL_KINDS},
                               extra={"final_train_loss": 3.0, "train_seconds": 0.0, "eval_seconds": 0.0})
        scaling.append_result(results, row)
        return row

    monkeypatch.setattr(sweep_cli, "run_point", fake_run_point)
    first = [p.key for p in s.points()[:2]]
    sweep_cli.run_local(s, results, str(tmp_path), 2, only=set(first))
    assert sorted(ran) == sorted(first)
    ran.clear()
    sweep_cli.run_local(s, results, str(tmp_path), 2)
    assert len(ran) == len(s.points()) - 2 and not set(ran) & set(first)
    ran.clear()
    sweep_cli.run_local(s, results, str(tmp_path), 2)
    assert ran == []
    assert len(scaling.read_results(results)) == len(s.points())
    with pytest.raises(ValueError, match="unknown point keys"):
        sweep_cli.run_local(s, results, str(tmp_path), 2, only={"deadbeef0000"})


def test_tpu_emits_one_job_per_point(capsys):
    sweep_cli.main(["--sweep=scaling_data", "--tpu=sw", "--zone=us-east5-a", "--accelerator=v5p-64", "--dry_run"])
    out = capsys.readouterr().out
    pts = sweeps.get_sweep("scaling_data").points()
    for p in pts:
        assert f"sw-{p.key} " in out and f"--point={p.key} --local" in out
    assert out.count("tpu-vm create") == len(pts)
    with pytest.raises(ValueError, match="exactly one"):
        sweep_cli.main(["--sweep=cpu_small"])


@pytest.mark.slow
def test_one_real_point_trains_and_evaluates(tmp_path):
    """A 2-step point of a minimal sweep through the trainer, its held-out loss per data kind -> one table row."""
    size = sweeps.ModelSize("mini", hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, intermediate_size=128)
    s = sweeps.Sweep(name="mini", description="test", base_model="test", sizes=(size,), token_budgets=(2 * 2 * 256,),
                     lrs=(1e-3,), batch_size=2, seq_len=256,
                     vision=VisionConfig(depth=1, embed_dim=32, num_heads=2, out_hidden_size=64),
                     overrides=sweeps.get_sweep("cpu_small").overrides)
    (p,) = s.points()
    results = str(tmp_path / "r.jsonl")
    row = sweep_cli.run_point(p, results, str(tmp_path / "runs"), eval_samples=1, log=lambda *_: None)
    assert row["steps"] == 2 and row["tokens"] == 1024
    assert all(np.isfinite(row[f"eval_loss_{k}"]) for k in sweeps.EVAL_KINDS)
    assert abs(row["eval_loss_mean"] - np.log(p.model.vocab_size)) < 1.0
    assert sweep_cli.done_keys(results) == {p.key}
