"""qwen2vl_jax.train.paths on a local folder and on a bucket of the local Cloud Storage emulator: what is
written is read back through the emulator's HTTP API (not through the code under test), JSON-lines logs
continue across processes, and bad paths are refused."""
import json
import urllib.parse
import urllib.request

import pytest

from qwen2vl_jax.train import paths


def _object(url: str, gs_path: str) -> bytes:
    """The object's bytes straight from the emulator's JSON API."""
    bucket, name = gs_path.removeprefix("gs://").split("/", 1)
    with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media",
                                timeout=10) as r:
        return r.read()


def test_local_paths(tmp_path):
    run = tmp_path / "run"
    paths.write_json(paths.join(run, "cfg.json"), {"a": 1})        # parents created
    assert json.loads((run / "cfg.json").read_text()) == {"a": 1}
    assert [p.name for p in run.iterdir()] == ["cfg.json"]          # no temporary file left behind
    log = paths.JsonlLog(run / "losses.jsonl")
    log.append({"step": 1})
    assert (run / "losses.jsonl").read_text() == '{"step": 1}\n'     # written at once, before any flush
    log.close()
    log = paths.JsonlLog(run / "losses.jsonl")
    log.append({"step": 2})
    log.close()
    assert paths.read_jsonl(run / "losses.jsonl") == [{"step": 1}, {"step": 2}]
    assert paths.listdir(run) == ["cfg.json", "losses.jsonl"] and paths.listdir(run / "nope") == []
    assert paths.read_jsonl(run / "nope.jsonl") == []
    assert str(paths.path("~/x")).startswith("/") and not paths.is_remote(run)


def test_bucket_paths(gcs_bucket, gcs_emulator):
    bucket, _ = gcs_bucket
    url, _ = gcs_emulator
    run = paths.join(bucket, "runs", "a")
    assert paths.is_remote(run) and run == f"{bucket}/runs/a"
    paths.makedirs(run)
    paths.write_json(paths.join(run, "cfg.json"), {"a": 1})
    assert json.loads(_object(url, f"{run}/cfg.json")) == {"a": 1}
    assert paths.exists(paths.join(run, "cfg.json")) and not paths.exists(paths.join(run, "nope.json"))
    log = paths.JsonlLog(paths.join(run, "losses.jsonl"))
    log.append({"step": 1})
    log.append({"step": 2})
    log.flush()
    assert _object(url, f"{run}/losses.jsonl") == b'{"step": 1}\n{"step": 2}\n'
    log.append({"step": 3})
    log.close()
    # another process (a resumed run) continues the log: Cloud Storage has no append
    log = paths.JsonlLog(paths.join(run, "losses.jsonl"))
    log.append({"step": 4})
    log.close()
    assert paths.read_jsonl(paths.join(run, "losses.jsonl")) == [{"step": s} for s in (1, 2, 3, 4)]
    assert paths.listdir(run) == ["cfg.json", "losses.jsonl"] and paths.is_dir(run)
    assert paths.parent(paths.join(run, "cfg.json")) == run


@pytest.mark.parametrize("bad, msg", [("", "empty path"), ("s3://b/x", "only local paths and gs://")])
def test_bad_paths(bad, msg):
    with pytest.raises(ValueError, match=msg):
        paths.path(bad)


def test_bucket_data_sources_are_read_through_the_gcsfuse_mount(tmp_path, monkeypatch):
    """arrayrecord:gs://BUCKET/... reads GCS_MOUNT_ROOT/BUCKET/... (where launch.tpu mounts the bucket); an
    unmounted bucket is one error that says how to mount it."""
    from qwen2vl_jax.data import sources
    monkeypatch.setattr(sources, "GCS_MOUNT_ROOT", str(tmp_path))
    with pytest.raises(ValueError, match=f"gcsfuse mount at {tmp_path}/corpus, which does not exist .*gcsfuse -o ro "
                                         f"--implicit-dirs corpus {tmp_path}/corpus"):
        sources.arrayrecord_files("gs://corpus/caption")
    for split in ("train", "heldout"):
        (tmp_path / "corpus" / "caption" / split).mkdir(parents=True)
        (tmp_path / "corpus" / "caption" / split / "data-00000.array_record").write_bytes(b"")
    assert sources.arrayrecord_files("gs://corpus/caption", "heldout") == [
        f"{tmp_path}/corpus/caption/heldout/data-00000.array_record"]
    assert sources.arrayrecord_files("gs://corpus/caption/{split}/*.array_record") == [
        f"{tmp_path}/corpus/caption/train/data-00000.array_record"]
    assert sources.gcs_bucket("/local/x") is None and sources.mounted_path("/local/x") == "/local/x"


def test_sweep_results_table_in_a_bucket(gcs_bucket, gcs_emulator):
    """launch.sweep --results=gs://...: rows appended by rewriting the object; the CSV as a CSV reader sees it."""
    import csv
    import io

    from qwen2vl_jax.eval import scaling
    bucket, _ = gcs_bucket
    url, _ = gcs_emulator
    table = f"{bucket}/sweeps/s/results.csv"
    scaling.append_result(table, {"key": "a", "params": 1.0, "eval_loss_mean": 2.5})
    scaling.append_result(table, {"key": "b", "params": 2.0, "eval_loss_mean": 2.0})
    rows = list(csv.DictReader(io.StringIO(_object(url, table).decode())))
    assert rows == [{"key": "a", "params": "1.0", "eval_loss_mean": "2.5"},
                    {"key": "b", "params": "2.0", "eval_loss_mean": "2.0"}]
    assert [r["params"] for r in scaling.read_results(table)] == [1.0, 2.0]
