"""Per-device memory estimate of a training step, computed before anything is allocated.

Everything is derived from shapes only (`jax.eval_shape` of `model.init_params`) and the mesh:

  params      sum over leaves of bytes(shard_shape(leaf)) in `cfg.param_dtype`, where the shard shape
              comes from the leaf's NamedSharding (sharding.tree_shardings + LOGICAL_RULES), so each
              leaf is divided by exactly the mesh axes that split it.
  optimizer   AdamW m and v (optax keeps them in the param dtype) for the TRAINABLE leaves of the
              stage only (optim.STAGE_TRAINABLE; frozen leaves get no state), sharded like the params.
              Step counters (a few int32 scalars) are ignored.
  gradients   one gradient per trainable leaf, param dtype, sharded like the params; with gradient
              accumulation (grad_accum > 1) a second buffer holds the running sum.
  activations the residual stream kept for the backward pass plus a one-layer working set:

      T = tokens per device per micro-batch  = (batch / batch_shards) * seq_len / sequence_shards
      Pn = patches per device per micro-batch = (batch / batch_shards) * max_patches / sequence_shards
      c  = bytes of cfg.dtype (compute), t = tensor shards (heads / mlp split), L = layers

      saved(layer) elements per token, by remat policy (q = Hq*hd, kv = Hkv*hd, I = MLP width,
      mlp_vals = 4*I for the gated SwiGLU (gate, up, silu(gate), product), 2*M for the ViT fc1 MLP):
        none                     6*D + (2*q + 3*kv + attn_out=q + mlp_vals) / t
                                 (x, norm1, q, k, v, roped q/k, attention out, o_proj out, x2, norm2,
                                  MLP intermediates, down out)
        dots, dots_with_no_batch_dims
                                 D + (q + 2*kv + 2*I_dots) / t + 2*D   (layer input; outputs of
                                  q/k/v, o, gate/up (or fc1), down projections)
        dots_attention           dots + q / t                          (and the attention kernel's output)
        minimal                  D + (q + 2*kv + q) / t                (layer input, q/k/v and the
                                  attention output: decoder.CHECKPOINT_NAMES)
        full                     D                                     (layer input only)
      with `attention_impl == "xla"` (materialised scores) and a policy that keeps them (none/dots),
      the fp32 softmax output adds heads/t * row_length * 4 bytes per token.

      decoder  = L_dec * T * saved_dec * c
      vision   = L_vis * Pn * saved_vis * c   if the vision tower is trainable, else 0 (a frozen
                 tower needs no backward: only its forward working set, counted below)
      working  = 2 * max(one decoder layer at policy none, one ViT layer at policy none)
                 (the layer being recomputed/differentiated, and its cotangents)
      loss     = T * D * c (final hidden) + 3 * rows * loss_chunk * min(vocab_chunk, V) / t * 4
                 (train.chunked_cross_entropy: one checkpointed chunk of loss_chunk positions, its fp32
                 logits, softmax and gradient; the loss never materialises [B, S, V])
      batch    = the packed batch arrays of this device (int32 ids/targets/segments/positions,
                 float32 loss mask and pixel rows)

    This is an upper-bound style estimate for "fails before allocating"; `launch.aot` gives XLA's
    exact numbers for a TPU topology.

`check_fits(estimate)` compares with the device's `memory_stats()["bytes_limit"]` (GPU/TPU) or with
the host's available RAM shared by all local CPU devices, and raises `InsufficientMemoryError` that
names what is needed and what there is.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import jax
import numpy as np

from qwen2vl_jax.model.config import REMAT_POLICIES, ModelConfig

GiB = 1024 ** 3
ALL_PARTS = ("vision_tower", "merger", "llm")


class InsufficientMemoryError(MemoryError):
    """The step does not fit: message names needed and available bytes."""


@dataclasses.dataclass(frozen=True)
class StepShape:
    """Shape of one micro-batch (global rows) and how the step is run."""
    batch_size: int            # global packed rows per micro-batch
    seq_len: int               # tokens per row (S)
    max_patches: int           # patch rows per row (P)
    grad_accum: int = 1
    loss_chunk: int = 512      # sequence positions per loss chunk (train.StepConfig.loss_chunk)
    vocab_chunk: int = 1 << 30  # vocabulary columns per chunk (the train step uses the full vocabulary)

    def __post_init__(self):
        for f in ("batch_size", "seq_len", "grad_accum", "loss_chunk", "vocab_chunk"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}={getattr(self, f)} must be >= 1")
        if self.max_patches < 0 or self.max_patches % 4:
            raise ValueError(f"max_patches={self.max_patches} must be a non-negative multiple of 4")


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device."""
    params: int
    optimizer: int
    gradients: int
    activations: int
    n_devices: int = 1
    detail: tuple[tuple[str, int], ...] = ()   # activation breakdown

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations

    def format(self) -> str:
        rows = [("params", self.params), ("optimizer (AdamW m, v)", self.optimizer),
                ("gradients", self.gradients), ("activations", self.activations),
                *[("  " + k, v) for k, v in self.detail], ("total", self.total)]
        return "\n".join(f"{k:<26}{v / GiB:10.3f} GiB" for k, v in rows)


