"""One training step, JAX vs transformers PyTorch, same weights, same batch.

    python -m benchmarks.train_step --model=2b --batch_sizes=1,2 --steps=10          # on a GPU
    python -m benchmarks.train_step --model=test --steps=2                           # CPU smoke test

Batch (the setting of the transformers 2B baseline): each row holds `--seq_len` tokens (4096) with
`--images` (4) images of `--image_px` (448) pixels square: 32 x 32 = 1024 patches -> 256 merged tokens
each; the rest is text, all of it supervised. The row is built with the packer (`data.packing.prepare_sample` +
`assemble_row`), so it is exactly what `launch.pretrain` feeds the step.

JAX: `train.make_train_step` on one device, bf16 compute with fp32 master weights (`cfg.dtype=bfloat16`,
`param_dtype=float32`), cuDNN attention on GPU (`--attention`; xla on CPU), no remat (`--remat`),
AdamW. torch: `Qwen2VLForConditionalGeneration` (transformers), bf16 weights, sdpa, no gradient
checkpointing, fused AdamW, loaded with the SAME initial weights (qwen2vl_jax.model.hf), so the first-step
losses must agree (printed; a mismatch means the two sides do not run the same model).

Reported per side and batch size: seconds per step (median of `--steps` after `--warmup` steps),
tokens/s, "model TFLOP/s" = 6 x (decoder params x tokens + vision params x patches) / step time
(attention FLOPs excluded, as in that baseline), MFU against the device's dense bf16 peak (`--peak_tflops`
overrides; none on CPU), and peak device memory.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # torch shares the GPU in this process

import dataclasses  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from experiments import flags as cli  # noqa: E402
from qwen2vl_jax.model.config import ATTENTION_IMPLS, REMAT_POLICIES  # noqa: E402
from qwen2vl_jax.train import chips  # noqa: E402

# per-model default batch geometry: (seq_len, images, image_px)
GEOMETRY = {"test": (256, 2, 112), "tiny": (512, 2, 224)}
DEFAULT_GEOMETRY = (4096, 4, 448)


@dataclasses.dataclass(frozen=True)
class Result:
    side: str
    batch: int
    step_s: float
    tokens: int
    patches: int
    model_flops: float
    peak_flops: float | None
    peak_bytes: int | None
    first_loss: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s

    @property
    def model_tflops(self) -> float:
        return self.model_flops / self.step_s / 1e12

    @property
    def mfu(self) -> float | None:
        return None if not self.peak_flops else self.model_flops / self.step_s / self.peak_flops


# ---------------------------------------------------------------------------------------------
# batch

def make_row(cfg, seq_len: int, images: int, image_px: int, seed: int = 0) -> tuple[dict, np.ndarray]:
    """One packed row (contract arrays, no batch axis) and its image_grid_thw [images, 3]."""
    from qwen2vl_jax.data import packing
    v = cfg.vision
    unit = v.patch_size * v.spatial_merge_size
    if image_px % unit:
        raise ValueError(f"--image_px={image_px} must be a multiple of patch*merge = {unit}")
    g = image_px // v.patch_size
    per_image = g * g // v.merge_unit
    text = seq_len - images * (per_image + 2)
    if text < 2 * (images + 1):
        raise ValueError(f"--seq_len={seq_len} leaves {text} text tokens for {images} images of "
                         f"{per_image} tokens; need at least {2 * (images + 1)}")
    rng = np.random.default_rng(seed)
    pieces = np.array_split(rng.integers(0, min(cfg.special_token_base, cfg.vocab_size), text), images + 1)
    ids, mask = [], []
    for k, piece in enumerate(pieces):
        ids.append(piece)
        mask.append(np.ones(len(piece), np.float32))
        if k < images:
            block = [cfg.vision_start_token_id] + [cfg.image_token_id] * per_image + [cfg.vision_end_token_id]
            ids.append(np.array(block))
            mask.append(np.zeros(len(block), np.float32))
    grid = np.array([[1, g, g]] * images, np.int64)
    sample = {"input_ids": np.concatenate(ids).astype(np.int32), "loss_mask": np.concatenate(mask),
              "pixel_values": _random_patches(rng, images * g * g, v.patch_dim),
              "grid_thw": grid, "vision_kind": np.zeros(images, np.int8), "sample_type": "benchmark"}
    pack_cfg = packing.PackConfig.for_model(cfg, seq_len=seq_len, max_patches=images * g * g)
    packing.validate_sample(sample, cfg)
    prepared, event = packing.prepare_sample(sample, pack_cfg, cfg)
    if prepared is None:
        raise ValueError(f"benchmark row rejected by the packer: {event}")
    return packing.assemble_row([prepared], pack_cfg, cfg.pad_token_id), grid


def _normalised(raw: np.ndarray) -> np.ndarray:
    """uint8 [n, patch_dim] patch rows -> the processor's normalised float32 values (a patch row's columns
    are channel-major, docs/qwen2vl.md §2.1)."""
    from qwen2vl_jax.data import media

    table = media.normalization_table()                          # [3, 256]
    channel = np.arange(raw.shape[-1]) // (raw.shape[-1] // 3)   # [patch_dim]
    return table[channel[None, :], raw]


def _random_patches(rng, n: int, patch_dim: int) -> np.ndarray:
    """float32 [n, patch_dim]: normalised random pixels, as the processor hands them to the packer."""
    return _normalised(rng.integers(0, 256, (n, patch_dim)))


def param_counts(cfg) -> tuple[int, int]:
    """(vision params incl. merger, decoder params incl. embeddings and lm_head)."""
    import jax

    from qwen2vl_jax.train import memory
    abstract = memory.abstract_params(cfg)
    n = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))  # noqa: E731
    return n(abstract["visual"]), n(abstract) - n(abstract["visual"])


def peak_for(kind: str, override: float | None) -> float | None:
    return override * 1e12 if override else chips.peak_flops(kind)


def _time(step: Callable[[], float], steps: int, warmup: int) -> tuple[float, float]:
    """(median seconds of `steps` timed calls after `warmup` calls, loss of the first call)."""
    first = step()
    for _ in range(max(0, warmup - 1)):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


# ---------------------------------------------------------------------------------------------
# JAX

def jax_side(cfg, params_host, rows: dict, steps: int, warmup: int, peak: float | None) -> Result:
    import jax

    from qwen2vl_jax.train import optim, sharding, train_step
    device = jax.devices()[0]
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1), [device])
    step_cfg = train_step.StepConfig(optim=optim.OptimConfig(total_steps=1000, warmup_steps=0))
    _, state_sh = train_step.abstract_state(cfg.replace(attention_impl="xla"), step_cfg, mesh)
    state = train_step.place_params(params_host, step_cfg, state_sh)
    batch_sh = sharding.batch_shardings(rows, mesh)
    batch = {k: jax.device_put(v, batch_sh[k]) for k, v in rows.items()}
    fn = train_step.make_train_step(cfg, step_cfg, mesh, state_sh, batch_sh)
    holder = {"state": state}

    def step():
        holder["state"], metrics = fn(holder["state"], batch)
        return float(metrics["loss"])          # blocks until the step is done

    dt, first = _time(step, steps, warmup)
    stats = device.memory_stats() or {}
    holder.clear()
    state = batch = None          # free the device buffers before the torch side runs
    return dt, first, stats.get("peak_bytes_in_use")


# ---------------------------------------------------------------------------------------------
# torch

def torch_side(cfg, params_host, rows: dict, grid: np.ndarray, steps: int, warmup: int):
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from qwen2vl_jax.model import hf
    from qwen2vl_jax.model.config import to_hf_config
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf_cfg = Qwen2VLConfig(**to_hf_config(cfg))
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(dev):
        model = Qwen2VLForConditionalGeneration(hf_cfg)
    for p in model.parameters():   # params only: buffers (inv_freq) stay fp32
        p.data = p.data.to(torch.bfloat16)
    sd = hf.params_to_hf_state_dict(cfg, params_host, dtype="bfloat16")
    own = {}
    for name in model.state_dict():
        disk = hf.on_disk_name(name)
        if disk in sd:
            own[name] = torch.from_numpy(np.asarray(sd[disk]).view(np.int16)).view(torch.bfloat16)
    missing = set(model.state_dict()) - set(own)
    if missing - {"lm_head.weight"} or ("lm_head.weight" in missing and not cfg.tie_word_embeddings):
        raise ValueError(f"weights missing for the torch model: {sorted(missing)[:5]}")
    model.load_state_dict(own, strict=False)
    model.tie_weights()
    model.train()
    model.gradient_checkpointing_disable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=True)
    B = rows["input_ids"].shape[0]
    ids = torch.from_numpy(rows["input_ids"]).long().to(dev)
    labels = torch.full_like(ids, -100)
    # ours: targets[s] (= ids[s+1]) supervised where loss_mask[s]; HF shifts labels by one itself
    sup = torch.from_numpy(rows["loss_mask"] > 0).to(dev)
    labels[:, 1:] = torch.where(sup[:, :-1], ids[:, 1:], labels[:, 1:])
    raw = rows["pixel_values"].reshape(-1, rows["pixel_values"].shape[-1])       # uint8: packed rows are raw
    pixels = torch.from_numpy(_normalised(raw)).to(dev, torch.bfloat16)
    thw = torch.from_numpy(np.concatenate([grid] * B)).to(dev)
    attn = torch.ones_like(ids)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        loss = model(input_ids=ids, attention_mask=attn, pixel_values=pixels, image_grid_thw=thw,
                     labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())            # synchronises

    dt, first = _time(step, steps, warmup)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    model = opt = None            # free the GPU memory before the next batch size
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return dt, first, peak, (torch.cuda.get_device_name() if dev.type == "cuda" else "cpu")


# ---------------------------------------------------------------------------------------------

def run(model: str = "2b", batch_sizes: Sequence[int] = (1, 2), steps: int = 10, warmup: int = 2,
        seq_len: int | None = None, images: int | None = None, image_px: int | None = None,
        attention: str | None = None, remat: str = "none", with_torch: bool = True,
        peak_tflops: float | None = None) -> list[Result]:
    import jax

    from qwen2vl_jax.model.config import get_config
    on_gpu = jax.default_backend() == "gpu"
    attention = attention or ("cudnn" if on_gpu else "xla")
    cfg = get_config(model, dtype="bfloat16", param_dtype="float32", attention_impl=attention, remat_policy=remat)
    s, n_img, px = GEOMETRY.get(model, DEFAULT_GEOMETRY)
    seq_len, images, image_px = seq_len or s, images or n_img, image_px or px
    row, grid = make_row(cfg, seq_len, images, image_px)
    n_vis, n_dec = param_counts(cfg)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):   # host copy: shared by both sides
        params = jax.device_get(jax.jit(lambda k: __import__("qwen2vl_jax.model.model").model.model.init_params(
            cfg.replace(attention_impl="xla"), k))(jax.random.key(0)))
    kind = jax.devices()[0].device_kind
    peak = peak_for(kind, peak_tflops)
    results = []
    for B in batch_sizes:
        rows = {k: np.stack([v] * B) for k, v in row.items()}
        tokens, patches = B * seq_len, B * row["pixel_values"].shape[0]
        flops = 6.0 * (n_dec * tokens + n_vis * patches)
        if with_torch:
            dt, first, mem, tkind = torch_side(cfg, params, rows, grid, steps, warmup)
            results.append(Result("torch sdpa bf16", B, dt, tokens, patches, flops, peak_for(tkind, peak_tflops),
                                  mem, first))
        dt, first, mem = jax_side(cfg, params, rows, steps, warmup, peak)
        results.append(Result(f"jax {attention} bf16/fp32-master", B, dt, tokens, patches, flops, peak, mem, first))
    print(f"model {model}: {n_vis:,} vision + {n_dec:,} decoder params; row = {seq_len} tokens, {images} images "
          f"of {image_px}px ({row['pixel_values'].shape[0]} patches); device {kind}; remat {remat}")
    print(format_table(results))
    return results


def format_table(results: Sequence[Result]) -> str:
    lines = ["| side | batch | step s | tokens/s | model TFLOP/s | MFU | peak GB | first loss |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        mfu = "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%"
        mem = "n/a" if r.peak_bytes is None else f"{r.peak_bytes / 1e9:.1f}"
        lines.append(f"| {r.side} | {r.batch} | {r.step_s:.3f} | {r.tokens_per_s:,.0f} | {r.model_tflops:.1f} | "
                     f"{mfu} | {mem} | {r.first_loss:.4f} |")
    return "\n".join(lines)


FLAGS = flags.FlagValues()
cli.define_model(FLAGS, default="2b")
flags.DEFINE_list("batch_sizes", ["1", "2"], "rows per step (comma list)", flag_values=FLAGS)
flags.DEFINE_integer("steps", 10, "timed steps", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("warmup", 2, "untimed steps (the first compiles)", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("seq_len", None, "tokens per row (default 4096; 256 for test)", flag_values=FLAGS)
flags.DEFINE_integer("images", None, "images per row (default 4)", flag_values=FLAGS)
flags.DEFINE_integer("image_px", None, "image side in pixels (default 448)", flag_values=FLAGS)
flags.DEFINE_enum("attention", None, ATTENTION_IMPLS, "attention_impl (default cudnn on GPU, xla elsewhere)",
                  flag_values=FLAGS)
flags.DEFINE_enum("remat", "none", REMAT_POLICIES, "remat policy of the JAX model", flag_values=FLAGS)
flags.DEFINE_bool("torch", True, "also time the transformers model", flag_values=FLAGS)
flags.DEFINE_float("peak_tflops", None, "dense bf16 peak per device (default from the device kind)",
                   flag_values=FLAGS)


def main(argv) -> None:
    cli.parse(FLAGS, argv, __doc__)
    F = FLAGS
    run(F.model, [int(b) for b in F.batch_sizes], F.steps, F.warmup, F.seq_len, F.images, F.image_px,
        F.attention, F.remat, F.torch, F.peak_tflops)


if __name__ == "__main__":
    cli.run(main)
