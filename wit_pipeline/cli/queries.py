"""``wit queries``: build a query list (``build``), rebuild the shipped one (``build-default``),
and describe a list (``info``)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from wit_pipeline.cli import args as args_lib
from wit_pipeline.errors import WitError

HELP = "build the ~500k query list (Wikipedia words, bigrams, titles, WordNet)"
DESCRIPTION = "Build CLIP's query list from Wikipedia dumps, page views and WordNet."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = args_lib.add_subcommands(parser, "queries_command", "SUBCOMMAND")

    b = sub.add_parser(
        "build",
        help="build a list from a Wikipedia dump, pageview files, title lists and WordNet",
        description=(
            "Count a Wikipedia XML dump (and --text files, for the bigrams) on Beam (any "
            "runner; extra --flags are Beam pipeline options, e.g. --runner=DataflowRunner; "
            "a mistyped flag is taken for one), sum page views, read WordNet, then merge "
            "the sources in priority order, deduplicate and cap. A source without input is "
            "skipped. Writes OUTPUT (one query per line, gzip when it ends in .gz) and a JSON "
            "manifest beside it."
        ),
    )
    b.add_argument("--output", required=True, help="the list to write, e.g. out/queries.txt.gz")
    b.add_argument(
        "--dump",
        action="append",
        default=[],
        metavar="PATTERN",
        help="Wikipedia pages-articles XML dump files (.bz2, .gz, .xml; globs, gs:// URLs); "
        "repeatable. Source of unigram and bigram counts",
    )
    b.add_argument(
        "--unigram-counts",
        action="append",
        default=[],
        metavar="PATH",
        help="word<TAB>count table (also word;count), e.g. unigrams.tsv.gz of an earlier run",
    )
    b.add_argument(
        "--wordfreq-tokens",
        type=float,
        default=0,
        metavar="N",
        help="also take wordfreq's English list as counts in a corpus of N tokens",
    )
    b.add_argument(
        "--pageviews",
        action="append",
        default=[],
        metavar="PATTERN",
        help="Wikimedia pageview files ('<project> <title> <views> <bytes>' lines; .gz ok)",
    )
    b.add_argument(
        "--titles",
        action="append",
        default=[],
        metavar="PATH",
        help="plain list of article titles (Title, /wiki/Title or URLs), when no page views",
    )
    b.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="PATTERN",
        help="plain UTF-8 text files (.gz/.bz2 ok; dictd .dict/.dict.dz cleaned of markup); "
        "repeatable. More text for the bigram counts only, not the unigram source",
    )
    b.add_argument(
        "--wordnet",
        metavar="DIR",
        help="WordNet 3.0 database directory with data.noun etc. (Debian: /usr/share/wordnet)",
    )
    args_lib.add_config(b, sections="its queries section", example="queries.bigrams.min_pmi=10")
    args_lib.add_flags(
        b,
        "--min-count",
        "--bigram-min-count",
        "--bigram-min-pmi",
        "--min-views",
        "--max-queries",
        "--priority",
        "--case",
    )
    b.add_argument("--work-dir", help="where counts are kept (default: OUTPUT's stem + .work)")
    b.add_argument("--force", action="store_true", help="recount even when counts are current")
    args_lib.add_runner(b)
    b.set_defaults(func=run_build)

    d = sub.add_parser(
        "build-default",
        help="rebuild the shipped list queries/wit-queries-en.txt.gz from offline sources",
        description=(
            "Rebuild the default list from sources that need no download at run time: WordNet "
            "(Debian wordnet-base), wordfreq and pywordfreq (Wikipedia word counts), the "
            "Wikipedia dump excerpt in the gensim wheel plus WordNet glosses (bigrams), and "
            "the vital-articles title list of the shared data folder."
        ),
    )
    d.add_argument("--output", required=True, help="directory, e.g. queries/")
    d.add_argument("--wordnet", default="/usr/share/wordnet", metavar="DIR")
    d.add_argument(
        "--titles",
        metavar="PATH",
        help="titles list (default: $WIT_SHARED_DATA or ../shared/data, "
        "wikipedia/vital_article_links.txt)",
    )
    d.add_argument("--dump", metavar="PATH", help="dump for bigrams (default: gensim's excerpt)")
    d.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="PATH",
        help="more text for the bigram counts (as for build), e.g. "
        "/usr/share/dictd/gcide.dict.dz; the shipped list uses none",
    )
    d.set_defaults(func=run_build_default)

    i = sub.add_parser("info", help="count, sha256 and manifest summary of a query list")
    i.add_argument(
        "path",
        nargs="?",
        help="a query list in any format (docs/queries.md), PATH#KEY for a JSON key or a table "
        "column (default: the shipped list)",
    )
    i.set_defaults(func=run_info)


def _command_line() -> str:
    if sys.argv and sys.argv[0].endswith("build_queries.py"):  # pipelines/build_queries.py
        return "python " + shlex.join(sys.argv)
    return "wit " + shlex.join(sys.argv[1:]) if sys.argv and sys.argv[0] else "wit queries"


def run_build(args: argparse.Namespace) -> int:
    from wit_pipeline.queries import build, merge

    cfg = args_lib.build_config(args).queries
    inputs = build.BuildInputs(
        dumps=tuple(args.dump),
        unigram_counts=tuple(args.unigram_counts),
        wordfreq_tokens=int(args.wordfreq_tokens),
        pageviews=tuple(args.pageviews),
        titles=tuple(args.titles),
        wordnet=args.wordnet,
        texts=tuple(args.text),
    )
    manifest = build.build(
        inputs,
        cfg,
        output=args.output,
        work_dir=args.work_dir,
        beam_args=args.beam_args,
        command=_command_line(),
        force=args.force,
    )
    print(merge.summary_table(manifest))
    print(f"wrote {args.output} ({manifest['total']:,} queries) and its manifest")
    return 0


def _default_titles() -> str:
    from wit_pipeline.queries.default import VITAL_ARTICLES

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base = os.environ.get("WIT_SHARED_DATA") or os.path.join(
        os.path.dirname(root), "shared", "data"
    )
    path = os.path.join(base, VITAL_ARTICLES)
    if not os.path.exists(path):
        raise WitError(f"titles list not found: {path} (set WIT_SHARED_DATA or pass --titles PATH)")
    return path


def run_build_default(args: argparse.Namespace) -> int:
    from wit_pipeline.queries import default, merge

    titles = args.titles or _default_titles()
    manifest = default.build_default(
        output_dir=args.output,
        wordnet_dir=args.wordnet,
        titles=titles,
        # The shared data folder lives outside the repository: name it portably.
        titles_name=None if args.titles else f"$WIT_SHARED_DATA/{default.VITAL_ARTICLES}",
        dump=args.dump,
        texts=tuple(args.text),
        command=_command_line(),
    )
    print(merge.summary_table(manifest))
    print(f"wrote {os.path.join(args.output, default.DEFAULT_LIST_NAME)} and its manifest")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from wit_pipeline import fileio, queries
    from wit_pipeline.queries import merge

    path = args.path or queries.default_queries_path()
    qlist = queries.read_query_list(path)
    key = f", key {qlist.key!r}" if qlist.key else ""
    packed = " (gzip)" if qlist.gzip else ""
    print(f"{path}: {len(qlist.entries):,} queries, sha256 {qlist.sha256}")
    print(f"format {qlist.format}{packed}{key}, file sha256 {qlist.file_sha256}")
    never = qlist.unmatchable
    examples = ", ".join(repr(qlist.entries[i]) for i in never[:5])
    print(
        f"{len(never):,} entries can never match (MetaCLIP spacing: ,.;:?! or a backtick "
        f"next to another character, or a tab or line break)"
        + (f", e.g. {examples}" if never else "")
    )
    mpath = merge.manifest_path(path)
    if fileio.exists(mpath):
        manifest = fileio.read_json(mpath)
        print(merge.summary_table(manifest))
        print(f"built {manifest.get('created', '?')} by: {manifest.get('command', '?')}")
    return 0
