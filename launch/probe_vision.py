"""How fast does the vision tower learn an attribute of the embedded scenes, with a direct label?

    python -m launch.probe_vision --task=shape [--model=tiny] [--set key=value ...] [--steps=2000] [--batch=32]
        [--lr=1e-3] [--max_pixels=12544] [--checkpoint DIR [--freeze]] [--json OUT.json]

Trains the model's vision tower (tower + merger; from init, or from DIR's weights) with a linear head on
its mean-pooled merged features to classify one attribute of single-item synthetic scenes:
  colour   the colour of a single-group scene (8 classes)
  shape    the shape of a single-group scene (6 classes)
  word     the word of a single-word scene without digits (len(synthetic.WORDS) classes)
and prints a learning curve: training loss and accuracy on a fixed held-out set, with the majority-class
rate as chance. --freeze trains the head only: a linear probe of what DIR's tower already encodes (on
features standardised per vector, since a frozen tower's feature scale is arbitrary).

Why: in the three-stage pipeline the ViT learns only through the decoder's next-token loss, so a
slow-learning attribute there can be the tower (it cannot learn it that fast) or the coupling (the decoder
does not read it). This script measures the first on its own.
The model config is DIR's (model_config.json beside the checkpoint) or the --model preset's; --set overrides
its fields.
"""
from __future__ import annotations

import json
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from experiments import flags as cli
from experiments import registry
from qwen2vl_jax.data import media, synthetic
from qwen2vl_jax.model import model as M
from qwen2vl_jax.model import rope
from qwen2vl_jax.model.config import get_config
from qwen2vl_jax.train import rundir

TASKS = ("colour", "shape", "word")
STREAM = "vision_probe"

FLAGS = flags.FlagValues()
flags.DEFINE_enum("task", None, TASKS, "the attribute to classify", flag_values=FLAGS)
flags.mark_flag_as_required("task", flag_values=FLAGS)
cli.define_model(FLAGS, help="model preset when --checkpoint has no model_config.json")
cli.define_set(FLAGS, "the model config")
flags.DEFINE_string("checkpoint", None, "start from this checkpoint's vision tower (default: init)", flag_values=FLAGS)
flags.DEFINE_bool("freeze", False, "train the linear head only (needs --checkpoint)", flag_values=FLAGS)
flags.DEFINE_integer("steps", 2000, "training steps", flag_values=FLAGS)
flags.DEFINE_integer("batch", 32, "images per step", flag_values=FLAGS)
flags.DEFINE_float("lr", 1e-3, "peak learning rate", flag_values=FLAGS)
flags.DEFINE_integer("max_pixels", 16 * 28 * 28, "pixels per image (tiny recipe: 16 tokens)", flag_values=FLAGS)
flags.DEFINE_integer("eval_every", 100, "steps between held-out accuracy measurements", flag_values=FLAGS)
flags.DEFINE_integer("num_heldout", 256, "held-out images", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "init seed", flag_values=FLAGS)
flags.DEFINE_string("json", None, "write the curve to this JSON file", flag_values=FLAGS)
flags.register_multi_flags_validator(
    ["freeze", "checkpoint"], lambda f: not f["freeze"] or f["checkpoint"],
    message="--freeze needs --checkpoint (a frozen random tower is not worth probing)", flag_values=FLAGS)


def classes(task: str) -> tuple[str, ...]:
    return {"colour": tuple(synthetic.COLOURS), "shape": synthetic.SHAPES, "word": synthetic.WORDS}[task]


def labelled_scene(task: str, split: str, index: int, seed: int = 0):
    """(scene, label, next index): the first scene at or after `index` with exactly one item of the task."""
    names = classes(task)
    while True:
        sc = synthetic.scene(seed, index, split, STREAM)
        index += 1
        if task == "word":
            if len(sc.words) == 1 and sc.words[0].text in names:
                return sc, names.index(sc.words[0].text), index
        else:
            groups = sc.groups()
            if len(groups) == 1:
                return sc, names.index(groups[0][0] if task == "colour" else groups[0][1]), index


