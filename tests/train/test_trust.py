"""Runs you can trust: a damaged newest checkpoint costs only the steps since an intact one (same losses as an
uninterrupted run), a resume keeps the schedule it was saved with or refuses other settings, one run per run
directory (a killed run's lock is taken over), losses.jsonl is strict JSON with each step once, a
non-finite hyperparameter never starts a run, and a disk that fills up during a save is one line (exit status
6) after which a resume is exact."""
import errno
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from experiments import registry
from qwen2vl_jax.train import optim, paths, rundir, trainer
from qwen2vl_jax.train.checkpoint import NO_SPACE
from test_checkpoint import DAMAGE, _damage
import repo

REPO = repo.ROOT
STEPS = 6


def _exp(workdir, *more):
    return registry.get_experiment("stage3", "test", [f"workdir={workdir}", f"steps={STEPS}", "batch_size=8",
                                                      "checkpoint.every=1", "checkpoint.keep=10", "log_every=1", *more])


def _records(run_dir):
    with open(os.path.join(run_dir, rundir.LOSSES_FILE)) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 6-step run with a checkpoint after every step: its losses are the reference."""
    run = str(tmp_path_factory.mktemp("trust") / "run")
    summary = trainer.run(_exp(run), stream=io.StringIO())
    assert sorted(summary["losses"]) == list(range(1, STEPS + 1))
    return run, summary["losses"]


def _copy(run, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(run, dst)
    return dst


def test_damaged_newest_checkpoints_resume_bit_identical(uninterrupted, tmp_path):
    """The five ways a newest step can be damaged (steps 3..6 and a new empty 7): the run sets each aside in
    one line, resumes from step 2 and re-trains 3..6 to the uninterrupted run's losses, bit for bit;
    losses.jsonl then holds steps 1..6 once each."""
    ref_run, ref = uninterrupted
    run = _copy(ref_run, tmp_path)
    ckdir = os.path.abspath(os.path.join(run, "checkpoints"))
    damaged = dict(zip((6, 5, 4, 3, 7), DAMAGE))
    for step, kind in damaged.items():
        _damage(os.path.join(ckdir, str(step)), kind)
    out = io.StringIO()
    summary = trainer.run(_exp(run), stream=out)
    lines = out.getvalue().splitlines()
    for step, kind in damaged.items():
        [line] = [x for x in lines if x.startswith(f"checkpoint {ckdir}/{step} does not restore")]
        assert DAMAGE[kind] in line, line
        assert os.path.isdir(os.path.join(ckdir, f"{step}.unreadable"))
    assert f"resumed from {ckdir} step 2" in lines
    assert summary["start_step"] == 2 and summary["losses"] == {s: ref[s] for s in range(3, STEPS + 1)}
    assert [(r["step"], r["loss"]) for r in _records(run)] == sorted(ref.items())


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (mounting needs root: skipped without it): a disk that can be filled for real, so the
    ENOSPC comes from where it would, tensorstore's C++ writers included."""
    disk = tmp_path / "disk"
    disk.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill ({res.stderr.strip()})")
    try:
        yield str(disk)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def _fill(disk, leave):
    """Writes a file that leaves `leave` bytes free on `disk`; returns its path."""
    st = os.statvfs(disk)
    filler = os.path.join(disk, "filler")
    with open(filler, "wb") as f:
        f.write(bytes(st.f_bavail * st.f_frsize - leave))
    return filler


