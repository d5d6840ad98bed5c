"""Parameter counts of the contract tree (jax.eval_shape, no allocation) against the released checkpoints
(docs/qwen2vl.md §1.3) and against transformers' model built on the meta device."""
import functools

import jax
import numpy as np
import pytest

from qwen2vl_jax.model import model as M
from qwen2vl_jax.model.config import get_config, to_hf_config

EXPECTED = {"2b": 2_208_985_600, "7b": 8_291_375_616, "72b": 73_405_560_320}
VISION_2B = 665_271_296


def _count(tree) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


@pytest.fixture(scope="module")
def shapes():
    return {name: jax.eval_shape(functools.partial(M.init_params, get_config(name)), jax.random.key(0))
            for name in EXPECTED}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_total_params(shapes, name):
    assert _count(shapes[name]) == EXPECTED[name]


def test_vision_tower_2b(shapes):
    assert _count(shapes["2b"]["visual"]) == VISION_2B
    assert "lm_head" not in shapes["2b"] and "lm_head" in shapes["7b"]


def test_logical_axes_cover_every_leaf():
    cfg = get_config("test")
    axes = M.param_logical_axes(cfg)
    params = jax.eval_shape(functools.partial(M.init_params, cfg), jax.random.key(0))
    flat_p = jax.tree_util.tree_leaves_with_path(params)
    flat_a = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple)))
    for path, leaf in flat_p:
        assert len(flat_a[path]) == len(leaf.shape), (path, flat_a[path], leaf.shape)


def test_transformers_meta_model_2b():
    torch = pytest.importorskip("torch")
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**to_hf_config(get_config("2b"))))
    assert sum(p.numel() for p in model.parameters()) == EXPECTED["2b"]        # tied weights counted once
    assert sum(p.numel() for p in model.model.visual.parameters()) == VISION_2B
