"""Memory estimate: hand counts of params / optimizer / gradients on the test config, per-device bytes
under a mesh against the bytes of really placed shards, the activation formula, and check_fits."""
import jax
import numpy as np
import pytest

from qwen2vl_jax.train import memory, optim, sharding
from qwen2vl_jax.model.config import get_config
from qwen2vl_jax.train.memory import StepShape

CFG = get_config("test")

# Hand count of the test config's parameter tree (docs/architecture.md contract):
# V=2048 D=64 I=128 L=2 Hq=4 Hkv=2 hd=16; ViT depth 2, E=32, M=128, patch row 1176; untied lm_head.
VISION_TOWER = (1176 * 32                                   # patch_embed
                + 2 * (2 * 32 + 2 * 32                      # norm1, norm2 (scale, bias)
                       + 32 * 3 * 32 + 3 * 32               # qkv kernel [E,3,H,hd] + bias
                       + 32 * 32 + 32                       # proj
                       + 32 * 128 + 128 + 128 * 32 + 32))   # fc1, fc2
MERGER = 2 * 32 + (128 * 128 + 128) + (128 * 64 + 64)        # ln_q, mlp_0 [4E,4E], mlp_2 [4E,D]
LLM = (2048 * 64                                             # embed_tokens
       + 2 * (2 * 64                                         # two RMSNorm scales
              + 64 * 64 + 64 + 2 * (64 * 32 + 32)            # q, k, v (+ biases)
              + 64 * 64                                      # o_proj
              + 3 * 64 * 128)                                # gate, up, down
       + 64                                                  # final norm
       + 64 * 2048)                                          # lm_head
STEP = StepShape(batch_size=8, seq_len=128, max_patches=64)


def test_hand_count_matches_the_contract_numbers():
    assert (VISION_TOWER, MERGER, LLM) == (63040, 24832, 336448)


@pytest.mark.parametrize("stage, trainable", [(1, VISION_TOWER + MERGER), (2, VISION_TOWER + MERGER + LLM),
                                              (3, MERGER + LLM)])
def test_state_bytes_unsharded(stage, trainable):
    est = memory.estimate(CFG, STEP, parts=optim.STAGE_TRAINABLE[stage])
    total = VISION_TOWER + MERGER + LLM
    assert est.params == 4 * total                       # fp32 master weights
    assert est.optimizer == 2 * 4 * trainable            # AdamW m, v for trainable leaves only
    assert est.gradients == 4 * trainable
    bf16 = memory.estimate(CFG.replace(param_dtype="bfloat16"), STEP, parts=optim.STAGE_TRAINABLE[stage])
    assert bf16.params == 2 * total and bf16.optimizer == 2 * 2 * trainable
    accum = memory.estimate(CFG, StepShape(8, 128, 64, grad_accum=4), parts=optim.STAGE_TRAINABLE[stage])
    assert accum.gradients == 2 * 4 * trainable          # + the accumulation buffer


@pytest.mark.parametrize("mesh_cfg", [sharding.MeshConfig(fsdp=8, data=1), sharding.MeshConfig(data=2, fsdp=2, tensor=2)])
def test_per_device_bytes_equal_placed_shards(mesh_cfg):
    """Per-device bytes from shard_shape == bytes of the shards of params really placed on the mesh."""
    mesh = sharding.make_mesh(mesh_cfg)
    abstract = memory.abstract_params(CFG)
    shardings = memory.param_shardings(CFG, abstract, mesh)
    placed = jax.device_put(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract), shardings)
    per_device = {}
    for leaf in jax.tree.leaves(placed):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    est = memory.estimate(CFG, STEP, mesh, parts=optim.STAGE_TRAINABLE[2])
    assert est.params == max(per_device.values())
    assert est.params < 4 * (VISION_TOWER + MERGER + LLM)          # something is sharded
    assert est.optimizer == 2 * est.params and est.gradients == est.params


