"""The Pallas attention kernels compiled for a real TPU topology (v5p:2x2x1, 4 chips) on this CPU machine:
libtpu's compile-only devices (qwen2vl_jax.perf.aot.get_topology_devices). A train-like step (projections
-> splash attention -> output projection -> loss, gradients of the weights) on a mesh with data / fsdp /
tensor axes must lower and compile, with the Mosaic kernel partitioned by the shard_map in
qwen2vl_jax.model.attention; without a mesh in context, XLA cannot partition it (the contract train steps
rely on: trace under the mesh). The real train step with attention_impl=block_sparse compiles with the
block-sparse kernels in it, and "auto" resolves for the mesh's platform. Skipped when libtpu is not
installed."""
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding

from qwen2vl_jax.train import sharding
from qwen2vl_jax.model.attention import attention


@pytest.fixture(autouse=True, scope="module")
def _splash():
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")


def _train_like(causal: bool, impl: str):
    """(params, x [B,T,E] bf16, seg [B,T]) -> grads of mean((attn(x Wq, x Wk, x Wv) Wo)^2) w.r.t. params."""
    def loss(params, x, seg):
        q = jnp.einsum("bte,ehd->bthd", x, params["wq"])
        k = jnp.einsum("bte,ehd->bthd", x, params["wk"])
        v = jnp.einsum("bte,ehd->bthd", x, params["wv"])
        a = attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal, impl=impl)
        y = jnp.einsum("bthd,hde->bte", a, params["wo"])
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    return jax.grad(loss)


# (name, mesh (data, fsdp, tensor), B, T, E, Hq, Hkv, head_dim, causal)
CASES = [
    # decoder-shaped (2B geometry: 12 query / 2 kv heads): kv heads sharded with the query heads
    ("decoder_gqa_kv_sharded", (2, 1, 2), 4, 2048, 256, 12, 2, 128, True),
    # tensor 4 does not divide 2 kv heads: k/v replicated, each shard slices its query heads' kv head
    ("decoder_gqa_kv_replicated", (1, 1, 4), 4, 2048, 256, 12, 2, 128, True),
    # vision-shaped (2B tower: 16 heads of 80, non-causal, patch segments)
    ("vision", (1, 2, 2), 4, 2048, 256, 16, 16, 80, False),
]


@pytest.mark.parametrize("name, mesh_shape, B, T, E, Hq, Hkv, hd, causal", CASES, ids=[c[0] for c in CASES])
def test_splash_train_step_compiles_for_v5p(tpu_devices, name, mesh_shape, B, T, E, Hq, Hkv, hd, causal):
    data, fsdp, tensor = mesh_shape
    mesh = sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor), tpu_devices)
    bf16 = jnp.bfloat16
    shapes = {"wq": (E, Hq, hd), "wk": (E, Hkv, hd), "wv": (E, Hkv, hd), "wo": (Hq, hd, E)}
    axes = {"wq": ("embed", "heads", "head_dim"), "wk": ("embed", "kv_heads", "head_dim"),
            "wv": ("embed", "kv_heads", "head_dim"), "wo": ("heads", "head_dim", "embed")}
    p_sh = {n: NamedSharding(mesh, sharding.logical_to_spec(axes[n], s, mesh)) for n, s in shapes.items()}
    params = {n: jax.ShapeDtypeStruct(s, bf16, sharding=p_sh[n]) for n, s in shapes.items()}
    row = NamedSharding(mesh, sharding.logical_to_spec(("batch", None), (B, T), mesh))
    x = jax.ShapeDtypeStruct((B, T, E), bf16,
                             sharding=NamedSharding(mesh, sharding.logical_to_spec(("batch", None, None),
                                                                                   (B, T, E), mesh)))
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=row)
    def step(impl):
        return jax.jit(_train_like(causal, impl), in_shardings=(p_sh, x.sharding, row), out_shardings=p_sh)

    # the xla reference (which keeps this device's [B_loc, H_loc, T, T] fp32 scores) only for the vision
    # case: XLA takes ~30 s to compile the causal one on this CPU
    impls = ("splash", "xla") if name == "vision" else ("splash",)
    # tests/conftest.py sets matmul precision "highest", which Mosaic refuses for bf16 operands
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        compiled = {impl: step(impl).lower(params, x, seg).compile() for impl in impls}
    assert "tpu_custom_call" in compiled["splash"].as_text(), "the Mosaic kernel must be in the program"
    temp = {impl: c.memory_analysis().temp_size_in_bytes for impl, c in compiled.items()}
    scores = B // (data * fsdp) * (Hq // tensor) * T * T * 4
    assert temp["splash"] < scores / 3, (temp, scores)       # the kernel never materialises the scores
    if "xla" in compiled:
        assert "tpu_custom_call" not in compiled["xla"].as_text()
        assert temp["xla"] >= scores > 3 * temp["splash"], (temp, scores)

    if name == CASES[0][0]:
        # without a mesh in context attention() cannot see the mesh; XLA refuses to partition the kernel
        with pytest.raises(Exception, match="Mosaic kernels cannot be automatically partitioned"), \
                jax.default_matmul_precision("default"):
            step("splash").lower(params, x, seg).compile()


