"""Training checkpoints: orbax CheckpointManager with async saves, keep-last-K, exact resume; finding the params
of any checkpoint a user points at.

Layout of ``DIR/<step>/`` (one orbax Composite checkpoint per saved step):
  params/     StandardSave of the full param tree (master dtype)
  opt_state/  StandardSave of the optimizer state *leaves* as {"0": leaf, "1": ...}; the tree
              structure comes from the restoring run's optimizer (optax namedtuples are not
              stored), so a checkpoint does not depend on optax internals' serialisation
  meta/       JSON: step, skipped_steps, consecutive_skips, data-iterator state, the run's `run_meta`
              (the trainer stores the optimizer settings there, so a resume can keep the saved schedule)
Orbax writes a step into a temporary folder and renames it when complete, so a run killed at any
moment (kill -9 included) leaves only complete steps visible. A step can still be damaged afterwards (a
disk full or a copy cut short truncates a file, a hand edit empties meta): `restore` then falls back to
the newest step that restores, moving each damaged newer one aside to ``DIR/<step>.unreadable`` (orbax
ignores that name; nothing is deleted) with its reason in one line. A state with NaN/inf values is never
saved (`NonFiniteStateError`), so the newest checkpoint is always one worth resuming from. A save that runs
out of disk space raises `DiskFullError`, one line naming the newest good checkpoint (the steps before it are
intact, and a resume from them is exact); the errors orbax's writer threads log for it are not printed.
Restoring takes an abstract state whose ShapeDtypeStructs carry the *current* mesh's shardings, so a
checkpoint written on one mesh restores onto any other.

DIR may be local or gs:// (orbax writes and reads buckets itself; the step listing, the set-aside and the
checks here go through train/paths.py). On Cloud Storage, setting a step aside copies its objects to the new
name and deletes them (no rename there).

Params only (`load_params`: a stage hand-off, init_from, evaluation, conversion) come from any of
  RUN, RUN/checkpoints (newest step that restores), RUN/checkpoints/STEP    a training run (`locate`)
  DIR with model_config.json + params/                                      `launch.convert --hf_to_jax` output
  DIR with config.json + *.safetensors                                      a transformers Qwen2-VL folder
and a checkpoint of another model shape is one error naming the differing params. Each may be in a bucket
(gs://): a training run is read there by orbax; a converted or Hugging Face folder is first copied to a local
folder (paths.local_copy: safetensors and the converted model_config.json are read as local files).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from qwen2vl_jax.model import hf
from qwen2vl_jax.train import paths
from qwen2vl_jax.train.train_step import TrainState

RUN_CHECKPOINTS = "checkpoints"          # a run folder's checkpoint folder (RUN/checkpoints)
SET_ASIDE_SUFFIX = ".unreadable"         # DIR/<step>.unreadable: a step that failed to restore
META_FIELDS = ("step", "skipped_steps", "consecutive_skips", "data_state")
MAX_REASON = 300                         # characters of an error kept in a one-line reason

Log = Callable[[str], None]


class NonFiniteStateError(RuntimeError):
    """The state to save holds NaN or inf (it was not saved)."""


class DiskFullError(RuntimeError):
    """The disk (of the checkpoint or the run directory) filled up; the message names the newest good checkpoint."""


NO_SPACE = os.strerror(errno.ENOSPC)     # "No space left on device": how ENOSPC reads in tensorstore's errors too


def is_disk_full(e: BaseException | None) -> bool:
    """Whether `e` or an exception it was raised from is ENOSPC (an OSError, or orbax / tensorstore's
    RESOURCE_EXHAUSTED ValueError that quotes it)."""
    seen = 0
    while e is not None and seen < 16:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or NO_SPACE in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


class _QuietDiskFull(logging.Filter):
    """Drops the log records of a disk-full error (orbax's writer threads log each failed write with its
    traceback, asyncio each failed task): DiskFullError says it once. Once it was raised (`seen`), orbax's
    other errors are its consequences too (writer threads of the save that was abandoned, cut short at exit)."""
    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if is_disk_full(exc) or NO_SPACE in record.getMessage():
            return False
        return not (self.seen and f"{os.sep}orbax{os.sep}" in record.pathname)


_QUIET_DISK_FULL = _QuietDiskFull()



class UnreadableCheckpointError(ValueError):
    """A checkpoint step (or every step of a folder) does not restore; the message says why."""


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


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    ok = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(ok)) if ok else jnp.array(True)


def one_line(e: BaseException) -> str:
    """The most specific message of an exception chain on one line: orbax and tensorstore wrap the cause
    (e.g. "Requested byte range [..) is not valid for value of size N" of a truncated file) in a message
    that is mostly a dump of their spec."""
    chain = []
    while e is not None and len(chain) < 16:       # the causes, not what was being handled when it was raised
        chain.append(e)
        e = e.__cause__
    last = next((x for x in reversed(chain) if str(x).strip()), chain[0])
    text = " ".join(str(last).split()) or "(no message)"
    text = f"{type(last).__name__}: {text}"
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 3] + "..."


class Checkpointer:
    """Saves and restores TrainState + data-iterator state under `cfg.directory`.

    `run_meta` (a JSON-able dict, settable) is written into every step's meta: the trainer keeps the run's
    optimizer settings there."""

    def __init__(self, cfg: CheckpointConfig, log: Log | None = None):
        if not cfg.directory:
            raise ValueError("CheckpointConfig.directory is empty")
        self.cfg = cfg
        self.directory = os.fspath(paths.path(cfg.directory))
        self.log = log or print
        self.run_meta: dict = {}
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, create=True,
            enable_async_checkpointing=cfg.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "meta"))
        self._writing: int | None = None           # the step of the last save started (async: maybe unfinished)
        for name in ("absl", "asyncio"):             # orbax logs through absl
            if _QUIET_DISK_FULL not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(_QUIET_DISK_FULL)

    def latest_step(self) -> int | None:
        """The newest step folder (complete as orbax sees it; `restore` checks that it restores)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, data_state: Any = None, extra: dict | None = None,
             force: bool = False) -> bool:
        """Saves if `state.step` is on the interval (or `force`); returns whether a save started.
        Raises NonFiniteStateError (saving nothing) when the params or the optimizer state hold NaN/inf."""
        step = int(jax.device_get(state.step))
        if not force and step % self.cfg.every:
            return False
        if step in self.manager.all_steps():
            return False
        if not bool(jax.device_get(_all_finite((state.params, state.opt_state)))):
            self.wait()
            raise NonFiniteStateError(
                f"the state at step {step} holds NaN or inf parameters or optimizer moments (an update was not "
                f"finite); it was not saved, the newest checkpoint in {self.directory} is step {self.latest_step()}")
        meta = {**self.run_meta, "step": step,
                "skipped_steps": int(jax.device_get(state.skipped_steps)),
                "consecutive_skips": int(jax.device_get(state.consecutive_skips)),
                "data_state": data_state, **(extra or {})}
        args = ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                  opt_state=ocp.args.StandardSave(_flat(state.opt_state)), meta=ocp.args.JsonSave(meta))
        # an async save's failure is raised by the next call into the manager: it is the previous step's
        started = self._disk_full_as_one_line(lambda: self.manager.save(step, args=args, force=True), also=step)
        self._writing = step
        return started

    def _disk_full_as_one_line(self, call: Callable[[], Any], also: int | None = None) -> Any:
        try:
            return call()
        except Exception as e:
            if not is_disk_full(e):
                raise
            raise self.disk_full(failed=(self._writing, also)) from None

    def disk_full(self, failed: tuple[int | None, ...] = ()) -> DiskFullError:
        """The error of a disk that filled up (here or in another file of the run), in one line: the steps of
        `failed` that were not saved and the newest good checkpoint. Orbax's own error logs go quiet."""
        _QUIET_DISK_FULL.seen = True
        good = self.complete_steps()
        bad = {s for s in failed if s is not None and s not in good}
        where = (f"the newest good checkpoint is {self.directory}/{good[-1]}" if good
                 else f"no checkpoint was saved in {self.directory}")
        lost = (f"checkpoint step{'s' if len(bad) > 1 else ''} {', '.join(map(str, sorted(bad)))} not saved; "
                if bad else "")
        return DiskFullError(f"{NO_SPACE} (disk full) while writing the run: {lost}{where} (older ones are "
                             f"intact); free some space and run the same command again to resume from it")

    def complete_steps(self) -> list[int]:
        """The step folders in the directory as it is now (orbax renames a step's folder into place only when
        it is complete, so an interrupted save leaves none)."""
        return sorted(int(n) for n in paths.listdir(self.directory) if n.isdigit())

    def restore(self, abstract: TrainState, step: int | None = None,
                check: Callable[[dict], None] | None = None) -> tuple[TrainState, dict]:
        """(state placed by `abstract`'s shardings, meta dict incl. "data_state").

        step None: the newest step that restores. A newer step that does not (truncated or missing files,
        meta missing or not the JSON a save writes, an empty folder) is moved aside to DIR/<step>.unreadable
        with one `log` line saying which and why; UnreadableCheckpointError when no step restores,
        FileNotFoundError when there is none. An explicit `step` that does not restore raises
        UnreadableCheckpointError with the reason.
        A step that reads but does not fit this run is not damage and moves nothing: `check(meta)` (the
        caller's comparison of its settings) raises, and so does a params or optimizer-state shape that
        differs from `abstract`'s (ValueError naming them)."""
        if step is not None:
            try:
                return self._restore_step(abstract, step, check)
            except UnreadableCheckpointError as e:
                raise UnreadableCheckpointError(f"checkpoint {self.directory}/{step}: {e}") from None
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        failures = []
        try:
            for s in steps:
                try:
                    return self._restore_step(abstract, s, check)
                except UnreadableCheckpointError as e:
                    moved = self._set_aside(s)
                    failures.append(f"step {s}: {e}")
                    self.log(f"checkpoint {self.directory}/{s} does not restore ({e}); moved it to {moved} and "
                             "trying the next older step")
        finally:
            if failures:
                self.manager.reload()
        raise UnreadableCheckpointError(
            f"no checkpoint in {self.directory} restores ({'; '.join(failures)}); each was moved to "
            f"<step>{SET_ASIDE_SUFFIX}: a re-run starts without them")

    def _restore_step(self, abstract: TrainState, step: int, check) -> tuple[TrainState, dict]:
        path = paths.join(self.directory, str(step))
        if not paths.listdir(path):
            raise UnreadableCheckpointError("empty step folder" if paths.is_dir(path) else "no such step folder")
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 -- any failure to read a step means: use an older one
            raise UnreadableCheckpointError(f"meta: {one_line(e)}") from None
        problem = _meta_problem(meta, step)
        if problem:
            raise UnreadableCheckpointError(f"meta: {problem}")
        if check is not None:
            check(meta)
        flat_opt = _flat(abstract.opt_state)
        for item, want in (("params", abstract.params), ("opt_state", flat_opt)):
            try:
                stored = _stored_shapes(paths.join(path, item))
            except Exception as e:  # noqa: BLE001
                raise UnreadableCheckpointError(f"{item}: {one_line(e)}") from None
            _check_shapes(f"{path}/{item}", stored, want,
                          "model" if item == "params" else "optimizer state (other trainable parts or optimizer)")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract.params),
                opt_state=ocp.args.StandardRestore(flat_opt)))
        except Exception as e:  # noqa: BLE001
            raise UnreadableCheckpointError(f"params/opt_state: {one_line(e)}") from None
        meta = dict(meta)
        leaves = [out["opt_state"][str(i)] for i in range(len(jax.tree.leaves(abstract.opt_state)))]
        opt_state = jax.tree.unflatten(jax.tree.structure(abstract.opt_state), leaves)

        def scalar(name):
            return jax.device_put(np.asarray(meta[name], np.int32), getattr(abstract, name).sharding)

        state = TrainState(step=scalar("step"), params=out["params"], opt_state=opt_state,
                           skipped_steps=scalar("skipped_steps"), consecutive_skips=scalar("consecutive_skips"))
        return state, meta

    def _set_aside(self, step: int) -> str:
        """Renames DIR/<step> to DIR/<step>.unreadable (-2, -3, ... when taken); process 0 renames."""
        src = paths.join(self.directory, str(step))
        dst, n = src + SET_ASIDE_SUFFIX, 1
        while paths.exists(dst):
            n += 1
            dst = f"{src}{SET_ASIDE_SUFFIX}-{n}"
        if jax.process_index() == 0:
            paths.rename(src, dst)
        return dst

    def wait(self) -> None:
        self._disk_full_as_one_line(self.manager.wait_until_finished)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def _meta_problem(meta: Any, step: int) -> str | None:
    """Why a restored meta is not one that `save` wrote for `step`, or None."""
    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__}, not an object"
    missing = [f for f in META_FIELDS if f not in meta]
    if missing:
        return f"lacks {', '.join(missing)}"
    bad = [f for f in META_FIELDS[:3] if not isinstance(meta[f], int) or isinstance(meta[f], bool)]
    if bad:
        return f"{', '.join(f'{f}={meta[f]!r}' for f in bad)} not an integer"
    if meta["step"] != step:
        return f"says step {meta['step']}, folder is step {step}"
    return None


