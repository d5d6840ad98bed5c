"""launch.prepare_data --engine=beam (qwen2vl_jax/data/beam_import.py) against the local engine (prepare.py, tested
against hand counts and the training pipeline in test_prepare_data.py / test_importers.py): on the corpora those
tests build, the Beam DirectRunner writes the same files byte for byte (so the same records, held-out members and
order) and the same summary; both write straight into a bucket (the Cloud Storage emulator, tests/gcs.py) with
one shard at a time on local disk."""
import json
import os
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("apache_beam")

from qwen2vl_jax.data import beam_import, importers, prepare  # noqa: E402
from qwen2vl_jax.train import paths  # noqa: E402
from test_importers import (OBELICS_FEATURES, TARGET, files, hf_parquet, mmc4_document,  # noqa: E402,F401
                            obelics_table, write_img2dataset_shard)
from test_prepare_data import REPO, manifest  # noqa: E402,F401

RUN_DEPENDENT = ("seconds", "records_per_second", "workers", "up_to_date")


def dataset_files(out):
    """{path under OUT: bytes} of every shard file, local or gs:// (listed and read through paths, which
    test_paths.py checks against the emulator's own API)."""
    got = {}
    for split in prepare.SPLITS:
        folder = paths.join(str(out), split)
        for name in sorted(paths.listdir(folder)) if paths.exists(folder) else []:
            got[f"{split}/{name}"] = paths.path(paths.join(folder, name)).read_bytes()
    return got


def same_summary(a, b):
    return {k: v for k, v in a.items() if k not in RUN_DEPENDENT} == \
        {k: v for k, v in b.items() if k not in RUN_DEPENDENT}


def both_engines(inputs, tmp_path, fmt, heldout=2, num_shards=3, **opts):
    o = importers.ImportOptions(fmt, **opts)
    local = prepare.prepare(str(inputs), str(tmp_path / "local"), opts=o, target=TARGET, heldout=heldout,
                            num_shards=num_shards, progress=False)
    beam = beam_import.import_beam(str(inputs), str(tmp_path / "beam"), opts=o, target=TARGET, heldout=heldout,
                                   num_shards=num_shards, workers=1)
    return local, beam


def corpus(kind, tmp_path, files):
    """(input, format, import options) of one of the corpora the importer tests build (as the datasets ship)."""
    import pyarrow as pa
    if kind == "obelics":          # paths, a URL, a corrupt image, a document left without images, bytes
        d = tmp_path / "obelics"
        (d / "photos").mkdir(parents=True)
        (d / "photos/a.jpg").write_bytes(files["astronaut.jpg"])
        url = "https://cdn.example.com/img/x.jpg"
        hf_parquet(d / "train-00000-of-00002.parquet", obelics_table(
            texts=[["Intro.", None, "After.", None], [None, "Only remote."], ["Both.", "x"], ["First.", None],
                   ["One.", None, "Two."]],
            images=[[None, "photos/a.jpg", None, url], [url, None], ["photos/a.jpg", None], [None, "photos/a.jpg"],
                    [None, "photos/a.jpg", None]], image_type=pa.string()), OBELICS_FEATURES, row_group_size=2)
        hf_parquet(d / "train-00001-of-00002.parquet", obelics_table(
            texts=[[None, "A cup.", None, "More."], ["Text.", None]],
            images=[[files["coffee.png"], None, b"not an image", None], [None, files["chelsea.webp"]]],
            image_type=pa.binary()), {}, row_group_size=1)
        return d, "parquet", {}
    if kind == "mmc4":             # images under --media_root, one never downloaded, a bad matched index
        images = tmp_path / "mmc4_images"
        images.mkdir()
        (images / "a.jpg").write_bytes(files["astronaut.jpg"])
        (images / "c.png").write_bytes(files["coffee.png"])
        docs = [mmc4_document(f"https://example.com/{i}", ["A launch.", "The crew.", "Coffee."],
                              [("c.png", 2), ("a.jpg", 0), ("gone.jpg", 1)]) for i in range(5)]
        docs.insert(2, mmc4_document("https://example.com/bad", ["One."], [("a.jpg", 1)]))
        data = tmp_path / "docs_shard_0.jsonl"
        data.write_text("".join(json.dumps(x) + "\n" for x in docs))
        return data, "mmc4", {"media_root": str(images)}
    if kind == "webdataset":       # img2dataset tars, captions from .txt or .json, one image that is not one
        d = tmp_path / "laion"
        d.mkdir()
        for t in range(3):
            write_img2dataset_shard(d / f"{t:05d}.tar", [
                (f"{t:04d}{k:05d}", ext, files[name] if name else b"not a jpeg", f"photo {t} {k}", k % 2 == 0)
                for k, (ext, name) in enumerate((("jpg", "astronaut.jpg"), ("png", "coffee.png"),
                                                 ("webp", "chelsea.webp"), ("jpg", "" if t == 1 else "coffee.png")))])
        return d, "webdataset", {}
    # bad input per line: latin-1, not JSON, JSON that is not an object, good chat lines between them
    good = [json.dumps({"messages": [{"role": "user", "content": f"What is 2+{i}?"},
                                     {"role": "assistant", "content": str(2 + i)}]}).encode() for i in range(6)]
    latin1 = json.dumps({"messages": [{"role": "user", "content": "Café?"}, {"role": "assistant", "content": "Oui"}]},
                        ensure_ascii=False).encode("latin-1")
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(b"\n".join([b"{not json", good[0], latin1, good[1], b"[1, 2]", good[2], good[3], b"7", good[4],
                                 good[5]]) + b"\n")
    return data, "messages", {}


