"""launch.prepare_data --engine=beam: the import (prepare.py) as an Apache Beam pipeline, for corpora that one
machine's cores cannot import in time.

    import_beam(inputs, out_dir, opts=ImportOptions("parquet"), target=Target(model_cfg, data_cfg), heldout=500,
                num_shards=1024, runner="DataflowRunner", pipeline_args=["--project=P", "--region=R", ...])

The per-record work is prepare.py's, not a copy: the driver checks the arguments and OUT (prepare.begin) and cuts
the input into chunks (prepare.plan: importers.scan, in input order); then

    Create(input file, its first chunk index and chunk starts) -> Reshuffle -> ParDo ScanFile: the file's
       chunks, read again as the driver read them -> Reshuffle (spread the chunks over the workers)
    -> ParDo ImportChunk: process_chunk + split_chunk + shard_of per chunk (the tokenizer loaded once per
       worker in setup), emitting ((split, shard), (chunk index, records)) and the chunk's Stats
    -> GroupByKey per (split, shard) -> WriteShard: the shard's chunks in chunk order through prepare.ShardWriter
       straight into OUT/.incomplete (a gs:// OUT from each worker: one shard at a time on its local disk)
    Stats -> CombineGlobally(merge) -> OUT/.incomplete/beam_result.json (with the records each shard holds)

and the driver ends as every path does (prepare.finish: summary.json, summary.png, files moved into place).
Records are placed by chunk (prepare's module docstring), and each shard is written in chunk order, so the
output is byte for byte the local path's, shard by shard, whichever runner and however the work was spread.

A WriteShard spools its shard's chunks to a local temporary file as GroupByKey hands them over (in any order)
and writes them in chunk order from there: worker memory holds one chunk, its disk twice one shard (spool and,
for gs://, ShardWriter's upload file), so --num_shards sets the disk a worker needs.

The driver reads the inputs' index once (importers.scan: JSON lines are read whole, tar shards' member offsets
and Parquet row-group sizes are read from the files) for the input positions (held-out places, chunk starts);
the job itself holds one small element per input file, and the workers scan their files again (a file that
changed in between stops the import). A corpus of hundreds of millions of records is best given as many
WebDataset tars or Parquet files (img2dataset, OBELICS, ...): the driver's scan reads only their indexes.
"""
from __future__ import annotations

import pickle
import shlex
import sys
import tempfile
import time
from typing import Iterator, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from qwen2vl_jax.data import importers, prepare
from qwen2vl_jax.data.tokenizer import load_tokenizer
from qwen2vl_jax.train import paths

RUNNERS = ("DirectRunner", "PrismRunner", "DataflowRunner")
RESULT = "beam_result.json"          # in OUT/.incomplete: the merged Stats and records per shard, for the driver
_STATS = "stats"
_NO_CHUNK = -1                        # the empty group that makes every shard file exist


def pipeline_options(runner: str, pipeline_args: str | Sequence[str], workers: int, out_dir: str):
    """Beam PipelineOptions: --runner plus the given options (a string is split as a shell would). The
    DirectRunner runs `workers` processes (multi_processing) unless the options set direct_num_workers. Workers
    of a cluster runner must get this package (--setup_file=./pyproject.toml or --sdk_container_image) and reach
    OUT (gs://): a ValueError otherwise."""
    if runner not in RUNNERS:
        raise ValueError(f"--runner={runner!r}; valid: {', '.join(RUNNERS)}")
    args = shlex.split(pipeline_args) if isinstance(pipeline_args, str) else list(pipeline_args)
    if any(a == "--runner" or a.startswith("--runner=") for a in args):
        raise ValueError(f"--beam_options {' '.join(args)!r} sets the runner: use --runner "
                         f"(valid: {', '.join(RUNNERS)})")
    if runner == "DirectRunner" and not any(a.startswith("--direct_num_workers") for a in args) and workers > 1:
        args += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    if runner == "DataflowRunner":
        if not any(a.startswith(("--setup_file", "--sdk_container_image")) for a in args):
            raise ValueError("--runner=DataflowRunner: its workers need this package; add --setup_file=./pyproject.toml"
                             " (or --sdk_container_image=IMAGE) to --beam_options")
        if not paths.is_remote(out_dir):
            raise ValueError(f"--runner=DataflowRunner writes from its workers: --out {out_dir} must be "
                             "gs://BUCKET/PATH")
    return PipelineOptions([f"--runner={runner}", *args])


