"""Fine-tuning a Hugging Face checkpoint in one command, end to end on CPU:

    python -m launch.prepare_data --format=llava --input=data.json --out=DATA --heldout=2
    python -m launch.pretrain --experiment=stage3 --set init_from=HF_DIR --data=DATA --set steps=6 --set workdir=RUN
    python -m launch.convert --jax_to_hf RUN OUT

HF_DIR is a tiny random Qwen2-VL written by transformers' save_pretrained, with a tokenizer.json and an image
processor config written by transformers too. The run takes its model config and tokenizer from HF_DIR (no
--model), and transformers loads OUT and generates greedily what we generate on a held-out prompt."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import hf_reference
import media
from experiments import registry
from launch import convert, evaluate, prepare_data
from qwen2vl_jax.data import sources, tokenizer
from qwen2vl_jax.eval import generate
from qwen2vl_jax.model import hf
from qwen2vl_jax.model.config import get_config
from qwen2vl_jax.train import checkpoint, rundir
import repo

pytestmark = pytest.mark.slow      # the journey: a training run, export and reload (subprocesses)

REPO = repo.ROOT
ANSWERS = {"astronaut": "an astronaut", "coffee": "a cup of coffee", "chelsea": "a cat"}


def _cli(module, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=900)


def _write_hf_folder(path):
    """What `model.save_pretrained(path)` and the processor's save_pretrained write for a Qwen2-VL."""
    from transformers import Qwen2TokenizerFast, Qwen2VLImageProcessor

    hf_reference.hf_model(get_config("test")).save_pretrained(str(path))
    Qwen2TokenizerFast(tokenizer_file=tokenizer.EMBEDDED_PATH, eos_token="<|im_end|>",
                       pad_token="<|endoftext|>").save_pretrained(str(path))
    Qwen2VLImageProcessor().save_pretrained(str(path))
    return path