def test_auto_resolves_for_the_mesh_platform(tpu_devices):
    """On a CPU host, "auto" inside a TPU mesh context resolves for TPU (the AOT case): block_sparse when the
    kernel can tile both lengths, xla otherwise; outside it, for the CPU."""
    from qwen2vl_jax.model.attention import resolve_impl
    from qwen2vl_jax.model.partitioning import activation_sharding

    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1), tpu_devices)
    with activation_sharding(mesh):
        assert resolve_impl("auto", jnp.bfloat16, (256, 1024)) == "block_sparse"
        assert resolve_impl("auto", jnp.bfloat16, (96, 128)) == "xla"
    assert resolve_impl("auto", jnp.bfloat16, (256, 1024)) == "xla"


def test_block_sparse_train_step_compiles_for_v5p(tpu_devices):
    """The real train step (train_step.make_train_step, as perf/aot.py compiles it) of the test model's
    stage-2 experiment with attention_impl=block_sparse, compiled for v5p:2x2x1: the compiled program holds
    the kernel's forward, dq and dk/dv Mosaic calls for the vision tower and the decoder; the vision tower
    takes its configured block (128 rows, not the default 256 for its 256 patch rows: a visit list of
    2 x 2 block pairs per row)."""
    from experiments import registry
    from qwen2vl_jax.train import train_step

    exp = registry.get_experiment("stage2", "test", ["model.attention_impl=block_sparse",
                                                      "model.attention_block_vision=128"])
    cfg, step_cfg = exp.model, exp.step_config()
    mesh = sharding.make_mesh(exp.mesh, tpu_devices)
    abs_state, st_sh = train_step.abstract_state(cfg.replace(attention_impl="xla"), step_cfg, mesh)
    spec = train_step.batch_spec(cfg, exp.batch_size, exp.data.seq_len, exp.data.max_patches)
    b_sh = sharding.batch_shardings(spec, mesh)
    abs_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_sh[k]) for k, v in spec.items()}
    step = train_step.make_train_step(cfg, step_cfg, mesh, st_sh, b_sh)
    with jax.default_matmul_precision("default"):
        text = step.lower(abs_state, abs_batch).compile().as_text()
    for kernel in ("block_sparse_fwd", "block_sparse_dq", "block_sparse_dkv"):
        # one kernel per attention site (vision tower, decoder): the layer stacks are scanned
        n = len(re.findall(rf'custom_call_target="tpu_custom_call"[^\n]*{kernel}', text))
        assert n >= 2, (kernel, n)
    vision_fwd = [line for line in text.splitlines() if "block_sparse_fwd" in line and "tpu_custom_call" in line
                  and f",{exp.data.max_patches}," in line]
    assert vision_fwd and all("s32[1,4]" in line for line in vision_fwd), vision_fwd
