"""qwen2vl_jax.perf.aot and its CLI launch.aot: accelerator -> topology mapping, AOT compile of the real
train step for a TPU topology on this CPU machine (libtpu compile-only devices), per-device memory against
qwen2vl_jax.train.memory, and the does-not-fit exit path."""
import functools
import os
import re
import subprocess
import sys

import pytest

from qwen2vl_jax.perf import aot
import repo

REPO = repo.ROOT


@pytest.mark.parametrize("name, topo, chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-16", "v5p:2x2x2", 8), ("v5p-128", "v5p:4x4x4", 64),
    ("v5p-256", "v5p:4x4x8", 128), ("v5p-512", "v5p:4x8x8", 256), ("v5p-1024", "v5p:8x8x8", 512),
    ("v4-32", "v4:2x2x4", 16), ("v5litepod-8", "v5e:2x4", 8), ("v6e-16", "v6e:4x4", 16),
    ("v5p:2x4x4", "v5p:2x4x4", 32),
])
def test_topology_names(name, topo, chips):
    t = aot.parse_topology(name)
    assert (t.name, t.chips) == (topo, chips)


@pytest.mark.parametrize("bad, msg", [("v5p-12", "power of two"), ("v5p-7", "multiple of 2 cores"),
                                      ("v5p:2x2", "3 dimensions"), ("h100-8", "expected an accelerator")])
def test_bad_topology(bad, msg):
    with pytest.raises(ValueError, match=msg):
        aot.parse_topology(bad)


def _libtpu_or_skip():
    try:
        return aot.libtpu_path()
    except RuntimeError as e:
        pytest.skip(f"no libtpu on this machine: {e}")


TEST_EXP = ("stage2", "test", ("data.max_patches=64", "mesh.data=1", "mesh.fsdp=-1"))


@functools.lru_cache(maxsize=None)
def _compile_test_model(num_slices: int = 1):
    """The test model's stage-2 step on num_slices x v5p:2x2x1, `num_slices` x the batch (same rows per device)."""
    from experiments import registry
    name, model, overrides = TEST_EXP
    exp = registry.get_experiment(name, model, [*overrides, f"mesh.dcn={num_slices}"])
    topo = aot.parse_topology("v5p:2x2x1", num_slices)
    return exp, topo, aot.compile_train_step(exp.model, exp.step_config(), exp.mesh, topo,
                                             exp.batch_size * num_slices, exp.data.seq_len, exp.data.max_patches)


def test_compile_test_model_for_v5p_and_memory_matches_estimate():
    _libtpu_or_skip()
    from qwen2vl_jax.train import memory, sharding

    exp, topo, result = _compile_test_model()
    text = result.format()
    assert "topology v5p:2x2x1: 4 chips, 4 devices (HBM 95.0 GiB per device)" in text
    for word in ("argument", "output", "temp", "code", "total", "FLOPs per step"):
        assert word in text
    assert result.fits and 0 < result.total_bytes < 1 << 30
    assert result.alias_bytes > 0                      # the donated state is updated in place
    # argument bytes = params + AdamW state + this device's batch rows + a few scalar counters, each
    # padded to TPU tiles: for the test model's tiny shards the padding is up to ~60% (measured 1.63x)
    mesh = sharding.make_mesh(exp.mesh, aot.get_topology_devices(topo))
    est = memory.estimate(exp.model, memory.StepShape(exp.batch_size, exp.data.seq_len, exp.data.max_patches),
                          mesh, parts=exp.trainable)
    rows = exp.batch_size // mesh.size
    batch = rows * (exp.data.seq_len * (4 * 4 + 3 * 4) + exp.data.max_patches * (1176 * 4 + 4 + 2 * 4))
    state = est.params + est.optimizer
    assert state + batch <= result.argument_bytes <= 1.8 * (state + batch)
    # XLA counts FLOPs per device; the test model is so small that the per-device count is tiny
    assert 1e6 < result.flops_per_device < 1e12


