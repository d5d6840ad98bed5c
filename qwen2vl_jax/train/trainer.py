"""The training loop: an experiment config in; checkpoints, metrics and held-out losses out.

    summary = trainer.run(exp, evaluate=hook)

Per step: each process reads its own shard of the data (batch_size / process_count rows), the rows of all
processes form one global batch (sharding.global_batch), the jitted step updates the sharded state. The host
stays a step ahead: the next batch is read and copied to the devices while the device works, and a step's
metrics are read after the next step is dispatched (at evaluation, checkpoint and last steps the loop waits
for the step instead); the records and the stops are those of a loop that waits every step. Around the loop:
  - before anything is allocated, the per-device memory of the step is estimated (train.memory) and a
    model that does not fit stops with what it needs and what the machine has;
  - one run per run directory: RUN/run.lock (rundir.RunLock) stops a second run in the same folder at start; the
    lock of a run that was killed (kill -9 included, or its slice preempted) is taken over, saying so;
  - a restart resumes from the newest checkpoint that restores (params, optimizer, step, data-iterator
    state), setting aside a damaged newer one with its reason (checkpoint.Checkpointer.restore), and keeps
    the learning-rate schedule it was saved with when `steps` changed (other optimizer settings, or an
    explicit optim.total_steps, that differ from the checkpoint's are refused); losses.jsonl and
    heldout.jsonl are cut back to the resumed step, so each step appears once;
    a fresh run starts from `init_from` (a previous stage, a converted checkpoint or a Hugging Face folder;
    checkpoint.locate) or from the seed;
  - every `checkpoint.every` steps, at the end, on SIGTERM (preemption: save at the next step boundary and
    return) and on a non-finite stop, a checkpoint is saved; a state holding NaN/inf is never saved (the run
    stops with NonFiniteError instead); a disk that fills up stops the run with checkpoint.DiskFullError, one
    line naming the newest good checkpoint (a resume from it is exact);
  - `max_consecutive_skips` non-finite steps in a row save a checkpoint and raise NonFiniteError;
  - every `eval_every` steps and at the last step, `evaluate(params)` (a hook the caller builds, e.g.
    eval.evaluation.HeldoutEvaluator; train/ does not import eval/) is logged and appended to heldout.jsonl.

The run directory (its layout, RUN/run.lock, the run files read back): train/rundir.py.

Multi-host: train/distributed.py (launch.pretrain calls it before `run`).
"""
from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from typing import Any, Callable, NamedTuple, Protocol, TextIO

import jax
import numpy as np

from qwen2vl_jax.data.pipeline import DataConfig, make_iterator
from qwen2vl_jax.data.tokenizer import load_for
from qwen2vl_jax.model.config import ModelConfig, architecture_diff
from qwen2vl_jax.train import checkpoint, flops, memory, metrics, paths, rundir, sharding, train_step

EXIT_NON_FINITE = 3                      # exit status of a CLI whose run stopped on non-finite steps
EXIT_DISK_FULL = 6                       # ... whose disk filled up (checkpoint.DiskFullError; launch.tpu's 4, 5 differ)

