"""Task accuracy (and optionally held-out loss) of a checkpoint on the embedded data's held-out split.

    python -m launch.evaluate --checkpoint DIR [--model=tiny] [--set key=value ...] [--num=64]
        [--kinds=caption,count,ocr,grounding] [--chat] [--loss] [--ablate_pixels] [--json OUT.json]

DIR is a training run (RUN, RUN/checkpoints: its newest step that restores; RUN/checkpoints/STEP: that step),
a converted checkpoint (model_config.json + params/) or a Hugging Face folder, local or gs:// (as is --json).
The model config comes from the run's model_config.json (the converted checkpoint's, the folder's
config.json) when there is one, else from the --model preset; --set overrides its fields (e.g.
attention_impl=xla, vision.depth=2).
Held-out images and videos are preprocessed at the pixel budgets of the run that wrote DIR (its
data_config.json), else at formats.VisionOptions()'s defaults; the budget used is printed
(a model evaluated at another resolution than it trained at scores low).
Prints one line per metric: accuracy and the chance level (permutation baseline) beside it.
--loss also reports the held-out loss of every data kind in evaluation.LOSS_KINDS (eval.evaluation
HeldoutEvaluator, at the run's row shape when DIR has a data_config.json, else 1024 tokens / 2048 patches).
--ablate_pixels (implies --loss) also scores the accuracy and the held-out loss with every pixel value set
to 0 (blank images): the gap says how much the model reads its images (0 = it answers from the text prior
alone; a prior can beat the permutation chance, e.g. a typical box for grounding).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
from absl import flags

from experiments import flags as cli
from experiments import registry
from qwen2vl_jax.data import formats
from qwen2vl_jax.data.pipeline import DataConfig
from qwen2vl_jax.eval import evaluation
from qwen2vl_jax.model.config import get_config
from qwen2vl_jax.train import paths, rundir, sharding

FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "RUN, RUN/checkpoints, RUN/checkpoints/STEP, a converted checkpoint or "
                    "a Hugging Face folder", flag_values=FLAGS)
flags.mark_flag_as_required("checkpoint", flag_values=FLAGS)
cli.define_model(FLAGS, help="model preset when the checkpoint has no model_config.json")
cli.define_set(FLAGS, "the model config")
flags.DEFINE_integer("num", 64, "held-out items per task kind", flag_values=FLAGS)
cli.define_list(FLAGS, "kinds", ("caption", "count", "ocr", "grounding"), evaluation.ACCURACY_KINDS,
                "task kinds to score")
flags.DEFINE_integer("batch_size", 16, "rows per batch (decoding and held-out loss)", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", None, "default: longest answer + 8", flag_values=FLAGS)
flags.DEFINE_bool("chat", False, "ChatML prompts (stage-3 form) instead of the pre-training form", flag_values=FLAGS)
flags.DEFINE_bool("loss", False, "also report the held-out loss per data kind", flag_values=FLAGS)
flags.DEFINE_integer("loss_samples", 16, "--loss: held-out samples per data kind", flag_values=FLAGS)
flags.DEFINE_bool("ablate_pixels", False, "also report accuracy and held-out loss on blank images (implies --loss)",
                  flag_values=FLAGS)
flags.DEFINE_string("json", None, "write the results to this JSON file", flag_values=FLAGS)

LOSS_ROW = dict(seq_len=1024, max_patches=2048)     # row shape of the held-out loss without a run's data config


def main(argv: Sequence[str]) -> dict:
    cli.parse(FLAGS, argv, __doc__)
    ckpt = FLAGS.checkpoint
    cfg = registry.apply_overrides(rundir.read_model_config(ckpt) or get_config(FLAGS.model), FLAGS.set)
    params = rundir.load_params(cfg, ckpt)
    print(f"checkpoint {ckpt}: model {cfg.name}, {sum(x.size for x in jax.tree.leaves(params)):,} params",
          flush=True)
    run_data, source = rundir.read_data_config(ckpt)
    vision_opts = run_data.vision_options if run_data else formats.VisionOptions()
    print(f"pixel budgets from {source or 'defaults (no data_config.json beside the checkpoint)'}: images "
          f"{vision_opts.min_pixels}..{vision_opts.max_pixels}, video frames {vision_opts.video_min_pixels}.."
          f"{vision_opts.video_max_pixels} (total {vision_opts.video_total_pixels})", flush=True)

    def accuracy(zero_pixels: bool):
        return evaluation.evaluate_accuracy(cfg, params, num=FLAGS.num, kinds=FLAGS.kinds, batch_size=FLAGS.batch_size,
                                            max_new_tokens=FLAGS.max_new_tokens, chat=FLAGS.chat,
                                            vision_opts=vision_opts, zero_pixels=zero_pixels,
                                            log=lambda s: print(s, flush=True))

    results = accuracy(False)
    blank = None
    if FLAGS.ablate_pixels:
        print("the same prompts with blank images (every pixel value 0):", flush=True)
        blank = accuracy(True)
    print(evaluation.accuracy_table(results, blank))
    for r in results.values():
        for pred, expected in r.examples[:2]:
            print(f"  {r.kind}: predicted {pred!r}, expected {expected!r}")
    out = {"checkpoint": ckpt, "chat": FLAGS.chat, "num": FLAGS.num,
           "accuracy": evaluation.by_metric(results), "chance": evaluation.by_metric(results, "chance"),
           "examples": {r.kind: r.examples for r in results.values()}}
    if blank:
        out["accuracy_blank_images"] = evaluation.by_metric(blank)
    if FLAGS.loss or FLAGS.ablate_pixels:
        data = (dataclasses.replace(run_data, mixture=evaluation.loss_mixture()) if run_data
                else DataConfig(mixture=evaluation.loss_mixture(), **LOSS_ROW))
        # data parallel over as many devices as split the batch evenly (no device computes a replica)
        n_dev = math.gcd(FLAGS.batch_size, jax.device_count())
        mesh = sharding.make_mesh(sharding.MeshConfig(data=n_dev), jax.devices()[:n_dev])
        evaluate = evaluation.HeldoutEvaluator(cfg, data, num_samples=FLAGS.loss_samples, batch_size=FLAGS.batch_size,
                                               mesh=mesh)
        losses = out["heldout_loss"] = evaluate(params)
        print("held-out loss: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluation.kind_losses(losses).items())
              + f"; mean {losses['mean']:.4f}")
        if FLAGS.ablate_pixels:
            zeroed = out["heldout_loss_zeroed_pixels"] = evaluate(params, zero_pixels=True)
            print("held-out loss with zeroed pixels (gap = how much the model reads its images):")
            for k, v in evaluation.kind_losses(losses).items():
                z = zeroed[f"kind/{k}"]
                print(f"  {k:10s} real {v:.4f}  zeroed {z:.4f}  gap {z - v:+.4f}")
    if FLAGS.json:
        paths.write_json(FLAGS.json, out)
    return out


if __name__ == "__main__":
    cli.run(main)
