"""Run directories in a bucket: gs:// on the local Cloud Storage emulator (tests/gcs.py, started and stopped by
the tests). What is checked against an independent reference:
  - a launch.pretrain run writing to gs:// is killed with -9; a fresh process (another working directory and
    temporary folder: nothing local survives) resumes from the bucket, and every step's loss equals that of an
    uninterrupted run in a local folder, bit for bit;
  - 2 processes (jax.distributed on localhost) write one checkpoint to the bucket, and it restores;
  - a damaged newest step in the bucket is set aside (copied to <step>.unreadable) and the run resumes from
    the step before, as in a local folder;
  - the run lock in a bucket: a live holder refuses, a stale one (no heartbeat, or the same job restarted)
    is taken over, the heartbeat rewrites it, a clean exit frees it; runs without a job name never take a
    live holder over; the emulator refuses a write at a stale generation, and of two runs that both read "no
    lock" and then write, exactly one holds it."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from qwen2vl_jax.model.config import architecture_diff
from qwen2vl_jax.train import checkpoint, paths, rundir, sharding, train_step
from test_checkpoint import _at_step
import repo

REPO = repo.ROOT
STEPS = 8


def _cli(workdir):
    return [sys.executable, "-m", "launch.pretrain", "--experiment=stage3", "--model=test", f"--set=workdir={workdir}",
            f"--set=steps={STEPS}", "--set=checkpoint.every=2", "--set=log_every=1", "--set=batch_size=2"]


def _env(home, variables, job=None):
    """A process of its own "host": its own working directory and TMPDIR, the emulator's variables."""
    tmp = os.path.join(home, "tmp")
    os.makedirs(tmp, exist_ok=True)
    env = {**os.environ, **variables, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": REPO, "TMPDIR": tmp}
    env.pop(rundir.JOB_ENV, None)
    return {**env, **({rundir.JOB_ENV: job} if job else {})}


def _losses(run_dir):
    return {s: r["loss"] for s, r in rundir.read_jsonl(run_dir, rundir.LOSSES_FILE).items()}


@pytest.mark.slow
def test_kill9_in_a_bucket_then_resume_elsewhere_equals_uninterrupted(gcs_bucket, tmp_path):
    bucket, variables = gcs_bucket
    ref, run = str(tmp_path / "ref"), f"{bucket}/runs/stage3"
    proc = subprocess.run(_cli(ref), env=_env(str(tmp_path / "host0"), variables), cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    host1, host2 = tmp_path / "host1", tmp_path / "host2"
    proc = subprocess.Popen(_cli(run), env=_env(str(host1), variables, job="pod/stage3"), cwd=str(host1 / "tmp"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = paths.join(run, "checkpoints", "2", "commit_success.txt")     # orbax's mark of a complete step in a bucket
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not paths.exists(done):
        time.sleep(0.2)
    assert proc.poll() is None, "run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(paths.read_text(paths.join(run, rundir.LOCK_FILE)))["job"] == "pod/stage3"   # left behind
    assert 2 <= max(_losses(run)) < STEPS
    res = subprocess.run(_cli(run), env=_env(str(host2), variables, job="pod/stage3"), cwd=str(host2 / "tmp"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "taking over from a run that did not exit cleanly" in res.stdout
    assert f"resumed from {run}/checkpoints step " in res.stdout
    assert _losses(run) == _losses(ref) and sorted(_losses(ref)) == list(range(1, STEPS + 1))   # bit-identical
    # the rest of the run directory is in the bucket too
    assert paths.read_text(paths.join(run, rundir.LOCK_FILE)) == ""                      # freed on exit
    assert rundir.read_model_config(run).name == "test" and rundir.read_data_config(run)[0] is not None
    assert any(n.startswith("events.out.tfevents") for n in paths.listdir(paths.join(run, "tensorboard")))
    assert paths.exists(paths.join(run, rundir.PROCESSOR_DIR, "tokenizer.json"))
    # the newest params (init_from, launch.evaluate) equal the uninterrupted run's; launch.convert writes a
    # Hugging Face folder into the bucket, which reads back (copied to a local folder) as the same params
    from launch import convert
    cfg = rundir.read_model_config(run)
    params = rundir.load_params(cfg, run)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(rundir.load_params(cfg, ref)))
    convert.convert(False, run, f"{bucket}/hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(paths.listdir(f"{bucket}/hf"))
    assert checkpoint.locate(f"{bucket}/hf").kind == "hf"
    assert architecture_diff(rundir.read_model_config(f"{bucket}/hf"), cfg) == []        # from its config.json
    back = rundir.load_params(cfg, f"{bucket}/hf")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(back), jax.device_get(params))


@pytest.mark.slow
def test_two_processes_write_one_checkpoint_to_the_bucket(gcs_bucket, tmp_path):
    from test_multihost import _start_two_processes, _wait_for
    bucket, _ = gcs_bucket
    run = f"{bucket}/runs/two"
    # os.environ holds the emulator's variables (the fixture); stage 3 (frozen vision tower): the cheapest step
    _wait_for(_start_two_processes(run, "stage3", ["batch_size=4", "steps=2", "log_every=1", "checkpoint.every=1000"]),
              timeout_s=300)
    assert paths.listdir(paths.join(run, "checkpoints")) == ["2"]
    assert paths.exists(paths.join(run, "checkpoints", "2", "commit_success.txt"))     # complete
    # written once, by process 0: one record per step
    assert [r["step"] for r in paths.read_jsonl(paths.join(run, rundir.LOSSES_FILE))] == [1, 2]
    cfg = rundir.read_model_config(run)
    params = rundir.load_params(cfg, run, mesh=sharding.make_mesh(sharding.MeshConfig(data=-1)))
    assert all(np.isfinite(np.asarray(jax.device_get(x))).all() for x in jax.tree.leaves(params))


def test_a_damaged_step_in_the_bucket_is_set_aside(gcs_bucket):
    bucket, _ = gcs_bucket
    directory = f"{bucket}/ck"
    # a small state: what is checked is the file handling around orbax, not the model
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    put = lambda x: jax.device_put(np.asarray(x), one)  # noqa: E731
    state = train_step.TrainState(step=put(np.int32(0)), params={"w": put(np.arange(12, dtype=np.float32).reshape(3, 4))},
                                  opt_state=({"mu": put(np.ones(4, np.float32))},), skipped_steps=put(np.int32(0)),
                                  consecutive_skips=put(np.int32(0)))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), state)
    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=directory, every=1, keep=5))
    for step in (1, 2):
        ckpt.save(_at_step(state, step), {"next_seed": step})
    ckpt.close()
    paths.write_text(paths.join(directory, "2", "meta", "metadata"), "{}")     # a hand edit empties meta
    lines = []
    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=directory, every=1), log=lines.append)
    got, meta = ckpt.restore(abstract)
    ckpt.close()
    assert meta["step"] == 1 and meta["data_state"] == {"next_seed": 1} and int(got.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got.params), jax.device_get(state.params))
    assert lines == [f"checkpoint {directory}/2 does not restore (meta: lacks step, skipped_steps, consecutive_skips, "
                     f"data_state); moved it to {directory}/2.unreadable and trying the next older step"]
    assert paths.listdir(directory) == ["1", "2.unreadable"]
    assert paths.read_text(paths.join(directory, "2.unreadable", "meta", "metadata")) == "{}"   # kept, not deleted


