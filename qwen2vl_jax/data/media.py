"""Image and video preprocessing: media -> (pixel_values [N, 1176] float32, grid_thw [k, 3] int64).

Images reproduce transformers 4.57.6 ``Qwen2VLImageProcessor`` (the slow PIL/numpy one, ``use_fast=False``)
to <= 1e-5 (in practice bit-exact), with the same defaults:

    PIL .convert("RGB")            (alpha dropped, 16-bit/float modes saturate: exactly what HF convert_to_rgb does)
    smart_resize -> (h, w)         (multiples of 28, min_pixels <= h*w <= max_pixels, banker's rounding)
    PIL resize((w, h), BICUBIC)    on uint8; skipped when the size already matches (PIL returns a copy then)
    uint8 -> float32 via a [3, 256] lookup table that holds, per channel and value v,
        float32(float64(v) * (1/255)), then (x - float32(mean)) / float32(std) in float32
        -- the reference's rescale -> normalize arithmetic, bit for bit, without float64 arrays
    patchify (docs/qwen2vl.md §2.1): an image is 2 identical frames; rows are
        (t, block_row, block_col, 2x2 position in block), columns (channel, frame, 14 rows, 14 cols).

Speed: PIL images are resized as PIL images (no numpy round trip); the patchify moves whole 14-pixel runs
(42 bytes) of uint8 instead of single floats, the table lookup replaces the float64 rescale and two float32
passes, and an image's second frame is a broadcast copy. PIL's bicubic must stay for bit-exact pixels, so it
is most of our time and bounds the gain over the reference (benchmarks/data_pipeline.py prints both the gain
and that bound). Tried and slower: resizing 3 'L' planes (Pillow pays its per-pixel loop overhead per band),
numpy re-implementations of Pillow's fixed-point passes (slower than Pillow's C), planar uint8 layouts feeding
a 2-pixel [65536] table (the de-interleave costs what the halved lookups save), lookups into float32 HWC
followed by a float move, and Pillow's block cache (no page faults left to save).

Videos follow qwen-vl-utils 0.0.8 ``fetch_video`` (frame count from fps, uniform sampling, a per-frame pixel
budget from a total budget unless max_pixels is given; a list of frame images gets the image limits) and are
then patchified like the HF processor with the last frame repeated to an even count. One deliberate
difference: frames of a decoded video are resized with PIL bicubic on uint8 (as HF's slow processor resizes
images), while qwen-vl-utils resizes them with torchvision ``resize(BICUBIC, antialias=True)``, which for uint8
runs a float32 antialiased bicubic (the same a=-0.5 kernel and support scaling as PIL) and rounds once at the
end. PIL rounds to uint8 after its horizontal pass (clipping any overshoot), so a fraction of values differ,
mostly by 1 level, and by more where the bicubic overshoots at sharp edges and on noise. Frame sampling and
grids are identical, and frames given as a list of images are resized with PIL there too (bit-exact).

Bad media raise :class:`BadMediaError` (a ValueError) with a ``reason`` so a pipeline can skip and count.
"""

from __future__ import annotations

import functools
import io
import math
import os
import warnings
from typing import Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageOps

from qwen2vl_jax.model import pixels

# ----------------------------------------------------------------------------------------------------------
# Constants (HF Qwen2VLImageProcessor / qwen-vl-utils 0.0.8)

OPENAI_CLIP_MEAN = pixels.IMAGE_MEAN      # the model normalises packed uint8 pixels with the same values
OPENAI_CLIP_STD = pixels.IMAGE_STD
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: a side of one LLM token in pixels
MAX_RATIO = 200

IMAGE_MIN_PIXELS = 56 * 56  # HF class defaults (the checkpoints' preprocessor_config uses 3136 / 12845056)
IMAGE_MAX_PIXELS = 28 * 28 * 1280

VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 24576 * 28 * 28
VIDEO_FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
# qwen-vl-utils' image limits (its MIN_PIXELS / MAX_PIXELS, also the released checkpoints' preprocessor_config
# values): a video given as a list of frame images gets these, not the video limits above.
FRAME_LIST_MIN_PIXELS = 4 * 28 * 28
FRAME_LIST_MAX_PIXELS = 16384 * 28 * 28

# Decoded-size caps against decompression bombs. Images: PIL's own warning threshold (Image.MAX_IMAGE_PIXELS
# default). Videos: total decoded pixels over all frames (~2.4 GB of RGB uint8).
MAX_DECODE_PIXELS = 89_478_485
MAX_VIDEO_DECODE_PIXELS = 800_000_000

BAD_MEDIA_REASONS = (
    "missing",  # file not found
    "corrupt",  # not a decodable image / container
    "truncated",  # decoding stopped early
    "zero_size",  # width or height is 0
    "too_large",  # more decoded pixels than the cap
    "aspect_ratio",  # max(h, w) / min(h, w) > 200 (smart_resize refuses it)
    "unreadable_video",  # no video stream, no frame rate, or no decodable frames
    "too_few_frames",  # fewer than 2 frames to sample
)


class BadMediaError(ValueError):
    """Media that cannot be turned into patches. ``reason`` is one of BAD_MEDIA_REASONS."""

    def __init__(self, reason: str, message: str):
        if reason not in BAD_MEDIA_REASONS:
            raise ValueError(f"unknown BadMediaError reason {reason!r}; expected one of {BAD_MEDIA_REASONS}")
        super().__init__(f"[{reason}] {message}")
        self.reason = reason


ImageLike = Union[PIL.Image.Image, np.ndarray]

# ----------------------------------------------------------------------------------------------------------
# smart_resize


def _check_ratio(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise BadMediaError("zero_size", f"image has a zero side: height={height}, width={width}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise BadMediaError(
            "aspect_ratio",
            f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {max(height, width) / min(height, width)}"
            f" (height={height}, width={width})",
        )


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
) -> tuple[int, int]:
    """(h, w) multiples of ``factor`` with min_pixels <= h*w <= max_pixels, aspect ratio kept.

    Exactly transformers 4.57.6 ``smart_resize``: Python (banker's) rounding, ``max(factor, floor(..))`` on the
    downscale branch, no lower bound on the input sides. Raises BadMediaError (a ValueError) with reason
    "aspect_ratio" when max/min side > 200 and "zero_size" for a zero side.
    """
    _check_ratio(height, width)
    return _fit_pixel_budget(height, width, round(height / factor) * factor, round(width / factor) * factor,
                             factor, min_pixels, max_pixels)


def _fit_pixel_budget(height, width, h_bar, w_bar, factor, min_pixels, max_pixels) -> tuple[int, int]:
    """The shared tail of both smart_resize variants: rescale the rounded (h_bar, w_bar) into the budget."""
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_qwen_vl_utils(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: float = VIDEO_MIN_PIXELS,
    max_pixels: float = VIDEO_MAX_PIXELS,
) -> tuple[int, int]:
    """qwen-vl-utils 0.0.8 variant used for video frames: ``max(factor, round(..))`` on the initial rounding.

    It differs from :func:`smart_resize` only for sides under 14 px. qwen-vl-utils has no lower bound on the
    downscale branch (a side can floor to 0 and crash); here it is clamped to ``factor`` as HF 4.57.6 does.
    """
    _check_ratio(height, width)
    return _fit_pixel_budget(height, width, max(factor, round(height / factor) * factor),
                             max(factor, round(width / factor) * factor), factor, min_pixels, max_pixels)


# ----------------------------------------------------------------------------------------------------------
# Pixels: RGB uint8, resize, normalization table, patchify


