"""``wit seed``: train a filter network on a trusted set, for ``wit build --seed-model``."""

from __future__ import annotations

import argparse
import json
import sys

from wit_pipeline.cli import args as args_lib

HELP = "train a seed CLIP (a filter network) on a trusted set, for wit build --seed-model"
DESCRIPTION = (
    "Build a trusted image-text set with wit build's stages (or read its finished shards), hold "
    "out a part of it, train a small CLIP on the rest with a recipe chosen for filtering, "
    "early-stopped on how well it separates the held-out true pairs from shuffled ones, and "
    "write DIR/seed.pt and DIR/seed.json (docs/score.md)."
)
EPILOG = """\
examples:
  wit seed --input trusted.parquet --output out/seed
  wit seed --input out/trusted-build --output out/seed --set seed.model=wit-small
  wit seed --input trusted.parquet --output out/seed --pool out/pool-build --rounds 1
  wit build --input 'crawl/*.warc.gz' --output out/build --seed-model out/seed/seed.pt

The recipe is the seed: section of the config (model, holdout, epochs, patience, ...;
examples/build.yaml); --set seed.OPTION=VALUE changes one option. A rerun skips what is done
and resumes an interrupted training run; a rerun with other settings is refused unless
--overwrite. Unknown --flags are passed to Beam (the trusted build).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    args_lib.add_input(
        p,
        "the trusted set: URL/caption tables, WARC files (built like wit build), or one folder "
        "of finished shards (a build folder or its shards/)",
    )
    args_lib.add_queries(p, "query list for the trusted build (default: the shipped list)")
    args_lib.add_output(p, "seed directory: build/, split/, runs/, seed.pt, seed.json")
    p.add_argument(
        "--pool",
        metavar="DIR",
        help="a built pool (a build folder or its shards/) to select extra training pairs from "
        "(with seed.rounds > 0)",
    )
    args_lib.add_config(
        p, sections="seed: the recipe; the rest for the trusted build", example="seed.epochs=40"
    )
    args_lib.add_flags(p, "--allow-loopback", "--eval-set", "--holdout", "--epochs", "--rounds")
    args_lib.add_runner(p)
    args_lib.add_overwrite(p, "train again (and rebuild changed build steps) when settings changed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wit_pipeline import seed

    cfg = args_lib.build_config(args)
    doc = seed.run_seed(
        args.input,
        args.output,
        cfg,
        pool=args.pool,
        queries_path=args.queries,
        beam_args=args.beam_args,
        runner=args.runner,
        overwrite=args.overwrite,
    )
    summary = {
        "checkpoint": doc["checkpoint"],
        "model": doc["model"],
        "heldout": {k: doc["heldout"][k] for k in ("auc", "recall@p95", "num_true")},
        "chosen": doc["chosen"],
        "data": {k: doc["data"][k] for k in ("train", "heldout")},
    }
    json.dump(summary, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0