# ----------------------------------------------------------------------------------------------
# any checkpoint a user points at

@dataclasses.dataclass(frozen=True)
class Located:
    kind: str                   # "training" | "converted" | "hf"
    path: str                   # training: the folder of step folders; else the checkpoint folder itself
    step: int | None = None     # training: the step the path named (None: the newest that restores)
    run_dir: str | None = None  # training: the run folder around it (model_config.json, ...), if any


def _has_steps(path: str) -> bool:
    return any(d.isdigit() and paths.is_dir(paths.join(path, d)) for d in paths.listdir(path))


def _run_dir_of(checkpoints: str) -> str | None:
    parent = paths.parent(checkpoints)
    return parent if paths.exists(paths.join(parent, hf.MODEL_CONFIG_FILE)) else None


def locate(path: str) -> Located:
    """What `path` is: RUN, RUN/checkpoints or RUN/checkpoints/STEP of a training run (or another folder of
    step folders), a converted checkpoint (model_config.json + params/), or a transformers folder.
    ValueError naming the accepted forms otherwise."""
    path = os.fspath(paths.path(path))
    forms = (f"expected a run folder RUN, RUN/{RUN_CHECKPOINTS}, RUN/{RUN_CHECKPOINTS}/STEP, a converted checkpoint "
             f"({hf.MODEL_CONFIG_FILE} + {hf.PARAMS_DIR}/) or a Hugging Face folder ({hf.CONFIG_FILE} + *.safetensors)")
    if not paths.is_dir(path):
        raise ValueError(f"checkpoint {path} is not a folder; {forms}")
    found = paths.listdir(path)
    if hf.CONFIG_FILE in found and hf.MODEL_CONFIG_FILE not in found:        # hf.is_hf_folder
        return Located("hf", path)
    if hf.MODEL_CONFIG_FILE in found and paths.is_dir(paths.join(path, hf.PARAMS_DIR)):
        return Located("converted", path)
    if _has_steps(path):
        return Located("training", path, None, _run_dir_of(path))
    inner = paths.join(path, RUN_CHECKPOINTS)
    if _has_steps(inner):
        return Located("training", inner, None, _run_dir_of(inner))
    name, parent = os.path.basename(path), paths.parent(path)
    if name.isdigit() and paths.is_dir(paths.join(path, hf.PARAMS_DIR)):
        return Located("training", parent, int(name), _run_dir_of(parent))
    raise ValueError(f"{path} is not a checkpoint (found {found[:8]}{' ...' if len(found) > 8 else ''}); {forms}")


