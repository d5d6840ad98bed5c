"""Checkpoints: bit-identical continuation, restore onto another mesh, keep-K, stage hand-off, kill -9 resume,
no NaN state saved (params or optimizer moments), damaged steps set aside with their reason, a mismatch refused."""
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from qwen2vl_jax.train import checkpoint, optim, sharding, train_step
from qwen2vl_jax.model.config import get_config
from test_train import synthetic_batch
import repo

CFG = get_config("test")
STEP = train_step.StepConfig(loss_chunk=8, optim=optim.OptimConfig(peak_lr=1e-2, warmup_steps=1, total_steps=10))
REPO = repo.ROOT


@functools.lru_cache(maxsize=None)
def _setup(mesh_cfg):
    mesh = sharding.make_mesh(mesh_cfg)
    abstract, st_sh = train_step.abstract_state(CFG, STEP, mesh)
    b_sh = sharding.batch_shardings(synthetic_batch(CFG), mesh)
    return mesh, abstract, st_sh, b_sh, train_step.make_train_step(CFG, STEP, mesh, st_sh, b_sh)


def _steps(step_fn, state, b_sh, seeds, ckpt=None):
    losses = []
    for s in seeds:
        state, m = step_fn(state, sharding.global_batch(synthetic_batch(CFG, seed=s), b_sh))
        losses.append(train_step.host_metrics(m)["loss"])
        if ckpt is not None:
            ckpt.save(state, {"next_seed": s + 1})
    return state, losses


@pytest.mark.slow
def test_continuation_is_bit_identical(tmp_path):
    mesh, abstract, st_sh, b_sh, step_fn = _setup(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=str(tmp_path / "c"), every=2, keep=5))
    state = train_step.init_state(CFG, STEP, jax.random.key(0), mesh)
    full_state, full = _steps(step_fn, state, b_sh, range(5), ckpt)
    ckpt.close()
    assert checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=str(tmp_path / "c"))).all_steps() == [2, 4]

    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=str(tmp_path / "c"), every=2))
    state, meta = ckpt.restore(abstract, step=2)
    assert meta["data_state"] == {"next_seed": 2} and meta["step"] == 2 and int(state.step) == 2
    state, rest = _steps(step_fn, state, b_sh, range(meta["data_state"]["next_seed"], 5))
    assert rest == full[2:]                      # exact float equality
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
                 jax.device_get(state.params), jax.device_get(full_state.params))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
                 jax.device_get(state.opt_state), jax.device_get(full_state.opt_state))
    ckpt.close()


@pytest.mark.slow
def test_restore_onto_a_different_mesh(tmp_path):
    mesh_a, abstract_a, _, b_sh_a, step_a = _setup(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=str(tmp_path / "c"), every=1))
    state_a, _ = _steps(step_a, train_step.init_state(CFG, STEP, jax.random.key(1), mesh_a), b_sh_a, [0], ckpt)
    ckpt.wait()
    mesh_b, abstract_b, st_sh_b, b_sh_b, step_b = _setup(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
    state_b, _ = ckpt.restore(abstract_b)
    ckpt.close()
    # values identical, layout of the new mesh
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
                 jax.device_get(state_a.params), jax.device_get(state_b.params))
    got = jax.tree.map(lambda x: x.sharding.spec, state_b.params)
    want = jax.tree.map(lambda s: s.spec, st_sh_b.params)
    assert got == want
    assert state_b.params["decoder"]["embed_tokens"]["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    _, la = _steps(step_a, state_a, b_sh_a, [1])
    _, lb = _steps(step_b, state_b, b_sh_b, [1])
    np.testing.assert_allclose(lb, la, rtol=1e-5)


def test_keep_last_k_and_stage_hand_off(tmp_path):
    mesh, abstract, st_sh, b_sh, step_fn = _setup(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=str(tmp_path / "s1"), every=1, keep=2))
    state, _ = _steps(step_fn, train_step.init_state(CFG, STEP, jax.random.key(0), mesh), b_sh, range(4), ckpt)
    ckpt.close()
    assert checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=str(tmp_path / "s1"))).all_steps() == [3, 4]
    # next stage: params only, onto a stage-3 state (different trainable parts -> different optimizer state)
    s3 = train_step.StepConfig(trainable=optim.STAGE_TRAINABLE[3], optim=STEP.optim)
    _, sh3 = train_step.abstract_state(CFG, s3, mesh)
    params = checkpoint.load_params(str(tmp_path / "s1"), abstract.params)
    st3 = train_step.place_params(params, s3, sh3)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
                 jax.device_get(st3.params), jax.device_get(state.params))
    assert int(st3.step) == 0 and set(st3.opt_state[0].mu) == {"visual", "decoder", "lm_head"}
    # a converted HF checkpoint folder (hf.save_jax_checkpoint layout) loads the same way
    from qwen2vl_jax.model import hf
    hf.save_jax_checkpoint(CFG, jax.device_get(state.params), str(tmp_path / "hf"))
    p2 = checkpoint.load_params(str(tmp_path / "hf"), abstract.params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.device_get(p2), jax.device_get(state.params))
    with pytest.raises(ValueError, match="nothing is not a folder"):
        checkpoint.load_params(str(tmp_path / "nothing"), abstract.params)


