"""Train state, chunked next-token loss and the sharded, jitted train step.

Loss: next-token cross entropy over the packed batch (``targets`` / ``loss_mask`` are already
segment-aware: the packer never asks a token to predict the next sample), averaged over supervised
tokens of the whole global batch, plus optional z-loss ``z_loss * mean(logsumexp^2)``.
The [B, S, V] logits never exist: the sequence is cut into chunks of ``loss_chunk`` positions and a
``lax.scan`` computes, per chunk, logits [B, c, V] (fp32 accumulation), their logsumexp and the
target logit; a custom VJP keeps only the logsumexp [B, S] and recomputes one chunk's logits at a time
in the backward. Peak extra memory: about 3 x B x c x V x 4 bytes, plus (on a mesh) the gathered output
embedding [D, V/tensor] in the compute dtype and its fp32 gradient: the loss runs under shard_map so the
embedding is gathered once per (micro)batch and its gradient reduced once, not once per chunk.

Precision: master weights stay in ``cfg.param_dtype`` (fp32); the loss casts floating params to
``cfg.dtype`` (bf16 for real runs) before the forward, so gradients come back in fp32 through the cast.
The loss's backward casts dlogits to that compute dtype for its two matmuls (fp32 accumulation), like
every other matmul's backward in the model.

Step: grads w.r.t. the trainable params only (`optim.split_params`), accumulated over
``microbatches`` with a scan, then global-norm clipped; if the loss or the grad norm is not finite the
update is skipped (params and optimizer state unchanged) and counted in ``skipped_steps`` /
``consecutive_skips``. A state that already has ``max_consecutive_skips`` skips in a row is halted: the
step returns it unchanged (its step counter too), so a training loop that dispatches the next step before
it reads the previous step's metrics still holds, after that next step, exactly the state it must save
when it stops. ``make_train_step`` returns ``jax.jit(step, in_shardings, out_shardings,
donate_argnums=0)``; it works with concrete arrays and with abstract ShapeDtypeStruct inputs
(``.lower(abstract_state, abstract_batch)`` for AOT compilation).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwen2vl_jax.model import attention, model, partitioning
from qwen2vl_jax.train import optim, sharding
from qwen2vl_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class StepConfig:
    trainable: tuple[str, ...] = ("vision_tower", "merger", "llm")   # see optim.PARTS
    microbatches: int = 1           # gradient accumulation steps per optimizer step
    z_loss: float = 0.0             # weight of mean(logsumexp^2)
    loss_chunk: int = 512           # sequence positions per loss chunk (largest divisor of S <= this)
    max_consecutive_skips: int = 5  # the loop stops there; the step halts (leaves the state unchanged)
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


@dataclasses.dataclass(frozen=True)
class LossAxes:
    """Mesh axes the loss's arrays are split over inside its shard_map (empty: one device)."""
    tokens: tuple[str, ...] = ()   # rows and sequence positions of hidden / targets / mask
    embed: tuple[str, ...] = ()    # the output embedding's D dimension (gathered once, its gradient scattered)
    vocab: tuple[str, ...] = ()    # the output embedding's V dimension (each shard holds V/n logits)

    @classmethod
    def for_mesh(cls, mesh: Mesh, hidden_shape, w_shape,
                 rules=sharding.LOGICAL_RULES) -> tuple["LossAxes", P, P, P]:
        """(axes, hidden spec, w spec, targets/mask spec) from the logical rules."""
        def flat(entry):
            return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        h_spec = sharding.logical_to_spec(("batch", "length", None), hidden_shape, mesh, rules)
        w_spec = sharding.logical_to_spec(("embed", "vocab"), w_shape, mesh, rules)
        return (cls(tokens=flat(h_spec[0]) + flat(h_spec[1]), embed=flat(w_spec[0]), vocab=flat(w_spec[1])),
                h_spec, w_spec, P(h_spec[0], h_spec[1]))


