"""Checkpoints: what ``checkpoints/latest.pt``, ``epoch_N.pt`` and ``best.pt`` hold, writing and
resuming.

A checkpoint is a plain dict that loads with ``torch.load(path, weights_only=True)`` (and with
``open_clip.create_model_and_transforms(name, pretrained=PATH)``):

- ``format``, ``version``: :data:`wit_pipeline.models.CHECKPOINT_FORMAT` and its version;
- ``model_name``, ``model_cfg`` (the architecture, so it loads where the name is unknown),
  ``state_dict`` (no DDP ``module.`` prefix);
- ``optimizer``, ``scaler`` (None without fp16), ``step``, ``total_steps``;
- ``data_position``: ``epoch``, ``consumed`` (batches each worker of each rank delivered in that
  epoch), ``samples_seen``, and the ``workers``, ``world_size`` and ``batch_size`` they refer to;
- ``early_stop``: the best evaluation so far and the evaluations since it (``--early-stop-*``);
- ``config`` (the run's options as plain values) and ``time``.

Resume restores weights, optimizer, scaler, step and data position (:func:`resume_state`). With
the same shards, seed, batch size, worker count and world size a resumed epoch delivers exactly
the batches the interrupted one had not consumed yet (see ``train/data.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

from wit_pipeline import config as config_lib
from wit_pipeline import fileio, models
from wit_pipeline.errors import WitError
from wit_pipeline.train.config import TrainConfig

LOG = logging.getLogger(__name__)
LATEST = "latest.pt"
BEST = "best.pt"


@dataclasses.dataclass
class TrainState:
    """What a run advances step by step, and restores on resume (besides the weights)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch being trained (0-based)
    samples_seen: int = 0  # over all ranks
    consumed: list[int] = dataclasses.field(default_factory=list)  # batches per local worker
    # Early stopping (--early-stop-metric): the best evaluation so far ({metric, value, epoch,
    # step}) and the evaluations since it.
    best: dict[str, Any] | None = None
    evals_since_best: int = 0


def checkpoint_dir(output: str) -> str:
    return fileio.join(output, "checkpoints")


def latest_path(output: str) -> str:
    return fileio.join(checkpoint_dir(output), LATEST)


def best_path(output: str) -> str:
    return fileio.join(checkpoint_dir(output), BEST)


def epoch_name(finished_epoch: int) -> str:
    """``epoch_N.pt`` after 0-based epoch ``finished_epoch``: named by epochs done."""
    return f"epoch_{finished_epoch + 1}.pt"


def resolve_resume(cfg: TrainConfig) -> str | None:
    """The checkpoint to resume from, or None; refuses to overwrite a run by accident."""
    latest = latest_path(cfg.output)
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


def make_checkpoint(
    *,
    cfg: TrainConfig,
    model: Any,
    model_cfg: Mapping[str, Any],
    optimizer: Any,
    scaler: Any,
    state: TrainState,
    positions: Sequence[Sequence[int]],
    total_steps: int,
    workers: int,
    world_size: int,
) -> dict[str, Any]:
    """The checkpoint dict; ``model`` unwrapped, ``positions`` every rank's ``consumed``."""
    return {
        "format": models.CHECKPOINT_FORMAT,
        "version": models.CHECKPOINT_VERSION,
        "model_name": cfg.model,
        "model_cfg": model_cfg,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": state.step,
        "total_steps": total_steps,
        "data_position": {
            "epoch": state.epoch,
            "consumed": [list(p) for p in positions],
            "samples_seen": state.samples_seen,
            "workers": workers,
            "world_size": world_size,
            "batch_size": cfg.batch_size,
        },
        "early_stop": {"best": state.best, "evals_since_best": state.evals_since_best},
        "config": config_lib.to_dict(cfg),
        "time": time.time(),
    }


def save_checkpoint(path: str, payload: dict[str, Any]) -> None:
    """``torch.save`` through an atomic write: a crash never leaves a half-written checkpoint."""
    import torch

    with fileio.atomic_write(path, "wb") as f:
        torch.save(payload, f)


def write_checkpoints(
    output: str, payload: dict[str, Any], extra_names: Sequence[str] = ()
) -> None:
    """``latest.pt`` and each of ``extra_names`` (``epoch_N.pt``) in ``OUTPUT/checkpoints``."""
    for name in (LATEST, *extra_names):
        save_checkpoint(fileio.join(checkpoint_dir(output), name), payload)


def read_for_resume(path: str, model_name: str) -> dict[str, Any]:
    """The checkpoint at ``path`` (local, or an fsspec URL: a remote ``--output``); WitError
    when it holds another architecture."""
    if fileio.is_local(path):
        ckpt = models.read_checkpoint(path)
    else:
        with tempfile.TemporaryDirectory(prefix="wit-resume-") as tmp:
            local = os.path.join(tmp, os.path.basename(path))
            with fileio.open_file(path, "rb") as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst)
            ckpt = models.read_checkpoint(local)
    if ckpt.get("model_name") != model_name:
        raise WitError(
            f"checkpoint {path} holds a {ckpt.get('model_name')} model, not {model_name}"
        )
    return ckpt


def restore(ckpt: Mapping[str, Any], *, model: Any, optimizer: Any, scaler: Any) -> None:
    """Load weights (into the unwrapped ``model``), optimizer and scaler state."""
    model.load_state_dict(models.state_dict_of(ckpt))
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])


def resume_state(
    ckpt: Mapping[str, Any], *, workers: int, world_size: int, rank: int, batch_size: int
) -> TrainState:
    """Step, epoch, samples seen and this rank's worker positions from a checkpoint.

    With the layout the checkpoint was written with (workers, world size, batch size) every
    worker continues after exactly the batches it delivered. A different layout cannot map
    worker positions: the epoch continues with the batches it has left, each worker reading its
    stream from the equivalent fraction onwards (a warning says the position is approximate).
    """
    pos = ckpt.get("data_position", {})
    state = TrainState(
        step=int(ckpt["step"]),
        epoch=int(pos.get("epoch", 0)),
        samples_seen=int(pos.get("samples_seen", 0)),
        consumed=[0] * workers,
        best=(ckpt.get("early_stop") or {}).get("best"),
        evals_since_best=int((ckpt.get("early_stop") or {}).get("evals_since_best", 0)),
    )
    saved = pos.get("consumed") or []
    same_layout = (
        int(pos.get("workers", -1)) == workers
        and int(pos.get("world_size", -1)) == world_size
        and int(pos.get("batch_size", -1)) == batch_size
    )
    if same_layout and len(saved) == world_size:
        state.consumed = [int(x) for x in saved[rank]]
    elif any(any(x) for x in saved):
        done = sum(sum(x) for x in saved) // max(1, workers * world_size)
        state.consumed = [done] * workers
        LOG.warning(
            "resume with a different workers/world size/batch size: data position is approximate"
        )
    return state
