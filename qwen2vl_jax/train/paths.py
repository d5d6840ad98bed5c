"""Paths of run directories, checkpoints and datasets: local folders and Cloud Storage (`gs://BUCKET/PATH`)
through one abstraction, etils `epath` (the one orbax writes checkpoints with).

    run = paths.path("gs://my-bucket/runs/stage1_72b")      # or a local folder
    paths.write_text(run / "model_config.json", text)        # one object / an atomic rename
    log = paths.JsonlLog(run / "losses.jsonl"); log.append({...}); log.flush()

Backends: a local path is the file system; `gs://` goes through epath's fsspec backend (gcsfs) for files and
listings, through tensorstore for orbax's arrays, and through google-cloud-storage for TensorBoard's event
files (tensorboardX). All three honour the usual credentials (on a TPU VM: the VM's service account).
A local Cloud Storage emulator (the tests start one) is reached through STORAGE_EMULATOR_HOST (gcsfs,
google-cloud-storage) and TENSORSTORE_GCS_HTTP_URL (tensorstore).

Cloud Storage has no append and no rename: a file is written as one object (readers see the old or the new
content, never a part), and `JsonlLog` keeps an appendable log in memory and rewrites the object on `flush`.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping

from etils import epath

REMOTE_PREFIXES = ("gs://",)

PathLike = str | os.PathLike


def is_remote(p: PathLike) -> bool:
    """True for an object-store URL (gs://...), False for a local path."""
    return str(p).startswith(REMOTE_PREFIXES)


def path(p: PathLike) -> epath.Path:
    """An epath.Path: gs:// URLs as given, local paths made absolute (`~` expanded)."""
    s = os.fspath(p)
    if not s:
        raise ValueError("empty path")
    if "://" in s and not is_remote(s):
        raise ValueError(f"path {s!r}: only local paths and {', '.join(REMOTE_PREFIXES)} URLs are supported")
    return epath.Path(s if is_remote(s) else os.path.abspath(os.path.expanduser(s)))


def join(base: PathLike, *parts: str) -> str:
    return os.fspath(path(base).joinpath(*parts))


def parent(p: PathLike) -> str:
    return os.fspath(path(p).parent)


def exists(p: PathLike) -> bool:
    return path(p).exists()


def is_dir(p: PathLike) -> bool:
    return path(p).is_dir()


def listdir(p: PathLike) -> list[str]:
    """Names (not paths) in the folder `p`, sorted; [] when it does not exist."""
    d = path(p)
    return sorted(c.name for c in d.iterdir()) if d.is_dir() else []


def makedirs(p: PathLike) -> None:
    """Creates the folder (a no-op on Cloud Storage, whose folders are name prefixes)."""
    if not is_remote(p):
        path(p).mkdir(parents=True, exist_ok=True)


def read_text(p: PathLike) -> str:
    return path(p).read_text()


def write_text(p: PathLike, text: str) -> None:
    """Writes `text` whole: one object upload on Cloud Storage, a temporary file renamed over `p` locally, so
    a reader (or a kill -9) never sees half a file."""
    target = path(p)
    if is_remote(p):
        target.write_text(text)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.fspath(target.parent), prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, os.fspath(target))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def staging_dir(remote: PathLike) -> str:
    """A local folder that stands for `remote` (gs://B/P -> TMPDIR/qwen2vl_jax_staging/B/P): a dataset is written
    there and uploaded, and a re-run finds it again."""
    if not is_remote(remote):
        raise ValueError(f"{os.fspath(remote)!r} is not a gs:// URL")
    return os.path.join(tempfile.gettempdir(), "qwen2vl_jax_staging", os.fspath(remote).split("://", 1)[1])


def upload_tree(local_dir: PathLike, remote_dir: PathLike) -> int:
    """Copies every file under the local folder to the same relative path under `remote_dir` (streamed through
    gcsfs, the backend epath uses for gs://). Returns the number of files."""
    import fsspec
    local_dir = os.fspath(local_dir)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(local_dir) for f in fs)
    gcs = fsspec.filesystem("gcs")
    for f in files:
        gcs.put_file(f, join(remote_dir, os.path.relpath(f, local_dir)))
    return len(files)


def read_json(p: PathLike) -> Any:
    return json.loads(read_text(p))


def write_json(p: PathLike, payload: Any, indent: int | None = 1) -> None:
    write_text(p, json.dumps(payload, indent=indent))


class JsonlLog:
    """A JSON-lines log that is appended to, here or in a bucket.

    Local: each `append` is written and flushed at once (a kill -9 loses nothing written). Cloud Storage
    (no append): the existing object is read once, appended records are kept in memory, and `flush` / `close`
    upload the whole log as one object; records since the last flush are lost on a kill -9 (a resumed run
    re-runs and re-logs those steps)."""

    def __init__(self, p: PathLike):
        self.path = path(p)
        self.remote = is_remote(p)
        if self.remote:
            self._lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
            if self._lines and not self._lines[-1].endswith("\n"):
                self._lines[-1] += "\n"
            self._dirty = False
            self._file = None
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(os.fspath(self.path), "a")

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(dict(record)) + "\n"
        if self.remote:
            self._lines.append(line)
            self._dirty = True
        else:
            self._file.write(line)
            self._file.flush()

    def flush(self) -> None:
        if self.remote and self._dirty:
            self.path.write_text("".join(self._lines))
            self._dirty = False

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


def read_jsonl(p: PathLike) -> list[dict]:
    """The records of a JSON-lines file; [] when it does not exist."""
    f = path(p)
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]