def test_optimizer_bytes_match_the_train_state():
    """m + v of the estimate == the real optax state of train.abstract_state minus its int32 counters."""
    from qwen2vl_jax.train import train_step
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=8, data=1))
    for stage in (1, 3):
        step_cfg = train_step.StepConfig(trainable=optim.STAGE_TRAINABLE[stage], optim=optim.OptimConfig(total_steps=10))
        abstract, _ = train_step.abstract_state(CFG, step_cfg, mesh)
        opt_leaves = [x for x in jax.tree.leaves(abstract.opt_state) if x.ndim > 0]
        opt = sum(memory.leaf_bytes(x, x.sharding) for x in opt_leaves)
        est = memory.estimate(CFG, STEP, mesh, parts=step_cfg.trainable)
        assert est.optimizer == opt


def test_activation_formula_hand_count():
    """Decoder + ViT stored activations, remat none minus full, for the test config on one device:
    T = 8*128 = 1024 tokens, Pn = 8*64 = 512 patches, fp32 (4 bytes), xla attention adds fp32 scores."""
    none_, det_none = memory.activation_bytes(CFG.replace(remat_policy="none"), STEP)
    full, det_full = memory.activation_bytes(CFG.replace(remat_policy="full"), STEP)
    d = dict(det_none)
    # none: per token 6D + 2q + 3kv + q + 4I = 384 + 128 + 96 + 64 + 512 = 1184 values; scores 4 heads x 128
    assert d["decoder layers"] == 2 * 1024 * (1184 * 4 + 4 * 128 * 4)
    # ViT: 6E + 2E + 3E + E + 2M = 192 + 64 + 96 + 32 + 256 = 640 values; scores 4 heads x 64 patches
    assert d["vision layers"] == 2 * 512 * (640 * 4 + 4 * 64 * 4)
    f = dict(det_full)
    assert f["decoder layers"] == 2 * 1024 * 64 * 4 and f["vision layers"] == 2 * 512 * 32 * 4
    # loss: final hidden [1024, 64] fp32 + 3 x (8 rows x 128-position chunk) x V=2048 x 4 bytes
    assert d["loss"] == 1024 * 64 * 4 + 3 * 8 * 128 * 2048 * 4
    assert none_ - full == (d["decoder layers"] - f["decoder layers"]) + (d["vision layers"] - f["vision layers"])
    # frozen ViT (stage 3): no stored ViT activations; sharding the batch 8 ways divides everything
    _, det3 = memory.activation_bytes(CFG, STEP, optim.STAGE_TRAINABLE[3])
    assert dict(det3)["vision layers"] == 0
    sharded, _ = memory.activation_bytes(CFG, STEP, batch_shards=8)
    assert sharded == pytest.approx(none_ / 8, rel=1e-6, abs=8)
    # remat policies order
    sizes = [memory.activation_bytes(CFG.replace(remat_policy=p), STEP)[0] for p in ("full", "minimal", "dots", "none")]
    assert sizes == sorted(sizes)


def test_check_fits_raises_with_needed_and_available():
    est = memory.estimate(get_config("72b"), StepShape(batch_size=1, seq_len=4096, max_patches=4096))
    assert est.params == pytest.approx(4 * 73_405_560_320, rel=0)    # docs/qwen2vl.md §1.3 parameter count
    with pytest.raises(memory.InsufficientMemoryError, match=r"needs 1\d\d\d\.\d\d GiB per device but host RAM"):
        memory.check_fits(est, what="72b")
    small = memory.estimate(CFG, STEP)
    memory.check_fits(small)                                         # fits on any machine
    with pytest.raises(memory.InsufficientMemoryError, match=r"allows 0\.00 GiB"):
        memory.check_fits(small, available=1000)


def test_bad_inputs():
    with pytest.raises(ValueError, match="max_patches=6"):
        StepShape(1, 16, 6)
    with pytest.raises(ValueError, match="batch_size=0"):
        StepShape(0, 16, 4)
    with pytest.raises(ValueError, match="remat_policy='bogus'"):
        memory._layer_values("bogus", 1, 1, 1, 1, 1, 1)