@pytest.mark.parametrize("kind", ["obelics", "mmc4", "webdataset", "bad_lines"])
def test_beam_writes_the_local_engines_files(kind, tmp_path, files, monkeypatch):
    """Chunks of 2 records (held-out places and shards cross chunk boundaries): every shard file and the
    summary (counts, rejects with their first example, statistics) are the local engine's."""
    monkeypatch.setattr(importers, "CHUNK_RECORDS", 2)
    inputs, fmt, opts = corpus(kind, tmp_path, files)
    local, beam = both_engines(inputs, tmp_path, fmt, **opts)
    assert local["written"]["heldout"] == 2 and local["rejected"] and local["written"]["train"] >= 3, local
    want = dataset_files(tmp_path / "local")
    assert len(want) == 4 and sum(len(v) > 0 for v in want.values()) >= 3
    assert dataset_files(tmp_path / "beam") == want
    assert same_summary(beam, local)
    assert json.loads((tmp_path / "beam" / "summary.json").read_text())["written"] == local["written"]


def test_beam_on_the_manifest_with_every_rejection(tmp_path, manifest, monkeypatch):
    """test_prepare_data's manifest (every record type, a video, one record per rejection reason), more shards
    than some chunks fill: the same files and summary; a re-run with either engine finds the dataset up to
    date (the settings do not depend on the engine)."""
    from test_prepare_data import TARGET as target
    monkeypatch.setattr(importers, "CHUNK_RECORDS", 3)
    o = importers.ImportOptions("manifest")
    local = prepare.prepare(str(manifest), str(tmp_path / "local"), opts=o, target=target, heldout=3, num_shards=6,
                            progress=False)
    beam = beam_import.import_beam(str(manifest), str(tmp_path / "beam"), opts=o, target=target, heldout=3,
                                   num_shards=6)
    # candidates 2, 7, 12: 7 and 12 are rejected in chunks with no accepted record (places lost)
    assert len(local["rejected"]) == 7 and local["written"] == {"train": 5, "heldout": 1}
    assert dataset_files(tmp_path / "beam") == dataset_files(tmp_path / "local")
    assert same_summary(beam, local)
    assert prepare.prepare(str(manifest), str(tmp_path / "beam"), opts=o, target=target, heldout=3, num_shards=6,
                           progress=False)["up_to_date"]
    assert beam_import.import_beam(str(manifest), str(tmp_path / "local"), opts=o, target=target, heldout=3,
                                   num_shards=6)["up_to_date"]


def test_a_shard_is_written_in_chunk_order_whatever_order_groupbykey_gives(tmp_path):
    """WriteShard with its chunks handed over out of order (a cluster runner's GroupByKey guarantees none):
    the records in chunk order, by hand; a chunk delivered twice is an error, not a duplicate."""
    from array_record.python.array_record_module import ArrayRecordReader
    shard_files = {"train": ["train/a.array_record", "train/b.array_record"]}
    write = beam_import.WriteShard(str(tmp_path), shard_files)
    groups = [(7, [b"g", b"h"]), (beam_import._NO_CHUNK, []), (2, [b"c"]), (0, [b"a", b"b"]), (5, [b"e", b"f"])]
    assert list(write.process((("train", 1), groups))) == [("train/b.array_record", 7)]
    reader = ArrayRecordReader(str(tmp_path / "train/b.array_record"))
    assert reader.read_all() == [b"a", b"b", b"c", b"e", b"f", b"g", b"h"]
    reader.close()
    with pytest.raises(RuntimeError, match=r"train/a.array_record: chunks \[2\] arrived more than once"):
        list(write.process((("train", 0), [(2, [b"c"]), (0, [b"a"]), (2, [b"c"])])))


