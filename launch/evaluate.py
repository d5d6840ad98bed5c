"""Task accuracy (and optionally held-out loss) of a checkpoint on the embedded data's held-out scenes.

    python -m launch.evaluate --checkpoint DIR [--model=tiny] [--num=64] [--kinds=caption,count,ocr,grounding]
        [--chat] [--loss] [--ablate_pixels] [--json OUT.json]

DIR is a training checkpoint folder (qwen2vl_jax.train.checkpoint: latest step's params) or a converted
checkpoint (model_config.json + params/). The model config comes from DIR/model_config.json (or its
parent's) when present, else from the --model preset (+ --set key=value overrides of ModelConfig fields).
Held-out images and videos are preprocessed at the pixel budgets of the run that wrote DIR
(DIR/data_config.json or its parent's, written by launch.pretrain), else at formats.VisionOptions()'s
defaults; the budget used is printed (a model evaluated at another resolution than it trained at scores low).
Prints one line per metric: accuracy and the chance level (permutation baseline) beside it.
--ablate_pixels (implies --loss) also scores the accuracy and the held-out loss with every pixel value set
to 0 (blank images): the gap says how much the model reads its images (0 = it answers from the text prior
alone; a prior can beat the permutation chance, e.g. a typical box for grounding).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax

from qwen2vl_jax.eval import evaluation
from qwen2vl_jax.model.config import ModelConfig, get_config


def _coerce(cfg: ModelConfig, key: str, value: str):
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    if key not in fields or key == "vision":
        raise ValueError(f"--set {key}: not a ModelConfig field; valid: {', '.join(k for k in fields if k != 'vision')}")
    cur = getattr(cfg, key)
    if isinstance(cur, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--set {key}={value}: expected true/false")
        return value.lower() in ("true", "1")
    if isinstance(cur, tuple):
        return tuple(type(cur[0])(v) for v in value.split(","))
    return type(cur)(value)


def model_config_for(checkpoint: str, preset: str, overrides=()) -> ModelConfig:
    from qwen2vl_jax.model import hf
    for d in (checkpoint, os.path.dirname(os.path.abspath(checkpoint))):
        path = os.path.join(d, "model_config.json")
        if os.path.exists(path):
            with open(path) as f:
                cfg = hf.model_config_from_dict(json.load(f))
            break
    else:
        cfg = get_config(preset)
    for kv in overrides:
        if "=" not in kv:
            raise ValueError(f"--set {kv!r}: expected key=value")
        k, v = kv.split("=", 1)
        cfg = cfg.replace(**{k: _coerce(cfg, k, v)})
    return cfg


def vision_options_for(checkpoint: str):
    """(formats.VisionOptions, source): the pixel budgets of the run's data_config.json, else the defaults."""
    from launch.pretrain import DATA_CONFIG_FILE
    from qwen2vl_jax.data import formats
    from qwen2vl_jax.data.pipeline import DataConfig
    for d in (checkpoint, os.path.dirname(os.path.abspath(checkpoint))):
        path = os.path.join(d, DATA_CONFIG_FILE)
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            fields = [f.name for f in dataclasses.fields(DataConfig)]
            missing, unknown = [f for f in fields if f not in data], sorted(set(data) - set(fields))
            if missing or unknown:
                raise ValueError(f"{path} is not a DataConfig written by launch.pretrain (missing: "
                                 f"{', '.join(missing) or '-'}; unknown: {', '.join(unknown) or '-'})")
            return DataConfig(**data).vision_options, path      # the inverse of DataConfig.to_dict
    return formats.VisionOptions(), "defaults (no data_config.json beside the checkpoint)"


def load_params(cfg: ModelConfig, checkpoint: str) -> dict:
    from qwen2vl_jax.train import checkpoint as ckpt
    from qwen2vl_jax.model import model

    if not os.path.isdir(checkpoint):
        raise ValueError(f"--checkpoint {checkpoint!r} is not a directory")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(lambda r: model.init_params(cfg, r), jax.random.PRNGKey(0))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
    return ckpt.load_params(checkpoint, abstract)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--model", default="tiny", help="config preset when the checkpoint has no model_config.json")
    p.add_argument("--set", action="append", default=[], help="ModelConfig field override key=value")
    p.add_argument("--num", type=int, default=64, help="held-out items per kind")
    p.add_argument("--kinds", default="caption,count,ocr,grounding",
                   help=f"comma list from {','.join(evaluation.ACCURACY_KINDS)}")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: longest answer + 8")
    p.add_argument("--chat", action="store_true", help="ChatML prompts (stage-3 form) instead of pre-training form")
    p.add_argument("--loss", action="store_true", help="also report the held-out loss per data type")
    p.add_argument("--ablate_pixels", action="store_true",
                   help="also report accuracy and held-out loss on blank images (implies --loss)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    a = p.parse_args(argv)

    kinds = tuple(k for k in a.kinds.split(",") if k)
    cfg = model_config_for(a.checkpoint, a.model, a.set)
    params = load_params(cfg, a.checkpoint)
    print(f"checkpoint {a.checkpoint}: model {cfg.name}, {sum(x.size for x in jax.tree.leaves(params)):,} params",
          flush=True)
    vision_opts, source = vision_options_for(a.checkpoint)
    print(f"pixel budgets from {source}: images {vision_opts.min_pixels}..{vision_opts.max_pixels}, "
          f"video frames {vision_opts.video_min_pixels}..{vision_opts.video_max_pixels} "
          f"(total {vision_opts.video_total_pixels})", flush=True)
    def accuracy(zero_pixels: bool):
        return evaluation.evaluate_accuracy(cfg, params, num=a.num, kinds=kinds, batch_size=a.batch_size,
                                            max_new_tokens=a.max_new_tokens, chat=a.chat, vision_opts=vision_opts,
                                            zero_pixels=zero_pixels, log=lambda s: print(s, flush=True))

    results = accuracy(False)
    blank = None
    if a.ablate_pixels:
        print("the same prompts with blank images (every pixel value 0):", flush=True)
        blank = accuracy(True)
    print(evaluation.accuracy_table(results, blank))
    for r in results.values():
        for pred, exp in r.examples[:2]:
            print(f"  {r.kind}: predicted {pred!r}, expected {exp!r}")
    out = {"checkpoint": a.checkpoint, "chat": a.chat, "num": a.num,
           "accuracy": evaluation.by_metric(results), "chance": evaluation.by_metric(results, "chance")}
    if blank:
        out["accuracy_blank_images"] = evaluation.by_metric(blank)
    if a.loss or a.ablate_pixels:
        eval_fn = evaluation.make_eval_fn(cfg, {"vision_options": vision_opts}, seq_len=1024, max_patches=2048,
                                          batch_size=4)
        losses = eval_fn(params)
        out["heldout_loss"] = losses
        print("held-out loss: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        if a.ablate_pixels:
            zeroed_losses = eval_fn(params, zero_pixels=True)
            out["heldout_loss_zeroed_pixels"] = zeroed_losses
            print("held-out loss with zeroed pixels (gap = how much the model reads its images):")
            for k, v in losses.items():
                print(f"  {k:10s} real {v:.4f}  zeroed {zeroed_losses[k]:.4f}  gap {zeroed_losses[k] - v:+.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
