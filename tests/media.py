"""Media files for data tests (written with PyAV / PIL)."""
import numpy as np


def write_video(path, frames=8, fps=4):
    """An mpeg4 clip of `frames` 64x56 flat-colour frames (frame i has value 20*i); returns str(path)."""
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = 64, 56, "yuv420p"
        for i in range(frames):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((56, 64, 3), 20 * i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)
