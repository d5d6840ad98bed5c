"""Pretraining: `python -m launch.pretrain --experiment=stage1 [--model=tiny] [--set k=v ...]`.

    python -m launch.pretrain --list
    python -m launch.pretrain                                   # stage 1, tiny model, embedded data, CPU
    python -m launch.pretrain --experiment=stage2 --model=7b --set mesh.fsdp=16 --set init_from=runs/stage1_7b/checkpoints
    python -m launch.pretrain --model=test --show_config         # the resolved config, then exit
    python -m launch.pretrain --experiment=stage3 --set init_from=/ckpt/Qwen2-VL-2B-Instruct --data=DATA \
        --set workdir=runs/ft                                   # fine-tune a Hugging Face checkpoint on your data

Trains the experiment with qwen2vl_jax.train.trainer (its docstring: the loop, checkpoints, preemption, the
run directory). The run directory is `--set workdir=...` (default runs/<experiment>_<model>); a re-run of
the same command resumes from its newest checkpoint that restores, and a second run in the same directory
stops at start. `--set init_from=DIR` starts from a checkpoint: a run (RUN, RUN/checkpoints,
RUN/checkpoints/STEP), a converted checkpoint or a Hugging Face Qwen2-VL folder; the model config and the
tokenizer then come from it (--model only chooses the recipe's sizes, and must agree with it). `--data`
trains on launch.prepare_data's output (DIR/train; the held-out loss reads DIR/heldout). Every `eval_every` steps (tiny: on) the held-out loss
by mixture source and by data kind is printed, written to TensorBoard (eval/...) and to heldout.jsonl.

Exit status: 0 done (or preempted by SIGTERM, checkpoint saved), 1 the model does not fit the devices'
memory, 2 a configuration error (one ERROR line naming the value and the valid choices; also: the run
directory is in use, the checkpoint was trained with other settings), 3 too many non-finite steps in a row
(checkpoint saved) or a non-finite state (not saved), 6 the disk filled up (one ERROR line naming the newest
good checkpoint; free space and re-run to resume from it).
Multi-host: pass --coordinator_address/--num_processes/--process_id, or let the environment decide
(Cloud TPU VM slices from their metadata, GKE TPU pods, SLURM, Open MPI: qwen2vl_jax/train/distributed.py).
The run directory may be a bucket: --set workdir=gs://BUCKET/PATH (checkpoints, logs, TensorBoard, configs
and the run lock go there; a restarted job on new machines resumes from it).
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags, logging

from experiments import flags as cli
from experiments import registry, stages
from qwen2vl_jax.train import checkpoint, distributed, memory, trainer

FLAGS = flags.FlagValues()
cli.define_experiment(FLAGS)
cli.define_model(FLAGS)
cli.define_set(FLAGS)
cli.define_data(FLAGS)
flags.DEFINE_bool("list", False, "list the experiments and exit", flag_values=FLAGS)
flags.DEFINE_bool("show_config", False, "print the resolved experiment config and exit", flag_values=FLAGS)
flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0", flag_values=FLAGS)
flags.DEFINE_integer("num_processes", None, "multi-process: number of processes", flag_values=FLAGS)
flags.DEFINE_integer("process_id", None, "multi-process: this process's index", flag_values=FLAGS)


def main(argv: Sequence[str]) -> int:
    cli.parse(FLAGS, argv, __doc__)
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    if FLAGS.list:
        for name, desc in registry.list_experiments(FLAGS.model):
            print(f"{name:10s} {desc}")
        print(f"models: {', '.join(stages.MODELS)} (--model); override any field with --set key=value")
        return 0
    exp = registry.get_experiment(FLAGS.experiment, cli.model_choice(FLAGS), FLAGS.set, data=FLAGS.data)
    if FLAGS.show_config:
        print(registry.describe(exp))
        return 0
    distributed.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
        summary = trainer.run(exp, evaluate=exp.evaluator())
    except trainer.NonFiniteError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return trainer.EXIT_NON_FINITE
    except checkpoint.DiskFullError as e:
        # The run's files are closed; what is left are tensorstore's callbacks of the abandoned writes, which
        # print tracebacks from their own threads into the event loop orbax already closed. Their later
        # writes go to /dev/null; one they left half-written ends at our leading newline, so the ERROR line
        # is whole and last.
        stderr, sys.stderr = sys.stderr, open(os.devnull, "w")
        sys.stdout.flush()
        stderr.write(f"\nERROR: {e}\n")
        stderr.flush()
        os._exit(trainer.EXIT_DISK_FULL)
    except memory.InsufficientMemoryError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    print(outcome(summary))
    return 0


def outcome(summary: dict) -> str:
    """The last line of a run: what this invocation trained, or that there was nothing left to train."""
    step, start, total = summary["step"], summary["start_step"], summary["num_steps"]
    where = f"checkpoints in {summary['checkpoint_dir']}"
    if step == start:
        return f"already at step {step} of {total}; nothing to train; {where}"
    losses = summary["losses"]
    return (f"{'preempted' if summary['preempted'] else 'done'}: trained steps {start + 1}..{step} of {total}, "
            f"loss {losses[start + 1]:.4f} -> {losses[step]:.4f}, skipped steps {summary['skipped_steps']}; "
            f"{where}")


if __name__ == "__main__":
    cli.run(main)