# ---------------------------------------------------------------------------------------------
# state: params, optimizer, gradients

def abstract_params(cfg: ModelConfig) -> Any:
    """ShapeDtypeStruct tree of `model.init_params(cfg, rng)` (nothing allocated)."""
    from qwen2vl_jax.model import model
    return jax.eval_shape(lambda k: model.init_params(cfg, k), jax.ShapeDtypeStruct((2,), np.uint32))


def leaf_bytes(x: Any, sharding: Any = None) -> int:
    """Bytes of one device's shard of `x` (an array or ShapeDtypeStruct)."""
    shape = tuple(x.shape) if sharding is None else tuple(sharding.shard_shape(tuple(x.shape)))
    return math.prod(shape) * np.dtype(x.dtype).itemsize


def tree_bytes(tree: Any, shardings: Any = None) -> int:
    """Bytes per device of a tree; `shardings` is a matching tree of NamedShardings (None: unsharded)."""
    leaves = jax.tree.leaves(tree)
    if shardings is None:
        return sum(leaf_bytes(x) for x in leaves)
    shards = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    if len(shards) != len(leaves):
        raise ValueError(f"shardings tree has {len(shards)} leaves, params tree {len(leaves)}")
    return sum(leaf_bytes(x, s) for x, s in zip(leaves, shards))


def param_shardings(cfg: ModelConfig, abstract: Any, mesh: jax.sharding.Mesh | None) -> Any:
    if mesh is None:
        return None
    from qwen2vl_jax.model import model
    from qwen2vl_jax.train import sharding
    return sharding.tree_shardings(model.param_logical_axes(cfg), abstract, mesh)


def _trainable(tree: Any, parts: Sequence[str]) -> Any:
    from qwen2vl_jax.train.optim import split_params
    return split_params(tree, parts)[0]


# ---------------------------------------------------------------------------------------------
# activations

_POLICIES_KEEPING_SCORES = ("none", "dots")


def _layer_values(policy: str, d: int, q: int, kv: int, mlp_vals: int, mlp_dots: int, t: int) -> float:
    """Saved elements per token of one transformer block (formula in the module docstring)."""
    if policy == "none":
        return 6 * d + (2 * q + 3 * kv + q + mlp_vals) / t
    if policy in ("dots", "dots_with_no_batch_dims"):
        return d + (q + 2 * kv + mlp_dots) / t + 2 * d
    if policy == "dots_attention":
        return d + (q + 2 * kv + mlp_dots + q) / t + 2 * d
    if policy == "minimal":
        return d + (q + 2 * kv + q) / t
    if policy == "full":
        return d
    raise ValueError(f"remat_policy={policy!r}; valid: {', '.join(REMAT_POLICIES)}")


def _score_bytes(cfg: ModelConfig, policy: str, heads: int, row_len: int, t: int) -> float:
    """fp32 softmax probabilities per token kept by the XLA attention path."""
    if cfg.attention_impl != "xla" or policy not in _POLICIES_KEEPING_SCORES:
        return 0.0
    return heads / t * row_len * 4