def test_workers_scan_the_files_the_driver_planned(tmp_path, monkeypatch):
    """The job holds one element per input file (not its records); each worker's scan gives the chunks at the
    driver's positions (chunks of 2 over 5 + 3 lines: starts by hand), and a file that changed after the driver
    read it stops the import instead of placing records by stale positions."""
    monkeypatch.setattr(importers, "CHUNK_RECORDS", 2)
    for name, n in (("a.jsonl", 5), ("b.jsonl", 3)):
        (tmp_path / name).write_text("".join(json.dumps({"n": i}) + "\n" for i in range(n)))
    files = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    o = importers.ImportOptions("messages")
    chunks, starts, _ = prepare.plan(files, o, 0)
    plan = beam_import.file_plan(files, [importers.file_identity(f) for f in files], chunks, starts)
    assert [(p.rsplit("/", 1)[1], first, s) for p, _, first, s in plan] == [("a.jsonl", 0, (0, 2, 4)),
                                                                            ("b.jsonl", 3, (5, 7))]
    got = [x for element in plan for x in beam_import.ScanFile(o).process(element)]
    assert [(c, start) for c, start, _ in got] == [(0, 0), (1, 2), (2, 4), (3, 5), (4, 7)]
    assert [chunk for _, _, chunk in got] == chunks
    with open(files[1], "a") as f:
        f.write(json.dumps({"n": 3}) + "\n")
    with pytest.raises(RuntimeError, match=r"b.jsonl changed during the import .* 2 -> 2 chunks\): run it again"):
        list(beam_import.ScanFile(o).process(plan[1]))


def test_runner_and_option_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^--runner='Spark'; valid: DirectRunner, PrismRunner, DataflowRunner$"):
        beam_import.pipeline_options("Spark", "", 1, str(tmp_path))
    with pytest.raises(ValueError, match=r"^--beam_options .* sets the runner: use --runner"):
        beam_import.pipeline_options("DirectRunner", "--runner=DataflowRunner", 1, str(tmp_path))
    with pytest.raises(ValueError, match=r"^--runner=DataflowRunner: its workers need this package; add "
                                         r"--setup_file=./pyproject.toml"):
        beam_import.pipeline_options("DataflowRunner", "--project=p --region=r", 1, "gs://b/x")
    with pytest.raises(ValueError, match=r"^--runner=DataflowRunner writes from its workers: --out /x must be gs://"):
        beam_import.pipeline_options("DataflowRunner", "--setup_file=./pyproject.toml", 1, "/x")
    opts = beam_import.pipeline_options("DirectRunner", "--direct_num_workers=3", 2, str(tmp_path)).get_all_options()
    assert opts["direct_num_workers"] == 3 and opts["runner"] == "DirectRunner"
    from launch import prepare_data
    base = ["--input=/nonexistent.jsonl", f"--out={tmp_path / 'x'}"]
    with pytest.raises(SystemExit):
        prepare_data.main(base + ["--engine=spark"])
    assert "ERROR: flag --engine=spark: value should be one of <local|beam>" in capsys.readouterr().err
    for extra, message in ((["--runner=DataflowRunner"], r"^--runner=DataflowRunner / --beam_options='' need "
                                                          r"--engine=beam \(valid engines: local, beam\)$"),
                           (["--engine=beam", "--shard_index=0"], r"^--shard_index=0 is for --engine=local")):
        with pytest.raises(ValueError, match=message):
            prepare_data.main(base + extra)


def test_dataflow_options_and_the_package_its_workers_install(tmp_path):
    """docs/data_formats.md's Dataflow options parse as Beam reads them, and the package Beam builds from
    --setup_file=./pyproject.toml (what each worker installs) holds this module, prepare.py, the embedded
    tokenizer and the requirements its dependencies come from."""
    import tarfile
    from apache_beam.options.pipeline_options import GoogleCloudOptions, SetupOptions, WorkerOptions
    from apache_beam.runners.portability.stager import Stager
    pytest.importorskip("build")                   # requirements-beam.txt
    docs = open(os.path.join(REPO, "docs", "data_formats.md")).read()
    quoted = docs[docs.index('--runner=DataflowRunner \\\n    --beam_options="'):].split('"')[1]
    opts = beam_import.pipeline_options("DataflowRunner", quoted.replace("\\\n", " "), 0, "gs://b/x")
    assert opts.view_as(GoogleCloudOptions).project == "PROJECT"
    assert opts.view_as(GoogleCloudOptions).temp_location == "gs://B/beam_tmp"
    assert opts.view_as(WorkerOptions).max_num_workers == 100
    assert opts.view_as(SetupOptions).setup_file == "./pyproject.toml"
    cwd = os.getcwd()
    try:
        sdist = Stager._build_setup_package(os.path.join(REPO, "pyproject.toml"), str(tmp_path))
    finally:
        os.chdir(cwd)
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert {"qwen2vl_jax/data/beam_import.py", "qwen2vl_jax/data/prepare.py", "qwen2vl_jax/assets/tokenizer.json",
            "requirements.txt", "pyproject.toml"} <= names


