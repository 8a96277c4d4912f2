"""The ``wit`` command line: one sub-command per stage, plus ``build`` for the whole pipeline.

Each sub-command lives in ``wit_pipeline/cli/<name>.py``: its ``HELP`` line (and optionally
``DESCRIPTION``, ``EPILOG`` examples, ``ADD_HELP = False``) and ``add_arguments(parser)``, which
adds its own arguments and sets ``func``. Arguments several commands share, and the one table
from flags to config fields, are in ``cli/args.py``. Heavy imports (Beam, torch) happen only
when a command runs, so ``wit --help`` is instant.

Unknown ``--flags`` are passed to Beam as pipeline options (``--runner``, ``--direct_num_workers``,
``--project``, ...). User errors print one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from wit_pipeline.cli import args as args_lib
from wit_pipeline.errors import exit_status

# Order is the order shown in --help.
COMMANDS = (
    "gather",
    "queries",
    "download",
    "dedup",
    "balance",
    "build",
    "remove",
    "report",
    "score",
    "seed",
    "eval",
    "train",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wit",
        description="Build CLIP-style image-text datasets from web crawls, and train on them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"wit_pipeline.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"wit_pipeline.cli.{name}":
                continue  # command not part of this build
            raise
        command = args_lib.add_command(
            sub,
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", ""),
            epilog=getattr(module, "EPILOG", ""),
            add_help=getattr(module, "ADD_HELP", True),
        )
        module.add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    if beam_args and not getattr(args, "accepts_beam_args", False):
        parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    if beam_args and not getattr(args, "passes_args_through", False):
        from wit_pipeline.beam_utils import unknown_beam_flags

        unknown = unknown_beam_flags(beam_args)
        if unknown:
            parser.error(f"unrecognized arguments (neither wit's nor Beam's): {' '.join(unknown)}")
    args.beam_args = beam_args
    return exit_status(lambda: _run(args), prog="wit")


def _run(args: argparse.Namespace) -> int:
    if not getattr(args, "runner_session", False):
        return args.func(args)
    with args_lib.runner_session(args):  # --runner dask: the cluster lives as long as this
        return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
