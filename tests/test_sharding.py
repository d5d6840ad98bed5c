"""Mesh construction and logical-axis rules (no compilation: fast)."""
import json
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qwen2vl_jax import model, optim, sharding, train
from qwen2vl_jax.config import get_config


def test_mesh_shapes_and_errors():
    assert sharding.MeshConfig().shape(8) == (8, 1, 1, 1)
    assert sharding.MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2, 1)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=2, sequence=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor", "sequence") and mesh.devices.size == 8
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2, "sequence": 2}
    with pytest.raises(ValueError, match="needs 16 devices, have 8"):
        sharding.MeshConfig(data=4, fsdp=4).shape(8)
    with pytest.raises(ValueError, match="at most one"):
        sharding.MeshConfig(data=-1, fsdp=-1).shape(8)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.MeshConfig(data=-1, tensor=3).shape(8)


def test_logical_rules():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    # batch over data x fsdp; vocab over tensor, embed over fsdp
    assert sharding.logical_to_spec(("batch", "length"), (8, 16), mesh) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("vocab", "embed"), (2048, 64), mesh) == P("tensor", "fsdp")
    # an axis that does not divide the dim is dropped (replicated), not an error
    assert sharding.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 1, 16), mesh) == \
        P(None, "fsdp", None, None)
    assert sharding.logical_to_spec(("batch",), (2,), mesh) == P("data")
    # a mesh axis is used at most once per array
    rules = sharding.LOGICAL_RULES + (("twice", ("fsdp",)),)
    assert sharding.logical_to_spec(("embed", "twice"), (64, 64), mesh, rules) == P("fsdp", None)
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'bogus'"):
        sharding.logical_to_spec(("bogus",), (4,), mesh)
    with pytest.raises(ValueError, match="do not match shape"):
        sharding.logical_to_spec(("embed",), (4, 4), mesh)
    with pytest.raises(ValueError, match="unknown batch keys"):
        sharding.batch_shardings({"labels": np.zeros((8, 4))}, mesh)


@pytest.mark.parametrize("name, mesh_cfg", [("test", dict(data=2, fsdp=2, tensor=2)),
                                             ("7b", dict(data=1, fsdp=4, tensor=2)),
                                             ("72b", dict(data=1, fsdp=1, tensor=8))])
def test_every_param_and_optimizer_leaf_is_sharded(name, mesh_cfg):
    cfg = get_config(name)
    mesh = sharding.make_mesh(sharding.MeshConfig(**mesh_cfg))
    step_cfg = train.StepConfig(trainable=optim.STAGE_TRAINABLE[2], optim=optim.OptimConfig(total_steps=10))
    abstract, sh = train.abstract_state(cfg, step_cfg, mesh)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    per_dev = sum(math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(abstract.params))
    # large models: params are split ~mesh-size ways (norms / biases replicated are negligible)
    if name != "test":
        assert per_dev < 1.1 * total / mesh.size, (per_dev, total)
    # Adam mu/nu are sharded exactly like their params; counters replicated
    mu = abstract.opt_state[0].mu
    tr, _ = optim.split_params(abstract.params, step_cfg.trainable)
    jax.tree.map(lambda m, p: (m.sharding == p.sharding) or pytest.fail("mu sharding differs"), mu, tr)
    assert abstract.opt_state[0].count.sharding.spec == P()
    # the model's logical axes cover every param
    assert jax.tree.structure(model.param_logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple)) == \
        jax.tree.structure(abstract.params)


def test_global_batch_assembles_process_rows():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=2))
    local = {"input_ids": np.arange(8 * 6, dtype=np.int32).reshape(8, 6),
             "positions": np.zeros((8, 3, 6), np.int32)}
    sh = sharding.batch_shardings(local, mesh)
    arrs = sharding.global_batch(local, sh)
    np.testing.assert_array_equal(np.asarray(arrs["input_ids"]), local["input_ids"])
    assert arrs["input_ids"].sharding.spec == P(("data", "fsdp"), None)
    assert arrs["positions"].sharding.spec == P(("data", "fsdp"), None, None)


# ----------------------------------------------------------------------------------------------
# 2 processes x 4 CPU devices (gloo on localhost) == 1 process x 8 devices

_WORKER = r'''
import json, os, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from launch.pretrain import initialize_distributed
pid, n = int(sys.argv[1]), int(sys.argv[2])
if n > 1:
    initialize_distributed(sys.argv[3], n, pid)
import numpy as np
from qwen2vl_jax import optim, sharding, train
from qwen2vl_jax.config import get_config
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from test_train import synthetic_batch
cfg = get_config("test")
step_cfg = train.StepConfig(loss_chunk=8, optim=optim.OptimConfig(peak_lr=1e-2, warmup_steps=0, total_steps=5))
mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
_, st_sh = train.abstract_state(cfg, step_cfg, mesh)
state = train.init_state(cfg, step_cfg, jax.random.key(0), mesh)
b_sh = sharding.batch_shardings(train.batch_spec(cfg, 8, 32, 8), mesh)
step = train.make_train_step(cfg, step_cfg, mesh, st_sh, b_sh)
losses = []
for i in range(3):
    full = synthetic_batch(cfg, seed=i)
    rows = 8 // jax.process_count()
    local = {k: v[pid * rows:(pid + 1) * rows] for k, v in full.items()}   # this process's data shard
    state, m = step(state, sharding.global_batch(local, b_sh))
    losses.append(train.host_metrics(m)["loss"])
print("LOSSES", json.dumps(losses))
'''


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)

    def env(devices):
        return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": repo,
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script), str(i), "2", f"localhost:{port}"], env=env(4), cwd=repo,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    single = subprocess.run([sys.executable, str(script), "0", "1"], env=env(8), cwd=repo, capture_output=True,
                            text=True, timeout=600)
    outs = [p.communicate(timeout=600) for p in procs]

    def losses(out):
        line = [x for x in out.splitlines() if x.startswith("LOSSES")]
        assert line, out
        return json.loads(line[0][len("LOSSES "):])

    ref = losses(single.stdout + single.stderr[-2000:])
    for o, e in outs:
        np.testing.assert_allclose(losses(o + e[-2000:]), ref, rtol=1e-6)