def import_beam(inputs: str | Sequence[str], out_dir: str, *, opts: importers.ImportOptions, target: prepare.Target,
                heldout: int = 0, num_shards: int = 1, overwrite: bool = False, runner: str = "DirectRunner",
                pipeline_args: str | Sequence[str] = (), workers: int = 1, stream=None) -> dict:
    """prepare.prepare's import on a Beam runner (module docstring): the same OUT, summary and return value
    (summary["workers"]: the DirectRunner's processes, 0 for a cluster runner, which sizes itself)."""
    stream = stream or sys.stderr
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0 (0: one per core)")
    workers = (workers or prepare.available_cores()) if runner == "DirectRunner" else 0
    options = pipeline_options(runner, pipeline_args, workers, out_dir)
    files, settings, existing = prepare.begin(inputs, out_dir, opts, target, heldout, num_shards, None, overwrite)
    if existing is not None:
        return existing | {"up_to_date": True}
    t0 = time.time()
    chunks, starts, positions = prepare.plan(files, opts, heldout)
    tmp = prepare.fresh_tmp(out_dir, None)
    shard_files = prepare.layout(num_shards, heldout, None)
    print(f"beam: {sum(len(c) for c in chunks)} input records in {len(chunks)} chunks on {runner} -> {out_dir}",
          file=stream)
    with beam.Pipeline(options=options) as p:
        imported = (p | "Files" >> beam.Create(file_plan(files, settings["inputs"], chunks, starts))
                    | "SpreadFiles" >> beam.Reshuffle()
                    | "Scan" >> beam.ParDo(ScanFile(opts))
                    | "SpreadChunks" >> beam.Reshuffle()
                    | "Import" >> beam.ParDo(ImportChunk(opts, target, positions, num_shards)).with_outputs(
                        _STATS, main="records"))
        every_shard = p | "EveryShard" >> beam.Create(
            [((split, i), (_NO_CHUNK, [])) for split, names in shard_files.items() for i in range(len(names))])
        counts = ((imported.records, every_shard) | "AllRecords" >> beam.Flatten()
                  | "PerShard" >> beam.GroupByKey()
                  | "Write" >> beam.ParDo(WriteShard(tmp, shard_files))
                  | "CountPerShard" >> beam.combiners.ToList())
        (imported[_STATS] | "MergeStats" >> beam.CombineGlobally(MergeStats())
         | "Result" >> beam.Map(_write_result, paths.join(tmp, RESULT), beam.pvalue.AsSingleton(counts)))
    stats, counts = _read_result(paths.join(tmp, RESULT), shard_files)
    return prepare.finish(out_dir, tmp, settings, opts.format, files, stats, shard_files, workers, time.time() - t0,
                          None) | {"up_to_date": False}


def file_plan(files: Sequence[str], identities: Sequence[list], chunks: Sequence, starts: Sequence[int]) -> list:
    """Per input file (path, identity, first chunk index, first input position of each of its chunks): what the
    pipeline starts from. The chunks themselves are scanned again by the workers (ScanFile), so the job's
    description stays small (Dataflow limits it to some MB) however many records the inputs hold."""
    out, c = [], 0
    for path, identity in zip(files, identities):
        first = c
        while c < len(chunks) and chunks[c].path == path:
            c += 1
        if c > first:
            out.append((path, identity, first, tuple(starts[first:c])))
    if c != len(chunks):
        raise RuntimeError(f"chunks {c}.. of {len(chunks)} belong to no input file, or files repeat")
    return out


# ----------------------------------------------------------------------------------------------
# The transforms (pickled to the workers: everything they hold is plain data)


class ScanFile(beam.DoFn):
    """(path, file identity, first chunk index, first input position of each chunk) -> (chunk index, first input
    position, chunk) per chunk of the file, read as the driver read it (importers.scan); a file that changed
    since (another size, version or number of chunks) is an error, not records in the wrong places."""

    def __init__(self, opts):
        self.opts = opts

    def process(self, element) -> Iterator[tuple]:
        path, identity, first, starts = element
        now = importers.file_identity(path)
        chunks = importers.scan([path], self.opts)
        sizes = [b - a for a, b in zip(starts, starts[1:])]
        if now != list(identity) or len(chunks) != len(starts) or [len(c) for c in chunks[:-1]] != sizes:
            raise RuntimeError(f"{path} changed during the import ({identity[1:]} -> {now[1:]}, {len(starts)} -> "
                               f"{len(chunks)} chunks): run it again")
        for k, chunk in enumerate(chunks):
            yield first + k, starts[k], chunk


