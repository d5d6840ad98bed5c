"""Multi-process set-up: which environment this process runs in, and jax.distributed.initialize for it.

`detect_pod(env, metadata, on_tpu_vm)` reads the variables jax.distributed.initialize() itself reads (jax
0.10.2: jax/_src/clusters/), so that a multi-host job is initialised and a single host is not:
  Cloud TPU VM (`tpu-vm create` or a queued resource): nothing in the environment of an ssh session; the
    GCE metadata server's instance attributes
      agent-worker-number       this worker's index within its slice
      worker-network-endpoints  the slice's workers, comma-separated ("host" or "name:id:ip" each)
      tpu-env                   "KEY: 'value'" lines; a multi-slice job has MEGASCALE_NUM_SLICES,
                                MEGASCALE_SLICE_ID, MEGASCALE_COORDINATOR_ADDRESS there
    and the same MEGASCALE_* variables in the environment win (launch.tpu exports them for several slices).
    It is a TPU VM when TPU chips are attached (jax's check: PCI vendor 0x1ae0) and libtpu is installed.
  GKE TPU pods: TPU_WORKER_HOSTNAMES (or TPU_PROCESS_ADDRESSES) and TPU_WORKER_ID in the environment.
  SLURM (SLURM_NTASKS), Open MPI (OMPI_COMM_WORLD_SIZE), or an explicit JAX_COORDINATOR_ADDRESS.
Process ids are slice-major, as jax numbers them: slice_id * workers_per_slice + worker.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import urllib.error
import urllib.request
from typing import Callable, Mapping

import jax

Metadata = Callable[[str], "str | None"]     # instance attribute -> value, None when absent
METADATA_URL = "http://{host}/computeMetadata/v1/instance/attributes/{key}"
GOOGLE_PCI_VENDOR = "0x1ae0"


@dataclasses.dataclass(frozen=True)
class PodEnv:
    kind: str                 # "cloud-tpu-vm" | "gke-tpu" | "slurm" | "openmpi" | "explicit"
    num_processes: int
    process_id: int | None    # None where only jax can tell (SLURM, MPI, explicit coordinator)
    num_slices: int = 1
    slice_id: int = 0

    def describe(self) -> str:
        who = "" if self.process_id is None else f"process {self.process_id} of "
        slices = "" if self.num_slices == 1 else f", slice {self.slice_id} of {self.num_slices}"
        return f"{self.kind}: {who}{self.num_processes} processes{slices}"


def tpu_env_value(text: str, key: str) -> str | None:
    """KEY's value in the `tpu-env` metadata attribute (lines like MEGASCALE_NUM_SLICES: '2')."""
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep and k.strip() == key:
            return v.strip().strip("'\"")
    return None


def detect_pod(env: Mapping[str, str], metadata: Metadata, on_tpu_vm: bool) -> PodEnv | None:
    """The multi-process environment this process is in (module docstring), or None for a single process.
    `metadata` is only called on a TPU VM."""
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if on_tpu_vm or hosts:
        tpu_env = (metadata("tpu-env") or "") if on_tpu_vm and not hosts else ""

        def megascale(key, default):
            v = env.get(key) or tpu_env_value(tpu_env, key)
            return int(v) if v else default

        num_slices, slice_id = megascale("MEGASCALE_NUM_SLICES", 1), megascale("MEGASCALE_SLICE_ID", 0)
        if hosts:
            kind, workers, worker = "gke-tpu", hosts.split(","), int(env.get("TPU_WORKER_ID", "0"))
        else:
            kind = "cloud-tpu-vm"
            workers = [w for w in (metadata("worker-network-endpoints") or "").split(",") if w]
            worker = int(metadata("agent-worker-number") or 0)
        n = max(1, len(workers)) * num_slices
        if n > 1:
            return PodEnv(kind, n, slice_id * max(1, len(workers)) + worker, num_slices, slice_id)
        return None
    for var, kind in (("SLURM_NTASKS", "slurm"), ("OMPI_COMM_WORLD_SIZE", "openmpi")):
        if int(env.get(var, "1")) > 1:
            return PodEnv(kind, int(env[var]), None)
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return PodEnv("explicit", int(env.get("JAX_NUM_PROCESSES", "0")) or 0, None)
    return None


def gce_metadata(key: str, timeout_s: float = 5.0) -> str | None:
    """An instance attribute from the GCE metadata server (GCE_METADATA_IP overrides its address, as in jax)."""
    host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    req = urllib.request.Request(METADATA_URL.format(host=host, key=key), headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.read().decode()
    except (urllib.error.URLError, OSError):
        return None


def tpu_chips_attached(pci_root: str = "/sys/bus/pci/devices") -> bool:
    """Whether a Google TPU chip is on this host's PCI bus (what jax checks before it talks to the metadata)."""
    for vendor in glob.glob(os.path.join(pci_root, "*", "vendor")):
        try:
            with open(vendor) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def on_cloud_tpu_vm() -> bool:
    return importlib.util.find_spec("libtpu") is not None and tpu_chips_attached()


# What jax itself looks for before it initialises a GPU backend (jax/_src/hardware_utils.py), plus ROCm's device
GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def cpu_only_platform(env: Mapping[str, str], libtpu_installed: bool, tpu_chips: bool, gpu: bool) -> str | None:
    """"cpu" where jax, left to pick its platform, would probe libtpu on a host with no TPU: libtpu installed
    (requirements-test.txt installs it for the AOT tests), no TPU chip, no GPU, JAX_PLATFORMS not set. The
    probe prints three libtpu error lines ("unexpected worker hostname" ...) before jax falls back to the CPU.
    None elsewhere: a TPU VM, a GPU host and a JAX_PLATFORMS the user set are left as they are."""
    if "JAX_PLATFORMS" in env or not libtpu_installed or tpu_chips or gpu:
        return None
    return "cpu"


def quiet_cpu_host() -> None:
    """The CLIs' start (experiments.flags.run): on a host where `cpu_only_platform` says "cpu", jax and the
    processes this one starts (they inherit JAX_PLATFORMS) use the CPU without probing libtpu."""
    platform = cpu_only_platform(os.environ, importlib.util.find_spec("libtpu") is not None, tpu_chips_attached(),
                                 any(os.path.exists(d) for d in GPU_DEVICE_FILES))
    if platform is not None:
        os.environ["JAX_PLATFORMS"] = platform
        jax.config.update("jax_platforms", platform)     # jax read the variable when it was imported


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, log: Callable[[str], None] = print) -> PodEnv | None:
    """jax.distributed.initialize for explicit flags or a detected multi-process environment; no-op for a
    single process. After it, the process count jax sees must be the detected one (else ValueError: a pod
    that trains as N separate single-host jobs would silently waste it)."""
    if coordinator_address or (num_processes or 1) > 1:
        if coordinator_address is None or num_processes is None or process_id is None:
            raise ValueError("multi-process needs --coordinator_address, --num_processes and --process_id "
                             f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
        return PodEnv("explicit", num_processes, process_id)
    pod = detect_pod(os.environ, gce_metadata, on_cloud_tpu_vm())
    if pod is None:
        return None
    log(f"multi-process environment {pod.describe()}: jax.distributed.initialize()")
    jax.distributed.initialize()
    if pod.num_processes and jax.process_count() != pod.num_processes:
        raise ValueError(f"jax.distributed.initialize() joined {jax.process_count()} processes but the "
                         f"environment says {pod.describe()}")
    return pod
