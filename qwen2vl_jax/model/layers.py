"""Building blocks shared by the vision tower and the decoder: Linear, RMSNorm, LayerNorm, remat policies
and layer stacking (nn.scan or a python loop over one stacked parameter tree). Activation sharding
constraints: partitioning.constrain."""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import ad_checkpoint

from qwen2vl_jax.model.config import ModelConfig

INIT_STD = 0.02   # transformers `initializer_range`


def dtype_of(name: str):
    return jnp.dtype(name)


class Linear(nn.Module):
    """y = einsum(eq, x, kernel) (+ bias). Kernel and bias carry logical axis names."""
    eq: str
    kernel_shape: tuple
    kernel_axes: tuple
    bias_shape: Optional[tuple] = None
    bias_axes: Optional[tuple] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), self.kernel_axes),
                            self.kernel_shape, self.param_dtype)
        y = jnp.einsum(self.eq, x.astype(self.dtype), kernel.astype(self.dtype))
        if self.bias_shape is not None:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes),
                              self.bias_shape, self.param_dtype)
            y = checkpoint_name(y + _bias_like(self.eq, bias.astype(self.dtype)), BIASED_PROJECTION)
        return y


def _bias_like(eq: str, bias):
    """bias over the kernel's output axes, in their kernel order, placed on those axes of the output of
    einsum `eq` (size 1 elsewhere): an output that puts other axes between or before them (a head-major
    "bpe,ekhd->kbhpd") broadcasts the bias right."""
    x_spec, rest = eq.replace(" ", "").split(",")
    k_spec, out = rest.split("->")
    b_spec = "".join(c for c in k_spec if c not in x_spec)
    if b_spec == out[-len(b_spec):]:
        return bias
    o_spec = "".join(c for c in out if c in b_spec)
    ordered = jnp.einsum(f"{b_spec}->{o_spec}", bias)
    return ordered.reshape([ordered.shape[o_spec.index(c)] if c in b_spec else 1 for c in out])


class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * xf.astype(x.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm (biased variance) computed in fp32, output in x.dtype."""
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,),
                          self.param_dtype)
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(x.dtype)


# layer stacking

# "minimal" saves only tensors tagged with these checkpoint names: rotated k / v (vision: the fused qkv
# output) and the attention output, so the backward pass recomputes norms, MLPs and q projections.
CHECKPOINT_NAMES = ("qkv", "attn_out")


# Name of a Linear's output with its bias added. The policies that save projections ("dots*") save it
# too: the backward pass then reads the biased output and never needs the bare product, so the bias add
# fuses into the projection instead of running (and being re-run in the backward pass) as a separate
# pass over the output. Same memory: one tensor of the same shape instead of the other.
BIASED_PROJECTION = "biased_projection"


# Primitives of the fused attention kernels: Pallas (block_sparse, splash on TPU) and cuDNN. Their outputs
# include the softmax statistics (logsumexp) the backward kernels read: a policy that saves only the
# attention output still re-runs the forward kernel in the backward pass to get them.
ATTENTION_KERNEL_PRIMITIVES = ("pallas_call", "dot_product_attention_fwd")


def _attention_kernel_saveable(prim, *_, **__) -> bool:
    return prim.name in ATTENTION_KERNEL_PRIMITIVES


def remat_policy(name: str) -> Optional[Callable]:
    """cfg.remat_policy -> jax.checkpoint policy ("none" -> None: stack_layers then skips nn.remat).

    "dots_attention" saves every projection output (matmuls without batch dimensions: q/k/v, o, the MLP's;
    with its bias added where it has one: BIASED_PROJECTION)
    and the attention kernels' outputs, so the backward pass recomputes only norms, activations and rotary
    embeddings: no matmul and no attention kernel runs twice. With attention_impl "xla" the attention
    itself (batched matmuls) is still recomputed; its [T, S] scores are never kept."""
    cp = jax.checkpoint_policies
    biased = cp.save_only_these_names(BIASED_PROJECTION)

    def with_biased(policy):
        return cp.save_from_both_policies(policy, biased)

    return {
        "none": None,
        "full": cp.nothing_saveable,
        "dots": with_biased(cp.dots_saveable),
        "dots_with_no_batch_dims": with_biased(cp.dots_with_no_batch_dims_saveable),
        "dots_attention": with_biased(cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable,
                                                                 _attention_kernel_saveable)),
        "minimal": cp.save_only_these_names(*CHECKPOINT_NAMES),
    }[name]


def checkpoint_name(x, name: str):
    return ad_checkpoint.checkpoint_name(x, name)


def stack_layers(block_cls, cfg: ModelConfig, length: int, name: str, carry, broadcast, scanned=None, **block_kw):
    """Runs `length` copies of `block_cls(cfg)` over `carry` inside the calling compact module.

    block_cls.__call__(carry, broadcast, scanned_slice) -> (carry, ys). `broadcast` goes to every layer;
    `scanned` (pytree with leading axis L, or None) is sliced per layer; the ys are stacked on axis 0.
    block_kw: extra static fields of block_cls.
    scan_layers=True: nn.scan named `name` (params stacked [L, ...], logical axis "layers").
    scan_layers=False: a python loop over submodules `{name}_{i}` (model.py unstacks the stacked tree).
    """
    block = block_cls
    if cfg.remat_policy != "none":
        block = nn.remat(block_cls, policy=remat_policy(cfg.remat_policy), prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        scan = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast if scanned is None else 0), length=length,
                       metadata_params={nn.PARTITION_NAME: "layers"})
        return scan(cfg, name=name, **block_kw)(carry, broadcast, scanned)
    ys = []
    for i in range(length):
        sl = None if scanned is None else jax.tree_util.tree_map(lambda a: a[i], scanned)
        carry, y = block(cfg, name=f"{name}_{i}", **block_kw)(carry, broadcast, sl)
        ys.append(y)
    stacked = None if ys[0] is None else jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ys)
    return carry, stacked