EvalHook = Callable[[Any], dict]         # params -> {name: value}


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row (a checkpoint of the last finite state was saved), or a state
    holding NaN/inf reached a checkpoint save (not saved)."""


class TrainSpec(Protocol):
    """What `run` reads from an experiment config (experiments.stages.Experiment is one)."""
    name: str
    model: ModelConfig
    data: DataConfig
    mesh: sharding.MeshConfig
    checkpoint: checkpoint.CheckpointConfig
    batch_size: int
    microbatches: int
    loss_chunk: int
    trainable: tuple[str, ...]
    init_from: str
    seed: int
    tokenizer: str
    log_every: int
    eval_every: int
    num_steps: int
    run_dir: str
    checkpoint_dir: str

    def step_config(self) -> train_step.StepConfig: ...


# ----------------------------------------------------------------------------------------------
# the loop

def run(exp: TrainSpec, evaluate: EvalHook | None = None, stream: TextIO | None = None) -> dict:
    """Trains `exp` from its latest checkpoint (or from scratch / `init_from`) to `exp.num_steps`.

    Returns {"step": the last step, "start_step": the step this call started from (== step when there
    was nothing left to train), "num_steps", "losses": {step: loss} of the steps this call trained,
    "eval": {step: evaluate(params)}, "preempted", "skipped_steps", "checkpoint_dir"}.
    Raises rundir.WorkdirInUseError when another run holds exp.run_dir."""
    stream = stream or sys.stdout
    paths.makedirs(exp.run_dir)
    if jax.process_index() != 0:              # process 0 holds the lock for the whole job
        return _run(exp, evaluate, stream)
    with rundir.RunLock(exp.run_dir, log=lambda text: print(text, file=stream, flush=True)):
        return _run(exp, evaluate, stream)


def _run(exp: TrainSpec, evaluate: EvalHook | None, stream: TextIO) -> dict:
    cfg, step_cfg, n_steps = exp.model, exp.step_config(), exp.num_steps
    mesh = sharding.make_mesh(exp.mesh)
    check_memory(exp, mesh)
    pc, pi = jax.process_count(), jax.process_index()
    if exp.batch_size % pc:
        raise ValueError(f"batch_size={exp.batch_size} not divisible by {pc} processes")

    abstract, st_sh = train_step.abstract_state(cfg, step_cfg, mesh)
    b_sh = sharding.batch_shardings(train_step.batch_spec(cfg, exp.batch_size, exp.data.seq_len,
                                                          exp.data.max_patches), mesh)
    tokenizer = load_for(exp.tokenizer, cfg)
    if pi == 0:
        rundir.write_run_configs(exp)
    data = make_iterator(exp.data, cfg, tokenizer, batch_size=exp.batch_size // pc,
                         process_index=pi, process_count=pc, split="train")
    log = metrics.MetricsLogger(paths.join(exp.run_dir, "tensorboard"), stream)
    ckpt = checkpoint.Checkpointer(dataclasses.replace(exp.checkpoint, directory=exp.checkpoint_dir), log=log.message)
    try:
        state, step_cfg = _initial_state(exp, ckpt, data, abstract, st_sh, mesh, log)
    except BaseException:                          # a refused resume or init_from: release what was opened
        ckpt.close()
        data.close()
        log.close()
        raise
    start = step = int(jax.device_get(state.step))
    if pi == 0:
        for name in (rundir.LOSSES_FILE, rundir.HELDOUT_FILE):
            rundir.truncate_jsonl(paths.join(exp.run_dir, name), start, log.message)
    step_fn = train_step.make_train_step(cfg, step_cfg, mesh, st_sh, b_sh)

    preempted = {"flag": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.__setitem__("flag", True))
    loss_file = paths.JsonlLog(paths.join(exp.run_dir, rundir.LOSSES_FILE)) if pi == 0 else None
    eval_file = paths.JsonlLog(paths.join(exp.run_dir, rundir.HELDOUT_FILE)) if pi == 0 and evaluate else None
    device_kind, n_dev = jax.devices()[0].device_kind, jax.device_count()
    losses: dict[int, float] = {}
    evals: dict[int, dict] = {}
    window = _Window()
    ckpt_every, log_every = exp.checkpoint.every, exp.log_every    # the Checkpointer saves on ckpt_every

    def fetch():
        """The next local batch, the iterator state just after it, and the batch placed on the devices (the
        host-to-device copy runs while the device works on the step before)."""
        local = next(data)
        return local, data.get_state(), sharding.global_batch(local, b_sh)

    def finish(rec: _Dispatched) -> None:
        """Reads a dispatched step's metrics (blocks until it is done) and does what the step calls for:
        losses.jsonl, the non-finite stop, the log line."""
        hm = train_step.host_metrics(rec.metrics)
        window.add(rec.tokens, rec.flops)
        losses[rec.step] = hm["loss"]
        if loss_file is not None:
            loss_file.append({"step": rec.step, "loss": hm["loss"], "grad_norm": hm["grad_norm"],
                              "finite": hm["finite"]})
        if hm["consecutive_skips"] >= step_cfg.max_consecutive_skips:
            # `state` is this step's result: a step dispatched after it found the state halted and left it as is
            ckpt.save(state, rec.data_state, force=True)
            ckpt.wait()
            raise NonFiniteError(
                f"{hm['consecutive_skips']} non-finite steps in a row at step {rec.step} (limit "
                f"max_consecutive_skips={step_cfg.max_consecutive_skips}; last loss {hm['loss']}, grad norm "
                f"{hm['grad_norm']}); checkpoint saved to {ckpt.directory} step {rec.step}")
        if rec.stats is not None:
            _flush(loss_file)                        # a bucket: one rewrite per log line, not per step
            tokens_per_s, flops_per_s = window.rates()
            log.log_train(rec.step, n_steps, {
                **hm, "tokens_per_s": tokens_per_s, "mfu": flops.mfu(flops_per_s, 1.0, n_dev, device_kind),
                "packing_efficiency": rec.stats.get("token_efficiency", 0.0),
                "skipped_samples": rec.stats.get("skipped", 0.0)}, rec.stats)

    failed = True                                    # until the loop ends without an exception
    try:
        # Step t+1 is dispatched before step t's metrics are read, so the host never waits for the device
        # between steps; it syncs only where it acts on the state (evaluation, checkpoint, last step, SIGTERM).
        data_state = data.get_state()
        upcoming = fetch() if step < n_steps else None
        lagging: _Dispatched | None = None
        while step < n_steps and not preempted["flag"]:
            local, data_state, placed = upcoming
            state, m = step_fn(state, placed)                                  # dispatched asynchronously
            step += 1
            rec = _Dispatched(step, m, data_state, float(np.asarray(local["segment_ids"] > 0).sum()) * pc,
                              flops.batch_flops(cfg, local, exp.trainable).total * pc)
            upcoming = fetch() if step < n_steps else None                     # overlaps the device step
            if step % log_every == 0 or step == n_steps:
                rec = rec._replace(stats=data.stats())
            if lagging is not None:
                finish(lagging)
            lagging = rec
            evaluating = evaluate is not None and (step % exp.eval_every == 0 or step == n_steps)
            if not (evaluating or step % ckpt_every == 0 or step == n_steps or preempted["flag"]):
                continue
            finish(lagging)
            lagging = None
            if evaluating:
                t = time.perf_counter()
                evals[step] = evaluate(state.params)
                window.exclude(time.perf_counter() - t)      # throughput counts training time only
                log.log_eval(step, evals[step], hide=getattr(evaluate, "repeated", ()))   # HeldoutEvaluator's
                if eval_file is not None:
                    eval_file.append({"step": step, **evals[step]})
            if ckpt.save(state, data_state):
                _flush(loss_file, eval_file)         # the logs reach the step a resume starts from
        if lagging is not None:                  # SIGTERM arrived after the step's own check
            finish(lagging)
        if step > start and (step >= n_steps or preempted["flag"]):
            ckpt.save(state, data_state, force=True)
        if preempted["flag"]:
            log.message(f"SIGTERM: saved checkpoint at step {step} to {ckpt.directory}; exiting")
    except checkpoint.NonFiniteStateError as e:
        raise NonFiniteError(str(e)) from None
    except Exception as e:
        if checkpoint.is_disk_full(e) and not isinstance(e, checkpoint.DiskFullError):   # a log or config write
            raise ckpt.disk_full() from None
        raise
    else:
        failed = False
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        _close([ckpt.close, data.close, log.close]
               + [f.close for f in (loss_file, eval_file) if f is not None],   # a bucket: the last rewrite
               ckpt, quiet=failed)
    return {"step": step, "start_step": start, "num_steps": n_steps, "losses": losses, "eval": evals,
            "preempted": preempted["flag"], "skipped_steps": int(jax.device_get(state.skipped_steps)),
            "checkpoint_dir": ckpt.directory}


def _initial_state(exp: TrainSpec, ckpt: checkpoint.Checkpointer, data, abstract, st_sh, mesh, log
                   ) -> tuple[train_step.TrainState, train_step.StepConfig]:
    """(state, the step config to train it with): the newest checkpoint that restores (the data iterator too;
    the step config with the checkpoint's schedule), else `init_from`'s params, else the seed."""
    step_cfg = exp.step_config()
    if ckpt.all_steps():
        state, meta = ckpt.restore(abstract, check=lambda meta: _check_resumable(exp, step_cfg, meta, ckpt.directory))
        data.set_state(meta["data_state"])
        step_cfg = _keep_saved_schedule(exp, step_cfg, meta, log.message)
        log.message(f"resumed from {ckpt.directory} step {meta['step']}")
    elif exp.init_from:
        saved = rundir.read_model_config(exp.init_from)
        diff = architecture_diff(saved, exp.model) if saved is not None else []
        if diff:
            raise ValueError(f"init_from {exp.init_from} is another model than the experiment's {exp.model.name!r}: "
                             + ", ".join(f"{k} {a} vs {b}" for k, a, b in diff))
        params = checkpoint.load_params(exp.init_from, abstract.params, log=log.message)
        log.message(f"initialised params from {exp.init_from}")
        state = train_step.place_params(params, step_cfg, st_sh)
    else:
        state = train_step.init_state(exp.model, step_cfg, jax.random.key(exp.seed), mesh)
    ckpt.run_meta = {"optim": _jsonable(step_cfg.optim), "trainable": list(step_cfg.trainable)}
    return state, step_cfg


def _jsonable(config) -> dict:
    """A frozen config as the JSON a checkpoint's meta holds (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _check_resumable(exp: TrainSpec, step_cfg: train_step.StepConfig, meta: dict, where: str) -> None:
    """ValueError when the checkpoint was trained with other trainable parts or optimizer settings than
    `step_cfg`'s, an explicit optim.total_steps included; a schedule length that differs because `steps`
    changed is not refused but kept (_keep_saved_schedule). A checkpoint without these settings (written
    before they were saved) is not checked."""
    now = {"trainable": list(step_cfg.trainable), **{f"optim.{k}": v for k, v in _jsonable(step_cfg.optim).items()}}
    saved = {"trainable": meta.get("trainable"), **{f"optim.{k}": v for k, v in meta.get("optim", {}).items()}}
    diff = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] is not None and saved[k] != v}
    if step_cfg.optim.total_steps == exp.num_steps:     # the length follows `steps`, not an explicit total_steps
        diff.pop("optim.total_steps", None)
    if diff:
        raise ValueError(
            f"cannot resume {where} step {meta['step']} with other settings than it was trained with: "
            + ", ".join(f"{k} {a!r} (checkpoint) vs {b!r} (now)" for k, (a, b) in sorted(diff.items()))
            + f"; resume with the checkpoint's values, or start a new run from its params (another workdir and "
            f"--set init_from={where})")


