"""Pod detection for jax.distributed.initialize (train/distributed.py) on fake environments: the GCE metadata a
Cloud TPU VM worker of a v5p-32 slice (4 workers) sees, a worker of the second slice of a 2-slice queued
resource, a single-host v5p-8, a GKE pod, SLURM, and a CPU machine (which must never query the metadata)."""
import pytest

from qwen2vl_jax.train import distributed

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
