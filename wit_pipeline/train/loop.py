"""Contrastive training of CLIP models on webdataset shards: ``python -m wit_pipeline.train``.

The CLIP recipe (Radford et al. 2021, section 2.5) on open_clip models:

- symmetric cross-entropy over cosine-similarity logits (open_clip's ``ClipLoss``, features
  gathered across ranks under DDP, so negatives come from the global batch);
- a learnable temperature, initialized to 0.07 and clamped so logits are scaled by at most 100;
- AdamW with decoupled weight decay, none on gains, biases and the logit scale;
- linear warmup then cosine decay; gradient clipping; gradient accumulation that keeps the
  contrastive batch whole (features of the other micro-batches are cached, as open_clip does);
- bf16/fp16 autocast on GPU; DDP under ``torchrun``.

Options are one dataclass, :class:`TrainConfig`: every field is a ``--flag`` (``--batch-size``),
and ``--config FILE`` (YAML/TOML) sets several at once. Output in ``--output``:
``checkpoints/latest.pt`` and ``checkpoints/epoch_N.pt`` (loadable with
``torch.load(..., weights_only=True)`` and ``open_clip.create_model_and_transforms(name,
pretrained=PATH)``), ``metrics.jsonl``, ``loss.png`` and ``eval.png``.

Resume (``--resume latest`` or a path) restores weights, optimizer, scaler, step and the data
position. With the same shards, seed, batch size, worker count and world size, a resumed epoch
delivers exactly the batches the interrupted one had not consumed yet: no sample is repeated or
skipped (see ``wds_data``); only the interleaving of workers after the resume point may differ.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from wit_pipeline import config as config_lib
from wit_pipeline import fileio
from wit_pipeline.errors import WitError

LOG = logging.getLogger("wit_pipeline.train")
MAX_LOGIT_SCALE = 100.0


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
    eval_retrieval_captions: str = _opt("", "captions.tsv of an image-caption set")
    eval_retrieval_images: str = _opt("", "its image folder")
    eval_retrieval_split: str = _opt("dev", "split of the captions.tsv to evaluate")
    eval_every: int = _opt(1, "evaluate after every N epochs (and after the last)")
    eval_max_samples: int = _opt(0, "cap per eval set (evenly spaced); 0: all")
    eval_batch_size: int = _opt(256, "images per evaluation batch")


def validate(cfg: TrainConfig) -> None:
    """One-line errors for options that cannot work, before anything expensive starts."""
    if not cfg.train_data:
        raise WitError("--train-data is required (shard tars, brace ranges, globs or folders)")
    positive = ("epochs", "batch_size", "accum_freq", "log_every", "eval_every", "eval_batch_size")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise WitError(f"--{name.replace('_', '-')} must be positive")
    for name in (
        "max_steps",
        "warmup",
        "workers",
        "threads",
        "save_every_steps",
        "stop_after_steps",
    ):
        if getattr(cfg, name) < 0:
            raise WitError(f"--{name.replace('_', '-')} must not be negative")
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        raise WitError("--lr must be positive and --min-lr between 0 and --lr")
    if not 0 < cfg.crop_scale_min <= 1:
        raise WitError("--crop-scale-min must be in (0, 1]")
    if not 0 < cfg.temperature_init < 1:
        raise WitError("--temperature-init must be in (0, 1)")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise WitError("--precision must be auto, fp32, bf16 or fp16")
    if cfg.caption_choice not in ("random", "first"):
        raise WitError("--caption-choice must be random or first")
    if bool(cfg.eval_retrieval_captions) != bool(cfg.eval_retrieval_images):
        raise WitError("--eval-retrieval-captions and --eval-retrieval-images go together")


# ---------------------------------------------------------------------------------------------
# Command line generated from the dataclass


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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


# ---------------------------------------------------------------------------------------------
# Pure pieces: schedule, parameter groups, loss


def lr_at(step: int, *, base_lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warmup, then cosine decay."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    decay_steps = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)


def no_weight_decay(name: str, param: Any) -> bool:
    """Gains, biases, the logit scale (and other 1-d parameters) get no weight decay (CLIP)."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def clamp_logit_scale(model: Any, max_scale: float = MAX_LOGIT_SCALE) -> None:
    """Keep ``exp(logit_scale)`` in [1, max_scale] (the CLIP paper clips it at 100)."""
    import torch

    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, math.log(max_scale))


def unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


def make_optimizer(model: Any, cfg: TrainConfig, device: str) -> Any:
    import torch

    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    # The fused kernel updates every tensor in one pass (CPU and CUDA), several times faster than
    # the per-tensor loop for models with a large token embedding.
    try:
        return torch.optim.AdamW(param_groups(model, cfg.wd), fused=True, **kwargs)
    except (RuntimeError, TypeError):  # devices without a fused kernel
        return torch.optim.AdamW(param_groups(model, cfg.wd), **kwargs)


# ---------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class Runtime:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(device: str) -> Runtime:
    """Rank and device from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    import torch
    import torch.distributed as dist

    from wit_pipeline import models

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = models.resolve_device(device)
    if world_size > 1:
        if device == "cuda":
            device = f"cuda:{local_rank}"
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Runtime(rank, local_rank, world_size, device, world_size > 1)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_dir(output: str) -> str:
    return fileio.join(output, "checkpoints")


def save_checkpoint(path: str, payload: dict[str, Any]) -> None:
    """``torch.save`` through an atomic write: a crash never leaves a half-written checkpoint."""
    import torch

    with fileio.atomic_write(path, "wb") as f:
        torch.save(payload, f)


def resolve_resume(cfg: TrainConfig) -> str | None:
    """The checkpoint to resume from, or None; refuses to overwrite a run by accident."""
    latest = fileio.join(checkpoint_dir(cfg.output), "latest.pt")
    if not cfg.resume:
        if fileio.exists(latest):
            raise WitError(
                f"{cfg.output} already holds a run ({latest}); pass --resume latest to continue "
                f"it or choose another --output"
            )
        return None
    path = latest if cfg.resume == "latest" else cfg.resume
    if not fileio.exists(path):
        raise WitError(f"checkpoint to resume not found: {path}")
    return path


# ---------------------------------------------------------------------------------------------
# Metrics and plots


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` (main rank only)."""

    def __init__(self, path: str, enabled: bool):
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records newer than ``step`` (written after the checkpoint a run resumes from)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        with fileio.atomic_write(self.path, "w") as f:
            for row in rows:
                if int(row.get("step", 0)) <= step:
                    f.write(json.dumps(row, sort_keys=True) + "\n")

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def write_plots(rows: Sequence[dict[str, Any]], output: str) -> list[str]:
    """``loss.png`` (loss and learning rate by step) and ``eval.png`` (eval metrics by epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    train = [r for r in rows if r.get("type") == "train"]
    if train:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="loss")
        ax.set_xlabel("step")
        ax.set_ylabel("contrastive loss")
        ax2 = ax.twinx()
        ax2.plot(
            [r["step"] for r in train], [r["lr"] for r in train], color="tab:orange", alpha=0.5
        )
        ax2.set_ylabel("learning rate", color="tab:orange")
        ax.set_title("training loss")
        fig.tight_layout()
        path = os.path.join(output, "loss.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    evals = [r for r in rows if r.get("type") == "eval"]
    series: dict[str, list[tuple[float, float]]] = {}
    for r in evals:
        for name, value in r.get("metrics", {}).items():
            if isinstance(value, int | float) and (name.endswith(("top1", "top5")) or "R@" in name):
                series.setdefault(name, []).append((r["epoch"], float(value)))
    if series:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, pts in sorted(series.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy / recall")
        ax.legend(fontsize=7)
        ax.set_title("evaluation")
        fig.tight_layout()
        path = os.path.join(output, "eval.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# Evaluation hook


class EpochEvaluator:
    """Runs the configured zero-shot and retrieval sets on the current model."""

    def __init__(self, cfg: TrainConfig):
        from wit_pipeline.train import evaluate

        self.cfg = cfg
        self.sets: list[tuple[str, Any, list[str]]] = []
        for spec in cfg.eval_zeroshot:
            name, sep, path = spec.partition("=")
            if not sep:
                name, path = "", spec
            ds = evaluate.load_labelled_set(path, max_samples=cfg.eval_max_samples)
            name = name or ds.name
            templates = evaluate.resolve_templates(cfg.eval_zeroshot_templates, ds.name)
            self.sets.append((name, ds, templates))
        if cfg.eval_retrieval_captions:
            from wit_pipeline.train import caption_sets

            caption_sets.read_captions_tsv(
                cfg.eval_retrieval_captions, split=cfg.eval_retrieval_split
            )

    @property
    def enabled(self) -> bool:
        return bool(self.sets or self.cfg.eval_retrieval_captions)

    def __call__(self, model: Any, tokenizer: Any, device: str) -> dict[str, Any]:
        from wit_pipeline.train import evaluate

        model = unwrap(model)
        preprocess = evaluate.eval_transform(model)
        out: dict[str, Any] = {}
        for name, ds, templates in self.sets:
            res = evaluate.run_zeroshot(
                model,
                preprocess,
                tokenizer,
                ds,
                templates=templates,
                device=device,
                batch_size=self.cfg.eval_batch_size,
            )
            out[f"{name}/top1"] = res["top1"]
            out[f"{name}/top5"] = res["top5"]
            out[f"{name}/mean_per_class_top1"] = res["mean_per_class_top1"]
        if self.cfg.eval_retrieval_captions:
            res = evaluate.run_retrieval(
                model,
                preprocess,
                tokenizer,
                images_dir=self.cfg.eval_retrieval_images,
                captions_tsv=self.cfg.eval_retrieval_captions,
                split=self.cfg.eval_retrieval_split or None,
                device=device,
                batch_size=self.cfg.eval_batch_size,
                max_images=self.cfg.eval_max_samples,
            )
            for k, v in res.items():
                if "R@" in k:
                    out[f"retrieval/{k}"] = v
        return out


# ---------------------------------------------------------------------------------------------
# Training


def _model_cfg_for_checkpoint(name: str) -> dict[str, Any]:
    from wit_pipeline import models

    return models.model_config(name)


def build_model(cfg: TrainConfig, device: str) -> Any:
    """A fresh (or ``--pretrained``-initialized) open_clip model in training mode."""
    import open_clip
    import torch

    from wit_pipeline import models

    models.model_config(cfg.model)  # clear error for unknown names
    if cfg.pretrained:
        model = models.load_model(cfg.model, cfg.pretrained, device="cpu").model
    else:
        torch.manual_seed(cfg.seed)
        with models.quiet_open_clip():
            model = open_clip.create_model(cfg.model, device="cpu")
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1.0 / cfg.temperature_init))
    model.output_dict = True
    return model.to(torch.device(device)).train()


def _sync_step(
    exhausted: bool, sizes: Sequence[int], skipped: int, rt: Runtime
) -> tuple[bool, list[int], int, int]:
    """What every rank must agree on before a step (one tiny all_gather under DDP).

    Returns whether any rank ran out of batches; the smallest size of each micro-batch over the
    ranks (a rank's batch is short when images in it failed to decode); the samples skipped on
    all ranks together; and how many samples all ranks together drop by trimming their
    micro-batches to those sizes. Every rank trims: the features gathered for the contrastive
    loss must have the same shape on every rank.
    """
    if not rt.distributed:
        return exhausted, list(sizes), skipped, 0
    import torch
    import torch.distributed as dist

    device = rt.device if rt.device.startswith("cuda") else "cpu"
    mine = torch.tensor([int(exhausted), skipped, *sizes], dtype=torch.long, device=device)
    every = [torch.zeros_like(mine) for _ in range(rt.world_size)]
    dist.all_gather(every, mine)
    table = torch.stack(every).cpu()
    smallest = table[:, 2:].min(dim=0).values
    return (
        bool(table[:, 0].max()),
        [int(x) for x in smallest],
        int(table[:, 1].sum()),
        int((table[:, 2:] - smallest).sum()),
    )


def _gather_positions(consumed: list[int], rt: Runtime) -> list[list[int]]:
    if not rt.distributed:
        return [list(consumed)]
    import torch.distributed as dist

    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, list(consumed))
    return [list(x) for x in out]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns a summary (steps, samples, last metrics, paths)."""
    from wit_pipeline.train import data as wds_data

    # User errors first, before the slow imports.
    validate(cfg)
    resume_path = resolve_resume(cfg)
    shard_paths = wds_data.expand_shard_patterns(cfg.train_data)

    import open_clip
    import torch
    from open_clip import ClipLoss
    from tqdm import tqdm

    from wit_pipeline import models

    models.register_model_configs()
    rt = init_runtime(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    precision = models.resolve_precision(cfg.precision, rt.device)
    if rt.is_main:
        fileio.makedirs(checkpoint_dir(cfg.output))

    # Data.
    counts = wds_data.shard_sample_counts(shard_paths)
    model_cfg = _model_cfg_for_checkpoint(cfg.model)
    size = model_cfg["vision_cfg"]["image_size"]
    image_size = int(size[0] if isinstance(size, list | tuple) else size)
    model_name = cfg.model
    stream = wds_data.ShardStream(
        shard_paths,
        counts,
        batch_size=cfg.batch_size,
        image_size=image_size,
        tokenizer_factory=_TokenizerFactory(model_name, model_cfg),
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        crop_scale=(cfg.crop_scale_min, 1.0),
        caption_choice=cfg.caption_choice,
        workers=max(1, cfg.workers),
        rank=rt.rank,
        world_size=rt.world_size,
    )
    loader = wds_data.make_loader(
        stream, num_workers=cfg.workers, pin_memory=rt.device.startswith("cuda")
    )
    steps_per_epoch = [stream.batches_per_epoch(e) // cfg.accum_freq for e in range(cfg.epochs)]
    total_steps = sum(steps_per_epoch)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    if total_steps <= 0:
        raise WitError(
            f"{sum(counts)} samples in {len(shard_paths)} shard(s) make no full batch of "
            f"{cfg.batch_size} x {cfg.accum_freq} per rank and worker; lower --batch-size or --workers"
        )

    # Model, optimizer, loss.
    model = build_model(cfg, rt.device)
    optimizer = make_optimizer(model, cfg, rt.device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    tokenizer = open_clip.get_tokenizer(model_name)
    if rt.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.local_rank] if rt.device.startswith("cuda") else None
        )
    # Under DDP each rank scores its own rows against the gathered global batch; gradients flow
    # back through the gather, and DDP's averaging then gives the full-batch gradient.
    loss_fn = ClipLoss(
        local_loss=rt.distributed,
        gather_with_grad=True,
        cache_labels=True,
        rank=rt.rank,
        world_size=rt.world_size,
    )

    step, epoch, samples_seen = 0, 0, 0
    consumed = [0] * stream.workers
    metrics = MetricsLog(fileio.join(cfg.output, "metrics.jsonl"), rt.is_main)
    if resume_path:
        ckpt = models.read_checkpoint(resume_path)
        if ckpt.get("model_name") != model_name:
            raise WitError(
                f"checkpoint {resume_path} holds a {ckpt.get('model_name')} model, not {model_name}"
            )
        unwrap(model).load_state_dict(models.state_dict_of(ckpt))
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step = int(ckpt["step"])
        pos = ckpt.get("data_position", {})
        epoch = int(pos.get("epoch", 0))
        samples_seen = int(pos.get("samples_seen", 0))
        saved = pos.get("consumed") or []
        same_layout = (
            int(pos.get("workers", -1)) == stream.workers
            and int(pos.get("world_size", -1)) == rt.world_size
            and int(pos.get("batch_size", -1)) == cfg.batch_size
        )
        if same_layout and len(saved) == rt.world_size:
            consumed = [int(x) for x in saved[rt.rank]]
        elif any(any(x) for x in saved):
            # A different layout cannot map worker positions; continue the epoch with the batches
            # it has left, reading each worker's stream from the equivalent fraction onwards.
            done = sum(sum(x) for x in saved) // max(1, stream.workers * rt.world_size)
            consumed = [done] * stream.workers
            LOG.warning(
                "resume with a different workers/world size/batch size: data position is approximate"
            )
        metrics.truncate_after(step)
        LOG.info("resumed from %s at step %d (epoch %d)", resume_path, step, epoch)
    if rt.is_main:
        metrics.write(
            {
                "type": "config",
                "step": step,
                "time": time.time(),
                "config": config_lib.to_dict(cfg),
                "total_steps": total_steps,
                "num_shards": len(shard_paths),
                "num_samples": sum(counts),
                "world_size": rt.world_size,
                "precision": precision,
                "device": rt.device,
            }
        )
    evaluator = EpochEvaluator(cfg) if rt.is_main else None

    def payload() -> dict[str, Any]:
        positions = _gather_positions(consumed, rt)
        return {
            "format": models.CHECKPOINT_FORMAT,
            "version": models.CHECKPOINT_VERSION,
            "model_name": model_name,
            "model_cfg": model_cfg,
            "state_dict": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": step,
            "total_steps": total_steps,
            "data_position": {
                "epoch": epoch,
                "consumed": positions,
                "samples_seen": samples_seen,
                "workers": stream.workers,
                "world_size": rt.world_size,
                "batch_size": cfg.batch_size,
            },
            "config": config_lib.to_dict(cfg),
            "time": time.time(),
        }

    def save(extra_names: Sequence[str] = ()) -> None:
        data = payload()  # collective under DDP: every rank builds it
        if rt.is_main:
            latest = fileio.join(checkpoint_dir(cfg.output), "latest.pt")
            save_checkpoint(latest, data)
            for name in extra_names:
                save_checkpoint(fileio.join(checkpoint_dir(cfg.output), name), data)

    def run_eval(finished_epoch: int) -> dict[str, Any]:
        """Evaluate after epoch ``finished_epoch`` (0-based, as in the train rows)."""
        result: dict[str, Any] = {}
        if rt.is_main and evaluator is not None and evaluator.enabled:
            t0 = time.time()
            result = evaluator(model, tokenizer, rt.device)
            metrics.write(
                {
                    "type": "eval",
                    "step": step,
                    "epoch": finished_epoch,
                    "metrics": result,
                    "seconds": round(time.time() - t0, 3),
                }
            )
        if rt.distributed:
            torch.distributed.barrier()
        return result

    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not (cfg.progress and rt.is_main),
        dynamic_ncols=True,
        desc="train",
        file=sys.stderr,
    )
    autocast = models.autocast(rt.device, precision)
    non_blocking = rt.device.startswith("cuda")
    last_eval: dict[str, Any] = {}
    stopped = False
    window = _new_window()
    model.train()
    while epoch < cfg.epochs and step < total_steps and not stopped:
        epoch_steps = steps_per_epoch[epoch]
        stream.set_epoch(epoch, consumed)
        batches = iter(loader)
        done_in_epoch = sum(consumed) // cfg.accum_freq
        t_data = time.time()
        while done_in_epoch < epoch_steps and step < total_steps:
            micro = []
            exhausted = False
            for _ in range(cfg.accum_freq):
                try:
                    micro.append(next(batches))
                except StopIteration:
                    exhausted = True
                    break
            sizes = [len(b["keys"]) for b in micro]
            sizes += [0] * (cfg.accum_freq - len(sizes))
            local_skipped = sum(int(b["skipped"]) for b in micro)
            exhausted, sizes, skipped, trimmed = _sync_step(exhausted, sizes, local_skipped, rt)
            if exhausted:
                break
            # Under DDP a rank whose batch lost undecodable images sets the size for all: the
            # others drop their last samples (counted as trimmed). Empty micro-batches are left
            # out; a step with no sample at all makes no update (it still counts as a step).
            used = [
                {**b, "images": b["images"][:n], "texts": b["texts"][:n], "keys": b["keys"][:n]}
                for b, n in zip(micro, sizes, strict=True)
                if n > 0
            ]
            data_s = time.time() - t_data
            lr = lr_at(
                step, base_lr=cfg.lr, warmup=cfg.warmup, total=total_steps, min_lr=cfg.min_lr
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = [
                wds_data.normalize(b["images"].to(rt.device, non_blocking=non_blocking))
                for b in used
            ]
            texts = [b["texts"].to(rt.device, non_blocking=non_blocking) for b in used]
            optimizer.zero_grad(set_to_none=True)
            if used:
                loss_value = _forward_backward(model, loss_fn, images, texts, autocast, scaler)
                _optimizer_step(model, optimizer, scaler, cfg.grad_clip)
                window["loss"] += loss_value
                window["n"] += 1
            else:
                LOG.warning("step %d: no decodable image in its batches; no update", step + 1)
            step += 1
            done_in_epoch += 1
            n_samples = sum(len(b["keys"]) for b in used) * rt.world_size
            samples_seen += n_samples
            for b in micro:
                consumed[b["worker"]] = b["index"] + 1
            window["skipped"] += skipped
            window["trimmed"] += trimmed
            window["samples"] += n_samples
            window["data_s"] += data_s
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps or done_in_epoch == epoch_steps:
                elapsed = max(1e-9, time.time() - window["t0"])
                row = {
                    "type": "train",
                    "step": step,
                    "epoch": epoch,
                    "loss": window["loss"] / window["n"] if window["n"] else None,
                    "lr": lr,
                    "logit_scale": float(unwrap(model).logit_scale.detach().exp()),
                    "samples_per_s": window["samples"] / elapsed,
                    "data_wait_fraction": window["data_s"] / elapsed,
                    "samples_seen": samples_seen,
                    "samples_skipped": window["skipped"],
                    "samples_trimmed": window["trimmed"],
                    "time": time.time(),
                }
                metrics.write(row)
                shown = "-" if row["loss"] is None else f"{row['loss']:.3f}"
                bar.set_postfix(loss=shown, sps=f"{row['samples_per_s']:.0f}")
                window = _new_window()
            if cfg.stop_after_steps and step >= cfg.stop_after_steps and step < total_steps:
                stopped = True
                break
            if cfg.save_every_steps and step % cfg.save_every_steps == 0:
                save()
            t_data = time.time()
        del batches
        if stopped:
            break
        finished_epoch = epoch
        epoch += 1
        consumed = [0] * stream.workers
        is_last = epoch >= cfg.epochs or step >= total_steps
        if (evaluator is not None or rt.distributed) and (is_last or epoch % cfg.eval_every == 0):
            last_eval = run_eval(finished_epoch) or last_eval
        save(extra_names=[f"epoch_{finished_epoch + 1}.pt"] if cfg.epoch_checkpoints else [])
        if rt.is_main and cfg.plots:
            write_plots(metrics.rows(), cfg.output)
        window = _new_window()  # throughput excludes evaluation and checkpointing
    bar.close()
    if stopped:
        save()
    if rt.is_main and cfg.plots:
        write_plots(metrics.rows(), cfg.output)
    summary = {
        "step": step,
        "total_steps": total_steps,
        "epoch": epoch,
        "samples_seen": samples_seen,
        "stopped_early": stopped,
        "eval": last_eval,
        "checkpoint": fileio.join(checkpoint_dir(cfg.output), "latest.pt"),
        "output": cfg.output,
    }
    if rt.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def _new_window() -> dict[str, float]:
    """Accumulators for one logging interval."""
    return {
        "loss": 0.0,
        "n": 0,
        "samples": 0,
        "data_s": 0.0,
        "t0": time.time(),
        "skipped": 0,
        "trimmed": 0,
    }


def _optimizer_step(model: Any, optimizer: Any, scaler: Any, grad_clip: float) -> float:
    """Unscale, clip the global gradient norm to ``grad_clip`` (0: no clipping), step, clamp.

    Returns the gradient norm before clipping (inf/nan when an fp16 step overflowed; the scaler
    then skips the update), or 0.0 without clipping.
    """
    import torch

    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = 0.0
    if grad_clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    clamp_logit_scale(model)
    return norm


def _forward_backward(
    model: Any, loss_fn: Any, images: list, texts: list, autocast: Any, scaler: Any
) -> float:
    """Loss and gradients for one optimizer step over ``len(images)`` micro-batches.

    With one micro-batch this is the plain step. With several, the features of every
    micro-batch are first computed without gradients; each micro-batch is then re-run with
    gradients and its loss computed against the cached features of the others, so the
    contrastive batch (and every negative) is the whole accumulated batch.

    Under DDP every backward but the last runs in ``model.no_sync()`` (gradients accumulate
    locally), and the last one, where DDP reduces, reaches every parameter: it is the one that
    takes the temperature's gradient. DDP without ``find_unused_parameters`` needs both.
    """
    import torch

    def backward(loss: Any) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    if len(images) == 1:
        with autocast:
            out = model(images[0], texts[0])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        backward(loss)
        return float(loss.detach())
    cached_img, cached_txt = [], []
    with torch.no_grad(), autocast:
        for x, t in zip(images, texts, strict=True):
            out = model(x, t)
            cached_img.append(out["image_features"])
            cached_txt.append(out["text_features"])
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    last = len(images) - 1
    total = 0.0
    for j, (x, t) in enumerate(zip(images, texts, strict=True)):
        # DDP's no_sync must cover the forward too: the forward arms the reducer.
        with no_sync() if j < last else contextlib.nullcontext():
            with autocast:
                out = model(x, t)
                img = torch.cat([*cached_img[:j], out["image_features"], *cached_img[j + 1 :]])
                txt = torch.cat([*cached_txt[:j], out["text_features"], *cached_txt[j + 1 :]])
                # Every pass sees the whole loss; the temperature's gradient is taken once (on
                # the last pass), so the summed gradients equal one step over the whole batch.
                scale = out["logit_scale"] if j == last else out["logit_scale"].detach()
                loss = loss_fn(img, txt, scale)
            backward(loss)
        total = float(loss.detach())
    return total


class _TokenizerFactory:
    """Builds the model's tokenizer inside each data worker (picklable for spawn start methods)."""

    def __init__(self, model_name: str, model_cfg: dict[str, Any]):
        self.model_name = model_name
        self.model_cfg = model_cfg

    def __call__(self) -> Any:
        import open_clip

        from wit_pipeline import models

        models.register_model_configs()
        return open_clip.get_tokenizer(self.model_name)


def _quiet_open_clip(record: logging.LogRecord) -> bool:
    """Hide open_clip's informational chatter ("initialized randomly", config dumps)."""
    return not ("open_clip" in record.pathname and record.levelno < logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_open_clip)
    try:
        cfg = parse_config(argv)
        summary = train(cfg)
    except WitError as e:
        print(f"wit train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wit train: interrupted (resume with --resume latest)", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