def _keep_saved_schedule(exp: TrainSpec, step_cfg: train_step.StepConfig, meta: dict, log) -> train_step.StepConfig:
    """`step_cfg` with the checkpoint's schedule length when `steps` changed since it was saved (one line)."""
    saved = meta.get("optim", {}).get("total_steps")
    if saved is None or saved == step_cfg.optim.total_steps:
        return step_cfg
    o = step_cfg.optim
    log(f"steps={exp.num_steps} but the checkpoint's learning-rate schedule (warmup {o.warmup_steps} steps, cosine "
        f"to {o.min_lr_ratio:g} x {o.peak_lr:g}) ends at step {saved}: keeping it (past step {saved} the rate stays at "
        f"its minimum); to decay over {step_cfg.optim.total_steps} steps instead, start a new run from this "
        f"checkpoint's params (another workdir and --set init_from=...)")
    return dataclasses.replace(step_cfg, optim=dataclasses.replace(o, total_steps=saved))


class _Dispatched(NamedTuple):
    """A step whose metrics have not been read yet."""
    step: int                 # its number (1-based: the state's step after it)
    metrics: dict             # device arrays
    data_state: Any           # the data iterator's state after its batch
    tokens: float             # real tokens of its global batch
    flops: float              # useful FLOPs of its global batch
    stats: dict | None = None  # the data counters, on a log step


