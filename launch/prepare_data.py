"""Vision-language corpora -> the ArrayRecord dataset a run trains and evaluates on.

    python -m launch.prepare_data --input=data.json --out=DATA [--format=llava] [--heldout=N] [--workers=0]
    python -m launch.pretrain --experiment=stage3 --set 'data.mixture=(("arrayrecord:DATA", 1.0),)'

    # the same import as an Apache Beam pipeline (requirements-beam.txt), here or on Dataflow's workers:
    python -m launch.prepare_data --input=gs://B/shards/*.tar --out=gs://B/DATA --num_shards=1024 --engine=beam \
        --runner=DataflowRunner --beam_options="--project=P --region=us-central1 --temp_location=gs://B/tmp \
        --setup_file=./pyproject.toml --max_num_workers=100"
    # or N hosts, each importing one part (the last to finish writes summary.json):
    python -m launch.prepare_data --input=... --out=gs://B/DATA --num_shards=N --shard_index=i

--format (detected from the files when not given; the detection is printed):
  llava       LLaVA JSON / JSONL: "image" | "images", "video", "conversations" [{"from": "human" | "gpt", "value"}]
              with one "<image>" / "<video>" placeholder per medium
  messages    chat JSON / JSONL: "messages" [{"role", "content"}] (content a string with placeholders plus
              "images" / "videos" lists, or a list of {"type": "text" | "image" | "video", ...} parts)
  webdataset  img2dataset tar shards: KEY.jpg|jpeg|png|webp + KEY.txt and/or KEY.json (caption records)
  parquet     Hugging Face datasets' Parquet: {"bytes", "path"} image structs with a text column (captions) or
              "messages" / "conversations" columns, or interleaved web documents (OBELICS / MINT-1T:
              "texts" + "images" lists)
  mmc4        MMC4 JSON lines: "text_list" + "image_info" (interleaved web documents; images under --media_root)
  manifest    this project's JSONL manifest (docs/data_formats.md)
--input is a file, a glob or a folder, local or gs://; relative media paths are resolved against --media_root
(default: the input file's folder; gs:// too). Interleaved documents drop (and count) or reject an image that
is a URL, missing or broken (--missing_images). Every record is decoded, preprocessed and tokenized as the run
given by --experiment / --model / --set would (its tokenizer, pixel budgets, video sampling and row size), on
--workers processes with a progress bar; what training would skip is rejected here and counted per reason with
an example, and a dataset without one usable record is an error.

Writes DATA/train/*.array_record, DATA/heldout/*.array_record (--heldout=N records spread over the input;
held-out evaluation reads them), DATA/summary.json (counts, rejections, tokens per sample, pixels per image)
and DATA/summary.png (their histograms). A re-run with the same inputs and settings does nothing; with
others it refuses; --overwrite imports again and replaces the dataset once the new one is complete.
--out=gs://BUCKET/PATH writes each shard to the bucket as it completes (one shard at a time on local disk);
training reads it as "arrayrecord:gs://BUCKET/PATH" through a gcsfuse mount (launch.tpu sets that up).
--engine=beam writes the same records, shard by shard byte for byte (qwen2vl_jax/data/beam_import.py).
"""
from __future__ import annotations

import logging
import sys

from absl import flags

from experiments import flags as cli
from experiments import registry
from qwen2vl_jax.data import importers, prepare

FLAGS = flags.FlagValues()

flags.DEFINE_string("input", None, "input file, glob or folder", flag_values=FLAGS)
flags.DEFINE_enum("format", "auto", ["auto", *importers.FORMATS], "input format (auto: detected from the files)",
                  flag_values=FLAGS)
