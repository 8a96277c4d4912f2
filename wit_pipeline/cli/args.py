"""What the ``wit`` sub-commands share: their common arguments and one table of config flags.

Every command that computes something reads one config tree (``config.BuildConfig``): the
``--config`` file, then the ``--set KEY=VALUE`` overrides in order, then the command's own flags.
Each such flag names one config field in ``FLAGS``, the single table from flags to dotted config
paths, so a flag means the same field, with the same help and default, in every command that
takes it; ``add_flags(parser, ...)`` adds flags from it and ``build_config(args)`` applies them.
A flag given on the command line sets its field (a repeatable one adds to the field's list);
one left out leaves the field as the config file and ``--set`` made it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

from wit_pipeline import config as config_lib
from wit_pipeline.errors import WitError


@dataclasses.dataclass(frozen=True)
class Flag:
    """A command-line flag that sets the config field at ``path``.

    ``help`` may name ``{default}``: the field's default in ``BuildConfig``. A flag with
    ``const`` is a switch that sets the field to ``const``; with ``append`` it is repeatable
    and its values are added to the field's list; ``clears`` are fields reset to ``None`` when
    it is given (mutually exclusive options); ``convert`` turns the parsed value into the
    field's value (and may refuse it with a ``WitError``).
    """

    path: str
    help: str
    type: Callable[[str], Any] | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    const: Any = None
    append: bool = False
    clears: tuple[str, ...] = ()
    convert: Callable[[Any], Any] | None = None


def _languages(value: str) -> str:
    return "" if value.strip().lower() == "all" else value


def _threshold(value: str) -> float | str:
    """``--threshold``: a cosine similarity, or ``auto``."""
    if value.strip().lower() == config_lib.SCORE_AUTO:
        return config_lib.SCORE_AUTO
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or {config_lib.SCORE_AUTO}, got {value!r}"
        ) from None


def _num_shards(value: int) -> int:
    if value < 1:
        raise WitError("--num-shards must be >= 1")
    return value


FLAGS: dict[str, Flag] = {
    # gather
    "--input-format": Flag(
        "gather.input_format",
        "format of every input (default: from the file names)",
        choices=("auto", *config_lib.INPUT_FORMATS),
    ),
    "--url-column": Flag("gather.url_column", "table column with the image URL"),
    "--caption-column": Flag("gather.caption_column", "table column with the caption"),
    "--languages": Flag(
        "gather.captions.languages",
        "comma-separated ISO 639-1 codes to keep (default: {default}); 'all' keeps every language",
        convert=_languages,
    ),
    "--language-detector": Flag(
        "gather.captions.language_detector",
        "fasttext (default, bundled lite model), langdetect (seeded, slower), none",
        choices=config_lib.LANGUAGE_DETECTORS,
    ),
    "--keep-unmatched": Flag(
        "gather.match.keep_unmatched", "keep pairs that match no query", const=True
    ),
    "--no-rejected": Flag(
        "gather.write_rejected",
        "do not write rejected/ (for very large crawls; counters are still exact)",
        const=False,
    ),
    "--num-shards": Flag(
        "gather.num_output_shards",
        "output files per directory (default: about one per 4 MiB of table input, "
        "128 MiB of WARC/WAT)",
        type=int,
        metavar="N",
        convert=_num_shards,
    ),
    # download
    "--max-retry-wait": Flag(
        "download.max_retry_wait",
        "seconds one URL may wait for its retries, Retry-After included (default: {default}); "
        "a longer Retry-After fails it as retryable (fetch it with --retry-failed later)",
        type=float,
        metavar="SECONDS",
    ),
    "--allow-loopback": Flag(
        "download.allow_loopback",
        "let the downloader reach 127.0.0.0/8 and ::1 (tests, the local demo); private, "
        "link-local and other internal addresses stay refused",
        const=True,
    ),
    # dedup
    "--eval-set": Flag(
        "dedup.eval_sets",
        "evaluation image set to decontaminate against, [NAME=]PATH[?col=value] "
        "(repeatable; adds to dedup.eval_sets)",
        metavar="SPEC",
        append=True,
    ),
    "--max-distance": Flag(
        "dedup.max_distance",
        "near-duplicate Hamming distance (default: {default})",
        type=int,
        metavar="K",
    ),
    "--eval-max-distance": Flag(
        "dedup.eval_max_distance",
        "contamination distance (default: {default})",
        type=int,
        metavar="K",
    ),
    "--no-collapse": Flag(
        "dedup.collapse",
        "keep one sample per pair and only mark near-duplicate groups",
        const=False,
    ),
    # balance and shards
    "--t": Flag("balance.t", "target count per query (default: {default})", type=int, metavar="N"),
    "--seed": Flag("balance.seed", "seed of the keep draws (default: {default})", type=int),
    "--factor": Flag(
        "balance.prebalance_factor",
        "oversampling factor of --pre (default: {default})",
        type=float,
    ),
    "--samples-per-shard": Flag(
        "shards.samples_per_shard", "final shard size (default: {default})", type=int, metavar="N"
    ),
    # score
    "--seed-model": Flag(
        "score.pretrained",
        "CLIP-score every caption of the deduplicated samples with this seed, before balancing "
        "(a checkpoint or an open_clip tag; sets score.pretrained); filter with "
        "score.threshold (a number or auto) or score.keep_fraction",
        metavar="CKPT_OR_TAG",
    ),
    "--seed-arch": Flag(
        "score.model",
        "architecture of the seed model (score.model; read from trainer checkpoints)",
        metavar="NAME",
    ),
    "--model": Flag("score.model", "open_clip architecture (ViT-B-32, wit-tiny)"),
    "--pretrained": Flag(
        "score.pretrained",
        "seed weights: a checkpoint (wit_pipeline.train or open_clip) or an open_clip tag",
    ),
    "--threshold": Flag(
        "score.threshold",
        "keep pairs with clip_score >= X (LAION: 0.28), or auto: the lowest threshold whose "
        "expected precision reaches score.target_precision, estimated from the data",
        type=_threshold,
        metavar="X|auto",
        clears=("score.keep_fraction",),
    ),
    "--keep-fraction": Flag(
        "score.keep_fraction",
        "keep the top F of pairs by score (DataComp: 0.3)",
        type=float,
        clears=("score.threshold",),
    ),
    "--batch-size": Flag(
        "score.batch_size", "pairs per model batch (default: {default})", type=int, metavar="N"
    ),
    "--device": Flag("score.device", "auto (GPU when present), cpu, cuda"),
    # takedown
    "--blocklist": Flag(
        "takedown.blocklists",
        "takedown blocklist of url, domain, sha256 and phash entries to leave out "
        "(repeatable; adds to takedown.blocklists; docs/takedowns.md)",
        metavar="FILE",
        append=True,
    ),
    # seed (wit seed)
    "--holdout": Flag(
        "seed.holdout",
        "share of the trusted samples held out to measure the seed (default: {default})",
        type=float,
        metavar="F",
    ),
    "--epochs": Flag(
        "seed.epochs", "most epochs of seed training (default: {default})", type=int, metavar="N"
    ),
    "--rounds": Flag(
        "seed.rounds",
        "rounds of training on pairs selected from --pool (default: {default})",
        type=int,
        metavar="N",
    ),
    # queries
    "--min-count": Flag(
        "queries.unigrams.min_count", "unigram threshold (default: {default})", type=int
    ),
    "--bigram-min-count": Flag(
        "queries.bigrams.min_count", "bigram minimum count (default: {default})", type=int
    ),
    "--bigram-min-pmi": Flag(
        "queries.bigrams.min_pmi", "bigram PMI threshold (default: {default})", type=float
    ),
    "--min-views": Flag(
        "queries.titles.min_views", "title page-view threshold (default: {default})", type=int
    ),
    "--max-queries": Flag(
        "queries.max_queries", "cap on the list size (default: {default})", type=int
    ),
    "--priority": Flag("queries.priority", "merge order (default: {default})"),
    "--case": Flag("queries.case", "casing of the entries", choices=config_lib.QUERY_CASES),
}


def field_of(cfg: Any, path: str) -> Any:
    """The value of the field at dotted ``path`` of ``cfg`` (``AttributeError`` if none)."""
    return functools.reduce(getattr, path.split("."), cfg)


def default_of(path: str) -> Any:
    """The default of the config field at dotted ``path``."""
    return field_of(config_lib.BuildConfig(), path)


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_flags(parser, *flags: str, exclusive: bool = False) -> None:
    """Add ``flags`` from ``FLAGS`` to ``parser`` (as a mutually exclusive group if asked)."""
    target = parser.add_mutually_exclusive_group() if exclusive else parser
    for name in flags:
        f = FLAGS[name]
        kw: dict[str, Any] = {"dest": _dest(name), "default": None}
        kw["help"] = f.help.format(default=_show(default_of(f.path))) if "{" in f.help else f.help
        if f.const is not None:
            kw.update(action="store_const", const=f.const)
        else:
            kw.update(action="append" if f.append else "store", type=f.type, choices=f.choices)
            kw["metavar"] = f.metavar
        target.add_argument(name, **kw)
    parser.set_defaults(config_flags=(*(parser.get_default("config_flags") or ()), *flags))


def flag_overrides(args: argparse.Namespace, cfg: config_lib.BuildConfig) -> dict[str, Any]:
    """``{config path: value}`` for the ``FLAGS`` given in ``args`` (``cfg``: the tree before)."""
    out: dict[str, Any] = {}
    for name in getattr(args, "config_flags", ()):
        f = FLAGS[name]
        value = getattr(args, _dest(name))
        if value is None:
            continue
        if f.convert is not None:
            value = f.convert(value)
        if f.append:
            value = [*field_of(cfg, f.path), *value]
        for other in f.clears:
            out[other] = None
        out[f.path] = value
    return out


def build_config(args: argparse.Namespace) -> config_lib.BuildConfig:
    """The ``--config`` file, then the ``--set`` overrides, then the command's flags."""
    cfg = config_lib.load_config(args.config)
    cfg = config_lib.apply_overrides(cfg, args.overrides)
    return config_lib.apply_overrides(cfg, flag_overrides(args, cfg))