def to_rgb_uint8(image: ImageLike) -> np.ndarray:
    """uint8 [H, W, 3]. PIL images go through ``.convert("RGB")`` as HF convert_to_rgb does (alpha dropped,
    'P' through its palette, 'I;16'/'I'/'F' saturated to 0..255, '1' to 0/255); numpy arrays must be uint8 HWC
    with 3 channels (HF would infer channels-first for ambiguous shapes such as (3, W, 3); we never do)."""
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise BadMediaError("zero_size", f"image has a zero side: size={image.size}")
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"numpy images must be HWC with 3 channels, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8 (0..255), got dtype {image.dtype}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise BadMediaError("zero_size", f"image has a zero side: shape={image.shape}")
        return image
    raise TypeError(f"expected a PIL.Image.Image or a uint8 HWC numpy array, got {type(image).__name__}")


def resize_rgb_uint8(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3] with PIL bicubic (HF ``resize`` with resample=BICUBIC).

    Same size: returned as is (PIL's resize returns an identical copy in that case)."""
    if rgb.shape[0] == height and rgb.shape[1] == width:
        return rgb
    return np.asarray(PIL.Image.fromarray(rgb).resize((width, height), resample=PIL.Image.Resampling.BICUBIC))


@functools.lru_cache(maxsize=16)
def normalization_table(
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
    image_std: tuple[float, ...] = OPENAI_CLIP_STD,
    rescale_factor: float = pixels.RESCALE_FACTOR,
) -> np.ndarray:
    """float32 [3, 256]: table[c, v] is the reference's normalized value of uint8 v in channel c.

    Reference (transformers image_transforms.rescale / normalize): ``x.astype(float64) * scale`` -> float32,
    then ``(x - float32(mean)) / float32(std)`` in float32."""
    if len(image_mean) != 3 or len(image_std) != 3:
        raise ValueError(f"image_mean and image_std need 3 values, got {image_mean} and {image_std}")
    values = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)  # [256]
    mean = np.asarray(image_mean, dtype=np.float32)[:, None]  # [3, 1]
    std = np.asarray(image_std, dtype=np.float32)[:, None]
    table = (values[None, :] - mean) / std  # float32 [3, 256]
    table.setflags(write=False)
    return table


