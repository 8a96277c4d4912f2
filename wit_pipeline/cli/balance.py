"""``wit balance``: MetaCLIP balancing, before download (``--pre``) or into final shards."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
examples:
  wit balance --input out/dedup --output out/final            # final shards
  wit balance --input out/dedup --output out/final --t 20000 --seed 1 --samples-per-shard 10000
  wit balance --pre --input out/gather --output out/prebalanced --factor 2
  wit download --input out/prebalanced ...                      # download the pre-balanced set

Final output: DIR/shards/NNNNN.tar (KEY.jpg, KEY.txt, KEY.json) + NNNNN.parquet, manifest.json
and sizes.json (open_clip: --train-data 'DIR/shards/{00000..000NN}.tar'), DIR/rejected/,
DIR/stats.json and DIR/query_counts.parquet. With --pre: DIR/candidates/*.parquet in the
`wit gather` format. Unknown --flags are passed to Beam as pipeline options (docs/balance.md).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "balance",
        help="MetaCLIP per-query balancing; writes the final webdataset shards",
        description=(
            "Count matches per query over the pool, keep each sample with probability "
            "1 - prod(1 - min(1, t / count)) over its queries (seeded by its id, identical on "
            "every runner), and write training shards. --pre balances gather candidates "
            "before download with t multiplied by an oversampling factor."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input",
        "-i",
        required=True,
        metavar="DIR",
        help="`wit dedup` output (or `wit gather` output with --pre)",
    )
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="output directory")
    p.add_argument("--pre", action="store_true", help="pre-balance gather candidates")
    p.add_argument("--config", metavar="FILE", help="YAML/TOML config (balance, shards sections)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set shards.samples_per_shard=5000 (repeatable)",
    )
    p.add_argument("--t", type=int, metavar="N", help="target count per query (20000)")
    p.add_argument("--seed", type=int, help="seed of the keep draws (0)")
    p.add_argument("--factor", type=float, help="oversampling factor of --pre (2.0)")
    p.add_argument("--samples-per-shard", type=int, metavar="N", help="final shard size (10000)")
    p.add_argument("--queries", metavar="FILE", help="query list, for the query-counts table")
    p.add_argument("--runner", help="Beam runner (default FnApiRunner; DirectRunner, Dataflow)")
    p.set_defaults(func=run, accepts_beam_args=True)
    return p


def balance_config(args):
    from wit_pipeline import config as config_lib

    cfg = config_lib.load_config(args.config)
    cfg = config_lib.apply_overrides(cfg, args.overrides)
    flags = {}
    if args.t is not None:
        flags["balance.t"] = args.t
    if args.seed is not None:
        flags["balance.seed"] = args.seed
    if args.factor is not None:
        flags["balance.prebalance_factor"] = args.factor
    if args.samples_per_shard is not None:
        flags["shards.samples_per_shard"] = args.samples_per_shard
    return config_lib.apply_overrides(cfg, flags)


def run(args) -> int:
    from wit_pipeline import steps

    cfg = balance_config(args)
    kwargs = dict(queries_path=args.queries or "", beam_args=args.beam_args, runner=args.runner)
    if args.pre:
        doc = steps.run_prebalance(args.input, args.output, cfg, **kwargs)
    else:
        doc = steps.run_balance(args.input, args.output, cfg, **kwargs)
    json.dump({"counters": doc["counters"]}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0