# ---------------------------------------------------------------------------------------------
# Arguments every command spells the same way


def add_command(
    subparsers,
    name: str,
    *,
    help: str,
    description: str = "",
    epilog: str = "",
    add_help: bool = True,
) -> argparse.ArgumentParser:
    """A sub-command's parser; an ``epilog`` (examples) keeps its line breaks."""
    kw: dict[str, Any] = {"help": help, "description": description or None, "add_help": add_help}
    if epilog:
        kw.update(epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    return subparsers.add_parser(name, **kw)


def add_subcommands(parser: argparse.ArgumentParser, dest: str, metavar: str):
    """The required sub-sub-commands of ``parser`` (``wit queries build``, ``wit eval ...``)."""
    sub = parser.add_subparsers(dest=dest, metavar=metavar)
    sub.required = True
    return sub


def add_input(
    parser, help: str, *, metavar: str = "PATH", many: bool = True, required: bool = True
) -> None:
    """``--input``/``-i``: one path, or with ``many`` one or more (repeatable)."""
    kw: dict[str, Any] = {"nargs": "+", "action": "extend"} if many else {}
    parser.add_argument("--input", "-i", required=required, metavar=metavar, help=help, **kw)


def add_output(parser, help: str = "output directory", *, required: bool = True) -> None:
    parser.add_argument("--output", "-o", required=required, metavar="DIR", help=help)


def add_queries(
    parser, help: str = "query list, one per line (.txt or .txt.gz); default: the shipped list"
) -> None:
    parser.add_argument("--queries", "-q", metavar="FILE", help=help)


def add_config(parser, *, sections: str, example: str) -> None:
    """``--config FILE`` and ``--set KEY=VALUE``; ``sections``: which parts of it are used."""
    parser.add_argument("--config", metavar="FILE", help=f"YAML/TOML config file ({sections})")
    add_set(parser, example)


def add_set(parser, example: str) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config field, e.g. --set {example} (repeatable)",
    )


