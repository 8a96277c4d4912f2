"""``wit report DIR``: (re)write a build's report.md and plots from its output files."""

from __future__ import annotations

import argparse

HELP = "write DIR/report.md and DIR/plots/*.png for a `wit build` output directory"
DESCRIPTION = (
    "Read a build directory (stats.json, query_counts.parquet, shards/) and write the "
    "funnel per stage, the per-query distribution before and after balancing, sample "
    "images and, when scored, the CLIP-score histogram."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR", help="a `wit build --output` directory")
    p.add_argument(
        "--stats",
        action="store_true",
        help="recompose DIR/stats.json from the steps' files first (checks every counter)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wit_pipeline import build, fileio, report, run_stats
    from wit_pipeline.errors import WitError

    if not fileio.exists(fileio.join(args.directory, build.STATS_FILE)) and not args.stats:
        if not fileio.exists(fileio.join(args.directory, build.BUILD_FILE)):
            raise WitError(f"{args.directory} is not a `wit build` output (no stats.json)")
        args.stats = True
    if args.stats:
        run_stats.write_run_stats(args.directory)
    print(report.write_report(args.directory))
    return 0
