"""Paths of run directories, checkpoints and datasets: local folders and Cloud Storage (`gs://BUCKET/PATH`)
through one abstraction, etils `epath` (the one orbax writes checkpoints with).

    run = paths.path("gs://my-bucket/runs/stage1_72b")      # or a local folder
    paths.write_text(run / "model_config.json", text)        # one object / an atomic rename
    log = paths.JsonlLog(run / "losses.jsonl"); log.append({...}); log.flush()

Backends: a local path is the file system; `gs://` goes through epath's fsspec backend (gcsfs) for files and
listings, through tensorstore for orbax's arrays, and through google-cloud-storage for TensorBoard's event
files (tensorboardX) and the generation-checked writes of the run lock. All honour the usual credentials
(on a TPU VM: the VM's service account). gcsfs caches listings; `exists` / `is_dir` / `listdir` drop that
cache first, because tensorstore, google-cloud-storage and other processes write the bucket behind it.
A local Cloud Storage emulator (the tests start one) is reached through STORAGE_EMULATOR_HOST (gcsfs,
google-cloud-storage) and TENSORSTORE_GCS_HTTP_URL (tensorstore).

Cloud Storage has no append and no rename: a file is written as one object (readers see the old or the new
content, never a part), and `JsonlLog` keeps an appendable log in memory and rewrites the object on `flush`;
`rename` of a folder copies its objects and deletes the originals. Objects carry a generation number that
changes with every write: `read_versioned` / `write_versioned` write only when the object is still the
generation that was read (the compare-and-swap a lock in a bucket needs).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Mapping, Sequence

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


def _gcs():
    """The gcsfs file system epath uses for gs:// (fsspec shares one instance per set of arguments)."""
    import fsspec
    return fsspec.filesystem("gcs", finalize_on_close=True)


def _fresh(p: PathLike) -> epath.Path:
    """path(p), with gcsfs's listing cache dropped first for gs://: other processes, tensorstore (orbax's
    arrays) and google-cloud-storage write the bucket behind gcsfs's back, so a cached listing can be stale."""
    if is_remote(p):
        _gcs().invalidate_cache()
    return path(p)


def join(base: PathLike, *parts: str) -> str:
    return os.fspath(path(base).joinpath(*parts))


def parent(p: PathLike) -> str:
    return os.fspath(path(p).parent)


def exists(p: PathLike) -> bool:
    return _fresh(p).exists()


def is_dir(p: PathLike) -> bool:
    return _fresh(p).is_dir()


def listdir(p: PathLike) -> list[str]:
    """Names (not paths) in the folder `p`, sorted; [] when it does not exist."""
    d = _fresh(p)
    return sorted(c.name for c in d.iterdir()) if d.is_dir() else []


def makedirs(p: PathLike) -> None:
    """Creates the folder (a no-op on Cloud Storage, whose folders are name prefixes)."""
    if not is_remote(p):
        path(p).mkdir(parents=True, exist_ok=True)


def read_text(p: PathLike) -> str:
    return path(p).read_text(encoding="utf-8")


def write_text(p: PathLike, text: str) -> None:
    """Writes `text` whole: one object upload on Cloud Storage, a temporary file renamed over `p` locally, so
    a reader (or a kill -9) never sees half a file."""
    target = path(p)
    if is_remote(p):
        target.write_text(text, encoding="utf-8")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.fspath(target.parent), prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
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
    local_dir = os.fspath(local_dir)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(local_dir) for f in fs)
    gcs = _gcs()
    for f in files:
        gcs.put_file(f, join(remote_dir, os.path.relpath(f, local_dir)))
    return len(files)


def rename(src: PathLike, dst: PathLike) -> None:
    """Moves a file or folder (`dst` must not exist): a rename locally; on Cloud Storage a copy of every object
    under `src` to `dst`, then their deletion (not atomic: a reader may see both for a moment)."""
    if is_remote(src) != is_remote(dst):
        raise ValueError(f"rename {os.fspath(src)!r} -> {os.fspath(dst)!r}: both local or both gs://")
    if not is_remote(src):
        os.rename(os.fspath(path(src)), os.fspath(path(dst)))
        return
    gcs = _gcs()
    gcs.invalidate_cache()
    gcs.copy(os.fspath(src), os.fspath(dst), recursive=True)
    gcs.rm(os.fspath(src), recursive=True)


def local_copy(remote: PathLike, names: Sequence[str] | None = None) -> str:
    """A local copy of the gs:// folder `remote` (in `staging_dir(remote)`, downloaded again each call) for
    readers that need local files (safetensors, a converted checkpoint's folder); `names`: only those files
    of the folder (those that exist)."""
    local = staging_dir(remote)
    gcs = _gcs()
    gcs.invalidate_cache()
    prefix = os.fspath(remote).split("://", 1)[1].rstrip("/") + "/"
    if names is None:
        files = [f for f in gcs.find(os.fspath(remote)) if not f.endswith("/")]
    else:
        files = [prefix + n for n in names if gcs.exists(prefix + n)]
    for f in files:
        target = os.path.join(local, f.removeprefix(prefix))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        gcs.get_file(f, target)
    return local


def _blob(p: PathLike):
    from google.cloud import storage
    bucket, _, name = os.fspath(p).split("://", 1)[1].partition("/")
    if not name:
        raise ValueError(f"{os.fspath(p)!r} names a bucket, not an object")
    if os.environ.get("STORAGE_EMULATOR_HOST"):       # the emulator: no credentials
        from google.auth.credentials import AnonymousCredentials
        client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "emulator"),
                                credentials=AnonymousCredentials())
    else:
        client = storage.Client()
    return client.bucket(bucket).blob(name)


def read_versioned(p: PathLike) -> tuple[str, int]:
    """(text, generation) of a gs:// object; ("", 0) when it does not exist."""
    from google.api_core import exceptions
    blob = _blob(p)
    try:
        blob.reload()
        return blob.download_as_text(if_generation_match=blob.generation), int(blob.generation)
    except exceptions.NotFound:
        return "", 0
    except exceptions.PreconditionFailed:        # rewritten between the two requests: read it again
        return read_versioned(p)


def write_versioned(p: PathLike, text: str, generation: int) -> int | None:
    """Writes the gs:// object only if it is still at `generation` (0: only if it does not exist); returns its
    new generation, or None when another writer got there first (nothing written)."""
    from google.api_core import exceptions
    blob = _blob(p)
    try:
        blob.upload_from_string(text, if_generation_match=generation)
    except exceptions.PreconditionFailed:
        return None
    return int(blob.generation)


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
            self._lines = self.path.read_text().splitlines(keepends=True) if exists(p) else []
            if self._lines and not self._lines[-1].endswith("\n"):
                self._lines[-1] += "\n"
            self._dirty = False
            self._file = None
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(os.fspath(self.path), "a")

    def append(self, record: Mapping[str, Any]) -> None:
        """Strict JSON: a non-finite float is written as null (JSON has no NaN or Infinity)."""
        strict = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        line = json.dumps(strict, allow_nan=False) + "\n"
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
    if not exists(p):
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]

