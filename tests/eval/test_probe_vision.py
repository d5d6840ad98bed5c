"""launch.probe_vision: labelled single-item scenes, the tower learning a colour head from init on the test
model, and the CLI's frozen linear probe of a saved checkpoint."""
import json

import jax
import numpy as np
import pytest

from launch import probe_vision as pv
from qwen2vl_jax.model import hf, model
from qwen2vl_jax.model.config import get_config
from qwen2vl_jax.data import synthetic

CFG = get_config("test")
PIXELS = 16 * 28 * 28


@pytest.mark.parametrize("task", pv.TASKS)
def test_labelled_scenes_have_one_item_and_its_label(task):
    index = 0
    for _ in range(6):
        sc, label, nxt = pv.labelled_scene(task, "train", index)
        assert nxt > index
        index = nxt
        if task == "word":
            assert [w.text for w in sc.words] == [synthetic.WORDS[label]]
        else:
            (colour, shape, _), = sc.groups()
            assert (colour if task == "colour" else shape) == pv.classes(task)[label]


def test_batch_layout_one_image_per_row():
    px, seg, pos, labels, _ = pv.make_batch(CFG, "shape", "heldout", 0, 4, PIXELS)
    assert px.shape == (4, 64, CFG.vision.patch_dim) and seg.shape == (4, 64) and pos.shape == (4, 64, 2)
    for r in range(4):
        n = int(seg[r].sum())
        assert n % 4 == 0 and seg[r, :n].all() and not seg[r, n:].any()    # real rows first, then padding
        assert not px[r, n:].any() and px[r, :n].any()
    assert ((0 <= labels) & (labels < len(synthetic.SHAPES))).all()


@pytest.mark.slow
def test_tower_learns_colour_from_init():
    """Colour is readable from single patches: a few dozen steps take the held-out accuracy far above the
    majority class (measured 0.72 vs 0.17; the property that separates 'the tower cannot learn' from 'the decoder does not read')."""
    params = model.init_params(CFG, jax.random.PRNGKey(0))
    curve = pv.run(CFG, params, "colour", steps=120, batch=16, lr=1e-2, max_pixels=PIXELS, eval_every=60,
                   num_heldout=64, log=lambda s: None)
    assert [r["step"] for r in curve] == [60, 120]
    assert curve[-1]["accuracy"] > max(0.5, 2 * curve[-1]["chance"]), curve


def test_cli_frozen_probe_of_checkpoint(tmp_path, capsys):
    params = model.init_params(CFG, jax.random.PRNGKey(1))
    ckpt = tmp_path / "ckpt"
    hf.save_jax_checkpoint(CFG, jax.tree.map(np.asarray, params), str(ckpt))
    out = tmp_path / "curve.json"
    curve = pv.main(["--task", "shape", "--checkpoint", str(ckpt), "--freeze", "--steps", "4", "--batch", "4",
                     "--eval_every", "2", "--num_heldout", "8", "--json", str(out)])
    text = capsys.readouterr().out
    assert "held-out acc" in text and "(frozen)" in text
    assert json.loads(out.read_text())["curve"] == curve and len(curve) == 2
    with pytest.raises(SystemExit):
        pv.main(["--task", "shape", "--freeze"])                   # --freeze needs a checkpoint
    with pytest.raises(SystemExit):
        pv.main(["--task", "texture"])
    with pytest.raises(ValueError, match="steps=0"):
        pv.run(CFG, params, "shape", steps=0, batch=4, lr=1e-3, max_pixels=PIXELS)
