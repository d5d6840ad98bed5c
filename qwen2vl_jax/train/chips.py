"""Accelerator constants, one table: per TPU chip what a roofline over a compiled step and a topology need;
per GPU its dense bf16 peak (MFU of a measured step).

Sources (public Cloud TPU documentation, "System architecture" tables):
  v5p  https://cloud.google.com/tpu/docs/v5p   459 TFLOP/s bf16; 95 GiB HBM2e at 2765 GB/s; 2 TensorCores
       of 4 MXUs; bidirectional ICI 1200 GB/s per chip; 3-D torus, so 6 ports.
  v5e  https://cloud.google.com/tpu/docs/v5e   197 TFLOP/s bf16; 16 GB HBM2 at 819 GB/s; 1 TensorCore of
       4 MXUs; bidirectional ICI 400 GB/s per chip, 4 ICI ports (2-D torus).
  v6e  https://cloud.google.com/tpu/docs/v6e   918 TFLOP/s bf16; 32 GB HBM at 1638 GB/s; 1 TensorCore;
       bidirectional ICI 800 GB/s per chip, 4 ICI ports (2-D torus).
  v4   https://cloud.google.com/tpu/docs/v4    275 TFLOP/s bf16; 32 GiB HBM2 at 1200 GB/s; 2 TensorCores of
       4 MXUs; 3-D torus (6 ports). The page gives no ICI bandwidth: 45 GB/s per link and direction is the
       figure of "How to Scale Your Model" (jax-ml.github.io/scaling-book/tpus).
Per link and direction = bidirectional per-chip bandwidth / ports / 2 (v5p 100, v5e 50, v6e 100 GB/s).

HBM capacity: the per-chip figure launch.aot's does-it-fit check uses, read as GiB for all four (the v5e and
v6e pages say "GB"). TensorCores: what an accelerator name counts for v5p and v4 (v5p-256 = 128 chips); jax
shows a megacore chip as one device. Torus dimensions = ICI ports / 2.

GPUs (NVIDIA datasheets, dense bf16 tensor-core FLOP/s, i.e. half the "with sparsity" figure): H100 SXM and
H200 989e12, A100 312e12, L4 121e12.

Clock: the TPU compiler's `estimated_cycles` (in each fusion's backend_config) count chip cycles, so their
sum converts to seconds at the MXU clock, clock = peak / (TensorCores x MXUs x MXU MACs x 2). v5p: 459e12 /
(2 x 4 x 128 x 128 x 2) = 1.75 GHz; v5e 1.50 GHz; v4 1.05 GHz. v6e: the page lists two 256x256 MXUs, which
would put the clock at 3.5 GHz, but then the compiler's own cycle estimate for a large bf16 matmul would beat
the chip's peak (141%); 1.75 GHz (four 256x256 MXU-equivalents) makes it 70% of peak. For an 8192^3 bf16
matmul the compiler's cycles at these clocks give 90% of peak on v5p, 88% on v5e and 45% on v4 (whose
backend_config shows no megacore split); tests/perf/test_roofline.py checks each clock against the peak.
"""
from __future__ import annotations

import dataclasses
import re

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16_flops: float     # dense, per chip, FLOP/s
    hbm_bytes: int             # per chip
    hbm_bandwidth: float       # bytes/s per chip
    ici_link_bandwidth: float  # bytes/s per link and direction
    ici_links: int             # ICI ports per chip
    tensorcores: int           # per chip (jax shows a megacore chip as one device)
    clock_hz: float            # converts the compiler's estimated_cycles to seconds

    @property
    def torus_dims(self) -> int:
        """3 for v4 / v5p slices, 2 for v5e / v6e."""
        return self.ici_links // 2

    @property
    def ring_bandwidth(self) -> float:
        """bytes/s one device moves in a bidirectional ring along one torus axis: one link each way."""
        return 2 * self.ici_link_bandwidth


CHIPS: dict[str, Chip] = {
    "v5p": Chip("v5p", 459e12, 95 * GiB, 2765e9, 1200e9 / 6 / 2, 6, 2, 459e12 / (2 * 4 * 128 * 128 * 2)),
    "v5e": Chip("v5e", 197e12, 16 * GiB, 819e9, 400e9 / 4 / 2, 4, 1, 197e12 / (1 * 4 * 128 * 128 * 2)),
    "v6e": Chip("v6e", 918e12, 32 * GiB, 1638e9, 800e9 / 4 / 2, 4, 1, 918e12 / (1 * 4 * 256 * 256 * 2)),
    "v4": Chip("v4", 275e12, 32 * GiB, 1200e9, 45e9, 6, 2, 275e12 / (2 * 4 * 128 * 128 * 2)),
}

# jax `device_kind` of each chip (compile-only topology devices report the same strings)
DEVICE_KINDS = {"TPU v5": "v5p", "TPU v5p": "v5p", "TPU v5 lite": "v5e", "TPU v5e": "v5e",
                "TPU v6 lite": "v6e", "TPU v6e": "v6e", "TPU v4": "v4"}

# dense bf16 FLOP/s per GPU, by the model name in its device kind ("NVIDIA H100 80GB HBM3")
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def get_chip(name: str) -> Chip:
    """Chip by generation name (v5p, v5e, v6e, v4) or jax device_kind ("TPU v5 lite")."""
    key = DEVICE_KINDS.get(name, name)
    if key not in CHIPS:
        raise ValueError(f"unknown TPU chip {name!r}; valid: {', '.join(CHIPS)} "
                         f"or a device_kind ({', '.join(DEVICE_KINDS)})")
    return CHIPS[key]


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak of one device from its jax (or torch) device kind; None for CPUs and unknown devices."""
    kind = device_kind.strip()
    tpu = {k.lower(): v for k, v in DEVICE_KINDS.items()}.get(kind.lower())
    if tpu:
        return CHIPS[tpu].peak_bf16_flops
    for name, peak in GPU_PEAK_FLOPS.items():
        if re.search(rf"(?<![A-Za-z0-9]){name}(?![A-Za-z0-9])", kind):   # L4, not L40S
            return peak
    return None
