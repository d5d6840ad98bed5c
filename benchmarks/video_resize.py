"""How far our video frames are from qwen-vl-utils 0.0.8's: PIL bicubic vs torchvision's antialiased bicubic.

    python -m benchmarks.video_resize

qwen-vl-utils resizes decoded frames with torchvision ``resize(BICUBIC, antialias=True)`` on a uint8 tensor;
we resize with PIL bicubic on uint8 (as transformers' slow image processor does for images; data/media.py says
why). torchvision's tensor path is uint8 -> float32, ``torch.nn.functional.interpolate(bicubic,
align_corners=False, antialias=True)``, clamp(0, 255), round, -> uint8; it is reproduced here with torch alone
(the CPU torchvision wheel is not a dependency). Prints, per frame kind and target size (qwen-vl-utils' sizes
for a 352x288 clip), the share of uint8 values that differ, differ by exactly 1 level and by more, the mean
and the largest difference in levels. Needs torch (requirements-test.txt) and scikit-image's photographs.
"""
from __future__ import annotations

import numpy as np
import PIL.Image

from qwen2vl_jax.data import media

H, W = 288, 352                    # a CIF clip, the size the qwen-vl-utils example uses


def torchvision_resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [height, width, 3] as torchvision's tensor resize (module docstring)."""
    import torch

    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float()
    y = torch.nn.functional.interpolate(x, size=[height, width], mode="bicubic", align_corners=False,
                                        antialias=True)
    return y.clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()


def frames() -> dict[str, np.ndarray]:
    """uint8 [H, W, 3] test frames: smooth content, photographs, hard edges, a text page and noise."""
    import skimage.data as sd
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)

    def fit(img):
        img = img if img.ndim == 3 else np.repeat(img[..., None], 3, -1)
        return np.asarray(PIL.Image.fromarray(img).resize((W, H), PIL.Image.Resampling.LANCZOS))

    def smooth(sigma):
        x = gaussian_filter(rng.normal(size=(H, W, 3)), (sigma, sigma, 0))
        return ((x - x.min()) / (x.max() - x.min()) * 255).round().astype(np.uint8)

    yy, xx = np.mgrid[0:H, 0:W]
    checker = ((yy // 16 + xx // 16) % 2).astype(bool)[..., None]
    return {
        "gradient": np.stack([xx * 255 // (W - 1), yy * 255 // (H - 1), (xx + yy) * 255 // (H + W - 2)],
                             -1).astype(np.uint8),
        "smooth (sigma 8)": smooth(8), "smooth (sigma 3)": smooth(3),
        "photo astronaut": fit(sd.astronaut()), "photo coffee": fit(sd.coffee()),
        "photo chelsea": fit(sd.chelsea()), "photo rocket": fit(sd.rocket()),
        "edges (checkerboard)": np.where(checker, np.uint8([230, 30, 40]), np.uint8([20, 20, 200])).astype(np.uint8),
        "text page": fit(sd.page()),
        "noise": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
    }


def main() -> None:
    targets = {   # qwen-vl-utils' default for 16 frames (an upscale), and two downscales
        "defaults, 16 frames": media.smart_resize_qwen_vl_utils(H, W, 28, media.VIDEO_MIN_PIXELS,
                                                                media.frame_max_pixels(16)),
        "down x0.5": media.smart_resize_qwen_vl_utils(H, W, 28, 3136, H * W / 4),
        "down x0.25": media.smart_resize_qwen_vl_utils(H, W, 28, 3136, H * W / 16),
    }
    print(f"{'frame':22s} {'target':20s} {'size':>9s} {'%differ':>8s} {'%by 1':>6s} {'%by >1':>7s} "
          f"{'mean':>6s} {'max':>4s}")
    for tname, (h, w) in targets.items():
        for fname, rgb in frames().items():
            d = np.abs(media.resize_rgb_uint8(rgb, h, w).astype(np.int16)
                       - torchvision_resize(rgb, h, w).astype(np.int16))
            print(f"{fname:22s} {tname:20s} {h:4d}x{w:<4d} {100 * (d > 0).mean():8.2f} {100 * (d == 1).mean():6.2f} "
                  f"{100 * (d > 1).mean():7.2f} {d.mean():6.3f} {d.max():4d}")


if __name__ == "__main__":
    main()
