"""The `gcloud` commands that launch a pretraining run on a Cloud TPU VM slice (single- or multi-host).

Steps (each one command; `dry_run_script` renders them one per line as a runnable shell script):
  1. reuse or create: `tpu-vm describe NAME` succeeds -> reuse; otherwise `tpu-vm create`.
  2. package: `git archive HEAD` of the repo into a tarball (committed files only: the run is
     reproducible from the commit id, printed in the log name).
  3. copy: `tpu-vm scp TARBALL NAME:~ --worker=all`.
  4. install on every worker: untar into ~/qwen2vl_jax, `pip install -r requirements.txt jax[tpu]==<pinned>`
     (the jax version is read from requirements.txt, so the TPU hosts run the version the CPU tests ran).
  5. start on every worker: `LIBTPU_INIT_ARGS=... nohup python3 -m launch.pretrain ... > logs/RUN.log 2>&1
     < /dev/null &` (`start_command`). On a pod slice every worker runs the same command; `launch.pretrain`
     calls `jax.distributed.initialize()`, which finds the coordinator from the TPU metadata.
     LIBTPU_INIT_ARGS holds the TPU compiler flags launch.aot compiles with (qwen2vl_jax.train.aot
     TPU_COMPILER_FLAGS), then `libtpu_args` if given (they win), so the job runs the program launch.aot
     measured.

`job_commands(...)` returns the command list of steps 2-5 for one run (one sweep point); a sweep
launcher renders them with `render()` or runs them with `execute()`.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
from typing import Callable, Sequence

# The checkout this package runs from (an editable install): `git archive` ships its HEAD.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REMOTE_DIR = "~/qwen2vl_jax"
REMOTE_TARBALL = "~/qwen2vl_jax.tar.gz"

# Default TPU VM runtime image per generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
_ACCEL_RE = re.compile(r"^(v4|v5litepod|v5p|v6e)-(\d+)$")

# A runner executes one argv and returns its exit code (injected in tests).
Runner = Callable[[Sequence[str]], int]


@dataclasses.dataclass(frozen=True)
class TpuVm:
    """One TPU VM slice. `accelerator` is the gcloud accelerator type (e.g. v5p-128)."""
    name: str
    zone: str
    accelerator: str
    project: str | None = None
    version: str | None = None      # runtime image; default from RUNTIME_VERSIONS
    spot: bool = False

    def __post_init__(self):
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.name or ""):
            raise ValueError(f"--tpu={self.name!r}: TPU names are lowercase letters, digits and '-'")
        if not self.zone:
            raise ValueError("--zone is required (e.g. us-east5-a)")
        if not _ACCEL_RE.match(self.accelerator or ""):
            raise ValueError(f"--accelerator={self.accelerator!r}; expected one of "
                             f"{', '.join(g + '-N' for g in RUNTIME_VERSIONS)} (e.g. v5p-128)")

    @property
    def runtime_version(self) -> str:
        return self.version or RUNTIME_VERSIONS[_ACCEL_RE.match(self.accelerator).group(1)]

    def _scope(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def describe(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.name, *self._scope(),
                "--format=value(state)"]

    def create(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "create", self.name, *self._scope(),
                f"--accelerator-type={self.accelerator}", f"--version={self.runtime_version}",
                *(["--spot"] if self.spot else [])]

    def scp(self, local: str, remote: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{self.name}:{remote}",
                *self._scope(), "--worker=all"]

    def ssh_all(self, command: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self._scope(), "--worker=all",
                f"--command={command}"]


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


def start_command(argv: Sequence[str], run_name: str, libtpu_args: str = "") -> str:
    """Shell command a worker runs to start `argv` in the background, logging to logs/RUN_NAME.log, with the
    TPU compiler flags in its environment (module docstring, step 5)."""
    from qwen2vl_jax.train import aot
    env = f"LIBTPU_INIT_ARGS={shlex.quote(aot.libtpu_init_args(libtpu_args))}"     # an assignment: name unquoted
    return (f"cd {REMOTE_DIR} && mkdir -p logs && "
            f"{env} nohup {shlex.join(argv)} > logs/{run_name}.log 2>&1 < /dev/null &")


def job_commands(vm: TpuVm, experiment: str, *, model: str | None = None, overrides: Sequence[str] = (),
                 run_name: str | None = None, tarball: str = "/tmp/qwen2vl_jax.tar.gz",
                 jax_version: str | None = None, extra_flags: Sequence[str] = (),
                 libtpu_args: str = "") -> list[list[str]]:
    """Commands (argv lists) that ship the repo to every worker of `vm` and start one run there.
    libtpu_args: extra TPU compiler flags, after (and overriding) the defaults.

    Used once per sweep point: the VM must already exist (see `launch()` for reuse/create)."""
    run_name = run_name or f"{experiment}-{vm.name}"
    if not re.fullmatch(r"[A-Za-z0-9._=-]+", run_name):
        raise ValueError(f"run_name {run_name!r}: use letters, digits and ._=- only (it names the log file)")
    jax_version = jax_version or pinned_jax_version()
    install = (f"mkdir -p {REMOTE_DIR} && tar xzf {REMOTE_TARBALL} -C {REMOTE_DIR} && cd {REMOTE_DIR} && "
               f"python3 -m pip install -q -r requirements.txt {shlex.quote(f'jax[tpu]=={jax_version}')}")
    start = start_command(pretrain_argv(experiment, model, overrides, extra_flags), run_name, libtpu_args)
    return [
        ["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
        vm.scp(tarball, REMOTE_TARBALL),
        vm.ssh_all(install),
        vm.ssh_all(start),
    ]


def render(commands: Sequence[Sequence[str]]) -> str:
    """One shell-quoted command per line."""
    return "\n".join(shlex.join(c) for c in commands)


def dry_run_script(vm: TpuVm, jobs: Sequence[Sequence[str]]) -> str:
    """The exact commands `launch` would run, one per line; line 1 is reuse-or-create as shell."""
    ensure = f"{shlex.join(vm.describe())} > /dev/null 2>&1 || {shlex.join(vm.create())}"
    return "\n".join([ensure, render(jobs)])


def subprocess_runner(argv: Sequence[str]) -> int:
    print("+ " + shlex.join(argv), flush=True)
    return subprocess.run(list(argv), check=False).returncode


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
