"""Ahead-of-time compile of an experiment's train step for a TPU topology, on a CPU-only machine.

    python -m launch.aot --experiment=stage2 --model=72b --topology=v5p-256 [--set key=value ...]
    python -m launch.aot --experiment=stage1 --model=72b --topology=v5p-512 --num_slices=2    # multi-slice
        [--estimate [--image_patches=1024 --doc_tokens=2048]] [--microbatches=auto] [--save_hlo=FILE]

Prints the per-chip memory and FLOPs of the compiled step and exits with status 2 if it does not fit in
the chip's HBM, 1 on a bad argument. The compile itself is qwen2vl_jax.perf.aot (topology names,
libtpu discovery, the TPU compiler flags, the memory check).

--num_slices=N compiles for N slices of the topology joined over the data-centre network, with the mesh's
`dcn` axis set to N (data parallel across slices; every other axis within a slice).

--estimate: the step-time estimate of the compiled program per device per step (qwen2vl_jax/perf/roofline.py).
THE estimate is the compiler view: the TPU compiler's own estimated_cycles of every XLA op, with loop trip
counts, + the ops it gives no cycles (synchronous collectives, gathers) at their roofline time + the
attention kernels' modelled time (their FLOPs for the blocks they visit, head_dim padded to 128 lanes, at
the fraction of peak the compiler gives this program's own matmul ops, or --kernel_efficiency). Beside it
the roofline (every FLOP at peak, HBM and ICI overlapped) is an upper bound on speed. MFU is against
flops.py's useful FLOPs for rows packed with --image_patches-patch images and --doc_tokens-token
documents. The last line is
`estimate (compiler view): <s> s/step, MFU <f> [upper bound (roofline): <s> s/step, MFU <f>, <term>-bound]`.
With --num_slices > 1 the collectives that cross slices are costed at ICI bandwidth like the others (the
data-centre network is slower).

--microbatches=auto: compiles with microbatch counts that divide the batch into equal per-device batches
(binary search; one line per try with its memory) and keeps the smallest whose step needs at most
(1 - --hbm_headroom) of the chip's HBM (or of --hbm_gib) per device.

TPU compiler flags (qwen2vl_jax.perf.aot.TPU_COMPILER_FLAGS) are set in LIBTPU_INIT_ARGS before libtpu
starts; flags in your own LIBTPU_INIT_ARGS come after them and win. --notpu_flags leaves them out.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

# The TPU devices are libtpu's compile-only ones; the host backend must never probe for an accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

from experiments import flags as cli  # noqa: E402
from experiments import registry  # noqa: E402
from qwen2vl_jax.model.config import ATTENTION_IMPLS  # noqa: E402
from qwen2vl_jax.perf import aot, roofline  # noqa: E402
from qwen2vl_jax.train import flops, sharding  # noqa: E402

FLAGS = flags.FlagValues()
cli.define_experiment(FLAGS, default="stage2")
cli.define_model(FLAGS, default="72b")
cli.define_set(FLAGS)
flags.DEFINE_string("topology", None, "accelerator type (v5p-256) or topology (v5p:4x4x8); default: the experiment's "
                    "(the slice its mesh, microbatches and remat were sized for)", flag_values=FLAGS)
flags.DEFINE_integer("num_slices", 1, "slices of --topology (multi-slice; sets mesh.dcn)", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_enum("attention", None, ATTENTION_IMPLS,
                  "attention_impl (default: the experiment's; auto: block_sparse on TPU where the lengths tile, else xla)", flag_values=FLAGS)
flags.DEFINE_bool("estimate", False, "print the roofline step-time estimate of the compiled step", flag_values=FLAGS)
flags.DEFINE_integer("image_patches", aot.PackedLayout.image_patches,
                     "patches per image the estimate assumes (the rows' patch budget is packed with such images)",
                     flag_values=FLAGS)
flags.DEFINE_float("kernel_efficiency", None, "the attention kernels' fraction of MXU peak in the estimate "
                   "(default: the fraction the compiler gives the program's own matmul ops)", flag_values=FLAGS)
flags.DEFINE_integer("doc_tokens", aot.PackedLayout.doc_tokens,
                     "tokens per document the estimate assumes (rows packed with such documents)", flag_values=FLAGS)
flags.DEFINE_string("microbatches", None, "gradient-accumulation steps: a positive integer, or auto (the "
                    "smallest that fits; default: the experiment's)", flag_values=FLAGS)
flags.DEFINE_float("hbm_headroom", 0.1, "fraction of HBM --microbatches=auto leaves free (runtime buffers, "
                   "fragmentation, what the compiler's count leaves out)", flag_values=FLAGS)
flags.DEFINE_float("hbm_gib", None, "HBM per device to check against, GiB (default: the chip's)", flag_values=FLAGS)
flags.DEFINE_string("save_hlo", None, "write the compiled program's HLO text here (for re-analysis: "
                    "qwen2vl_jax.perf.roofline.estimate takes it)", flag_values=FLAGS)
flags.DEFINE_string("json", None, "append the result as one JSON line to this file (what benchmarks.estimates "
                    "tabulates)", flag_values=FLAGS)
flags.DEFINE_bool("tpu_flags", True, "set the TPU compiler flags of qwen2vl_jax.perf.aot.TPU_COMPILER_FLAGS",
                  flag_values=FLAGS)


def _microbatches(text: str | None) -> int | str | None:
    if text is None or text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--microbatches={text!r}; valid: a positive integer or auto")
    return int(text)


def run_experiment(experiment: str, model: str, topology: str | None, overrides=(), attention: str | None = None,
                   microbatches: int | str | None = None, hbm_headroom: float = 0.1, hbm_gib: float | None = None,
                   compiler_flags: bool = True, progress=print, num_slices: int = 1):
    """AOT-compiles the experiment's train step for `num_slices` x `topology` (default: the experiment's slice).
    Returns (exp, cfg, AotResult); with microbatches="auto" exp.microbatches is the count found."""
    exp = registry.get_experiment(experiment, model, [f"mesh.dcn={num_slices}", *overrides])
    if not (topology or exp.topology):
        raise ValueError(f"--topology: experiment {experiment} at model {model} names no TPU slice; pass one "
                         f"(v5p-8, v5p:2x2x1, ...)")
    topo = aot.parse_topology(topology or exp.topology, num_slices)
    if isinstance(microbatches, int):
        exp = registry.apply_overrides(exp, [f"microbatches={microbatches}"])
    if not 0 <= hbm_headroom < 1:
        raise ValueError(f"--hbm_headroom={hbm_headroom}; valid: 0 <= headroom < 1")
    if hbm_gib is not None and hbm_gib <= 0:
        raise ValueError(f"--hbm_gib={hbm_gib}; valid: a positive number of GiB")
    cfg = exp.model.replace(attention_impl=attention) if attention else exp.model
    hbm = int(hbm_gib * aot.GiB) if hbm_gib else None

    def compile_with(m: int) -> aot.AotResult:
        step_cfg = dataclasses.replace(exp.step_config(), microbatches=m)
        return aot.compile_train_step(cfg, step_cfg, exp.mesh, topo, exp.batch_size, exp.data.seq_len,
                                      exp.data.max_patches, compiler_flags=compiler_flags, hbm_per_device=hbm)
    mesh = dict(zip(sharding.MESH_AXES, exp.mesh.shape(topo.chips)))
    replicas = mesh["dcn"] * mesh["data"] * mesh["fsdp"]
    candidates = aot.microbatch_candidates(exp.batch_size, replicas)
    if microbatches is None and exp.microbatches not in candidates:
        # the layout's count was sized for another slice (e.g. --num_slices): whole rows per device or search
        progress(f"microbatches={exp.microbatches} (sized for {exp.topology or 'another mesh'}) does not give each of "
                 f"the {replicas} batch shards whole rows; searching as --microbatches=auto")
        microbatches = "auto"
    try:
        if microbatches == "auto":
            limit = (1 - hbm_headroom) * (hbm or topo.chip.hbm_bytes)
            progress(f"--microbatches=auto: batch {exp.batch_size} over dcn x data x fsdp = {replicas} "
                     f"devices; candidates {candidates}; limit {limit / aot.GiB:.2f} GiB per device "
                     f"({100 * hbm_headroom:.0f}% headroom)")
            m, result = aot.fit_microbatches(compile_with, candidates, limit, progress)
            exp = registry.apply_overrides(exp, [f"microbatches={m}"])
        else:
            result = compile_with(exp.microbatches)
    except NotImplementedError as e:
        if "Mosaic kernels cannot be automatically partitioned" in str(e):
            raise RuntimeError(
                f"attention_impl={cfg.attention_impl!r}: the Pallas kernel is called without shard_map, so it "
                "cannot run on a multi-device mesh (qwen2vl_jax/model/attention.py); rerun with "
                "--attention=xla") from e
        raise
    return exp, cfg, result


def _record(exp, cfg, result, est, started: float) -> dict:
    """One JSON line for --json: the layout that was compiled, its memory and (with --estimate) the estimate."""
    chip = result.generation or aot.parse_topology(result.topology).generation
    rec = dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), argv=sys.argv[1:],
               experiment=exp.name, model=cfg.name, stage=exp.stage, topology=result.topology, chip=chip,
               chips=result.chips, mesh=dict(zip(sharding.MESH_AXES, exp.mesh.shape(result.n_devices))),
               microbatches=exp.microbatches, remat=cfg.remat_policy,
               attention=aot.describe_attention(cfg.attention_impl, exp.data.seq_len, exp.data.max_patches),
               memory_gib=result.total_bytes / aot.GiB, hbm_gib=result.hbm_per_device / aot.GiB, fits=result.fits,
               compile_s=result.compile_s, lower_s=result.lower_s, wall_s=time.time() - started)
    if est is not None:
        rec.update(compiler_view_s=est.compiler_view_s, mfu_compiler_view=est.mfu(est.useful_flops, est.compiler_view_s),
                   compiler_s=est.compiler_s, uncosted_s=est.uncosted_s, kernel_s=est.kernel_s,
                   kernel_fraction=est.kernel_fraction, matmul_efficiency=est.matmul_efficiency,
                   step_s=est.step_s, bound=est.bound, no_overlap_s=est.no_overlap_s, terms_s=est.terms,
                   mfu=est.mfu(est.useful_flops, est.step_s),
                   mfu_no_overlap=est.mfu(est.useful_flops, est.no_overlap_s),
                   mfu_6nd=est.mfu(est.six_nd_flops, est.step_s), useful_flops=est.useful_flops,
                   flops=est.flops, kernel_flops=est.analysis.total_kernel_flops, hbm_bytes=est.analysis.hbm_bytes,
                   ici_bytes=est.analysis.ici_bytes)
    return rec


def _append_json(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def main(argv) -> int:
    cli.parse(FLAGS, argv, __doc__)
    started, est = time.time(), None
    try:
        layout = aot.PackedLayout(FLAGS.image_patches, FLAGS.doc_tokens)
        roofline.check_kernel_efficiency(FLAGS.kernel_efficiency)
        exp, cfg, result = run_experiment(FLAGS.experiment, FLAGS.model, FLAGS.topology, FLAGS.set,
                                          FLAGS.attention, _microbatches(FLAGS.microbatches), FLAGS.hbm_headroom,
                                          FLAGS.hbm_gib, FLAGS.tpu_flags, num_slices=FLAGS.num_slices)
        if FLAGS.estimate:
            est = aot.estimate_train_step(result, cfg, exp.trainable, exp.batch_size, exp.data.seq_len,
                                          exp.data.max_patches, layout, FLAGS.kernel_efficiency)
    except aot.DoesNotFitError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        if FLAGS.json:
            _append_json(FLAGS.json, dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                                          argv=sys.argv[1:], fits=False, error=str(e),
                                          wall_s=time.time() - started))
        return 2
    except (ValueError, RuntimeError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    mesh = ", ".join(f"{k}={getattr(exp.mesh, k)}" for k in sharding.MESH_AXES)
    print(f"{exp.name} model={cfg.name} batch={exp.batch_size}x{exp.data.seq_len} tokens, "
          f"{exp.data.max_patches} patches/row, microbatches={exp.microbatches}, mesh({mesh}), "
          f"trainable={'+'.join(exp.trainable)}, dtype={cfg.dtype}/{cfg.param_dtype}, remat={cfg.remat_policy}, "
          f"attention={aot.describe_attention(cfg.attention_impl, exp.data.seq_len, exp.data.max_patches)}")
    print(f"TPU compiler flags (LIBTPU_INIT_ARGS): {aot.libtpu_args_in_effect() or '(none)'}")
    print(result.format())
    # 6 x params x tokens per optimizer step, for comparison with XLA's count
    six = flops.six_nd(cfg, tokens=exp.batch_size * exp.data.seq_len,
                       patches=exp.batch_size * exp.data.max_patches)
    print(f"FLOPs per step (6 x params x tokens): {six:.4g} total, {six / result.n_devices:.4g} per device "
          f"(XLA's count takes a scanned layer stack once)")
    if FLAGS.save_hlo:
        with open(FLAGS.save_hlo, "w") as f:
            f.write(roofline.hlo_text(result.compiled))
        print(f"HLO text written to {FLAGS.save_hlo}")
    if FLAGS.estimate:
        useful = est.useful_flops * result.n_devices
        print(f"useful FLOPs per step (flops.py; rows of {layout.describe()}): {useful:.6g} total, "
              f"{est.useful_flops:.6g} per device")
        print(roofline.format_estimate(est))
    if FLAGS.json:
        _append_json(FLAGS.json, _record(exp, cfg, result, est, started))
    try:
        aot.check_fits(result)
    except aot.DoesNotFitError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    cli.run(main)
