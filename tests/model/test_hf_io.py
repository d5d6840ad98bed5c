"""HF <-> qwen2vl_jax weight conversion, checked against transformers 4.57.6 (Qwen2VLForConditionalGeneration)."""
import shutil

import numpy as np
import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from qwen2vl_jax.model import hf
from qwen2vl_jax.model.config import get_config, to_hf_config


def _config(tied: bool):
    return get_config("test").replace(tie_word_embeddings=tied)


def _loaded_name(cfg):
    """A loaded config is named by its architecture, never by its folder: the untied test config is the "test"
    preset's; tied, no preset has it."""
    return "custom" if cfg.tie_word_embeddings else "test"


def _hf_model(cfg, seed=0):
    """A transformers model with every tensor random (HF init zeros biases and sets norms to 1)."""
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**to_hf_config(cfg))).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def _state_dict(model) -> dict:
    """In-memory (4.57) names, as `model.state_dict()` gives them."""
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_pair(request):
    cfg = _config(request.param)
    model = _hf_model(cfg)
    return cfg, model, _state_dict(model)


# ---------------------------------------------------------------------------------------------
# params_from_hf_state_dict / params_to_hf_state_dict


def test_tree_matches_contract_shapes(hf_pair):
    cfg, _, sd = hf_pair
    params = hf.params_from_hf_state_dict(cfg, sd)
    v = cfg.vision
    E, H, hd, L = v.embed_dim, v.num_heads, v.head_dim, cfg.num_hidden_layers
    D, Hq, Hkv, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    # Hand-written from docs/architecture.md "Parameters".
    assert params["visual"]["patch_embed"]["kernel"].shape == (1176, E)
    assert params["visual"]["blocks"]["attn"]["qkv"]["kernel"].shape == (v.depth, E, 3, H, hd)
    assert params["visual"]["blocks"]["attn"]["qkv"]["bias"].shape == (v.depth, 3, H, hd)
    assert params["visual"]["blocks"]["attn"]["proj"]["kernel"].shape == (v.depth, H, hd, E)
    assert params["visual"]["merger"]["mlp_0"]["kernel"].shape == (4 * E, 4 * E)
    assert params["visual"]["merger"]["mlp_2"]["kernel"].shape == (4 * E, D)
    assert params["decoder"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (L, D, Hq, dh)
    assert params["decoder"]["layers"]["self_attn"]["k_proj"]["bias"].shape == (L, Hkv, dh)
    assert params["decoder"]["layers"]["self_attn"]["o_proj"]["kernel"].shape == (L, Hq, dh, D)
    assert params["decoder"]["layers"]["mlp"]["down_proj"]["kernel"].shape == (L, cfg.intermediate_size, D)
    assert params["decoder"]["embed_tokens"]["embedding"].shape == (cfg.vocab_size, D)
    assert ("lm_head" in params) == (not cfg.tie_word_embeddings)
    if not cfg.tie_word_embeddings:
        assert params["lm_head"]["kernel"].shape == (D, cfg.vocab_size)
    assert hf.param_shapes(cfg) == _shapes(params)
    assert all(x.dtype == np.float32 for x in _leaves(params))


def _leaves(tree):
    for v in tree.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v})
    return out


def _assert_trees_equal(a, b):
    """Same paths, dtypes and bits (key order may differ: orbax restores sorted dicts)."""
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])), k


def _shapes(tree):
    return {k: _shapes(v) if isinstance(v, dict) else tuple(v.shape) for k, v in tree.items()}


