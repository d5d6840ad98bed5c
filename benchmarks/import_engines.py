"""launch.prepare_data's two engines on real photographs: records/s per core of the local engine (prepare.py, one
worker process) and of the Apache Beam pipeline on the DirectRunner (beam_import.py, one in-process worker).

    python -m benchmarks.import_engines [--records=400] [--repeats=3] [--model=2b --stage=2] [--core=0] [--shards=4]

The corpus is img2dataset's layout (WebDataset tars of KEY.jpg + KEY.txt + KEY.json, 100 samples per tar), the
way caption corpora of hundreds of millions of pairs ship: each image a random crop (40..100% of each side,
seeded) of one of scikit-image's bundled photographs (the colour ones: astronaut, coffee, chelsea, rocket,
hubble_deep_field, immunohistochemistry, retina; the grey ones as RGB: camera, coins, moon, grass, gravel, brick,
clock), JPEG quality 90, with an 8..32-word caption. Each engine imports it at the stage's config (tokenizer,
pixel budgets, row size) pinned to one core, --repeats times, alternating; per core = records / CPU seconds of
this process and its children (the Beam DirectRunner in in_memory mode runs its worker in this process), which
other processes sharing the core inflate less than wall time (not at all only on a machine without shared
hyperthreads); wall time includes each engine's start-up. The outputs are checked equal, file by file.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy loads
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks.data_pipeline import _caption, pin_to_core  # noqa: E402
from experiments import flags as cli  # noqa: E402

FLAGS = flags.FlagValues()

COLOUR = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
GREY = ("camera", "coins", "moon", "grass", "gravel", "brick", "clock")
PER_TAR = 100


def photographs() -> list[np.ndarray]:
    """uint8 [H, W, 3] each: scikit-image's bundled photographs (grey ones repeated over 3 channels)."""
    import skimage.data
    out = [np.ascontiguousarray(getattr(skimage.data, n)()) for n in COLOUR]
    out += [np.repeat(getattr(skimage.data, n)()[..., None], 3, axis=-1) for n in GREY]
    return out


def write_corpus(folder: str, records: int, seed: int = 0) -> dict:
    """img2dataset tars of `records` random crops of the photographs; returns {"images", "mean_pixels",
    "mean_jpeg_bytes"}."""
    rng = np.random.default_rng(seed)
    photos = photographs()
    pixels, sizes = [], []
    for t in range(0, records, PER_TAR):
        with tarfile.open(os.path.join(folder, f"{t // PER_TAR:05d}.tar"), "w") as tf:
            for k in range(t, min(t + PER_TAR, records)):
                photo = photos[int(rng.integers(len(photos)))]
                h, w = photo.shape[:2]
                ch, cw = (int(s * rng.uniform(0.4, 1.0)) for s in (h, w))
                y, x = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
                buf = io.BytesIO()
                PIL.Image.fromarray(photo[y:y + ch, x:x + cw]).save(buf, format="JPEG", quality=90)
                caption = _caption(rng)
                meta = {"key": f"{k:09d}", "status": "success", "width": cw, "height": ch, "caption": caption}
                for name, data in ((f"{k:09d}.jpg", buf.getvalue()), (f"{k:09d}.txt", caption.encode()),
                                   (f"{k:09d}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                pixels.append(ch * cw)
                sizes.append(len(buf.getvalue()))
    return {"images": records, "mean_pixels": float(np.mean(pixels)), "mean_jpeg_bytes": float(np.mean(sizes))}


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (a runner's workers, if any)."""
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _files(out: str) -> dict[str, bytes]:
    got = {}
    for split in ("train", "heldout"):
        d = os.path.join(out, split)
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            with open(os.path.join(d, name), "rb") as f:
                got[f"{split}/{name}"] = f.read()
    return got


def main(argv) -> None:
    cli.parse(FLAGS, argv, __doc__)
    pin_to_core(FLAGS.core)
    from experiments import stages
    from qwen2vl_jax.data import beam_import, importers, prepare

    exp = stages.stage_experiment(FLAGS.stage, FLAGS.model)
    tok = "embedded" if FLAGS.model in ("tiny", "test") else "qwen2"
    target = prepare.Target(exp.model, exp.data, tok)
    opts = importers.ImportOptions("webdataset")
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "in"))
        corpus = write_corpus(os.path.join(d, "in"), FLAGS.records)
        print(f"{FLAGS.records} JPEG crops of {len(COLOUR) + len(GREY)} real photographs (mean "
              f"{corpus['mean_pixels'] / 1e3:.0f} kpixels, {corpus['mean_jpeg_bytes'] / 1e3:.0f} KB) in "
              f"{-(-FLAGS.records // PER_TAR)} img2dataset tars; {FLAGS.model} stage {FLAGS.stage} checks ({tok} "
              f"tokenizer, images <= {exp.data.image_max_pixels} px), {FLAGS.shards} train shards, 10 held out")
        labels = {"local": "local engine (1 worker process)", "beam": "Beam DirectRunner (in_memory, 1 worker)"}
        runs: dict = {e: [] for e in labels}
        outputs = {}
        for r in range(FLAGS.repeats):            # alternating, so both see the same load over time
            for engine in labels:
                out = os.path.join(d, f"{engine}{r}")
                cpu0, t0 = _cpu_seconds(), time.time()
                if engine == "local":
                    s = prepare.prepare(os.path.join(d, "in"), out, opts=opts, target=target, heldout=10,
                                        num_shards=FLAGS.shards, workers=1, progress=False)
                else:
                    s = beam_import.import_beam(os.path.join(d, "in"), out, opts=opts, target=target, heldout=10,
                                                num_shards=FLAGS.shards, workers=1, stream=open(os.devnull, "w"))
                runs[engine].append((s["records"], time.time() - t0, _cpu_seconds() - cpu0))
                outputs[engine] = _files(out)
            if outputs["local"] != outputs["beam"]:
                raise RuntimeError("the engines wrote different files")
    print(f"  {'engine':42s} {'records':>7s} {'rec/s/core (median, min..max)':>30s} {'rec/s wall (median)':>20s}")
    for engine, label in labels.items():
        per_core = sorted(n / cpu for n, _, cpu in runs[engine])
        wall = float(np.median([n / w for n, w, _ in runs[engine]]))
        print(f"  {label:42s} {runs[engine][0][0]:>7d} {np.median(per_core):>14.1f} "
              f"({per_core[0]:.1f}..{per_core[-1]:.1f}) {wall:>20.1f}")
    print(f"  ({FLAGS.repeats} runs each, alternating; outputs identical file by file)")


flags.DEFINE_integer("records", 400, "image-text pairs in the corpus", lower_bound=20, flag_values=FLAGS)
flags.DEFINE_integer("core", 0, "CPU core to pin this process to", lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("shards", 4, "train shards", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "runs of each engine (alternating; the median is reported)", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("stage", 2, "the stage whose config the records are checked against", lower_bound=1,
                     upper_bound=3, flag_values=FLAGS)
flags.DEFINE_enum("model", "2b", ["test", "tiny", "2b", "7b", "72b"], "model size preset", flag_values=FLAGS)


if __name__ == "__main__":
    cli.run(main)
