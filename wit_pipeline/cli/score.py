"""``wit score``: CLIP-score every shard sample with a seed model, optionally filtering."""

from __future__ import annotations

import argparse
import json
import os


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score",
        help="add clip_score to shards with a seed CLIP; filter by threshold or top fraction",
        description=(
            "Score every image-caption pair of a shard directory with a seed CLIP (Beam "
            "RunInference) and write the shards back with clip_score in KEY.json and the "
            "Parquet; --threshold or --keep-fraction drops the rest with reason low_clip_score. "
            "Unknown --flags go to Beam (--runner, --direct_num_workers, ...)."
        ),
    )
    parser.add_argument(
        "--input", required=True, help="directory of finished shards (or its parent)"
    )
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--model", default=None, help="open_clip architecture (ViT-B-32, wit-tiny)")
    parser.add_argument(
        "--pretrained",
        default=None,
        help="seed weights: a checkpoint (wit_pipeline.train or open_clip) or an open_clip tag",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--threshold", type=float, default=None, help="keep clip_score >= X (LAION: 0.28)"
    )
    group.add_argument(
        "--keep-fraction", type=float, default=None, help="keep the top F by score (DataComp: 0.3)"
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default=None, help="auto (GPU when present), cpu, cuda")
    parser.add_argument("--config", default=None, help="YAML/TOML build config (its score section)")
    parser.set_defaults(func=run, accepts_beam_args=True)


def _input_dir(path: str) -> str:
    from wit_pipeline import shards

    if not shards.list_shards(path) and os.path.isdir(os.path.join(path, "shards")):
        return os.path.join(path, "shards")
    return path


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import apache_beam as beam

    from wit_pipeline import beam_utils, config, models
    from wit_pipeline.errors import WitError
    from wit_pipeline.stages import score

    cfg = config.load_config(args.config).score
    updates = {
        "model": args.model,
        "pretrained": args.pretrained,
        "batch_size": args.batch_size,
        "device": args.device,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in updates.items() if v is not None})
    if args.threshold is not None or args.keep_fraction is not None:
        cfg = dataclasses.replace(cfg, threshold=args.threshold, keep_fraction=args.keep_fraction)
    if not cfg.pretrained:
        raise WitError("wit score needs a seed model: --pretrained CHECKPOINT_OR_TAG")
    # Fail here, in one line, rather than inside a Beam worker: a missing or mismatched
    # checkpoint, an unknown architecture or an unreachable pretrained tag.
    loaded = models.load_model(cfg.model or None, cfg.pretrained, device="cpu")
    if not cfg.model:
        cfg = dataclasses.replace(cfg, model=loaded.model_name)
    del loaded
    input_dir = _input_dir(args.input)
    options = beam_utils.pipeline_options(args.beam_args)
    with beam.Pipeline(options=options) as p:
        _ = p | "ScoreShards" >> score.ScoreShards(
            input_dir=input_dir, output_dir=args.output, config=cfg
        )
    stats = beam_utils.check_stats_file(os.path.join(args.output, "stats.json"))
    print(json.dumps({"output": args.output, "counters": stats}, indent=2, sort_keys=True))
    return 0
