"""The training loop: an experiment config in; checkpoints, metrics and held-out losses out.

    summary = trainer.run(exp, evaluate=hook)

Per step: each process reads its own shard of the data (batch_size / process_count rows), the rows of all
processes form one global batch (sharding.global_batch), the jitted step updates the sharded state. The host
stays a step ahead: the next batch is read and copied to the devices while the device works, and a step's
metrics are read after the next step is dispatched (at evaluation, checkpoint and last steps the loop waits
for the step instead); the records and the stops are those of a loop that waits every step. Around the loop:
  - before anything is allocated, the per-device memory of the step is estimated (train.memory) and a
    model that does not fit stops with what it needs and what the machine has;
  - a restart resumes from the latest complete checkpoint (params, optimizer, step, data-iterator state);
    a fresh run starts from `init_from` (a previous stage or a converted checkpoint) or from the seed;
  - every `checkpoint.every` steps, at the end, on SIGTERM (preemption: save at the next step boundary and
    return) and on a non-finite stop, a checkpoint is saved;
  - `max_consecutive_skips` non-finite steps in a row save a checkpoint and raise NonFiniteError;
  - every `eval_every` steps and at the last step, `evaluate(params)` (a hook the caller builds, e.g.
    eval.evaluation.HeldoutEvaluator; train/ does not import eval/) is logged and appended to heldout.jsonl.

The run directory (exp.run_dir) holds
  checkpoints/        orbax steps (async, every `checkpoint.every`, keep `checkpoint.keep`)
  tensorboard/        event files: train/<metric>, data/<counter>, eval/<name>
  losses.jsonl        {"step", "loss", "grad_norm", "finite"} per step (process 0)
  heldout.jsonl       {"step", <name>: value, ...} per evaluation (process 0)
  model_config.json, data_config.json   the run's model and data configs (process 0), read back by
                      `read_model_config` / `read_data_config` (launch.evaluate rebuilds the model and
                      preprocesses held-out media at the pixel budgets the run trained with)

Multi-host: `initialize_distributed` with explicit coordinator flags, or the environment (Cloud TPU pod
slices, SLURM, Open MPI are detected by jax.distributed.initialize()).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Callable, NamedTuple, Protocol, TextIO

import jax
import numpy as np

from qwen2vl_jax.data.pipeline import DataConfig, make_iterator
from qwen2vl_jax.data.tokenizer import load_tokenizer
from qwen2vl_jax.model import hf
from qwen2vl_jax.model.config import ModelConfig
from qwen2vl_jax.train import checkpoint, flops, memory, metrics, sharding, train_step

EXIT_NON_FINITE = 3                      # exit status of a CLI whose run stopped on non-finite steps
MODEL_CONFIG_FILE = hf.MODEL_CONFIG_FILE
DATA_CONFIG_FILE = "data_config.json"
LOSSES_FILE = "losses.jsonl"
HELDOUT_FILE = "heldout.jsonl"

EvalHook = Callable[[Any], dict]         # params -> {name: value}


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row (a checkpoint of the last state was saved)."""


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
    "eval": {step: evaluate(params)}, "preempted", "skipped_steps", "checkpoint_dir"}."""
    stream = stream or sys.stdout
    os.makedirs(exp.run_dir, exist_ok=True)
    cfg, step_cfg, n_steps = exp.model, exp.step_config(), exp.num_steps
    mesh = sharding.make_mesh(exp.mesh)
    check_memory(exp, mesh)
    pc, pi = jax.process_count(), jax.process_index()
    if exp.batch_size % pc:
        raise ValueError(f"batch_size={exp.batch_size} not divisible by {pc} processes")
    if pi == 0:
        write_run_configs(exp)

    abstract, st_sh = train_step.abstract_state(cfg, step_cfg, mesh)
    b_sh = sharding.batch_shardings(train_step.batch_spec(cfg, exp.batch_size, exp.data.seq_len,
                                                          exp.data.max_patches), mesh)
    data = make_iterator(exp.data, cfg, load_tokenizer(exp.tokenizer), batch_size=exp.batch_size // pc,
                         process_index=pi, process_count=pc, split="train")
    ckpt = checkpoint.Checkpointer(dataclasses.replace(exp.checkpoint, directory=exp.checkpoint_dir))
    log = metrics.MetricsLogger(os.path.join(exp.run_dir, "tensorboard"), stream)
    state = _initial_state(exp, ckpt, data, abstract, st_sh, mesh, log)
    start = step = int(jax.device_get(state.step))
    step_fn = train_step.make_train_step(cfg, step_cfg, mesh, st_sh, b_sh)

    preempted = {"flag": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.__setitem__("flag", True))
    loss_file = open(os.path.join(exp.run_dir, LOSSES_FILE), "a") if pi == 0 else None
    eval_file = open(os.path.join(exp.run_dir, HELDOUT_FILE), "a") if pi == 0 and evaluate else None
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
        _append_jsonl(loss_file, {"step": rec.step, "loss": hm["loss"], "grad_norm": hm["grad_norm"],
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
            tokens_per_s, flops_per_s = window.rates()
            log.log_train(rec.step, n_steps, {
                **hm, "tokens_per_s": tokens_per_s, "mfu": flops.mfu(flops_per_s, 1.0, n_dev, device_kind),
                "packing_efficiency": rec.stats.get("token_efficiency", 0.0),
                "skipped_samples": rec.stats.get("skipped", 0.0)}, rec.stats)

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
                log.log_eval(step, evals[step])
                _append_jsonl(eval_file, {"step": step, **evals[step]})
            ckpt.save(state, data_state)
        if lagging is not None:                  # SIGTERM arrived after the step's own check
            finish(lagging)
        if step > start and (step >= n_steps or preempted["flag"]):
            ckpt.save(state, data_state, force=True)
        if preempted["flag"]:
            log.message(f"SIGTERM: saved checkpoint at step {step} to {ckpt.directory}; exiting")
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        ckpt.close()
        data.close()
        log.close()
        for f in (loss_file, eval_file):
            if f is not None:
                f.close()
    return {"step": step, "start_step": start, "num_steps": n_steps, "losses": losses, "eval": evals,
            "preempted": preempted["flag"], "skipped_steps": int(jax.device_get(state.skipped_steps)),
            "checkpoint_dir": ckpt.directory}


def _initial_state(exp: TrainSpec, ckpt: checkpoint.Checkpointer, data, abstract, st_sh, mesh, log):
    """The latest checkpoint (restoring the data iterator too), else `init_from`'s params, else the seed."""
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract)
        data.set_state(meta["data_state"])
        log.message(f"resumed from {ckpt.directory} step {meta['step']}")
        return state
    step_cfg = exp.step_config()
    if exp.init_from:
        params = checkpoint.load_params(exp.init_from, abstract.params)
        log.message(f"initialised params from {exp.init_from}")
        return train_step.place_params(params, step_cfg, st_sh)
    return train_step.init_state(exp.model, step_cfg, jax.random.key(exp.seed), mesh)


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


