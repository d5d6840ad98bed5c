"""Multi-host: `launch.pretrain` as 2 local processes x 4 CPU devices (jax.distributed on localhost, gloo
CPU collectives), each process reading its own data shard, gives the losses of 1 process x 8 devices
running the same train step on the same global batches (process 0's shard rows, then process 1's), and
the held-out losses that 1 process x 8 devices computes from the same final params."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import registry
from qwen2vl_jax.train import rundir
import repo

REPO = repo.ROOT
STEPS = 2
OVERRIDES = ["batch_size=8", f"steps={STEPS}", "log_every=1", "checkpoint.every=1000", "data.max_patches=256",
             f"eval_every={STEPS}", "eval_samples=32", "eval_mixture=(('synthetic:caption', 1.0),)"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two_processes(workdir: str, experiment: str = "stage2", overrides=tuple(OVERRIDES)) -> list[subprocess.Popen]:
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": REPO}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "launch.pretrain", f"--experiment={experiment}", "--model=test",
         *[f"--set={o}" for o in [*overrides, f"workdir={workdir}"]],
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    return procs


def _wait_for(procs: list[subprocess.Popen], timeout_s: float = 240) -> None:
    """Waits for every process (killing the rest when one overruns); each must exit 0."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout_s)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


def _losses_of_two_processes(procs: list[subprocess.Popen], workdir: str) -> list[float]:
    _wait_for(procs)
    with open(os.path.join(workdir, "losses.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


def _reference_one_process() -> list[float]:
    """1 process x 8 devices: the same init, step and global batches (both data shards concatenated)."""
    from qwen2vl_jax.train import sharding, train_step
    from qwen2vl_jax.data.pipeline import make_iterator
    from qwen2vl_jax.data.tokenizer import load_tokenizer

    assert jax.device_count() == 8
    exp = registry.get_experiment("stage2", "test", OVERRIDES)
    cfg, step_cfg = exp.model, exp.step_config()
    mesh = sharding.make_mesh(exp.mesh)
    _, st_sh = train_step.abstract_state(cfg, step_cfg, mesh)
    b_sh = sharding.batch_shardings(train_step.batch_spec(cfg, exp.batch_size, exp.data.seq_len, exp.data.max_patches), mesh)
    tok = load_tokenizer(exp.tokenizer)
    shards = [make_iterator(exp.data, cfg, tok, batch_size=exp.batch_size // 2, process_index=i, process_count=2)
              for i in range(2)]
    state = train_step.init_state(cfg, step_cfg, jax.random.key(exp.seed), mesh)
    step = train_step.make_train_step(cfg, step_cfg, mesh, st_sh, b_sh)
    losses = []
    try:
        for _ in range(STEPS):
            parts = [next(it) for it in shards]
            batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            state, m = step(state, sharding.global_batch(batch, b_sh))
            losses.append(train_step.host_metrics(m)["loss"])
    finally:
        for it in shards:
            it.close()
    return losses


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    workdir = str(tmp_path / "run")
    procs = _start_two_processes(workdir)          # runs while this process computes the reference
    try:
        single = _reference_one_process()
    finally:
        multi = _losses_of_two_processes(procs, workdir)
    assert np.all(np.isfinite(multi))
    np.testing.assert_allclose(multi, single, rtol=2e-5, atol=2e-5)
    assert multi[0] != multi[-1]        # the steps really update the params
    # the held-out evaluation of the 2-process run (each process feeding its shard of every batch)
    exp = registry.get_experiment("stage2", "test", OVERRIDES + [f"workdir={workdir}"])
    evaluate = exp.evaluator()
    (batch,) = evaluate.groups[0].batches
    assert batch["segment_ids"][:4].any() and batch["segment_ids"][4:].any()     # both processes feed real rows
    logged = {k: v for k, v in rundir.read_jsonl(workdir, rundir.HELDOUT_FILE)[STEPS].items() if k != "step"}
    assert logged == pytest.approx(evaluate(rundir.load_params(exp.model, exp.checkpoint_dir)), rel=1e-5)
