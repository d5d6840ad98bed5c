"""preprocess_video options against qwen-vl-utils 0.0.8, the video reference, run as shipped.

qwen-vl-utils imports torchvision at module level, for its video decoding (io.read_video) and its video resize
only. The CPU torchvision wheel is not on this project's package mirror (PyPI's CUDA build cannot load with
CPU torch), and torchvision >= 0.24 has no read_video at all, so the module is imported with two placeholder
functions in a placeholder torchvision package, removed from sys.modules right after:
  * read_video: decodes with PyAV into uint8 [T, C, H, W] with info["video_fps"] = the stream's average rate,
    as torchvision <= 0.23 did (frames registered in memory by a test are served the same way);
  * resize: torchvision 0.28's tensor path (transforms/_functional_tensor.py resize): uint8 -> float32,
    interpolate(bicubic, align_corners=False, antialias=True), clamp(0, 255), round, uint8; same size: as is.
Everything that decides sizes and frame counts (smart_nframes, smart_resize, fetch_video, fetch_image) is
qwen-vl-utils' own code. Where its source decides a case, the line is cited (vision_process.py of 0.0.8).
"""
import enum
import importlib
import importlib.util
import sys
import types

import numpy as np
import PIL.Image
import pytest

from media import panning_frames, write_panning_video
from qwen2vl_jax.data import media as V

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from transformers import Qwen2VLImageProcessor  # noqa: E402

_FRAMES = {}   # "path" -> (uint8 [T, H, W, 3], fps) served by the placeholder read_video


def _read_video(path, start_pts=0.0, end_pts=None, pts_unit="sec", output_format="TCHW"):
    assert (start_pts, end_pts, pts_unit, output_format) == (0.0, None, "sec", "TCHW")
    if path in _FRAMES:
        frames, fps = _FRAMES[path]
    else:
        import av
        with av.open(path) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate)
            frames = np.stack([f.to_rgb().to_ndarray() for f in container.decode(stream)])
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2), torch.empty(0), {"video_fps": fps}


def _tensor_resize(video, size, interpolation, antialias=True):
    if list(video.shape[-2:]) == list(size):
        return video
    x = torch.nn.functional.interpolate(video.to(torch.float32), size=list(size), mode=interpolation.value,
                                       align_corners=False, antialias=antialias)
    return x.clamp(0, 255).round().to(video.dtype)


def _placeholder_torchvision():
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.23.0"   # the last torchvision with io.read_video
    tv.io = types.ModuleType("torchvision.io")
    tv.io.read_video = _read_video
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.InterpolationMode = enum.Enum("InterpolationMode", {"BICUBIC": "bicubic", "BILINEAR": "bilinear"})
    tv.transforms.functional = types.SimpleNamespace(resize=_tensor_resize)
    return {"torchvision": tv, "torchvision.io": tv.io, "torchvision.transforms": tv.transforms}


@pytest.fixture(scope="module")
def qvu():
    if importlib.util.find_spec("qwen_vl_utils") is None:
        pytest.skip("the video reference needs `pip install qwen-vl-utils==0.0.8` (requirements-test.txt)")
    try:
        importlib.import_module("torchvision")   # a working torchvision: use the reference unchanged
        return importlib.import_module("qwen_vl_utils.vision_process")
    except Exception:
        pass
    placeholders = _placeholder_torchvision()
    saved = {k: sys.modules.get(k) for k in placeholders}
    sys.modules.update(placeholders)
    try:
        for name in ("qwen_vl_utils", "qwen_vl_utils.vision_process"):
            sys.modules.pop(name, None)
        module = importlib.import_module("qwen_vl_utils.vision_process")
    finally:
        for name in ("qwen_vl_utils", "qwen_vl_utils.vision_process", *placeholders):
            sys.modules.pop(name, None)
        sys.modules.update({k: v for k, v in saved.items() if v is not None})
    assert module.VIDEO_MAX_PIXELS == V.VIDEO_MAX_PIXELS and module.MAX_PIXELS == V.FRAME_LIST_MAX_PIXELS
    assert module.MIN_PIXELS == V.FRAME_LIST_MIN_PIXELS and module.VIDEO_TOTAL_PIXELS == V.VIDEO_TOTAL_PIXELS
    return module