@pytest.mark.slow
def test_disk_full_during_a_save_is_one_line_and_resume_is_exact(uninterrupted, small_disk):
    """A run whose disk fills up while it saves a checkpoint (the uninterrupted run's first 2 steps, then
    256 KiB free: less than one checkpoint) stops with one ERROR line (the last on stderr) naming the newest good checkpoint and
    exit status 6; once space is freed, the same command resumes from it and the losses of steps 1..6 equal
    the uninterrupted run's, bit for bit."""
    ref_run, ref = uninterrupted
    run = os.path.join(small_disk, "run")
    shutil.copytree(ref_run, run, ignore=lambda d, names: [n for n in names if d.endswith("checkpoints") and
                                                          n.isdigit() and int(n) > 2])
    cli = [sys.executable, "-m", "launch.pretrain", "--experiment=stage3", "--model=test", f"--set=workdir={run}",
           f"--set=steps={STEPS}", "--set=batch_size=8", "--set=checkpoint.every=1", "--set=checkpoint.keep=10",
           "--set=log_every=1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}       # the devices of the in-process run
    filler = _fill(small_disk, leave=256 << 10)
    full = subprocess.run(cli, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    ckdir = os.path.join(run, "checkpoints")
    assert full.returncode == trainer.EXIT_DISK_FULL, full.stderr[-3000:]
    # one ERROR line, and no error logs or tracebacks of orbax's writers that mention the disk (tensorstore's
    # callbacks into the closed event loop of the abandoned save may still print "Event loop is closed")
    [line] = [x for x in full.stderr.splitlines() if NO_SPACE in x]
    assert full.stderr.splitlines()[-1] == line and not re.search(r"^E\d{4} ", full.stderr, re.M), full.stderr[-3000:]
    assert line.startswith("ERROR: No space left on device (disk full)") and \
        f"the newest good checkpoint is {ckdir}/2 (older ones are intact)" in line, line
    assert sorted(int(n) for n in os.listdir(ckdir) if n.isdigit()) == [1, 2]
    os.remove(filler)
    again = subprocess.run(cli, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckdir} step 2" in again.stdout
    assert [(r["step"], r["loss"]) for r in _records(run)] == sorted(ref.items())


def test_resume_keeps_the_saved_schedule_or_refuses_other_settings(uninterrupted, tmp_path):
    run = _copy(uninterrupted[0], tmp_path)
    before = sorted(os.listdir(os.path.join(run, "checkpoints")))
    for more, why in ((["optim.peak_lr=1e-3"], "optim.peak_lr 0.0005 (checkpoint) vs 0.001 (now)"),
                      (["optim.total_steps=12"], "optim.total_steps 6 (checkpoint) vs 12 (now)"),
                      (["trainable=('merger',)"], "trainable ['merger', 'llm'] (checkpoint) vs ['merger'] (now)")):
        with pytest.raises(ValueError) as e:
            trainer.run(_exp(run, *more))
        assert why in str(e.value) and "start a new run from its params" in str(e.value) and "\n" not in str(e.value)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == before       # refused, nothing set aside
    # steps 6 -> 7: the schedule saved with the checkpoint (cosine to step 6) goes on at its end value,
    # min_lr_ratio x peak_lr = 0.1 x 5e-4, where a new 7-step schedule would still be decaying
    out = io.StringIO()
    summary = trainer.run(_exp(run, "steps=7"), stream=out)
    assert summary["start_step"] == 6 and summary["step"] == 7
    text = out.getvalue()
    assert "steps=7 but the checkpoint's learning-rate schedule" in text and "ends at step 6: keeping it" in text
    assert [x for x in text.splitlines() if x.startswith("step 7/7")][0].split(" | ")[2] == "lr 5.00e-05"
    assert optim.schedule(optim.OptimConfig(peak_lr=5e-4, warmup_steps=2, total_steps=7))(6) > 5.2e-5


def test_a_second_run_in_the_same_directory_stops_at_start(tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    with rundir.RunLock(run):
        with pytest.raises(rundir.WorkdirInUseError) as e:
            trainer.run(_exp(run))
    msg = str(e.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg and "another --set workdir" in msg
    assert "\n" not in msg and sorted(os.listdir(run)) == [rundir.LOCK_FILE]     # nothing else touched
    assert open(os.path.join(run, rundir.LOCK_FILE)).read() == ""                   # released on exit


HOLD = "import sys, time; from qwen2vl_jax.train.rundir import RunLock; RunLock(sys.argv[1]).__enter__(); " \
       "print('held', flush=True); time.sleep(600)"


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    run = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, run], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(rundir.WorkdirInUseError, match=f"pid {proc.pid} on host"):
            rundir.RunLock(run).__enter__()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    logs = []
    with rundir.RunLock(run, log=logs.append):
        assert json.loads(open(os.path.join(run, rundir.LOCK_FILE)).read())["pid"] == os.getpid()
    assert len(logs) == 1 and "did not exit cleanly" in logs[0] and f"'pid': {proc.pid}" in logs[0]


def test_without_flock_the_lock_record_decides(tmp_path, monkeypatch):
    """On a file system without flock, a record naming a running process on this host (same pid and start
    time) or any process on another host refuses; a dead pid, or a pid now held by a younger process, is
    taken over."""
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(rundir.fcntl, "flock", no_flock)
    run, path = str(tmp_path), os.path.join(str(tmp_path), rundir.LOCK_FILE)
    here = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for holder, refused in (
                ({"pid": sleeper.pid, "host": here, "start_ticks": rundir._start_time(sleeper.pid)}, True),
                ({"pid": 1234, "host": "elsewhere", "start_ticks": "5"}, True),
                ({"pid": dead.pid, "host": here, "start_ticks": "5"}, False),
                ({"pid": sleeper.pid, "host": here, "start_ticks": "1"}, False)):    # pid reused since
            with open(path, "w") as f:
                json.dump(holder, f)
            logs = []
            if refused:
                with pytest.raises(rundir.WorkdirInUseError, match=f"pid {holder['pid']} on host {holder['host']}"):
                    rundir.RunLock(run, log=logs.append).__enter__()
            else:
                with rundir.RunLock(run, log=logs.append):
                    pass
                assert "did not exit cleanly" in logs[0] and open(path).read() == ""
    finally:
        sleeper.kill()
        sleeper.wait()


def test_losses_jsonl_is_strict_json_and_cut_back_on_resume(tmp_path):
    path = str(tmp_path / rundir.LOSSES_FILE)
    log = paths.JsonlLog(path)
    for step, loss in ((1, 2.5), (2, float("nan")), (3, float("inf")), (4, 1.0)):
        log.append({"step": step, "loss": loss, "finite": loss < 3})
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 5, "lo')                               # a line cut short by kill -9

    def strict(text):
        raise ValueError(f"not JSON: {text}")
    with open(path) as f:
        rows = [json.loads(line, parse_constant=strict) for line in f.readlines()[:4]]
    assert [r["loss"] for r in rows] == [2.5, None, None, 1.0]
    logs = []
    rundir.truncate_jsonl(path, 3, logs.append)
    assert [r["step"] for r in rundir.read_jsonl(str(tmp_path), rundir.LOSSES_FILE).values()] == [1, 2, 3]
    assert logs == ["losses.jsonl: dropped 2 records after step 3 (re-trained from here)"]


@pytest.mark.parametrize("item", ["optim.peak_lr=nan", "optim.b2=inf", "z_loss=-inf", "optim.eps=nan"])
def test_a_non_finite_hyperparameter_is_rejected_at_start(item):
    with pytest.raises(ValueError, match="not a finite number"):
        registry.get_experiment("stage1", "test", [item])


def test_non_finite_optimizer_settings_are_rejected_by_the_config():
    for field in ("peak_lr", "min_lr_ratio", "weight_decay", "b1", "b2", "eps", "grad_clip"):
        with pytest.raises(ValueError, match=f"optim.{field}=nan must be a finite number"):
            optim.OptimConfig(**{field: float("nan")})
    with pytest.raises(ValueError, match="finite multiplier"):
        optim.OptimConfig(lr_scale=(("merger", float("inf")),))
