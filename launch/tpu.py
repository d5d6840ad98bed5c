"""Launch a pretraining run on Cloud TPU VM slices with `gcloud`, and keep it running through preemptions.

    python -m launch.tpu --experiment=stage1 --model=7b --tpu=my-v5p --zone=us-east5-a --accelerator=v5p-128 \\
        --set workdir=gs://BUCKET/runs/stage1_7b [--spot] [--queued] [--num_slices=N] [--watch] [--dry_run] \\
        [--project=P] [--version=RUNTIME] [--libtpu_args="--xla_flag=value ..."]

Reuses the TPU VM NAME or creates it (`--queued`: through a queued resource, as every `--num_slices` > 1 job
is; its slices are NAME-0 .. NAME-{N-1}), ships the repository's HEAD to every worker, installs it, mounts
the buckets the data mixture reads (gcsfuse, read-only, at /mnt/gcs/BUCKET), and starts `launch.pretrain`
there (the steps: qwen2vl_jax/cloud/tpu.py) with the TPU compiler flags launch.aot compiles with in
LIBTPU_INIT_ARGS (then --libtpu_args, which win). `--num_slices=N` also sets `mesh.dcn=N` (data parallel across
slices) and the MEGASCALE variables that join the slices. `--dry_run` prints the commands, one per line, as a
runnable shell script (with the `--watch` command last). The experiment and its `--set` overrides are checked
here first (experiments/registry.py), so a typo fails before any TPU VM is created.

`--watch` stays on this machine and supervises the job: it polls the slice every --poll_s seconds and the
run on worker 0; a preempted or failed slice is deleted, created again, reinstalled and the same command
restarted, which resumes from the newest good checkpoint in the workdir; a run that failed on a healthy slice
is restarted. At most --max_retries times; one line per event. A spot, multi-slice or watched job needs a
gs:// workdir: a recreated slice has new disks.

Exit status: 0 launched (without --watch) or the run finished; 1 a gcloud command failed (without --watch);
2 a configuration error (here, or launch.pretrain's on the pod); 3 the run stopped on non-finite steps; 4 more
than --max_retries preemptions / failures; 5 the slice did not come up within --create_timeout_h hours.
"""
from __future__ import annotations

import sys

from absl import flags

from experiments import flags as cli
from experiments import registry
from qwen2vl_jax.cloud import tpu
from qwen2vl_jax.data import sources
from qwen2vl_jax.train import paths

FLAGS = flags.FlagValues()
cli.define_experiment(FLAGS, default=None)
cli.define_model(FLAGS, default=None, help="model size preset (default: the experiment's)")
cli.define_set(FLAGS, what="the experiment config (passed to launch.pretrain)")
flags.DEFINE_string("tpu", None, "TPU VM name (several slices: the queued resource's name and node prefix)",
                    flag_values=FLAGS)
flags.DEFINE_string("zone", None, "GCP zone, e.g. us-east5-a", flag_values=FLAGS)
flags.DEFINE_string("accelerator", None, "accelerator type of one slice, e.g. v5p-128", flag_values=FLAGS)
flags.DEFINE_string("project", None, "GCP project (default: gcloud's configured project)", flag_values=FLAGS)
flags.DEFINE_string("version", None, "TPU runtime version (default per generation)", flag_values=FLAGS)
flags.DEFINE_string("run_name", None, "log file name (default EXPERIMENT-TPU)", flag_values=FLAGS)
flags.DEFINE_bool("spot", False, "Spot TPU VMs (preemptible; use with --watch)", flag_values=FLAGS)
flags.DEFINE_bool("queued", False, "create through a queued resource (always with --num_slices > 1)",
                  flag_values=FLAGS)
flags.DEFINE_integer("num_slices", 1, "slices joined over the data-centre network (multi-slice)", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_bool("watch", False, "supervise the job: recreate and restart after preemptions / failures",
                  flag_values=FLAGS)
flags.DEFINE_integer("max_retries", 10, "--watch: preemptions + failed runs before giving up", lower_bound=0,
                     flag_values=FLAGS)
flags.DEFINE_float("poll_s", 60.0, "--watch: seconds between two looks at the slice and the run", lower_bound=1,
                   flag_values=FLAGS)
flags.DEFINE_float("create_timeout_h", 6.0, "--watch: hours a (queued) slice may take to come up",
                   lower_bound=0.01, flag_values=FLAGS)
flags.DEFINE_string("libtpu_args", "", "extra TPU compiler flags for the job's LIBTPU_INIT_ARGS, after the "
                    "defaults of qwen2vl_jax.perf.aot.TPU_COMPILER_FLAGS (yours win)", flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "print the commands, run nothing", flag_values=FLAGS)
flags.mark_flags_as_required(["experiment", "tpu", "zone", "accelerator"], flag_values=FLAGS)


def data_buckets(exp) -> list[str]:
    """The buckets of the gs:// sources of the training and held-out mixtures (mounted on every worker)."""
    names = [n for n, _ in tuple(exp.data.mixture) + tuple(exp.eval_mixture)]
    specs = [sources.parse_source(n) for n in names]
    return sorted({b for s in specs if s.kind == "arrayrecord" for b in [sources.gcs_bucket(s.arg)] if b})


def main(argv) -> int:
    cli.parse(FLAGS, argv, __doc__)
    F = FLAGS
    overrides = ([f"mesh.dcn={F.num_slices}"] if F.num_slices > 1 else []) + list(F.set)
    # the workers parse the same overrides; a typo found here costs no TPU time
    exp = registry.get_experiment(F.experiment, **({"model": F.model} if F.model else {}), overrides=overrides)
    if (F.watch or F.spot or F.num_slices > 1) and not paths.is_remote(exp.run_dir):
        raise ValueError(f"workdir {exp.run_dir!r} is on the workers' disks, which a preempted or recreated slice "
                         f"loses: pass --set workdir=gs://BUCKET/PATH")
    vm = tpu.TpuVm(name=F.tpu, zone=F.zone, accelerator=F.accelerator, project=F.project, version=F.version,
                   spot=F.spot, num_slices=F.num_slices, queued=F.queued)
    job = tpu.make_job(vm, F.experiment, model=F.model, overrides=overrides, run_name=F.run_name,
                       buckets=data_buckets(exp), libtpu_args=F.libtpu_args)
    watch_cfg = tpu.WatchConfig(poll_s=F.poll_s, max_retries=F.max_retries, create_timeout_s=F.create_timeout_h * 3600)
    if F.dry_run:
        print(tpu.dry_run_script(vm, job.commands, watch=tpu.watch_script(job, watch_cfg) if F.watch else None))
        return 0
    log = f"{tpu.REMOTE_DIR}/logs/{job.run_name}.log"
    if F.watch:
        status = tpu.Supervisor(job, watch_cfg, log=lambda m: print(m, flush=True)).run()
        print(f"run {job.run_name}: exit status {status}; log on each worker: {log}")
        return status
    supervisor = tpu.Supervisor(job, watch_cfg)
    try:
        action = tpu.ensure_vm(vm)
        if vm.uses_queue:
            print("waiting for the queued resource to become ACTIVE", flush=True)
            if not supervisor.wait_ready():
                print(f"ERROR: the slices of {vm.name} did not come up", file=sys.stderr)
                return tpu.EXIT_NO_CAPACITY
        tpu.execute(supervisor.resolve(job.commands))
    except RuntimeError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    print(f"{action} TPU VM {vm.name}; run started. Logs on each worker: {log}")
    return 0


if __name__ == "__main__":
    cli.run(main)