def patchify_normalized(
    frames: np.ndarray,
    table: np.ndarray,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 frames [F, H, W, 3] -> (float32 [gt*gh*gw, 3*tp*p*p], (gt, gh, gw)).

    F is padded to a multiple of ``temporal_patch_size`` by repeating the last frame (an image, F=1,
    becomes tp identical frames), as transformers 4.57.6 does. H and W must be multiples of p*merge.
    Row order (gt, gh/m, gw/m, m, m); column order (channel, frame, p, p) -- docs/qwen2vl.md §2.1."""
    f, h, w, c = frames.shape
    if c != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(f"frame size {h}x{w} is not a multiple of patch_size*merge_size={unit}")
    tp, p, m = temporal_patch_size, patch_size, merge_size
    if f > 1 and f % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], tp - f % tp, axis=0)], axis=0)
        f = frames.shape[0]
    gt, gh, gw = -(-f // tp), h // p, w // p
    n = gt * gh * gw
    ft = tp if f > 1 else 1  # frames per tube actually stored; an image (f == 1) is broadcast to tp frames
    # 1) Move whole patch rows: each run of p pixels * 3 channels is contiguous in HWC, so reorder runs of
    #    3p bytes (one opaque element each) instead of single bytes.
    runs = np.ascontiguousarray(frames).reshape(f, h, w // p, p * c).view(np.dtype(f"V{p * c}"))
    rows = runs.reshape(gt, ft, gh // m, m, p, gw // m, m)
    #                                                                       0   1   2       3  4  5       6
    moved = np.ascontiguousarray(rows.transpose(0, 2, 5, 3, 6, 1, 4))  # (gt, bh, bw, mh, mw, ft, ph) of p*3 bytes
    moved = moved.view(np.uint8).reshape(n, ft * p * p, c)  # [N, (frame, ph, pw), C] uint8
    # 2) Table lookup per channel into contiguous float32 planes (exact rescale+normalize, see module doc).
    #    uint8 indices never leave [0, 256), so every mode gives the same values; "wrap" is the fastest
    #    ("clip" checks bounds, "raise" buffers the output).
    normed = np.empty((c, n, ft * p * p), dtype=np.float32)
    for ch in range(c):
        np.take(table[ch], moved[:, :, ch], out=normed[ch], mode="wrap")
    # 3) Channel-major columns (C, T, ph, pw); an image's single frame is written tp times.
    out = np.empty((n, c, tp, p * p), dtype=np.float32)
    out[...] = normed.reshape(c, n, ft, p * p).transpose(1, 0, 2, 3)
    return out.reshape(n, c * tp * p * p), (gt, gh, gw)


# ----------------------------------------------------------------------------------------------------------
# Images


def _resized_rgb(image: ImageLike, factor: int, min_pixels: int, max_pixels: int) -> np.ndarray:
    """uint8 [h, w, 3] at the smart_resize size. A PIL image is converted and resized as a PIL image (the
    reference goes PIL -> numpy -> PIL -> resize -> numpy; the pixels are the same, two copies fewer)."""
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise BadMediaError("zero_size", f"image has a zero side: size={image.size}")
        h, w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (w, h):
            image = image.resize((w, h), resample=PIL.Image.Resampling.BICUBIC)
        return np.asarray(image)
    rgb = to_rgb_uint8(image)
    h, w = smart_resize(rgb.shape[0], rgb.shape[1], factor, min_pixels, max_pixels)
    return resize_rgb_uint8(rgb, h, w)



def preprocess_images(
    images: Sequence[ImageLike],
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Images -> (pixel_values float32 [sum_i t*h*w, 3*tp*p*p], grid_thw int64 [num_images, 3]).

    Equal to ``Qwen2VLImageProcessor(min_pixels=.., max_pixels=..)(images=images, return_tensors="np")``
    (``pixel_values``, ``image_grid_thw``). Each image is 1 temporal slice of 2 identical frames."""
    if isinstance(images, (PIL.Image.Image, np.ndarray)):
        images = [images]
    if len(images) == 0:
        raise ValueError("preprocess_images needs at least one image")
    table = normalization_table(tuple(float(v) for v in image_mean), tuple(float(v) for v in image_std))
    factor = patch_size * merge_size
    chunks, grids = [], []
    for image in images:
        rgb = _resized_rgb(image, factor, min_pixels, max_pixels)
        patches, grid = patchify_normalized(rgb[None], table, patch_size, merge_size, temporal_patch_size)
        chunks.append(patches)
        grids.append(grid)
    pixel_values = chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=0)
    return pixel_values, np.asarray(grids, dtype=np.int64).reshape(len(grids), 3)


# ----------------------------------------------------------------------------------------------------------
# Loading


def _open_source(path_or_bytes):
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(path_or_bytes)), "<bytes>"
    if isinstance(path_or_bytes, (str, os.PathLike)):
        path = os.fspath(path_or_bytes)
        if not os.path.isfile(path):
            raise BadMediaError("missing", f"no such file: {path}")
        return path, path
    raise TypeError(f"expected a path or bytes, got {type(path_or_bytes).__name__}")


def _decode_error_reason(error: Exception) -> str:
    """PIL reports a short file as EOFError or an OSError/SyntaxError mentioning truncation."""
    return "truncated" if isinstance(error, EOFError) or "truncat" in str(error).lower() else "corrupt"


