"""``wit download``: candidate pairs -> downloaded, validated, resized images in shards."""

from __future__ import annotations

import argparse
import sys

from wit_pipeline.cli import args as args_lib

HELP = (
    "download candidate images (img2dataset inside Beam): robots.txt, opt-outs, "
    "SSRF guard, resumable webdataset shards"
)
DESCRIPTION = (
    "Download the images of the candidate pairs written by `wit gather` (DIR/candidates/"
    "*.parquet, or Parquet files with a url column) into OUTPUT/shards/ (webdataset "
    "tars + Parquet), OUTPUT/rejected/ and OUTPUT/stats.json. Rerunning with the same "
    "OUTPUT resumes: finished shards are skipped; --retry-failed also fetches the transient "
    "failures (timeouts, connection errors, HTTP 429 and 5xx) of finished shards again, into "
    "the same shards. Unknown --flags go to Beam (--runner, --direct_num_workers, ...)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    args_lib.add_input(p, "a `wit gather` output dir, or Parquet files", many=False)
    args_lib.add_output(p, "output directory (local or fsspec URL)")
    args_lib.add_config(p, sections="its download section", example="download.image_size=128")
    args_lib.add_flags(p, "--allow-loopback", "--max-retry-wait", "--blocklist")
    args_lib.add_retry_failed(
        p,
        "repair run: fetch the URLs that failed transiently (timeouts, connection errors, "
        "HTTP 429 and 5xx) again, honouring Retry-After, and rewrite their shards in place",
    )
    args_lib.add_runner(p)
    p.set_defaults(func=run)


def _log(msg: str) -> None:
    print(f"wit {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from wit_pipeline import fileio, steps, takedown
    from wit_pipeline.stages.download import plan

    full = args_lib.build_config(args)
    stats = steps.run_download(
        args.input,
        args.output,
        full.download,
        beam_args=args.beam_args,
        runner=args.runner,
        log=_log,
        blocklist=takedown.from_config(full.takedown),
        retry_failed=args.retry_failed,
    )
    pairs, url_level = stats["counters"], stats["url_counters"]
    print(
        f"wit download: {url_level.get('kept', 0)}/{url_level.get('input', 0)} images, "
        f"{pairs.get('kept', 0)}/{pairs.get('input', 0)} pairs kept -> "
        f"{fileio.join(args.output, plan.SHARDS_DIR)}",
        file=sys.stderr,
    )
    dropped = {k: v for k, v in url_level.items() if k.startswith("dropped:")}
    if dropped:
        print("  URLs dropped: " + ", ".join(f"{k[8:]}={v}" for k, v in dropped.items()))
    return 0