class _Window:
    """Tokens and FLOPs since the last log line, for the throughput and MFU of that line."""

    def __init__(self):
        self.t0, self.tokens, self.flops = time.perf_counter(), 0.0, 0.0

    def add(self, tokens: float, flops: float) -> None:
        self.tokens += tokens
        self.flops += flops

    def exclude(self, seconds: float) -> None:
        self.t0 += seconds

    def rates(self) -> tuple[float, float]:
        """(tokens/s, FLOP/s) over the window, then starts a new one."""
        dt = time.perf_counter() - self.t0
        out = (self.tokens / dt, self.flops / dt)
        self.__init__()
        return out


# ----------------------------------------------------------------------------------------------
# set-up: memory

def check_memory(exp: TrainSpec, mesh) -> None:
    """Raises memory.InsufficientMemoryError (needed vs available) before anything is allocated."""
    est = memory.estimate(exp.model, memory.StepShape(
        batch_size=exp.batch_size // exp.microbatches, seq_len=exp.data.seq_len,
        max_patches=exp.data.max_patches, grad_accum=exp.microbatches,
        # the loss holds [rows, loss_chunk, V] logits: as many values as T x (V * loss_chunk / S)
        vocab_chunk=max(1, exp.model.vocab_size * min(exp.loss_chunk, exp.data.seq_len) // exp.data.seq_len)),
        mesh, parts=exp.trainable)
    memory.check_fits(est, what=f"{exp.name} with model {exp.model.name}")


def _close(closers: list[Callable[[], None]], ckpt: checkpoint.Checkpointer, quiet: bool) -> None:
    """Calls every closer. quiet (the run is already failing): their errors are dropped, the run's error is the
    one to see. Else the first error is raised once all were called (a disk that filled up: as DiskFullError;
    the last checkpoint's async write fails here)."""
    first = None
    for close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001 -- every resource gets closed; the first error is raised below
            first = first or e
    if first is None or quiet:
        return
    if checkpoint.is_disk_full(first) and not isinstance(first, checkpoint.DiskFullError):
        raise ckpt.disk_full() from None
    raise first


def _flush(*logs: paths.JsonlLog | None) -> None:
    for f in logs:
        if f is not None:
            f.flush()
