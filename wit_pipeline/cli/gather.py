"""``wit gather``: crawl files or tables in, query-matched image/caption candidates out."""

from __future__ import annotations

import argparse
import logging
import re
import sys

from wit_pipeline.cli import args as args_lib
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


HELP = "extract, clean, filter and query-match image/caption pairs"
DESCRIPTION = (
    "Read WARC/WAT crawl files or URL/caption tables, clean and filter the captions, "
    "keep the pairs whose caption matches the query list (MetaCLIP substring "
    "semantics), and write candidates, rejected pairs with reasons, and stats."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    args_lib.add_input(
        p,
        "files, directories, globs or fsspec URLs (.warc[.gz], .wat[.gz], .parquet, "
        ".csv, .tsv, .jsonl, optionally compressed)",
    )
    args_lib.add_queries(p)
    args_lib.add_output(p)
    args_lib.add_config(p, sections="its gather section", example="gather.captions.min_chars=3")
    args_lib.add_runner(p)
    args_lib.add_flags(
        p,
        "--input-format",
        "--url-column",
        "--caption-column",
        "--languages",
        "--language-detector",
        "--keep-unmatched",
        "--no-rejected",
        "--num-shards",
        "--blocklist",
    )
    args_lib.add_overwrite(p, "recompute even if DIR is already complete")
    p.add_argument(
        "--progress-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between progress lines for a file being read (0: per file only)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


class _DropImportNoise(logging.Filter):
    """Beam warns on import that optional GCP client libraries are missing; not our concern."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("apitools not found")


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted, not when the handler was made
    (a caller, or a test capturing output, may swap the stream after logging is set up)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(quiet: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_DropImportNoise())
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    log = logging.getLogger("wit_pipeline")
    if not any(getattr(h, "_wit", False) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler._wit = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def _beam_error_message(e: Exception) -> str | None:
    """The message of a ``WitError`` raised inside a Beam worker, if that is what failed."""
    m = re.search(r"WitError: ([^\n]+)", str(e))
    return m.group(1).strip() if m else None


def run(args) -> int:
    setup_logging(args.quiet)
    from wit_pipeline import counters, fileio, queries, takedown

    full = args_lib.build_config(args)
    cfg = full.gather
    blocklist = takedown.from_config(full.takedown)
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
            blocklist=blocklist,
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
