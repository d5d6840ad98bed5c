"""qwen2vl_jax.cloud.tpu and its CLI launch.tpu: exact dry-run commands, reuse vs create through an injected
runner, flag validation."""
import shlex
import subprocess
import sys

import pytest

from qwen2vl_jax.cloud import tpu
from qwen2vl_jax.train import aot
from qwen2vl_jax.cloud.tpu import REPO_ROOT, TpuVm

VM = TpuVm(name="qv-pod", zone="us-east5-a", accelerator="v5p-128", project="my-proj", spot=True)


def test_dry_run_prints_exact_commands():
    out = subprocess.run(
        [sys.executable, "-m", "launch.tpu", "--experiment=stage2", "--model=7b", "--tpu=qv-pod",
         "--zone=us-east5-a", "--accelerator=v5p-128", "--project=my-proj", "--spot", "--dry_run",
         "--set=optim.peak_lr=1e-4", "--set", "description=a b", "--libtpu_args=--xla_x=1"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    scope = "--zone=us-east5-a --project=my-proj"
    jax_version = tpu.pinned_jax_version()
    install = ("mkdir -p ~/qwen2vl_jax && tar xzf ~/qwen2vl_jax.tar.gz -C ~/qwen2vl_jax && cd ~/qwen2vl_jax"
               f" && python3 -m pip install -q -r requirements.txt 'jax[tpu]=={jax_version}'")
    env = f"LIBTPU_INIT_ARGS={shlex.quote(' '.join(aot.TPU_COMPILER_FLAGS + ('--xla_x=1',)))}"
    start = (f"cd ~/qwen2vl_jax && mkdir -p logs && {env} nohup python3 -m launch.pretrain --experiment=stage2"
             " --model=7b --set=optim.peak_lr=1e-4 '--set=description=a b' > logs/stage2-qv-pod.log 2>&1"
             " < /dev/null &")
    expected = [
        f"gcloud compute tpus tpu-vm describe qv-pod {scope} '--format=value(state)' > /dev/null 2>&1 || "
        f"gcloud compute tpus tpu-vm create qv-pod {scope} --accelerator-type=v5p-128 "
        "--version=v2-alpha-tpuv5 --spot",
        f"git -C {shlex.quote(REPO_ROOT)} archive --format=tar.gz --output=/tmp/qwen2vl_jax.tar.gz HEAD",
        f"gcloud compute tpus tpu-vm scp /tmp/qwen2vl_jax.tar.gz 'qv-pod:~/qwen2vl_jax.tar.gz' {scope} --worker=all",
        f"gcloud compute tpus tpu-vm ssh qv-pod {scope} --worker=all {shlex.quote('--command=' + install)}",
        f"gcloud compute tpus tpu-vm ssh qv-pod {scope} --worker=all {shlex.quote('--command=' + start)}",
    ]
    assert out.splitlines() == expected
    # every line is valid shell that splits back into the intended argv
    remote = shlex.split(out.splitlines()[-1])[-1].removeprefix("--command=")
    toks = shlex.split(remote)
    i = toks.index("nohup") + 1
    assert toks[i:i + 7] == ["python3", "-m", "launch.pretrain", "--experiment=stage2", "--model=7b",
                             "--set=optim.peak_lr=1e-4", "--set=description=a b"]
    # the job's environment: the compiler flags launch.aot compiles with, then the user's (libtpu takes a
    # flag's last value); a shell takes the prefix as an assignment, not as a command
    assignment = remote[remote.index("&& LIBTPU_INIT_ARGS=") + 3:remote.index(" nohup ")]
    got = subprocess.run(["sh", "-c", f"{assignment} printenv LIBTPU_INIT_ARGS"], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert got.split() == list(aot.TPU_COMPILER_FLAGS) + ["--xla_x=1"]
    assert "--xla_jf_spmd_threshold_for_windowed_einsum_mib=1000000" in got.split()


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
    assert cmds[3][-1].endswith("--set=model.hidden_size=128 > logs/sweep-h128.log 2>&1 < /dev/null &")
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