def test_cli_fails_when_it_does_not_fit():
    _libtpu_or_skip()
    proc = subprocess.run(
        [sys.executable, "-m", "launch.aot", "--experiment=stage2", "--model=test", "--topology=v5e:2x2",
         "--set=batch_size=64", "--set=data.seq_len=4096"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "ERROR: does not fit" in proc.stderr and "16.0 GiB of HBM per device" in proc.stderr


@pytest.mark.slow
def test_multi_slice_compile_replicates_the_state_per_slice():
    """2 slices joined by the dcn axis: libtpu's devices carry their slice, the hybrid mesh puts slice i at dcn
    index i, and each device holds what it holds on one slice (params and optimizer state replicated across
    slices, the same rows of a batch twice as large)."""
    _libtpu_or_skip()
    from qwen2vl_jax.train import sharding

    exp, topo, two = _compile_test_model(2)
    _, _, one = _compile_test_model(1)
    assert (two.topology, two.chips, two.n_devices) == ("2 x v5p:2x2x1", 8, 8)
    assert two.hbm_per_device == one.hbm_per_device
    assert two.argument_bytes == one.argument_bytes
    mesh = sharding.make_mesh(exp.mesh, aot.get_topology_devices(topo))
    assert [{d.slice_index for d in mesh.devices[i].flat} for i in range(2)] == [{0}, {1}]
    with pytest.raises(ValueError, match="mesh.dcn=1 but the topology has 2 slice"):
        aot.compile_train_step(exp.model, exp.step_config(), sharding.MeshConfig(data=1, fsdp=-1), topo, 8, 128, 64)


# ---------------------------------------------------------------------------------------------
# the estimate's packing assumption, attention segments, microbatch search (no libtpu needed)

def test_packed_layout_useful_flops_hand_count():
    from qwen2vl_jax.model.config import get_config
    from qwen2vl_jax.train import flops
    layout = aot.PackedLayout(image_patches=3, doc_tokens=4)
    assert layout.segment_ids(10, vision=False).tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 0, 0]
    assert layout.segment_ids(7, vision=True).tolist() == [1, 1, 1, 2, 2, 2, 0]
    cfg = get_config("test")
    got = aot.useful_flops(cfg, ("merger", "llm"), batch_size=2, seq_len=10, max_patches=7, layout=layout)
    # per row: two 4-token documents, causal: 2 x (4 x 5 / 2) = 20 text pairs; two 3-patch images: 2 x 9 = 18
    # patch pairs; the remainders are padding
    assert got == flops.step_flops(cfg, tokens=2 * 10, patches=2 * 7, text_pairs=2 * 20, patch_pairs=2 * 18,
                                   trainable=("merger", "llm"))
    with pytest.raises(ValueError, match="image_patches=8 / doc_tokens=4: a row holds 7 patches and 10 tokens"):
        aot.useful_flops(cfg, ("llm",), 2, 10, 7, aot.PackedLayout(8, 4))
    with pytest.raises(ValueError, match="doc_tokens=0 must be >= 1"):
        aot.PackedLayout(3, 0)


def test_attention_segments_by_name_stack_then_by_length():
    from qwen2vl_jax.perf import roofline
    segments = aot.attention_segments(aot.PackedLayout(image_patches=4, doc_tokens=2), seq_len=6, max_patches=8)

    def call(op_name):
        return roofline.KernelCall("k", "tpu_custom_call", op_name, (), "", (), "")

    vision = segments(call("jit(step)/transpose(jvp(Qwen2VL.encode_vision))/visual/while/body/pallas_call"), 8, 8)
    assert vision[0].tolist() == vision[1].tolist() == [1, 1, 1, 1, 2, 2, 2, 2] and vision[2] is False
    text = segments(call("jit(step)/jvp(Qwen2VL.hidden)/decoder/while/body/pallas_call"), 6, 6)
    assert text[0].tolist() == [1, 1, 2, 2, 3, 3] and text[2] is True
    assert segments(call("jit(f)/pallas_call"), 8, 8)[2] is False        # the patch row's length
    assert segments(call("jit(f)/pallas_call"), 6, 6)[2] is True
    assert segments(call("jit(f)/pallas_call"), 5, 5) is None           # neither: the cost says so


def _result(gib: float) -> aot.AotResult:
    return aot.AotResult(topology="v5p:2x2x1", n_devices=4, chips=4, argument_bytes=int(gib * aot.GiB),
                         output_bytes=0, alias_bytes=0, temp_bytes=0, code_bytes=0, flops_per_device=0.0,
                         hbm_per_device=95 * aot.GiB, compile_s=0.0)


def test_microbatch_candidates_and_binary_search():
    assert aot.microbatch_candidates(16, 4) == [1, 2, 4]
    assert aot.microbatch_candidates(256, 32) == [1, 2, 4, 8]
    assert aot.microbatch_candidates(12, 8) == []
    need = {1: None, 2: 50, 4: 25, 8: 12, 16: 6}      # GiB per device; 1: the compiler runs out of memory
    tried, lines = [], []

    def compile_fn(m):
        tried.append(m)
        if need[m] is None:
            raise aot.DoesNotFitError("out of memory")
        return _result(need[m])

    m, result = aot.fit_microbatches(compile_fn, list(need), 30 * aot.GiB, lines.append)
    assert (m, result.total_bytes) == (4, 25 * aot.GiB)
    assert tried == [4, 1, 2]                          # middle first, then halves: 3 compiles for 5 counts
    assert lines == ["microbatches=4: 25.00 GiB per device, fits in 30.00 GiB",
                     "microbatches=1: more than the chip's HBM (the compiler ran out of memory) per device, "
                     "does not fit in 30.00 GiB",
                     "microbatches=2: 50.00 GiB per device, does not fit in 30.00 GiB"]
    with pytest.raises(aot.DoesNotFitError, match=r"does not fit with any microbatch count \(tried 4: 25.00 GiB; "
                                                   r"8: 12.00 GiB; 16: 6.00 GiB; limit 5.00 GiB"):
        aot.fit_microbatches(compile_fn, list(need), 5 * aot.GiB, lines.append)
    with pytest.raises(ValueError, match="no microbatch count divides the batch"):
        aot.fit_microbatches(compile_fn, [], 5 * aot.GiB)


# ---------------------------------------------------------------------------------------------
# compiles (libtpu)

@pytest.mark.slow
def test_microbatches_auto_picks_the_smallest_count_that_fits(monkeypatch):
    """The test model on 4 v5p chips, 8 rows over 4 data shards: microbatches 1 or 2. The HBM limit is set
    between the two compiled steps' memory, so 1 does not fit and 2 does."""
    _libtpu_or_skip()
    from launch import aot as cli_aot
    compiled, real = {}, aot.compile_train_step

    def once(cfg, step_cfg, *args, **kw):          # each microbatch count is compiled once in this test
        if step_cfg.microbatches not in compiled:
            compiled[step_cfg.microbatches] = real(cfg, step_cfg, *args, **kw)
        return compiled[step_cfg.microbatches]

    monkeypatch.setattr(aot, "compile_train_step", once)
    run = lambda **kw: cli_aot.run_experiment("stage2", "test", "v5p:2x2x1", ["mesh.data=-1", "batch_size=8"], **kw)  # noqa: E731
    one, two = run(microbatches=1)[2], run(microbatches=2)[2]
    assert two.total_bytes < one.total_bytes           # half the rows per microbatch: fewer live activations
    limit = (one.total_bytes + two.total_bytes) / 2
    lines = []
    exp, _, result = run(microbatches="auto", hbm_headroom=0.0, hbm_gib=limit / aot.GiB, progress=lines.append)
    assert exp.microbatches == 2 and result is two
    assert "candidates [1, 2]" in lines[0]
    assert [line.split(":")[0] for line in lines[1:]] == ["microbatches=1", "microbatches=2"]
    assert "does not fit" in lines[1] and lines[2].endswith(f"fits in {limit / aot.GiB:.2f} GiB")
    # the same limit as headroom on the chip's own HBM
    exp, _, _ = run(microbatches="auto", hbm_headroom=1 - limit / (95 * aot.GiB), progress=lines.append)
    assert exp.microbatches == 2


@pytest.mark.slow
def test_cli_estimate_last_line_and_useful_flops(tmp_path):
    """launch.aot --estimate on the test model: the useful FLOPs it prints against a hand count for its
    layout flags, the MFU of the last line against those FLOPs and its step time, and --save_hlo writes the
    program the estimate analysed."""
    _libtpu_or_skip()
    from experiments import registry
    from qwen2vl_jax.perf import roofline
    from qwen2vl_jax.train import chips, flops
    hlo = tmp_path / "step.hlo.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.aot", "--experiment=stage2", "--model=test", "--topology=v5p:2x2x1",
         "--set=mesh.data=-1", "--estimate", "--image_patches=64", "--doc_tokens=32", f"--save_hlo={hlo}",
         f"--json={tmp_path / 'rows.jsonl'}"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    m = re.fullmatch(r"estimate \(compiler view\): (\S+) s/step, MFU (0\.\d{3}) \[upper bound \(roofline\): "
                     r"(\S+) s/step, MFU (0\.\d{3}), (compute|hbm|ici)-bound\]", lines[-1])
    assert m, lines[-1]
    exp = registry.get_experiment("stage2", "test", ["mesh.data=-1"])
    B, S, P = exp.batch_size, exp.data.seq_len, exp.data.max_patches
    assert (S, P) == (128, 256)
    # every row: 128 / 32 = 4 causal documents (32 x 33 / 2 pairs each), 256 / 64 = 4 images (64^2 pairs)
    hand = flops.step_flops(exp.model, tokens=B * S, patches=B * P, text_pairs=B * 4 * 32 * 33 // 2,
                            patch_pairs=B * 4 * 64 * 64, trainable=exp.trainable).total
    useful = next(x for x in lines if x.startswith("useful FLOPs per step"))
    assert "rows of 64-patch images, 32-token documents" in useful
    total = float(re.search(r": (\S+) total", useful).group(1))
    assert total == pytest.approx(hand, rel=1e-5)
    peak = chips.get_chip("v5p").peak_bf16_flops
    view_s, bound_s = float(m.group(1)), float(m.group(3))
    assert float(m.group(2)) == pytest.approx(hand / 4 / view_s / peak, abs=1e-3)
    assert float(m.group(4)) == pytest.approx(hand / 4 / bound_s / peak, abs=1e-3)
    again = roofline.estimate(hlo.read_text(), chips.get_chip("v5p"))
    assert f"{again.step_s:.4g}" == m.group(3) and again.bound == m.group(5)
    # the compiler view is the compiler's cycles + the ops it gives none + the (xla-attention test model: no) kernels
    assert again.kernel_s == 0 and f"{again.compiler_s + again.uncosted_s:.4g}" == m.group(1)
    assert lines[1].startswith("TPU compiler flags (LIBTPU_INIT_ARGS): " + " ".join(aot.TPU_COMPILER_FLAGS))
    # --json: the same figures as the printed estimate, and benchmarks.estimates' table row from it
    from benchmarks import estimates
    rec, = estimates.read(str(tmp_path / "rows.jsonl"))
    assert rec["mesh"] == {"dcn": 1, "data": 4, "fsdp": 1, "tensor": 1, "sequence": 1} and rec["chips"] == 4
    assert f"{rec['compiler_view_s']:.4g}" == m.group(1) and f"{rec['mfu_compiler_view']:.3f}" == m.group(2)
    assert f"{rec['step_s']:.4g}" == m.group(3) and rec["bound"] == m.group(5)
    assert f"{rec['mfu']:.3f}" == m.group(4) and rec["useful_flops"] == pytest.approx(hand / 4, rel=1e-5)
    assert 0 < rec["lower_s"] < rec["compile_s"]
    assert rec["no_overlap_s"] == pytest.approx(sum(rec["terms_s"].values()))
    assert rec["fits"] and 0 < rec["memory_gib"] < 95 and rec["microbatches"] == exp.microbatches
    row = estimates.table([rec]).splitlines()[2]
    assert row.startswith(f"| test | 2 | v5p:2x2x1 (4) | data 4 | {exp.microbatches} | {exp.model.remat_policy} |")
    assert (f"| {rec['compiler_view_s']:.2f} | {rec['mfu_compiler_view']:.2f} | {rec['step_s']:.2f} | "
            f"{rec['mfu']:.2f} | {rec['bound']} | {rec['terms_s']['compute']:.1f} / ") in row
    assert row.count("|") == 16


def test_cli_rejects_a_bad_microbatch_count():
    from launch import aot as cli_aot
    assert cli_aot.main(["--model=test", "--microbatches=0", "--topology=v5p-8"]) == 1


def test_cli_rejects_a_bad_kernel_efficiency_before_compiling(capsys):
    from launch import aot as cli_aot
    assert cli_aot.main(["--model=test", "--estimate", "--kernel_efficiency=0", "--topology=v5p-8"]) == 1
    assert "kernel_efficiency=0.0; valid: 0 < fraction <= 1" in capsys.readouterr().err


def test_cli_topology_defaults_to_the_experiments(capsys):
    """A paper-size experiment names the slice its layout was sized for; test / tiny name none, so the CLI
    asks for one (exit 1, one line) instead of guessing."""
    from experiments import registry
    from launch import aot as cli_aot
    assert registry.get_experiment("stage3", "72b").topology == "v5p-512"
    assert cli_aot.main(["--model=test"]) == 1
    assert "--topology: experiment stage2 at model test names no TPU slice" in capsys.readouterr().err


def test_describe_attention_says_what_auto_runs_on_tpu():
    assert aot.describe_attention("auto", 16384, 32768) == "auto (on TPU: vision block_sparse, decoder block_sparse)"
    assert aot.describe_attention("auto", 100, 256) == "auto (on TPU: vision block_sparse, decoder xla)"
    assert aot.describe_attention("splash", 100, 256) == "splash"


# A weight-gradient matmul under FSDP on 8 chips: with windowed einsum (libtpu's default threshold, or 0)
# the partitioner splits it into per-shard matmuls; with TPU_COMPILER_FLAGS it is one gathered matmul.
FLAG_PROBE = """
import re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from qwen2vl_jax.perf import aot
mesh = Mesh(np.array(aot.get_topology_devices(aot.parse_topology("v5p:2x2x2"))), ("fsdp",))
x = jax.ShapeDtypeStruct((8 * 2048, 2048), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None)))
w = jax.ShapeDtypeStruct((2048, 8192), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
grad = jax.grad(lambda w, x: jnp.sum(jnp.square((x @ w.astype(jnp.bfloat16)).astype(jnp.float32))))
text = jax.jit(grad, out_shardings=NamedSharding(mesh, P("fsdp", None))).lower(w, x).compile().as_text()
print(len(re.findall(r" convolution\\(", text)), aot.libtpu_args_in_effect())
"""


@pytest.mark.parametrize("user, convolutions", [(None, 2), ("--xla_jf_spmd_threshold_for_windowed_einsum_mib=0", 4)])
def test_compiler_flags_reach_the_compile_only_devices(user, convolutions):
    _libtpu_or_skip()
    env = {k: v for k, v in os.environ.items() if k != "LIBTPU_INIT_ARGS"}
    env.update({"JAX_PLATFORMS": "cpu"}, **({"LIBTPU_INIT_ARGS": user} if user else {}))
    proc = subprocess.run([sys.executable, "-c", FLAG_PROBE], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    count, args = proc.stdout.strip().split(" ", 1)
    assert args == " ".join(aot.TPU_COMPILER_FLAGS + ((user,) if user else ()))   # the user's last: they win
    assert int(count) == convolutions
