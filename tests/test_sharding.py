"""Mesh construction and logical-axis rules (no compilation: fast)."""
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qwen2vl_jax.model import model
from qwen2vl_jax.train import optim, sharding, train_step
from qwen2vl_jax.model.config import get_config


def test_mesh_shapes_and_errors():
    assert sharding.MeshConfig().shape(8) == (1, 8, 1, 1, 1)
    assert sharding.MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (1, 2, 2, 2, 1)
    assert sharding.MeshConfig(dcn=2, fsdp=-1, data=1).shape(8) == (2, 1, 4, 1, 1)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=2, sequence=2))
    assert mesh.axis_names == ("dcn", "data", "fsdp", "tensor", "sequence") and mesh.devices.size == 8
    assert dict(mesh.shape) == {"dcn": 1, "data": 1, "fsdp": 2, "tensor": 2, "sequence": 2}
    with pytest.raises(ValueError, match="needs 16 devices, have 8"):
        sharding.MeshConfig(data=4, fsdp=4).shape(8)
    with pytest.raises(ValueError, match="at most one"):
        sharding.MeshConfig(data=-1, fsdp=-1).shape(8)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.MeshConfig(data=-1, tensor=3).shape(8)


def test_dcn_axis_splits_only_the_batch():
    """Multi-slice: the dcn axis is data parallel across slices; params stay replicated over it (sharded within a
    slice as on one slice) and a mesh over devices of several slices needs mesh.dcn set."""
    mesh = sharding.make_mesh(sharding.MeshConfig(dcn=2, data=1, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 2, "tensor": 2, "sequence": 1}
    assert list(mesh.devices[0].flat) == jax.devices()[:4]          # CPU: slice i = the i-th block of devices
    assert sharding.logical_to_spec(("batch", "length"), (8, 16), mesh) == P(("dcn", "fsdp"), None)
    one = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4])
    cfg = get_config("test")
    assert (jax.tree.map(lambda s: s.spec, train_step.param_shardings(cfg, mesh))
            == jax.tree.map(lambda s: s.spec, train_step.param_shardings(cfg, one)))

    class Sliced:          # a device of a multi-slice TPU job as jax describes it
        def __init__(self, d, i):
            self.d, self.slice_index = d, i

    sliced = [Sliced(d, i // 4) for i, d in enumerate(jax.devices())]
    with pytest.raises(ValueError, match="the devices are on 2 slices: set mesh.dcn=2"):
        sharding.make_mesh(sharding.MeshConfig(data=-1), sliced)
    with pytest.raises(ValueError, match=r"mesh.dcn=4 but the devices are on 2 slice\(s\)"):
        sharding.make_mesh(sharding.MeshConfig(dcn=4, data=-1), sliced)


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
    step_cfg = train_step.StepConfig(trainable=optim.STAGE_TRAINABLE[2], optim=optim.OptimConfig(total_steps=10))
    abstract, sh = train_step.abstract_state(cfg, step_cfg, mesh)
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


# 2 processes x 4 devices vs 1 x 8: tests/test_multihost.py (through launch.pretrain).
