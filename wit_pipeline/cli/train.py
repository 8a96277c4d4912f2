"""``wit train ...``: the same as ``python -m wit_pipeline.train ...`` (every flag passes through)."""

from __future__ import annotations

import argparse

HELP = "train a CLIP model on shards (python -m wit_pipeline.train; --help for options)"
ADD_HELP = False  # `wit train --help` shows the trainer's own help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=_run, accepts_beam_args=True, passes_args_through=True)


def _run(args: argparse.Namespace) -> int:
    from wit_pipeline.train.loop import main

    return main(list(args.beam_args))
