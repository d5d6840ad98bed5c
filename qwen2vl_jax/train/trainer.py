"""The training loop: an experiment config in; checkpoints, metrics and held-out losses out.

    summary = trainer.run(exp, evaluate=hook)

Per step: each process reads its own shard of the data (batch_size / process_count rows), the rows of all
processes form one global batch (sharding.global_batch), the jitted step updates the sharded state. The host
stays a step ahead: the next batch is read and copied to the devices while the device works, and a step's
metrics are read after the next step is dispatched (at evaluation, checkpoint and last steps the loop waits
for the step instead); the records and the stops are those of a loop that waits every step. Around the loop:
  - before anything is allocated, the per-device memory of the step is estimated (train.memory) and a
    model that does not fit stops with what it needs and what the machine has;
  - one run per run directory: RUN/run.lock (RunLock) stops a second run in the same folder at start; the
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
    stops with NonFiniteError instead);
  - `max_consecutive_skips` non-finite steps in a row save a checkpoint and raise NonFiniteError;
  - every `eval_every` steps and at the last step, `evaluate(params)` (a hook the caller builds, e.g.
    eval.evaluation.HeldoutEvaluator; train/ does not import eval/) is logged and appended to heldout.jsonl.

The run directory (exp.run_dir, local or gs://BUCKET/PATH: every file goes through train/paths.py; only
process 0 writes the shared files, orbax has every process write its own shards) holds
  checkpoints/        orbax steps (async, every `checkpoint.every`, keep `checkpoint.keep`)
  tensorboard/        event files: train/<metric>, data/<counter>, eval/<name>
  losses.jsonl        {"step", "loss", "grad_norm", "finite"} per step (process 0); strict JSON: a
                      non-finite value is null. In a bucket (no append) the object is rewritten at every
                      log line and checkpoint, so a kill loses at most the records since then
  heldout.jsonl       {"step", <name>: value, ...} per evaluation (process 0)
  run.lock            the running run's pid, host, job and start time (empty after a clean exit)
  processor/          tokenizer.json of the run's tokenizer, and the other tokenizer / image-processor files
                      of a Hugging Face `init_from` folder: launch.convert --jax_to_hf copies them beside the
                      converted weights
  model_config.json, data_config.json   the run's model and data configs (process 0), read back by
                      `read_model_config` / `read_data_config` (launch.evaluate rebuilds the model and
                      preprocesses held-out media at the pixel budgets the run trained with)

Multi-host: train/distributed.py (launch.pretrain calls it before `run`).
"""
from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, NamedTuple, Protocol, TextIO

import jax
import numpy as np

from qwen2vl_jax.data.pipeline import DataConfig, make_iterator
from qwen2vl_jax.data.tokenizer import load_for, tokenizer_json
from qwen2vl_jax.model import hf
from qwen2vl_jax.model.config import ModelConfig, architecture_diff
from qwen2vl_jax.train import checkpoint, flops, memory, metrics, paths, sharding, train_step

EXIT_NON_FINITE = 3                      # exit status of a CLI whose run stopped on non-finite steps
MODEL_CONFIG_FILE = hf.MODEL_CONFIG_FILE
DATA_CONFIG_FILE = "data_config.json"
LOSSES_FILE = "losses.jsonl"
HELDOUT_FILE = "heldout.jsonl"
LOCK_FILE = "run.lock"
JOB_ENV = "QWEN2VL_JOB"                  # the job a run belongs to (launch.tpu: TPU name/run name); see RunLock
LOCK_HEARTBEAT_S = 60.0                  # a run directory in a bucket: the holder rewrites run.lock this often
LOCK_STALE_S = 600.0                     # ... and a record not rewritten for this long is a dead run's
PROCESSOR_DIR = "processor"

