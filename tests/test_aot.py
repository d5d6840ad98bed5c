"""qwen2vl_jax.train.aot and its CLI launch.aot: accelerator -> topology mapping, AOT compile of the real
train step for a TPU topology on this CPU machine (libtpu compile-only devices), per-device memory against
qwen2vl_jax.train.memory, and the does-not-fit exit path."""
import functools
import os
import subprocess
import sys

import pytest

from qwen2vl_jax.train import aot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name, topo, chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-16", "v5p:2x2x2", 8), ("v5p-128", "v5p:4x4x4", 64),
    ("v5p-256", "v5p:4x4x8", 128), ("v5p-512", "v5p:4x8x8", 256), ("v5p-1024", "v5p:8x8x8", 512),
    ("v4-32", "v4:2x2x4", 16), ("v5litepod-8", "v5e:2x4", 8), ("v6e-16", "v6e:4x4", 16),
    ("v5p:2x4x4", "v5p:2x4x4", 32),
])
def test_topology_names(name, topo, chips):
    t = aot.parse_topology(name)
    assert (t.name, t.chips) == (topo, chips)


@pytest.mark.parametrize("bad, msg", [("v5p-12", "power of two"), ("v5p-7", "multiple of 2 cores"),
                                      ("v5p:2x2", "3 dimensions"), ("h100-8", "expected an accelerator")])
def test_bad_topology(bad, msg):
    with pytest.raises(ValueError, match=msg):
        aot.parse_topology(bad)


def _libtpu_or_skip():
    try:
        return aot.libtpu_path()
    except RuntimeError as e:
        pytest.skip(f"no libtpu on this machine: {e}")


TEST_EXP = ("stage2", "test", ("data.max_patches=64", "mesh.data=1", "mesh.fsdp=-1"))


@functools.lru_cache(maxsize=None)
def _compile_test_model(num_slices: int = 1):
    """The test model's stage-2 step on num_slices x v5p:2x2x1, `num_slices` x the batch (same rows per device)."""
    from experiments import registry
    name, model, overrides = TEST_EXP
    exp = registry.get_experiment(name, model, [*overrides, f"mesh.dcn={num_slices}"])
    topo = aot.parse_topology("v5p:2x2x1", num_slices)
    return exp, topo, aot.compile_train_step(exp.model, exp.step_config(), exp.mesh, topo,
                                             exp.batch_size * num_slices, exp.data.seq_len, exp.data.max_patches)


def test_compile_test_model_for_v5p_and_memory_matches_estimate():
    _libtpu_or_skip()
    from qwen2vl_jax.train import memory, sharding

    exp, topo, result = _compile_test_model()
    text = result.format()
    assert "topology v5p:2x2x1: 4 chips, 4 devices (HBM 95.0 GiB per device)" in text
    for word in ("argument", "output", "temp", "code", "total", "FLOPs per step"):
        assert word in text
    assert result.fits and 0 < result.total_bytes < 1 << 30
    assert result.alias_bytes > 0                      # the donated state is updated in place
    # argument bytes = params + AdamW state + this device's batch rows + a few scalar counters, each
    # padded to TPU tiles: for the test model's tiny shards the padding is up to ~60% (measured 1.63x)
    mesh = sharding.make_mesh(exp.mesh, aot.get_topology_devices(topo))
    est = memory.estimate(exp.model, memory.StepShape(exp.batch_size, exp.data.seq_len, exp.data.max_patches),
                          mesh, parts=exp.trainable)
    rows = exp.batch_size // mesh.size
    batch = rows * (exp.data.seq_len * (4 * 4 + 3 * 4) + exp.data.max_patches * (1176 * 4 + 4 + 2 * 4))
    state = est.params + est.optimizer
    assert state + batch <= result.argument_bytes <= 1.8 * (state + batch)
    # XLA counts FLOPs per device; the test model is so small that the per-device count is tiny
    assert 1e6 < result.flops_per_device < 1e12


def test_cli_fails_when_it_does_not_fit():
    _libtpu_or_skip()
    proc = subprocess.run(
        [sys.executable, "-m", "launch.aot", "--experiment=stage2", "--model=test", "--topology=v5e:2x2",
         "--set=batch_size=64", "--set=data.seq_len=4096"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "ERROR: does not fit" in proc.stderr and "16.0 GiB of HBM per device" in proc.stderr


def test_multi_slice_compile_replicates_the_state_per_slice():
    """2 slices joined by the dcn axis: libtpu's devices carry their slice, the hybrid mesh puts slice i at dcn
    index i, and each device holds what it holds on one slice (params and optimizer state replicated across
    slices, the same rows of a batch twice as large)."""
    _libtpu_or_skip()
    from qwen2vl_jax.train import sharding

    exp, topo, two = _compile_test_model(2)
    _, _, one = _compile_test_model(1)
    assert (two.topology, two.chips, two.n_devices) == ("2 x v5p:2x2x1", 8, 8)
    assert two.hbm_per_device == one.hbm_per_device
    assert two.argument_bytes == one.argument_bytes
    mesh = sharding.make_mesh(exp.mesh, aot.get_topology_devices(topo))
    assert [{d.slice_index for d in mesh.devices[i].flat} for i in range(2)] == [{0}, {1}]
    with pytest.raises(ValueError, match="mesh.dcn=1 but the topology has 2 slice"):
        aot.compile_train_step(exp.model, exp.step_config(), sharding.MeshConfig(data=1, fsdp=-1), topo, 8, 128, 64)
