"""Train state, chunked next-token loss and the sharded, jitted train step.

Loss: next-token cross entropy over the packed batch (``targets`` / ``loss_mask`` are already
segment-aware: the packer never asks a token to predict the next sample), averaged over supervised
tokens of the whole global batch, plus optional z-loss ``z_loss * mean(logsumexp^2)``.
The [B, S, V] logits never exist: the sequence is cut into chunks of ``loss_chunk`` positions and a
``lax.scan`` computes, per chunk, logits [B, c, V] (fp32 accumulation), their logsumexp and the
target logit; the chunk body is ``jax.checkpoint``-ed so the backward recomputes one chunk's logits
at a time instead of keeping them. Peak extra memory: about 3 x B x c x V x 4 bytes.

Precision: master weights stay in ``cfg.param_dtype`` (fp32); the loss casts floating params to
``cfg.dtype`` (bf16 for real runs) before the forward, so gradients come back in fp32 through the cast.

Step: grads w.r.t. the trainable params only (`optim.split_params`), accumulated over
``microbatches`` with a scan, then global-norm clipped; if the loss or the grad norm is not finite the
update is skipped (params and optimizer state unchanged) and counted in ``skipped_steps`` /
``consecutive_skips``. ``make_train_step`` returns ``jax.jit(step, in_shardings, out_shardings,
donate_argnums=0)``; it works with concrete arrays and with abstract ShapeDtypeStruct inputs
(``.lower(abstract_state, abstract_batch)`` for AOT compilation).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwen2vl_jax.model import attention, model
from qwen2vl_jax.train import optim, sharding
from qwen2vl_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class StepConfig:
    trainable: tuple[str, ...] = ("vision_tower", "merger", "llm")   # see optim.PARTS
    microbatches: int = 1           # gradient accumulation steps per optimizer step
    z_loss: float = 0.0             # weight of mean(logsumexp^2)
    loss_chunk: int = 512           # sequence positions per loss chunk (largest divisor of S <= this)
    max_consecutive_skips: int = 5  # checked by the training loop
    optim: optim.OptimConfig = optim.OptimConfig()


class TrainState(NamedTuple):
    step: jax.Array               # int32 [], optimizer steps attempted (= batches consumed)
    params: dict                  # full param tree, master dtype
    opt_state: Any                # optimizer state of the trainable params only
    skipped_steps: jax.Array      # int32 [], total non-finite steps skipped
    consecutive_skips: jax.Array  # int32 [], non-finite steps in a row (0 after a good one)


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------------
# loss

def _chunk_size(seq_len: int, target: int) -> int:
    c = max(1, min(seq_len, target))
    while seq_len % c:
        c -= 1
    return c


def chunked_cross_entropy(hidden: jax.Array, w: jax.Array, targets: jax.Array, mask: jax.Array,
                          chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """hidden [B,S,D], w [D,V], targets int [B,S], mask [B,S] ->
    (sum of masked NLL, sum of masked logsumexp^2, number of supervised tokens), all fp32 scalars."""
    b, s, d = hidden.shape
    c = _chunk_size(s, chunk)
    nc = s // c
    h = hidden.reshape(b, nc, c, d).swapaxes(0, 1)                 # [nc, B, c, D]
    t = targets.reshape(b, nc, c).swapaxes(0, 1)                   # [nc, B, c]
    m = mask.astype(jnp.float32).reshape(b, nc, c).swapaxes(0, 1)  # [nc, B, c]

    @jax.checkpoint
    def chunk_terms(h_c, t_c, m_c, w):
        logits = jnp.einsum("bcd,dv->bcv", h_c, w, preferred_element_type=jnp.float32)  # [B, c, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, t_c[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return jnp.sum((lse - tgt) * m_c), jnp.sum(jnp.square(lse) * m_c)

    def body(carry, xs):
        nll, z = chunk_terms(*xs, w)
        return (carry[0] + nll, carry[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (nll_sum, z_sum), _ = jax.lax.scan(body, (zero, zero), (h, t, m))
    return nll_sum, z_sum, jnp.sum(m)


def _cast_floats(tree: Any, dtype) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def loss_terms(cfg: ModelConfig, params: dict, batch: Mapping[str, jax.Array], step_cfg: StepConfig,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """(objective sum to differentiate, (nll_sum, z_sum, n_tokens)) for one (micro)batch."""
    p = _cast_floats(params, jnp.dtype(cfg.dtype))
    hidden = model.forward_hidden(cfg, p, dict(batch))            # [B, S, D]
    w = model.output_embedding(cfg, p)                             # [D, V]
    nll, z, n = chunked_cross_entropy(hidden, w, batch["targets"], batch["loss_mask"], step_cfg.loss_chunk)
    return nll + step_cfg.z_loss * z, (nll, z, n)


def _split_microbatches(batch: Mapping[str, jax.Array], m: int, mesh: Mesh | None) -> dict:
    """[B, ...] -> [m, B/m, ...]; microbatch i takes rows i, i+m, ... so each data shard holds part of
    every microbatch."""
    out = {}
    for k, x in batch.items():
        if x.shape[0] % m:
            raise ValueError(f"batch size {x.shape[0]} not divisible by microbatches={m}")
        y = x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)
        if mesh is not None:
            axes = sharding.BATCH_AXES.get(k, ("batch",) + (None,) * (x.ndim - 1))
            y = sharding.with_logical_constraint(y, (None,) + tuple(axes), mesh)
        out[k] = y
    return out


def loss_and_grads(cfg: ModelConfig, params: dict, batch: Mapping[str, jax.Array], step_cfg: StepConfig,
                   mesh: Mesh | None = None) -> tuple[dict, dict]:
    """(metrics {loss, z_loss, tokens}, grads of the mean loss w.r.t. the trainable params)."""
    trainable, frozen = optim.split_params(params, step_cfg.trainable)
    frozen = jax.lax.stop_gradient(frozen)

    def objective(tr, mb):
        return loss_terms(cfg, optim.merge_params(tr, frozen), mb, step_cfg)

    grad_fn = jax.grad(objective, has_aux=True)
    m = step_cfg.microbatches
    if m < 1:
        raise ValueError(f"microbatches={m} must be >= 1")
    if m == 1:
        grads, (nll, z, n) = grad_fn(trainable, batch)
    else:
        mbs = _split_microbatches(batch, m, mesh)

        def body(carry, mb):
            g_acc, nll_acc, z_acc, n_acc = carry
            g, (nll, z, n) = grad_fn(trainable, mb)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, nll_acc + nll, z_acc + z, n_acc + n), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
        zero = jnp.zeros((), jnp.float32)
        (grads, nll, z, n), _ = jax.lax.scan(body, (zeros, zero, zero, zero), mbs)
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, trainable)
    return {"loss": nll / denom, "z_loss": z / denom, "tokens": n}, grads


# ----------------------------------------------------------------------------------------------
# state

def init_params_and_state(cfg: ModelConfig, step_cfg: StepConfig, rng: jax.Array) -> TrainState:
    params = model.init_params(cfg, rng)
    return state_from_params(params, step_cfg)


def state_from_params(params: dict, step_cfg: StepConfig) -> TrainState:
    trainable, _ = optim.split_params(params, step_cfg.trainable)
    opt_state = optim.make_optimizer(step_cfg.optim).init(trainable)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=opt_state, skipped_steps=zero, consecutive_skips=zero)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules=sharding.LOGICAL_RULES) -> dict:
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    return sharding.tree_shardings(model.param_logical_axes(cfg), shapes, mesh, rules)


def abstract_state(cfg: ModelConfig, step_cfg: StepConfig, mesh: Mesh, rules=sharding.LOGICAL_RULES) -> tuple[TrainState, TrainState]:
    """(ShapeDtypeStruct state with shardings, state shardings) without allocating anything."""
    shapes = jax.eval_shape(lambda: init_params_and_state(cfg, step_cfg, jax.random.key(0)))
    p_sh = param_shardings(cfg, mesh, rules)
    tr_shapes, _ = optim.split_params(shapes.params, step_cfg.trainable)
    tr_sh, _ = optim.split_params(p_sh, step_cfg.trainable)
    rep = sharding.replicated(mesh)
    shardings = TrainState(step=rep, params=p_sh,
                           opt_state=sharding.state_like_shardings(shapes.opt_state, tr_shapes, tr_sh, mesh),
                           skipped_steps=rep, consecutive_skips=rep)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return abstract, shardings


def init_state(cfg: ModelConfig, step_cfg: StepConfig, rng: jax.Array, mesh: Mesh) -> TrainState:
    """A freshly initialised state, created directly in its sharded layout."""
    _, shardings = abstract_state(cfg, step_cfg, mesh)
    return jax.jit(lambda r: init_params_and_state(cfg, step_cfg, r), out_shardings=shardings)(rng)


def place_params(params: dict, step_cfg: StepConfig, shardings: TrainState) -> TrainState:
    """A fresh state (new optimizer state, step 0) from given params (previous stage / HF checkpoint)."""
    fn = jax.jit(lambda p: state_from_params(p, step_cfg), out_shardings=shardings)
    return fn(jax.device_put(params, shardings.params))


# ----------------------------------------------------------------------------------------------
# step

def batch_spec(cfg: ModelConfig, batch_size: int, seq_len: int, max_patches: int) -> dict:
    """ShapeDtypeStructs of a packed batch (docs/architecture.md contract)."""
    i32, f32 = jnp.int32, jnp.float32
    b, s, p = batch_size, seq_len, max_patches
    return {
        "input_ids": jax.ShapeDtypeStruct((b, s), i32),
        "targets": jax.ShapeDtypeStruct((b, s), i32),
        "loss_mask": jax.ShapeDtypeStruct((b, s), f32),
        "segment_ids": jax.ShapeDtypeStruct((b, s), i32),
        "positions": jax.ShapeDtypeStruct((b, 3, s), i32),
        "pixel_values": jax.ShapeDtypeStruct((b, p, cfg.vision.patch_dim), f32),
        "patch_segment_ids": jax.ShapeDtypeStruct((b, p), i32),
        "patch_positions": jax.ShapeDtypeStruct((b, p, 2), i32),
    }


def train_step_fn(cfg: ModelConfig, step_cfg: StepConfig, mesh: Mesh | None = None
                  ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The un-jitted step: (state, batch) -> (state, metrics)."""
    optimizer = optim.make_optimizer(step_cfg.optim)
    lr_fn = optim.schedule(step_cfg.optim)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # The mesh must be visible while tracing: the splash (Mosaic) kernel cannot be partitioned by XLA
        # and runs under shard_map on it (attention.py); without a mesh this is a no-op.
        with contextlib.ExitStack() as stack:
            if mesh is not None:
                stack.enter_context(attention.mesh_context(mesh))
            metrics, grads = loss_and_grads(cfg, state.params, batch, step_cfg, mesh)
        gnorm = _global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["z_loss"]) & jnp.isfinite(gnorm)
        clip = step_cfg.optim.grad_clip
        if clip > 0:
            scale = jnp.minimum(1.0, clip / jnp.maximum(gnorm, 1e-12))
            grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
        trainable, frozen = optim.split_params(state.params, step_cfg.trainable)
        updates, new_opt = optimizer.update(grads, state.opt_state, trainable)
        new_tr = optax.apply_updates(trainable, updates)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_tr = jax.tree.map(keep, new_tr, trainable)
        new_opt = jax.tree.map(keep, new_opt, state.opt_state)
        applied = state.step - state.skipped_steps           # optimizer updates applied so far
        skipped = (~finite).astype(jnp.int32)
        new_state = TrainState(
            step=state.step + 1,
            params=optim.merge_params(new_tr, frozen),
            opt_state=new_opt,
            skipped_steps=state.skipped_steps + skipped,
            consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1).astype(jnp.int32))
        metrics = {**metrics, "grad_norm": gnorm, "lr": lr_fn(applied), "finite": finite,
                   "skipped_steps": new_state.skipped_steps, "consecutive_skips": new_state.consecutive_skips}
        return new_state, metrics

    return step


def make_train_step(cfg: ModelConfig, step_cfg: StepConfig, mesh: Mesh, state_shardings: TrainState,
                    batch_shardings: Mapping[str, NamedSharding]):
    """jax.jit of the step with explicit in/out shardings; the state argument is donated.
    Usable with concrete arrays or, for AOT, `.lower(abstract_state, abstract_batch)`."""
    step = train_step_fn(cfg, step_cfg, mesh)
    rep = NamedSharding(mesh, P())
    metric_sh = {k: rep for k in ("loss", "z_loss", "tokens", "grad_norm", "lr", "finite",
                                  "skipped_steps", "consecutive_skips")}
    return jax.jit(step, in_shardings=(state_shardings, dict(batch_shardings)),
                   out_shardings=(state_shardings, metric_sh), donate_argnums=(0,))


def host_metrics(metrics: Mapping[str, jax.Array]) -> dict:
    """Device metrics -> python scalars (blocks)."""
    return {k: np.asarray(jax.device_get(v)).item() for k, v in metrics.items()}
