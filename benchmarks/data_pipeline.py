"""Data-pipeline throughput per CPU core.

    python -m benchmarks.data_pipeline [--images=50] [--rounds=3] [--core=0] [--skip_pipeline] [--skip_e2e]
        [--e2e_model=2b --e2e_stage=2 --chips=4 --chip=v5p --mfu=0.5]

Part 1: images/s and patches/s of ``qwen2vl_jax.data.media.preprocess_images`` vs transformers 4.57.6
``Qwen2VLImageProcessor`` (the slow PIL one) on the same seeded mix of sizes (64x64 .. 1500x1000), one image
per call as a loader does, single process pinned to one core. Both outputs are checked equal first. The last
row times the PIL bicubic resize alone (the same call both make; bit-exact pixels need it): its speedup is the
ceiling of any preprocessor that keeps it, reached only if everything else were free.
Part 2 (hook at the end): the full Grain pipeline (``qwen2vl_jax.data.pipeline.make_iterator`` on the synthetic
mixture: decode -> tokenize -> preprocess -> pack -> batch) samples/s and tokens/s per core and packing
efficiency; prints "pipeline: not available" if that module cannot be imported.
Part 3 (end to end): an ArrayRecord dataset of JPEG bytes, made by launch.prepare_data's library, read by the
training pipeline at a stage's config (decode -> preprocess -> tokenize -> pack): tokens/s per core, beside what
--chips chips at --mfu consume per second (train/flops.py), i.e. how many host cores keep one host's chips fed.
"""

from __future__ import annotations

import os
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy/torch load
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
from absl import flags  # noqa: E402

from experiments import flags as cli  # noqa: E402

FLAGS = flags.FlagValues()


def make_images(count: int, seed: int = 0) -> list[PIL.Image.Image]:
    """A seeded mix: side lengths log-uniform in [64, 1500], a few squares and landscape/portrait photos."""
    rng = np.random.default_rng(seed)
    images = []
    for k in range(count):
        if k % 5 == 0:
            h = w = int(rng.integers(64, 512))
        else:
            h, w = (int(v) for v in np.exp(rng.uniform(np.log(64), np.log(1500), 2)))
            h = min(h, 1000) if w >= h else h  # photos up to 1500x1000 either way
            w = min(w, 1000) if h > w else w
        # smooth content plus noise (resize cost does not depend on content, but keep it image-like)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], axis=-1)
        noise = rng.integers(0, 32, (h, w, 3))
        images.append(PIL.Image.fromarray(((base + noise) % 256).astype(np.uint8)))
    return images


def _cpu_seconds_per_image(fn, images, rounds: int) -> np.ndarray:
    """float64 [num_images]: best-of-rounds CPU seconds of one call per image. CPU time of this process (pinned to
    one core) is the per-core cost and is not inflated by other processes sharing the core; wall time is too."""
    best = np.full(len(images), np.inf)
    for _ in range(rounds):
        for k, image in enumerate(images):
            start = time.process_time()
            fn(image)
            best[k] = min(best[k], time.process_time() - start)
    return best


