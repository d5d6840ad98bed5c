"""Norm layers alone against transformers' modules (Qwen2RMSNorm; torch.nn.LayerNorm, which the Qwen2-VL vision
tower uses), on inputs whose mean square / variance spans eps, so a misplaced or dropped eps is off by tens of
percent against a 1e-5 tolerance."""
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