def _close(ours, ref):
    """fp32 sums of up to 1176 terms in a different order: tolerance scaled by the output magnitude."""
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def test_kernels_compute_what_torch_modules_compute(hf_pair):
    """x @ kernel (our layout) equals the torch module output: an independent check of every transpose/reshape."""
    cfg, model, sd = hf_pair
    params = hf.params_from_hf_state_dict(cfg, sd)
    v = cfg.vision
    rng = np.random.default_rng(0)
    visual, lm = model.model.visual, model.model.language_model
    with torch.no_grad():
        # patch embed: Conv3d over (C, T, h, w) patches == pixels[N, 1176] @ kernel
        pix = rng.standard_normal((6, v.patch_dim)).astype(np.float32)
        ref = visual.patch_embed(torch.from_numpy(pix)).numpy()
        _close(pix @ params["visual"]["patch_embed"]["kernel"], ref)
        # vision qkv: Linear(E, 3E) output reshaped (N, 3, H, hd)
        blk = 1
        x = rng.standard_normal((5, v.embed_dim)).astype(np.float32)
        qkv = params["visual"]["blocks"]["attn"]["qkv"]
        ours = np.einsum("ne,eshd->nshd", x, qkv["kernel"][blk]) + qkv["bias"][blk]
        ref = visual.blocks[blk].attn.qkv(torch.from_numpy(x)).reshape(5, 3, v.num_heads, v.head_dim).numpy()
        _close(ours, ref)
        # vision proj: [N, H, hd] -> E
        xh = rng.standard_normal((5, v.num_heads, v.head_dim)).astype(np.float32)
        proj = params["visual"]["blocks"]["attn"]["proj"]
        ours = np.einsum("nhd,hde->ne", xh, proj["kernel"][blk]) + proj["bias"][blk]
        ref = visual.blocks[blk].attn.proj(torch.from_numpy(xh.reshape(5, -1))).numpy()
        _close(ours, ref)
        # merger mlp.2
        m = rng.standard_normal((3, v.merger_hidden)).astype(np.float32)
        mlp2 = params["visual"]["merger"]["mlp_2"]
        _close(m @ mlp2["kernel"] + mlp2["bias"],
                                   visual.merger.mlp[2](torch.from_numpy(m)).numpy())
        # decoder q/k/o projections per head
        layer = 1
        h = rng.standard_normal((4, cfg.hidden_size)).astype(np.float32)
        attn = params["decoder"]["layers"]["self_attn"]
        for name, heads in (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads)):
            ours = np.einsum("nd,dhk->nhk", h, attn[name]["kernel"][layer]) + attn[name]["bias"][layer]
            ref = getattr(lm.layers[layer].self_attn, name)(torch.from_numpy(h)).reshape(4, heads, -1).numpy()
            _close(ours, ref)
        oh = rng.standard_normal((4, cfg.num_attention_heads, cfg.head_dim)).astype(np.float32)
        ours = np.einsum("nhk,hkd->nd", oh, attn["o_proj"]["kernel"][layer])
        ref = lm.layers[layer].self_attn.o_proj(torch.from_numpy(oh.reshape(4, -1))).numpy()
        _close(ours, ref)
        # output embedding
        head = (params["lm_head"]["kernel"] if not cfg.tie_word_embeddings
                else params["decoder"]["embed_tokens"]["embedding"].T)
        _close(h @ head, model.lm_head(torch.from_numpy(h)).numpy())


def test_round_trip_is_bit_exact_on_disk_names(hf_pair):
    cfg, model, sd = hf_pair
    params = hf.params_from_hf_state_dict(cfg, sd)
    back = hf.params_to_hf_state_dict(cfg, params)
    disk = {hf.on_disk_name(k): v for k, v in sd.items()}
    if cfg.tie_word_embeddings:  # state_dict() lists the tied head; the on-disk form has none
        assert np.array_equal(disk.pop("lm_head.weight"), disk["model.embed_tokens.weight"])
    assert list(back) == list(hf.hf_tensor_shapes(cfg))
    assert set(back) == set(disk)
    for name, w in disk.items():
        assert back[name].dtype == w.dtype and back[name].shape == w.shape, name
        assert np.array_equal(back[name].view(np.uint32), w.view(np.uint32)), name
    # on-disk names in, same params out
    again = hf.params_from_hf_state_dict(cfg, back)
    _assert_trees_equal(params, again)