def _llava(name, question, i):
    return {"id": f"{name}-{i}", "image": f"img/{name}.jpg",
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": ANSWERS[name]}]}


def _prepare_data(root, records, heldout):
    """`prepare_data --format=llava --input=data.json --out=DATA --heldout=N`: DATA/train and DATA/heldout."""
    (root / "data.json").write_text(json.dumps(records))
    out = root / "DATA"
    assert prepare_data.main(["--format=llava", f"--input={root / 'data.json'}", f"--out={out}",
                              f"--heldout={heldout}"]) == 0
    return out


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    hf_dir = _write_hf_folder(root / "Qwen2-VL-tiny")
    (root / "img").mkdir()
    for name in ANSWERS:
        PIL.Image.fromarray(media.photo(name)).save(root / "img" / f"{name}.jpg", quality=90)
    questions = ("What is in the picture?", "Describe the image.", "What do you see?", "Who or what is this?")
    records = [_llava(n, q, i) for i, q in enumerate(questions) for n in ANSWERS]
    data = _prepare_data(root, records, heldout=2)
    run, out = root / "RUN", root / "OUT"
    res = _cli("launch.pretrain", "--experiment=stage3", f"--set=init_from={hf_dir}", f"--data={data}",
               "--set=steps=6", f"--set=workdir={run}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"initialised params from {hf_dir}" in res.stdout and "done: trained steps 1..6 of 6" in res.stdout
    res = _cli("launch.convert", "--jax_to_hf", str(run), str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    # without torchvision, the conversion says what AutoProcessor needs
    hint = f"needs torchvision for Qwen2-VL's video processor: pip install {hf.TORCHVISION_PIN}"
    assert (hint in res.stdout) == (importlib.util.find_spec("torchvision") is None), res.stdout
    return hf_dir, data, run, out


def test_the_run_takes_model_and_tokenizer_from_the_hf_folder(journey):
    hf_dir, data, run, out = journey
    cfg = rundir.read_model_config(str(run))
    assert cfg == get_config("test")                               # the preset of that architecture, by content
    assert (run / "processor" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert json.loads((run / "data_config.json").read_text())["mixture"] == [[f"arrayrecord:{data}", 1.0]]
    # stage 3 freezes the ViT tower: OUT holds HF_DIR's tower exactly, and a trained decoder
    src = hf.SafetensorsReader([str(hf_dir / "model.safetensors")])
    got = hf.SafetensorsReader([str(out / "model.safetensors")])
    assert set(got) == set(src)
    for name in ("visual.blocks.0.attn.qkv.weight", "visual.patch_embed.proj.weight"):
        np.testing.assert_array_equal(got[name], src[name])
    for name in ("model.layers.0.mlp.up_proj.weight", "visual.merger.mlp.0.weight"):
        assert not np.array_equal(got[name], src[name]), name
    # the processor files travel with the weights
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes(), name


def test_transformers_generates_what_we_generate_on_a_heldout_prompt(journey):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    _, _, run, out = journey
    cfg = rundir.read_model_config(str(run))
    data_cfg, _ = rundir.read_data_config(str(run))
    tok = tokenizer.load_tokenizer(str(run / "processor"))
    heldout = sources.arrayrecord_source(data_cfg.mixture[0][0].split(":", 1)[1], "heldout")
    sample = sources.record_to_sample(heldout[0], tok, cfg, data_cfg.vision_options)
    answer_at = int(np.argmax(sample["loss_mask"] > 0))          # the prompt ends where supervision starts
    prompt = dict(sample, input_ids=sample["input_ids"][:answer_at])
    assert tok.decode(prompt["input_ids"][-3:]) == "<|im_start|>assistant\n"

    params = rundir.load_params(cfg, str(run))
    ours = generate.generate(cfg, params, [prompt], max_new_tokens=8)
    pb = generate.prepare_prompts(cfg, [prompt], pad_multiple=1)
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    inputs = {"input_ids": torch.from_numpy(pb.input_ids.astype(np.int64)),
              "attention_mask": torch.from_numpy(pb.attention_mask.astype(np.int64)),
              "pixel_values": torch.from_numpy(pb.pixel_values),
              "image_grid_thw": torch.from_numpy(pb.image_grid_thw.astype(np.int64))}
    with torch.no_grad():
        theirs = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, pb.length:].tolist()
        hf_logits = model(**inputs).logits[0, -1].numpy()
    assert ours.row(0, strip_eos=False) == theirs
    from qwen2vl_jax.model import kv_cache
    cache = kv_cache.init_cache(cfg, 1, pb.length)
    logits, _ = kv_cache.prefill(cfg, params, cache, pb.input_ids, pb.attention_mask, pixel_values=pb.pixel_values,
                                 image_grid_thw=pb.image_grid_thw, position_ids=pb.positions)
    np.testing.assert_allclose(np.asarray(logits[0]), hf_logits, atol=1e-4)


def test_convert_evaluate_and_load_accept_run_checkpoints_and_step(journey, tmp_path):
    """RUN and RUN/checkpoints are the newest step (6), RUN/checkpoints/5 that step."""
    _, _, run, out = journey
    for src, step in ((run / "checkpoints", 6), (run / "checkpoints" / "5", 5)):
        convert.convert(False, str(src), str(tmp_path / str(step)))
        got = hf.SafetensorsReader([str(tmp_path / str(step) / "model.safetensors")])
        params = rundir.load_params(get_config("test"), str(run / "checkpoints" / str(step)))
        want = hf.params_to_hf_state_dict(get_config("test"), params)
        for name, w in want.items():
            np.testing.assert_array_equal(got[name], w, err_msg=name)
    a, b = (hf.SafetensorsReader([str(d / "model.safetensors")]) for d in (out, tmp_path / "5"))
    assert not np.array_equal(a["model.norm.weight"], b["model.norm.weight"])
    for path in (run, run / "checkpoints", run / "checkpoints" / "5"):
        assert rundir.read_model_config(str(path)) == get_config("test")
        assert rundir.read_data_config(str(path))[1] == str(run / "data_config.json")
    out = evaluate.main(["--checkpoint", str(run / "checkpoints" / "5"), "--num", "2", "--kinds", "count",
                         "--batch_size", "1", "--max_new_tokens", "2"])
    assert out["checkpoint"].endswith("checkpoints/5") and set(out["accuracy"]) == {"count"}


def test_load_pretrained_reads_a_run_a_step_and_a_hugging_face_folder(journey):
    """q.load_pretrained takes what launch.convert takes: RUN (its newest step, 6: the params transformers'
    folder OUT holds, read by the safetensors reader), RUN/checkpoints/STEP (step 5: trained, so another decoder;
    stage 3 froze the vision tower, so HF_DIR's) and a Hugging Face folder; anything else is one line naming
    the path and the accepted forms."""
    import jax
    import qwen2vl_jax as q

    hf_dir, _, run, out = journey
    same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))  # noqa: E731
    cfg, newest = q.load_pretrained(str(run))
    assert cfg == get_config("test")
    same(newest, hf.load_pretrained(str(out))[1])
    cfg5, step5 = q.load_pretrained(str(run / "checkpoints" / "5"))
    assert cfg5 == cfg
    _, start = hf.load_pretrained(str(hf_dir))
    tower = ("patch_embed", "blocks")
    same({k: step5["visual"][k] for k in tower}, {k: start["visual"][k] for k in tower})
    assert not np.array_equal(step5["decoder"]["norm"]["scale"], newest["decoder"]["norm"]["scale"])
    cfg_hf, from_hf = q.load_pretrained(str(hf_dir), param_dtype="bfloat16")
    assert cfg_hf == get_config("test", param_dtype="bfloat16")
    assert {str(x.dtype) for x in jax.tree.leaves(from_hf)} == {"bfloat16"}
    same(from_hf, hf.load_pretrained(str(hf_dir), param_dtype="bfloat16")[1])
    for bad in (run / "processor", run / "nope"):
        with pytest.raises(ValueError) as e:
            q.load_pretrained(str(bad))
        msg = str(e.value)
        assert "\n" not in msg and str(bad) in msg and "RUN, RUN/checkpoints, RUN/checkpoints/STEP" in msg, msg
    with pytest.raises(ValueError, match="hidden_size not execution settings; valid: name, dtype, param_dtype"):
        q.load_pretrained(str(run), hidden_size=8)


def test_exported_folder_loads_with_transformers_auto_classes(journey):
    """OUT loads with AutoTokenizer and AutoImageProcessor as it is; AutoProcessor needs torchvision (Qwen2-VL's
    video processor), and README names the torchvision release built for the torch that requirements-test.txt
    pins (torch 2.N.M pairs with torchvision 0.(N+15).M)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    hf_dir, _, _, out = journey
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("a cat")["input_ids"] == AutoTokenizer.from_pretrained(str(hf_dir))("a cat")["input_ids"]
    assert type(AutoImageProcessor.from_pretrained(str(out))).__name__.startswith("Qwen2VLImageProcessor")
    torch_pin = re.search(r"^torch==2\.(\d+)\.(\d+)\s", open(os.path.join(REPO, "requirements-test.txt")).read(), re.M)
    assert hf.TORCHVISION_PIN == f"torchvision==0.{int(torch_pin[1]) + 15}.{torch_pin[2]}"
    readme = open(os.path.join(REPO, "README.md")).read()
    assert f"`pip install {hf.TORCHVISION_PIN}`" in readme and f"torch 2.{torch_pin[1]}.{torch_pin[2]}" in readme
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip(f"torchvision not installed: AutoProcessor itself not checked (pip install {hf.TORCHVISION_PIN})")
    from transformers import AutoProcessor
    assert type(AutoProcessor.from_pretrained(str(out))).__name__ == "Qwen2VLProcessor"


def test_a_model_that_disagrees_with_the_checkpoint_is_one_line(journey):
    hf_dir, _, run, _ = journey
    for path in (hf_dir, run):
        with pytest.raises(ValueError) as e:
            registry.get_experiment("stage3", "tiny", [f"init_from={path}"])
        msg = str(e.value)
        assert "\n" not in msg and "--model=tiny" in msg and "hidden_size 64 vs 256" in msg
        assert "vision.depth 2 vs 4" in msg and "num_hidden_layers 2 vs 4" in msg
    with pytest.raises(ValueError, match=r"--set model.rms_norm_eps \(checkpoint vs requested\): rms_norm_eps 1e-06 vs "
                                         r"1e-05$"):
        registry.get_experiment("stage3", None, [f"init_from={hf_dir}", "model.rms_norm_eps=1e-5"])
    # execution settings are the experiment's to choose
    exp = registry.get_experiment("stage3", "test", [f"init_from={hf_dir}", "model.remat_policy=full"])
    assert exp.model == get_config("test", remat_policy="full") and exp.tokenizer == str(hf_dir)


def test_init_from_a_checkpoint_of_another_shape_names_the_params(journey):
    """Params loaded for another model (checkpoint.load_params, under every init_from and evaluation): the
    stored shapes are compared before anything loads, and the differing params named in one line."""
    import jax
    from qwen2vl_jax.train import memory

    hf_dir, _, run, _ = journey
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            memory.abstract_params(get_config("tiny")))
    for path in (run / "checkpoints", hf_dir):
        with pytest.raises(ValueError) as e:
            checkpoint.load_params(str(path), abstract)
        assert "holds another model" in str(e.value) and "\n" not in str(e.value)
        assert "['decoder']['embed_tokens']['embedding'] (2048, 64) vs (2048, 256)" in str(e.value)


def test_data_flag_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither train/"):
        registry.get_experiment("stage3", "test", data=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no file matches"):
        registry.get_experiment("stage3", "test", data=str(tmp_path / "*.array_record"))
    with pytest.raises(ValueError, match="--data and --set data.mixture"):
        registry.get_experiment("stage3", "test", ["data.mixture=(('synthetic:chat', 1.0),)"], data=str(tmp_path))
