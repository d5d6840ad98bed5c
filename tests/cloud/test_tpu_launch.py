"""qwen2vl_jax.cloud.tpu and its CLI launch.tpu: exact dry-run commands, reuse vs create through an injected
runner, flag validation."""
import shlex
import subprocess
import sys

import pytest

from qwen2vl_jax.cloud import tpu
from qwen2vl_jax.perf import aot
from qwen2vl_jax.train import trainer
from qwen2vl_jax.cloud.tpu import REPO_ROOT, TpuVm

VM = TpuVm(name="qv-pod", zone="us-east5-a", accelerator="v5p-128", project="my-proj", spot=True)


def test_dry_run_prints_exact_commands():
    out = subprocess.run(
        [sys.executable, "-m", "launch.tpu", "--experiment=stage2", "--model=7b", "--tpu=qv-pod",
         "--zone=us-east5-a", "--accelerator=v5p-128", "--project=my-proj", "--dry_run",
         "--set=optim.peak_lr=1e-4", "--set", "description=a b", "--libtpu_args=--xla_x=1"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    scope = "--zone=us-east5-a --project=my-proj"
    jax_version = tpu.pinned_jax_version()
    install = ("mkdir -p ~/qwen2vl_jax && tar xzf ~/qwen2vl_jax.tar.gz -C ~/qwen2vl_jax && cd ~/qwen2vl_jax"
               f" && python3 -m pip install -q -r requirements.txt 'jax[tpu]=={jax_version}'")
    train = ("python3 -m launch.pretrain --experiment=stage2 --model=7b --set=optim.peak_lr=1e-4 "
             "'--set=description=a b'")
    env = (f"export LIBTPU_INIT_ARGS={shlex.quote(' '.join(aot.TPU_COMPILER_FLAGS + ('--xla_x=1',)))}; "
           "export QWEN2VL_JOB=qv-pod/stage2-qv-pod; ")
    start = ("cd ~/qwen2vl_jax && mkdir -p logs && { pkill -f '[l]aunch.pretrain' || true; } && rm -f "
             f"logs/stage2-qv-pod.exit && nohup sh -c {shlex.quote(env + train + '; echo $? > logs/stage2-qv-pod.exit')}"
             " > logs/stage2-qv-pod.log 2>&1 < /dev/null &")
    expected = [
        f"gcloud compute tpus tpu-vm describe qv-pod {scope} '--format=value(state)' > /dev/null 2>&1 || "
        f"gcloud compute tpus tpu-vm create qv-pod {scope} --accelerator-type=v5p-128 "
        "--version=v2-alpha-tpuv5",
        f"git -C {shlex.quote(REPO_ROOT)} archive --format=tar.gz --output=/tmp/qwen2vl_jax.tar.gz HEAD",
        f"gcloud compute tpus tpu-vm scp /tmp/qwen2vl_jax.tar.gz 'qv-pod:~/qwen2vl_jax.tar.gz' {scope} --worker=all",
        f"gcloud compute tpus tpu-vm ssh qv-pod {scope} --worker=all {shlex.quote('--command=' + install)}",
        f"gcloud compute tpus tpu-vm ssh qv-pod {scope} --worker=all {shlex.quote('--command=' + start)}",
    ]
    assert out.splitlines() == expected
    assert _remote_train_argv(out.splitlines()[-1]) == [
        "python3", "-m", "launch.pretrain", "--experiment=stage2", "--model=7b", "--set=optim.peak_lr=1e-4",
        "--set=description=a b"]
    # the job's environment: the compiler flags launch.aot compiles with, then the user's (libtpu takes a
    # flag's last value), as the worker's shell sees it
    got = _exports(out.splitlines()[-1])["LIBTPU_INIT_ARGS"]
    assert got.split() == list(aot.TPU_COMPILER_FLAGS) + ["--xla_x=1"]
    assert "--xla_jf_spmd_threshold_for_windowed_einsum_mib=1000000" in got.split()


def _worker_words(line: str, coordinator: str) -> list[str]:
    """Runs a rendered ssh line in bash with a fake gcloud that prints its --command, and returns the words of
    the worker's `sh -c` script: what the line really does, parsed by the shells themselves."""
    fake = ("import sys, shlex; c = sys.argv[-1].removeprefix('--command='); t = shlex.split(c); "
            "print('\\n'.join(shlex.split(t[t.index('-c') + 1].replace(';', ' ; '))))")
    return subprocess.run(["bash", "-c", f"gcloud() {{ {shlex.quote(sys.executable)} -c {shlex.quote(fake)} \"$@\"; }}; {line}"],
                          env={"COORDINATOR": coordinator, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          check=True).stdout.splitlines()


def _remote_train_argv(line: str, coordinator: str = "10.0.0.2") -> list[str]:
    """The argv the worker runs (exports dropped, up to "; echo $? > logs/RUN.exit")."""
    words = _worker_words(line, coordinator)
    words = words[:words.index("echo") - 1]
    while words and words[0] == "export":
        words = words[words.index(";") + 1:]
    return words


def _exports(line: str, coordinator: str = "10.0.0.2") -> dict[str, str]:
    words = _worker_words(line, coordinator)
    return dict(w.rstrip(";").split("=", 1) for i, w in enumerate(words) if i and words[i - 1] == "export")


def test_dry_run_of_a_two_slice_spot_job_with_watch():
    """Queued resource with 2 spot slices, wait for it, coordinator look-up, per slice: copy, install + gcsfuse
    mount of the data bucket, start with the MEGASCALE variables and mesh.dcn=2; then the watch lines."""
    out = subprocess.run(
        [sys.executable, "-m", "launch.tpu", "--experiment=stage1", "--model=72b", "--tpu=qv-pod",
         "--zone=us-east5-a", "--accelerator=v5p-512", "--num_slices=2", "--spot", "--watch", "--dry_run",
         "--set=workdir=gs://qv-runs/stage1_72b", "--set=data.mixture=(('arrayrecord:gs://qv-data/caption', 1.0),)"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    z = "--zone=us-east5-a"
    assert out[0] == (f"gcloud compute tpus queued-resources describe qv-pod {z} '--format=value(state.state)' > "
                      f"/dev/null 2>&1 || gcloud compute tpus queued-resources create qv-pod {z} --node-count=2 "
                      "--node-prefix=qv-pod --accelerator-type=v5p-512 --runtime-version=v2-alpha-tpuv5 --spot")
    assert out[1].startswith("until [ ") and out[1].endswith("= ACTIVE ]; do sleep 60; done")
    assert out[2] == (f"COORDINATOR=$(gcloud compute tpus tpu-vm describe qv-pod-0 {z} "
                      "'--format=value(networkEndpoints[0].ipAddress)')")
    assert out[3].startswith("git -C ")
    for i, node in enumerate(("qv-pod-0", "qv-pod-1")):
        scp, install = out[4 + 2 * i], out[5 + 2 * i]
        assert scp.startswith(f"gcloud compute tpus tpu-vm scp /tmp/qwen2vl_jax.tar.gz '{node}:~/qwen2vl_jax.tar.gz'")
        assert install.startswith(f"gcloud compute tpus tpu-vm ssh {node} {z} --worker=all ")
        assert "pip install" in install and "gcsfuse -o ro --implicit-dirs qv-data /mnt/gcs/qv-data" in install
        start = out[8 + i]
        assert _remote_train_argv(start) == [
            "python3", "-m", "launch.pretrain", "--experiment=stage1", "--model=72b", "--set=mesh.dcn=2",
            "--set=workdir=gs://qv-runs/stage1_72b",
            "--set=data.mixture=(('arrayrecord:gs://qv-data/caption', 1.0),)"]
        assert _exports(start) == {"LIBTPU_INIT_ARGS": " ".join(aot.TPU_COMPILER_FLAGS), "QWEN2VL_JOB": "qv-pod/stage1-qv-pod",
                                   "MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080", "MEGASCALE_PORT": "8080",
                                   "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": str(i)}
    watch = out[10:]
    assert watch[0].startswith("# watch:") and all(w.startswith("#") for w in watch)
    assert f"gcloud compute tpus queued-resources delete qv-pod {z} --force --quiet" in "\n".join(watch)


def test_a_preemptible_job_needs_a_bucket_workdir():
    proc = subprocess.run(
        [sys.executable, "-m", "launch.tpu", "--experiment=stage1", "--tpu=qv-pod", "--zone=us-east5-a",
         "--accelerator=v5p-8", "--spot", "--dry_run", "--set=workdir=/tmp/run"],
        cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("ERROR: workdir '/tmp/run' is on the workers' disks") and "gs://" in proc.stderr


@pytest.mark.parametrize("flag, msg", [
    ("--set=optim.peak_lrr=1e-4", "unknown key 'optim.peak_lrr': optim has no field 'peak_lrr'; valid: "),
    ("--experiment=stage9", "flag --experiment=stage9: value should be one of <stage1|stage2|stage3>"),
])
def test_cli_rejects_a_bad_experiment_before_any_command(flag, msg):
    """The overrides the workers will parse are parsed here first: a typo costs no TPU VM."""
    proc = subprocess.run(
        [sys.executable, "-m", "launch.tpu", "--experiment=stage2", "--tpu=qv-pod", "--zone=us-east5-a",
         "--accelerator=v5p-128", "--dry_run", flag], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""       # configuration errors exit 2 in every CLI
    assert proc.stderr.startswith(f"ERROR: {msg}") and proc.stderr.count("\n") == 1


class FakeRunner:
    def __init__(self, exists: bool, fail_on: str | None = None):
        self.exists, self.fail_on, self.calls = exists, fail_on, []

    def __call__(self, argv):
        self.calls.append(list(argv))
        if argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]:
            return 0 if self.exists else 1
        return 1 if self.fail_on and self.fail_on in argv else 0


def test_reuses_existing_vm():
    jobs = tpu.job_commands(VM, "stage1", jax_version="0.10.2")
    runner = FakeRunner(exists=True)
    assert tpu.launch(VM, jobs, runner) == "reused"
    assert runner.calls == [VM.describe(), *jobs]
    assert not any("create" in c for c in runner.calls)


def test_creates_missing_vm():
    jobs = tpu.job_commands(VM, "stage1", jax_version="0.10.2")
    runner = FakeRunner(exists=False)
    assert tpu.launch(VM, jobs, runner) == "created"
    assert runner.calls == [VM.describe(), VM.create(), *jobs]
    assert VM.create()[4:6] == ["create", "qv-pod"] and "--spot" in VM.create()


def test_failed_command_stops_the_launch():
    jobs = tpu.job_commands(VM, "stage1", jax_version="0.10.2")
    runner = FakeRunner(exists=True, fail_on="scp")
    with pytest.raises(RuntimeError, match="exit code 1: gcloud compute tpus tpu-vm scp"):
        tpu.launch(VM, jobs, runner)
    assert len(runner.calls) == 3   # describe, archive, scp; nothing started


def test_sweep_point_emitter():
    cmds = tpu.job_commands(VM, "sweep_point", model="tiny", overrides=["model.hidden_size=128"],
                            run_name="sweep-h128", tarball="/tmp/t.tar.gz", jax_version="0.10.2")
    assert cmds[0][-3:] == ["--format=tar.gz", "--output=/tmp/t.tar.gz", "HEAD"]
    assert "'jax[tpu]==0.10.2'" in cmds[2][-1]
    assert cmds[3][-1].endswith("--set=model.hidden_size=128; echo $? > logs/sweep-h128.exit' > logs/sweep-h128.log "
                                "2>&1 < /dev/null &")
    assert tpu.render(cmds).count("\n") == 3


@pytest.mark.parametrize("kw, msg", [
    (dict(name="Bad_Name"), "TPU names"),
    (dict(accelerator="v7x-8"), "--accelerator='v7x-8'"),
    (dict(zone=""), "--zone is required"),
])
def test_bad_flags(kw, msg):
    base = dict(name="ok", zone="z", accelerator="v5p-8")
    with pytest.raises(ValueError, match=msg):
        TpuVm(**{**base, **kw})


def test_bad_override_and_run_name():
    with pytest.raises(ValueError, match="expected key=value"):
        tpu.job_commands(VM, "stage1", overrides=["nokey"], jax_version="0.10.2")
    with pytest.raises(ValueError, match="run_name"):
        tpu.job_commands(VM, "stage1", run_name="a b", jax_version="0.10.2")


def test_runtime_versions_and_pinned_jax():
    assert TpuVm("a", "z", "v5litepod-16").runtime_version == "v2-alpha-tpuv5-lite"
    assert TpuVm("a", "z", "v6e-8", version="custom").runtime_version == "custom"
    with open(f"{REPO_ROOT}/requirements.txt") as f:
        assert f"jax=={tpu.pinned_jax_version()}\n" in f.read()


# ----------------------------------------------------------------------------------------------
# the supervisor, against a simulated cloud

class FakeCloud:
    """A TPU job as gcloud shows it. `events` are applied one per poll (sleep): ("state", S) sets the slice
    state, ("run", (status, code, last_line)) what worker 0 reports; create -> PROVISIONING then ACTIVE at the
    next poll; starting the run -> running."""

    def __init__(self, vm, events, exists=False, fail_create=0):
        self.vm, self.events, self.fail_create = vm, list(events), fail_create
        self.state = "ACTIVE" if exists else None
        self.run = ("missing", None, "")
        self.calls, self.t = [], 0.0

    def kind(self, argv):
        words = [a for a in argv[:6] if not a.startswith("-")]
        if "describe" in words:
            return "coordinator" if any("networkEndpoints" in a for a in argv) else "describe"
        if "ssh" in words:
            c = argv[-1]
            return "status" if "echo running" in c else "start" if "nohup" in c else "install"
        return next((w for w in ("create", "delete", "scp", "archive") if w in words), "?")

    def runner(self, argv):
        k = self.kind(argv)
        self.calls.append(k)
        if k == "create":
            if self.fail_create:
                self.fail_create -= 1
                return 1
            self.state = "PROVISIONING"
        elif k == "delete":
            self.state = None
        elif k == "start":
            assert "@COORDINATOR@" not in argv[-1]
            self.run = ("running", None, "")
        return 0

    def query(self, argv):
        k = self.kind(argv)
        self.calls.append(k)
        if k == "describe":
            return (0, self.state + "\n") if self.state else (1, "")
        if k == "coordinator":
            return 0, "10.0.0.2\n"
        status, code, last = self.run
        return 0, (f"exited {code}\n{last}\n" if status == "exited" else f"{status}\n")

    def sleep(self, s):
        self.t += s
        if self.t > 1000 * 60:
            raise AssertionError("the supervisor polled for 1000 minutes of simulated time")
        if self.state == "PROVISIONING":
            self.state = "ACTIVE"
        elif self.events and self.state == "ACTIVE":
            what, value = self.events.pop(0)
            if what == "state":
                self.state = value
            else:
                self.run = value

    def clock(self):
        return self.t


def _supervise(events, max_retries=3, num_slices=2, **kw):
    vm = TpuVm(name="qv-pod", zone="z", accelerator="v5p-16", spot=True, num_slices=num_slices)
    job = tpu.make_job(vm, "stage1", overrides=["workdir=gs://b/r"], jax_version="0.10.2")
    cloud = FakeCloud(vm, events, **kw)
    lines = []
    sup = tpu.Supervisor(job, tpu.WatchConfig(poll_s=60, max_retries=max_retries, create_timeout_s=3600),
                         runner=cloud.runner, query=cloud.query, log=lines.append, sleep=cloud.sleep, clock=cloud.clock)
    return sup.run(), cloud, lines


RUNNING = ("run", ("running", None, ""))
DONE = ("run", ("exited", 0, "done: trained steps 1..100 of 100, loss 9.1 -> 3.2"))


def test_supervisor_recreates_a_preempted_slice_and_restarts_the_run():
    status, cloud, lines = _supervise([RUNNING, ("state", "SUSPENDED"), RUNNING, DONE])
    assert status == tpu.EXIT_DONE
    deploy = ["coordinator", "archive", "scp", "install", "scp", "install", "start", "start"]
    assert [c for c in cloud.calls if c not in ("describe", "status")] == (
        ["create", *deploy, "delete", "create", *deploy])
    assert [line.split("] ", 1)[1] for line in lines] == [
        "creating the slice (queued resource)", "slice ready; installing and starting the run",
        "run stage1-qv-pod started", "slice SUSPENDED; retry 1/3", "deleting the SUSPENDED slice",
        "creating the slice (queued resource)", "slice ready; installing and starting the run",
        "run stage1-qv-pod started", "run finished: done: trained steps 1..100 of 100, loss 9.1 -> 3.2"]


def test_supervisor_restarts_a_failed_run_without_recreating():
    sigterm = ("run", ("exited", 0, "preempted: trained steps 1..40 of 100, loss 9.1 -> 5.0"))
    crash = ("run", ("exited", 1, "RuntimeError: DEADLINE_EXCEEDED"))
    status, cloud, lines = _supervise([sigterm, RUNNING, crash, RUNNING, DONE], exists=True, num_slices=1)
    assert status == tpu.EXIT_DONE
    assert cloud.calls.count("create") == 0 and cloud.calls.count("start") == 3
    assert cloud.calls.count("install") == 1 and "coordinator" not in cloud.calls      # one slice: no MEGASCALE
    assert "run stopped by SIGTERM; retry 1/3" in lines[2]
    assert "run exited with status 1: RuntimeError: DEADLINE_EXCEEDED; retry 2/3" in lines[4]


@pytest.mark.parametrize("events, kw, status, last", [
    ([("run", ("exited", 3, "ERROR: 5 non-finite steps in a row"))], {}, tpu.EXIT_NON_FINITE,
     "run stopped with status 3 (non-finite steps): ERROR: 5 non-finite steps in a row"),
    ([("run", ("exited", 2, "ERROR: unknown key"))], {}, tpu.EXIT_CONFIG,
     "run stopped with status 2 (configuration error): ERROR: unknown key"),
    ([("run", ("exited", 6, "ERROR: No space left on device (disk full) ..."))], {}, tpu.EXIT_DISK_FULL,
     "run stopped with status 6 (disk full): ERROR: No space left on device (disk full) ..."),
    ([("state", "PREEMPTED")] * 3, {}, tpu.EXIT_GAVE_UP, "slice PREEMPTED; giving up after 2 retries"),
    ([], {"fail_create": 5}, tpu.EXIT_GAVE_UP, "creating the slice failed; giving up after 2 retries"),
])
def test_supervisor_stops_with_a_status_that_says_why(events, kw, status, last):
    assert (tpu.EXIT_NON_FINITE, tpu.EXIT_DISK_FULL) == (trainer.EXIT_NON_FINITE, trainer.EXIT_DISK_FULL)  # passed on
    got, cloud, lines = _supervise(events, max_retries=2, **kw)
    assert got == status and lines[-1].endswith(last)
    assert cloud.t < 100 * 60          # bounded: no endless polling


def test_supervisor_gives_up_waiting_for_capacity():
    vm = TpuVm(name="qv-pod", zone="z", accelerator="v5p-16", queued=True)
    job = tpu.make_job(vm, "stage1", jax_version="0.10.2")
    cloud = FakeCloud(vm, [])
    cloud.sleep = lambda s: setattr(cloud, "t", cloud.t + s)        # the request never gets its slice
    sup = tpu.Supervisor(job, tpu.WatchConfig(poll_s=60, create_timeout_s=600), runner=cloud.runner,
                         query=cloud.query, log=lambda m: None, sleep=cloud.sleep, clock=cloud.clock)
    assert sup.run() == tpu.EXIT_NO_CAPACITY and 600 <= cloud.t <= 660


@pytest.mark.parametrize("events, kw, retried", [
    ([RUNNING, ("state", "PREEMPTED")] * 5, {}, "create"),          # each retry deletes and recreates the slice
    ([], {"fail_create": 10}, "create"),                           # each retry tries the create again
    ([RUNNING, ("run", ("exited", 1, "RuntimeError: DEADLINE_EXCEEDED"))] * 5, {"exists": True}, "start"),
])
def test_supervisor_retries_exactly_max_retries_times(events, kw, retried):
    """max_retries=2 against a cloud that keeps failing: the first attempt, then exactly 2 more (counted in
    the fake gcloud's calls), then EXIT_GAVE_UP, a status none of the other outcomes uses."""
    status, cloud, lines = _supervise(events, max_retries=2, num_slices=1, **kw)
    assert status == tpu.EXIT_GAVE_UP
    assert len({tpu.EXIT_DONE, tpu.EXIT_CONFIG, tpu.EXIT_NON_FINITE, tpu.EXIT_GAVE_UP, tpu.EXIT_NO_CAPACITY,
                tpu.EXIT_DISK_FULL}) == 6
    assert cloud.calls.count(retried) == 1 + 2                      # the first attempt and 2 retries
    if retried == "create" and not kw:
        assert cloud.calls.count("delete") == 2                    # the 2 recreates
    assert [line.split("] ", 1)[1].rsplit("; ", 1)[1] for line in lines if "; retry" in line or "giving up" in line] == [
        "retry 1/2", "retry 2/2", "giving up after 2 retries"]
