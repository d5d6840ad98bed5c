"""Pod detection for jax.distributed.initialize (train/distributed.py) on fake environments: the GCE metadata a
Cloud TPU VM worker of a v5p-32 slice (4 workers) sees, a worker of the second slice of a 2-slice queued
resource, a single-host v5p-8, a GKE pod, SLURM, and a CPU machine (which must never query the metadata). A CPU
host with libtpu installed runs the CLIs on the CPU without the libtpu probe's error lines (quiet_cpu_host)."""
import functools
import importlib.util
import os
import subprocess
import sys
import types

import pytest

import repo
from qwen2vl_jax.train import distributed

REPO = repo.ROOT

# what the metadata server answers on worker 2 of a 4-worker slice (the two formats of the endpoints list)
V5P_32 = {"agent-worker-number": "2", "accelerator-type": "v5p-32",
          "worker-network-endpoints": "t1v-n-0:0:10.130.0.2,t1v-n-1:1:10.130.0.3,t1v-n-2:2:10.130.0.4,"
                                      "t1v-n-3:3:10.130.0.5",
          "tpu-env": "ACCELERATOR_TYPE: 'v5p-32'\nWORKER_ID: '2'\nZONE: 'us-east5-a'\n"}


def _metadata(values, asked=None):
    def get(key):
        if asked is not None:
            asked.append(key)
        return values.get(key)
    return get


def test_cloud_tpu_vm_worker_of_one_slice():
    pod = distributed.detect_pod({}, _metadata(V5P_32), on_tpu_vm=True)
    assert pod == distributed.PodEnv("cloud-tpu-vm", num_processes=4, process_id=2)
    assert pod.describe() == "cloud-tpu-vm: process 2 of 4 processes"


def test_cloud_tpu_vm_second_slice_of_two():
    """Process ids are slice-major (jax's numbering): worker 1 of slice 1 of 2 x 4 workers is process 5. The
    MEGASCALE values come from tpu-env (a queued resource) or from the environment (launch.tpu exports them)."""
    two_hosts = {"agent-worker-number": "1", "worker-network-endpoints": "w-0,w-1,w-2,w-3",
                 "tpu-env": "MEGASCALE_NUM_SLICES: '2'\nMEGASCALE_SLICE_ID: '1'\n"
                            "MEGASCALE_COORDINATOR_ADDRESS: '10.0.0.2'\n"}
    pod = distributed.detect_pod({}, _metadata(two_hosts), on_tpu_vm=True)
    assert (pod.num_processes, pod.process_id, pod.num_slices, pod.slice_id) == (8, 5, 2, 1)
    no_env = {**two_hosts, "tpu-env": ""}
    pod = distributed.detect_pod({"MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1"}, _metadata(no_env), True)
    assert (pod.num_processes, pod.process_id) == (8, 5)
    # a single-host slice of several slices is still multi-process
    one_host = {"agent-worker-number": "0", "worker-network-endpoints": "w-0", "tpu-env": ""}
    pod = distributed.detect_pod({"MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1"}, _metadata(one_host), True)
    assert (pod.num_processes, pod.process_id) == (2, 1)


def test_single_host_and_cpu_are_one_process():
    v5p_8 = {"agent-worker-number": "0", "worker-network-endpoints": "t1v-n-0:0:10.130.0.2", "tpu-env": ""}
    assert distributed.detect_pod({}, _metadata(v5p_8), on_tpu_vm=True) is None
    asked = []
    assert distributed.detect_pod({"TPU_WORKER_HOSTNAMES": "localhost"}, _metadata(V5P_32, asked), False) is None
    assert distributed.detect_pod({}, _metadata(V5P_32, asked), on_tpu_vm=False) is None
    assert asked == []                       # off a TPU VM the metadata server is never asked


@pytest.mark.parametrize("env, kind, n, pid", [
    ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3", "TPU_WORKER_ID": "3"}, "gke-tpu", 4, 3),
    ({"TPU_PROCESS_ADDRESSES": "h0:8476,h1:8476", "TPU_WORKER_ID": "1", "MEGASCALE_NUM_SLICES": "2",
      "MEGASCALE_SLICE_ID": "1"}, "gke-tpu", 4, 3),
    ({"SLURM_NTASKS": "16"}, "slurm", 16, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "openmpi", 2, None),
])
def test_other_clusters(env, kind, n, pid):
    pod = distributed.detect_pod(env, _metadata({}), on_tpu_vm=False)
    assert (pod.kind, pod.num_processes, pod.process_id) == (kind, n, pid)


