"""launch.pretrain CLI: list, bad flags and overrides (a non-finite one too), --show_config, too-large model, a
finished run re-run, a second run in one workdir, SIGTERM save-and-exit, non-finite stop."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import repo

REPO = repo.ROOT


def _env(devices=2):
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _cli(*args):
    return [sys.executable, "-m", "launch.pretrain", *args]


@pytest.mark.slow
def test_list_and_bad_override_messages():
    res = subprocess.run(_cli("--list"), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0
    for name in ("stage1", "stage2", "stage3"):
        assert name in res.stdout
    res = subprocess.run(_cli("--set=optim.peak_lrr=1"), env=_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2
    assert "peak_lrr" in res.stderr and "peak_lr" in res.stderr and "warmup_steps" in res.stderr
    res = subprocess.run(_cli("--experiment=stage9"), env=_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and "stage9" in res.stderr and "stage1|stage2|stage3" in res.stderr
    res = subprocess.run(_cli("--set=optim.peak_lr=nan"), env=_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "--set optim.peak_lr='nan': cannot parse as float" in res.stderr and "not a finite number" in res.stderr


def test_a_second_run_in_the_same_workdir_is_one_line(tmp_path):
    from qwen2vl_jax.train import rundir

    with rundir.RunLock(str(tmp_path)):
        res = subprocess.run(_cli("--model=test", f"--set=workdir={tmp_path}"), env=_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert f"ERROR: run directory {tmp_path} is in use by another run (pid {os.getpid()}" in res.stderr


@pytest.mark.slow
def test_show_config_exits_and_a_finished_run_says_so(tmp_path):
    res = subprocess.run(_cli("--model=test", f"--set=workdir={tmp_path / 'run'}", "--set=batch_size=2",
                              "--show_config"), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    # the test recipe's token budget is 20 steps of 4 rows: 40 steps of 2
    assert res.returncode == 0 and "batch_size = 2" in res.stdout and "num_steps = 40" in res.stdout
    assert not (tmp_path / "run").exists()                       # printed, not trained
    # README's first command at the test size, with an evaluation at its last step
    args = _cli("--experiment=stage1", "--model=test", f"--set=workdir={tmp_path / 'run'}", "--set=batch_size=2",
                "--set=steps=2", "--set=eval_every=2", "--set=eval_samples=4")
    first = subprocess.run(args, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    with open(tmp_path / "run" / "losses.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    assert first.stdout.splitlines()[-1] == (f"done: trained steps 1..2 of 2, loss {losses[0]:.4f} -> {losses[1]:.4f}, "
                                             f"skipped steps 0; checkpoints in {tmp_path / 'run' / 'checkpoints'}")
    _check_readme_and_eval_outputs(first.stdout, tmp_path / "run")
    again = subprocess.run(args, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.splitlines()[-1] == ("already at step 2 of 2; nothing to train; checkpoints in "
                                             f"{tmp_path / 'run' / 'checkpoints'}")
    assert len((tmp_path / "run" / "losses.jsonl").read_text().splitlines()) == 2


def _tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the event files in `folder` (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for name in os.listdir(folder):
        data, i = (folder / name).read_bytes(), 0
        while i < len(data):
            n = int.from_bytes(data[i:i + 8], "little")
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 16 + n
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def _check_readme_and_eval_outputs(stdout: str, run):
    """README's sample output has the lines of the real run's (numbers and paths aside), and its run-folder
    listing is the folder's. The console's eval line leaves out the kind/<k> entries that repeat a source (each
    synthetic source is one kind); heldout.jsonl and TensorBoard keep every entry."""
    import readme_sample

    lines = stdout.splitlines()
    assert {readme_sample.shape(x) for x in lines} == {readme_sample.shape(x) for x in readme_sample.console_lines()}
    assert set(os.listdir(run)) == readme_sample.folder_entries()
    [record] = [json.loads(x) for x in (run / "heldout.jsonl").read_text().splitlines()]
    kinds = ("caption", "ocr", "count")                          # stage 1's mixture: one synthetic source per kind
    assert set(record) == {"step", "mean"} | {f"{p}/{k}" for p in ("source", "kind") for k in kinds}
    assert [x for x in lines if x.startswith("eval")] == [
        "eval step 2 | " + " | ".join(f"{k} {record[k]:.4f}" for k in (*(f"source/{k}" for k in kinds), "mean"))]
    scalars = _tensorboard_scalars(run / "tensorboard")
    for name, value in record.items():
        if name != "step":
            assert scalars[f"eval/{name}"] == {2: pytest.approx(value, rel=1e-6)}, name


def test_too_large_model_fails_before_allocating(tmp_path):
    t0 = time.time()
    res = subprocess.run(_cli("--model=7b", f"--set=workdir={tmp_path}"), env=_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "needs" in res.stderr and "GiB per device" in res.stderr and "host RAM" in res.stderr
    assert not os.path.exists(tmp_path / "checkpoints" / "0")
    assert time.time() - t0 < 120
    # a mesh that does not fit the devices is a clear configuration error
    res = subprocess.run(_cli("--model=test", "--set=mesh.tensor=3", f"--set=workdir={tmp_path}"), env=_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "tensor" in res.stderr and "devices" in res.stderr, res.stderr[-2000:]


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(tmp_path):
    proc = subprocess.Popen(_cli("--model=test", f"--set=workdir={tmp_path}", "--set=steps=50", "--set=log_every=1",
                                 "--set=checkpoint.every=100", "--set=batch_size=2"),
                            env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = []
    for line in proc.stdout:           # progress lines: "step 2/50 | loss ..."
        seen.append(line)
        if line.startswith("step 2/50"):
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.stdout.read()
    assert proc.wait(timeout=600) == 0
    assert "SIGTERM: saved checkpoint" in out
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps and 2 <= steps[-1] < 50
    with open(tmp_path / "losses.jsonl") as f:
        assert len(f.readlines()) == steps[-1]
    assert os.listdir(tmp_path / "tensorboard")  # event file written
    # the run's configs sit beside its checkpoints for launch.evaluate
    data_cfg = json.loads((tmp_path / "data_config.json").read_text())
    assert data_cfg["seq_len"] == 128 and data_cfg["image_max_pixels"] == 16 * 28 * 28
    assert json.loads((tmp_path / "model_config.json").read_text())["name"] == "test"
    assert "loss" in seen[-1] and "tok/s" in seen[-1]


@pytest.mark.slow
def test_non_finite_steps_stop_with_checkpoint(tmp_path):
    # an absurd learning rate blows the params up after the first update: every later step is non-finite
    res = subprocess.run(_cli("--model=test", f"--set=workdir={tmp_path}", "--set=steps=20",
                              "--set=optim.peak_lr=1e30", "--set=optim.warmup_steps=0", "--set=optim.grad_clip=0",
                              "--set=max_consecutive_skips=2", "--set=batch_size=2"),
                         env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "non-finite steps in a row" in res.stderr and "checkpoint saved" in res.stderr
    def strict(text):
        raise ValueError(f"losses.jsonl is not JSON: {text}")
    with open(tmp_path / "losses.jsonl") as f:
        rows = [json.loads(line, parse_constant=strict) for line in f]
    assert rows[-1]["finite"] is False and rows[-2]["finite"] is False and len(rows) < 20
    assert rows[-1]["loss"] is None or rows[-1]["grad_norm"] is None      # a non-finite value is null
    assert str(len(rows)) in os.listdir(tmp_path / "checkpoints")


# ----------------------------------------------------------------------------------------------
# the loop reads metrics a step late and prefetches batches to the device: its records, its final state and
# its non-finite stop are those of a plain loop that waits for every step (written out here)

def _synchronous_loop(exp, stop_after_skips: int | None = None):
    """[(losses.jsonl record, state after the step, data-iterator state after its batch)] of the experiment's
    first steps, one step at a time."""
    import jax
    import numpy as np

    from qwen2vl_jax.data.pipeline import make_iterator
    from qwen2vl_jax.data.tokenizer import load_tokenizer
    from qwen2vl_jax.train import sharding, train_step

    step_cfg = exp.step_config()
    mesh = sharding.make_mesh(exp.mesh)
    _, st_sh = train_step.abstract_state(exp.model, step_cfg, mesh)
    b_sh = sharding.batch_shardings(train_step.batch_spec(exp.model, exp.batch_size, exp.data.seq_len,
                                                          exp.data.max_patches), mesh)
    step_fn = train_step.make_train_step(exp.model, step_cfg, mesh, st_sh, b_sh)
    state = train_step.init_state(exp.model, step_cfg, jax.random.key(exp.seed), mesh)
    data = make_iterator(exp.data, exp.model, load_tokenizer(exp.tokenizer), batch_size=exp.batch_size)
    out = []
    for step in range(1, exp.num_steps + 1):
        state, m = step_fn(state, sharding.global_batch(next(data), b_sh))
        hm = train_step.host_metrics(m)
        out.append(({"step": step, "loss": hm["loss"], "grad_norm": hm["grad_norm"], "finite": hm["finite"]},
                    jax.tree.map(np.asarray, jax.device_get(state)), data.get_state()))
        if stop_after_skips is not None and hm["consecutive_skips"] >= stop_after_skips:
            break
    data.close()
    return out


def _assert_same_tree(a, b):
    import jax
    import numpy as np
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _records(run_dir):
    with open(os.path.join(run_dir, "losses.jsonl")) as f:
        return [json.loads(line) for line in f]


OVERRIDES = ["batch_size=8", "checkpoint.every=3", "log_every=2", "data.seq_len=128"]


@pytest.mark.slow
def test_loop_equals_a_synchronous_loop(tmp_path):
    from experiments import registry
    from qwen2vl_jax.train import checkpoint, sharding, trainer, train_step

    exp = registry.get_experiment("stage2", "test", OVERRIDES + [f"workdir={tmp_path}", "steps=5"])
    summary = trainer.run(exp, stream=open(os.devnull, "w"))
    ref = _synchronous_loop(exp)
    assert _records(tmp_path) == [r for r, _, _ in ref]                   # exact floats, same steps
    assert summary["losses"] == {r["step"]: r["loss"] for r, _, _ in ref}
    abstract, _ = train_step.abstract_state(exp.model, exp.step_config(), sharding.make_mesh(exp.mesh))
    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=exp.checkpoint_dir))
    assert ckpt.all_steps() == [3, 5]
    for step in (3, 5):
        state, meta = ckpt.restore(abstract, step=step)
        _assert_same_tree(state, ref[step - 1][1])
        assert meta["data_state"] == ref[step - 1][2]
    ckpt.close()


@pytest.mark.slow
def test_non_finite_stop_equals_a_synchronous_loop(tmp_path):
    """An absurd learning rate blows the params up after the first update; with max_consecutive_skips=2 the
    run stops at the step a plain loop stops at, with the same records and that step's state saved. Step 3
    is not a checkpoint step, so the loop has dispatched step 4 when it reads step 3's metrics."""
    from experiments import registry
    from qwen2vl_jax.train import checkpoint, sharding, trainer, train_step

    exp = registry.get_experiment("stage2", "test", OVERRIDES + [
        f"workdir={tmp_path}", "steps=8", "checkpoint.every=5", "optim.peak_lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0",
        "max_consecutive_skips=2"])
    with pytest.raises(trainer.NonFiniteError, match="2 non-finite steps in a row at step 3"):
        trainer.run(exp, stream=open(os.devnull, "w"))
    ref = _synchronous_loop(exp, stop_after_skips=2)
    assert len(ref) == 3 and [r["finite"] for r, _, _ in ref] == [True, False, False]
    # strict JSON: the non-finite values the plain loop saw are written as null
    strict = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()}
              for r, _, _ in ref]
    assert any(None in r.values() for r in strict)
    assert _records(tmp_path) == strict
    abstract, _ = train_step.abstract_state(exp.model, exp.step_config(), sharding.make_mesh(exp.mesh))
    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=exp.checkpoint_dir))
    assert ckpt.all_steps() == [3]
    state, meta = ckpt.restore(abstract)
    _assert_same_tree(state, ref[-1][1])
    assert meta["step"] == 3 and meta["consecutive_skips"] == 2 and meta["data_state"] == ref[-1][2]
    ckpt.close()