def test_param_dtype_bfloat16_cast(hf_pair):
    cfg, _, sd = hf_pair
    cfg = cfg.replace(param_dtype="bfloat16")
    params = hf.params_from_hf_state_dict(cfg, sd)
    emb = params["decoder"]["embed_tokens"]["embedding"]
    assert emb.dtype == hf.np_dtype("bfloat16")
    want = torch.from_numpy(sd["model.language_model.embed_tokens.weight"]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(emb.astype(np.float32), want)
    back = hf.params_to_hf_state_dict(cfg, params, dtype="float32")
    np.testing.assert_array_equal(back["model.embed_tokens.weight"], want)


def test_unexpected_and_missing_tensors_are_listed():
    cfg = _config(False)
    sd = hf.params_to_hf_state_dict(cfg, hf.params_from_hf_state_dict(cfg, _state_dict(_hf_model(cfg))))
    bad = dict(sd)
    del bad["model.layers.1.mlp.up_proj.weight"]
    bad["model.layers.2.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.2.mlp.up_proj.weight'\].*"
                                         r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        hf.params_from_hf_state_dict(cfg, bad)
    # an untied config requires lm_head
    no_head = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"missing tensors \['lm_head.weight'\]"):
        hf.params_from_hf_state_dict(cfg, no_head)
    # a tensor under both names
    dup = dict(sd, **{"model.language_model.norm.weight": sd["model.norm.weight"]})
    with pytest.raises(ValueError, match="model.norm.weight.*twice"):
        hf.params_from_hf_state_dict(cfg, dup)


def test_shape_mismatch_names_tensor_and_shapes():
    cfg = _config(False)
    sd = hf.params_to_hf_state_dict(cfg, hf.params_from_hf_state_dict(cfg, _state_dict(_hf_model(cfg))))
    sd["visual.blocks.0.attn.qkv.weight"] = np.zeros((96, 31), np.float32)
    with pytest.raises(ValueError, match=r"'visual.blocks.0.attn.qkv.weight' has shape \(96, 31\), "
                                         r"expected \(96, 32\)"):
        hf.params_from_hf_state_dict(cfg, sd)


def test_tied_checkpoint_with_lm_head():
    cfg = _config(True)
    sd = hf.params_to_hf_state_dict(cfg, hf.params_from_hf_state_dict(cfg, _state_dict(_hf_model(cfg))))
    assert "lm_head.weight" not in sd
    ok = dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"].copy()})
    params = hf.params_from_hf_state_dict(cfg, ok)
    assert "lm_head" not in params
    bad = dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"] + 1})
    with pytest.raises(ValueError, match="ties word embeddings but 'lm_head.weight'"):
        hf.params_from_hf_state_dict(cfg, bad)


def test_params_to_hf_rejects_wrong_tree():
    cfg = _config(True)
    params = hf.params_from_hf_state_dict(cfg, _state_dict(_hf_model(cfg)))
    untied = _config(False)
    with pytest.raises(ValueError, match=r"missing leaves \['lm_head/kernel'\]"):
        hf.params_to_hf_state_dict(untied, params)
    params["decoder"]["norm"]["scale"] = np.zeros((3,), np.float32)
    with pytest.raises(ValueError, match=r"decoder/norm/scale has shape \(3,\), expected \(64,\)"):
        hf.params_to_hf_state_dict(cfg, params)


# ---------------------------------------------------------------------------------------------
# save_pretrained / load_pretrained (transformers folders)


def _disk_state_dict(cfg, sd) -> dict:
    """On-disk names, without the tied head (what a checkpoint for `cfg` holds)."""
    out = {hf.on_disk_name(k): v for k, v in sd.items()}
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight")
    return out


def _assert_hf_model_equals(model, cfg, sd, dtype=torch.float32):
    got = {hf.on_disk_name(k): v for k, v in model.state_dict().items()}
    for name, w in _disk_state_dict(cfg, sd).items():
        assert got[name].dtype == dtype, name
        assert torch.equal(got[name], torch.from_numpy(w).to(dtype)), name
    if cfg.tie_word_embeddings:
        assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])


def test_save_pretrained_loads_in_transformers(hf_pair, tmp_path):
    cfg, _, sd = hf_pair
    params = hf.params_from_hf_state_dict(cfg, sd)
    files = hf.save_pretrained(cfg, params, str(tmp_path))
    assert files == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors"]
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.tie_word_embeddings == cfg.tie_word_embeddings
    _assert_hf_model_equals(model, cfg, sd)
    # and our own loader reads it back bit-exactly
    cfg2, params2 = hf.load_pretrained(str(tmp_path))
    assert cfg2 == cfg.replace(name=_loaded_name(cfg))
    _assert_trees_equal(params, params2)
    moved = tmp_path.parent / f"{tmp_path.name}-renamed"        # a copy or a rename changes nothing
    shutil.copytree(tmp_path, moved)
    assert hf.load_pretrained(str(moved))[0] == cfg2


