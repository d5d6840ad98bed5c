"""Norm layers alone against transformers' modules (Qwen2RMSNorm; torch.nn.LayerNorm, which the Qwen2-VL vision
tower uses), on inputs whose mean square / variance spans eps, so a misplaced or dropped eps is off by tens of
percent against a 1e-5 tolerance."""
import collections

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2RMSNorm

from qwen2vl_jax.model import layers

EPS = 1e-6
D = 64
# per-row input scale: mean square (RMSNorm) / variance (LayerNorm) from 1e-8 to 1e-4 around eps = 1e-6
ROW_STD = np.array([1e-4, 3e-4, 1e-3, 3e-3, 1e-2])


def _inputs(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, len(ROW_STD), D)) * ROW_STD[:, None]
    return x.astype(np.float32), rng.uniform(0.5, 1.5, D).astype(np.float32), rng.normal(0, 0.1, D).astype(np.float32)


def _apply(module, params, x):
    return np.asarray(module.apply({"params": params}, jnp.asarray(x)).astype(jnp.float32))


def test_rmsnorm_matches_transformers():
    x, w, _ = _inputs(0)
    ref = Qwen2RMSNorm(D, eps=EPS).double()
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w))
        want = ref(torch.from_numpy(x).double()).numpy()   # the formula in float64 on the same fp32 inputs
    got = _apply(layers.RMSNorm(eps=EPS), {"scale": jnp.asarray(w)}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def test_layernorm_matches_torch():
    x, w, b = _inputs(1)
    x = x + 1e-3   # a mean the norm must remove (small, so fp32 cancellation stays far below the tolerance)
    ref = torch.nn.LayerNorm(D, eps=EPS).double()
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w))
        ref.bias.copy_(torch.from_numpy(b))
        want = ref(torch.from_numpy(x).double()).numpy()
    got = _apply(layers.LayerNorm(eps=EPS), {"scale": jnp.asarray(w), "bias": jnp.asarray(b)}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_bf16_inputs_match_the_bf16_modules(kind):
    """bf16 activations: transformers' modules in bf16 (weights bf16, statistics in fp32) give the same
    values within one bf16 rounding."""
    x, w, b = _inputs(2)
    # weights representable in bf16: the torch modules hold them in bf16, ours keeps fp32 master copies
    w, b = (torch.from_numpy(a).to(torch.bfloat16).float().numpy() for a in (w, b))
    xt = torch.from_numpy(x).to(torch.bfloat16)
    if kind == "rms":
        ref, ours, params = Qwen2RMSNorm(D, eps=EPS), layers.RMSNorm(eps=EPS), {"scale": jnp.asarray(w)}
    else:
        xt = xt + 1e-3
        ref, ours = torch.nn.LayerNorm(D, eps=EPS), layers.LayerNorm(eps=EPS)
        params = {"scale": jnp.asarray(w), "bias": jnp.asarray(b)}
    ref = ref.to(torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w))
        if kind == "layer":
            ref.bias.copy_(torch.from_numpy(b))
        want = ref(xt).float().numpy()
    got = _apply(ours, params, jnp.asarray(xt.float().numpy(), jnp.bfloat16))
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=0)


def _grad_jaxpr_counts(policy_name):
    """Equation counts in the gradient of a rematerialised attention block (a q/k/v projection, the
    block-sparse kernel in interpret mode, an output projection, a nonlinearity): how often each kernel
    and each projection matmul runs in one forward + backward pass."""
    import jax
    import jax.extend.core as jex_core
    from qwen2vl_jax.model import block_sparse_attention as bsa
    B, T, H, D = 1, 256, 2, 128
    seg = jnp.ones((B, T), jnp.int32)

    def block(x, w_qkv, w_o):
        q, k, v = (jnp.einsum("btd,dhk->bthk", x, w_qkv[i]) for i in range(3))
        a = bsa.block_sparse_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True,
                                       block_q=128, block_kv=128, interpret=True)
        return jnp.sum(jnp.tanh(jnp.einsum("bthk,hkd->btd", a, w_o)))

    x = jnp.ones((B, T, H * D), jnp.float32)
    w_qkv = jnp.full((3, H * D, H, D), 0.01, jnp.float32)
    w_o = jnp.full((H, D, H * D), 0.01, jnp.float32)
    f = jax.checkpoint(block, policy=layers.remat_policy(policy_name))
    counts = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":          # not into the kernel body's own matmuls
                counts[str(eqn.params["name"])] += 1
                continue
            if eqn.primitive.name == "dot_general":
                counts["dot_general"] += 1
            for sub in jex_core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(x, w_qkv, w_o).jaxpr)
    return counts


def test_dots_attention_policy_recomputes_no_matmul_and_no_attention_kernel():
    """Hand count per forward + backward of the block above: the forward kernel runs once, dq and dk/dv once
    each; projections: 4 forward matmuls (q, k, v, o) and 2 per projection backward (input and weight
    gradients) = 12. With remat "full" the backward re-runs the forward kernel and the 4 forward matmuls."""
    saved, full = _grad_jaxpr_counts("dots_attention"), _grad_jaxpr_counts("full")
    assert {k: v for k, v in saved.items() if k.startswith("block_sparse")} == \
        {"block_sparse_fwd": 1, "block_sparse_dq": 1, "block_sparse_dkv": 1}
    assert full["block_sparse_fwd"] == 2 and full["block_sparse_dq"] == full["block_sparse_dkv"] == 1
    assert saved["dot_general"] == 12 and full["dot_general"] == 16


@pytest.mark.parametrize("policy", ["dots_attention", "dots"])
def test_projection_policies_save_the_biased_output_not_the_bare_product(policy):
    """A Linear with a bias under the projection-saving policies: the residuals the backward pass reads are
    the inputs and ONE [B,T,H] tensor, the output with its bias added (named BIASED_PROJECTION), not the
    bare product (whose bias add the backward pass would re-run). Residual list from jax's own
    saved_residuals."""
    import jax
    import flax.linen as nn
    from jax._src.ad_checkpoint import saved_residuals
    lin = layers.Linear("btd,dh->bth", (8, 16), ("embed", "mlp"), (16,), ("mlp",))
    x = jnp.ones((1, 4, 8))
    p = nn.meta.unbox(lin.init(jax.random.key(0), x))
    f = jax.checkpoint(lambda p, x: jnp.sum(jnp.tanh(lin.apply(p, x))), policy=layers.remat_policy(policy))
    acts = [d for a, d in saved_residuals(f, p, x) if a.shape == (1, 4, 16)]
    assert len(acts) == 1 and layers.BIASED_PROJECTION in acts[0], acts
