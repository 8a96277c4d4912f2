"""``wit eval zeroshot|retrieval|suite``: how good is a checkpoint (and so the data it was trained
on)?"""

from __future__ import annotations

import argparse
import json
import sys

from wit_pipeline.cli import args as args_lib

HELP = "zero-shot classification, image-text retrieval and eval suites of a CLIP checkpoint"
DESCRIPTION = "Evaluate a CLIP checkpoint offline; prints the metrics as JSON."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = args_lib.add_subcommands(parser, "eval_command", "KIND")

    def common(
        p: argparse.ArgumentParser, output_help: str = "also write the JSON to this file"
    ) -> None:
        p.add_argument(
            "--checkpoint",
            required=True,
            help="checkpoint file (wit_pipeline.train, open_clip .pt/.safetensors) or open_clip tag",
        )
        p.add_argument(
            "--model",
            default="",
            help="open_clip architecture (ViT-B-32, wit-tiny, ...); optional for checkpoints "
            "written by wit_pipeline.train, which record it",
        )
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--output", default="", help=output_help)

    z = sub.add_parser("zeroshot", help="zero-shot accuracy on a labelled set")
    common(z)
    z.add_argument(
        "--dataset",
        required=True,
        help="Parquet with image bytes and labels (e.g. cifar10/test.parquet) or class folders",
    )
    z.add_argument(
        "--templates",
        default="auto",
        help="auto (the dataset's own when known, else imagenet), imagenet (CLIP's 80), "
        "cifar10, cifar100, simple, or a file with one template per line ({} = class name)",
    )
    z.add_argument(
        "--classnames", default="", help="file with one class name per line (label order)"
    )
    z.add_argument("--image-column", default="image")
    z.add_argument("--label-column", default="label")
    z.add_argument("--max-samples", type=int, default=0, help="evaluate on N evenly spaced samples")
    z.add_argument("--no-per-class", action="store_true", help="omit per-class accuracies")
    z.set_defaults(func=run_zeroshot)

    r = sub.add_parser(
        "retrieval",
        help="image<->text recall@1/5/10 on a caption set (COCO, Karpathy, CSV/TSV/Parquet)",
    )
    common(r)
    add_caption_arguments(r)
    r.add_argument("--max-images", type=int, default=0, help="evaluate on N evenly spaced images")
    r.add_argument(
        "--bootstrap",
        type=int,
        default=0,
        metavar="N",
        help="add a 95%% interval of each text-to-image R@k from N resamples of the captions",
    )
    r.add_argument(
        "--ranks",
        action="store_true",
        help="add every caption's text-to-image rank (text_to_image_ranks)",
    )
    r.set_defaults(func=run_retrieval)

    s = sub.add_parser(
        "suite",
        help="every set of a suite (zero-shot and retrieval): one JSON, one table, one plot",
        description="Evaluate a checkpoint on every set of a suite file and of --set; writes "
        "suite.json, suite.md and suite.png to --output and prints the table.",
    )
    common(s, "folder for suite.json, suite.md and suite.png (default: eval-suite)")
    s.add_argument(
        "--config",
        default="",
        metavar="FILE",
        help="suite file (YAML or TOML): sets: {NAME: {kind: zeroshot|retrieval, ...}}",
    )
    s.add_argument(
        "--set",
        action="append",
        default=[],
        dest="sets",
        metavar="NAME=KIND:PATH[,key=value...]",
        help="add (or replace) a set, e.g. cifar10=zeroshot:cifar10/test.parquet or "
        "coco=retrieval:captions_val2017.json,images=val2017 (repeatable)",
    )
    s.add_argument(
        "--max-samples",
        type=int,
        default=0,
        help="cap every set at N evenly spaced samples/images (a set's own cap wins)",
    )
    s.set_defaults(func=run_suite)


def add_caption_arguments(p: argparse.ArgumentParser) -> None:
    """``--captions`` and how to read it (formats in docs/train.md)."""
    from wit_pipeline.train.retrieval_sets import FORMATS

    p.add_argument(
        "--captions",
        required=True,
        help="caption file: COCO captions JSON, Karpathy split JSON (dataset_coco.json), or a "
        "CSV/TSV/Parquet/JSONL table with an image and a caption column",
    )
    p.add_argument(
        "--images",
        default="",
        help="folder the file's image names are relative to (not needed when the file embeds "
        "the images or names absolute paths)",
    )
    p.add_argument(
        "--split",
        default="",
        help="split to evaluate; default: the file's only split, or every image when it has "
        "none (Karpathy files: test); several splits need one named",
    )
    p.add_argument(
        "--captions-format",
        dest="format",
        default="auto",
        choices=FORMATS,
        help="default: by name and content",
    )
    p.add_argument("--image-column", default="", help="tables: the image column (default: detect)")
    p.add_argument(
        "--caption-column", default="", help="tables: the caption column (default: detect)"
    )
    p.add_argument(
        "--split-column", default="", help="tables: the split column (default: 'split' if any)"
    )


def _emit(result: dict, output: str) -> None:
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if output:
        from wit_pipeline import fileio

        fileio.write_json(output, result)
    sys.stdout.flush()


def _load(args: argparse.Namespace):
    from wit_pipeline import models

    return models.load_model(args.model or None, args.checkpoint, device=args.device)


def run_zeroshot(args: argparse.Namespace) -> int:
    from wit_pipeline.train import evaluate

    classnames = evaluate.read_classnames(args.classnames) if args.classnames else None
    dataset = evaluate.load_labelled_set(
        args.dataset,
        image_column=args.image_column,
        label_column=args.label_column,
        classnames=classnames,
        max_samples=args.max_samples,
    )
    templates = evaluate.resolve_templates(args.templates, dataset.name)
    loaded = _load(args)
    result = evaluate.run_zeroshot(
        loaded.model,
        loaded.preprocess,
        loaded.tokenizer,
        dataset,
        templates=templates,
        device=loaded.device,
        batch_size=args.batch_size,
    )
    if args.no_per_class:
        result.pop("per_class_top1", None)
    result.update(model=loaded.model_name, checkpoint=args.checkpoint, templates=args.templates)
    _emit(result, args.output)
    return 0


def run_retrieval(args: argparse.Namespace) -> int:
    from wit_pipeline.train import evaluate, retrieval_sets

    dataset = retrieval_sets.load_retrieval_set(
        args.captions,
        images=args.images,
        options=retrieval_sets.CaptionOptions.from_values(vars(args)),
        max_images=args.max_images,
    )
    loaded = _load(args)
    result = evaluate.run_retrieval(
        loaded.model,
        loaded.preprocess,
        loaded.tokenizer,
        dataset,
        device=loaded.device,
        batch_size=args.batch_size,
        bootstrap=args.bootstrap,
        ranks=args.ranks,
    )
    result.update(model=loaded.model_name, checkpoint=args.checkpoint)
    _emit(result, args.output)
    return 0


def run_suite(args: argparse.Namespace) -> int:
    from wit_pipeline.train import suite as suite_lib

    suite = suite_lib.Suite.from_file(args.config, args.sets, max_samples=args.max_samples)
    loaded = _load(args)
    doc = suite.run(
        loaded.model,
        loaded.preprocess,
        loaded.tokenizer,
        device=loaded.device,
        batch_size=args.batch_size,
    )
    doc = {"checkpoint": args.checkpoint, "model": loaded.model_name, **doc}
    paths = suite_lib.write_outputs(doc, args.output or "eval-suite")
    print(suite_lib.markdown(doc), end="")
    print(f"wrote {', '.join(paths)}", file=sys.stderr)
    sys.stdout.flush()
    return 0