def test_sharded_save_with_index(tmp_path):
    cfg = _config(False)
    sd = _state_dict(_hf_model(cfg, seed=1))
    params = hf.params_from_hf_state_dict(cfg, sd)
    files = hf.save_pretrained(cfg, params, str(tmp_path), max_shard_size="300KB")
    shapes = hf.hf_tensor_shapes(cfg)
    total = 4 * sum(int(np.prod(s)) for s in shapes.values())
    largest = 4 * max(int(np.prod(s)) for s in shapes.values())
    assert len(files) >= total // 300_000 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    import json
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(shapes) and set(index["weight_map"].values()) == set(files)
    for f in files:  # every shard within the limit unless it holds a single larger tensor
        reader = hf.SafetensorsReader([str(tmp_path / f)])
        size = sum(reader[n].nbytes for n in reader)
        assert size <= 300_000 or (len(reader) == 1 and size == largest), (f, size)
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path))
    _assert_hf_model_equals(model, cfg, sd)
    _, params2 = hf.load_pretrained(str(tmp_path))
    _assert_trees_equal(params, params2)
    # a later unsharded save into the same folder leaves no stale shards or index behind
    assert hf.save_pretrained(cfg, params, str(tmp_path)) == ["model.safetensors"]
    assert not list(tmp_path.glob("model-*")) and not (tmp_path / "model.safetensors.index.json").exists()


def test_bfloat16_save_and_load(tmp_path):
    cfg = _config(True)
    sd = _state_dict(_hf_model(cfg, seed=2))
    params = hf.params_from_hf_state_dict(cfg, sd)
    hf.save_pretrained(cfg, params, str(tmp_path), dtype="bfloat16")
    import json
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # safetensors' own torch reader (independent of ours) sees bf16 with torch's rounding
    from safetensors.torch import load_file
    raw = load_file(str(tmp_path / "model.safetensors"))
    disk = _disk_state_dict(cfg, sd)
    assert set(raw) == set(disk)
    for name, w in disk.items():
        assert raw[name].dtype == torch.bfloat16 and torch.equal(raw[name], torch.from_numpy(w).bfloat16()), name
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path), torch_dtype="auto")
    _assert_hf_model_equals(model, cfg, sd, dtype=torch.bfloat16)
    # ours: bf16 params are the same bits; fp32 params are the exact upcast
    cfg16, p16 = hf.load_pretrained(str(tmp_path), param_dtype="bfloat16")
    cfg32, p32 = hf.load_pretrained(str(tmp_path))
    assert cfg16.param_dtype == "bfloat16" and cfg32.param_dtype == "float32"
    back16 = hf.params_to_hf_state_dict(cfg16, p16)
    back32 = hf.params_to_hf_state_dict(cfg32, p32)
    for name, t in raw.items():
        assert back16[name].dtype == hf.np_dtype("bfloat16")
        assert np.array_equal(back16[name].view(np.uint16), t.view(torch.int16).numpy().view(np.uint16)), name
        assert np.array_equal(back32[name], t.float().numpy()), name


@pytest.mark.parametrize("shard", [None, "200KB"], ids=["single", "sharded"])
def test_load_folder_written_by_transformers(hf_pair, shard, tmp_path):
    cfg, model, sd = hf_pair
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(tmp_path), **kw)
    assert (tmp_path / ("model.safetensors.index.json" if shard else "model.safetensors")).exists()
    cfg2, params = hf.load_pretrained(str(tmp_path), attention_impl="cudnn")
    assert cfg2 == cfg.replace(name=_loaded_name(cfg), attention_impl="cudnn")
    back = hf.params_to_hf_state_dict(cfg2, params)
    disk = _disk_state_dict(cfg, sd)
    assert set(back) == set(disk)
    for name, w in disk.items():
        assert np.array_equal(back[name], w), name


def test_bf16_folder_written_by_transformers(tmp_path):
    cfg = _config(False)
    model = _hf_model(cfg, seed=3).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path))
    _, params = hf.load_pretrained(str(tmp_path), param_dtype="bfloat16")
    back = hf.params_to_hf_state_dict(cfg.replace(param_dtype="bfloat16"), params)
    for name, t in model.state_dict().items():
        name = hf.on_disk_name(name)
        assert np.array_equal(back[name].view(np.uint16), t.view(torch.int16).numpy().view(np.uint16)), name


