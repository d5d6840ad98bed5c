"""qwen2vl_jax.data.media against transformers 4.57.6 Qwen2VLImageProcessor (slow, PIL) and hand counts."""

import io
import math

import numpy as np
import PIL.Image
import pytest

from media import PHOTOS, photo_bytes, write_frames, write_panning_video
from qwen2vl_jax.data import media as V

transformers = pytest.importorskip("transformers")
from transformers import Qwen2VLImageProcessor  # noqa: E402
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize  # noqa: E402


def _random_rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _reference(images, **kwargs):
    """HF slow processor. input_data_format is given because HF's channel inference takes an image of height
    1 or 3 for channels-first (shape (3, W, 3)) and fails; we always read HWC."""
    processor = Qwen2VLImageProcessor(**kwargs)
    out = processor(images=images, return_tensors="np", input_data_format="channels_last")
    return out["pixel_values"], out["image_grid_thw"]


def _assert_matches(ours, ref):
    pv, grid = ours
    ref_pv, ref_grid = ref
    assert pv.dtype == np.float32 and grid.dtype == np.int64
    np.testing.assert_array_equal(grid, ref_grid)
    assert pv.shape == ref_pv.shape
    assert np.abs(pv - ref_pv).max() <= 1e-5


# ---------------------------------------------------------------------------------------------- smart_resize


def test_smart_resize_matches_transformers_on_a_grid():
    rng = np.random.default_rng(1)
    sizes = [(1, 1), (1, 2), (13, 7), (14, 14), (27, 27), (28, 28), (42, 42), (70, 98), (500, 3), (3, 500)]
    sizes += [(int(h), int(w)) for h, w in rng.integers(1, 4000, (300, 2)) if max(h, w) / min(h, w) <= 200]
    limits = [(56 * 56, 28 * 28 * 1280), (3136, 12845056), (128 * 784, 768 * 784), (28 * 28, 28 * 28 * 4)]
    for h, w in sizes:
        for lo, hi in limits:
            assert V.smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_smart_resize_hand_values():
    # docs/qwen2vl.md §4.1 table (checkpoint limits) and the class-default example
    ckpt = dict(min_pixels=3136, max_pixels=12845056)
    assert V.smart_resize(1080, 1920, **ckpt) == (1092, 1932)
    assert V.smart_resize(480, 640, **ckpt) == (476, 644)
    assert V.smart_resize(224, 224, **ckpt) == (224, 224)
    assert V.smart_resize(30, 40, **ckpt) == (56, 84)
    assert V.smart_resize(1080, 1920) == (728, 1316)
    assert V.smart_resize(42, 42) == (56, 56)  # round(1.5) = 2 (banker's), 56*56 >= 3136: kept


@pytest.mark.parametrize("h,w", [(201, 1), (1, 201), (1, 500), (4020, 20)])
def test_aspect_ratio_over_200_raises(h, w):
    with pytest.raises(ValueError, match="aspect ratio"):
        V.smart_resize(h, w)
    with pytest.raises(V.BadMediaError) as e:
        V.preprocess_images([PIL.Image.new("RGB", (w, h))])
    assert e.value.reason == "aspect_ratio"
    with pytest.raises(ValueError):  # the reference refuses them too
        _reference([PIL.Image.new("RGB", (w, h))])


def test_qwen_vl_utils_variant_differs_only_for_thin_sides():
    assert V.smart_resize_qwen_vl_utils(10, 2000, 28, 3136, 12845056) == (28, 1988)  # initial max(28, round)
    assert V.smart_resize(10, 2000, 28, 3136, 12845056) == (28, 812)  # HF: 0 * w < min -> upscale branch
    for h, w in [(480, 640), (1080, 1920), (57, 300)]:
        limits = (28, 128 * 784, 768 * 784)
        assert V.smart_resize_qwen_vl_utils(h, w, *limits) == V.smart_resize(h, w, *limits)


# ---------------------------------------------------------------------------------------------- image parity

_SIZES = [(1, 1), (5, 9), (27, 27), (28, 28), (500, 3), (3, 500), (56, 84), (1000, 1500)]
_SIZES += [tuple(int(v) for v in np.random.default_rng(7).integers(20, 900, 2)) for _ in range(4)]


