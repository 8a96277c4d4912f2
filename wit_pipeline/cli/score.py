"""``wit score``: CLIP-score every shard sample with a seed model, optionally filtering."""

from __future__ import annotations

import argparse
import json
import os
import sys

from wit_pipeline.cli import args as args_lib

HELP = "add clip_score to shards with a seed CLIP; filter pairs by threshold or top fraction"
DESCRIPTION = (
    "Score every image-caption pair of a shard directory with a seed CLIP (Beam "
    "RunInference) and write the shards back with clip_score per pair in KEY.json and the "
    "Parquet; --threshold X, --threshold auto (calibrated to score.target_precision) or "
    "--keep-fraction drops the pairs below it with reason low_clip_score, and a sample when "
    "none of its pairs is left. Unknown --flags go to Beam (--runner, --direct_num_workers, ...)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    args_lib.add_input(
        parser, "directory of finished shards (or its parent)", metavar="DIR", many=False
    )
    args_lib.add_output(parser)
    args_lib.add_flags(parser, "--model", "--pretrained")
    args_lib.add_flags(parser, "--threshold", "--keep-fraction", exclusive=True)
    args_lib.add_flags(parser, "--batch-size", "--device")
    args_lib.add_config(parser, sections="its score section", example="score.batch_size=64")
    args_lib.add_runner(parser)
    parser.set_defaults(func=run)


def _input_dir(path: str) -> str:
    from wit_pipeline import shards

    if not shards.list_shards(path) and os.path.isdir(os.path.join(path, "shards")):
        return os.path.join(path, "shards")
    return path


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import apache_beam as beam

    from wit_pipeline import beam_utils, fileio, models
    from wit_pipeline.errors import WitError
    from wit_pipeline.stages import score

    cfg = args_lib.build_config(args).score
    if not cfg.pretrained:
        raise WitError("wit score needs a seed model: --pretrained CHECKPOINT_OR_TAG")
    # Fail here, in one line, rather than inside a Beam worker: a missing or mismatched
    # checkpoint, an unknown architecture or an unreachable pretrained tag.
    loaded = models.load_model(cfg.model or None, cfg.pretrained, device="cpu")
    if not cfg.model:
        cfg = dataclasses.replace(cfg, model=loaded.model_name)
    del loaded
    input_dir = _input_dir(args.input)
    options = beam_utils.pipeline_options(args.beam_args, runner=args.runner)
    with beam.Pipeline(options=options) as p:
        _ = p | "ScoreShards" >> score.ScoreShards(
            input_dir=input_dir, output_dir=args.output, config=cfg
        )
    stats = beam_utils.check_stats_file(os.path.join(args.output, "stats.json"))
    doc = fileio.read_json(os.path.join(args.output, "stats.json"))
    print(f"score: {score.describe(doc['score'])}", file=sys.stderr)
    print(
        json.dumps(
            {"output": args.output, "counters": stats, "pair_counters": doc["pair_counters"]},
            indent=2,
            sort_keys=True,
        )
    )
    return 0
