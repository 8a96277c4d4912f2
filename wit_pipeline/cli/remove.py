"""``wit remove``: a new release of a build without the samples takedown blocklists name."""

from __future__ import annotations

import argparse
import json
import sys

from wit_pipeline.cli import args as args_lib

HELP = "write a new release of a build without the samples a takedown blocklist names"
DESCRIPTION = (
    "Read a finished build's final shards (--input BUILD), drop every sample that an entry of "
    "the blocklists matches (url, domain, sha256, phash; its URL, its merged copies, its page "
    "URLs and hashes), and write the new release to --output: shards whose other samples are "
    "byte-identical to the old ones, Parquet twins, sizes.json, and a manifest recording what "
    "was removed and why. Nothing is downloaded. A rerun writes the same bytes."
)
EPILOG = """\
examples:
  wit remove --input out/build --blocklist takedowns.txt --output out/build-r2
  wit remove -i gs://b/build -o gs://b/build-r2 --blocklist a.txt --blocklist b.txt

The blocklist format is in docs/takedowns.md.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    args_lib.add_input(p, "a `wit build` output directory (or an earlier release)", many=False)
    args_lib.add_output(p, "the new release's directory (empty, new, or an earlier release)")
    p.add_argument(
        "--blocklist",
        action="append",
        required=True,
        metavar="FILE",
        help="takedown blocklist (repeatable; docs/takedowns.md)",
    )
    p.add_argument(
        "--workers", type=int, default=8, metavar="N", help="shards processed at once (default 8)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from wit_pipeline import remove

    doc = remove.remove_samples(
        args.input,
        args.output,
        args.blocklist,
        workers=args.workers,
        log=lambda msg: print(f"wit {msg}", file=sys.stderr, flush=True),
    )
    json.dump({"output": args.output, "counters": doc["counters"]}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0
