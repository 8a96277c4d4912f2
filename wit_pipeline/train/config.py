"""The trainer's options: :class:`TrainConfig`, their checks, and the flags made from it.

Every field is a ``--flag`` of ``python -m wit_pipeline.train`` (``batch_size`` is
``--batch-size``, booleans are ``--x/--no-x``, tuples take several values); ``--config FILE``
(YAML or TOML, unknown keys are errors) sets several at once and flags override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from wit_pipeline import config as config_lib
from wit_pipeline.errors import WitError
from wit_pipeline.train import retrieval_sets


def _opt(default: Any, help: str) -> Any:
    """A dataclass field with its ``--help`` text."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Every option of ``python -m wit_pipeline.train`` (each field is a ``--flag``)."""

    # Data: shard tars (brace ranges, globs, directories; several values or "a::b" sources).
    train_data: tuple[str, ...] = _opt(
        (), "shard tars: brace ranges, globs, directories, fsspec URLs; several values or 'a::b'"
    )
    shuffle_buffer: int = _opt(1000, "samples per worker's shuffle buffer")
    caption_choice: str = _opt("random", "among a sample's captions: random | first")
    crop_scale_min: float = _opt(
        0.9, "random resized crop keeps this much area or more (open_clip)"
    )
    hflip: float = _opt(0.0, "probability of a horizontal flip of each training image")
    workers: int = _opt(2, "data loader processes per rank (0: load in the training process)")
    # Model.
    model: str = _opt(
        "wit-tiny",
        "open_clip architecture (ViT-B-32, RN50, ...) or a built-in wit-nano/wit-tiny/wit-small",
    )
    pretrained: str = _opt("", "initial weights: a checkpoint file or an open_clip tag")
    temperature_init: float = _opt(
        0.07, "initial softmax temperature (CLIP: 0.07); the learned scale is clamped at 100"
    )
    # Optimization.
    epochs: int = _opt(1, "passes over all shards")
    max_steps: int = _opt(0, "cap on optimizer steps (and the schedule's length); 0: epochs decide")
    batch_size: int = _opt(128, "per rank and micro-batch")
    accum_freq: int = _opt(1, "micro-batches per optimizer step (contrastive batch = all of them)")
    lr: float = _opt(5e-4, "peak learning rate (after warmup)")
    min_lr: float = _opt(0.0, "cosine floor")
    warmup: int = _opt(100, "warmup steps")
    wd: float = _opt(0.2, "AdamW decoupled weight decay (not on gains, biases, logit scale)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.98, "AdamW beta2")
    eps: float = _opt(1e-6, "AdamW epsilon")
    grad_clip: float = _opt(1.0, "max global gradient norm; 0 disables")
    precision: str = _opt("auto", "auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    seed: int = _opt(0, "seed of the model init, shard order, shuffle, caption draws and crops")
    # Where it runs.
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    threads: int = _opt(
        0, "torch intra-op threads in the training process; 0 keeps torch's default"
    )
    # Output.
    output: str = _opt("runs/wit", "output folder: checkpoints/, metrics.jsonl, loss.png, eval.png")
    resume: str = _opt("", '"latest" (OUTPUT/checkpoints/latest.pt) or a checkpoint path')
    save_every_steps: int = _opt(0, "also refresh latest.pt every N steps (0: at epoch ends only)")
    epoch_checkpoints: bool = _opt(True, "also keep checkpoints/epoch_N.pt after every epoch")
    stop_after_steps: int = _opt(
        0, "end this run after N total steps (schedule unchanged); resume later"
    )
    log_every: int = _opt(10, "steps between metrics.jsonl records")
    progress: bool = _opt(True, "progress bar on stderr")
    plots: bool = _opt(True, "loss.png and eval.png")
    # Evaluation after each `eval_every` epochs (and at the end).
    eval_zeroshot: tuple[str, ...] = _opt((), "labelled sets: PATH or NAME=PATH")
    eval_zeroshot_templates: str = _opt(
        "auto", "auto | imagenet | cifar10 | cifar100 | simple | a template file"
    )
    eval_retrieval_captions: str = _opt(
        "", "an image-caption set: COCO or Karpathy JSON, CSV/TSV/Parquet/JSONL (docs/train.md)"
    )
    eval_retrieval_images: str = _opt(
        "", "its image folder (not needed when the file embeds the images)"
    )
    eval_retrieval_split: str = _opt(
        "", "split to evaluate; '': the file's only split (Karpathy files: test)"
    )
    eval_retrieval_format: str = _opt(
        "auto", "auto | coco | karpathy | csv | tsv | parquet | jsonl"
    )
    eval_retrieval_image_column: str = _opt("", "tables: the image column ('': detect)")
    eval_retrieval_caption_column: str = _opt("", "tables: the caption column ('': detect)")
    eval_retrieval_split_column: str = _opt("", "tables: the split column ('': 'split' if any)")
    eval_pairs: str = _opt(
        "",
        "held-out shards of true pairs: AUC of true vs shuffled pairs (pairs/auc, pairs/recall@p95)",
    )
    eval_every: int = _opt(1, "evaluate after every N epochs (and after the last)")
    eval_max_samples: int = _opt(0, "cap per eval set (evenly spaced); 0: all")
    eval_batch_size: int = _opt(256, "images per evaluation batch")
    # An evaluation suite (wit eval suite's YAML) every N steps and at the end.
    eval_suite: str = _opt("", "a suite file (wit eval suite --config): run every N steps")
    eval_suite_every: int = _opt(0, "steps between suite runs (0: only at the end)")
    # Early stopping on an evaluation metric (higher is better), with checkpoints/best.pt.
    early_stop_metric: str = _opt(
        "", "evaluation metric to keep checkpoints/best.pt by (higher is better), e.g. pairs/auc"
    )
    early_stop_patience: int = _opt(
        0, "stop after N evaluations without a better early_stop_metric (0: never stop early)"
    )


def _flag(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def validate(cfg: TrainConfig) -> None:
    """One-line errors for options that cannot work, before anything expensive starts."""
    if not cfg.train_data:
        raise WitError("--train-data is required (shard tars, brace ranges, globs or folders)")
    positive = ("epochs", "batch_size", "accum_freq", "log_every", "eval_every", "eval_batch_size")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise WitError(f"{_flag(name)} must be positive")
    for name in (
        "max_steps",
        "warmup",
        "workers",
        "threads",
        "save_every_steps",
        "stop_after_steps",
        "early_stop_patience",
    ):
        if getattr(cfg, name) < 0:
            raise WitError(f"{_flag(name)} must not be negative")
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        raise WitError("--lr must be positive and --min-lr between 0 and --lr")
    if not 0 < cfg.crop_scale_min <= 1:
        raise WitError("--crop-scale-min must be in (0, 1]")
    if not 0 <= cfg.hflip <= 1:
        raise WitError("--hflip must be in [0, 1]")
    if cfg.early_stop_patience and not cfg.early_stop_metric:
        raise WitError("--early-stop-patience needs --early-stop-metric")
    if cfg.early_stop_metric and not (
        cfg.eval_pairs or cfg.eval_zeroshot or cfg.eval_retrieval_captions
    ):
        raise WitError("--early-stop-metric needs an evaluation set (--eval-pairs, --eval-*)")
    if not 0 < cfg.temperature_init < 1:
        raise WitError("--temperature-init must be in (0, 1)")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise WitError("--precision must be auto, fp32, bf16 or fp16")
    if cfg.caption_choice not in ("random", "first"):
        raise WitError("--caption-choice must be random or first")
    if cfg.eval_retrieval_images and not cfg.eval_retrieval_captions:
        raise WitError("--eval-retrieval-images needs --eval-retrieval-captions")
    if cfg.eval_retrieval_format not in retrieval_sets.FORMATS:
        raise WitError(
            f"--eval-retrieval-format must be one of {', '.join(retrieval_sets.FORMATS)}"
        )
    if cfg.eval_suite_every < 0:
        raise WitError("--eval-suite-every must not be negative")
    if cfg.eval_suite_every and not cfg.eval_suite:
        raise WitError("--eval-suite-every needs --eval-suite")


def build_parser(
    cls: type = TrainConfig, prog: str = "python -m wit_pipeline.train"
) -> argparse.ArgumentParser:
    """``--key value`` flags for every field of ``cls`` (tuples take several values)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(cls.__doc__ or "").strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML or TOML file of options; flags override it")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": f"{help_text} (default: {default!r})" if help_text else f"default: {default!r}",
        }
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is tuple:
            kwargs["nargs"] = "+"
            kwargs["metavar"] = f.name.upper()
        else:
            kwargs["metavar"] = getattr(tp, "__name__", "VALUE").upper()
        parser.add_argument(_flag(f.name), **kwargs)
    return parser


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from ``--config`` (if given) overridden by flags."""
    args = build_parser().parse_args(argv)
    values = vars(args)
    path = values.pop("config", None)
    base = config_lib.to_dict(config_lib.load_config(path, TrainConfig)) if path else {}
    base.update(values)
    return config_lib.from_dict(TrainConfig, base)