EvalHook = Callable[[Any], dict]         # params -> {name: value}


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row (a checkpoint of the last finite state was saved), or a state
    holding NaN/inf reached a checkpoint save (not saved)."""


class WorkdirInUseError(ValueError):
    """Another run holds the run directory."""


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
    Raises WorkdirInUseError when another run holds exp.run_dir."""
    stream = stream or sys.stdout
    paths.makedirs(exp.run_dir)
    if jax.process_index() != 0:              # process 0 holds the lock for the whole job
        return _run(exp, evaluate, stream)
    with RunLock(exp.run_dir, log=lambda text: print(text, file=stream, flush=True)):
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
        write_run_configs(exp)
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
        for name in (LOSSES_FILE, HELDOUT_FILE):
            truncate_jsonl(paths.join(exp.run_dir, name), start, log.message)
    step_fn = train_step.make_train_step(cfg, step_cfg, mesh, st_sh, b_sh)

    preempted = {"flag": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.__setitem__("flag", True))
    loss_file = paths.JsonlLog(paths.join(exp.run_dir, LOSSES_FILE)) if pi == 0 else None
    eval_file = paths.JsonlLog(paths.join(exp.run_dir, HELDOUT_FILE)) if pi == 0 and evaluate else None
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
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        ckpt.close()
        data.close()
        log.close()
        for f in (loss_file, eval_file):
            if f is not None:
                f.close()                            # a bucket: the last rewrite
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
        saved = read_model_config(exp.init_from)
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


# ----------------------------------------------------------------------------------------------
# the run directory: what a run writes, and reading it back

def write_run_configs(exp: TrainSpec) -> None:
    """RUN_DIR/model_config.json, RUN_DIR/data_config.json and, once, RUN_DIR/processor/ (the processor files
    of a Hugging Face `init_from` folder or run, and tokenizer.json of the run's tokenizer)."""
    for name, payload in ((MODEL_CONFIG_FILE, hf.model_config_to_dict(exp.model)),
                          (DATA_CONFIG_FILE, exp.data.to_dict())):
        paths.write_json(paths.join(exp.run_dir, name), payload)
    out = paths.join(exp.run_dir, PROCESSOR_DIR)
    if paths.exists(paths.join(out, "tokenizer.json")):     # a resumed run keeps what its first start wrote
        return
    origin = processor_dir(exp.init_from) if exp.init_from else None
    if origin:
        for name in hf.PROCESSOR_FILES:
            if paths.exists(paths.join(origin, name)):
                paths.write_text(paths.join(out, name), paths.read_text(paths.join(origin, name)))
    # written last: its presence says the folder is complete
    paths.write_text(paths.join(out, "tokenizer.json"), tokenizer_json(exp.tokenizer))   # the run's tokenizer


def _locate(path: str) -> checkpoint.Located | None:
    try:
        return checkpoint.locate(path)
    except ValueError:
        return None


def _run_file(path: str, name: str) -> str | None:
    """`name` beside the checkpoint at `path` (its run folder, or the converted folder itself), else in `path`
    or its parent (a run folder whose checkpoints/ is still empty)."""
    loc = _locate(path)
    beside = (loc.run_dir if loc.kind == "training" else loc.path) if loc else None
    for d in ([beside] if beside else []) + [path, paths.parent(path)]:
        if paths.exists(paths.join(d, name)):
            return paths.join(d, name)
    return None


def read_model_config(path: str) -> ModelConfig | None:
    """The model config of the checkpoint at `path` (any form `checkpoint.locate` accepts: the run's
    model_config.json, a converted checkpoint's, a Hugging Face folder's config.json), else None."""
    loc = _locate(path)
    if loc is not None and loc.kind == "hf":
        remote = paths.is_remote(loc.path)
        return hf.read_model_config(paths.local_copy(loc.path, [hf.CONFIG_FILE]) if remote else loc.path)
    found = _run_file(path, MODEL_CONFIG_FILE)
    return None if found is None else hf.model_config_from_dict(paths.read_json(found))


def processor_dir(path: str) -> str | None:
    """The folder of tokenizer / processor files that goes with the checkpoint at `path`: a Hugging Face
    folder itself, else the processor/ folder of its run (or converted checkpoint) when that exists."""
    loc = _locate(path)
    if loc is None:
        return None
    if loc.kind == "hf":
        return loc.path
    base = loc.run_dir if loc.kind == "training" else loc.path
    d = paths.join(base, PROCESSOR_DIR) if base else None
    return d if d and paths.is_dir(d) else None