# ----------------------------------------------------------------------------------------------
# kill -9 in the middle of a run, restart: the same batches and losses as an uninterrupted run

def _cli(workdir, steps):
    return [sys.executable, "-m", "launch.pretrain", "--model=test", f"--set=workdir={workdir}",
            f"--set=steps={steps}", "--set=checkpoint.every=2", "--set=log_every=1", "--set=batch_size=2"]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "PYTHONPATH": REPO}


def _losses(workdir):
    out = {}
    with open(os.path.join(workdir, "losses.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r["loss"]   # a re-run step overwrites: the resumed run's value counts
    return out


@pytest.mark.slow
def test_kill9_then_resume_equals_uninterrupted(tmp_path):
    steps = 6
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cli(ref, steps), env=_env(), cwd=REPO, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_cli(run, steps), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckdir = run / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:   # kill once step 2 is complete on disk
        if ckdir.is_dir() and any(d.isdigit() and int(d) >= 2 for d in os.listdir(ckdir)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(run))
    assert killed_at < steps
    res = subprocess.run(_cli(run, steps), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    assert _losses(run) == _losses(ref)             # bit-identical losses for every step
    assert sorted(_losses(ref)) == list(range(1, steps + 1))


def test_restore_gives_back_every_field(tmp_path):
    """A state whose counters are distinct and non-zero (step 7, 3 skipped, 2 in a row), Adam moments from a
    real step and a data-iterator state mid-stream: each field comes back as saved, and the restored data
    state continues the stream where the saved one was."""
    from qwen2vl_jax.data import pipeline, tokenizer
    from batches import assert_batches_equal, dcfg, take

    mesh, abstract, _, b_sh, step_fn = _setup(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    state, _ = _steps(step_fn, train_step.init_state(CFG, STEP, jax.random.key(2), mesh), b_sh, [0])
    counters = {"step": 7, "skipped_steps": 3, "consecutive_skips": 2}
    state = state._replace(**{k: jax.device_put(np.int32(v), getattr(abstract, k).sharding)
                              for k, v in counters.items()})
    tok = tokenizer.load_tokenizer("embedded")
    data = pipeline.make_iterator(dcfg(), CFG, tok, batch_size=1)
    take(data, 2)
    data_state = data.get_state()
    assert data_state["pipeline"]["packer"]["buffer"]     # samples held by the packer: mid-stream
    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=str(tmp_path / "c")))
    assert ckpt.save(state, data_state, force=True)
    ckpt.close()

    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=str(tmp_path / "c")))
    got, meta = ckpt.restore(abstract)
    ckpt.close()
    for name, value in counters.items():
        field = getattr(got, name)
        assert (int(field), field.dtype, field.sharding) == (value, np.int32, getattr(abstract, name).sharding), name
        assert meta[name] == value
    for name in ("params", "opt_state"):
        want, have = jax.device_get(getattr(state, name)), jax.device_get(getattr(got, name))
        assert jax.tree.structure(have) == jax.tree.structure(want), name
        jax.tree.map(np.testing.assert_array_equal, have, want)
    assert int(got.opt_state[0].count) == 1 and np.abs(jax.device_get(got.opt_state[0].mu["lm_head"]["kernel"])).max() > 0
    assert meta["data_state"] == data_state
    resumed = pipeline.make_iterator(dcfg(), CFG, tok, batch_size=1)
    resumed.set_state(meta["data_state"])
    assert_batches_equal(take(resumed, 2), take(data, 2))
    assert resumed.stats() == data.stats()


