"""Ahead-of-time compile of an experiment's train step for a TPU topology, on a CPU-only machine.

    python -m launch.aot --experiment=stage2 --model=72b --topology=v5p-256 [--set key=value ...]
    python -m launch.aot --experiment=stage1 --model=72b --topology=v5p-512 --num_slices=2    # multi-slice

Prints the per-chip memory and FLOPs of the compiled step and exits with status 2 if it does not fit in
the chip's HBM, 1 on a bad argument. `--num_slices=N` compiles for N slices of the topology joined over the
data-centre network, with the mesh's `dcn` axis set to N (data parallel across slices). The compile itself is qwen2vl_jax.train.aot (topology names,
libtpu discovery, the memory check).
"""
from __future__ import annotations

import os
import sys

# The TPU devices are libtpu's compile-only ones; the host backend must never probe for an accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

from experiments import flags as cli  # noqa: E402
from experiments import registry  # noqa: E402
from qwen2vl_jax.model.config import ATTENTION_IMPLS  # noqa: E402
from qwen2vl_jax.train import aot, flops, sharding  # noqa: E402

FLAGS = flags.FlagValues()
cli.define_experiment(FLAGS, default="stage2")
cli.define_model(FLAGS, default="72b")
cli.define_set(FLAGS)
flags.DEFINE_string("topology", "v5p-256", "accelerator type (v5p-256) or topology (v5p:4x4x8)", flag_values=FLAGS)
flags.DEFINE_integer("num_slices", 1, "slices of --topology (multi-slice; sets mesh.dcn)", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_enum("attention", None, ATTENTION_IMPLS,
                  "attention_impl for the TPU (default: the experiment's; auto -> splash)", flag_values=FLAGS)


def run_experiment(experiment: str, model: str, topology: str, overrides=(), attention: str | None = None,
                   num_slices: int = 1):
    """AOT-compiles the experiment's train step for `num_slices` x `topology`. Returns (exp, cfg, AotResult)."""
    topo = aot.parse_topology(topology, num_slices)
    exp = registry.get_experiment(experiment, model, [f"mesh.dcn={num_slices}", *overrides])
    cfg = exp.model.replace(attention_impl=aot.resolve_attention(attention or exp.model.attention_impl))
    try:
        result = aot.compile_train_step(cfg, exp.step_config(), exp.mesh, topo, exp.batch_size,
                                        exp.data.seq_len, exp.data.max_patches)
    except NotImplementedError as e:
        if "Mosaic kernels cannot be automatically partitioned" in str(e):
            raise RuntimeError(
                f"attention_impl={cfg.attention_impl!r}: the Pallas kernel is called without shard_map, so it "
                "cannot run on a multi-device mesh (qwen2vl_jax/model/attention.py); rerun with "
                "--attention=xla") from e
        raise
    return exp, cfg, result


def main(argv) -> int:
    cli.parse(FLAGS, argv, __doc__)
    try:
        exp, cfg, result = run_experiment(FLAGS.experiment, FLAGS.model, FLAGS.topology, FLAGS.set,
                                          FLAGS.attention, FLAGS.num_slices)
    except aot.DoesNotFitError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    mesh = ", ".join(f"{k}={getattr(exp.mesh, k)}" for k in sharding.MESH_AXES)
    print(f"{exp.name} model={cfg.name} batch={exp.batch_size}x{exp.data.seq_len} tokens, "
          f"{exp.data.max_patches} patches/row, microbatches={exp.microbatches}, mesh({mesh}), "
          f"trainable={'+'.join(exp.trainable)}, dtype={cfg.dtype}/{cfg.param_dtype}, remat={cfg.remat_policy}, "
          f"attention={cfg.attention_impl}")
    print(result.format())
    # 6 x params x tokens per optimizer step, for comparison with XLA's count
    six = flops.six_nd(cfg, tokens=exp.batch_size * exp.data.seq_len,
                       patches=exp.batch_size * exp.data.max_patches)
    print(f"FLOPs per step (6 x params x tokens): {six:.4g} total, {six / result.n_devices:.4g} per device "
          f"(XLA's count takes a scanned layer stack once)")
    try:
        aot.check_fits(result)
    except aot.DoesNotFitError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    cli.run(main)
