"""``wit balance``: MetaCLIP balancing, before download (``--pre``) or into final shards."""

from __future__ import annotations

import argparse
import json
import sys

from wit_pipeline.cli import args as args_lib

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


HELP = "MetaCLIP per-query balancing; writes the final webdataset shards"
DESCRIPTION = (
    "Count matches per query over the pool, keep each sample with probability "
    "1 - prod(1 - min(1, t / count)) over its queries (seeded by its id, identical on "
    "every runner), and write training shards. --pre balances gather candidates "
    "before download with t multiplied by an oversampling factor."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    args_lib.add_input(
        p,
        "`wit dedup` output (or `wit gather` output with --pre)",
        metavar="DIR",
        many=False,
    )
    args_lib.add_output(p)
    p.add_argument("--pre", action="store_true", help="pre-balance gather candidates")
    args_lib.add_config(
        p, sections="its balance and shards sections", example="shards.samples_per_shard=5000"
    )
    args_lib.add_flags(p, "--t", "--seed", "--factor", "--samples-per-shard")
    args_lib.add_queries(p, "query list, for the query-counts table")
    args_lib.add_runner(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from wit_pipeline import steps

    cfg = args_lib.build_config(args)
    kwargs = dict(queries_path=args.queries or "", beam_args=args.beam_args, runner=args.runner)
    if args.pre:
        doc = steps.run_prebalance(args.input, args.output, cfg, **kwargs)
    else:
        doc = steps.run_balance(args.input, args.output, cfg, **kwargs)
    json.dump({"counters": doc["counters"]}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0