def add_runner(
    parser, help: str = "Beam runner (default FnApiRunner; DirectRunner, Dataflow, dask)"
) -> None:
    """``--runner`` and the Dask flags; every other unknown ``--flag`` reaches Beam as a
    pipeline option. ``main`` runs the command inside :func:`runner_session`."""
    parser.add_argument("--runner", help=help)
    parser.add_argument(
        "--dask-address",
        metavar="tcp://HOST:PORT",
        help="with --runner dask: the scheduler of a running Dask cluster "
        "(default: a local cluster started for the run)",
    )
    parser.add_argument(
        "--dask-workers",
        type=int,
        metavar="N",
        help="with --runner dask and no --dask-address: worker processes of the local "
        "cluster (default: one per CPU)",
    )
    parser.set_defaults(accepts_beam_args=True, runner_session=True)


@contextlib.contextmanager
def runner_session(args: argparse.Namespace) -> Iterator[argparse.Namespace]:
    """Where a command with :func:`add_runner` runs, for as long as it runs.

    ``--runner`` joins the Beam args (so commands that only pass Beam args honour it); with
    ``--runner dask`` they name the scheduler, a local cluster started here (and closed when
    the command ends, also on error) unless ``--dask-address`` or Beam's own
    ``--dask_client_address`` / ``--dask_scheduler_file`` names one (``runners.dask_cluster``).
    """
    from wit_pipeline import runners

    beam_args = list(args.beam_args)
    if args.runner:
        beam_args.append(f"--runner={args.runner}")
    with runners.dask_cluster(
        args.runner, beam_args, address=args.dask_address, workers=args.dask_workers
    ) as beam_args:
        args.beam_args = beam_args
        yield args


def add_overwrite(parser, help: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=help)


def add_retry_failed(parser, help: str) -> None:
    """``--retry-failed``: a repair run (docs/download.md, "Repair runs")."""
    parser.add_argument("--retry-failed", action="store_true", help=help)