def bench_images(count: int, rounds: int, min_pixels: int, max_pixels: int) -> None:
    import torch  # transformers imports it; keep it to one thread

    torch.set_num_threads(1)
    from transformers import Qwen2VLImageProcessor

    from qwen2vl_jax.data.media import FACTOR, preprocess_images, smart_resize

    images = make_images(count)
    processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)

    def ours(image):
        return preprocess_images([image], min_pixels=min_pixels, max_pixels=max_pixels)

    def resize_only(image):  # the PIL bicubic call both processors make (bit-exactness needs it): the ceiling
        h, w = smart_resize(image.height, image.width, FACTOR, min_pixels, max_pixels)
        return image if image.size == (w, h) else image.resize((w, h), resample=PIL.Image.Resampling.BICUBIC)

    def reference(image):
        out = processor(images=[image], return_tensors="np", input_data_format="channels_last")
        return out["pixel_values"], out["image_grid_thw"]

    patches = np.zeros(count, dtype=np.int64)
    for k, image in enumerate(images):  # equality first, and warm-up
        pv, grid = ours(image)
        ref_pv, ref_grid = reference(image)
        assert np.array_equal(grid, ref_grid) and np.abs(pv - ref_pv).max() <= 1e-5, image.size
        patches[k] = pv.shape[0]
    wall = time.perf_counter()
    t_ours = _cpu_seconds_per_image(ours, images, rounds)
    t_ref = _cpu_seconds_per_image(reference, images, rounds)
    t_resize = _cpu_seconds_per_image(resize_only, images, rounds)
    wall = time.perf_counter() - wall
    sizes = [im.size for im in images]
    print(
        f"images: {count} (w x h from {min(sizes)} to {max(sizes)}), pixels in [{min_pixels}, {max_pixels}], "
        f"{patches.sum()} patches of 1176; "
        f"best of {rounds} rounds, CPU time of one pinned process ({wall:.1f} s wall)"
    )
    print(f"{'preprocessor':<36}{'images/s/core':>15}{'patches/s/core':>16}{'ms/image':>10}{'speedup':>9}")
    for name, seconds in (("transformers Qwen2VLImageProcessor", t_ref), ("qwen2vl_jax preprocess_images", t_ours)):
        total = seconds.sum()
        print(
            f"{name:<36}{count / total:>15.1f}{patches.sum() / total:>16.0f}{1e3 * total / count:>10.2f}"
            f"{t_ref.sum() / total:>8.2f}x"
        )
    pixels = np.array([w * h for w, h in sizes])
    for label, mask in (("  inputs < 256x256 px", pixels < 256 * 256), ("  inputs >= 256x256 px", pixels >= 256 * 256)):
        if mask.any():
            speedup = t_ref[mask].sum() / t_ours[mask].sum()
            print(f"{label:<36}{'':>41}{speedup:>8.2f}x  ({mask.sum()} images)")
    resize_ms, ceiling = 1e3 * t_resize.sum() / count, t_ref.sum() / t_resize.sum()
    print(
        f"{'PIL bicubic resize alone':<36}{'':>31}{resize_ms:>10.2f}{ceiling:>8.2f}x  (ceiling for bit-exact "
        f"pixels: {100 * t_resize.sum() / t_ours.sum():.0f}% of ours, {100 * t_resize.sum() / t_ref.sum():.0f}% of HF)"
    )


# ============================================================================================================
# HOOK: full Grain pipeline (qwen2vl_jax.data.pipeline, written separately). Reports samples/s, tokens/s per
# core and packing efficiency when the module is importable; prints "pipeline: not available" otherwise.
# ============================================================================================================


PIPELINE_MIXTURE = (("synthetic:caption", 2.0), ("synthetic:ocr", 1.0), ("synthetic:grounding", 1.0),
                    ("synthetic:interleaved", 1.0), ("synthetic:video", 1.0), ("synthetic:chat", 1.0))


def bench_pipeline(seconds: float, model: str, batch_size: int, seq_len: int, max_patches: int) -> None:
    """make_iterator over the synthetic mixture, in-process (num_workers=0, its decode threads share the pinned
    core): batches until ``seconds`` of CPU time are spent; rates per CPU second of this process."""
    try:
        from qwen2vl_jax.model.config import get_config
        from qwen2vl_jax.data import pipeline, tokenizer
    except ImportError as e:
        print(f"pipeline: not available ({e})")
        return
    model_cfg = get_config(model)
    data_cfg = pipeline.DataConfig(mixture=PIPELINE_MIXTURE, seq_len=seq_len, max_patches=max_patches, num_workers=0)
    it = pipeline.make_iterator(data_cfg, model_cfg, tokenizer.load_tokenizer("embedded"), batch_size=batch_size)
    try:
        next(it)  # start-up (threads, first decodes) not counted
        base = it.stats()
        cpu0, wall0, batches = time.process_time(), time.perf_counter(), 0
        while time.process_time() - cpu0 < seconds:
            next(it)
            batches += 1
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        st = it.stats()
    finally:
        it.close()
    samples = st["samples_packed"] - base["samples_packed"]
    tokens = st["real_tokens"] - base["real_tokens"]
    token_eff = tokens / (st["total_tokens"] - base["total_tokens"])
    patch_eff = (st["real_patches"] - base["real_patches"]) / (st["total_patches"] - base["total_patches"])
    print(
        f"pipeline ({model} config, {len(PIPELINE_MIXTURE)} synthetic kinds, batch {batch_size}x{seq_len} tokens, "
        f"{max_patches} patches/row, {batches} batches, {cpu:.1f} s CPU / {wall:.1f} s wall):\n"
        f"  {samples / cpu:.1f} samples/s/core, {tokens / cpu:.0f} real tokens/s/core, "
        f"packing efficiency {100 * token_eff:.1f}% tokens, {100 * patch_eff:.1f}% patches, "
        f"skipped {st['skipped'] - base['skipped']:.0f}"
    )