class _OpenWriters:
    """Counts the ShardWriters writing to a bucket that are open at once (each holds a local temporary file)."""

    def __init__(self, monkeypatch):
        self.open = self.most = 0
        init, close = prepare.ShardWriter.__init__, prepare.ShardWriter.close

        def counting_init(w, dest):
            init(w, dest)
            if paths.is_remote(dest):
                self.open += 1
                self.most = max(self.most, self.open)

        def counting_close(w):
            close(w)
            if paths.is_remote(w.dest):
                self.open -= 1
        monkeypatch.setattr(prepare.ShardWriter, "__init__", counting_init)
        monkeypatch.setattr(prepare.ShardWriter, "close", counting_close)


@pytest.mark.parametrize("engine", ["local", "beam"])
def test_writes_straight_to_a_bucket(engine, gcs_bucket, tmp_path, files, monkeypatch):
    """--out=gs://: the objects are the files a local-disk import writes (byte for byte), written with one
    shard at a time on local disk (at most one ShardWriter to the bucket open; the local engine used to open all
    num_shards at once) and nothing left in the temporary folder; OUT/.incomplete is gone."""
    bucket, _ = gcs_bucket
    monkeypatch.setattr(importers, "CHUNK_RECORDS", 2)
    (tmp_path / "photo.jpg").write_bytes(files["astronaut.jpg"])
    lines = [{"type": "caption", "images": ["photo.jpg"], "text": f"photo {i}"} for i in range(16)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    o = importers.ImportOptions("manifest")
    ref = prepare.prepare(str(tmp_path / "m.jsonl"), str(tmp_path / "ref"), opts=o, target=TARGET, heldout=1,
                          num_shards=4, progress=False)
    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    writers = _OpenWriters(monkeypatch)
    out = f"{bucket}/data/{engine}"
    if engine == "local":
        got = prepare.prepare(str(tmp_path / "m.jsonl"), out, opts=o, target=TARGET, heldout=1, num_shards=4,
                              progress=False)
    else:
        got = beam_import.import_beam(str(tmp_path / "m.jsonl"), out, opts=o, target=TARGET, heldout=1, num_shards=4)
    want = dataset_files(tmp_path / "ref")
    assert len(want) == 5 and all(want.values())
    assert dataset_files(out) == want
    assert same_summary(got, ref) and json.loads(paths.read_text(f"{out}/summary.json"))["written"] == ref["written"]
    assert sorted(paths.listdir(out)) == ["heldout", "summary.json", "summary.png", "train"]
    assert writers.most == 1 and writers.open == 0
    assert [f for f in os.listdir(spool) if f.startswith("qwen2vl_jax")] == []


@pytest.mark.slow
def test_cli_engine_beam_with_two_worker_processes(tmp_path, manifest):
    """python -m launch.prepare_data --engine=beam --workers=2 (the DirectRunner's multi_processing mode, two
    SDK worker processes): the local engine's files and report."""
    base = [sys.executable, "-m", "launch.prepare_data", f"--input={manifest}", "--model=test", "--heldout=2",
            "--num_shards=2", "--set", "data.seq_len=512", "--noprogress"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    r = subprocess.run(base + [f"--out={tmp_path / 'beam'}", "--engine=beam", "--workers=2"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on DirectRunner" in r.stderr and "wrote 6 records (train 4, heldout 2;" in r.stderr
    assert "2 workers)" in r.stderr and "  bad_schema: 3  (e.g. data.jsonl:11: " in r.stderr
    from launch import prepare_data
    assert prepare_data.main(base[3:] + [f"--out={tmp_path / 'local'}"]) == 0       # the local engine, in process
    assert dataset_files(tmp_path / "beam") == dataset_files(tmp_path / "local")
