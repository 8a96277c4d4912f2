"""``wit build``: gather -> pre-balance -> download -> dedup -> balance -> shards, resumable."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
examples:
  wit build --input 'crawl/*.warc.gz' --output out/build
  wit build --input laion_part_0.parquet --queries my-queries.txt --output out/build \\
      --config examples/build.yaml --set balance.t=5000 \\
      --eval-set cifar10=../shared/data/cifar10/test.parquet
  wit build ... --seed-model runs/raw/checkpoints/latest.pt --set score.keep_fraction=0.3
  wit build ... --runner DataflowRunner --project P --region R --temp_location gs://b/tmp

Steps (each a Beam pipeline; DIR/done/<step>.json marks it finished): gather, prebalance,
download, finalize (dedup + decontamination + balance + CLIP score + shards), report. A rerun
skips finished steps and resumes the first unfinished one; a rerun with other settings is
refused unless --overwrite (unchanged steps are then kept). Output: DIR/shards/ (open_clip
--train-data, HF datasets Parquet), DIR/stats.json, DIR/report.md, DIR/query_counts.parquet.
Unknown --flags are passed to Beam as pipeline options (docs/build.md).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "build",
        help="the whole pipeline: crawl files in, balanced and deduplicated training shards out",
        description=(
            "Build a WIT-style dataset end to end: gather query-matched pairs from crawls or "
            "tables, pre-balance, download, deduplicate and decontaminate, balance (MetaCLIP), "
            "optionally filter by CLIP score, and write webdataset shards with a report."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input",
        "-i",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="WARC/WAT files, URL/caption tables, directories or globs (local or fsspec URLs)",
    )
    p.add_argument(
        "--queries", "-q", metavar="FILE", help="query list (default: the shipped English list)"
    )
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="build directory")
    p.add_argument("--config", metavar="FILE", help="YAML/TOML build config (every stage)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set balance.t=5000 (repeatable)",
    )
    p.add_argument(
        "--allow-loopback",
        action="store_true",
        help="let the downloader reach 127.0.0.0/8 and ::1 (tests, the local demo)",
    )
    p.add_argument(
        "--eval-set",
        dest="eval_sets",
        action="append",
        default=[],
        metavar="SPEC",
        help="evaluation image set to decontaminate against, [NAME=]PATH[?col=value] "
        "(repeatable; adds to dedup.eval_sets)",
    )
    p.add_argument(
        "--seed-model",
        metavar="CKPT_OR_TAG",
        help="CLIP-score the balanced samples with this seed (a checkpoint or an open_clip tag; "
        "sets score.pretrained); filter with score.threshold or score.keep_fraction",
    )
    p.add_argument(
        "--seed-arch",
        metavar="NAME",
        help="architecture of the seed model (score.model; read from trainer checkpoints)",
    )
    p.add_argument("--runner", help="Beam runner (default FnApiRunner; DirectRunner, Dataflow)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild the steps whose settings changed (by default such a rerun is refused)",
    )
    p.set_defaults(func=run, accepts_beam_args=True)
    return p


def build_config(args: argparse.Namespace):
    """The config file, then ``--set`` overrides, then the specific flags."""
    from wit_pipeline import config as config_lib

    cfg = config_lib.load_config(args.config)
    cfg = config_lib.apply_overrides(cfg, args.overrides)
    flags: dict[str, object] = {}
    if args.allow_loopback:
        flags["download.allow_loopback"] = True
    if args.eval_sets:
        flags["dedup.eval_sets"] = list(cfg.dedup.eval_sets) + list(args.eval_sets)
    if args.seed_model:
        flags["score.pretrained"] = args.seed_model
    if args.seed_arch:
        flags["score.model"] = args.seed_arch
    return config_lib.apply_overrides(cfg, flags)


def run(args: argparse.Namespace) -> int:
    from wit_pipeline import build

    cfg = build_config(args)
    doc = build.run_build(
        args.input,
        args.output,
        cfg,
        queries_path=args.queries,
        beam_args=args.beam_args,
        runner=args.runner,
        overwrite=args.overwrite,
    )
    summary = {
        "output": args.output,
        "samples": doc["samples"],
        "shards": doc["shards"],
        "train_data": doc["train_data"],
        "counters": doc["counters"],
    }
    json.dump(summary, sys.stdout, indent=1)
    sys.stdout.write("\n")
    if not doc["samples"]:
        print(
            f"wit build: no sample survived; see {args.output}/report.md for where they went",
            file=sys.stderr,
        )
        return 1
    return 0