def test_tpu_env_parsing_and_pci_check(tmp_path):
    assert distributed.tpu_env_value("A: '1'\nMEGASCALE_SLICE_ID: '3'\n", "MEGASCALE_SLICE_ID") == "3"
    assert distributed.tpu_env_value("A: '1'\n", "B") is None
    for i, vendor in enumerate(("0x8086", "0x10de")):
        (tmp_path / f"0000:00:0{i}.0").mkdir()
        (tmp_path / f"0000:00:0{i}.0" / "vendor").write_text(vendor + "\n")
    assert not distributed.tpu_chips_attached(str(tmp_path))
    (tmp_path / "0000:00:05.0").mkdir()
    (tmp_path / "0000:00:05.0" / "vendor").write_text("0x1ae0\n")        # a Google TPU chip
    assert distributed.tpu_chips_attached(str(tmp_path))


@pytest.mark.parametrize("libtpu, tpu_chip, gpu, user_platforms, platforms", [
    (True, False, False, None, "cpu"),      # this box: libtpu (requirements-test.txt), no accelerator: quiet CPU
    (False, False, False, None, None),      # no libtpu: nothing probes a TPU; jax picks as it likes
    (True, True, False, None, None),        # a Cloud TPU VM: its TPU
    (True, False, True, None, None),        # a GPU host: its GPU
    (True, False, False, "tpu", "tpu"),     # the user's choice stays
    (True, False, False, "cpu,tpu", "cpu,tpu"),
])
def test_quiet_cpu_host_sets_cpu_only_where_jax_would_probe_libtpu_in_vain(monkeypatch, tmp_path, libtpu, tpu_chip,
                                                                           gpu, user_platforms, platforms):
    """The host is faked where quiet_cpu_host looks: the libtpu package (importlib), the PCI bus (a vendor file
    with Google's id for a TPU chip) and the GPU device files."""
    device = tmp_path / "pci" / "0000:00:04.0"
    device.mkdir(parents=True)
    (device / "vendor").write_text((distributed.GOOGLE_PCI_VENDOR if tpu_chip else "0x8086") + "\n")
    monkeypatch.setattr(distributed, "tpu_chips_attached",
                        functools.partial(distributed.tpu_chips_attached, pci_root=str(tmp_path / "pci")))
    if gpu:
        (tmp_path / "nvidia0").touch()
    monkeypatch.setattr(distributed, "GPU_DEVICE_FILES", (str(tmp_path / "nvidia0"),))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if libtpu else None) if name == "libtpu" else find_spec(name, *a))
    updates = []
    monkeypatch.setattr(distributed, "jax", types.SimpleNamespace(
        config=types.SimpleNamespace(update=lambda k, v: updates.append((k, v)))))
    if user_platforms is None:
        monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    else:
        monkeypatch.setenv("JAX_PLATFORMS", user_platforms)
    distributed.quiet_cpu_host()
    assert os.environ.get("JAX_PLATFORMS") == platforms
    assert updates == ([("jax_platforms", "cpu")] if user_platforms is None and platforms == "cpu" else [])


def test_a_cli_run_on_this_cpu_host_prints_no_libtpu_lines(tmp_path):
    """With libtpu installed and JAX_PLATFORMS unset, a CLI that starts jax (here it then stops at a mesh error,
    which needs the devices) prints its one ERROR line and nothing from a libtpu probe."""
    if importlib.util.find_spec("libtpu") is None or distributed.tpu_chips_attached() or any(
            os.path.exists(d) for d in distributed.GPU_DEVICE_FILES):
        pytest.skip("needs a CPU-only host with libtpu installed (requirements-test.txt)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env.update(PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    res = subprocess.run([sys.executable, "-m", "launch.pretrain", "--model=test", "--set=mesh.tensor=3",
                          f"--set=workdir={tmp_path}"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.startswith("ERROR: 2 devices not divisible"), res.stderr[-2000:]
    assert res.stderr.count("\n") == 1 and res.stdout == "", res.stderr[-2000:]
