"""Media files for data tests: real photographs (scikit-image's bundled samples) and short videos written
with PyAV, as bytes or files the way cameras and datasets store them."""
import io

import numpy as np
import PIL.Image
import pytest

PHOTOS = ("astronaut", "coffee", "chelsea")   # 512x512, 400x600 and 300x451 RGB photographs


def photo(name):
    """uint8 [H, W, 3]: one of scikit-image's bundled photographs (skipped when scikit-image is missing)."""
    if name not in PHOTOS:
        raise ValueError(f"photo {name!r} unknown; valid: {', '.join(PHOTOS)}")
    data = pytest.importorskip("skimage.data")
    return np.ascontiguousarray(getattr(data, name)())


def photo_bytes(name, fmt="JPEG", **save_args):
    """The photograph encoded as `fmt` ("JPEG" at quality 90 unless given, "PNG", "WEBP", ...)."""
    if fmt == "JPEG":
        save_args.setdefault("quality", 90)
    buf = io.BytesIO()
    PIL.Image.fromarray(photo(name)).save(buf, format=fmt, **save_args)
    return buf.getvalue()


def panning_frames(name="astronaut", frames=16, height=96, width=128, step=6):
    """uint8 [frames, height, width, 3]: a window moving `step` px right and down per frame over a photograph
    (the photo is first scaled so the whole pan stays inside it)."""
    img = PIL.Image.fromarray(photo(name))
    need = max((height + step * (frames - 1)) / img.height, (width + step * (frames - 1)) / img.width)
    if need > 1:
        img = img.resize((int(np.ceil(img.width * need)), int(np.ceil(img.height * need))), PIL.Image.LANCZOS)
    arr = np.asarray(img)
    return np.stack([arr[k * step:k * step + height, k * step:k * step + width] for k in range(frames)])


def write_panning_video(path, name="astronaut", frames=16, fps=8, height=96, width=128, codec="h264"):
    """An mp4 (h264 or mpeg4, yuv420p, as phones and web videos are) panning over a photograph; str(path).
    Lossy: decoded frames are close to, not equal to, panning_frames(...)."""
    return write_frames(path, panning_frames(name, frames, height, width), fps, codec, "yuv420p")


def write_video(path, frames=8, fps=4):
    """An mpeg4 clip of `frames` 64x56 flat-colour frames (frame i has value 20*i); returns str(path)."""
    return write_frames(path, np.stack([np.full((56, 64, 3), 20 * i, np.uint8) for i in range(frames)]), fps,
                        "mpeg4", "yuv420p")


def write_frames(path, frames, fps, codec="png", pix_fmt="rgb24"):
    """uint8 [T, H, W, 3] frames as a video file; the default png codec in rgb24 is lossless (decoded frames
    equal the input; use an .avi or .mkv path). Returns str(path)."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)