def _check_shapes(where: str, stored: Any, abstract_params: Any, what: str = "model") -> None:
    """ValueError naming the leaves whose stored shape (tree of shape tuples) differs from the experiment's."""
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(stored, is_leaf=is_shape)}
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(abstract_params)}
    diff = [f"{k} {got.get(k, 'absent')} vs {want.get(k, 'absent')}" for k in sorted(set(got) | set(want))
            if got.get(k) != want.get(k)]
    if diff:
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise ValueError(f"{where} holds another {what} than the experiment's (checkpoint vs experiment): "
                         f"{'; '.join(diff[:4])}{more}")


def _stored_shapes(item_dir: str) -> Any:
    """The tree of shapes of a saved pytree item (reads its metadata only)."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(epath.Path(item_dir)).tree
    finally:
        handler.close()
    return jax.tree.map(lambda m: tuple(m.shape), tree)


def load_params(path: str, abstract_params: Any, log: Log | None = None) -> dict:
    """The params of any checkpoint `locate` accepts (a training folder: the step it names, else the newest
    whose params restore, logging each newer one that does not), placed by `abstract_params`' shardings and
    cast to their dtypes. ValueError naming the differing params when the checkpoint is another model."""
    loc = locate(path)
    shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
    if loc.kind == "training":
        return _training_params(loc, abstract_params, log or print)
    folder = paths.local_copy(loc.path) if paths.is_remote(loc.path) else loc.path
    if loc.kind == "converted":
        with open(os.path.join(folder, hf.MODEL_CONFIG_FILE)) as f:
            cfg = hf.model_config_from_dict(json.load(f))
        _check_shapes(loc.path, hf.param_shapes(cfg), abstract_params)
        _, params = hf.load_jax_checkpoint(folder, shardings=shardings)
    else:
        _check_shapes(loc.path, hf.param_shapes(hf.read_model_config(folder)), abstract_params)
        dtype = np.dtype(jax.tree.leaves(abstract_params)[0].dtype).name
        _, host = hf.load_pretrained(folder, param_dtype=dtype)
        params = jax.tree.map(jax.device_put, host, shardings)
    return jax.tree.map(lambda x, a: x.astype(a.dtype), params, abstract_params)


def _training_params(loc: Located, abstract_params: Any, log: Log) -> dict:
    mgr = ocp.CheckpointManager(loc.path, item_names=("params", "opt_state", "meta"))
    try:
        steps = [loc.step] if loc.step is not None else sorted(mgr.all_steps(), reverse=True)
        failures = []
        for step in steps:
            params_dir = paths.join(loc.path, str(step), hf.PARAMS_DIR)
            try:
                stored = _stored_shapes(params_dir)
            except Exception as e:  # noqa: BLE001 -- a damaged step: try an older one
                failures.append(f"step {step}: {one_line(e)}")
            else:
                _check_shapes(f"{loc.path}/{step}", stored, abstract_params)
                try:
                    out = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
                    return out["params"]
                except Exception as e:  # noqa: BLE001
                    failures.append(f"step {step}: {one_line(e)}")
            if loc.step is None:
                log(f"checkpoint {loc.path}/{step} does not restore ({failures[-1]}); trying the next older step")
        raise UnreadableCheckpointError(f"no params restore from {loc.path} ({'; '.join(failures) or 'no steps'})")
    finally:
        mgr.close()
