"""``wit dedup``: download output in, deduplicated and decontaminated samples out."""

from __future__ import annotations

import argparse
import json
import sys

from wit_pipeline.cli import args as args_lib

EPILOG = """\
examples:
  wit dedup --input out/download --output out/dedup
  wit dedup --input out/download --output out/dedup --max-distance 6 \\
      --eval-set cifar10=../shared/data/cifar10/test.parquet \\
      --eval-set 'flickr8k-dev=../shared/data/flickr8k/captions.tsv?split=dev'
  wit dedup ... --finalize out/final     # dedup + balance + final shards in one pipeline

Eval sets: [NAME=]PATH[?col=value&...], PATH a folder of images, a Parquet file with an image
column, or a TSV/CSV list of image files (options: column=, id=, root=, and filters such as
split=dev). Output: DIR/samples/*.parquet (one row per sample, pointing at its image in the
download shards), DIR/rejected/*.parquet, DIR/stats.json, DIR/query_counts.parquet and
DIR/contamination.json. Then `wit balance --input DIR --output FINAL` writes the final shards.
Unknown --flags are passed to Beam as pipeline options (see docs/dedup.md).
"""


HELP = "near-duplicate removal (pHash + LSH) and eval-set decontamination"
DESCRIPTION = (
    "Hash every downloaded image (pHash, identical to imagehash), group near "
    "duplicates within a Hamming distance with LSH banding, keep one survivor per group "
    "with every caption of the group, and drop images that match evaluation sets."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    args_lib.add_input(
        p, "`wit download` output directories (DIR/shards/NNNNN.tar + .parquet)", metavar="DIR"
    )
    args_lib.add_output(p, "output directory (required without --finalize)", required=False)
    args_lib.add_config(p, sections="its dedup section", example="dedup.partitions=256")
    args_lib.add_flags(
        p, "--eval-set", "--max-distance", "--eval-max-distance", "--no-collapse", "--blocklist"
    )
    p.add_argument(
        "--finalize",
        metavar="FINAL_DIR",
        help="also balance and write the final shards to FINAL_DIR, in the same pipeline "
        "(no intermediate samples are written)",
    )
    args_lib.add_queries(p, "query list, for the query-counts table")
    args_lib.add_runner(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from wit_pipeline import steps, takedown
    from wit_pipeline.errors import WitError

    if not args.output and not args.finalize:
        raise WitError("dedup: --output DIR (or --finalize FINAL_DIR) is required")
    cfg = args_lib.build_config(args)
    blocklist = takedown.from_config(cfg.takedown)  # its hash entries apply here
    if args.finalize:
        doc = steps.run_finalize(
            args.input,
            args.finalize,
            cfg,
            queries_path=args.queries or "",
            beam_args=args.beam_args,
            runner=args.runner,
            blocklist=blocklist,
        )
    else:
        doc = steps.run_dedup(
            args.input,
            args.output,
            cfg,
            beam_args=args.beam_args,
            runner=args.runner,
            blocklist=blocklist,
        )
    json.dump({"counters": doc["counters"]}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0