@pytest.mark.parametrize("h,w", _SIZES)
def test_images_match_reference_processor(h, w):
    img = PIL.Image.fromarray(_random_rgb(h, w, seed=h * 1000 + w))
    _assert_matches(V.preprocess_images([img]), _reference([img]))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_real_photos_match_reference_bit_exact(fmt):
    """scikit-image's photographs, decoded from JPEG/PNG bytes, at the class limits, the checkpoints' limits and
    a downscaling budget: every value equal to the reference processor's."""
    images = [V.load_image(photo_bytes(name, fmt)) for name in PHOTOS]
    for limits in ({}, dict(min_pixels=3136, max_pixels=12845056), dict(min_pixels=3136, max_pixels=256 * 28 * 28)):
        pv, grid = V.preprocess_images(images, **limits)
        ref_pv, ref_grid = _reference(images, **limits)
        np.testing.assert_array_equal(grid, ref_grid)
        np.testing.assert_array_equal(pv, ref_pv)


def test_random_sizes_batch_matches_reference():
    rng = np.random.default_rng(3)
    sizes = rng.integers(8, 700, (6, 2))
    images = [PIL.Image.fromarray(_random_rgb(int(h), int(w), seed=i)) for i, (h, w) in enumerate(sizes)]
    _assert_matches(V.preprocess_images(images), _reference(images))


def test_numpy_uint8_hwc_input_matches_pil_and_reference():
    arr = _random_rgb(123, 77, seed=5)
    ours = V.preprocess_images([arr])
    _assert_matches(ours, _reference([arr]))
    np.testing.assert_array_equal(ours[0], V.preprocess_images([PIL.Image.fromarray(arr)])[0])
    with pytest.raises(ValueError, match="uint8"):
        V.preprocess_images([arr.astype(np.float32)])
    with pytest.raises(ValueError, match="3 channels"):
        V.preprocess_images([arr[..., :2]])


@pytest.mark.parametrize(
    "min_pixels,max_pixels",
    [(3136, 12845056), (28 * 28, 28 * 28 * 4), (28 * 28 * 256, 28 * 28 * 1280), (28 * 28 * 16, 28 * 28 * 64)],
)
def test_pixel_limits_match_reference(min_pixels, max_pixels):
    images = [PIL.Image.fromarray(_random_rgb(h, w, seed=h)) for h, w in [(300, 410), (31, 45), (640, 480)]]
    ours = V.preprocess_images(images, min_pixels=min_pixels, max_pixels=max_pixels)
    _assert_matches(ours, _reference(images, min_pixels=min_pixels, max_pixels=max_pixels))
    pixels = ours[1].prod(axis=1) * 14 * 14  # resized h*w
    assert np.all((min_pixels <= pixels) & (pixels <= max_pixels))


def _mode_images():
    rng = np.random.default_rng(11)
    h, w = 45, 61
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    out = {
        "RGB": PIL.Image.fromarray(rgba[..., :3]),
        "L": PIL.Image.fromarray(rgba[..., 0]),
        "LA": PIL.Image.merge("LA", [PIL.Image.fromarray(rgba[..., 0]), PIL.Image.fromarray(rgba[..., 1])]),
        "RGBA": PIL.Image.fromarray(rgba),
        "CMYK": PIL.Image.frombytes("CMYK", (w, h), rgba.tobytes()),
        "I;16": PIL.Image.fromarray(rng.integers(0, 400, (h, w), dtype=np.uint16)),  # values > 255 saturate
        "I": PIL.Image.fromarray(rng.integers(-50, 300, (h, w), dtype=np.int32)),
        "F": PIL.Image.fromarray(rng.uniform(-20, 280, (h, w)).astype(np.float32)),
        "1": PIL.Image.fromarray(rng.random((h, w)) > 0.5),
    }
    pal = PIL.Image.fromarray(rgba[..., :3]).quantize(16)
    out["P"] = pal
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    out["P+transparency"] = pal_t
    out["PA"] = PIL.Image.fromarray(rgba).quantize(8).convert("PA")
    return out


@pytest.mark.parametrize("name", list(_mode_images()))
def test_image_modes_match_reference(name):
    img = _mode_images()[name]
    assert img.mode == name.split("+")[0]
    _assert_matches(V.preprocess_images([img]), _reference([img]))


def test_rgba_alpha_is_dropped_not_composited():
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # fully transparent red
    rgb = V.to_rgb_uint8(PIL.Image.fromarray(rgba))
    assert np.all(rgb[..., 0] == 200) and np.all(rgb[..., 1:] == 0)


# ---------------------------------------------------------------------------------------------- numerics/layout