def make_batch(cfg, task: str, split: str, start: int, n: int, max_pixels: int, seed: int = 0):
    """n labelled scenes from scene index `start` -> (pixel_values [n,P,C], segment ids [n,P], positions [n,P,2],
    labels [n], next index); one image per row, P = the patch rows of the largest image the budget allows."""
    v = cfg.vision
    unit = v.patch_size * v.spatial_merge_size
    P = (max_pixels // unit**2) * v.merge_unit
    pv = np.zeros((n, P, v.patch_dim), np.float32)
    seg = np.zeros((n, P), np.int32)
    pos = np.zeros((n, P, 2), np.int32)
    labels = np.zeros((n,), np.int32)
    index = start
    for j in range(n):
        sc, labels[j], index = labelled_scene(task, split, index, seed)
        px, grid = media.preprocess_images([sc.image], max_pixels=max_pixels)
        if len(px) > P:
            raise ValueError(f"image of {len(px)} patch rows exceeds the {P} a {max_pixels}-pixel budget allows")
        pv[j, :len(px)], seg[j, :len(px)] = px, 1
        pos[j, :len(px)] = rope.vision_position_ids(grid, v.spatial_merge_size)
    return pv, seg, pos, labels, index


def run(cfg, params: dict, task: str, *, steps: int, batch: int, lr: float, max_pixels: int, freeze: bool = False,
        eval_every: int = 100, num_heldout: int = 256, seed: int = 0, log=print) -> list[dict]:
    """Trains (tower +) head; returns the learning curve [{step, loss, accuracy, chance}, ...]."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} unknown; valid: {', '.join(TASKS)}")
    for name, value in (("steps", steps), ("batch", batch), ("eval_every", eval_every), ("num_heldout", num_heldout)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if lr <= 0:
        raise ValueError(f"lr={lr} must be > 0")
    k = len(classes(task))
    heldout = make_batch(cfg, task, "heldout", 0, num_heldout, max_pixels, seed)
    chance = float(np.bincount(heldout[3], minlength=k).max() / num_heldout)
    trainable = {"head": {"w": jnp.zeros((cfg.hidden_size, k)), "b": jnp.zeros((k,))}}
    if not freeze:                                  # frozen: the tower is a constant (no update, no decay)
        trainable["visual"] = params["visual"]

    def logits(tp, pv, seg, pos):
        f = M.encode_vision(cfg, {**params, "visual": tp.get("visual", params["visual"])}, pv, seg, pos)  # [B,P/4,D]
        m = (seg[:, ::cfg.vision.merge_unit] > 0)[..., None]
        pooled = (f * m).sum(1) / jnp.maximum(m.sum(1), 1)                               # [B,D]
        if freeze:      # a frozen tower's feature scale is arbitrary (norms ~50 after training): standardise
            pooled = (pooled - pooled.mean(-1, keepdims=True)) / (pooled.std(-1, keepdims=True) + 1e-6)
        return pooled @ tp["head"]["w"] + tp["head"]["b"]

    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.1),
                      weight_decay=0.1)
    state = opt.init(trainable)

    @jax.jit
    def step(tp, state, pv, seg, pos, y):
        def loss_fn(tp):
            return optax.softmax_cross_entropy_with_integer_labels(logits(tp, pv, seg, pos), y).mean()
        loss, g = jax.value_and_grad(loss_fn)(tp)
        updates, state = opt.update(g, state, tp)
        return optax.apply_updates(tp, updates), state, loss

    accuracy = jax.jit(lambda tp: jnp.mean(logits(tp, *heldout[:3]).argmax(-1) == heldout[3]))
    curve, index, t0 = [], 0, time.time()
    for s in range(1, steps + 1):
        pv, seg, pos, y, index = make_batch(cfg, task, "train", index, batch, max_pixels, seed)
        trainable, state, loss = step(trainable, state, pv, seg, pos, y)
        if s % eval_every == 0 or s == steps:
            row = {"step": s, "examples": s * batch, "loss": float(loss), "accuracy": float(accuracy(trainable)),
                   "chance": chance}
            curve.append(row)
            log(f"step {s}/{steps} | {row['examples']} examples | loss {row['loss']:.3f} | held-out accuracy "
                f"{row['accuracy']:.3f} (chance {chance:.3f}) | {time.time() - t0:.0f}s")
    return curve


def table(curve: list[dict]) -> str:
    lines = ["step     examples   train loss   held-out acc   chance"]
    lines += [f"{r['step']:<8d} {r['examples']:<10d} {r['loss']:<12.3f} {r['accuracy']:<14.3f} {r['chance']:.3f}"
              for r in curve]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> list[dict]:
    cli.parse(FLAGS, argv, __doc__)
    saved = rundir.read_model_config(FLAGS.checkpoint) if FLAGS.checkpoint else None
    cfg = registry.apply_overrides(saved or get_config(FLAGS.model), FLAGS.set)
    if FLAGS.checkpoint:
        params = rundir.load_params(cfg, FLAGS.checkpoint)
    else:
        params = M.init_params(cfg, jax.random.PRNGKey(FLAGS.seed))
    print(f"vision probe: task {FLAGS.task} ({len(classes(FLAGS.task))} classes), model {cfg.name}, tower from "
          f"{FLAGS.checkpoint or 'init'}{' (frozen)' if FLAGS.freeze else ''}, {FLAGS.steps} steps x {FLAGS.batch}, "
          f"lr {FLAGS.lr}, <= {FLAGS.max_pixels} pixels per image", flush=True)
    curve = run(cfg, params, FLAGS.task, steps=FLAGS.steps, batch=FLAGS.batch, lr=FLAGS.lr, max_pixels=FLAGS.max_pixels,
                freeze=FLAGS.freeze, eval_every=FLAGS.eval_every, num_heldout=FLAGS.num_heldout,
                log=lambda s: print(s, flush=True))
    print(table(curve))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump({"task": FLAGS.task, "model": cfg.name, "checkpoint": FLAGS.checkpoint, "freeze": FLAGS.freeze,
                       "lr": FLAGS.lr, "batch": FLAGS.batch, "max_pixels": FLAGS.max_pixels, "curve": curve}, f,
                      indent=1)
    return curve


if __name__ == "__main__":
    cli.run(main)
