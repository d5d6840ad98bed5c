"""How fast does the vision tower learn an attribute of the embedded scenes, with a direct label?

    python -m launch.probe_vision --task=shape [--model=tiny] [--steps=2000] [--batch=32] [--lr=1e-3]
        [--max_pixels=12544] [--checkpoint DIR [--freeze]] [--json OUT.json]

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
does not read it). This script measures the first on its own (WORKSPACE "the stack learns").
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

TASKS = ("colour", "shape", "word")
STREAM = "vision_probe"


def classes(task: str) -> tuple[str, ...]:
    from qwen2vl_jax.data import synthetic
    return {"colour": tuple(synthetic.COLOURS), "shape": synthetic.SHAPES, "word": synthetic.WORDS}[task]


def labelled_scene(task: str, split: str, index: int, seed: int = 0):
    """(scene, label, next index): the first scene at or after `index` with exactly one item of the task."""
    from qwen2vl_jax.data import synthetic
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
    from qwen2vl_jax.model import rope
    from qwen2vl_jax.data import media
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
    from qwen2vl_jax.model import model as M
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


def main(argv=None) -> list[dict]:
    from launch import evaluate
    from qwen2vl_jax.model import model as M

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--model", default="tiny", help="config preset when --checkpoint has no model_config.json")
    p.add_argument("--checkpoint", default=None, help="start from this checkpoint's vision tower (default: init)")
    p.add_argument("--freeze", action="store_true", help="train the linear head only (needs --checkpoint)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max_pixels", type=int, default=16 * 28 * 28, help="per image (tiny recipe: 16 tokens)")
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--num_heldout", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="init seed")
    p.add_argument("--json", default=None, help="write the curve to this JSON file")
    a = p.parse_args(argv)
    if a.freeze and not a.checkpoint:
        p.error("--freeze needs --checkpoint (a frozen random tower is not worth probing)")
    if a.checkpoint:
        cfg = evaluate.model_config_for(a.checkpoint, a.model)
        params = evaluate.load_params(cfg, a.checkpoint)
    else:
        from qwen2vl_jax.model.config import get_config
        cfg = get_config(a.model)
        params = M.init_params(cfg, jax.random.PRNGKey(a.seed))
    print(f"vision probe: task {a.task} ({len(classes(a.task))} classes), model {cfg.name}, tower from "
          f"{a.checkpoint or 'init'}{' (frozen)' if a.freeze else ''}, {a.steps} steps x {a.batch}, lr {a.lr}, "
          f"<= {a.max_pixels} pixels per image", flush=True)
    curve = run(cfg, params, a.task, steps=a.steps, batch=a.batch, lr=a.lr, max_pixels=a.max_pixels,
                freeze=a.freeze, eval_every=a.eval_every, num_heldout=a.num_heldout,
                log=lambda s: print(s, flush=True))
    print(table(curve))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"task": a.task, "model": cfg.name, "checkpoint": a.checkpoint, "freeze": a.freeze,
                       "lr": a.lr, "batch": a.batch, "max_pixels": a.max_pixels, "curve": curve}, f, indent=1)
    return curve


if __name__ == "__main__":
    main(sys.argv[1:])