def chunked_cross_entropy(hidden: jax.Array, w: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int,
                          mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """hidden [B,S,D], w [D,V] (any float dtype: the matmuls run in hidden's dtype, w's gradient comes back
    in w's dtype), targets int [B,S], mask [B,S] -> (sum of masked NLL, sum of masked logsumexp^2,
    number of supervised tokens), all fp32 scalars.

    With a multi-device `mesh` the loss runs under shard_map: each device takes its rows (and sequence
    shard) of hidden / targets / mask and its shard of w; w's D shards are gathered ONCE (not once per
    chunk, which is what XLA's partitioner does with a sharded w inside the chunk loop), its gradient is
    accumulated in fp32 over the chunks and reduce-scattered once, and a vocab-sharded w ("tensor") gives
    each device V/n logits per chunk, with the logsumexp and the target logit combined across the vocab
    shards ([B, c] values per chunk)."""
    if mesh is None or mesh.size == 1:
        return _local_cross_entropy(hidden, w, targets, mask, chunk, LossAxes())
    axes, h_spec, w_spec, t_spec = LossAxes.for_mesh(mesh, hidden.shape, w.shape)
    fn = jax.shard_map(functools.partial(_local_cross_entropy, chunk=chunk, axes=axes), mesh=mesh,
                       in_specs=(h_spec, w_spec, t_spec, t_spec), out_specs=(P(), P(), P()),
                       # replication checks off: the custom VJP below states its own collectives; shard_map's
                       # transpose then sums each input's cotangent over the axes its spec does not name
                       # (w: the pure data-parallel axes; hidden: the vocab axes)
                       check_vma=False)
    return fn(hidden, w, targets, mask)


def _local_cross_entropy(h, w, t, m, chunk: int, axes: LossAxes):
    m = m.astype(jnp.float32)
    nll, z = _ce_sums(h, w, t, m, chunk, axes)
    n = jnp.sum(m)
    if axes.tokens:
        nll, z, n = jax.lax.psum((nll, z, n), axes.tokens)
    return nll, z, n


def _chunked(x: jax.Array, chunk: int) -> jax.Array:
    """[B, S, ...] -> [S/c, B, c, ...] with c = _chunk_size(S, chunk)."""
    b, s = x.shape[:2]
    c = _chunk_size(s, chunk)
    return x.reshape(b, s // c, c, *x.shape[2:]).swapaxes(0, 1)


def _vocab_offset(v_local: int, axes: LossAxes):
    """Global vocab index of this device's first logit."""
    return jax.lax.axis_index(axes.vocab) * v_local if axes.vocab else 0


def _logsumexp(logits: jax.Array, axes: LossAxes) -> jax.Array:
    """[B, c, V_local] fp32 -> [B, c] logsumexp over the whole vocab (max-shifted, as jax.nn.logsumexp)."""
    mx = jnp.max(logits, axis=-1)
    if axes.vocab:
        mx = jax.lax.pmax(mx, axes.vocab)
    s = jnp.sum(jnp.exp(logits - mx[..., None]), axis=-1)
    if axes.vocab:
        s = jax.lax.psum(s, axes.vocab)
    return mx + jnp.log(s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ce_sums(h, w, t, m, chunk: int, axes: LossAxes):
    """This device's (sum of masked NLL, sum of masked lse^2) over its rows; w gathered over axes.embed."""
    return _ce_fwd(h, w, t, m, chunk, axes)[0]


def _ce_fwd(h, w, t, m, chunk, axes):
    wf = w.astype(h.dtype)
    if axes.embed:
        wf = jax.lax.all_gather(wf, axes.embed, axis=0, tiled=True)          # [D, V_local], once
    v0 = _vocab_offset(wf.shape[1], axes)

    def body(carry, xs):
        h_c, t_c, m_c = xs                                                   # [B, c, D], [B, c], [B, c]
        logits = jnp.einsum("bcd,dv->bcv", h_c, wf, preferred_element_type=jnp.float32)   # [B, c, V_local]
        lse = _logsumexp(logits, axes)
        local = t_c.astype(jnp.int32) - v0
        mine = (local >= 0) & (local < logits.shape[-1])
        tgt = jnp.take_along_axis(logits, jnp.clip(local, 0, logits.shape[-1] - 1)[..., None], axis=-1)[..., 0]
        tgt = jnp.where(mine, tgt, 0.0)
        if axes.vocab:
            tgt = jax.lax.psum(tgt, axes.vocab)
        return (carry[0] + jnp.sum((lse - tgt) * m_c), carry[1] + jnp.sum(jnp.square(lse) * m_c)), lse

    zero = jnp.zeros((), jnp.float32)
    (nll, z), lse = jax.lax.scan(body, (zero, zero), (_chunked(h, chunk), _chunked(t, chunk), _chunked(m, chunk)))
    return (nll, z), (h, wf, t, m, lse, jnp.zeros((), w.dtype))


def _ce_bwd(chunk, axes, res, g):
    """Recomputes each chunk's logits: dlogits = m * (softmax * (g_nll + 2 g_z lse) - g_nll * onehot(target)),
    cast to the compute dtype for the two matmuls (dh, dW) with fp32 accumulation; dW summed over the
    chunks in an fp32 carry and reduce-scattered over axes.embed once."""
    h, wf, t, m, lse, w_like = res
    g_nll, g_z = g
    if axes.vocab:      # every vocab shard's sums depend on this shard's logits (through the lse / target psums)
        g_nll, g_z = jax.lax.psum((g_nll, g_z), axes.vocab)
    v0 = _vocab_offset(wf.shape[1], axes)

    def body(dw, xs):
        h_c, t_c, m_c, lse_c = xs
        logits = jnp.einsum("bcd,dv->bcv", h_c, wf, preferred_element_type=jnp.float32)
        p = jnp.exp(logits - lse_c[..., None])
        local = t_c.astype(jnp.int32) - v0
        onehot = jnp.arange(logits.shape[-1], dtype=jnp.int32) == local[..., None]
        dl = p * ((g_nll + 2.0 * g_z * lse_c) * m_c)[..., None] - jnp.where(onehot, (g_nll * m_c)[..., None], 0.0)
        dl = dl.astype(h.dtype)
        dh_c = jnp.einsum("bcv,dv->bcd", dl, wf, preferred_element_type=jnp.float32).astype(h.dtype)
        return dw + jnp.einsum("bcd,bcv->dv", h_c, dl, preferred_element_type=jnp.float32), dh_c

    dw0 = jnp.zeros(wf.shape, jnp.float32)
    dw, dh = jax.lax.scan(body, dw0, (_chunked(h, chunk), _chunked(t, chunk), _chunked(m, chunk), lse))
    dh = dh.swapaxes(0, 1).reshape(h.shape)
    if axes.embed:
        dw = jax.lax.psum_scatter(dw, axes.embed, scatter_dimension=0, tiled=True)
    return dh, dw.astype(w_like.dtype), None, None


_ce_sums.defvjp(_ce_fwd, _ce_bwd)


def _cast_floats(tree: Any, dtype) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def loss_terms(cfg: ModelConfig, params: dict, batch: Mapping[str, jax.Array], step_cfg: StepConfig,
               mesh: Mesh | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """(objective sum to differentiate, (nll_sum, z_sum, n_tokens)) for one (micro)batch; the loss runs
    under shard_map on `mesh` (chunked_cross_entropy)."""
    p = _cast_floats(params, jnp.dtype(cfg.dtype))
    hidden = model.forward_hidden(cfg, p, dict(batch))            # [B, S, D]
    # the master (fp32) output embedding: the loss casts it to the compute dtype before gathering it, and
    # reduces its gradient across devices in fp32
    w = model.output_embedding(cfg, params)                        # [D, V]
    nll, z, n = chunked_cross_entropy(hidden, w, batch["targets"], batch["loss_mask"], step_cfg.loss_chunk, mesh)
    return nll + step_cfg.z_loss * z, (nll, z, n)


def microbatch_counts(batch_size: int, batch_shards: int) -> list[int]:
    """Microbatch counts m, ascending, that divide `batch_size` with a per-device batch: batch_size / m rows
    divisible by the `batch_shards` devices the batch is split over (mesh dcn x data x fsdp)."""
    return [m for m in range(1, batch_size + 1)
            if batch_size % m == 0 and (batch_size // m) % batch_shards == 0]


def _split_microbatches(batch: Mapping[str, jax.Array], m: int, mesh: Mesh | None) -> dict:
    """[B, ...] -> [m, B/m, ...]; microbatch i takes rows i, i+m, ... so each data shard holds part of
    every microbatch."""
    out = {}
    shards = math.prod(mesh.shape.get(a, 1) for a in dict(partitioning.LOGICAL_RULES)["batch"]) if mesh is not None else 1
    for k, x in batch.items():
        if x.shape[0] % m:
            raise ValueError(f"batch size {x.shape[0]} not divisible by microbatches={m}")
        if x.shape[0] % shards == 0 and (x.shape[0] // m) % shards:
            # a microbatch that does not split into whole rows per device would be replicated over the mesh
            valid = microbatch_counts(x.shape[0], shards)
            raise ValueError(f"microbatches={m} leaves {x.shape[0] // m} rows per microbatch for {shards} batch "
                             f"shards (mesh dcn x data x fsdp); valid: {valid}")
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
        return loss_terms(cfg, optim.merge_params(tr, frozen), mb, step_cfg, mesh)

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
        "pixel_values": jax.ShapeDtypeStruct((b, p, cfg.vision.patch_dim), jnp.uint8),   # raw: normalised on device
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
        halted = state.consecutive_skips >= step_cfg.max_consecutive_skips
        apply = finite & ~halted
        clip = step_cfg.optim.grad_clip
        if clip > 0:
            scale = jnp.minimum(1.0, clip / jnp.maximum(gnorm, 1e-12))
            grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
        trainable, frozen = optim.split_params(state.params, step_cfg.trainable)
        updates, new_opt = optimizer.update(grads, state.opt_state, trainable)
        new_tr = optax.apply_updates(trainable, updates)
        keep = lambda new, old: jnp.where(apply, new, old)  # noqa: E731
        new_tr = jax.tree.map(keep, new_tr, trainable)
        new_opt = jax.tree.map(keep, new_opt, state.opt_state)
        applied = state.step - state.skipped_steps           # optimizer updates applied so far
        counted = (~halted).astype(jnp.int32)                 # a halted step counts nothing
        new_state = TrainState(
            step=state.step + counted,
            params=optim.merge_params(new_tr, frozen),
            opt_state=new_opt,
            skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32) * counted,
            consecutive_skips=jnp.where(halted, state.consecutive_skips,
                                        jnp.where(finite, 0, state.consecutive_skips + 1)).astype(jnp.int32))
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
