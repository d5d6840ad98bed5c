"""JSONL manifest -> ArrayRecord shards for the "arrayrecord:<glob>" data source.

    python -m launch.prepare_data --manifest=data.jsonl --out=DIR [--num_shards=N] [--no_verify]

Each manifest line is one JSON object (schema: qwen2vl_jax/data/sources.py docstring), e.g.
    {"type": "caption", "images": ["img/0001.jpg"], "text": "a dog on a beach"}
Relative paths are resolved against the manifest's folder. Images are read and embedded in the record
(and, unless --no_verify, fully decoded once so corrupt files are caught here); videos are stored as
absolute paths (checked to exist and to open as a video container unless --no_verify).

Writes DIR/data-SSSSS-of-NNNNN.array_record (records dealt round-robin over the shards, manifest order)
and DIR/summary.json; a progress bar with the rate goes to stderr, and a summary of what was skipped and
why (bad_json, bad_schema, missing_file, image_<reason>, video_<reason>) is printed at the end.
Exit status 0 when at least one record was written, 1 otherwise.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import time

from absl import flags

from experiments import flags as cli
from qwen2vl_jax.data import media, sources

FLAGS = flags.FlagValues()


def shard_paths(out_dir: str, num_shards: int) -> list[str]:
    return [os.path.join(out_dir, f"data-{i:05d}-of-{num_shards:05d}.array_record") for i in range(num_shards)]


def _resolve(path: str, base: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def _check_video(path: str) -> None:
    """Cheap container check: opens the file and looks for a video stream (no full decode)."""
    import av
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise media.BadMediaError("unreadable_video", f"{path}: no video stream")
    except (av.error.FFmpegError, OSError, ValueError) as e:
        if isinstance(e, media.BadMediaError):
            raise
        raise media.BadMediaError("unreadable_video", f"{path}: {e}") from e


def entry_to_record(line: str, base_dir: str, origin: str, verify: bool = True) -> bytes:
    """One manifest line -> record bytes. Raises sources.BadRecordError with the skip reason."""
    entry = sources.read_manifest_line(line)
    images = []
    for p in entry["images"]:
        path = _resolve(p, base_dir)
        if not os.path.isfile(path):
            raise sources.BadRecordError("missing_file", f"image {path} does not exist")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise sources.BadRecordError("unreadable_file", f"{path}: {e}") from e
        if verify:
            try:
                sources.load_image_bytes(data)
            except media.BadMediaError as e:
                raise sources.BadRecordError(f"image_{e.reason}", f"{path}: {e}") from e
        images.append(data)
    video = None
    if entry["video"] is not None:
        video = _resolve(entry["video"], base_dir)
        if not os.path.isfile(video):
            raise sources.BadRecordError("missing_file", f"video {video} does not exist")
        if not os.access(video, os.R_OK):
            raise sources.BadRecordError("unreadable_file", f"video {video} is not readable")
        if verify:
            try:
                _check_video(video)
            except media.BadMediaError as e:
                raise sources.BadRecordError(f"video_{e.reason}", str(e)) from e
    return sources.encode_record(entry, images, video, origin)


class _Progress:
    """A stderr progress line with rate (tqdm when available)."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=total, unit="line", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        except ImportError:  # pragma: no cover
            self._bar = None
        self._n, self._total, self._t0, self._last = 0, total, time.time(), 0.0

    def update(self, written: int, skipped: int) -> None:
        self._n += 1
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(written=written, skipped=skipped, refresh=False)
        elif time.time() - self._last > 1.0 or self._n == self._total:
            rate = self._n / max(time.time() - self._t0, 1e-9)
            print(f"\r{self._n}/{self._total} lines, {rate:.1f} lines/s, skipped {skipped}", end="", file=sys.stderr)
            self._last = time.time()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            print(file=sys.stderr)


def prepare(manifest: str, out_dir: str, num_shards: int = 1, verify: bool = True) -> dict:
    """Writes the shards; returns the summary dict (also written to out_dir/summary.json)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1; got {num_shards}")
    if not os.path.isfile(manifest):
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.dirname(os.path.abspath(manifest))
    with open(manifest, encoding="utf-8") as f:
        lines = f.read().splitlines()
    paths = shard_paths(out_dir, num_shards)
    writers = [ArrayRecordWriter(p, "group_size:1") for p in paths]
    skipped: collections.Counter = collections.Counter()
    examples: dict[str, str] = {}
    per_type: collections.Counter = collections.Counter()
    written = 0
    t0 = time.time()
    progress = _Progress(len(lines))
    try:
        for lineno, line in enumerate(lines, start=1):
            if line.strip():
                origin = f"{os.path.basename(manifest)}:{lineno}"
                try:
                    rec = entry_to_record(line, base, origin, verify)
                except sources.BadRecordError as e:
                    skipped[e.reason] += 1
                    examples.setdefault(e.reason, f"line {lineno}: {e}")
                else:
                    writers[written % num_shards].write(rec)
                    per_type[json.loads(line)["type"]] += 1
                    written += 1
            progress.update(written, sum(skipped.values()))
    finally:
        progress.close()
        for w in writers:
            w.close()
    summary = {"manifest": os.path.abspath(manifest), "lines": len(lines), "written": written,
               "skipped": dict(skipped), "skipped_examples": examples, "per_type": dict(per_type),
               "shards": [os.path.basename(p) for p in paths], "seconds": round(time.time() - t0, 3)}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"wrote {summary['written']} records ({', '.join(f'{k} {v}' for k, v in sorted(summary['per_type'].items()))}) "
             f"from {summary['lines']} lines into {len(summary['shards'])} shard(s) in {summary['seconds']:.1f}s"]
    if summary["skipped"]:
        lines.append(f"skipped {sum(summary['skipped'].values())}:")
        for reason, n in sorted(summary["skipped"].items()):
            lines.append(f"  {reason}: {n}  (e.g. {summary['skipped_examples'][reason]})")
    else:
        lines.append("skipped 0")
    return "\n".join(lines)


flags.DEFINE_string("manifest", None, "JSONL manifest (schema: qwen2vl_jax/data/sources.py)", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output folder for the ArrayRecord shards", flag_values=FLAGS)
flags.DEFINE_integer("num_shards", 1, "number of ArrayRecord shards", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_bool("no_verify", False, "skip decoding images / opening videos", flag_values=FLAGS)
flags.mark_flags_as_required(["manifest", "out"], flag_values=FLAGS)


def main(argv) -> int:
    cli.parse(FLAGS, argv, __doc__)
    try:
        summary = prepare(FLAGS.manifest, FLAGS.out, FLAGS.num_shards, verify=not FLAGS.no_verify)
    except (OSError, ValueError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary), file=sys.stderr)
    return 0 if summary["written"] else 1


if __name__ == "__main__":
    cli.run(main)
