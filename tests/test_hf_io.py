"""HF <-> qwen2vl_jax weight conversion, checked against transformers 4.57.6 (Qwen2VLForConditionalGeneration)."""
import numpy as np
import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from qwen2vl_jax import hf
from qwen2vl_jax.config import get_config, to_hf_config


def _config(tied: bool):
    return get_config("test").replace(tie_word_embeddings=tied)


def _hf_model(cfg, seed=0):
    """A transformers model with every tensor random (HF init zeros biases and sets norms to 1)."""
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**to_hf_config(cfg))).eval()
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
    # Hand-written from WORKSPACE.md "Parameters".
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
    for a, b in zip(_leaves(params), _leaves(again)):
        assert np.array_equal(a, b)


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
