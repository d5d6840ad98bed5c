"""The run directory: what a training run writes there, the lock that gives it to one run, and reading it back.

    with rundir.RunLock(run_dir):                        # one run per run directory
        rundir.write_run_configs(exp)
    rundir.read_model_config(run_dir); rundir.read_jsonl(run_dir, rundir.LOSSES_FILE)
    cfg, params = rundir.load_pretrained(path)          # any checkpoint form (q.load_pretrained, launch.convert)

The run directory (exp.run_dir, local or gs://BUCKET/PATH: every file goes through train/paths.py; only
process 0 writes the shared files, orbax has every process write its own shards) holds
  checkpoints/        orbax steps (async, every `checkpoint.every`, keep `checkpoint.keep`)
  tensorboard/        event files: train/<metric>, data/<counter>, eval/<name>
  losses.jsonl        {"step", "loss", "grad_norm", "finite"} per step (process 0); strict JSON: a
                      non-finite value is null. In a bucket (no append) the object is rewritten at every
                      log line and checkpoint, so a kill loses at most the records since then
  heldout.jsonl       {"step", <name>: value, ...} per evaluation (process 0)
  run.lock            the running run's pid, host, job and start time (empty after a clean exit; RunLock)
  processor/          tokenizer.json of the run's tokenizer, and the other tokenizer / image-processor files
                      of a Hugging Face `init_from` folder: launch.convert --jax_to_hf copies them beside the
                      converted weights
  model_config.json, data_config.json   the run's model and data configs (process 0), read back by
                      `read_model_config` / `read_data_config` (launch.evaluate rebuilds the model and
                      preprocesses held-out media at the pixel budgets the run trained with)

The training loop that fills it is train/trainer.py.
"""
from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

import jax

from qwen2vl_jax.data.pipeline import DataConfig
from qwen2vl_jax.data.tokenizer import tokenizer_json
from qwen2vl_jax.model import hf
from qwen2vl_jax.model.config import EXECUTION_FIELDS, ModelConfig
from qwen2vl_jax.train import checkpoint, memory, paths, train_step

if TYPE_CHECKING:
    from qwen2vl_jax.train.trainer import TrainSpec

MODEL_CONFIG_FILE = hf.MODEL_CONFIG_FILE
DATA_CONFIG_FILE = "data_config.json"
LOSSES_FILE = "losses.jsonl"
HELDOUT_FILE = "heldout.jsonl"
LOCK_FILE = "run.lock"
JOB_ENV = "QWEN2VL_JOB"                  # the job a run belongs to (launch.tpu: TPU name/run name); see RunLock
LOCK_HEARTBEAT_S = 60.0                  # a run directory in a bucket: the holder rewrites run.lock this often
LOCK_STALE_S = 600.0                     # ... and a record not rewritten for this long is a dead run's
PROCESSOR_DIR = "processor"


class WorkdirInUseError(ValueError):
    """Another run holds the run directory."""


# ----------------------------------------------------------------------------------------------
# the run directory: what a run writes, and reading it back

def write_run_configs(exp: TrainSpec) -> None:
    """RUN_DIR/model_config.json, RUN_DIR/data_config.json and, once, RUN_DIR/processor/ (the processor files
    of a Hugging Face `init_from` folder or run, and tokenizer.json of the run's tokenizer)."""
    for name, payload in ((MODEL_CONFIG_FILE, hf.model_config_to_dict(exp.model)),
                          (DATA_CONFIG_FILE, exp.data.to_dict())):
        paths.write_json(paths.join(exp.run_dir, name), payload)
    out = paths.join(exp.run_dir, PROCESSOR_DIR)
    if paths.exists(paths.join(out, "tokenizer.json")):     # a resumed run keeps what its first start wrote
        return
    origin = processor_dir(exp.init_from) if exp.init_from else None
    if origin:
        for name in hf.PROCESSOR_FILES:
            if paths.exists(paths.join(origin, name)):
                paths.write_text(paths.join(out, name), paths.read_text(paths.join(origin, name)))
    # written last: its presence says the folder is complete
    paths.write_text(paths.join(out, "tokenizer.json"), tokenizer_json(exp.tokenizer))   # the run's tokenizer