def test_run_lock_in_a_bucket(gcs_bucket, monkeypatch):
    bucket, _ = gcs_bucket
    run = f"{bucket}/runs/locked"
    lock_file = paths.join(run, rundir.LOCK_FILE)
    monkeypatch.setenv(rundir.JOB_ENV, "pod/a")
    logs = []
    holder = rundir.RunLock(run, log=logs.append, heartbeat_s=0.2).__enter__()
    first = paths.read_versioned(lock_file)
    assert json.loads(first[0])["job"] == "pod/a" and not logs
    deadline = time.time() + 10
    while paths.read_versioned(lock_file)[1] == first[1] and time.time() < deadline:
        time.sleep(0.1)
    beat = json.loads(paths.read_versioned(lock_file)[0])["beat"]
    assert beat > json.loads(first[0])["beat"]                         # the heartbeat rewrote it
    # another job on "another host" (a record this host cannot check): refused while the heartbeat is fresh
    monkeypatch.setenv(rundir.JOB_ENV, "pod/b")
    monkeypatch.setattr(rundir, "_alive", lambda holder: True)
    with pytest.raises(rundir.WorkdirInUseError, match=f"run directory {run} is in use by another run"):
        rundir.RunLock(run).__enter__()
    holder._stop.set()                                                  # its heartbeat stops (a killed run) ...
    holder._beater.join()
    with pytest.raises(rundir.WorkdirInUseError):
        rundir.RunLock(run, stale_s=60).__enter__()
    time.sleep(0.5)
    with rundir.RunLock(run, log=logs.append, stale_s=0.4):           # ... and after stale_s it is taken over
        assert json.loads(paths.read_text(lock_file))["job"] == "pod/b"
        assert logs[-1].startswith(f"{lock_file}: taking over from a run that did not exit cleanly (not rewritten for")
    assert paths.read_text(lock_file) == ""                              # a clean exit frees it
    with rundir.RunLock(run, log=logs.append):
        assert len(logs) == 1                                           # a free lock: nothing to take over
        monkeypatch.setenv(rundir.JOB_ENV, "pod/a")
        with pytest.raises(rundir.WorkdirInUseError):                 # another job, a live holder
            rundir.RunLock(run).__enter__()
        monkeypatch.setenv(rundir.JOB_ENV, "pod/b")
        with rundir.RunLock(run, log=logs.append):                   # the same job restarted: taken over at once
            assert "the same job 'pod/b', restarted" in logs[-1]


