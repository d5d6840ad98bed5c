"""The `gcloud` commands that run a pretraining job on Cloud TPU VM slices, and the supervisor that keeps it
running through preemptions.

A job (`TpuVm`): one slice (`tpu-vm create NAME`), or through a queued resource (`queued-resources create
NAME`: the only way to get several slices, `num_slices`, whose nodes are NAME-0 .. NAME-{N-1}). Steps (each
one command; `dry_run_script` renders them one per line as a runnable shell script):
  1. reuse or create: `describe` succeeds -> reuse; otherwise `create` (a queued resource is then waited for).
  2. package: `git archive HEAD` of the repo into a tarball (committed files only: the run is
     reproducible from the commit id).
  3. copy: `tpu-vm scp TARBALL NODE:~ --worker=all`, per node.
  4. install on every worker: untar into ~/qwen2vl_jax, `pip install -r requirements.txt jax[tpu]==<pinned>`
     (the jax version is read from requirements.txt, so the TPU hosts run the version the CPU tests ran);
     mount each bucket the data mixture reads (`gs://B/...`) read-only at GCS_MOUNT_ROOT/B with gcsfuse
     (installed when missing), where data/sources.py looks for it.
  5. start on every worker: stop a previous run of the job, then `nohup sh -c 'export LIBTPU_INIT_ARGS=...;
     python3 -m launch.pretrain ...; echo $? > logs/RUN.exit' > logs/RUN.log &` (`start_command`). Every
     worker runs the same command; launch.pretrain calls jax.distributed.initialize(), which finds the
     coordinator from the TPU metadata (train/distributed.py). LIBTPU_INIT_ARGS holds the TPU compiler flags
     launch.aot compiles with (qwen2vl_jax.perf.aot TPU_COMPILER_FLAGS), then `libtpu_args` if given (they
     win), so the job runs the program launch.aot measured; QWEN2VL_JOB=NAME/RUN names the job (a restart
     takes over the run lock its killed predecessor left in a bucket workdir). Several slices also get
     MEGASCALE_COORDINATOR_ADDRESS (worker 0 of slice 0, looked up with `describe` when the job starts),
     MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID, MEGASCALE_PORT.

`Supervisor` (launch.tpu --watch) then polls the slice state and the job's status on worker 0 of slice 0,
and on a preempted / failed slice deletes and recreates it and runs steps 3-5 again; on a failed run (or
one stopped by a SIGTERM) on a healthy slice it runs step 5 again. The run resumes from the newest good
checkpoint of its workdir (which must be gs://, since a recreated slice has new disks). Bounded retries, one
log line per event, exit statuses EXIT_*.

`job_commands(...)` returns the command list of steps 2-5 for one run (one sweep point); a sweep launcher
renders them with `render()` or runs them with `execute()`.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import time
from typing import Callable, Sequence

from qwen2vl_jax.data.sources import GCS_MOUNT_ROOT

# The checkout this package runs from (an editable install): `git archive` ships its HEAD.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REMOTE_DIR = "~/qwen2vl_jax"
REMOTE_TARBALL = "~/qwen2vl_jax.tar.gz"
MEGASCALE_PORT = 8080
# in the start command of a multi-slice job: replaced by worker 0 of slice 0's address when the job starts
# (dry run: by a shell variable set on the script's line before)
COORDINATOR = "@COORDINATOR@"

# Default TPU VM runtime image per generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
_ACCEL_RE = re.compile(r"^(v4|v5litepod|v5p|v6e)-(\d+)$")

# slice states (tpu-vm describe: state; queued-resources describe: state.state)
READY_STATES = frozenset({"READY", "ACTIVE"})
PENDING_STATES = frozenset({"CREATING", "STARTING", "ACCEPTED", "PROVISIONING", "WAITING_FOR_RESOURCES",
                            "REPAIRING", "RESTARTING"})
# anything else (PREEMPTED, TERMINATED, STOPPED, SUSPENDING, SUSPENDED, FAILED, DELETING, a missing slice)
# is gone: delete it and create it again

# exit statuses of a supervised job (launch.tpu --watch)
EXIT_DONE = 0            # the run finished
EXIT_CONFIG = 2          # launch.pretrain stopped on a configuration error (restarting cannot help)
EXIT_NON_FINITE = 3      # launch.pretrain stopped on non-finite steps (trainer.EXIT_NON_FINITE; checkpoint saved)
EXIT_GAVE_UP = 4         # more than max_retries preemptions / failures
EXIT_NO_CAPACITY = 5     # the slice did not become ready within create_timeout_s
EXIT_DISK_FULL = 6       # launch.pretrain stopped on a full disk (trainer.EXIT_DISK_FULL; restarting cannot help)
FINAL_RUN_STATUSES = {EXIT_CONFIG: "configuration error", EXIT_NON_FINITE: "non-finite steps",
                      EXIT_DISK_FULL: "disk full"}

# A runner executes one argv and returns its exit code; a query also returns its stdout (injected in tests).
Runner = Callable[[Sequence[str]], int]
Query = Callable[[Sequence[str]], tuple[int, str]]


@dataclasses.dataclass(frozen=True)
class TpuVm:
    """A job's TPU slices. `accelerator` is the gcloud accelerator type of one slice (e.g. v5p-128)."""
    name: str
    zone: str
    accelerator: str
    project: str | None = None
    version: str | None = None      # runtime image; default from RUNTIME_VERSIONS
    spot: bool = False
    num_slices: int = 1
    queued: bool = False            # create through a queued resource (always with num_slices > 1)

    def __post_init__(self):
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.name or ""):
            raise ValueError(f"--tpu={self.name!r}: TPU names are lowercase letters, digits and '-'")
        if not self.zone:
            raise ValueError("--zone is required (e.g. us-east5-a)")
        if not _ACCEL_RE.match(self.accelerator or ""):
            raise ValueError(f"--accelerator={self.accelerator!r}; expected one of "
                             f"{', '.join(g + '-N' for g in RUNTIME_VERSIONS)} (e.g. v5p-128)")
        if self.num_slices < 1:
            raise ValueError(f"--num_slices={self.num_slices} must be >= 1")

    @property
    def runtime_version(self) -> str:
        return self.version or RUNTIME_VERSIONS[_ACCEL_RE.match(self.accelerator).group(1)]

    @property
    def uses_queue(self) -> bool:
        return self.queued or self.num_slices > 1

    @property
    def nodes(self) -> list[str]:
        """The TPU VM (node) names: NAME, or NAME-0 .. NAME-{N-1} for several slices."""
        return [self.name] if self.num_slices == 1 else [f"{self.name}-{i}" for i in range(self.num_slices)]

    def _scope(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def _tpus(self, *what: str) -> list[str]:
        return ["gcloud", "compute", "tpus", *what]

    def describe(self) -> list[str]:
        """Prints the state: READY for a TPU VM, ACTIVE for a queued resource whose slices are up."""
        if self.uses_queue:
            return self._tpus("queued-resources", "describe", self.name, *self._scope(),
                              "--format=value(state.state)")
        return self._tpus("tpu-vm", "describe", self.name, *self._scope(), "--format=value(state)")

    def create(self) -> list[str]:
        spot = ["--spot"] if self.spot else []
        if self.uses_queue:
            nodes = ([f"--node-id={self.name}"] if self.num_slices == 1
                     else [f"--node-count={self.num_slices}", f"--node-prefix={self.name}"])
            return self._tpus("queued-resources", "create", self.name, *self._scope(), *nodes,
                              f"--accelerator-type={self.accelerator}",
                              f"--runtime-version={self.runtime_version}", *spot)
        return self._tpus("tpu-vm", "create", self.name, *self._scope(), f"--accelerator-type={self.accelerator}",
                          f"--version={self.runtime_version}", *spot)

    def delete(self) -> list[str]:
        if self.uses_queue:     # --force deletes the slices with the request
            return self._tpus("queued-resources", "delete", self.name, *self._scope(), "--force", "--quiet")
        return self._tpus("tpu-vm", "delete", self.name, *self._scope(), "--quiet")

    def coordinator_query(self) -> list[str]:
        """Prints the internal address of worker 0 of the first slice (the MEGASCALE coordinator)."""
        return self._tpus("tpu-vm", "describe", self.nodes[0], *self._scope(),
                          "--format=value(networkEndpoints[0].ipAddress)")

    def scp(self, local: str, remote: str, node: str | None = None) -> list[str]:
        return self._tpus("tpu-vm", "scp", local, f"{node or self.nodes[0]}:{remote}", *self._scope(),
                          "--worker=all")

    def ssh(self, command: str, node: str | None = None, worker: str = "all") -> list[str]:
        return self._tpus("tpu-vm", "ssh", node or self.nodes[0], *self._scope(), f"--worker={worker}",
                          f"--command={command}")

    def ssh_all(self, command: str) -> list[str]:
        """`command` on every worker of the first (or only) slice."""
        return self.ssh(command)


def pinned_jax_version(requirements: str = os.path.join(REPO_ROOT, "requirements.txt")) -> str:
    """The `jax==X` pin of requirements.txt (the TPU hosts install jax[tpu]==X)."""
    with open(requirements) as f:
        for line in f:
            m = re.match(r"^\s*jax==([0-9][^\s#;]*)", line)
            if m:
                return m.group(1)
    raise ValueError(f"{requirements} has no 'jax==VERSION' line")


def pretrain_argv(experiment: str, model: str | None = None, overrides: Sequence[str] = (),
                  extra_flags: Sequence[str] = ()) -> list[str]:
    """argv of the training command every worker runs."""
    if not experiment:
        raise ValueError("--experiment is required")
    for kv in overrides:
        if "=" not in kv:
            raise ValueError(f"--set {kv!r}: expected key=value")
    return (["python3", "-m", "launch.pretrain", f"--experiment={experiment}"]
            + ([f"--model={model}"] if model else [])
            + [f"--set={kv}" for kv in overrides] + list(extra_flags))


def gcsfuse_mount(bucket: str) -> str:
    """Shell that mounts gs://`bucket` read-only at GCS_MOUNT_ROOT/`bucket` (installs gcsfuse when missing;
    a mounted bucket is left as it is), as MaxText mounts its Grain data."""
    if not re.fullmatch(r"[a-z0-9][-_.a-z0-9]*[a-z0-9]", bucket):
        raise ValueError(f"bucket {bucket!r}: names are lowercase letters, digits and -_.")
    point = f"{GCS_MOUNT_ROOT}/{bucket}"
    install = ("{ command -v gcsfuse > /dev/null || { "
               "echo \"deb https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\" "
               "| sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null && "
               "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && "
               "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }; }")
    return (f"{install} && sudo mkdir -p {point} && sudo chown $USER {point} && "
            f"{{ mountpoint -q {point} || gcsfuse -o ro --implicit-dirs {bucket} {point}; }}")


def _run_files(run_name: str) -> tuple[str, str]:
    return f"logs/{run_name}.log", f"logs/{run_name}.exit"


def start_command(train: Sequence[str], run_name: str, env: dict[str, str] | None = None) -> str:
    """Shell for every worker: stop a previous run of this job, start `train` in the background, and write its
    exit status to logs/RUN.exit when it ends (the supervisor's `status_command` reads it)."""
    log, status = _run_files(run_name)
    exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in (env or {}).items())
    inner = f"{exports}{shlex.join(train)}; echo $? > {status}"
    return (f"cd {REMOTE_DIR} && mkdir -p logs && {{ pkill -f '[l]aunch.pretrain' || true; }} && rm -f {status} "
            f"&& nohup sh -c {shlex.quote(inner)} > {log} 2>&1 < /dev/null &")