def test_normalization_table_reproduces_reference_arithmetic():
    from transformers.image_transforms import normalize, rescale

    pixels = np.arange(256, dtype=np.uint8)[None, :, None].repeat(3, axis=2)  # [1, 256, 3]
    ref = normalize(rescale(pixels, 1 / 255), V.OPENAI_CLIP_MEAN, V.OPENAI_CLIP_STD, input_data_format="channels_last")
    assert ref.dtype == np.float32
    np.testing.assert_array_equal(V.normalization_table().T, ref[0])


def _layout_by_hand(frames_u8):
    """Independent transcription of docs/qwen2vl.md §2.1 in plain numpy (float64 rescale, float32 normalize)."""
    x = (frames_u8.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.float32(V.OPENAI_CLIP_MEAN)) / np.float32(V.OPENAI_CLIP_STD)
    frames = x.transpose(0, 3, 1, 2)  # (F, C, H, W)
    if frames.shape[0] == 1:
        frames = np.tile(frames, (2, 1, 1, 1))
    if frames.shape[0] % 2:
        frames = np.concatenate([frames, frames[-1:]], axis=0)
    f, c, h, w = frames.shape
    gt, gh, gw = f // 2, h // 14, w // 14
    y = frames.reshape(gt, 2, c, gh // 2, 2, 14, gw // 2, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return y.reshape(gt * gh * gw, c * 2 * 14 * 14), (gt, gh, gw)


def test_patch_layout_matches_hand_transcription_and_row_order():
    # 56x84 needs no resize: row r's top-left pixel is known by hand.
    yy, xx = np.mgrid[0:56, 0:84]
    arr = np.stack([yy, xx, (yy + xx) % 256], axis=-1).astype(np.uint8)
    pv, grid = V.preprocess_images([arr])
    expected, expected_grid = _layout_by_hand(arr[None])
    np.testing.assert_array_equal(pv, expected)
    assert grid.tolist() == [list(expected_grid)] == [[1, 4, 6]]
    table = V.normalization_table()
    corners = [(0, 0), (0, 14), (14, 0), (14, 14), (0, 28)]
    for row, (y0, x0) in enumerate(corners):
        # column 0 = channel 0 (holds y), frame 0, pixel (0, 0); column 196*2 = channel 1 (holds x)
        assert pv[row, 0] == table[0, y0] and pv[row, 2 * 196] == table[1, x0], row
    np.testing.assert_array_equal(pv[:, 196:392], pv[:, 0:196])  # an image is 2 identical frames


def test_video_layout_matches_hand_transcription_odd_frames():
    frames = np.random.default_rng(2).integers(0, 256, (5, 56, 28, 3), dtype=np.uint8)
    pv, grid = V.patchify_normalized(frames, V.normalization_table())
    expected, expected_grid = _layout_by_hand(frames)
    np.testing.assert_array_equal(pv, expected)
    assert grid == expected_grid == (3, 4, 2)


def test_resize_is_skipped_only_when_the_reference_resize_is_the_identity():
    arr = _random_rgb(56, 84, seed=9)
    img = PIL.Image.fromarray(arr)
    np.testing.assert_array_equal(np.asarray(img.resize((84, 56), PIL.Image.Resampling.BICUBIC)), arr)
    assert V.resize_rgb_uint8(arr, 56, 84) is arr
    np.testing.assert_array_equal(V.resize_rgb_uint8(arr, 28, 56), np.asarray(img.resize((56, 28), PIL.Image.BICUBIC)))


# ---------------------------------------------------------------------------------------------- video


@pytest.mark.parametrize(
    "total,video_fps,expected",
    [
        (300, 30.0, 20),  # 10 s at 2 fps
        (10, 30.0, 4),  # 0.67 -> min 4 frames
        (3, 30.0, 2),  # max = floor2(min(768, 3)) = 2
        (3000, 10.0, 600),
        (100000, 30.0, 768),  # capped at FPS_MAX_FRAMES
        (75, 30.0, 4),  # 5 frames -> round(2.5) = 2 (banker's) -> 4
        (105, 30.0, 8),  # 7 frames -> round(3.5) = 4 -> 8
        (37, 12.5, 6),  # 5.92 -> round(2.96) = 3 -> 6
    ],
)
def test_smart_nframes_hand_counts(total, video_fps, expected):
    assert V.smart_nframes(total, video_fps) == expected


def test_smart_nframes_too_few_frames():
    with pytest.raises(V.BadMediaError) as e:
        V.smart_nframes(1, 30.0)
    assert e.value.reason == "too_few_frames"


def test_sample_frame_indices_match_torch_linspace():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    cases = [(total, n) for total in range(1, 60) for n in range(1, total + 1)]
    cases += [(30001, 344), (170184, 94)]  # float32 ties where a float64 linspace rounds the other way
    cases += [(int(t), int(n)) for t, n in zip(rng.integers(100, 2_000_000, 400), rng.integers(2, 769, 400))]
    for total, n in cases:
        ref = torch.linspace(0, total - 1, n).round().long().numpy()
        np.testing.assert_array_equal(V.sample_frame_indices(total, n), ref, err_msg=f"{total=} {n=}")


def test_frame_max_pixels_budget():
    # 768 frames: 24576*784/768*2 = 64*784 < int(1.05*128*784) -> the floor wins
    assert V.frame_max_pixels(768) == int(128 * 784 * 1.05)
    assert V.frame_max_pixels(4) == 768 * 784  # per-frame cap
    assert V.frame_max_pixels(100) == 24576 * 784 / 100 * 2
    for n in (4, 20, 64, 200, 768):  # tokens per video stay within the total budget (or the min floor)
        h, w = V.smart_resize_qwen_vl_utils(1080, 1920, 28, V.VIDEO_MIN_PIXELS, V.frame_max_pixels(n))
        assert n // 2 * (h // 28) * (w // 28) <= max(24576, n // 2 * int(128 * 1.05))


def _video_frames(t, h, w, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return [np.roll(base, 3 * k, axis=1) for k in range(t)]


def test_video_from_frames_with_fps_matches_reference_layout():
    frames = _video_frames(37, 90, 120, seed=1)
    pv, grid = V.preprocess_video([PIL.Image.fromarray(f) for f in frames], video_fps=12.5)
    nframes = V.smart_nframes(37, 12.5)
    idx = V.sample_frame_indices(37, nframes)
    cap = V.frame_max_pixels(nframes)
    h, w = V.smart_resize_qwen_vl_utils(90, 120, 28, V.VIDEO_MIN_PIXELS, cap)
    assert grid.tolist() == [[nframes // 2, h // 14, w // 14]]
    ref = Qwen2VLImageProcessor(min_pixels=V.VIDEO_MIN_PIXELS, max_pixels=cap)(
        images=None, videos=[[PIL.Image.fromarray(frames[i]) for i in idx]], return_tensors="np"
    )
    np.testing.assert_array_equal(grid, ref["video_grid_thw"])
    assert np.abs(pv - ref["pixel_values_videos"]).max() <= 1e-5


def test_video_odd_frame_list_repeats_last_frame_like_reference():
    frames = [PIL.Image.fromarray(f) for f in _video_frames(5, 64, 64, seed=4)]
    pv, grid = V.preprocess_video(frames, min_pixels=28 * 28, max_pixels=28 * 28 * 16)
    ref = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=28 * 28 * 16)(
        images=None, videos=[frames], return_tensors="np"
    )
    assert grid.tolist() == [[3, 4, 4]]
    np.testing.assert_array_equal(grid, ref["video_grid_thw"])
    assert np.abs(pv - ref["pixel_values_videos"]).max() <= 1e-5
    last = pv.reshape(3, 16, 3, 2, 196)[2]  # third tube: frame 4 and its repeat
    np.testing.assert_array_equal(last[:, :, 0], last[:, :, 1])


def test_video_frames_of_different_sizes_raise():
    with pytest.raises(ValueError, match="one size"):
        V.preprocess_video([np.zeros((28, 28, 3), np.uint8), np.zeros((56, 28, 3), np.uint8)])


def test_video_file_decode_and_sampling(tmp_path):
    frames = _video_frames(30, 48, 64, seed=3)
    path = tmp_path / "clip.avi"
    write_frames(path, np.stack(frames), fps=10)
    decoded, fps = V.load_video(path)
    assert fps == 10.0 and decoded.shape == (30, 48, 64, 3)
    np.testing.assert_array_equal(decoded, np.stack(frames))
    pv, grid = V.preprocess_video(path)
    # 30 frames / 10 fps * 2 fps = 6 frames -> 3 tubes; 48x64 upscaled to >= 128*784 pixels
    h, w = V.smart_resize_qwen_vl_utils(48, 64, 28, 128 * 784, V.frame_max_pixels(6))
    assert (h, w) == (280, 392)
    assert grid.tolist() == [[3, h // 14, w // 14]]
    assert pv.shape == (3 * (h // 14) * (w // 14), 1176)
    pv2, grid2 = V.preprocess_video(np.stack(frames), video_fps=10.0)
    np.testing.assert_array_equal(pv, pv2)
    # truncated container: cut the file in half
    data = path.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    assert _reason(V.load_video, cut) == "truncated"  # the last frame's packet is cut mid-way


def test_real_h264_video_matches_reference_processor(tmp_path):
    """An h264 mp4 panning over a photograph, decoded here with PyAV, sampled as qwen-vl-utils does and run
    through the reference processor at the per-frame budget: bit-exact with preprocess_video(path)."""
    av = pytest.importorskip("av")
    path = write_panning_video(tmp_path / "pan.mp4", "astronaut", frames=16, fps=8, height=96, width=128)
    with av.open(path) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 16
    # 16 frames at 8 fps = 2 s -> 4 frames at 2 fps: linspace(0, 15, 4).round() = [0, 5, 10, 15]; per-frame cap
    # max(min(768*784, 24576*784/4*2), int(1.05*128*784)) = 602112; 96x128 is upscaled to >= 128*784 -> 280x392
    sampled = [decoded[i] for i in (0, 5, 10, 15)]
    ref = Qwen2VLImageProcessor(min_pixels=128 * 784, max_pixels=768 * 784)(
        images=None, videos=[sampled], return_tensors="np")
    pv, grid = V.preprocess_video(path)
    assert grid.tolist() == ref["video_grid_thw"].tolist() == [[2, 20, 28]]
    np.testing.assert_array_equal(pv, ref["pixel_values_videos"])


# ---------------------------------------------------------------------------------------------- bad media


def _encoded(fmt, h=40, w=50):
    buf = io.BytesIO()
    PIL.Image.fromarray(_random_rgb(h, w, seed=1)).save(buf, format=fmt)
    return buf.getvalue()


def _reason(fn, *args, **kwargs):
    with pytest.raises(V.BadMediaError) as e:
        fn(*args, **kwargs)
    assert isinstance(e.value, ValueError)
    return e.value.reason


def test_load_image_roundtrip_and_exif_orientation(tmp_path):
    png = _encoded("PNG")
    img = V.load_image(png)
    assert img.size == (50, 40)
    path = tmp_path / "x.png"
    path.write_bytes(png)
    np.testing.assert_array_equal(np.asarray(V.load_image(path)), np.asarray(img))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    PIL.Image.fromarray(_random_rgb(40, 50)).save(buf, format="JPEG", exif=exif)
    assert V.load_image(buf.getvalue()).size == (40, 50)
    assert V.load_image(buf.getvalue(), exif_transpose=False).size == (50, 40)


def test_bad_media_reasons(tmp_path):
    assert _reason(V.load_image, tmp_path / "nope.png") == "missing"
    assert _reason(V.load_image, b"definitely not an image") == "corrupt"
    assert _reason(V.load_image, _encoded("JPEG")[:300]) == "truncated"
    assert _reason(V.load_image, _encoded("PNG")[:200]) == "truncated"
    assert _reason(V.load_image, _encoded("PNG", 200, 300), max_pixels=200 * 299) == "too_large"
    assert _reason(V.preprocess_images, [PIL.Image.new("RGB", (0, 5))]) == "zero_size"
    assert _reason(V.preprocess_images, [np.zeros((0, 5, 3), np.uint8)]) == "zero_size"
    assert _reason(V.load_video, tmp_path / "nope.mp4") == "missing"
    (tmp_path / "text.mp4").write_bytes(b"no video here" * 100)
    assert _reason(V.load_video, tmp_path / "text.mp4") == "unreadable_video"
    assert _reason(V.preprocess_video, [np.zeros((28, 28, 3), np.uint8)], video_fps=1.0) == "too_few_frames"
    with pytest.raises(ValueError, match="unknown BadMediaError reason"):
        V.BadMediaError("weird", "x")


def test_decompression_bomb_is_refused_from_the_header():
    # A 1-bit 20000x20000 PNG is ~50 kB on disk but 400 Mpixel decoded: refused before decoding.
    buf = io.BytesIO()
    PIL.Image.new("1", (20000, 20000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 200_000
    assert _reason(V.load_image, buf.getvalue()) == "too_large"
    assert math.prod((20000, 20000)) > V.MAX_DECODE_PIXELS