def test_the_emulator_honours_generation_match(gcs_bucket):
    """The compare-and-swap the bucket lock stands on, checked on the emulator itself first: a write at
    generation 0 creates only a missing object, a write at a generation that is no longer current is refused
    and leaves the object as it was."""
    bucket, _ = gcs_bucket
    obj = f"{bucket}/cas/object"
    g1 = paths.write_versioned(obj, "first", 0)
    assert g1 is not None and paths.read_versioned(obj) == ("first", g1)
    assert paths.write_versioned(obj, "second", 0) is None                  # exists already
    g2 = paths.write_versioned(obj, "third", g1)
    assert g2 is not None and g2 != g1
    assert paths.write_versioned(obj, "fourth", g1) is None                 # g1 is stale now
    assert paths.read_versioned(obj) == ("third", g2)


def test_bucket_lock_without_job_names_never_takes_over_a_live_holder(gcs_bucket, monkeypatch):
    """Runs started by hand (no QWEN2VL_JOB on either side): both records name no job, and "the same job"
    must not be read into two missing names; the live holder (this process, heartbeat fresh) keeps it."""
    bucket, _ = gcs_bucket
    run = f"{bucket}/runs/by_hand"
    monkeypatch.delenv(rundir.JOB_ENV, raising=False)
    logs = []
    with rundir.RunLock(run, log=logs.append):
        assert json.loads(paths.read_text(paths.join(run, rundir.LOCK_FILE)))["job"] is None
        with pytest.raises(rundir.WorkdirInUseError, match=f"pid {os.getpid()} on host"):
            rundir.RunLock(run, log=logs.append).__enter__()
    assert logs == []                                                  # nobody took anything over


def test_two_runs_starting_together_in_a_bucket_one_gets_the_lock(gcs_bucket, monkeypatch):
    """The race: A and B both read "no lock", then both write. Driven deterministically: B's first read returns
    the state both saw before A wrote. Only a write conditional on that generation refuses B (an unconditional
    write would let B overwrite A's record and both would hold the run directory)."""
    bucket, _ = gcs_bucket
    run = f"{bucket}/runs/race"
    lock_file = paths.join(run, rundir.LOCK_FILE)
    monkeypatch.delenv(rundir.JOB_ENV, raising=False)
    seen_by_both = paths.read_versioned(lock_file)
    assert seen_by_both == ("", 0)
    a = rundir.RunLock(run).__enter__()                               # A writes first
    try:
        a_record = paths.read_versioned(lock_file)
        real_read, reads = paths.read_versioned, []

        def b_reads(p):                                                # B read before A's write
            reads.append(p)
            return seen_by_both if len(reads) == 1 else real_read(p)

        monkeypatch.setattr(paths, "read_versioned", b_reads)
        with pytest.raises(rundir.WorkdirInUseError, match="is in use by another run"):
            rundir.RunLock(run).__enter__()
        monkeypatch.setattr(paths, "read_versioned", real_read)
        assert len(reads) == 2                                         # B's write was refused, it looked again
        assert paths.read_versioned(lock_file) == a_record            # A's record stands
    finally:
        a.__exit__(None, None, None)