def _locate(path: str) -> checkpoint.Located | None:
    try:
        return checkpoint.locate(path)
    except ValueError:
        return None


def _run_file(path: str, name: str) -> str | None:
    """`name` beside the checkpoint at `path` (its run folder, or the converted folder itself), else in `path`
    or its parent (a run folder whose checkpoints/ is still empty)."""
    loc = _locate(path)
    beside = (loc.run_dir if loc.kind == "training" else loc.path) if loc else None
    for d in ([beside] if beside else []) + [path, paths.parent(path)]:
        if paths.exists(paths.join(d, name)):
            return paths.join(d, name)
    return None


def read_model_config(path: str) -> ModelConfig | None:
    """The model config of the checkpoint at `path` (any form `checkpoint.locate` accepts: the run's
    model_config.json, a converted checkpoint's, a Hugging Face folder's config.json), else None."""
    loc = _locate(path)
    if loc is not None and loc.kind == "hf":
        remote = paths.is_remote(loc.path)
        return hf.read_model_config(paths.local_copy(loc.path, [hf.CONFIG_FILE]) if remote else loc.path)
    found = _run_file(path, MODEL_CONFIG_FILE)
    return None if found is None else hf.model_config_from_dict(paths.read_json(found))


def processor_dir(path: str) -> str | None:
    """The folder of tokenizer / processor files that goes with the checkpoint at `path`: a Hugging Face
    folder itself, else the processor/ folder of its run (or converted checkpoint) when that exists."""
    loc = _locate(path)
    if loc is None:
        return None
    if loc.kind == "hf":
        return loc.path
    base = loc.run_dir if loc.kind == "training" else loc.path
    d = paths.join(base, PROCESSOR_DIR) if base else None
    return d if d and paths.is_dir(d) else None


# DataConfig fields added after run folders were written, with the value those runs trained with: an older
# data_config.json lacks them and reads back with these values (any other missing field is refused)
DATA_FIELDS_ADDED = {"supervise_turn_newline": False}


def read_data_config(checkpoint_dir: str) -> tuple[DataConfig | None, str | None]:
    """(the data config of the run that wrote a checkpoint, its path), or (None, None) without one."""
    path = _run_file(checkpoint_dir, DATA_CONFIG_FILE)
    if path is None:
        return None, None
    data = {**DATA_FIELDS_ADDED, **paths.read_json(path)}
    fields = [f.name for f in dataclasses.fields(DataConfig)]
    missing, unknown = [f for f in fields if f not in data], sorted(set(data) - set(fields))
    if missing or unknown:
        raise ValueError(f"{path} is not a DataConfig written by a training run (missing: "
                         f"{', '.join(missing) or '-'}; unknown: {', '.join(unknown) or '-'})")
    return DataConfig(**data), path                 # the inverse of DataConfig.to_dict


