"""``wit gather``: crawl files or tables in, query-matched image/caption candidates out."""

from __future__ import annotations

import argparse
import logging
import re
import sys

from wit_pipeline.errors import WitError

EPILOG = """\
examples:
  wit gather --input crawl/*.warc.gz --queries queries.txt.gz --output out/gather
  wit gather --input laion.parquet --output out/gather --language-detector langdetect
  wit gather --input 'gs://bucket/wat/*.wat.gz' --queries gs://bucket/q.txt.gz \\
      --output gs://bucket/gather --runner DataflowRunner --project P --region R \\
      --temp_location gs://bucket/tmp
  wit gather ... --direct_num_workers 2 --direct_running_mode multi_processing

Unknown --flags are passed to Beam as pipeline options. Output: DIR/candidates/*.parquet,
DIR/rejected/*.parquet and DIR/stats.json (see docs/gather.md).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "gather",
        help="extract, clean, filter and query-match image/caption pairs",
        description=(
            "Read WARC/WAT crawl files or URL/caption tables, clean and filter the captions, "
            "keep the pairs whose caption matches the query list (MetaCLIP substring "
            "semantics), and write candidates, rejected pairs with reasons, and stats."
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
        metavar="PATH",
        help="files, directories, globs or fsspec URLs (.warc[.gz], .wat[.gz], .parquet, "
        ".csv, .tsv, .jsonl, optionally compressed)",
    )
    p.add_argument(
        "--queries",
        "-q",
        metavar="FILE",
        help="query list, one per line (.txt or .txt.gz); default: the shipped list",
    )
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="output directory")
    p.add_argument("--config", metavar="FILE", help="YAML/TOML config (its gather section)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set gather.captions.min_chars=3 (repeatable)",
    )
    p.add_argument("--runner", help="Beam runner (default FnApiRunner; DirectRunner, Dataflow)")
    p.add_argument(
        "--input-format",
        choices=["auto", "warc", "wat", "parquet", "csv", "tsv", "jsonl"],
        help="format of every input (default: from the file names)",
    )
    p.add_argument("--url-column", help="table column with the image URL")
    p.add_argument("--caption-column", help="table column with the caption")
    p.add_argument(
        "--languages",
        help="comma-separated ISO 639-1 codes to keep (default en); 'all' keeps every language",
    )
    p.add_argument(
        "--language-detector",
        choices=["fasttext", "langdetect", "none"],
        help="fasttext (default, bundled lite model), langdetect (seeded, slower), none",
    )
    p.add_argument("--keep-unmatched", action="store_true", help="keep pairs that match no query")
    p.add_argument(
        "--no-rejected",
        action="store_true",
        help="do not write rejected/ (for very large crawls; counters are still exact)",
    )
    p.add_argument(
        "--num-shards",
        type=int,
        metavar="N",
        help="output files per directory (default: about one per 128 MiB of input)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="recompute even if DIR is already complete"
    )
    p.add_argument(
        "--progress-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between progress lines for a file being read (0: per file only)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run, accepts_beam_args=True)
    return p


class _DropImportNoise(logging.Filter):
    """Beam warns on import that optional GCP client libraries are missing; not our concern."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("apitools not found")


def setup_logging(quiet: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_DropImportNoise())
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    log = logging.getLogger("wit_pipeline")
    if not any(getattr(h, "_wit", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler._wit = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def _gather_config(args):
    from wit_pipeline import config as config_lib

    cfg = config_lib.load_config(args.config)
    cfg = config_lib.apply_overrides(cfg, args.overrides)
    flags = {}
    if args.input_format:
        flags["gather.input_format"] = args.input_format
    if args.url_column:
        flags["gather.url_column"] = args.url_column
    if args.caption_column:
        flags["gather.caption_column"] = args.caption_column
    if args.languages:
        langs = "" if args.languages.strip().lower() == "all" else args.languages
        flags["gather.captions.languages"] = langs
    if args.language_detector:
        flags["gather.captions.language_detector"] = args.language_detector
    if args.keep_unmatched:
        flags["gather.match.keep_unmatched"] = True
    if args.no_rejected:
        flags["gather.write_rejected"] = False
    if args.num_shards is not None:
        if args.num_shards < 1:
            raise WitError("--num-shards must be >= 1")
        flags["gather.num_output_shards"] = args.num_shards
    return config_lib.apply_overrides(cfg, flags).gather


def _beam_error_message(e: Exception) -> str | None:
    """The message of a ``WitError`` raised inside a Beam worker, if that is what failed."""
    m = re.search(r"WitError: ([^\n]+)", str(e))
    return m.group(1).strip() if m else None


def run(args) -> int:
    setup_logging(args.quiet)
    from wit_pipeline import counters, fileio, queries

    cfg = _gather_config(args)
    fileio.expand_inputs(args.input)  # a missing input is reported before anything else
    queries_path = args.queries
    if queries_path is None:
        queries_path = queries.default_queries_path()
        if not fileio.exists(queries_path):
            raise WitError(
                f"query file not found: {queries_path} (the shipped default list; "
                "pass --queries FILE)"
            )
    from wit_pipeline.stages.gather.transforms import run_gather

    try:
        doc = run_gather(
            args.input,
            args.output,
            config=cfg,
            queries_path=queries_path,
            beam_args=args.beam_args,
            runner=args.runner,
            progress_interval=0.0 if args.quiet else args.progress_interval,
            overwrite=args.overwrite,
        )
    except WitError:
        raise
    except Exception as e:
        msg = _beam_error_message(e)
        if msg:
            raise WitError(msg) from None
        raise
    c = doc["counters"]
    n_in, kept = c.get("input", 0), c.get("kept", 0)
    share = f" ({kept / n_in:.1%})" if n_in else ""
    status = "already complete, nothing to do" if doc.get("skipped") else "done"
    elapsed = f" in {doc['elapsed_s']:.1f}s" if "elapsed_s" in doc else ""
    print(f"gather: {status}{elapsed}: {n_in:,} pairs in, {kept:,} kept{share}")
    reasons = counters.drop_reasons(c)
    if reasons:
        top = sorted(reasons.items(), key=lambda kv: -kv[1])
        print("  dropped: " + ", ".join(f"{r} {n:,}" for r, n in top))
    print(
        f"  output: {fileio.join(args.output, 'candidates')}/, stats: "
        f"{fileio.join(args.output, 'stats.json')}"
    )
    return 0