def test_load_pretrained_errors(tmp_path):
    import json
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.load_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        hf.load_pretrained(str(tmp_path))
    hf_cfg = to_hf_config(_config(False))
    (tmp_path / "config.json").write_text(json.dumps(dict(hf_cfg, model_type="qwen2_5_vl")))
    with pytest.raises(ValueError, match="model_type 'qwen2_5_vl' is not 'qwen2_vl'"):
        hf.load_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"neither model.safetensors nor .*pytorch_model.bin"):
        hf.load_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        hf.load_pretrained(str(tmp_path))
    # a checkpoint for a different shape: the loader names the tensor and both shapes
    other = tmp_path / "other"
    hf.save_pretrained(_config(False), hf.params_from_hf_state_dict(_config(False), _state_dict(_hf_model(
        _config(False)))), str(other))
    (other / "config.json").write_text(json.dumps(dict(hf_cfg, intermediate_size=96)))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(128, 64\), "
                                         r"expected \(96, 64\)"):
        hf.load_pretrained(str(other))


def test_parse_size():
    assert hf.parse_size("5GB") == 5 * 10**9
    assert hf.parse_size("2GiB") == 2 * 2**30
    assert hf.parse_size("300kb") == 300_000
    assert hf.parse_size(4096) == 4096
    with pytest.raises(ValueError, match="max_shard_size '5 gigs'"):
        hf.parse_size("5 gigs")


# ---------------------------------------------------------------------------------------------
# our orbax checkpoint


def test_jax_checkpoint_round_trip(tmp_path):
    import jax

    cfg = _config(True).replace(param_dtype="bfloat16", attention_impl="splash", remat_policy="full")
    params = hf.params_from_hf_state_dict(cfg, _state_dict(_hf_model(cfg, seed=4)))
    hf.save_jax_checkpoint(cfg, params, str(tmp_path / "ck"))
    cfg2, params2 = hf.load_jax_checkpoint(str(tmp_path / "ck"))
    assert cfg2 == cfg
    _assert_trees_equal(params, params2)
    assert all(isinstance(x, np.ndarray) for x in _leaves(params2))
    with pytest.raises(FileExistsError, match="overwrite"):
        hf.save_jax_checkpoint(cfg, params, str(tmp_path / "ck"))
    # jax arrays, restored onto an explicit placement
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[1])
    hf.save_jax_checkpoint(cfg, jax.tree.map(jax.numpy.asarray, params), str(tmp_path / "ck"), overwrite=True)
    _, placed = hf.load_jax_checkpoint(str(tmp_path / "ck"), jax.tree.map(lambda _: sharding, params))
    _assert_trees_equal(params, placed)
    assert all(x.sharding == sharding for x in _leaves(placed))
    _, host = hf.load_jax_checkpoint(str(tmp_path / "ck"))  # saved from jax arrays, restored to numpy
    _assert_trees_equal(params, host)
    assert all(isinstance(x, np.ndarray) for x in _leaves(host))
    with pytest.raises(FileNotFoundError, match="not a qwen2vl_jax checkpoint"):
        hf.load_jax_checkpoint(str(tmp_path))


def test_model_config_dict_round_trip():
    for name in ("test", "tiny", "2b", "72b"):
        cfg = get_config(name)
        import json
        assert hf.model_config_from_dict(json.loads(json.dumps(hf.model_config_to_dict(cfg)))) == cfg
    d = hf.model_config_to_dict(get_config("test"))
    d["vision"]["bogus"] = 1
    d["extra"] = 2
    with pytest.raises(ValueError, match="extra, vision.bogus"):
        hf.model_config_from_dict(d)


# ---------------------------------------------------------------------------------------------
# logits parity: our params -> save_pretrained -> transformers from_pretrained, same logits as our forward


