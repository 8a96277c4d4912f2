"""Contrastive training of CLIP models on webdataset shards: ``python -m wit_pipeline.train``.

The loop, read top to bottom in :func:`train`: set a run up once (:func:`setup`: runtime, data,
model, optimizer, loss), resume it (:func:`resume`), then train epoch by epoch
(:func:`train_one_epoch`: per step :func:`next_micro_batches`, :func:`train_step`,
:func:`log_train_row`, mid-epoch checkpoints) and close each epoch (:func:`end_epoch`:
evaluation, checkpoint, plots). The pieces live beside it in ``wit_pipeline/train/``:

- ``config.py``: :class:`~wit_pipeline.train.config.TrainConfig`, every option a ``--flag``;
- ``data.py``: shards -> decoded, augmented, tokenized batches, a pure function of the seed;
- ``recipe.py``: the CLIP recipe (model init, AdamW groups, schedule, accumulation, clipping);
- ``distributed.py``: rank and device under ``torchrun``, what the ranks agree on each step;
- ``checkpoint.py``: what a checkpoint holds, writing it, resuming from it;
- ``metrics.py``: ``metrics.jsonl``, ``loss.png``, ``eval.png``;
- ``evaluate.py``: zero-shot and retrieval evaluation (also ``wit eval``);
- ``suite.py``: an evaluation suite (``--eval-suite``, also ``wit eval suite``).

Output in ``--output``: ``checkpoints/latest.pt`` and ``checkpoints/epoch_N.pt`` (and
``checkpoints/best.pt`` with ``--early-stop-metric``, which also stops a run after
``--early-stop-patience`` evaluations without improvement), ``metrics.jsonl``, ``loss.png`` and
``eval.png``, and with ``--eval-suite`` ``eval_suite.png`` and ``eval_suite/suite.{json,md,png}``
(docs/train.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from wit_pipeline import config as config_lib
from wit_pipeline import fileio, models
from wit_pipeline.errors import WitError, exit_status
from wit_pipeline.train import checkpoint, data, distributed, recipe
from wit_pipeline.train.checkpoint import TrainState
from wit_pipeline.train.config import TrainConfig, parse_config, validate
from wit_pipeline.train.distributed import Runtime, unwrap
from wit_pipeline.train.evaluate import EpochEvaluator, eval_transform
from wit_pipeline.train.metrics import LogWindow, MetricsLog, write_plots
from wit_pipeline.train.suite import Suite, write_outputs

LOG = logging.getLogger("wit_pipeline.train")


@dataclasses.dataclass
class Run:
    """What a run sets up once. The loop reads it; only the model and optimizer change."""

    cfg: TrainConfig
    rt: Runtime
    precision: str  # fp32 | bf16 | fp16 (``auto`` resolved for the device)
    stream: data.ShardStream
    loader: Any  # torch DataLoader over ``stream``, iterated once per epoch
    steps_per_epoch: list[int]
    total_steps: int
    model_cfg: dict[str, Any]
    model: Any  # open_clip CLIP, under DistributedDataParallel when distributed
    optimizer: Any
    scaler: Any  # GradScaler for fp16, else None
    loss_fn: Any
    tokenizer: Any
    metrics: MetricsLog
    suite: Suite | None = None  # --eval-suite, loaded on the main rank
    suite_last: tuple[int, dict[str, Any]] | None = None  # (step, document) of its latest run


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns a summary (steps, samples, last metrics, paths)."""
    # User errors first, before the slow imports.
    validate(cfg)
    resume_path = checkpoint.resolve_resume(cfg)
    shard_paths = data.expand_shard_patterns(cfg.train_data)

    run = setup(cfg, shard_paths)
    state = TrainState(consumed=[0] * run.stream.workers)
    if resume_path:
        state = resume(run, resume_path)
    log_config(run, state, num_shards=len(shard_paths))
    evaluator = EpochEvaluator(cfg) if run.rt.is_main else None
    if cfg.eval_suite and run.rt.is_main:
        run.suite = Suite.from_file(cfg.eval_suite, max_samples=cfg.eval_max_samples)
    bar = progress_bar(run, state)

    last_eval: dict[str, Any] = {}
    stopped = early_stopped = False
    run.model.train()
    while state.epoch < cfg.epochs and state.step < run.total_steps:
        if cfg.early_stop_patience and state.evals_since_best >= cfg.early_stop_patience:
            early_stopped = True
            LOG.info(
                "early stop after epoch %d: %s did not improve for %d evaluation(s)",
                state.epoch,
                cfg.early_stop_metric,
                state.evals_since_best,
            )
            break
        stopped = train_one_epoch(run, state, bar)
        if stopped:
            break
        last_eval = end_epoch(run, state, evaluator) or last_eval
    bar.close()
    if stopped:
        save(run, state)
    suite_metrics = finish_suite(run, state) if cfg.eval_suite and not stopped else {}
    if run.rt.is_main and cfg.plots:
        write_plots(run.metrics.rows(), cfg.output)
    run.metrics.sync()
    summary = {
        "step": state.step,
        "total_steps": run.total_steps,
        "epoch": state.epoch,
        "samples_seen": state.samples_seen,
        "stopped_early": stopped,
        "early_stopped": early_stopped,
        "best": state.best,
        "eval": last_eval,
        **({"eval_suite": suite_metrics} if suite_metrics else {}),
        "checkpoint": checkpoint.latest_path(cfg.output),
        "output": cfg.output,
    }
    distributed.shutdown(run.rt)
    return summary