def status_command(run_name: str) -> str:
    """Shell (worker 0) that prints `exited STATUS` and the log's last line, `running`, or `missing`."""
    log, status = _run_files(run_name)
    return (f"cd {REMOTE_DIR} 2> /dev/null && if [ -f {status} ]; then echo exited $(cat {status}); "
            f"tail -n 1 {log}; elif pgrep -f '[l]aunch.pretrain' > /dev/null; then echo running; "
            f"else echo missing; fi || echo missing")


@dataclasses.dataclass(frozen=True)
class Job:
    """The commands of one run on `vm`: `setup` (package, copy, install, mount; once per slice's life) and
    `start` (on every worker; again after a failure)."""
    vm: TpuVm
    run_name: str
    setup: tuple[tuple[str, ...], ...]
    start: tuple[tuple[str, ...], ...]

    @property
    def commands(self) -> list[list[str]]:
        return [list(c) for c in self.setup + self.start]


def make_job(vm: TpuVm, experiment: str, *, model: str | None = None, overrides: Sequence[str] = (),
             run_name: str | None = None, tarball: str = "/tmp/qwen2vl_jax.tar.gz",
             jax_version: str | None = None, extra_flags: Sequence[str] = (),
             buckets: Sequence[str] = (), train: Sequence[str] | None = None, libtpu_args: str = "") -> Job:
    """The commands that ship the repo to every worker of `vm`, mount `buckets` and start one run there.
    `train` replaces the launch.pretrain argv (a sweep point runs launch.sweep); `libtpu_args`: extra TPU
    compiler flags, after (and overriding) the defaults."""
    run_name = run_name or f"{experiment}-{vm.name}"
    if not re.fullmatch(r"[A-Za-z0-9._=-]+", run_name):
        raise ValueError(f"run_name {run_name!r}: use letters, digits and ._=- only (it names the log file)")
    jax_version = jax_version or pinned_jax_version()
    install = (f"mkdir -p {REMOTE_DIR} && tar xzf {REMOTE_TARBALL} -C {REMOTE_DIR} && cd {REMOTE_DIR} && "
               f"python3 -m pip install -q -r requirements.txt {shlex.quote(f'jax[tpu]=={jax_version}')}")
    install = " && ".join([install, *(gcsfuse_mount(b) for b in sorted(set(buckets)))])
    train = list(train) if train is not None else pretrain_argv(experiment, model, overrides, extra_flags)
    setup = [("git", "-C", REPO_ROOT, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD")]
    for node in vm.nodes:
        setup += [tuple(vm.scp(tarball, REMOTE_TARBALL, node)), tuple(vm.ssh(install, node))]
    from qwen2vl_jax.perf import aot
    from qwen2vl_jax.train import rundir
    start = []
    for i, node in enumerate(vm.nodes):
        # the job's name lets a restarted run take over the run lock its killed predecessor left in the bucket
        env = {"LIBTPU_INIT_ARGS": aot.libtpu_init_args(libtpu_args), rundir.JOB_ENV: f"{vm.name}/{run_name}"}
        if vm.num_slices > 1:
            env.update({"MEGASCALE_COORDINATOR_ADDRESS": f"{COORDINATOR}:{MEGASCALE_PORT}",
                        "MEGASCALE_PORT": str(MEGASCALE_PORT), "MEGASCALE_NUM_SLICES": str(vm.num_slices),
                        "MEGASCALE_SLICE_ID": str(i)})
        start.append(tuple(vm.ssh(start_command(train, run_name, env), node)))
    return Job(vm, run_name, tuple(setup), tuple(start))


def job_commands(vm: TpuVm, experiment: str, **kwargs) -> list[list[str]]:
    """make_job(...).commands: steps 2-5 for one run (the VM must already exist; see `launch()`)."""
    return make_job(vm, experiment, **kwargs).commands


def render(commands: Sequence[Sequence[str]]) -> str:
    """One shell-quoted command per line (the coordinator placeholder becomes "$COORDINATOR")."""
    return "\n".join(shlex.join(c).replace(COORDINATOR, "'\"$COORDINATOR\"'") for c in commands)


def dry_run_script(vm: TpuVm, jobs: Sequence[Sequence[str]], watch: str | None = None) -> str:
    """The exact commands `launch` would run, one per line: reuse-or-create as shell, the job's commands (a
    multi-slice job first looks up its coordinator), and `watch` (the supervisor's command) last."""
    ensure = f"{shlex.join(vm.describe())} > /dev/null 2>&1 || {shlex.join(vm.create())}"
    lines = [ensure]
    if vm.uses_queue:      # a queued resource is granted later: wait until its slices are up
        lines.append(f"until [ \"$({shlex.join(vm.describe())})\" = ACTIVE ]; do sleep 60; done")
    if any(COORDINATOR in a for c in jobs for a in c):
        lines.append(f"COORDINATOR=$({shlex.join(vm.coordinator_query())})")
    lines.append(render(jobs))
    if watch:
        lines.append(watch)
    return "\n".join(lines)


def watch_script(job: Job, cfg: WatchConfig) -> str:
    """What `Supervisor.run` does after the script, as shell comments (the dry run's last lines)."""
    vm = job.vm
    ready = "ACTIVE" if vm.uses_queue else "READY"
    return "\n".join([
        f"# watch: `launch.tpu ... --watch` runs the lines above, then every {cfg.poll_s:g} s:",
        f"#   {shlex.join(vm.describe())}",
        f"#   {shlex.join(vm.ssh(status_command(job.run_name), worker='0'))}",
        f"# slice not {ready} (preempted, failed): {shlex.join(vm.delete())}; create it again; copy, install, "
        "start (the lines above)",
        "# run exited 0: done (exit 0); exited 2 or 3 (configuration, non-finite): stop with that status; "
        "stopped by SIGTERM, exited otherwise or not running: start again (the last line above)",
        f"# at most {cfg.max_retries} retries (then exit 4); a slice not up within {cfg.create_timeout_s / 3600:g} h: "
        "exit 5",
    ])


def subprocess_runner(argv: Sequence[str]) -> int:
    print("+ " + shlex.join(argv), flush=True)
    return subprocess.run(list(argv), check=False).returncode


def subprocess_query(argv: Sequence[str]) -> tuple[int, str]:
    res = subprocess.run(list(argv), check=False, capture_output=True, text=True)
    return res.returncode, res.stdout


def execute(commands: Sequence[Sequence[str]], runner: Runner = subprocess_runner) -> None:
    for argv in commands:
        rc = runner(argv)
        if rc != 0:
            raise RuntimeError(f"command failed with exit code {rc}: {shlex.join(argv)}")


def ensure_vm(vm: TpuVm, runner: Runner = subprocess_runner) -> str:
    """Reuses the TPU VM if `describe` finds it, otherwise creates it. Returns 'reused' or 'created'."""
    if runner(vm.describe()) == 0:
        return "reused"
    execute([vm.create()], runner)
    return "created"


def launch(vm: TpuVm, jobs: Sequence[Sequence[str]], runner: Runner = subprocess_runner) -> str:
    action = ensure_vm(vm, runner)
    execute(jobs, runner)
    return action


# ----------------------------------------------------------------------------------------------
# the supervisor

@dataclasses.dataclass(frozen=True)
class WatchConfig:
    poll_s: float = 60.0                # between two looks at the slice and the run
    max_retries: int = 10               # preemptions + failed runs before giving up
    create_timeout_s: float = 6 * 3600  # a (queued) slice must be up within this

    def __post_init__(self):
        if self.poll_s <= 0 or self.max_retries < 0 or self.create_timeout_s <= 0:
            raise ValueError(f"watch settings poll_s={self.poll_s} > 0, max_retries={self.max_retries} >= 0, "
                             f"create_timeout_s={self.create_timeout_s} > 0")


class Supervisor:
    """Keeps one job running until it finishes (module docstring). gcloud is reached through `runner` (run a
    command) and `query` (run one and read its output); `sleep` and `clock` are injectable for tests."""

    def __init__(self, job: Job, cfg: WatchConfig = WatchConfig(), runner: Runner = subprocess_runner,
                 query: Query = subprocess_query, log: Callable[[str], None] = print,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        self.job, self.vm, self.cfg = job, job.vm, cfg
        self.runner, self.query, self.sleep, self.clock = runner, query, sleep, clock
        self.log = lambda msg: log(f"[watch {self.vm.name}] {msg}")
        self.retries = 0

    def state(self) -> str:
        """The slice's state, or MISSING when describe fails (no such slice)."""
        rc, out = self.query(self.vm.describe())
        return out.strip().splitlines()[-1].strip().upper() if rc == 0 and out.strip() else "MISSING"

    def run_status(self) -> tuple[str, int | None, str]:
        """('exited', status, last log line) | ('running', None, '') | ('missing', None, '')."""
        rc, out = self.query(self.vm.ssh(status_command(self.job.run_name), worker="0"))
        lines = out.strip().splitlines() if rc == 0 else []
        if lines and lines[0].startswith("exited "):
            code = lines[0].split()[1] if len(lines[0].split()) > 1 else ""
            return "exited", int(code) if code.lstrip("-").isdigit() else -1, lines[1] if len(lines) > 1 else ""
        return ("running", None, "") if lines and lines[0] == "running" else ("missing", None, "")

    def _retry(self, why: str) -> bool:
        """Counts a retry; False (and a log line) when the budget is spent."""
        self.retries += 1
        if self.retries > self.cfg.max_retries:
            self.log(f"{why}; giving up after {self.cfg.max_retries} retries")
            return False
        self.log(f"{why}; retry {self.retries}/{self.cfg.max_retries}")
        return True

    def wait_ready(self) -> bool:
        """Polls until the slice is READY / ACTIVE (True), gone (False) or create_timeout_s passed (False)."""
        deadline = self.clock() + self.cfg.create_timeout_s
        while True:
            state = self.state()
            if state in READY_STATES:
                return True
            if state not in PENDING_STATES:
                self.log(f"slice {state} while waiting for it to come up")
                return False
            if self.clock() >= deadline:
                return False
            self.sleep(self.cfg.poll_s)

    def _recreate(self, state: str) -> bool:
        if state != "MISSING":
            self.log(f"deleting the {state} slice")
            self.runner(self.vm.delete())
        self.log("creating the slice" + (" (queued resource)" if self.vm.uses_queue else ""))
        return self.runner(self.vm.create()) == 0

    def resolve(self, commands) -> list[list[str]]:
        """`commands` with the coordinator placeholder replaced by worker 0 of slice 0's address."""
        if not any(COORDINATOR in a for c in commands for a in c):
            return [list(c) for c in commands]
        rc, out = self.query(self.vm.coordinator_query())
        if rc != 0 or not out.strip():
            raise RuntimeError("could not look up the address of worker 0 of the first slice")
        return [[a.replace(COORDINATOR, out.strip()) for a in c] for c in commands]

    def _execute(self, commands) -> bool:
        try:
            execute(self.resolve(commands), self.runner)
            return True
        except RuntimeError as e:
            self.log(f"{e}")
            return False

    def run(self) -> int:
        """Brings the slice up, deploys and starts the job, and watches it. Returns an EXIT_* status."""
        need = "ensure"
        while True:
            if need == "ensure":
                state = self.state()
                if state not in READY_STATES and state not in PENDING_STATES:
                    if not self._recreate(state):
                        if not self._retry("creating the slice failed"):
                            return EXIT_GAVE_UP
                        self.sleep(self.cfg.poll_s)
                        continue
                if not self.wait_ready():
                    if self.state() in PENDING_STATES:
                        self.log(f"the slice was not ready within {self.cfg.create_timeout_s:.0f} s")
                        return EXIT_NO_CAPACITY
                    if not self._retry("the slice did not come up"):
                        return EXIT_GAVE_UP
                    continue
                self.log("slice ready; installing and starting the run")
                need = "deploy"
            if need in ("deploy", "restart"):
                ok = self._execute(self.job.setup + self.job.start if need == "deploy" else self.job.start)
                if not ok:
                    state = self.state()
                    if not self._retry(f"{need} failed (slice {state})"):
                        return EXIT_GAVE_UP
                    need = "deploy" if state in READY_STATES else "ensure"
                    continue
                self.log(f"run {self.job.run_name} started")
                need = "watch"
            self.sleep(self.cfg.poll_s)
            state = self.state()
            if state not in READY_STATES:
                if not self._retry(f"slice {state}"):
                    return EXIT_GAVE_UP
                need = "ensure"
                continue
            status, code, last = self.run_status()
            if status == "running":
                continue
            if status == "exited" and code == 0 and not last.startswith("preempted"):
                self.log(f"run finished: {last}")
                return EXIT_DONE
            if status == "exited" and code in FINAL_RUN_STATUSES:
                self.log(f"run stopped with status {code} ({FINAL_RUN_STATUSES[code]}): {last}")
                return code
            why = ("run stopped by SIGTERM" if status == "exited" and code == 0 else
                   f"run exited with status {code}: {last}" if status == "exited" else "run not running")
            if not self._retry(why):
                return EXIT_GAVE_UP
            need = "restart"
