"""``wit dedup``: download output in, deduplicated and decontaminated samples out."""

from __future__ import annotations

import argparse
import json
import sys

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


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "dedup",
        help="near-duplicate removal (pHash + LSH) and eval-set decontamination",
        description=(
            "Hash every downloaded image (pHash, identical to imagehash), group near "
            "duplicates within a Hamming distance with LSH banding, keep one survivor per group "
            "with every caption of the group, and drop images that match evaluation sets."
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
        metavar="DIR",
        help="`wit download` output directories (DIR/shards/NNNNN.tar + .parquet)",
    )
    p.add_argument(
        "--output", "-o", metavar="DIR", help="output directory (required without --finalize)"
    )
    p.add_argument("--config", metavar="FILE", help="YAML/TOML config (its dedup section)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set dedup.partitions=256 (repeatable)",
    )
    p.add_argument(
        "--eval-set",
        dest="eval_sets",
        action="append",
        default=[],
        metavar="SPEC",
        help="evaluation image set to decontaminate against (repeatable; see below)",
    )
    p.add_argument(
        "--max-distance", type=int, metavar="K", help="near-duplicate Hamming distance (4)"
    )
    p.add_argument("--eval-max-distance", type=int, metavar="K", help="contamination distance (4)")
    p.add_argument(
        "--no-collapse",
        action="store_true",
        help="keep one sample per pair and only mark near-duplicate groups",
    )
    p.add_argument(
        "--finalize",
        metavar="FINAL_DIR",
        help="also balance and write the final shards to FINAL_DIR, in the same pipeline "
        "(no intermediate samples are written)",
    )
    p.add_argument("--queries", metavar="FILE", help="query list, for the query-counts table")
    p.add_argument("--runner", help="Beam runner (default FnApiRunner; DirectRunner, Dataflow)")
    p.set_defaults(func=run, accepts_beam_args=True)
    return p


def dedup_config(args):
    from wit_pipeline import config as config_lib

    cfg = config_lib.load_config(args.config)
    cfg = config_lib.apply_overrides(cfg, args.overrides)
    flags = {}
    if args.eval_sets:
        flags["dedup.eval_sets"] = list(cfg.dedup.eval_sets) + list(args.eval_sets)
    if args.max_distance is not None:
        flags["dedup.max_distance"] = args.max_distance
    if args.eval_max_distance is not None:
        flags["dedup.eval_max_distance"] = args.eval_max_distance
    if args.no_collapse:
        flags["dedup.collapse"] = False
    return config_lib.apply_overrides(cfg, flags)


def run(args) -> int:
    from wit_pipeline import steps
    from wit_pipeline.errors import WitError

    if not args.output and not args.finalize:
        raise WitError("dedup: --output DIR (or --finalize FINAL_DIR) is required")
    cfg = dedup_config(args)
    if args.finalize:
        doc = steps.run_finalize(
            args.input,
            args.finalize,
            cfg,
            queries_path=args.queries or "",
            beam_args=args.beam_args,
            runner=args.runner,
        )
    else:
        doc = steps.run_dedup(
            args.input, args.output, cfg, beam_args=args.beam_args, runner=args.runner
        )
    json.dump({"counters": doc["counters"]}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0