flags.DEFINE_string("out", None, "output folder (train/, heldout/, summary.json, summary.png)", flag_values=FLAGS)
flags.DEFINE_integer("heldout", 0, "records for the held-out split, spread evenly over the input",
                     lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("num_shards", 1, "ArrayRecord shards of the train split", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("shard_index", None, "write only train shard i of --num_shards (a part of a sharded run: N hosts "
                     "with --shard_index=0..N-1 write what one run writes; the last to finish writes summary.json)",
                     lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer("workers", 0, "worker processes (0: one per available core)", lower_bound=0,
                     flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "import again and replace the dataset in --out (once the new one is complete)",
                  flag_values=FLAGS)
flags.DEFINE_string("media_root", "", "folder of relative media paths ('': each input file's folder)",
                    flag_values=FLAGS)
flags.DEFINE_list("ignore_fields", [], "record fields (metadata) to drop instead of rejecting the record",
                  flag_values=FLAGS)
flags.DEFINE_string("image_column", "", "Parquet caption rows: the image column ('': the one column of image structs)",
                    flag_values=FLAGS)
flags.DEFINE_string("text_column", "", f"Parquet caption rows: the text column ('': the first of "
                                       f"{', '.join(importers.TEXT_COLUMNS)})", flag_values=FLAGS)
flags.DEFINE_string("prompt_column", "", "Parquet caption rows: an unsupervised prompt column", flag_values=FLAGS)
flags.DEFINE_enum("missing_images", "drop", list(importers.MISSING_IMAGES), "interleaved documents: an image that "
                  "is a URL, missing or broken is dropped with its place (counted) or rejects the document",
                  flag_values=FLAGS)
flags.DEFINE_bool("progress", True, "progress bar on stderr", flag_values=FLAGS)
flags.DEFINE_enum("engine", "local", ["local", "beam"], "local: this machine's --workers processes (a part of a "
                  "sharded run with --shard_index); beam: an Apache Beam pipeline on --runner", flag_values=FLAGS)
flags.DEFINE_string("runner", "DirectRunner", "--engine=beam: DirectRunner (this machine, --workers processes), "
                    "PrismRunner or DataflowRunner", flag_values=FLAGS)
flags.DEFINE_string("beam_options", "", "--engine=beam: Beam pipeline options, as one string (e.g. \"--project=P "
                    "--region=us-central1 --temp_location=gs://B/tmp --setup_file=./pyproject.toml\")",
                    flag_values=FLAGS)
cli.define_experiment(FLAGS, default="stage3")
cli.define_model(FLAGS, default="2b", help="model size preset whose tokenizer, pixel budgets and row size the "
                                           "records are checked against")
cli.define_set(FLAGS, "the experiment the records are checked against (e.g. tokenizer=qwen2, "
                      "data.image_max_pixels=1003520)")
flags.mark_flags_as_required(["input", "out"], flag_values=FLAGS)


def main(argv) -> int:
    cli.parse(FLAGS, argv, __doc__)
    if FLAGS.engine == "local" and (FLAGS.runner != "DirectRunner" or FLAGS.beam_options):
        raise ValueError(f"--runner={FLAGS.runner} / --beam_options={FLAGS.beam_options!r} need --engine=beam "
                         "(valid engines: local, beam)")
    if FLAGS.engine == "beam" and FLAGS.shard_index is not None:
        raise ValueError(f"--shard_index={FLAGS.shard_index} is for --engine=local (N hosts, one part each); "
                         "--engine=beam imports the whole input on its runner's workers")
    exp = registry.get_experiment(FLAGS.experiment, FLAGS.model, FLAGS.set)
    files = importers.resolve_inputs(FLAGS.input, FLAGS.format)
    fmt = FLAGS.format
    if fmt == "auto":
        fmt = importers.detect_format(files)
        print(f"format: {fmt} (detected from {len(files)} file(s); --format chooses)", file=sys.stderr)
    opts = importers.ImportOptions(fmt, media_root=FLAGS.media_root, ignore_fields=tuple(FLAGS.ignore_fields),
                                   image_column=FLAGS.image_column, text_column=FLAGS.text_column,
                                   prompt_column=FLAGS.prompt_column, missing_images=FLAGS.missing_images)
    out = FLAGS.out
    target = prepare.Target(exp.model, exp.data, exp.tokenizer)
    try:
        if FLAGS.engine == "beam":
            if FLAGS.runner == "DirectRunner":         # Beam's per-stage INFO lines; a cluster's job link stays
                logging.getLogger("apache_beam").setLevel(logging.WARNING)
            from qwen2vl_jax.data import beam_import       # apache-beam: requirements-beam.txt
            summary = beam_import.import_beam(files, out, opts=opts, target=target, heldout=FLAGS.heldout,
                                              num_shards=FLAGS.num_shards, overwrite=FLAGS.overwrite,
                                              runner=FLAGS.runner, pipeline_args=FLAGS.beam_options,
                                              workers=FLAGS.workers)
        else:
            summary = prepare.prepare(files, out, opts=opts, target=target, heldout=FLAGS.heldout,
                                      num_shards=FLAGS.num_shards, shard_index=FLAGS.shard_index,
                                      workers=FLAGS.workers, overwrite=FLAGS.overwrite, progress=FLAGS.progress)
    except OSError as e:        # unreadable inputs, an unwritable --out
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    print(prepare.format_summary(summary, out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main)