def _random_params(shapes, rng, std=0.1):
    """Random numpy tree of the contract shapes: norm scales near 1, everything else N(0, std)."""
    return {k: _random_params(v, rng, std) if isinstance(v, dict)
            else ((k == "scale") + rng.normal(0, std, v)).astype(np.float32) for k, v in shapes.items()}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_pretrained_logits_match_transformers(tied, tmp_path):
    model_mod = pytest.importorskip("qwen2vl_jax.model.model")

    cfg = _config(tied)
    rng = np.random.default_rng(5)
    # random values everywhere (not our init: zero biases / unit norms would hide a mapping error, and
    # init_params compiles the whole model)
    params = _random_params(hf.param_shapes(cfg), rng)
    hf.save_pretrained(cfg, params, str(tmp_path))
    ref = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path), attn_implementation="eager").eval()

    # one image (grid 1x4x6 -> 6 merged tokens) and one video (grid 2x4x4 -> 2*4 = 8 merged tokens)
    img_grid, vid_grid = np.array([[1, 4, 6]]), np.array([[2, 4, 4]])
    pix = rng.standard_normal((24, cfg.vision.patch_dim)).astype(np.float32)
    vid = rng.standard_normal((32, cfg.vision.patch_dim)).astype(np.float32)
    text = lambda n: list(rng.integers(0, 2000, n))  # noqa: E731
    vs, ve = cfg.vision_start_token_id, cfg.vision_end_token_id
    ids = (text(3) + [vs] + [cfg.image_token_id] * 6 + [ve] + text(4) + [vs] + [cfg.video_token_id] * 8
           + [ve] + text(5))
    input_ids = np.array([ids], np.int32)
    mask = np.ones_like(input_ids)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(input_ids).long(), attention_mask=torch.from_numpy(mask).long(),
                   pixel_values=torch.from_numpy(pix), image_grid_thw=torch.from_numpy(img_grid),
                   pixel_values_videos=torch.from_numpy(vid), video_grid_thw=torch.from_numpy(vid_grid)).logits
    got = model_mod.forward(cfg, params, input_ids, attention_mask=mask, pixel_values=pix, image_grid_thw=img_grid,
                            pixel_values_videos=vid, video_grid_thw=vid_grid)
    got = np.asarray(got)
    assert got.shape == tuple(want.shape) == (1, len(ids), cfg.vocab_size)
    diff = np.abs(got - want.numpy()).max()
    assert diff <= 1e-4, f"max |logits diff| {diff:.3g} (logit scale {np.abs(want.numpy()).max():.3g})"


def test_torch_state_dict_and_sharded_jax_params(tmp_path):
    """model.state_dict() goes in directly (bf16 too); mesh-sharded jax params save like numpy ones."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    cfg = _config(False).replace(param_dtype="bfloat16")
    model = _hf_model(cfg, seed=6).to(torch.bfloat16)
    params = hf.params_from_hf_state_dict(cfg, model.state_dict())
    np_dir, jax_dir = tmp_path / "np", tmp_path / "jax"
    hf.save_pretrained(cfg, params, str(np_dir))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))

    def place(x):  # shard the last axis over 4 devices where it divides, replicate otherwise
        spec = PartitionSpec(*([None] * (x.ndim - 1)), "b") if x.shape[-1] % 4 == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    sharded = jax.tree.map(place, params)
    hf.save_pretrained(cfg, sharded, str(jax_dir))
    assert (np_dir / "model.safetensors").read_bytes() == (jax_dir / "model.safetensors").read_bytes()
    _, back = hf.load_pretrained(str(jax_dir), param_dtype="bfloat16")
    _assert_trees_equal(params, back)
    disk = hf.params_to_hf_state_dict(cfg, back)
    for name, t in model.state_dict().items():
        w = disk[hf.on_disk_name(name)]
        assert np.array_equal(w.view(np.uint16), t.view(torch.int16).numpy().view(np.uint16)), name


def test_outputs_never_alias_inputs(hf_pair):
    cfg, _, sd = hf_pair
    params = hf.params_from_hf_state_dict(cfg, sd)
    emb = params["decoder"]["embed_tokens"]["embedding"]
    assert not np.shares_memory(emb, sd["model.language_model.embed_tokens.weight"])
    back = hf.params_to_hf_state_dict(cfg, params)
    assert not np.shares_memory(back["model.embed_tokens.weight"], emb)
    assert not np.shares_memory(back["model.norm.weight"], params["decoder"]["norm"]["scale"])


def test_real_model_sizes_match_published_checkpoints():
    """Counts for the presets against the released checkpoints (their index.json files):
    the 2B index.json total_size is 4,417,971,200 bytes of bf16, i.e. 2,208,985,600 parameters."""
    published = {"2b": 2_208_985_600, "7b": 8_291_375_616, "72b": 73_405_560_320}
    for name, count in published.items():
        cfg = get_config(name)
        shapes = hf.hf_tensor_shapes(cfg)
        assert sum(int(np.prod(s)) for s in shapes.values()) == count, name
        assert sum(int(np.prod(s)) for s in _leaves(hf.param_shapes(cfg))) == count, name
        assert ("lm_head.weight" in shapes) == (name != "2b")
        assert shapes["visual.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    cfg = get_config("2b")
    # 28 decoder layers x 12 tensors + embed + norm; 32 vision blocks x 12 + patch embed + 6 merger
    assert len(hf.hf_tensor_shapes(cfg)) == 28 * 12 + 2 + 32 * 12 + 1 + 6