def load_image(
    path_or_bytes: Union[str, os.PathLike, bytes], max_pixels: int = MAX_DECODE_PIXELS, exif_transpose: bool = True
) -> PIL.Image.Image:
    """Decode an image fully (original mode kept; preprocess_images converts to RGB).

    The size is checked from the header before decoding (``max_pixels`` cap against decompression bombs).
    EXIF orientation is applied as transformers.image_utils.load_image does. Raises BadMediaError with reason
    missing / corrupt / truncated / zero_size / too_large."""
    source, name = _open_source(path_or_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(source)
    except PIL.Image.DecompressionBombError as e:
        raise BadMediaError("too_large", f"{name}: {e}") from e
    except FileNotFoundError as e:
        raise BadMediaError("missing", f"{name}: {e}") from e
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadMediaError(_decode_error_reason(e), f"{name}: {e}") from e
    width, height = image.size
    if width == 0 or height == 0:
        raise BadMediaError("zero_size", f"{name}: image has a zero side: {width}x{height}")
    if width * height > max_pixels:
        raise BadMediaError("too_large", f"{name}: {width}x{height} = {width * height} pixels > cap {max_pixels}")
    try:
        image.load()
    except (EOFError, OSError, SyntaxError, ValueError) as e:
        raise BadMediaError(_decode_error_reason(e), f"{name}: {e}") from e
    if exif_transpose:
        try:
            image = PIL.ImageOps.exif_transpose(image)
        except Exception as e:  # malformed EXIF block
            raise BadMediaError("corrupt", f"{name}: bad EXIF orientation: {e}") from e
    return image


def load_video(
    path: Union[str, os.PathLike, bytes], max_pixels: int = MAX_VIDEO_DECODE_PIXELS
) -> tuple[np.ndarray, float]:
    """Decode every frame with PyAV -> (uint8 [T, H, W, 3] RGB, average fps of the stream).

    As torchvision.io.read_video (the qwen-vl-utils backend without decord): rgb24 frames, ``fps`` from
    ``stream.average_rate``. The whole clip is held in memory; ``max_pixels`` caps T*H*W. Raises BadMediaError
    (missing / unreadable_video / truncated / too_large / zero_size)."""
    import av  # optional dependency: pinned in the report (av==16.0.1)

    source, name = _open_source(path)
    try:
        container = av.open(source)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise BadMediaError("unreadable_video", f"{name}: {e}") from e
    frames: list[np.ndarray] = []
    try:
        if not container.streams.video:
            raise BadMediaError("unreadable_video", f"{name}: no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or float(rate) <= 0:
            raise BadMediaError("unreadable_video", f"{name}: the video stream has no frame rate")
        fps = float(rate)
        if stream.codec_context.width == 0 or stream.codec_context.height == 0:
            raise BadMediaError("zero_size", f"{name}: video frames have a zero side")
        decoded_pixels = 0
        try:
            for frame in container.decode(stream):
                decoded_pixels += frame.width * frame.height
                if decoded_pixels > max_pixels:
                    raise BadMediaError("too_large", f"{name}: more than {max_pixels} decoded pixels")
                frames.append(frame.to_ndarray(format="rgb24"))
        except av.error.FFmpegError as e:
            if not frames:
                raise BadMediaError("unreadable_video", f"{name}: {e}") from e
            raise BadMediaError("truncated", f"{name}: decoding failed after {len(frames)} frames: {e}") from e
    finally:
        container.close()
    if not frames:
        raise BadMediaError("unreadable_video", f"{name}: no decodable frames")
    return np.stack(frames), fps


# ----------------------------------------------------------------------------------------------------------
# Videos (qwen-vl-utils 0.0.8 rules)


def smart_nframes(
    total_frames: int,
    video_fps: float,
    fps: float = VIDEO_FPS,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int | None = None,
) -> int:
    """Frames to sample: total/video_fps*fps clamped to [ceil2(min_frames), floor2(max_frames)], rounded
    (banker's) to a multiple of 2 -- qwen-vl-utils 0.0.8 ``smart_nframes``. ``max_frames=None`` means
    min(FPS_MAX_FRAMES, total_frames); an explicit max_frames is not capped at the frame count, so a request
    for more frames than the video has fails, as there. BadMediaError "too_few_frames" when the result is
    outside [2, total_frames]."""
    if video_fps <= 0 or fps <= 0:
        raise ValueError(f"video_fps and fps must be > 0, got video_fps={video_fps}, fps={fps}")
    if max_frames is None:
        max_frames = min(FPS_MAX_FRAMES, total_frames)
    lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(max_frames / FRAME_FACTOR) * FRAME_FACTOR
    nframes = total_frames / video_fps * fps
    nframes = min(max(nframes, lo), hi)
    nframes = round(nframes / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= nframes <= total_frames:
        raise BadMediaError(
            "too_few_frames", f"nframes should be in [{FRAME_FACTOR}, {total_frames}], got {nframes} "
            f"(total_frames={total_frames}, video_fps={video_fps}, fps={fps}, min_frames={min_frames}, "
            f"max_frames={max_frames})"
        )
    return nframes


def sample_frame_indices(total_frames: int, nframes: int) -> np.ndarray:
    """int64 [nframes]: ``torch.linspace(0, total-1, nframes).round().long()`` as qwen-vl-utils samples.

    Reproduces torch's CPU float32 kernel bit for bit: step = float32((total-1) / (n-1)); element i is
    ``step*i`` for i < n//2 and ``end - step*(n-1-i)`` after, each a fused multiply-add (one rounding to
    float32, emulated exactly in float64); then round half to even. A float64 linspace differs from torch for
    long videos (float32 spacing ~0.01 at 1e5 frames moves ties)."""
    if nframes < 1 or total_frames < 1:
        raise ValueError(f"need nframes >= 1 and total_frames >= 1, got {nframes}, {total_frames}")
    if nframes == 1:
        return np.zeros(1, dtype=np.int64)
    end = np.float32(total_frames - 1)
    step = np.float64(np.float32(end / np.float32(nframes - 1)))
    i = np.arange(nframes, dtype=np.float64)
    # float32 * int < 2**24 is exact in float64, and so is the subtraction: a single rounding, as an FMA
    values = np.where(i < nframes // 2, step * i, np.float64(end) - step * (nframes - 1 - i)).astype(np.float32)
    return np.rint(values).astype(np.int64)


def sample_frames(
    frames: Union[np.ndarray, Sequence[ImageLike]],
    video_fps: float,
    fps: float = VIDEO_FPS,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int | None = None,
) -> list:
    """The frames qwen-vl-utils keeps of a decoded video: :func:`smart_nframes` of them, at
    :func:`sample_frame_indices`."""
    nframes = smart_nframes(len(frames), video_fps, fps, min_frames, max_frames)
    return [frames[int(i)] for i in sample_frame_indices(len(frames), nframes)]


def frame_max_pixels(
    nframes: int,
    min_pixels: int = VIDEO_MIN_PIXELS,
    ceiling: int = VIDEO_MAX_PIXELS,
    total_pixels: int = VIDEO_TOTAL_PIXELS,
) -> float:
    """Per-frame pixel cap of a sampled video: max(min(ceiling, total_pixels / nframes * 2),
    int(min_pixels * 1.05)). qwen-vl-utils fixes the ceiling at VIDEO_MAX_PIXELS; the data pipeline sets its
    own. (An explicit max_pixels option replaces this whole cap; see preprocess_video.)"""
    return max(min(ceiling, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))


def _check_frames(frames) -> None:
    if isinstance(frames, np.ndarray) and (frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8):
        raise ValueError(f"video arrays must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if len(frames) == 0:
        raise BadMediaError("too_few_frames", "the video has no frames")


def preprocess_video_frames(
    frames: Union[np.ndarray, Sequence[ImageLike]],
    min_pixels: float,
    max_pixels: float,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """Frames already sampled (uint8 [T, H, W, 3] or a list of images of one size) -> (pixel_values float32
    [gt*gh*gw, 1176], grid_thw int64 [1, 3]). Every frame is resized to smart_resize (qwen-vl-utils variant)
    of its size within [min_pixels, max_pixels]; an odd count repeats the last frame (transformers 4.57.6)."""
    _check_frames(frames)
    if not isinstance(frames, np.ndarray):
        frames = [to_rgb_uint8(frame) for frame in frames]
        sizes = {f.shape[:2] for f in frames}
        if len(sizes) > 1:
            raise ValueError(f"all frames of a video must have one size, got {sorted(sizes)}")
    height, width = frames[0].shape[:2]
    h, w = smart_resize_qwen_vl_utils(height, width, FACTOR, min_pixels, max_pixels)
    resized = np.empty((len(frames), h, w, 3), dtype=np.uint8)
    for k, frame in enumerate(frames):
        resized[k] = resize_rgb_uint8(frame, h, w)
    table = normalization_table(tuple(float(v) for v in image_mean), tuple(float(v) for v in image_std))
    pixel_values, grid = patchify_normalized(resized, table)
    return pixel_values, np.asarray([grid], dtype=np.int64)


def preprocess_video(
    video: Union[str, os.PathLike, bytes, np.ndarray, Sequence[ImageLike]],
    video_fps: float | None = None,
    fps: float | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: int | None = None,
    min_frames: int | None = None,
    max_frames: int | None = None,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """A video -> (pixel_values float32 [gt*gh*gw, 1176], grid_thw int64 [1, 3]), sized and sampled as
    qwen-vl-utils 0.0.8 ``fetch_video`` does. An option left at None takes the reference's default; the two
    kinds of video there take different ones:

    * A decoded video: a path (decoded with :func:`load_video`, its own fps used) or frames with ``video_fps``.
      :func:`smart_nframes` frames (fps, min_frames, max_frames) are sampled uniformly and all get
      smart_resize of the first frame's size within [min_pixels (VIDEO_MIN_PIXELS), cap], where the cap is
      an explicit ``max_pixels`` or else :func:`frame_max_pixels` of the sample count and ``total_pixels``
      (VIDEO_TOTAL_PIXELS), so total_pixels has no effect once max_pixels is given.
    * Frames (a list of images or a uint8 [T, H, W, 3] array) without ``video_fps``: every frame is kept
      and gets the image limits [FRAME_LIST_MIN_PIXELS, FRAME_LIST_MAX_PIXELS] or the explicit min_pixels /
      max_pixels. fps, min_frames, max_frames and total_pixels have no effect there and are refused.

    Frames are resized with PIL bicubic (see the module docstring) and patchified like the HF processor."""
    if isinstance(video, (str, os.PathLike, bytes)):
        if video_fps is not None:
            raise ValueError(f"video_fps={video_fps} is given with a video file, whose own fps is used; "
                             "pass video_fps only with frames")
        frames, video_fps = load_video(video)
    else:
        frames = video
    if video_fps is None:
        given = {k: v for k, v in dict(fps=fps, min_frames=min_frames, max_frames=max_frames,
                                       total_pixels=total_pixels).items() if v is not None}
        if given:
            raise ValueError(f"{given} need a decoded video (a path, or frames with video_fps); frames without "
                             "video_fps are all kept and take only min_pixels / max_pixels, as in qwen-vl-utils")
        return preprocess_video_frames(
            frames, FRAME_LIST_MIN_PIXELS if min_pixels is None else min_pixels,
            FRAME_LIST_MAX_PIXELS if max_pixels is None else max_pixels, image_mean, image_std)
    _check_frames(frames)
    sampled = sample_frames(frames, video_fps, VIDEO_FPS if fps is None else fps,
                            FPS_MIN_FRAMES if min_frames is None else min_frames, max_frames)
    min_pixels = VIDEO_MIN_PIXELS if min_pixels is None else min_pixels
    if max_pixels is None:
        max_pixels = frame_max_pixels(len(sampled), min_pixels, VIDEO_MAX_PIXELS,
                                      VIDEO_TOTAL_PIXELS if total_pixels is None else total_pixels)
    return preprocess_video_frames(sampled, min_pixels, max_pixels, image_mean, image_std)
