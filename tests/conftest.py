"""Test setup: CPU jax with a fake 8-device mesh, fp32 matmuls, single-threaded torch; the Cloud Storage emulator's
fixtures (tests/gcs.py)."""
import os

pytest_plugins = ("gcs",)

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# requirements-test.txt installs libtpu for the AOT TPU-compile tests; with it installed, a jax that may pick
# any platform initialises libtpu on the CPU box (a TPU probe that prints warnings). The suite, and every
# subprocess it starts (they inherit this environment), runs on CPU devices only.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, shared with the subprocesses: many tests (and every CLI
# run they start) compile the same test-model train step. A fresh folder per session, removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="qwen2vl_jax_test_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:  # the reference model is only needed by parity tests
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def tpu_devices():
    """Compile-only TPU devices of a v5p:2x2x1 topology (libtpu from the test requirements; skipped without)."""
    from qwen2vl_jax.perf import aot
    try:
        aot.libtpu_path()
    except RuntimeError as e:
        pytest.skip(f"no libtpu on this machine (needed for compile-only TPU devices): {e}")
    return aot.get_topology_devices(aot.parse_topology("v5p:2x2x1"))