# ============================================================================================================
# End to end: ArrayRecord of JPEG bytes -> decode -> preprocess -> tokenize -> pack, against what the chips eat
# ============================================================================================================

_WORDS = ("a photo of the red old small city street near two people with dog on green park under blue sky "
          "and white building in front at night beach wooden table modern kitchen mountain lake").split()


def _caption(rng: np.random.Generator) -> str:
    """A web-caption-like sentence of 8..32 words (LAION alt-texts are mostly in this range)."""
    return " ".join(_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), int(rng.integers(8, 33))))


def bench_end_to_end(count: int, seconds: float, stage: int, model: str, chips: int, chip: str, mfu: float) -> None:
    """The training read path of real-shaped data at a stage's config, per core, beside the chips' appetite.

    `count` seeded images (make_images: 64..1500 px) saved as JPEG (quality 90) with web-like captions are
    imported by prepare (launch.prepare_data's library; 1 worker = this pinned process) into an ArrayRecord
    dataset; then pipeline.make_iterator (num_workers=0: decode threads share the pinned core) reads it at the
    stage's row size, pixel budgets and tokenizer (qwen2 for paper sizes) until `seconds` of CPU time are spent.
    The chips consume packed positions at chips * peak * mfu / (model FLOPs per position of these very
    batches, flops.batch_flops with the stage's trainable parts); their ratio is the host cores it takes."""
    import dataclasses
    import tempfile

    from experiments import stages
    from qwen2vl_jax.data import importers, pipeline, prepare, tokenizer
    from qwen2vl_jax.train import flops

    exp = stages.stage_experiment(stage, model)
    tok_name = "embedded" if model in ("tiny", "test") else "qwen2"
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as d:
        lines = []
        for k, image in enumerate(make_images(count, seed=1)):
            image.save(os.path.join(d, f"{k}.jpg"), format="JPEG", quality=90)
            lines.append(f'{{"type": "caption", "images": ["{k}.jpg"], "text": "{_caption(rng)}"}}\n')
        with open(os.path.join(d, "data.jsonl"), "w") as f:
            f.writelines(lines)
        out = os.path.join(d, "out")
        cpu0 = time.process_time()
        summary = prepare.prepare(os.path.join(d, "data.jsonl"), out, opts=importers.ImportOptions("manifest"),
                                  target=prepare.Target(exp.model, exp.data, tok_name), workers=1, progress=False)
        import_cpu = time.process_time() - cpu0
        data_cfg = dataclasses.replace(exp.data, mixture=((f"arrayrecord:{out}", 1.0),), num_workers=0)
        it = pipeline.make_iterator(data_cfg, exp.model, tokenizer.load_tokenizer(tok_name), batch_size=1)
        try:
            next(it)  # start-up (threads, first decodes) not counted
            base = it.stats()
            cpu0, batches, model_flops = time.process_time(), 0, 0.0
            while time.process_time() - cpu0 < seconds:
                batch = next(it)
                batches += 1
                model_flops += flops.batch_flops(exp.model, batch, exp.trainable).total
            cpu = time.process_time() - cpu0
            st = it.stats()
        finally:
            it.close()
    samples = st["samples_packed"] - base["samples_packed"]
    tokens = st["real_tokens"] - base["real_tokens"]
    positions = st["total_tokens"] - base["total_tokens"]
    peak = flops.PEAK_FLOPS[chip]
    appetite = chips * peak * mfu / (model_flops / positions)         # packed positions per second
    per_core = positions / cpu
    tps = summary["tokens_per_sample"]
    print(
        f"end to end ({model} stage {stage} config: {exp.data.seq_len} tokens x {exp.data.max_patches} patches per "
        f"row, images <= {exp.data.image_max_pixels} px, {tok_name} tokenizer; {count} JPEG images 64..1500 px "
        f"with 8..32-word captions, {tps['mean']:.0f} tokens per sample)\n"
        f"  import (prepare_data, 1 core)        {summary['records'] / import_cpu:>8.1f} records/s/core\n"
        f"  ArrayRecord -> decode -> preprocess -> tokenize -> pack ({batches} rows, {cpu:.1f} s CPU):\n"
        f"    {samples / cpu:>8.1f} samples/s/core, {tokens / cpu:>9.0f} real tokens/s/core, "
        f"{per_core:>9.0f} positions/s/core (packing {100 * tokens / positions:.1f}%)\n"
        f"  {chips} {chip} chips at {100 * mfu:.0f}% MFU consume {appetite:>9.0f} positions/s "
        f"({model_flops / positions / 1e9:.2f} GFLOP per position, trainable {'+'.join(exp.trainable)})\n"
        f"  -> {appetite / per_core:.1f} host cores keep them fed"
    )


