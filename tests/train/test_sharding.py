"""Mesh construction, logical-axis rules, and the activation constraints in the lowered train step."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qwen2vl_jax.model import model
from qwen2vl_jax.train import optim, sharding, train_step
from qwen2vl_jax.model.config import get_config
from test_train import _sdy_spec


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


# 2 processes x 4 devices vs 1 x 8: tests/train/test_multihost.py (through launch.pretrain).


# ---------------------------------------------------------------------------------------------
# activation constraints (model/partitioning.constrain) in the real train step

DP = ("data", "fsdp")
# Hand-derived for the test model's stage-2 step (rows 4 x 128 tokens, 256 patches; decoder 64 wide,
# 4 query / 2 kv heads of 16, mlp 128; tower 32 wide, 4 heads of 8, mlp 128) on data=2 x fsdp=2 x
# tensor=2 from partitioning.LOGICAL_RULES: rows over data x fsdp, heads and mlp over tensor, the
# embedding width and the sequence whole (the sequence axis has size 1); the token table, vocab 2048,
# enters the lookup split over its rows only.
EXPECTED_ACTIVATION_SPECS = {
    "4x128x64": (DP, None, None),              # decoder hidden states ("batch", "length", "act_embed")
    "4x128x4x16": (DP, None, "tensor", None),  # decoder q and attention output ("act_heads")
    "4x128x2x16": (DP, None, "tensor", None),  # decoder k, v ("act_kv_heads")
    "4x128x128": (DP, None, "tensor"),         # decoder SwiGLU activation ("act_mlp")
    "4x256x32": (DP, None, None),              # vision hidden states ("batch", "patches", "act_embed")
    "3x4x4x256x8": (None, DP, "tensor", None, None),  # vision q/k/v, head-major [3, B, H, P, D]
    "4x4x256x8": (DP, "tensor", None, None),   # vision attention output, head-major [B, H, P, D]
    "4x256x128": (DP, None, "tensor"),         # vision MLP activation
    "2048x64": ("tensor", None),               # token table read by the lookup ("vocab", None)
}


def _random_batch(cfg, B, S, P, seed=0):
    r = np.random.default_rng(seed)
    seg = np.repeat([1, 2, 0], [S // 2, S // 2 - 8, 8])[None].repeat(B, 0).astype(np.int32)
    pseg = np.repeat([1, 2, 0], [P // 2, P // 4, P // 4])[None].repeat(B, 0).astype(np.int32)
    return {"input_ids": r.integers(0, cfg.special_token_base, (B, S)).astype(np.int32),
            "targets": r.integers(0, cfg.special_token_base, (B, S)).astype(np.int32),
            "loss_mask": (seg != 0).astype(np.float32), "segment_ids": seg,
            "positions": np.broadcast_to(np.arange(S, dtype=np.int32), (B, 3, S)).copy(),
            "pixel_values": r.standard_normal((B, P, cfg.vision.patch_dim)).astype(np.float32),
            "patch_segment_ids": pseg, "patch_positions": r.integers(0, 8, (B, P, 2)).astype(np.int32)}


def _random_state(abstract, seed=0):
    """A state with the abstract state's shapes and shardings: floats |normal| * 0.05 (Adam's nu must be
    >= 0), integer counters 0. Placed directly: no init program to compile."""
    r = np.random.default_rng(seed)

    def leaf(a):
        x = (np.abs(r.standard_normal(a.shape)) * 0.05 if np.issubdtype(a.dtype, np.floating)
             else np.zeros(a.shape))
        return jax.device_put(x.astype(a.dtype), a.sharding)
    return jax.tree.map(leaf, abstract)


def test_activation_constraints_are_in_the_lowered_train_step():
    """The real test-model train step on the 8-device CPU mesh (data x fsdp x tensor = 2x2x2), lowered:
    every activation constraint the model names by logical axes is in the program with the hand-derived
    spec (decoder and vision hidden states, q/k/v and attention outputs, MLP activations, the token table
    of the lookup), and each of them appears; traced without the mesh in context there are none. The
    constrained step's loss equals the loss computed without any mesh in the trace (a constraint moves
    data, never changes numerics)."""
    from experiments import registry

    exp = registry.get_experiment("stage2", "test", [])
    cfg, step_cfg = exp.model, exp.step_config()
    B, S, P = exp.batch_size, exp.data.seq_len, exp.data.max_patches
    assert (B, S, P, cfg.vocab_size, cfg.attention_impl) == (4, 128, 256, 2048, "xla"), \
        "EXPECTED_ACTIVATION_SPECS assume these"
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    abs_state, st_sh = train_step.abstract_state(cfg, step_cfg, mesh)
    b_sh = sharding.batch_shardings(train_step.batch_spec(cfg, B, S, P), mesh)
    state = _random_state(abs_state)
    batch = sharding.global_batch(_random_batch(cfg, B, S, P), b_sh)

    def constraints(step_mesh):   # {shape: {spec}} of the step traced with / without the mesh in context
        lowered = jax.jit(train_step.train_step_fn(cfg, step_cfg, step_mesh),
                          in_shardings=(st_sh, b_sh)).lower(state, batch)
        found = {}
        for dims, shape in re.findall(r"sdy\.sharding_constraint %\S+ <@mesh, \[(.*?)\]> : tensor<([0-9x]+)x\w+>",
                                      lowered.as_text()):
            found.setdefault(shape, set()).add(_sdy_spec(dims))
        return found, lowered

    found, lowered = constraints(mesh)
    assert found == {k: {v} for k, v in EXPECTED_ACTIVATION_SPECS.items()}, found
    assert constraints(None)[0] == {}
    loss = train_step.host_metrics(lowered.compile()(state, batch)[1])["loss"]

    @jax.jit
    def plain_loss(params, batch):              # no mesh in the trace: no constraint, no shard_map
        _, (nll, _, n) = train_step.loss_terms(cfg, params, batch, step_cfg)
        return nll / jnp.maximum(n, 1.0)
    ref = float(plain_loss(state.params, batch))
    assert loss == ref, (loss, ref)