# ---------------------------------------------------------------------------------------------
# Set-up


def setup(cfg: TrainConfig, shard_paths: Sequence[str]) -> Run:
    """Runtime, data stream, model, optimizer, loss and metrics log of a run."""
    import open_clip
    import torch
    from open_clip import ClipLoss

    models.register_model_configs()
    rt = distributed.init_runtime(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    precision = models.resolve_precision(cfg.precision, rt.device)
    if rt.is_main:
        fileio.makedirs(checkpoint.checkpoint_dir(cfg.output))

    counts = data.shard_sample_counts(shard_paths)
    model_cfg = models.model_config(cfg.model)
    stream, loader = make_stream(cfg, rt, shard_paths, counts, model_cfg)
    steps_per_epoch = [stream.batches_per_epoch(e) // cfg.accum_freq for e in range(cfg.epochs)]
    total_steps = sum(steps_per_epoch)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    if total_steps <= 0:
        raise WitError(
            f"{sum(counts)} samples in {len(shard_paths)} shard(s) make no full batch of "
            f"{cfg.batch_size} x {cfg.accum_freq} per rank and worker; lower --batch-size or --workers"
        )

    model = recipe.build_model(cfg, rt.device)
    optimizer = recipe.make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    tokenizer = open_clip.get_tokenizer(cfg.model)
    model = distributed.wrap(model, rt)
    # Under DDP each rank scores its own rows against the gathered global batch; gradients flow
    # back through the gather, and DDP's averaging then gives the full-batch gradient.
    loss_fn = ClipLoss(
        local_loss=rt.distributed,
        gather_with_grad=True,
        cache_labels=True,
        rank=rt.rank,
        world_size=rt.world_size,
    )
    return Run(
        cfg=cfg,
        rt=rt,
        precision=precision,
        stream=stream,
        loader=loader,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        model_cfg=model_cfg,
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        loss_fn=loss_fn,
        tokenizer=tokenizer,
        metrics=MetricsLog(fileio.join(cfg.output, "metrics.jsonl"), rt.is_main),
    )


def make_stream(
    cfg: TrainConfig,
    rt: Runtime,
    shard_paths: Sequence[str],
    counts: Sequence[int],
    model_cfg: dict[str, Any],
) -> tuple[data.ShardStream, Any]:
    """This rank's batch stream over the shards, and the DataLoader that runs its workers."""
    size = model_cfg["vision_cfg"]["image_size"]
    stream = data.ShardStream(
        shard_paths,
        counts,
        batch_size=cfg.batch_size,
        image_size=int(size[0] if isinstance(size, list | tuple) else size),
        tokenizer_factory=TokenizerFactory(cfg.model),
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        crop_scale=(cfg.crop_scale_min, 1.0),
        hflip=cfg.hflip,
        caption_choice=cfg.caption_choice,
        workers=max(1, cfg.workers),
        rank=rt.rank,
        world_size=rt.world_size,
    )
    loader = data.make_loader(
        stream, num_workers=cfg.workers, pin_memory=rt.device.startswith("cuda")
    )
    return stream, loader


class TokenizerFactory:
    """Builds the model's tokenizer inside each data worker (picklable for spawn start methods)."""

    def __init__(self, model_name: str):
        self.model_name = model_name

    def __call__(self) -> Any:
        import open_clip

        models.register_model_configs()
        return open_clip.get_tokenizer(self.model_name)


def resume(run: Run, path: str) -> TrainState:
    """Restore weights, optimizer, scaler and position from ``path``; drop newer metrics rows."""
    ckpt = checkpoint.read_for_resume(path, run.cfg.model)
    checkpoint.restore(ckpt, model=unwrap(run.model), optimizer=run.optimizer, scaler=run.scaler)
    state = checkpoint.resume_state(
        ckpt,
        workers=run.stream.workers,
        world_size=run.rt.world_size,
        rank=run.rt.rank,
        batch_size=run.cfg.batch_size,
    )
    run.metrics.truncate_after(state.step)
    LOG.info("resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)
    return state


def log_config(run: Run, state: TrainState, *, num_shards: int) -> None:
    """The ``config`` row that opens every (re)start in ``metrics.jsonl``."""
    run.metrics.write(
        {
            "type": "config",
            "step": state.step,
            "time": time.time(),
            "config": config_lib.to_dict(run.cfg),
            "total_steps": run.total_steps,
            "num_shards": num_shards,
            "num_samples": sum(run.stream.counts),
            "world_size": run.rt.world_size,
            "precision": run.precision,
            "device": run.rt.device,
        }
    )


def progress_bar(run: Run, state: TrainState) -> Any:
    """Steps done of the run's total on stderr (main rank, unless ``--no-progress``)."""
    from tqdm import tqdm

    return tqdm(
        total=run.total_steps,
        initial=state.step,
        disable=not (run.cfg.progress and run.rt.is_main),
        dynamic_ncols=True,
        desc="train",
        file=sys.stderr,
    )


# ---------------------------------------------------------------------------------------------
# An epoch, a step


def train_one_epoch(run: Run, state: TrainState, bar: Any) -> bool:
    """Steps until the epoch's batches or the run's steps are done; True when
    ``--stop-after-steps`` ended the run inside the epoch."""
    cfg = run.cfg
    epoch_steps = run.steps_per_epoch[state.epoch]
    window = LogWindow()
    run.stream.set_epoch(state.epoch, state.consumed)
    batches = iter(run.loader)
    done_in_epoch = sum(state.consumed) // cfg.accum_freq
    t_data = time.time()
    while done_in_epoch < epoch_steps and state.step < run.total_steps:
        micro, exhausted = next_micro_batches(batches, cfg.accum_freq)
        sizes = [len(b["keys"]) for b in micro]
        sizes += [0] * (cfg.accum_freq - len(sizes))
        local_skipped = sum(int(b["skipped"]) for b in micro)
        exhausted, sizes, skipped, trimmed = distributed.sync_step(
            exhausted, sizes, local_skipped, run.rt
        )
        if exhausted:
            break
        used = trim_to(micro, sizes)
        data_s = time.time() - t_data
        lr, loss = train_step(run, state.step, used)
        state.step += 1
        done_in_epoch += 1
        n_samples = sum(len(b["keys"]) for b in used) * run.rt.world_size
        state.samples_seen += n_samples
        for b in micro:
            state.consumed[b["worker"]] = b["index"] + 1
        window.add(loss=loss, samples=n_samples, data_s=data_s, skipped=skipped, trimmed=trimmed)
        bar.update(1)
        if (
            state.step % cfg.log_every == 0
            or state.step == run.total_steps
            or done_in_epoch == epoch_steps
        ):
            log_train_row(run, state, window, lr, bar)
            window = LogWindow()
        if cfg.stop_after_steps and cfg.stop_after_steps <= state.step < run.total_steps:
            return True
        if cfg.save_every_steps and state.step % cfg.save_every_steps == 0:
            save(run, state)
        if cfg.eval_suite_every and state.step % cfg.eval_suite_every == 0:
            t_suite = time.time()
            evaluate_suite(run, state, state.epoch)
            window.t0 += time.time() - t_suite  # the suite's time is not training time
        t_data = time.time()
    return False


def next_micro_batches(batches: Iterator[dict[str, Any]], n: int) -> tuple[list[dict], bool]:
    """Up to ``n`` batches of this rank's stream, and whether the stream ran out first."""
    micro = []
    for _ in range(n):
        try:
            micro.append(next(batches))
        except StopIteration:
            return micro, True
    return micro, False


def trim_to(micro: Sequence[dict[str, Any]], sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Each micro-batch cut to the size all ranks agreed on; empty ones left out.

    Under DDP a rank whose batch lost undecodable images sets the size for all: the others drop
    their last samples (counted as trimmed). A step with no sample at all makes no update (it
    still counts as a step).
    """
    return [
        {**b, "images": b["images"][:n], "texts": b["texts"][:n], "keys": b["keys"][:n]}
        for b, n in zip(micro, sizes, strict=True)
        if n > 0
    ]


def train_step(run: Run, step: int, used: Sequence[dict[str, Any]]) -> tuple[float, float | None]:
    """Optimizer step ``step`` (0-based) over the micro-batches ``used``: the scheduled learning
    rate, forward and backward, the update. Returns the learning rate and the loss (None: no
    batch held a decodable image, no update)."""
    cfg, device = run.cfg, run.rt.device
    lr = recipe.lr_at(
        step, base_lr=cfg.lr, warmup=cfg.warmup, total=run.total_steps, min_lr=cfg.min_lr
    )
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    non_blocking = device.startswith("cuda")
    images = [data.normalize(b["images"].to(device, non_blocking=non_blocking)) for b in used]
    texts = [b["texts"].to(device, non_blocking=non_blocking) for b in used]
    run.optimizer.zero_grad(set_to_none=True)
    if not used:
        LOG.warning("step %d: no decodable image in its batches; no update", step + 1)
        return lr, None
    autocast = models.autocast(device, run.precision)
    loss = recipe.forward_backward(run.model, run.loss_fn, images, texts, autocast, run.scaler)
    recipe.optimizer_step(run.model, run.optimizer, run.scaler, cfg.grad_clip)
    return lr, loss


def log_train_row(run: Run, state: TrainState, window: LogWindow, lr: float, bar: Any) -> None:
    """The ``train`` row of the window that ends at this step; loss and speed on the bar."""
    logit_scale = float(unwrap(run.model).logit_scale.detach().exp())
    row = window.row(
        step=state.step,
        epoch=state.epoch,
        lr=lr,
        logit_scale=logit_scale,
        samples_seen=state.samples_seen,
    )
    run.metrics.write(row)
    shown = "-" if row["loss"] is None else f"{row['loss']:.3f}"
    bar.set_postfix(loss=shown, sps=f"{row['samples_per_s']:.0f}")


# ---------------------------------------------------------------------------------------------
# End of an epoch: evaluation, checkpoints, plots


def end_epoch(run: Run, state: TrainState, evaluator: EpochEvaluator | None) -> dict[str, Any]:
    """Move to the next epoch; evaluate (every ``--eval-every`` epochs and after the last),
    write ``latest.pt`` and ``epoch_N.pt``, redraw the plots. Returns the evaluation's metrics
    (empty when none ran)."""
    cfg = run.cfg
    finished = state.epoch
    state.epoch += 1
    state.consumed = [0] * run.stream.workers
    is_last = state.epoch >= cfg.epochs or state.step >= run.total_steps
    result: dict[str, Any] = {}
    improved = False
    if (evaluator is not None or run.rt.distributed) and (
        is_last or state.epoch % cfg.eval_every == 0
    ):
        result = evaluate_epoch(run, state, evaluator, finished)
        if cfg.early_stop_metric:
            improved = track_best(run, state, result, finished)
    extra = [checkpoint.epoch_name(finished)] if cfg.epoch_checkpoints else []
    save(run, state, extra_names=[*extra, checkpoint.BEST] if improved else extra)
    if run.rt.is_main and cfg.plots:
        write_plots(run.metrics.rows(), cfg.output)
    return result


def evaluate_epoch(
    run: Run, state: TrainState, evaluator: EpochEvaluator | None, finished_epoch: int
) -> dict[str, Any]:
    """Evaluate after ``finished_epoch`` (0-based, as in the train rows) on the main rank, and
    write its ``eval`` row; the other ranks wait."""
    result: dict[str, Any] = {}
    if evaluator is not None and evaluator.enabled:
        t0 = time.time()
        result = evaluator(unwrap(run.model), run.tokenizer, run.rt.device)
        run.metrics.write(
            {
                "type": "eval",
                "step": state.step,
                "epoch": finished_epoch,
                "metrics": result,
                "seconds": round(time.time() - t0, 3),
            }
        )
    distributed.barrier(run.rt)
    return result


def evaluate_suite(run: Run, state: TrainState, epoch: int) -> dict[str, Any]:
    """Run ``--eval-suite`` on the main rank and write its ``eval_suite`` row (``epoch``: the
    0-based epoch of the step, as in train rows); the other ranks wait. Returns its metrics."""
    doc: dict[str, Any] = {}
    if run.suite is not None:
        t0 = time.time()
        model = unwrap(run.model)
        doc = run.suite.run(
            model,
            eval_transform(model),
            run.tokenizer,
            device=run.rt.device,
            batch_size=run.cfg.eval_batch_size,
        )
        run.metrics.write(
            {
                "type": "eval_suite",
                "step": state.step,
                "epoch": epoch,
                "metrics": doc["metrics"],
                "seconds": round(time.time() - t0, 3),
            }
        )
    run.suite_last = (state.step, doc)  # on every rank: they agree on when the suite ran
    distributed.barrier(run.rt)
    return doc.get("metrics", {})


def finish_suite(run: Run, state: TrainState) -> dict[str, Any]:
    """At the end of a run: the suite on the final weights (its run at this step when there was
    one), written as ``OUTPUT/eval_suite/suite.{json,md,png}``. Returns its metrics."""
    if run.suite_last is None or run.suite_last[0] != state.step:
        evaluate_suite(run, state, max(0, state.epoch - 1))  # the epochs are closed: the last one
    if run.suite is None or run.suite_last is None:  # not the main rank
        return {}
    doc = {
        "checkpoint": checkpoint.latest_path(run.cfg.output),
        "model": run.cfg.model,
        "step": state.step,
        **run.suite_last[1],
    }
    write_outputs(doc, fileio.join(run.cfg.output, "eval_suite"))
    return doc["metrics"]


def track_best(run: Run, state: TrainState, result: dict[str, Any], finished_epoch: int) -> bool:
    """Compare this evaluation's ``--early-stop-metric`` with the best so far (higher is
    better): record a new best (the caller then writes ``best.pt``) or count one more
    evaluation without improvement. The main rank decides; every rank gets its decision."""
    cfg = run.cfg
    decision = None
    if run.rt.is_main:
        if cfg.early_stop_metric not in result:
            known = ", ".join(sorted(result)) or "none"
            raise WitError(
                f"--early-stop-metric {cfg.early_stop_metric!r} is not among the evaluation's "
                f"metrics ({known})"
            )
        value = float(result[cfg.early_stop_metric])
        if state.best is None or value > state.best["value"]:
            decision = {
                "metric": cfg.early_stop_metric,
                "value": value,
                "epoch": finished_epoch + 1,  # epochs done, as in epoch_N.pt
                "step": state.step,
            }
    decision = distributed.broadcast(decision, run.rt)
    if decision is None:
        state.evals_since_best += 1
        return False
    state.best, state.evals_since_best = decision, 0
    return True


def save(run: Run, state: TrainState, extra_names: Sequence[str] = ()) -> None:
    """``latest.pt`` (and ``extra_names``): every rank takes part (the data positions of all
    ranks are gathered), the main rank writes."""
    positions = distributed.gather_positions(state.consumed, run.rt)
    if not run.rt.is_main:
        return
    payload = checkpoint.make_checkpoint(
        cfg=run.cfg,
        model=unwrap(run.model),
        model_cfg=run.model_cfg,
        optimizer=run.optimizer,
        scaler=run.scaler,
        state=state,
        positions=positions,
        total_steps=run.total_steps,
        workers=run.stream.workers,
        world_size=run.rt.world_size,
    )
    checkpoint.write_checkpoints(run.cfg.output, payload, extra_names)
    run.metrics.sync()  # a remote metrics.jsonl, as of this checkpoint


# ---------------------------------------------------------------------------------------------
# Command line


def _quiet_open_clip(record: logging.LogRecord) -> bool:
    """Hide open_clip's informational chatter ("initialized randomly", config dumps)."""
    return not ("open_clip" in record.pathname and record.levelno < logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m wit_pipeline.train [FLAGS]``: train, print the summary as JSON."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_open_clip)

    def run() -> int:
        summary = train(parse_config(argv))
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0

    return exit_status(
        run, prog="wit train", interrupted="interrupted (resume with --resume latest)"
    )


if __name__ == "__main__":
    sys.exit(main())