class ImportChunk(beam.DoFn):
    """(chunk index, first input position, chunk) -> ((split, shard), (chunk index, records of that split, in
    input order)) per shard the chunk writes to, and the chunk's Stats (tagged "stats")."""

    def __init__(self, opts, target, positions, num_shards):
        self.opts, self.target, self.positions, self.num_shards = opts, target, positions, num_shards

    def setup(self):
        self.tokenizer = load_tokenizer(self.target.tokenizer)     # once per worker process

    def process(self, element) -> Iterator[tuple]:     # the main output's type (the stats are tagged)
        c, start, chunk = element
        results = prepare.process_chunk(chunk, self.opts, self.target, self.tokenizer)
        splits = prepare.split_chunk([isinstance(r, prepare.Accepted) for r in results], start, self.positions)
        stats = prepare.Stats()
        stats.add_chunk(start, results, splits)
        shards: dict = {}
        for r, split in zip(results, splits):
            if split is not None:
                shards.setdefault((split, prepare.shard_of(c, split, self.num_shards, None)), []).append(r.record)
        for key, records in shards.items():
            yield key, (c, records)
        yield beam.pvalue.TaggedOutput(_STATS, stats)


class WriteShard(beam.DoFn):
    """((split, shard), [(chunk index, records), ...] in any order) -> the shard file under tmp, its chunks
    in chunk order (spooled to a local temporary file first: one chunk in memory); emits (file, records)."""

    def __init__(self, tmp, shard_files):
        self.tmp, self.shard_files = tmp, shard_files

    def process(self, element):
        (split, i), groups = element
        name = self.shard_files[split][i]
        index = []
        with tempfile.TemporaryFile(prefix="qwen2vl_jax_spool_") as spool:
            for c, records in groups:
                if c == _NO_CHUNK:
                    continue
                index.append((c, spool.tell()))
                pickle.dump(records, spool, protocol=pickle.HIGHEST_PROTOCOL)
            index.sort()
            repeated = sorted({a for (a, _), (b, _) in zip(index, index[1:]) if a == b})
            if repeated:        # a runner that delivered a chunk twice: never write it twice
                raise RuntimeError(f"{name}: chunks {repeated[:5]} arrived more than once")
            writer = prepare.ShardWriter(paths.join(self.tmp, name))
            try:
                for _, offset in index:
                    spool.seek(offset)
                    for r in pickle.load(spool):
                        writer.write(r)
            finally:
                writer.close()
        yield name, writer.count


class MergeStats(beam.CombineFn):
    """prepare.Stats of the chunks merged (in any order: Stats.merge does not depend on it)."""

    def create_accumulator(self):
        return prepare.Stats()

    def add_input(self, acc, stats):
        return acc.merge(stats)

    def merge_accumulators(self, accs):
        accs = iter(accs)
        out = next(accs)
        for a in accs:
            out.merge(a)
        return out

    def extract_output(self, acc):
        return acc


def _write_result(stats: prepare.Stats, path: str, counts: list) -> None:
    paths.write_json(path, {"stats": stats.to_json(), "records_per_file": dict(counts)})


def _read_result(path: str, shard_files: dict[str, list[str]]) -> tuple[prepare.Stats, dict]:
    """The merged Stats and records per shard file the pipeline left; a RuntimeError when the files do not hold
    what the statistics count (a runner that lost or repeated work)."""
    result = paths.read_json(path)
    paths.path(path).unlink()
    stats, counts = prepare.Stats.from_json(result["stats"]), result["records_per_file"]
    for split, names in shard_files.items():
        missing = [n for n in names if n not in counts]
        held = sum(counts.get(n, 0) for n in names)
        if missing or held != stats.written[split]:
            raise RuntimeError(f"beam: the {split} files hold {held} records ({len(missing)} of {len(names)} files "
                               f"missing), the statistics count {stats.written[split]}")
    return stats, counts