def read_data_config(checkpoint_dir: str) -> tuple[DataConfig | None, str | None]:
    """(the data config of the run that wrote a checkpoint, its path), or (None, None) without one."""
    path = _run_file(checkpoint_dir, DATA_CONFIG_FILE)
    if path is None:
        return None, None
    data = paths.read_json(path)
    fields = [f.name for f in dataclasses.fields(DataConfig)]
    missing, unknown = [f for f in fields if f not in data], sorted(set(data) - set(fields))
    if missing or unknown:
        raise ValueError(f"{path} is not a DataConfig written by a training run (missing: "
                         f"{', '.join(missing) or '-'}; unknown: {', '.join(unknown) or '-'})")
    return DataConfig(**data), path                 # the inverse of DataConfig.to_dict


def load_params(model_cfg: ModelConfig, checkpoint_dir: str, mesh: jax.sharding.Mesh | None = None,
                device: jax.Device | None = None) -> dict:
    """The params of any checkpoint `checkpoint.locate` accepts (a run, its checkpoints or one step, a
    converted or a Hugging Face folder), placed by the training param shardings on `mesh`, or on `device`
    (default: the first device) when mesh is None."""
    if not paths.is_dir(checkpoint_dir):
        raise ValueError(f"checkpoint {checkpoint_dir!r} is not a directory")
    shapes = memory.abstract_params(model_cfg)
    if mesh is None:
        single = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, shapes)
    else:
        shardings = train_step.param_shardings(model_cfg, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return checkpoint.load_params(checkpoint_dir, abstract)


def read_jsonl(run_dir: str, name: str) -> dict[int, dict]:
    """{step: record} of RUN_DIR/<name> (losses.jsonl, heldout.jsonl); the last record of a step wins.
    {} when the file does not exist."""
    return {int(r["step"]): r for r in paths.read_jsonl(paths.join(run_dir, name))}


def truncate_jsonl(path: str, step: int, log=None) -> None:
    """Keeps the records of `path` up to `step` (a resumed run re-trains the steps after its checkpoint, so
    they would appear twice); a line cut short by a kill is dropped too. Rewrites it whole (paths.write_text:
    atomic locally, one object in a bucket)."""
    if not paths.exists(path):
        return
    kept, dropped = [], 0
    for line in filter(str.strip, paths.read_text(path).splitlines()):
        try:
            keep = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if not dropped:
        return
    paths.write_text(path, "".join(kept))
    if log:
        log(f"{os.path.basename(path)}: dropped {dropped} records after step {step} (re-trained from here)")


def _flush(*logs: paths.JsonlLog | None) -> None:
    for f in logs:
        if f is not None:
            f.flush()


# ----------------------------------------------------------------------------------------------
# one run per run directory

def _start_time(pid: int) -> str | None:
    """The kernel's start time of process `pid` (clock ticks since boot; Linux), None if unknown or gone:
    with the pid it identifies a process, as a pid alone is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the process a lock record names still runs (on another host: assumed, it cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", 0))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    recorded, now = holder.get("start_ticks"), _start_time(pid)
    return recorded is None or now is None or recorded == now


class RunLock:
    """Exclusive use of a run directory by one run, through RUN/run.lock.

    Local: the claim is an flock on the file: the kernel releases it when the holder exits, kill -9 included,
    so a killed run never blocks the next one. The file records the holder (pid, host, process start time,
    job, start date) for the refusal message and is emptied on a clean exit: a run that gets the lock and
    finds a record says it takes over from a run that did not exit cleanly. Where the file system has no flock
    (some network mounts), the record alone decides: a holder on this host whose process is gone (pid not
    running, or reused by a younger process) is stale and taken over; any other is refused.

    Cloud Storage (gs://): no flock. The lock is the object run.lock holding the record, written only at the
    generation that was read (created only if absent; paths.write_versioned), so of two runs starting at once
    one gets it. The holder rewrites the record every `heartbeat_s` ("beat": its clock); a record is stale,
    and taken over, when its beat is older than `stale_s` (its run was killed or its slice preempted), when
    its process is gone on this host, or when it names this run's job (the JOB_ENV variable: launch.tpu
    sets it, and its supervisor restarts a job only after the job's previous run is gone). Any other record
    refuses. A clean exit empties the object."""

    def __init__(self, run_dir: str, log=print, heartbeat_s: float = LOCK_HEARTBEAT_S, stale_s: float = LOCK_STALE_S):
        self.path = paths.join(run_dir, LOCK_FILE)
        self.remote = paths.is_remote(run_dir)
        self.log = log
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.fd: int | None = None
        self.generation = 0
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    @staticmethod
    def _parse(text: str) -> dict:
        text = text.strip()
        try:
            holder = json.loads(text) if text else {}
        except ValueError:
            holder = {"unparsable": text[:80]}
        return holder if isinstance(holder, dict) else {"unparsable": text[:80]}

    def _read(self) -> dict:
        os.lseek(self.fd, 0, os.SEEK_SET)
        return self._parse(os.read(self.fd, 1 << 16).decode(errors="replace"))

    def _refuse(self, holder: dict):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        who = (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
               if "pid" in holder else f"record {holder}")
        if self.remote:
            who += f", last seen {time.time() - float(holder.get('beat', 0)):.0f} s ago"
        raise WorkdirInUseError(
            f"run directory {paths.parent(self.path)} is in use by another run ({who}): two runs in one "
            f"directory would mix their checkpoints and losses.jsonl; wait for it or stop it, or use another "
            f"--set workdir (if that run is gone and this persists, delete {self.path})")

    def _record(self) -> str:
        return json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "start_ticks": _start_time(os.getpid()),
            "job": os.environ.get(JOB_ENV) or None, "beat": time.time(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}) + "\n"

    def _stale(self, holder: dict) -> str | None:
        """Why a bucket lock's record no longer holds the run directory, or None."""
        if "pid" not in holder:
            return "unparsable record"
        if not _alive(holder):
            return "its process is gone"
        job = os.environ.get(JOB_ENV)
        if job and holder.get("job") == job:
            return f"the same job {job!r}, restarted"
        age = time.time() - float(holder.get("beat", 0))
        return f"not rewritten for {age:.0f} s" if age > self.stale_s else None

    def __enter__(self) -> "RunLock":
        if self.remote:
            return self._enter_remote()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._refuse(self._read())
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            holder = self._read()                     # no flock here: the record decides
            if holder and _alive(holder):
                self._refuse(holder)
        holder = self._read()
        if holder:
            self.log(f"{self.path}: taking over from a run that did not exit cleanly ({holder})")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, self._record().encode(), 0)
        os.fsync(self.fd)
        return self

    def _enter_remote(self) -> "RunLock":
        for _ in range(3):                            # lost a race to another writer: look again
            text, generation = paths.read_versioned(self.path)
            holder = self._parse(text)
            why = self._stale(holder) if holder else None
            if holder and why is None:
                self._refuse(holder)
            new = paths.write_versioned(self.path, self._record(), generation)
            if new is not None:
                break
        else:
            raise WorkdirInUseError(f"{self.path}: other runs keep rewriting the lock; is another run starting?")
        if holder:
            self.log(f"{self.path}: taking over from a run that did not exit cleanly ({why}; {holder})")
        self.generation = new
        self._beater = threading.Thread(target=self._beat, name="run.lock heartbeat", daemon=True)
        self._beater.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                new = paths.write_versioned(self.path, self._record(), self.generation)
            except Exception as e:  # noqa: BLE001 -- a network error: try again at the next beat
                self.log(f"{self.path}: could not rewrite the lock ({e}); trying again in {self.heartbeat_s:g} s")
                continue
            if new is None:
                holder = self._parse(paths.read_versioned(self.path)[0])
                self.log(f"{self.path}: another run took the run directory over ({holder}); this run no longer "
                         "holds it: stop one of them")
                return
            self.generation = new

    def __exit__(self, *exc) -> None:
        if self.remote:
            self._stop.set()
            if self._beater is not None:
                self._beater.join()
            paths.write_versioned(self.path, "", self.generation)     # not ours any more: left as it is
            return
        os.ftruncate(self.fd, 0)
        os.close(self.fd)                             # releases the flock
        self.fd = None
