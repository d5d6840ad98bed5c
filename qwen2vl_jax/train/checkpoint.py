"""Training checkpoints: orbax CheckpointManager with async saves, keep-last-K, exact resume.

Layout of ``DIR/<step>/`` (one orbax Composite checkpoint per saved step):
  params/     StandardSave of the full param tree (master dtype)
  opt_state/  StandardSave of the optimizer state *leaves* as {"0": leaf, "1": ...}; the tree
              structure comes from the restoring run's optimizer (optax namedtuples are not
              stored), so a checkpoint does not depend on optax internals' serialisation
  meta/       JSON: step, skipped_steps, consecutive_skips, data-iterator state, anything extra
Orbax writes a step into a temporary folder and renames it when complete, so a run killed at any
moment (kill -9 included) leaves only complete steps visible; `latest_step` ignores partial ones.
Restoring takes an abstract state whose ShapeDtypeStructs carry the *current* mesh's shardings, so a
checkpoint written on one mesh restores onto any other.

Stage hand-off: `load_params` reads only the params of a training checkpoint folder (the previous
stage), or a converted Hugging Face checkpoint (`launch.convert` output, via hf.load_jax_checkpoint).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from qwen2vl_jax.train.train_step import TrainState


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    directory: str = ""      # "" disables checkpointing
    every: int = 100         # save every N steps (and at the end / on SIGTERM / on a non-finite stop)
    keep: int = 3            # keep the last K
    async_save: bool = True  # write in a background thread while training continues

    def __post_init__(self):
        if self.every < 1 or self.keep < 1:
            raise ValueError(f"checkpoint every={self.every} and keep={self.keep} must be >= 1")


def _flat(tree: Any) -> dict:
    return {str(i): x for i, x in enumerate(jax.tree.leaves(tree))}


class Checkpointer:
    """Saves and restores TrainState + data-iterator state under `cfg.directory`."""

    def __init__(self, cfg: CheckpointConfig):
        if not cfg.directory:
            raise ValueError("CheckpointConfig.directory is empty")
        self.cfg = cfg
        self.directory = os.path.abspath(cfg.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, create=True,
            enable_async_checkpointing=cfg.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, data_state: Any = None, extra: dict | None = None,
             force: bool = False) -> bool:
        """Saves if `state.step` is on the interval (or `force`); returns whether a save started."""
        step = int(jax.device_get(state.step))
        if not force and step % self.cfg.every:
            return False
        if step in self.manager.all_steps():
            return False
        meta = {"step": step,
                "skipped_steps": int(jax.device_get(state.skipped_steps)),
                "consecutive_skips": int(jax.device_get(state.consecutive_skips)),
                "data_state": data_state, **(extra or {})}
        return self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(_flat(state.opt_state)),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, abstract: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """(state placed by `abstract`'s shardings, meta dict incl. "data_state")."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract.params),
            opt_state=ocp.args.StandardRestore(_flat(abstract.opt_state)),
            meta=ocp.args.JsonRestore()))
        meta = dict(out["meta"])
        leaves = [out["opt_state"][str(i)] for i in range(len(jax.tree.leaves(abstract.opt_state)))]
        opt_state = jax.tree.unflatten(jax.tree.structure(abstract.opt_state), leaves)

        def scalar(name):
            return jax.device_put(np.asarray(meta[name], np.int32), getattr(abstract, name).sharding)

        state = TrainState(step=scalar("step"), params=out["params"], opt_state=opt_state,
                           skipped_steps=scalar("skipped_steps"), consecutive_skips=scalar("consecutive_skips"))
        return state, meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def is_training_checkpoint(path: str) -> bool:
    """A CheckpointManager folder with at least one complete step."""
    if not os.path.isdir(path):
        return False
    return any(d.isdigit() and os.path.isdir(os.path.join(path, d, "params")) for d in os.listdir(path))


def load_params(path: str, abstract_params: Any) -> dict:
    """Params only, from a previous stage's training checkpoint folder (latest step) or a converted
    HF checkpoint folder (model_config.json + params/), placed by `abstract_params`' shardings."""
    path = os.path.abspath(path)
    if is_training_checkpoint(path):
        mgr = ocp.CheckpointManager(path, item_names=("params", "opt_state", "meta"))
        try:
            step = mgr.latest_step()
            out = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
            return out["params"]
        finally:
            mgr.close()
    from qwen2vl_jax.model import hf
    shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
    _, params = hf.load_jax_checkpoint(path, shardings=shardings)
    want = jax.tree.map(lambda x: tuple(x.shape), abstract_params)
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    if want != got:
        raise ValueError(f"checkpoint {path} does not match the experiment's model: "
                         f"shapes {got} vs {want}")
    return jax.tree.map(lambda x, a: x.astype(a.dtype), params, abstract_params)