# ----------------------------------------------------------------------------------------------
# a checkpoint worth resuming from: no NaN state is saved; a damaged step is set aside, a mismatch is not

def test_a_non_finite_update_never_reaches_a_saved_checkpoint(tmp_path):
    """Adam with eps=0 (a finite, accepted setting) divides 0 by 0 for every embedding row the batch does not
    use: loss and grad norm are finite, so the step applies the update, and the params hold NaN. The save
    refuses that state; the newest checkpoint stays the finite one before it."""
    step_cfg = train_step.StepConfig(loss_chunk=8, optim=dataclasses.replace(STEP.optim, eps=0.0))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    _, st_sh = train_step.abstract_state(CFG, step_cfg, mesh)
    b_sh = sharding.batch_shardings(synthetic_batch(CFG), mesh)
    step_fn = train_step.make_train_step(CFG, step_cfg, mesh, st_sh, b_sh)
    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=str(tmp_path / "c"), every=1))
    state = train_step.init_state(CFG, step_cfg, jax.random.key(0), mesh)
    state = state._replace(step=state.step + 4)
    assert ckpt.save(state, {}, force=True)
    state, m = step_fn(state, sharding.global_batch(synthetic_batch(CFG, seed=0), b_sh))
    assert train_step.host_metrics(m)["finite"]                      # the step saw nothing wrong
    assert np.isnan(jax.device_get(state.params["decoder"]["embed_tokens"]["embedding"])).any()
    with pytest.raises(checkpoint.NonFiniteStateError, match=r"state at step 5 holds NaN.*newest checkpoint .* is step 4"):
        ckpt.save(state, {})
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "c")) == ["4"]


@pytest.mark.parametrize("moment", ["mu", "nu"])
def test_a_non_finite_optimizer_moment_is_never_saved(tmp_path, moment):
    """Finite params, one NaN in one leaf of Adam's first (mu) or second (nu) moment: a resume from that state
    would turn the params NaN at its first update, so the save refuses it in one line and writes nothing."""
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
    state = train_step.init_state(CFG, STEP, jax.random.key(0), mesh)
    hit = []

    def poison(path, x):
        if not hit and any(getattr(k, "name", None) == moment for k in path):
            hit.append(jax.tree_util.keystr(path))
            return x.at[(0,) * x.ndim].set(np.nan)
        return x
    state = state._replace(opt_state=jax.tree_util.tree_map_with_path(poison, state.opt_state))
    assert len(hit) == 1 and f".{moment}" in hit[0]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=str(tmp_path / "c"), every=1))
    with pytest.raises(checkpoint.NonFiniteStateError, match="optimizer moments") as e:
        ckpt.save(state, {}, force=True)
    ckpt.close()
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path / "c") == []                                   # nothing written


