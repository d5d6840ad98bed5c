"""Run directories and datasets in a Cloud Storage bucket (the local emulator, tests/gcs.py): prepare_data
uploads a dataset to gs://."""
import json
import os
import subprocess
import sys
import urllib.request

from PIL import Image

from qwen2vl_jax.train import paths
import repo

REPO = repo.ROOT


def _env(variables, devices=2):
    return {**os.environ, **variables, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _objects(url: str, bucket: str, prefix: str) -> list[str]:
    """Object names under `prefix`, listed by the emulator's JSON API (not through the code under test)."""
    with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}/o?prefix={prefix}", timeout=10) as r:
        return sorted(o["name"] for o in json.load(r).get("items", []))


def test_prepare_data_uploads_a_dataset_to_a_bucket(tmp_path, gcs_bucket, gcs_emulator):
    bucket, variables = gcs_bucket
    url, _ = gcs_emulator
    Image.new("RGB", (56, 56), (200, 0, 0)).save(tmp_path / "a.png")
    lines = [{"type": "caption", "images": ["a.png"], "text": f"a red square {i}"} for i in range(3)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = f"{bucket}/data/caption"
    r = subprocess.run([sys.executable, "-m", "launch.prepare_data", f"--input={tmp_path / 'data.jsonl'}",
                        f"--out={out}", "--model=test", "--heldout=1", "--workers=1", "--noprogress"],
                       cwd=REPO, env={**_env(variables), "TMPDIR": str(tmp_path)}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # each shard written to a local temporary file and uploaded (no staging folder, nothing left in TMPDIR)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("qwen2vl_jax")]
    local = ["heldout/data-00000-of-00001.array_record", "summary.json", "summary.png",
             "train/data-00000-of-00001.array_record"]
    name = out.removeprefix(f"{bucket}/")
    assert _objects(url, bucket.removeprefix("gs://"), name) == [f"{name}/{f}" for f in local]
    assert json.loads(paths.read_text(f"{out}/summary.json"))["written"] == {"train": 2, "heldout": 1}
