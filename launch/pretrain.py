"""Pretraining driver: `python -m launch.pretrain --experiment=stage1 [--model=tiny] [--set k=v ...]`.

    python -m launch.pretrain --list
    python -m launch.pretrain                                   # stage 1, tiny model, embedded data, CPU
    python -m launch.pretrain --experiment=stage2 --model=7b --set mesh.fsdp=16 --set init_from=runs/stage1_7b/checkpoints

Per step: each process reads its own shard of the data (batch_size / process_count rows), the rows of
all processes form one global batch (sharding.global_batch), the jitted step updates the sharded
state. The run directory (`--set workdir=...`, default runs/<experiment>_<model>) holds
  checkpoints/   orbax steps (async, every `checkpoint.every`, keep `checkpoint.keep`); a restart
                 resumes from the latest complete one (params, optimizer, step, data-iterator state)
  tensorboard/   event files
  losses.jsonl   {"step", "loss", "grad_norm", "finite"} per step (process 0)
  model_config.json, data_config.json   the run's model and data configs (process 0), so that
                 `launch.evaluate --checkpoint RUN/checkpoints` rebuilds the model and preprocesses the
                 held-out images at the pixel budgets the run trained with
Every `eval_every` steps (tiny: on) the loss on fixed held-out batches of each mixture source (split
"heldout") is printed and written to TensorBoard as eval/heldout/<source>.
SIGTERM (preemption) saves a checkpoint at the next step boundary and exits 0. `max_consecutive_skips`
non-finite steps in a row save a checkpoint and stop with exit code 3. Before anything is allocated the
per-device memory of the step is estimated (qwen2vl_jax.train.memory) and a too-large model stops with
what it needs and what the machine has.

Multi-host: pass --coordinator_address/--num_processes/--process_id, or let the environment decide
(Cloud TPU pod slices, SLURM, Open MPI are detected by jax.distributed.initialize()).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", "stage1", "experiment name (see --list)")
flags.DEFINE_string("model", "tiny", "model size: test, tiny, 2b, 7b, 72b")
flags.DEFINE_multi_string("set", [], "override key=value (dotted path into the experiment config)")
flags.DEFINE_bool("list", False, "list the experiments and exit")
flags.DEFINE_bool("show_config", False, "print the resolved experiment config before running")
flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0")
flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
flags.DEFINE_integer("process_id", None, "multi-process: this process's index")

EXIT_NON_FINITE = 3
DATA_CONFIG_FILE = "data_config.json"


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


def _multi_host_env() -> bool:
    env = os.environ
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return ("," in hosts or int(env.get("SLURM_NTASKS", "1")) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 or bool(env.get("JAX_COORDINATOR_ADDRESS")))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """jax.distributed.initialize for explicit flags or a detected multi-host environment; no-op otherwise."""
    import jax
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


def check_memory(exp, mesh) -> None:
    """Raises memory.InsufficientMemoryError (needed vs available) before anything is allocated."""
    from qwen2vl_jax.train import memory
    est = memory.estimate(exp.model, memory.StepShape(
        batch_size=exp.batch_size // exp.microbatches, seq_len=exp.data.seq_len,
        max_patches=exp.data.max_patches, grad_accum=exp.microbatches,
        # the loss holds [rows, loss_chunk, V] logits: as many values as T x (V * loss_chunk / S)
        vocab_chunk=max(1, exp.model.vocab_size * min(exp.loss_chunk, exp.data.seq_len) // exp.data.seq_len)),
        mesh, parts=exp.trainable)
    memory.check_fits(est, what=f"{exp.name} with model {exp.model.name}")


def heldout_evaluator(exp, tokenizer, params_sharding, batch_sharding):
    """fn(params) -> {"heldout/<source>": mean loss} over `exp.eval_batches` fixed held-out batches of each
    mixture source (split "heldout"), or None when `exp.eval_every` is 0."""
    if not exp.eval_every:
        return None
    import dataclasses

    import jax
    import numpy as np

    from qwen2vl_jax.train import sharding, train_step
    from qwen2vl_jax.data.pipeline import make_iterator

    pc, pi = jax.process_count(), jax.process_index()
    sets = {}
    for name, _ in exp.data.mixture:
        label = name.split(":", 1)[1] if name.startswith("synthetic:") else os.path.basename(name)
        it = make_iterator(dataclasses.replace(exp.data, mixture=((name, 1.0),)), exp.model, tokenizer,
                           batch_size=exp.batch_size // pc, process_index=pi, process_count=pc, split="heldout")
        sets[label] = [next(it) for _ in range(exp.eval_batches)]
        it.close()
    step_cfg = exp.step_config()
    loss_fn = jax.jit(lambda p, b: train_step.loss_terms(exp.model, p, b, step_cfg)[1],
                      in_shardings=(params_sharding, dict(batch_sharding)))

    def evaluate(params) -> dict:
        out = {}
        for label, batches in sets.items():
            nll = n = 0.0
            for b in batches:
                s_nll, _, s_n = loss_fn(params, sharding.global_batch(b, batch_sharding))
                nll, n = nll + float(np.asarray(s_nll)), n + float(np.asarray(s_n))
            out[f"heldout/{label}"] = nll / max(n, 1.0)
        return out

    return evaluate


def write_run_configs(exp) -> None:
    """RUN_DIR/model_config.json and RUN_DIR/data_config.json (read back by launch.evaluate)."""
    from qwen2vl_jax.model import hf
    for name, payload in ((hf.MODEL_CONFIG_FILE, hf.model_config_to_dict(exp.model)),
                          (DATA_CONFIG_FILE, exp.data.to_dict())):
        with open(os.path.join(exp.run_dir, name), "w") as f:
            json.dump(payload, f, indent=1)


def run(exp, stream=None) -> dict:
    """Trains `exp` (resuming from its checkpoints). Returns {"step", "losses": {step: loss},
    "eval": {step: {"heldout/<source>": loss}}, "preempted", "skipped_steps", "checkpoint_dir"}."""
    import jax
    import numpy as np

    from qwen2vl_jax.train import checkpoint, flops, metrics, sharding, train_step
    from qwen2vl_jax.data.pipeline import make_iterator
    from qwen2vl_jax.data.tokenizer import load_tokenizer

    stream = stream or sys.stdout
    os.makedirs(exp.run_dir, exist_ok=True)
    cfg, step_cfg = exp.model, exp.step_config()
    n_steps = exp.num_steps
    mesh = sharding.make_mesh(exp.mesh)
    check_memory(exp, mesh)
    pc, pi = jax.process_count(), jax.process_index()
    if exp.batch_size % pc:
        raise ValueError(f"batch_size={exp.batch_size} not divisible by {pc} processes")
    if pi == 0:
        write_run_configs(exp)

    abstract, st_sh = train_step.abstract_state(cfg, step_cfg, mesh)
    spec = train_step.batch_spec(cfg, exp.batch_size, exp.data.seq_len, exp.data.max_patches)
    b_sh = sharding.batch_shardings(spec, mesh)
    tokenizer = load_tokenizer(exp.tokenizer)
    data = make_iterator(exp.data, cfg, tokenizer, batch_size=exp.batch_size // pc,
                         process_index=pi, process_count=pc, split="train")
    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(
        directory=exp.checkpoint_dir, every=exp.checkpoint.every, keep=exp.checkpoint.keep,
        async_save=exp.checkpoint.async_save))
    log = metrics.MetricsLogger(os.path.join(exp.run_dir, "tensorboard"), stream)

    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract)
        data.set_state(meta["data_state"])
        log.message(f"resumed from {ckpt.directory} step {meta['step']}")
    elif exp.init_from:
        params = checkpoint.load_params(exp.init_from, abstract.params)
        state = train_step.place_params(params, step_cfg, st_sh)
        log.message(f"initialised params from {exp.init_from}")
    else:
        state = train_step.init_state(cfg, step_cfg, jax.random.key(exp.seed), mesh)
    step = int(jax.device_get(state.step))

    step_fn = train_step.make_train_step(cfg, step_cfg, mesh, st_sh, b_sh)
    evaluate = heldout_evaluator(exp, tokenizer, st_sh.params, b_sh)
    evals: dict[int, dict] = {}
    preempt = {"flag": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: preempt.__setitem__("flag", True))
    loss_file = open(os.path.join(exp.run_dir, "losses.jsonl"), "a") if pi == 0 else None
    device_kind, n_dev = jax.devices()[0].device_kind, jax.device_count()
    losses: dict[int, float] = {}
    window_t, window_tokens, window_flops = time.perf_counter(), 0.0, 0.0
    try:
        pending, data_state = None, data.get_state()
        while step < n_steps and not preempt["flag"]:
            local = pending if pending is not None else next(data)
            data_state = data.get_state()         # = the batches consumed up to and including `local`
            state, m = step_fn(state, sharding.global_batch(local, b_sh))   # dispatched asynchronously
            step_flops = flops.batch_flops(cfg, local, exp.trainable).total * pc
            pending = next(data) if step + 1 < n_steps else None          # overlaps the device step
            hm = train_step.host_metrics(m)
            step += 1
            losses[step] = hm["loss"]
            window_tokens += float(np.asarray(local["segment_ids"] > 0).sum()) * pc
            window_flops += step_flops
            if loss_file is not None:
                loss_file.write(json.dumps({"step": step, "loss": hm["loss"], "grad_norm": hm["grad_norm"],
                                            "finite": hm["finite"]}) + "\n")
                loss_file.flush()
            if hm["consecutive_skips"] >= step_cfg.max_consecutive_skips:
                ckpt.save(state, data_state, force=True)
                ckpt.wait()
                raise NonFiniteError(
                    f"{hm['consecutive_skips']} non-finite steps in a row at step {step} (limit "
                    f"max_consecutive_skips={step_cfg.max_consecutive_skips}; last loss {hm['loss']}, grad norm "
                    f"{hm['grad_norm']}); checkpoint saved to {ckpt.directory} step {step}")
            if step % exp.log_every == 0 or step == n_steps:
                dt = time.perf_counter() - window_t
                stats = data.stats()
                log.log_train(step, n_steps, {
                    **hm, "tokens_per_s": window_tokens / dt,
                    "mfu": flops.mfu(window_flops / dt, 1.0, n_dev, device_kind),
                    "packing_efficiency": stats.get("token_efficiency", 0.0),
                    "skipped_samples": stats.get("skipped", 0.0)}, stats)
                window_t, window_tokens, window_flops = time.perf_counter(), 0.0, 0.0
            if evaluate is not None and (step % exp.eval_every == 0 or step == n_steps):
                evals[step] = evaluate(state.params)
                log.log_eval(step, evals[step])
            ckpt.save(state, data_state)
        if step > 0 and (step >= n_steps or preempt["flag"]):
            ckpt.save(state, data_state, force=True)
        if preempt["flag"]:
            log.message(f"SIGTERM: saved checkpoint at step {step} to {ckpt.directory}; exiting")
    finally:
        signal.signal(signal.SIGTERM, previous)
        ckpt.close()
        data.close()
        log.close()
        if loss_file is not None:
            loss_file.close()
    return {"step": step, "losses": losses, "eval": evals, "preempted": preempt["flag"],
            "skipped_steps": int(jax.device_get(state.skipped_steps)), "checkpoint_dir": ckpt.directory}


def main(argv):
    del argv
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    from experiments import registry
    if FLAGS.list:
        for name, desc in registry.list_experiments(FLAGS.model):
            print(f"{name:10s} {desc}")
        print("models: test, tiny, 2b, 7b, 72b (--model); override any field with --set key=value")
        return 0
    from qwen2vl_jax.train.memory import InsufficientMemoryError
    try:
        exp = registry.get_experiment(FLAGS.experiment, FLAGS.model, FLAGS.set)
    except ValueError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if FLAGS.show_config:
        print(registry.describe(exp))
    try:
        summary = run(exp)
    except NonFiniteError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    except InsufficientMemoryError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # configuration errors (mesh vs devices, batch vs processes, ...)
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    first = summary["losses"].get(min(summary["losses"], default=0))
    print(f"done: step {summary['step']}, first loss {first}, last loss "
          f"{summary['losses'].get(summary['step'])}, skipped steps {summary['skipped_steps']}, "
          f"checkpoints in {summary['checkpoint_dir']}" + (" (preempted)" if summary["preempted"] else ""))
    return 0


if __name__ == "__main__":
    app.run(main)
