"""Launch a pretraining run on a Cloud TPU VM slice (single- or multi-host) with `gcloud`.

    python -m launch.tpu --experiment=stage1 --model=7b --tpu=my-v5p --zone=us-east5-a
        --accelerator=v5p-128 [--project=P] [--version=RUNTIME] [--spot] [--dry_run] [--set k=v ...]
        [--libtpu_args="--xla_flag=value ..."]

Reuses the TPU VM NAME or creates it, ships the repository's HEAD to every worker, installs it and starts
`launch.pretrain` there (the steps: qwen2vl_jax/cloud/tpu.py) with the TPU compiler flags launch.aot
compiles with in LIBTPU_INIT_ARGS (then --libtpu_args, which win). `--dry_run` prints the commands, one
per line, as a runnable shell script. The experiment and its `--set` overrides are checked here first
(experiments/registry.py), so a typo fails before any TPU VM is created.
"""
from __future__ import annotations

from absl import flags

from experiments import flags as cli
from experiments import registry
from qwen2vl_jax.cloud import tpu

FLAGS = flags.FlagValues()
cli.define_experiment(FLAGS, default=None)
cli.define_model(FLAGS, default=None, help="model size preset (default: the experiment's)")
cli.define_set(FLAGS, what="the experiment config (passed to launch.pretrain)")
flags.DEFINE_string("tpu", None, "TPU VM name", flag_values=FLAGS)
flags.DEFINE_string("zone", None, "GCP zone, e.g. us-east5-a", flag_values=FLAGS)
flags.DEFINE_string("accelerator", None, "accelerator type, e.g. v5p-128", flag_values=FLAGS)
flags.DEFINE_string("project", None, "GCP project (default: gcloud's configured project)", flag_values=FLAGS)
flags.DEFINE_string("version", None, "TPU runtime version (default per generation)", flag_values=FLAGS)
flags.DEFINE_string("run_name", None, "log file name (default EXPERIMENT-TPU)", flag_values=FLAGS)
flags.DEFINE_bool("spot", False, "create a Spot TPU VM", flag_values=FLAGS)
flags.DEFINE_string("libtpu_args", "", "extra TPU compiler flags for the job's LIBTPU_INIT_ARGS, after the "
                    "defaults of qwen2vl_jax.train.aot.TPU_COMPILER_FLAGS (yours win)", flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "print the commands, run nothing", flag_values=FLAGS)
flags.mark_flags_as_required(["experiment", "tpu", "zone", "accelerator"], flag_values=FLAGS)


def main(argv) -> int:
    cli.parse(FLAGS, argv, __doc__)
    F = FLAGS
    # the workers parse the same overrides; a typo found here costs no TPU time
    registry.get_experiment(F.experiment, **({"model": F.model} if F.model else {}), overrides=F.set)
    vm = tpu.TpuVm(name=F.tpu, zone=F.zone, accelerator=F.accelerator, project=F.project,
                   version=F.version, spot=F.spot)
    jobs = tpu.job_commands(vm, F.experiment, model=F.model, overrides=F.set, run_name=F.run_name,
                            libtpu_args=F.libtpu_args)
    if F.dry_run:
        print(tpu.dry_run_script(vm, jobs))
        return 0
    action = tpu.launch(vm, jobs)
    print(f"{action} TPU VM {vm.name}; run started. Logs on each worker: "
          f"{tpu.REMOTE_DIR}/logs/{F.run_name or F.experiment + '-' + vm.name}.log")
    return 0


if __name__ == "__main__":
    cli.run(main)
