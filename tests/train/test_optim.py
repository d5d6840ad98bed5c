"""Optimizer contracts: weight decay reaches matrices and embeddings only; the learning-rate schedule is
linear warmup then cosine decay, checked at every step against the closed form."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwen2vl_jax.model import model
from qwen2vl_jax.model.config import get_config
from qwen2vl_jax.train import optim

CFG = get_config("test")


def _leaf_kind(path) -> str:
    """'bias' / 'norm' / 'matrix' from the param path alone: a leaf named bias, a scale (every scale in the
    model belongs to an RMSNorm or LayerNorm), and everything else (projection kernels, the patch
    embedding, the token embedding, lm_head)."""
    name = path[-1].key
    return {"bias": "bias", "scale": "norm"}.get(name, "matrix")


def test_weight_decay_shrinks_matrices_only():
    """One AdamW step with zero gradients: Adam's update is exactly 0, so what remains is decoupled weight
    decay, p <- p * (1 - lr * wd) on matrices and embeddings, and nothing on norm scales and biases."""
    lr, wd = 0.1, 0.5
    cfg = optim.OptimConfig(peak_lr=lr, warmup_steps=0, total_steps=10, weight_decay=wd)
    params = jax.device_get(jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(0)))
    # biases start at 0 and norm scales at 1: give every leaf distinct non-zero values, else decay on a
    # zero bias would be invisible
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: x + rng.uniform(0.5, 1.5, x.shape).astype(x.dtype), params)
    trainable, frozen = optim.split_params(params, optim.STAGE_TRAINABLE[2])
    assert not frozen
    tx = optim.make_optimizer(cfg)

    @jax.jit
    def step(p):
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
        return optax.apply_updates(p, updates)

    new = step(trainable)

    kinds = {"bias": 0, "norm": 0, "matrix": 0}
    for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(trainable), jax.tree.leaves(new)):
        kind = _leaf_kind(path)
        kinds[kind] += 1
        before, after = np.asarray(before), np.asarray(after)
        where = jax.tree_util.keystr(path)
        if kind == "matrix":
            np.testing.assert_allclose(after, before * (1 - lr * wd), rtol=1e-6, err_msg=where)
        else:
            np.testing.assert_array_equal(after, before, err_msg=where)
    # hand count over the test config's tree (layers stacked): scales of input/post-attention/final RMSNorm
    # and norm1/norm2/ln_q LayerNorm; biases of q/k/v, of the 4 vision-block and 2 merger linears and of the
    # 3 LayerNorms; matrices: 7 decoder-layer kernels, 4 vision-block kernels, 2 merger kernels,
    # patch_embed, embed_tokens, lm_head
    assert kinds == {"bias": 12, "norm": 6, "matrix": 16}, kinds


def _closed_form(t, peak, end, warm, total):
    if t < warm:
        return peak * t / warm
    return end + (peak - end) * (1 + math.cos(math.pi * (t - warm) / (total - warm))) / 2


@pytest.mark.parametrize("warm,total", [(5, 40), (1, 7), (30, 31)])
def test_schedule_is_linear_warmup_then_cosine(warm, total):
    cfg = optim.OptimConfig(peak_lr=3e-4, min_lr_ratio=0.1, warmup_steps=warm, total_steps=total)
    fn = optim.schedule(cfg)
    got = np.array([float(fn(t)) for t in range(total + 1)])
    want = np.array([_closed_form(t, 3e-4, 3e-5, warm, total) for t in range(total + 1)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    assert got[warm] == pytest.approx(3e-4) and got[total] == pytest.approx(3e-5)