def _damage(step_dir, kind):
    if kind == "truncated params":
        files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "params")) for f in fs]
        biggest = max(files, key=os.path.getsize)
        with open(biggest, "r+b") as f:
            f.truncate(os.path.getsize(biggest) // 2)
    elif kind == "meta missing":
        os.remove(os.path.join(step_dir, "meta", "metadata"))
    elif kind == "meta {}":
        with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
            f.write("{}")
    elif kind == "meta garbage":
        with open(os.path.join(step_dir, "meta", "metadata"), "wb") as f:
            f.write(b"\x00\x17garbage")
    elif kind == "empty folder":
        shutil.rmtree(step_dir, ignore_errors=True)
        os.makedirs(step_dir)


DAMAGE = {"truncated params": "params/opt_state: ValueError: OUT_OF_RANGE: Error reading",
          "meta missing": "meta: FileNotFoundError: File",
          "meta {}": "meta: lacks step, skipped_steps, consecutive_skips, data_state",
          "meta garbage": "meta: JSONDecodeError: Expecting value: line 1 column 1 (char 0)",
          "empty folder": "empty step folder"}


def _at_step(state, step):
    return state._replace(step=jax.device_put(np.int32(step), state.step.sharding))


def test_damaged_steps_are_set_aside_with_their_reasons(tmp_path):
    """Steps 3..7 damaged one way each (7: a new, empty folder): restoring falls back to step 2, one line per
    set-aside step, newest first; a step asked for by number raises its reason and moves nothing."""
    mesh, abstract, _, _, _ = _setup(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    directory = str(tmp_path / "c")
    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=directory, every=1, keep=10))
    state = train_step.init_state(CFG, STEP, jax.random.key(0), mesh)
    for step in range(1, 7):
        ckpt.save(_at_step(state, step), {"next_seed": step})
    ckpt.close()
    damaged = dict(sorted(zip((6, 5, 4, 3, 7), DAMAGE), reverse=True))   # step -> kind, newest first
    for step, kind in damaged.items():
        _damage(os.path.join(directory, str(step)), kind)
    lines = []
    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=directory, every=1, keep=10), log=lines.append)
    for step, kind in damaged.items():
        with pytest.raises(checkpoint.UnreadableCheckpointError, match=f"{directory}/{step}: {re.escape(DAMAGE[kind])}"):
            ckpt.restore(abstract, step=step)
    assert ckpt.all_steps() == list(range(1, 8)) and not lines
    got, meta = ckpt.restore(abstract)
    assert meta["step"] == 2 and int(got.step) == 2 and meta["data_state"] == {"next_seed": 2}
    assert len(lines) == len(damaged)
    for line, (step, kind) in zip(lines, damaged.items()):
        assert line.startswith(f"checkpoint {directory}/{step} does not restore (") and DAMAGE[kind] in line
        assert line.endswith(f"moved it to {directory}/{step}.unreadable and trying the next older step")
    assert ckpt.all_steps() == [1, 2]
    # the run saves step 3 again; a second failure of it keeps the first one's files
    assert ckpt.save(_at_step(got, 3), {"next_seed": 3})
    ckpt.wait()
    _damage(os.path.join(directory, "3"), "meta garbage")
    assert ckpt.restore(abstract)[1]["step"] == 2
    assert lines[-1].endswith(f"moved it to {directory}/3.unreadable-2 and trying the next older step")
    ckpt.close()
    assert sorted(os.listdir(directory)) == ["1", "2", "3.unreadable", "3.unreadable-2", "4.unreadable",
                                             "5.unreadable", "6.unreadable", "7.unreadable"]


def test_a_checkpoint_of_other_settings_is_refused_not_set_aside(tmp_path):
    """Not damage: a resume with another model, other trainable parts or a refused setting names the
    difference and moves nothing."""
    mesh, abstract, _, b_sh, step_fn = _setup(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    directory = str(tmp_path / "c")
    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=directory, every=1))
    _steps(step_fn, train_step.init_state(CFG, STEP, jax.random.key(0), mesh), b_sh, [0], ckpt)
    ckpt.close()
    ckpt = checkpoint.Checkpointer(checkpoint.CheckpointConfig(directory=directory))
    other = CFG.replace(intermediate_size=96)
    with pytest.raises(ValueError, match=r"1/params holds another model .*\['decoder'\]\['layers'\]\['mlp'\]"
                                         r"\['down_proj'\]\['kernel'\] \(2, 128, 64\) vs \(2, 96, 64\)"):
        ckpt.restore(train_step.abstract_state(other, STEP, mesh)[0])
    frozen_vit = train_step.StepConfig(trainable=("merger", "llm"), optim=STEP.optim)
    with pytest.raises(ValueError, match="1/opt_state holds another optimizer state"):
        ckpt.restore(train_step.abstract_state(CFG, frozen_vit, mesh)[0])

    def refuse(meta):
        raise ValueError(f"refused step {meta['step']}")
    with pytest.raises(ValueError, match="refused step 1"):
        ckpt.restore(abstract, check=refuse)
    ckpt.close()
    assert sorted(os.listdir(directory)) == ["1"]


def test_one_line_names_the_cause_not_the_wrapper():
    try:
        try:
            raise OSError("Requested byte range [0, 9) is not valid for value of size 3")
        except OSError as inner:
            raise RuntimeError("Encountered error while reading array index: " + "x" * 5000) from inner
    except RuntimeError as e:
        assert checkpoint.one_line(e) == "OSError: Requested byte range [0, 9) is not valid for value of size 3"
    try:
        try:
            raise StopIteration(0)                 # being handled, not the cause
        except StopIteration:
            raise ValueError("bad\nmeta " + "y" * 400)
    except ValueError as e:
        text = checkpoint.one_line(e)
        assert text.startswith("ValueError: bad meta yyy") and len(text) == checkpoint.MAX_REASON and "\n" not in text
