"""`python -m launch.convert` both ways, checked with transformers' own loader and saver."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from launch import convert
from qwen2vl_jax.model import hf
from qwen2vl_jax.model.config import get_config, to_hf_config
import repo

ROOT = repo.ROOT


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "launch.convert", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A bf16 folder written by transformers' save_pretrained (random weights, untied head)."""
    cfg = get_config("test")
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**to_hf_config(cfg))).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("hf_src")
    model.to(torch.bfloat16).save_pretrained(str(path))
    return cfg, path, {hf.on_disk_name(k): v.float().numpy() for k, v in model.state_dict().items()}


def test_cli_hf_to_jax_to_hf(hf_dir, tmp_path):
    cfg, src, want = hf_dir
    jax_dir, out_dir = tmp_path / "jax", tmp_path / "hf"
    r = _run("--hf_to_jax", str(src), str(jax_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    # progress per tensor group, and the documented layout
    assert "hf->jax model.layers.*.self_attn.q_proj.weight (64, 64) -> decoder/layers/self_attn/q_proj/kernel " \
           "(2, 64, 4, 16)" in r.stdout
    assert sorted(os.listdir(jax_dir)) == ["model_config.json", "params"]
    ck_cfg, params = hf.load_jax_checkpoint(str(jax_dir))
    assert ck_cfg == cfg                       # named "test" by its architecture, not by the folder
    assert params["decoder"]["layers"]["mlp"]["gate_proj"]["kernel"].dtype == np.float32
    np.testing.assert_array_equal(params["lm_head"]["kernel"], want["lm_head.weight"].T)

    r = _run("--jax_to_hf", str(jax_dir), str(out_dir), "--dtype", "bfloat16", "--max_shard_size", "250KB")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "jax->hf visual/blocks/attn/qkv/kernel" in r.stdout
    assert (out_dir / "model.safetensors.index.json").exists()
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(out_dir), torch_dtype="auto")
    got = {hf.on_disk_name(k): v for k, v in model.state_dict().items()}
    assert set(got) == set(want)
    for name, w in want.items():  # bf16 -> f32 -> bf16 is exact
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name].float(), torch.from_numpy(w)), name
    assert json.loads((out_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_convert_function_keeps_param_dtype(hf_dir, tmp_path):
    cfg, src, want = hf_dir
    convert.convert(True, str(src), str(tmp_path / "jax"), param_dtype="bfloat16")
    ck_cfg, params = hf.load_jax_checkpoint(str(tmp_path / "jax"))
    assert ck_cfg.param_dtype == "bfloat16"
    assert params["decoder"]["embed_tokens"]["embedding"].dtype == hf.np_dtype("bfloat16")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert.convert(True, str(src), str(tmp_path / "jax"))
    convert.convert(True, str(src), str(tmp_path / "jax"), overwrite=True)
    assert hf.load_jax_checkpoint(str(tmp_path / "jax"))[0].param_dtype == "float32"
    # jax -> hf keeping the params' dtype (fp32 here), one file
    convert.convert(False, str(tmp_path / "jax"), str(tmp_path / "hf"))
    reader = hf.SafetensorsReader([str(tmp_path / "hf" / "model.safetensors")])
    assert set(reader) == set(want)
    for name, w in want.items():
        assert reader.dtype_of(name) == np.float32 and np.array_equal(reader[name], w), name


def test_cli_errors(hf_dir, tmp_path):
    _, src, _ = hf_dir
    r = _run(str(src), str(tmp_path / "x"))
    assert r.returncode != 0 and "exactly one of --hf_to_jax / --jax_to_hf" in r.stderr
    r = _run("--hf_to_jax", str(tmp_path / "missing"), str(tmp_path / "x"))
    assert r.returncode != 0 and "is not a folder" in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="model_type 'llava' is not 'qwen2_vl'"):
        convert.convert(True, str(bad), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="is already a Hugging Face folder"):
        convert.convert(False, str(src), str(tmp_path / "x"))
    (tmp_path / "empty").mkdir()
    r = _run("--jax_to_hf", str(tmp_path / "empty"), str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "is not a checkpoint (found []); expected a run folder RUN, RUN/checkpoints, RUN/checkpoints/STEP" in r.stderr