def load_params(model_cfg: ModelConfig, checkpoint_dir: str, mesh: jax.sharding.Mesh | None = None,
                device: jax.Device | None = None) -> dict:
    """The params of any checkpoint `checkpoint.locate` accepts (a run, its checkpoints or one step, a
    converted or a Hugging Face folder), placed by the training param shardings on `mesh`, or on `device`
    (default: the first device) when mesh is None."""
    if not paths.is_dir(checkpoint_dir):
        raise ValueError(f"checkpoint {checkpoint_dir!r} is not a directory")
    shapes = memory.abstract_params(model_cfg)
    if mesh is None:
        single = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, shapes)
    else:
        shardings = train_step.param_shardings(model_cfg, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return checkpoint.load_params(checkpoint_dir, abstract)


def load_pretrained(path: str, device: jax.Device | None = None, **execution_overrides) -> tuple[ModelConfig, dict]:
    """(model config, params) of any checkpoint `checkpoint.locate` accepts: a training run RUN (its newest step
    that restores), RUN/checkpoints, RUN/checkpoints/STEP, a converted checkpoint or a Hugging Face folder.
    The params are jax arrays on `device` (default: the first device). `execution_overrides`: execution fields
    of the config (model/config.py EXECUTION_FIELDS: param_dtype, dtype, attention_impl, ...); the params are
    cast to its param_dtype. `q.load_pretrained` and `launch.convert --jax_to_hf` read their input here."""
    bad = sorted(set(execution_overrides) - set(EXECUTION_FIELDS))
    if bad:
        raise ValueError(f"load_pretrained: {', '.join(bad)} not execution settings; valid: "
                         f"{', '.join(EXECUTION_FIELDS)}")
    checkpoint.locate(path)               # a path that is none of the accepted forms: one line naming them
    cfg = read_model_config(path)
    if cfg is None:
        raise ValueError(f"{path} has no {MODEL_CONFIG_FILE} beside it (a run folder holds one): cannot tell which "
                         "model its params are")
    cfg = cfg.replace(**execution_overrides)
    return cfg, load_params(cfg, path, device=device)


def read_jsonl(run_dir: str, name: str) -> dict[int, dict]:
    """{step: record} of RUN_DIR/<name> (losses.jsonl, heldout.jsonl); the last record of a step wins.
    {} when the file does not exist."""
    return {int(r["step"]): r for r in paths.read_jsonl(paths.join(run_dir, name))}


def truncate_jsonl(path: str, step: int, log=None) -> None:
    """Keeps the records of `path` up to `step` (a resumed run re-trains the steps after its checkpoint, so
    they would appear twice); a line cut short by a kill is dropped too. Rewrites it whole (paths.write_text:
    atomic locally, one object in a bucket)."""
    if not paths.exists(path):
        return
    kept, dropped = [], 0
    for line in filter(str.strip, paths.read_text(path).splitlines()):
        try:
            keep = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if not dropped:
        return
    paths.write_text(path, "".join(kept))
    if log:
        log(f"{os.path.basename(path)}: dropped {dropped} records after step {step} (re-trained from here)")


# ----------------------------------------------------------------------------------------------
# one run per run directory

def _start_time(pid: int) -> str | None:
    """The kernel's start time of process `pid` (clock ticks since boot; Linux), None if unknown or gone:
    with the pid it identifies a process, as a pid alone is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the process a lock record names still runs (on another host: assumed, it cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", 0))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    recorded, now = holder.get("start_ticks"), _start_time(pid)
    return recorded is None or now is None or recorded == now


class RunLock:
    """Exclusive use of a run directory by one run, through RUN/run.lock.

    Local: the claim is an flock on the file: the kernel releases it when the holder exits, kill -9 included,
    so a killed run never blocks the next one. The file records the holder (pid, host, process start time,
    job, start date) for the refusal message and is emptied on a clean exit: a run that gets the lock and
    finds a record says it takes over from a run that did not exit cleanly. Where the file system has no flock
    (some network mounts), the record alone decides: a holder on this host whose process is gone (pid not
    running, or reused by a younger process) is stale and taken over; any other is refused.

    Cloud Storage (gs://): no flock. The lock is the object run.lock holding the record, written only at the
    generation that was read (created only if absent; paths.write_versioned), so of two runs starting at once
    one gets it. The holder rewrites the record every `heartbeat_s` ("beat": its clock); a record is stale,
    and taken over, when its beat is older than `stale_s` (its run was killed or its slice preempted), when
    its process is gone on this host, or when it names this run's job (the JOB_ENV variable: launch.tpu
    sets it, and its supervisor restarts a job only after the job's previous run is gone). Any other record
    refuses. A clean exit empties the object."""

    def __init__(self, run_dir: str, log=print, heartbeat_s: float = LOCK_HEARTBEAT_S, stale_s: float = LOCK_STALE_S):
        self.path = paths.join(run_dir, LOCK_FILE)
        self.remote = paths.is_remote(run_dir)
        self.log = log
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.fd: int | None = None
        self.generation = 0
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    @staticmethod
    def _parse(text: str) -> dict:
        text = text.strip()
        try:
            holder = json.loads(text) if text else {}
        except ValueError:
            holder = {"unparsable": text[:80]}
        return holder if isinstance(holder, dict) else {"unparsable": text[:80]}

    def _read(self) -> dict:
        os.lseek(self.fd, 0, os.SEEK_SET)
        return self._parse(os.read(self.fd, 1 << 16).decode(errors="replace"))

    def _refuse(self, holder: dict):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        who = (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
               if "pid" in holder else f"record {holder}")
        if self.remote:
            who += f", last seen {time.time() - float(holder.get('beat', 0)):.0f} s ago"
        raise WorkdirInUseError(
            f"run directory {paths.parent(self.path)} is in use by another run ({who}): two runs in one "
            f"directory would mix their checkpoints and losses.jsonl; wait for it or stop it, or use another "
            f"--set workdir (if that run is gone and this persists, delete {self.path})")

    def _record(self) -> str:
        return json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "start_ticks": _start_time(os.getpid()),
            "job": os.environ.get(JOB_ENV) or None, "beat": time.time(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}) + "\n"

    def _stale(self, holder: dict) -> str | None:
        """Why a bucket lock's record no longer holds the run directory, or None."""
        if "pid" not in holder:
            return "unparsable record"
        if not _alive(holder):
            return "its process is gone"
        job = os.environ.get(JOB_ENV)
        if job and holder.get("job") == job:
            return f"the same job {job!r}, restarted"
        age = time.time() - float(holder.get("beat", 0))
        return f"not rewritten for {age:.0f} s" if age > self.stale_s else None

    def __enter__(self) -> "RunLock":
        if self.remote:
            return self._enter_remote()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._refuse(self._read())
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            holder = self._read()                     # no flock here: the record decides
            if holder and _alive(holder):
                self._refuse(holder)
        holder = self._read()
        if holder:
            self.log(f"{self.path}: taking over from a run that did not exit cleanly ({holder})")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, self._record().encode(), 0)
        os.fsync(self.fd)
        return self

    def _enter_remote(self) -> "RunLock":
        for _ in range(3):                            # lost a race to another writer: look again
            text, generation = paths.read_versioned(self.path)
            holder = self._parse(text)
            why = self._stale(holder) if holder else None
            if holder and why is None:
                self._refuse(holder)
            new = paths.write_versioned(self.path, self._record(), generation)
            if new is not None:
                break
        else:
            raise WorkdirInUseError(f"{self.path}: other runs keep rewriting the lock; is another run starting?")
        if holder:
            self.log(f"{self.path}: taking over from a run that did not exit cleanly ({why}; {holder})")
        self.generation = new
        self._beater = threading.Thread(target=self._beat, name="run.lock heartbeat", daemon=True)
        self._beater.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                new = paths.write_versioned(self.path, self._record(), self.generation)
            except Exception as e:  # noqa: BLE001 -- a network error: try again at the next beat
                self.log(f"{self.path}: could not rewrite the lock ({e}); trying again in {self.heartbeat_s:g} s")
                continue
            if new is None:
                holder = self._parse(paths.read_versioned(self.path)[0])
                self.log(f"{self.path}: another run took the run directory over ({holder}); this run no longer "
                         "holds it: stop one of them")
                return
            self.generation = new

    def __exit__(self, *exc) -> None:
        if self.remote:
            self._stop.set()
            if self._beater is not None:
                self._beater.join()
            paths.write_versioned(self.path, "", self.generation)     # not ours any more: left as it is
            return
        os.ftruncate(self.fd, 0)
        os.close(self.fd)                             # releases the flock
        self.fd = None