def _ref_grid(ref):
    """Grid the HF processor gives the reference's output: tensor [T, C, H, W] or a list of PIL frames."""
    t, h, w = (len(ref), ref[0].height, ref[0].width) if isinstance(ref, list) else (ref.shape[0], *ref.shape[2:])
    return [-(-t // 2), h // 14, w // 14]


def _ref_fetch_video(qvu, frames, video_fps, **opts):
    key = f"mem://{id(frames)}-{video_fps}"
    _FRAMES[key] = (frames, video_fps)
    try:
        return qvu.fetch_video({"type": "video", "video": key, **opts})
    finally:
        del _FRAMES[key]


@pytest.fixture(scope="module")
def clip():
    """105 frames of 288x352 (a CIF clip, 3.5 s at 30 fps) panning over a photograph."""
    return panning_frames("coffee", frames=105, height=288, width=352, step=1)


# ------------------------------------------------------------------------------------------ decoded videos

DECODED_CASES = [
    {},
    # the case: explicit max_pixels replaces the cap derived from total_pixels (lines 265-266)
    dict(min_pixels=3136, max_pixels=200000, total_pixels=62720),
    dict(total_pixels=62720),                       # derived cap: max(min(768*784, 62720/8*2), int(1.05*min))
    dict(min_pixels=3136, total_pixels=62720),
    dict(max_pixels=20000),                         # below VIDEO_MIN_PIXELS: the cap wins (downscale branch)
    dict(min_pixels=300000),                        # the floor int(1.05*min) lifts the derived cap
    dict(fps=4.0, max_frames=10, min_frames=3),
    dict(fps=0.5),                                  # 1.75 frames -> min_frames 4
    dict(max_frames=104, fps=30.0),                 # explicit max_frames below the count: used, floored to 104
]


@pytest.mark.parametrize("opts", DECODED_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_decoded_video_grid_matches_reference(qvu, clip, opts):
    ref = _ref_fetch_video(qvu, clip, 30.0, **opts)
    _, grid = V.preprocess_video(clip, video_fps=30.0, **opts)
    assert grid.tolist() == [_ref_grid(ref)]


def test_explicit_max_pixels_replaces_the_total_budget(clip):
    # hand count (lines 263-266): 105 frames at 30 fps -> 8 frames; cap = max_pixels = 200000;
    # smart_resize(288, 352, min 3136, max 200000): round to (280, 364) = 101920 pixels, inside -> kept
    _, grid = V.preprocess_video(clip, video_fps=30.0, min_pixels=3136, max_pixels=200000, total_pixels=62720)
    assert grid.tolist() == [[4, 20, 26]]
    # without max_pixels the total decides: 62720 / 8 * 2 = 15680 per frame; beta = sqrt(288*352/15680)
    # = 2.543 -> floor(113.3 / 28) * 28 = 112 and floor(138.4 / 28) * 28 = 112
    _, grid = V.preprocess_video(clip, video_fps=30.0, min_pixels=3136, total_pixels=62720)
    assert grid.tolist() == [[4, 8, 8]]


def test_decoded_video_pixels_follow_reference_frames(qvu, clip):
    """Same frames sampled, same size; pixels differ only by the PIL vs torchvision resize rounding."""
    opts = dict(max_pixels=60000, fps=4.0)
    ref = _ref_fetch_video(qvu, clip, 30.0, **opts)                       # float [T, C, H, W] of uint8 values
    ref_frames = [f for f in ref.permute(0, 2, 3, 1).numpy().astype(np.uint8)]
    ref_pv = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=10**8)(
        images=None, videos=[ref_frames], return_tensors="np")["pixel_values_videos"]
    pv, _ = V.preprocess_video(clip, video_fps=30.0, **opts)
    assert pv.shape == ref_pv.shape
    std = np.repeat(np.float32(V.OPENAI_CLIP_STD), 2 * 196)                # columns: (channel, frame, 14, 14)
    levels = np.rint(np.abs(pv - ref_pv) * std * 255).astype(int)
    # measured: max 8 levels, mean 0.18 (18% of values off by 1); a frame one pan step off averages ~7 levels
    assert levels.max() <= 12 and levels.mean() < 0.3


@pytest.mark.parametrize("max_frames,expect", [(None, 10), (30, "raise"), (10, 10), (11, 10)])
def test_explicit_max_frames_above_the_count_fails_like_reference(qvu, max_frames, expect):
    # 10 frames at 1 fps sampled at 2 fps ask for 20. Default max_frames is min(768, total) -> 10; an explicit
    # one is not capped at the count (line 156), so 20 > 10 fails (line 160).
    frames = panning_frames("chelsea", frames=10, height=56, width=56, step=2)
    opts = {} if max_frames is None else dict(max_frames=max_frames)
    if expect == "raise":
        with pytest.raises(ValueError, match="nframes should in interval"):
            _ref_fetch_video(qvu, frames, 1.0, **opts)
        with pytest.raises(V.BadMediaError, match=r"max_frames=30") as e:
            V.preprocess_video(frames, video_fps=1.0, **opts)
        assert e.value.reason == "too_few_frames"
    else:
        assert _ref_grid(_ref_fetch_video(qvu, frames, 1.0, **opts))[0] * 2 == expect
        assert V.preprocess_video(frames, video_fps=1.0, **opts)[1][0, 0] * 2 == expect


def test_smart_nframes_matches_reference_on_a_grid(qvu):
    rng = np.random.default_rng(0)
    for _ in range(400):
        total, video_fps = int(rng.integers(1, 3000)), float(rng.choice([1.0, 7.5, 24.0, 29.97, 60.0]))
        opts = {}
        if rng.random() < 0.5:
            opts["fps"] = float(rng.choice([0.5, 1.0, 2.0, 4.0]))
        if rng.random() < 0.3:
            opts["min_frames"] = int(rng.integers(1, 12))
        if rng.random() < 0.5:
            opts["max_frames"] = int(rng.integers(2, 800))
        try:
            expected = qvu.smart_nframes(opts, total, video_fps)
        except ValueError:
            with pytest.raises(V.BadMediaError):
                V.smart_nframes(total, video_fps, **opts)
            continue
        assert V.smart_nframes(total, video_fps, **opts) == expected, (total, video_fps, opts)


def test_video_file_matches_reference(qvu, tmp_path):
    path = write_panning_video(tmp_path / "pan.mp4", "astronaut", frames=24, fps=12, height=96, width=128)
    _, grid = V.preprocess_video(path, total_pixels=200000)
    assert grid.tolist() == [_ref_grid(qvu.fetch_video({"video": path, "total_pixels": 200000}))]
    with pytest.raises(ValueError, match="video_fps=12.0 is given with a video file"):
        V.preprocess_video(path, video_fps=12.0)


# ------------------------------------------------------------------------------------------ frame lists

def _frame_list(n, height, width):
    return [PIL.Image.fromarray(f) for f in panning_frames("astronaut", frames=n, height=height, width=width, step=3)]


FRAME_LIST_CASES = [
    (5, 96, 128, {}),                                     # image limits: 3136 floor, not VIDEO_MIN_PIXELS
    (4, 96, 128, dict(min_pixels=20000)),
    (3, 620, 1000, {}),                                   # 620000 px: above VIDEO_MAX_PIXELS, kept under 12845056
    (2, 620, 1000, dict(max_pixels=100000)),
    (1, 40, 50, {}),                                      # one frame: repeated to 2 (line 297)
]


@pytest.mark.parametrize("n,height,width,opts", FRAME_LIST_CASES)
def test_frame_list_gets_image_limits_bit_exact(qvu, n, height, width, opts):
    frames = _frame_list(n, height, width)
    ref = qvu.fetch_video({"type": "video", "video": frames, **opts})       # PIL frames, resized with PIL
    ref_out = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=10**8)(images=None, videos=[ref],
                                                                          return_tensors="np")
    pv, grid = V.preprocess_video(frames, **opts)
    np.testing.assert_array_equal(grid, ref_out["video_grid_thw"])
    np.testing.assert_array_equal(pv, ref_out["pixel_values_videos"])


def test_frame_list_grid_by_hand():
    # fetch_image limits (lines 113-114): smart_resize(96, 128, min 3136, max 12845056) = (84, 140);
    # 5 frames -> 6 (line 297) -> 3 tubes. The video limits would give (280, 392).
    assert V.preprocess_video(_frame_list(5, 96, 128))[1].tolist() == [[3, 6, 10]]


@pytest.mark.parametrize("opt", [dict(total_pixels=10**6), dict(fps=1.0), dict(max_frames=4), dict(min_frames=2)])
def test_frame_list_refuses_video_only_options(opt):
    with pytest.raises(ValueError, match=f"{next(iter(opt))}.*need a decoded video"):
        V.preprocess_video(_frame_list(2, 56, 56), **opt)
    with pytest.raises(ValueError, match="need a decoded video"):
        V.preprocess_video(np.zeros((2, 56, 56, 3), np.uint8), **opt)
