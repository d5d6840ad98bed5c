"""Synthetic data: determinism, split disjointness, ground truth checked against the rendered pixels."""
import hashlib
import time

import numpy as np
import pytest

from qwen2vl_jax.data import synthetic as S


def _digest(images) -> str:
    h = hashlib.sha256()
    for im in images:
        h.update(repr(im.size).encode())
        h.update(im.tobytes())
    return h.hexdigest()


def _painted_box(rgb: np.ndarray, colour: str, box, pad: int = 2):
    """Bounding box of the pixels of exactly `colour` within `box` grown by `pad` (found from pixels)."""
    x1, y1, x2, y2 = box
    h, w = rgb.shape[:2]
    ox, oy = max(0, x1 - pad), max(0, y1 - pad)
    region = rgb[oy:min(h, y2 + pad + 1), ox:min(w, x2 + pad + 1)]
    ys, xs = np.nonzero((region == np.array(S.COLOURS[colour], np.uint8)).all(-1))
    return (xs.min() + ox, ys.min() + oy, xs.max() + ox, ys.max() + oy)


def test_scene_is_deterministic():
    a, b = S.scene(3, 17), S.scene(3, 17)
    assert a == b and a.image.tobytes() == b.image.tobytes()
    c = S.scene(3, 18)
    assert c.image.tobytes() != a.image.tobytes()
    d = S.scene(3, 17, stream="other")
    assert d.image.tobytes() != a.image.tobytes()


def test_clip_and_arithmetic_deterministic():
    a, b = S.clip(1, 5), S.clip(1, 5)
    assert a == b and _digest(a.frames) == _digest(b.frames)
    assert S.arithmetic(1, 5) == S.arithmetic(1, 5)


def test_train_heldout_disjoint():
    train = {_digest([S.scene(0, i, "train").image]) for i in range(150)}
    held = {_digest([S.scene(0, i, "heldout").image]) for i in range(150)}
    evals = {_digest([s.image]) for s in S.heldout_scenes("caption", 150)}
    assert len(train) == 150 and len(held) == 150 and len(evals) == 150
    assert not train & held and not train & evals
    clips_train = {_digest(S.clip(0, i, "train").frames) for i in range(50)}
    clips_eval = {_digest(c.frames) for c in S.heldout_scenes("video", 50)}
    assert not clips_train & clips_eval


def test_heldout_scenes_fixed():
    a = S.heldout_scenes("count", 4)
    b = S.heldout_scenes("count", 4)
    assert a == b
    assert a[2] == S.scene(S.HELDOUT_SEED, 2, "heldout", "eval/count")
    assert isinstance(S.heldout_scenes("video", 1)[0], S.Clip)
    assert isinstance(S.heldout_scenes("text", 1)[0], S.Arithmetic)


@pytest.mark.parametrize("index", range(40))
def test_scene_ground_truth_matches_pixels(index):
    sc = S.scene(0, index)
    w, h = sc.image.size
    assert S.IMAGE_SIDE[0] * 0.99 <= min(w, h) and max(w, h) <= S.IMAGE_SIDE[1]
    assert max(w, h) <= 2.5 * min(w, h) + 1
    assert 1 <= len(sc.objects) <= S.MAX_OBJECTS and 1 <= len(sc.words) <= 2
    assert 1 <= len(sc.groups()) <= 3
    assert sum(len(g[2]) for g in sc.groups()) == len(sc.objects)
    rgb = np.asarray(sc.image)
    boxes = [o.box for o in sc.objects] + [wd.box for wd in sc.words]
    for i, a in enumerate(boxes):
        assert 0 <= a[0] <= a[2] < w and 0 <= a[1] <= a[3] < h
        for b in boxes[i + 1:]:   # nothing overlaps
            assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]
    for o in sc.objects:
        got = _painted_box(rgb, o.colour, o.box)
        assert np.abs(np.subtract(got, o.box)).max() <= 1, (o, got)
    bg = rgb[[0, 0, -1, -1], [0, -1, 0, -1]]
    bg = bg[np.argmax([(bg == c).all(-1).sum() for c in bg])].astype(int)   # the most common corner
    for wd in sc.words:   # the text ink (anti-aliased) spans the word box
        x1, y1, x2, y2 = wd.box
        ox, oy = max(0, x1 - 3), max(0, y1 - 3)
        region = rgb[oy:y2 + 4, ox:x2 + 4].astype(int)
        ys, xs = np.nonzero(np.abs(region - bg).sum(-1) > 90)
        got = (xs.min() + ox, ys.min() + oy, xs.max() + ox, ys.max() + oy)
        assert np.abs(np.subtract(got, wd.box)).max() <= 1, (wd, got)


def test_counts():
    sc = S.scene(0, 7)
    for shape in S.SHAPES:
        assert sc.count(shape=shape) == sum(o.shape == shape for o in sc.objects)
    assert sc.count() == len(sc.objects)
    assert [w.box[1] for w in sc.reading_order()] == sorted(w.box[1] for w in sc.words)


@pytest.mark.parametrize("index", range(12))
def test_clip_motion(index):
    c = S.clip(0, index)
    assert S.CLIP_FRAMES[0] <= len(c.frames) <= S.CLIP_FRAMES[1] and len(c.boxes) == len(c.frames)
    axis = 0 if c.direction in ("left", "right") else 1
    pos = np.array([b[axis] for b in c.boxes])
    other = np.array([b[1 - axis] for b in c.boxes])
    steps = np.diff(pos)
    assert (steps < 0).all() if c.direction in ("left", "up") else (steps > 0).all()
    assert (other == other[0]).all()
    for frame, box in zip(c.frames, c.boxes):
        got = _painted_box(np.asarray(frame), c.colour, box)
        assert np.abs(np.subtract(got, box)).max() <= 1


def test_shape_polygons_fill_their_square():
    # every polygon shape's box reaches the top edge of its square (the drawing anchor)
    for shape in S.SHAPES:
        pts = S.shape_polygon(shape, 10, 20, 41)
        if pts is None:
            continue
        assert min(p[1] for p in pts) == 20 and max(p[1] for p in pts) <= 60
        assert min(p[0] for p in pts) >= 10 and max(p[0] for p in pts) <= 50
    with pytest.raises(ValueError, match="pentagon"):
        S.shape_polygon("pentagon", 0, 0, 10)


def test_arithmetic_answers():
    for i in range(50):
        a = S.arithmetic(0, i)
        assert a.answer == (a.a + a.b if a.op == "plus" else a.a - a.b) and a.answer >= 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="split 'test'"):
        S.scene(0, 0, "test")
    with pytest.raises(ValueError, match="index -1"):
        S.scene(0, -1)


def test_speed():
    t = time.perf_counter()
    for i in range(100):
        S.scene(5, i)
    per_scene = (time.perf_counter() - t) / 100
    assert per_scene < 0.010, f"{per_scene * 1e3:.1f} ms per scene"