flags.DEFINE_integer("images", 50, "images in the seeded mix", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("rounds", 3, "timing rounds (best of)", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("core", 0, "CPU core to pin this process to", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("min_pixels", 56 * 56, "HF class default", flag_values=FLAGS)
flags.DEFINE_integer("max_pixels", 28 * 28 * 1280, "HF class default; the checkpoints use 12845056", flag_values=FLAGS)
flags.DEFINE_float("pipeline_seconds", 20.0, "CPU seconds of pipeline batches", flag_values=FLAGS)
flags.DEFINE_string("pipeline_model", "test", "model preset for the pipeline hook", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 4, "pipeline rows per batch", flag_values=FLAGS)
flags.DEFINE_integer("seq_len", 2048, "pipeline tokens per row", flag_values=FLAGS)
flags.DEFINE_integer("max_patches", 8192, "pipeline patch rows per row", flag_values=FLAGS)
flags.DEFINE_bool("skip_pipeline", False, "time the image preprocessors only", flag_values=FLAGS)
flags.DEFINE_integer("e2e_images", 200, "end to end: JPEG images in the ArrayRecord dataset", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_float("e2e_seconds", 20.0, "end to end: CPU seconds of pipeline rows", flag_values=FLAGS)
flags.DEFINE_integer("e2e_stage", 2, "end to end: the stage whose config is read", lower_bound=1, upper_bound=3,
                     flag_values=FLAGS)
flags.DEFINE_enum("e2e_model", "2b", ["test", "tiny", "2b", "7b", "72b"], "end to end: model size preset",
                  flag_values=FLAGS)
flags.DEFINE_integer("chips", 4, "end to end: accelerator chips of one host", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum("chip", "v5p", ["h100", "h200", "v5p", "v5e", "v4"], "end to end: chip (flops.PEAK_FLOPS)",
                  flag_values=FLAGS)
flags.DEFINE_float("mfu", 0.5, "end to end: model FLOPs utilisation the chips reach", flag_values=FLAGS)
flags.DEFINE_bool("skip_e2e", False, "skip the end-to-end row", flag_values=FLAGS)


def pin_to_core(core: int) -> None:
    """This process on one core (its CPU time is then the per-core cost); exits with a one-line error for a core
    the machine does not have."""
    if core >= (os.cpu_count() or 1):
        print(f"ERROR: --core={core}; valid: 0..{(os.cpu_count() or 1) - 1}", file=sys.stderr)
        sys.exit(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    print(f"pinned to core {core} of {os.cpu_count()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def main(argv) -> None:
    cli.parse(FLAGS, argv, __doc__)
    pin_to_core(FLAGS.core)
    bench_images(FLAGS.images, FLAGS.rounds, FLAGS.min_pixels, FLAGS.max_pixels)
    if not FLAGS.skip_pipeline:
        bench_pipeline(FLAGS.pipeline_seconds, FLAGS.pipeline_model, FLAGS.batch_size, FLAGS.seq_len,
                       FLAGS.max_patches)
    if not FLAGS.skip_e2e:
        bench_end_to_end(FLAGS.e2e_images, FLAGS.e2e_seconds, FLAGS.e2e_stage, FLAGS.e2e_model, FLAGS.chips,
                         FLAGS.chip, FLAGS.mfu)


if __name__ == "__main__":
    cli.run(main)
