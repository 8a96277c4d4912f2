"""``wit build``: gather -> pre-balance -> download -> dedup -> balance -> shards, resumable."""

from __future__ import annotations

import argparse
import json
import sys

from wit_pipeline.cli import args as args_lib

EPILOG = """\
examples:
  wit build --input 'crawl/*.warc.gz' --output out/build
  wit build --input laion_part_0.parquet --queries my-queries.txt --output out/build \\
      --config examples/build.yaml --set balance.t=5000 \\
      --eval-set cifar10=../shared/data/cifar10/test.parquet
  wit build ... --seed-model runs/raw/checkpoints/latest.pt --set score.keep_fraction=0.3
  wit build ... --blocklist takedowns.txt    # url/domain/sha256/phash entries left out
  wit build ... --seed-model seed.pt --threshold auto --set score.target_precision=0.9
  wit build ... --runner DataflowRunner --project P --region R --temp_location gs://b/tmp

Steps (each a Beam pipeline; DIR/done/<step>.json marks it finished): gather, prebalance,
download, finalize (dedup + decontamination + CLIP score per caption + balance + shards),
report. A rerun
skips finished steps and resumes the first unfinished one; a rerun with other settings is
refused unless --overwrite (unchanged steps are then kept). --retry-failed fetches the
download's transient failures again and redoes finalize and report. Output: DIR/shards/ (open_clip
--train-data, HF datasets Parquet), DIR/stats.json, DIR/report.md, DIR/query_counts.parquet.
Unknown --flags are passed to Beam as pipeline options (docs/build.md).
"""


HELP = "the whole pipeline: crawl files in, balanced and deduplicated training shards out"
DESCRIPTION = (
    "Build a WIT-style dataset end to end: gather query-matched pairs from crawls or "
    "tables, pre-balance, download, deduplicate and decontaminate, optionally filter every "
    "caption by CLIP score, balance (MetaCLIP), and write webdataset shards with a report."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    args_lib.add_input(
        p, "WARC/WAT files, URL/caption tables, directories or globs (local or fsspec URLs)"
    )
    args_lib.add_queries(p, "query list (default: the shipped English list)")
    args_lib.add_output(p, "build directory")
    args_lib.add_config(p, sections="every stage", example="balance.t=5000")
    args_lib.add_flags(
        p,
        "--allow-loopback",
        "--max-retry-wait",
        "--eval-set",
        "--seed-model",
        "--seed-arch",
        "--blocklist",
    )
    args_lib.add_retry_failed(
        p,
        "repair the download of this build: fetch its transient failures (timeouts, connection "
        "errors, HTTP 429 and 5xx) again, into the same shards, then redo finalize and report",
    )
    args_lib.add_flags(p, "--threshold", "--keep-fraction", exclusive=True)
    args_lib.add_runner(p)
    args_lib.add_overwrite(
        p, "rebuild the steps whose settings changed (by default such a rerun is refused)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wit_pipeline import build

    cfg = args_lib.build_config(args)
    doc = build.run_build(
        args.input,
        args.output,
        cfg,
        queries_path=args.queries,
        beam_args=args.beam_args,
        runner=args.runner,
        overwrite=args.overwrite,
        retry_failed=args.retry_failed,
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