def activation_bytes(cfg: ModelConfig, step: StepShape, parts: Sequence[str] = ALL_PARTS, *,
                     batch_shards: int = 1, tensor_shards: int = 1, sequence_shards: int = 1
                     ) -> tuple[int, tuple[tuple[str, int], ...]]:
    """(bytes per device, breakdown) for one micro-batch; formula in the module docstring."""
    c = np.dtype(cfg.dtype).itemsize
    t, pol, v = tensor_shards, cfg.remat_policy, cfg.vision
    rows = step.batch_size / batch_shards
    T = rows * step.seq_len / sequence_shards
    Pn = rows * step.max_patches / sequence_shards
    D, I = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    E, M = v.embed_dim, v.mlp_dim

    def dec(policy):
        return (T * _layer_values(policy, D, q, kv, 4 * I, 2 * I, t) * c
                + T * _score_bytes(cfg, policy, cfg.num_attention_heads, step.seq_len, t))

    def vis(policy):
        return (Pn * _layer_values(policy, E, E, E, 2 * M, M, t) * c
                + Pn * _score_bytes(cfg, policy, v.num_heads, step.max_patches, t))

    decoder = cfg.num_hidden_layers * dec(pol)
    vision = v.depth * vis(pol) if "vision_tower" in parts else 0.0
    working = 2 * max(dec("none"), vis("none"))
    merger = Pn * (E + 2 * 4 * E / t) * c + Pn / 4 * D * c
    chunk_rows = rows * min(step.loss_chunk, step.seq_len) / sequence_shards
    loss = T * D * c + 3 * chunk_rows * min(step.vocab_chunk, cfg.vocab_size) / t * 4
    batch = T * (4 * 4 + 3 * 4) + Pn * (v.patch_dim * 4 + 4 + 2 * 4)
    detail = (("decoder layers", decoder), ("vision layers", vision), ("merger", merger),
              ("layer working set", working), ("loss", loss), ("batch", batch))
    detail = tuple((k, int(math.ceil(b))) for k, b in detail)
    return sum(b for _, b in detail), detail


def _mesh_shards(cfg: ModelConfig, mesh: jax.sharding.Mesh | None, step: StepShape) -> dict[str, int]:
    """How the batch rows, heads/MLP and sequence are split, from the logical rules."""
    if mesh is None:
        return dict(batch_shards=1, tensor_shards=1, sequence_shards=1)
    from qwen2vl_jax.train import sharding

    def factor(logical: str, dim: int) -> int:
        spec = sharding.logical_to_spec((logical,), (dim,), mesh)[0]
        axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
        return math.prod(mesh.shape[a] for a in axes)

    return dict(batch_shards=factor("batch", step.batch_size),
                tensor_shards=factor("act_heads", cfg.num_attention_heads),
                sequence_shards=factor("length", step.seq_len))


# ---------------------------------------------------------------------------------------------

def estimate(cfg: ModelConfig, step: StepShape, mesh: jax.sharding.Mesh | None = None,
             parts: Sequence[str] = ALL_PARTS, abstract: Any = None) -> MemoryEstimate:
    """Per-device memory of a training step of `cfg` over `mesh` training `parts` (a stage's
    optim.STAGE_TRAINABLE entry). `abstract` (ShapeDtypeStruct params) defaults to eval_shape(init)."""
    abstract = abstract_params(cfg) if abstract is None else abstract
    shardings = param_shardings(cfg, abstract, mesh)
    params = tree_bytes(abstract, shardings)
    trainable = _trainable(abstract, parts)
    tr_shard = None if shardings is None else _trainable(shardings, parts)
    grads = tree_bytes(trainable, tr_shard)
    act, detail = activation_bytes(cfg, step, parts, **_mesh_shards(cfg, mesh, step))
    return MemoryEstimate(params=params, optimizer=2 * grads, gradients=grads * (2 if step.grad_accum > 1 else 1),
                          activations=act, n_devices=1 if mesh is None else mesh.size, detail=detail)


def available_bytes(devices: Sequence[jax.Device] | None = None) -> tuple[int, str]:
    """(bytes available per device, description). Accelerators: the allocator's bytes_limit minus
    bytes in use (smallest over `devices`); CPU: available host RAM split over the local CPU devices."""
    devices = list(jax.local_devices() if devices is None else devices)
    if devices[0].platform != "cpu":
        avail = []
        for d in devices:
            stats = d.memory_stats() or {}
            if "bytes_limit" in stats:
                avail.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
        if avail:
            return min(avail), f"{devices[0].device_kind} ({len(devices)} local devices)"
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return host // len(devices), f"host RAM {host / GiB:.1f} GiB available over {len(devices)} CPU devices"


def check_fits(est: MemoryEstimate, devices: Sequence[jax.Device] | None = None, what: str = "the step",
               available: int | None = None) -> None:
    """Raises InsufficientMemoryError if `est.total` exceeds the available bytes per device."""
    where = "given budget"
    if available is None:
        available, where = available_bytes(devices)
    if est.total > available:
        raise InsufficientMemoryError(
            f"{what} needs {est.total / GiB:.2f} GiB per device but {where} allows "
            f"{available / GiB:.2f} GiB per device.\n{est.format()}\n"
            "Use a bigger mesh (fsdp/tensor), a smaller batch, gradient accumulation or remat.")
