"""``wit download``: candidate pairs -> downloaded, validated, resized images in shards."""

from __future__ import annotations

import argparse
import re
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "download",
        help="download candidate images (img2dataset inside Beam): robots.txt, opt-outs, "
        "SSRF guard, resumable webdataset shards",
        description=(
            "Download the images of the candidate pairs written by `wit gather` (DIR/candidates/"
            "*.parquet, or Parquet files with a url column) into OUTPUT/shards/ (webdataset "
            "tars + Parquet), OUTPUT/rejected/ and OUTPUT/stats.json. Rerunning with the same "
            "OUTPUT resumes: finished shards are skipped. Unknown --flags go to Beam "
            "(--runner, --direct_num_workers, ...)."
        ),
    )
    p.add_argument("--input", required=True, help="a `wit gather` output dir, or Parquet files")
    p.add_argument("--output", required=True, help="output directory (local or fsspec URL)")
    p.add_argument("--config", help="YAML/TOML config file (the `download:` section is used)")
    p.add_argument(
        "--allow-loopback",
        action="store_true",
        help="also allow 127.0.0.0/8 and ::1 (tests, the local demo); private, link-local "
        "and other internal addresses stay refused",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set download.image_size=128 (repeatable)",
    )
    p.set_defaults(func=run, accepts_beam_args=True)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import apache_beam as beam

    from wit_pipeline import beam_utils, config, fileio
    from wit_pipeline.errors import WitError
    from wit_pipeline.stages.download import plan
    from wit_pipeline.stages.download import transforms as download

    cfg = config.load_config(args.config)
    cfg = config.apply_overrides(cfg, args.overrides)
    dl = cfg.download
    if args.allow_loopback:
        dl = dataclasses.replace(dl, allow_loopback=True)
    plan.validate_config(dl)
    files = download.candidate_files(args.input)
    plan.check_plan_config(args.output, dl)
    options = beam_utils.pipeline_options(
        beam_utils.local_parallelism(args.beam_args, dl.processes)
    )
    try:
        with beam.Pipeline(options=options) as p:
            _ = (
                p
                | "ReadCandidates" >> download.ReadCandidates(files=files)
                | "DownloadImages" >> download.DownloadImages(output_dir=args.output, config=dl)
            )
    except Exception as e:
        # A WitError raised inside a worker reaches us wrapped by the runner: report its line.
        m = re.search(r"(\S+ holds a download run with a different input[^\n'\"]*)", str(e))
        if m:
            raise WitError(m.group(1)) from None
        raise
    stats = fileio.read_json(fileio.join(args.output, download.STATS_FILE))
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
