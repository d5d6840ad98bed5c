"""Checkpoint conversion between a transformers Qwen2-VL folder and our orbax checkpoints.

  python -m launch.convert --hf_to_jax SRC_HF_DIR DST_JAX_DIR [--param_dtype float32] [--overwrite]
  python -m launch.convert --jax_to_hf SRC DST_HF_DIR [--dtype bfloat16] [--max_shard_size 5GB]

--jax_to_hf reads a training run (RUN, RUN/checkpoints: its newest step that restores; RUN/checkpoints/STEP:
that step; the model config from RUN/model_config.json) or a converted checkpoint (model_config.json +
params/, the layout documented in qwen2vl_jax/model/hf.py). The folder it writes loads with
`Qwen2VLForConditionalGeneration.from_pretrained`; the run's tokenizer.json and, for a run fine-tuned from a
Hugging Face folder, that folder's processor files (tokenizer_config.json, preprocessor_config.json, chat
template, ...) are copied beside the weights, so `AutoProcessor.from_pretrained(DST)` works as it did there.
--hf_to_jax keeps the processor files in DST_JAX_DIR/processor/. A converted model config is named by its
architecture (the matching preset, e.g. "2b", else "custom"), never by the folder.
Training starts from either folder with `--set init_from=DIR` (launch.pretrain).
SRC and DST may be gs:// folders: a training run or converted checkpoint in a bucket is read there, a
Hugging Face SRC is copied to a local folder first, and a gs:// DST is written locally, then uploaded
(qwen2vl_jax/train/paths.py: staging_dir, upload_tree).
"""
from __future__ import annotations

import importlib.util
import os
import time

import jax
from absl import flags, logging

from experiments import flags as cli
from qwen2vl_jax.model import hf
from qwen2vl_jax.model.config import DTYPES
from qwen2vl_jax.train import checkpoint, paths, rundir

FLAGS = flags.FlagValues()
flags.DEFINE_bool("hf_to_jax", False, "SRC is a transformers folder, DST an orbax checkpoint folder",
                  flag_values=FLAGS)
flags.DEFINE_bool("jax_to_hf", False, "SRC is a training run (RUN, RUN/checkpoints, RUN/checkpoints/STEP) or a "
                  "converted checkpoint, DST a transformers folder", flag_values=FLAGS)
flags.DEFINE_enum("param_dtype", "float32", DTYPES, "--hf_to_jax: dtype of the stored params (master weights)",
                  flag_values=FLAGS)
flags.DEFINE_enum("dtype", None, DTYPES, "--jax_to_hf: dtype of the safetensors (default: the params' dtype)",
                  flag_values=FLAGS)
flags.DEFINE_string("max_shard_size", "5GB", "--jax_to_hf: largest safetensors shard, e.g. 5GB, 500MB, 2GiB",
                    flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "--hf_to_jax: replace an existing DST/params checkpoint", flag_values=FLAGS)


def _log(msg: str) -> None:
    print(msg, flush=True)


def convert(hf_to_jax: bool, src: str, dst: str, param_dtype: str = "float32", dtype: str | None = None,
            max_shard_size: str = "5GB", overwrite: bool = False) -> None:
    start = time.time()
    out = paths.staging_dir(dst) if paths.is_remote(dst) else dst      # a bucket: written here, then uploaded
    if hf_to_jax:
        folder = paths.local_copy(src) if paths.is_remote(src) else src
        cfg, params = hf.load_pretrained(folder, progress=_log, param_dtype=param_dtype)
        _log(f"writing orbax checkpoint {dst} (config {cfg.name!r}, param_dtype {cfg.param_dtype})")
        hf.save_jax_checkpoint(cfg, params, out, overwrite=overwrite)
        copied = hf.copy_processor_files(folder, os.path.join(out, rundir.PROCESSOR_DIR))
    else:
        loc = checkpoint.locate(src)
        if loc.kind == "hf":
            raise ValueError(f"{src} is already a Hugging Face folder (config.json); --jax_to_hf reads a training "
                             "run or a converted checkpoint")
        # on the host's CPU: a large model does not fit one accelerator, and the safetensors are written from host memory
        cfg, params = rundir.load_pretrained(src, device=jax.devices("cpu")[0])
        _log(f"read {src} (config {cfg.name!r}, param_dtype {cfg.param_dtype}); writing {dst}")
        files = hf.save_pretrained(cfg, params, out, max_shard_size=max_shard_size, dtype=dtype, progress=_log)
        processor = rundir.processor_dir(src)
        if processor and paths.is_remote(processor):
            processor = paths.local_copy(processor)
        copied = hf.copy_processor_files(processor, out) if processor else []
        _log(f"wrote {', '.join(files)}")
    if copied:
        _log(f"copied {', '.join(copied)}")
    if not hf_to_jax and "preprocessor_config.json" in copied and importlib.util.find_spec("torchvision") is None:
        _log(f"note: AutoProcessor.from_pretrained({dst}) needs torchvision for Qwen2-VL's video processor: "
             f"pip install {hf.TORCHVISION_PIN} (AutoTokenizer and AutoImageProcessor load without it)")
    if out != dst:
        _log(f"uploaded {paths.upload_tree(out, dst)} files from {out} to {dst}")
    _log(f"done in {time.time() - start:.1f}s: {src} -> {dst}")


def main(argv) -> None:
    src, dst = cli.parse(FLAGS, argv, __doc__, positional=("SRC", "DST"))
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    if FLAGS.hf_to_jax == FLAGS.jax_to_hf:
        raise ValueError("pass exactly one of --hf_to_jax / --jax_to_hf")
    if not paths.is_dir(src):
        raise ValueError(f"SRC {src!r} is not a folder")
    convert(FLAGS.hf_to_jax, src, dst, param_dtype=FLAGS.param_dtype, dtype=FLAGS.dtype,
            max_shard_size=FLAGS.max_shard_size, overwrite=FLAGS.overwrite)


if __name__ == "__main__":
    cli.run(main)