def _append_jsonl(f, record: dict) -> None:
    if f is not None:
        f.write(json.dumps(record) + "\n")
        f.flush()


# ----------------------------------------------------------------------------------------------
# set-up: processes, memory

def _multi_host_env() -> bool:
    env = os.environ
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return ("," in hosts or int(env.get("SLURM_NTASKS", "1")) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 or bool(env.get("JAX_COORDINATOR_ADDRESS")))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """jax.distributed.initialize for explicit flags or a detected multi-host environment; no-op otherwise."""
    if coordinator_address or (num_processes or 1) > 1:
        if coordinator_address is None or num_processes is None or process_id is None:
            raise ValueError("multi-process needs --coordinator_address, --num_processes and --process_id "
                             f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif _multi_host_env():
        jax.distributed.initialize()


def check_memory(exp: TrainSpec, mesh) -> None:
    """Raises memory.InsufficientMemoryError (needed vs available) before anything is allocated."""
    est = memory.estimate(exp.model, memory.StepShape(
        batch_size=exp.batch_size // exp.microbatches, seq_len=exp.data.seq_len,
        max_patches=exp.data.max_patches, grad_accum=exp.microbatches,
        # the loss holds [rows, loss_chunk, V] logits: as many values as T x (V * loss_chunk / S)
        vocab_chunk=max(1, exp.model.vocab_size * min(exp.loss_chunk, exp.data.seq_len) // exp.data.seq_len)),
        mesh, parts=exp.trainable)
    memory.check_fits(est, what=f"{exp.name} with model {exp.model.name}")


# ----------------------------------------------------------------------------------------------
# the run directory: what a run writes, and reading it back

def write_run_configs(exp: TrainSpec) -> None:
    """RUN_DIR/model_config.json and RUN_DIR/data_config.json."""
    for name, payload in ((MODEL_CONFIG_FILE, hf.model_config_to_dict(exp.model)),
                          (DATA_CONFIG_FILE, exp.data.to_dict())):
        with open(os.path.join(exp.run_dir, name), "w") as f:
            json.dump(payload, f, indent=1)


def _run_file(checkpoint_dir: str, name: str) -> str | None:
    """`name` in the checkpoint folder (a converted checkpoint) or its parent (a run's checkpoints/)."""
    for d in (checkpoint_dir, os.path.dirname(os.path.abspath(checkpoint_dir))):
        path = os.path.join(d, name)
        if os.path.exists(path):
            return path
    return None


def read_model_config(checkpoint_dir: str) -> ModelConfig | None:
    """The model config beside a checkpoint (model_config.json there or in its parent), else None."""
    path = _run_file(checkpoint_dir, MODEL_CONFIG_FILE)
    if path is None:
        return None
    with open(path) as f:
        return hf.model_config_from_dict(json.load(f))


def read_data_config(checkpoint_dir: str) -> tuple[DataConfig | None, str | None]:
    """(the data config of the run that wrote a checkpoint, its path), or (None, None) without one."""
    path = _run_file(checkpoint_dir, DATA_CONFIG_FILE)
    if path is None:
        return None, None
    with open(path) as f:
        data = json.load(f)
    fields = [f.name for f in dataclasses.fields(DataConfig)]
    missing, unknown = [f for f in fields if f not in data], sorted(set(data) - set(fields))
    if missing or unknown:
        raise ValueError(f"{path} is not a DataConfig written by a training run (missing: "
                         f"{', '.join(missing) or '-'}; unknown: {', '.join(unknown) or '-'})")
    return DataConfig(**data), path                 # the inverse of DataConfig.to_dict


def load_params(model_cfg: ModelConfig, checkpoint_dir: str, mesh: jax.sharding.Mesh | None = None) -> dict:
    """The params of a training checkpoint folder (latest step) or a converted checkpoint, placed by the
    training param shardings on `mesh`, or on the first device when mesh is None."""
    if not os.path.isdir(checkpoint_dir):
        raise ValueError(f"checkpoint {checkpoint_dir!r} is not a directory")
    shapes = memory.abstract_params(model_cfg)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    else:
        shardings = train_step.param_shardings(model_cfg, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return checkpoint.load_params(checkpoint_dir, abstract)


def read_jsonl(run_dir: str, name: str) -> dict[int, dict]:
    """{step: record} of RUN_DIR/<name> (losses.jsonl, heldout.jsonl); the last record of a step wins (a
    step re-run after a kill -9 is logged twice). {} when the file does not exist."""
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {int(r["step"]): r for r in map(json.loads, filter(str.strip, f))}
