"""What a run reports: ``metrics.jsonl`` rows, the logging window, ``loss.png``, ``eval.png`` and
``eval_suite.png``.

``metrics.jsonl`` holds one JSON object per line: a ``config`` row at every (re)start, a
``train`` row every ``--log-every`` steps (and at each epoch's last step), an ``eval`` row after
each evaluation, an ``eval_suite`` row after each ``--eval-suite`` run (see docs/train.md for the
fields). Only the main rank writes.

``--output`` may be a local folder or an fsspec URL (``gs://...``): plots are written through
``fileio.atomic_write``, and on an object store, which cannot append, the log is kept in a local
file and uploaded whole, atomically, at every checkpoint and at the end (:meth:`MetricsLog.sync`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from wit_pipeline import fileio


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` (main rank only).

    A local ``path`` is appended to in place, one line per record; a run killed in the middle of
    a line leaves a torn last line, which :meth:`rows` skips and a resume truncates away. A
    remote ``path`` (fsspec URL) is kept in a local file (started from the uploaded copy, if
    any) and published by :meth:`sync`: uploaded whole under a temporary name and moved into
    place, so the object is always a complete log as of the last sync.
    """

    def __init__(self, path: str, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.local = path
        if enabled and not fileio.is_local(path):
            self.local = os.path.join(tempfile.mkdtemp(prefix="wit-metrics-"), "metrics.jsonl")
            if fileio.exists(path):
                with fileio.open_file(path, "rb") as src, open(self.local, "wb") as dst:
                    shutil.copyfileobj(src, dst)

    def truncate_after(self, step: int) -> None:
        """Drop records newer than ``step`` (written after the checkpoint a run resumes from)."""
        if not self.enabled or not os.path.exists(self.local):
            return
        rows = self.rows()
        with fileio.atomic_write(self.local, "w") as f:
            for row in rows:
                if int(row.get("step", 0)) <= step:
                    f.write(json.dumps(row, sort_keys=True) + "\n")

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.local, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    def sync(self) -> None:
        """Publish the log to a remote ``path`` (atomically); nothing to do for a local one."""
        if not self.enabled or self.local == self.path or not os.path.exists(self.local):
            return
        with open(self.local, "rb") as src, fileio.atomic_write(self.path, "wb") as dst:
            shutil.copyfileobj(src, dst)

    def rows(self) -> list[dict[str, Any]]:
        """The records written so far (a torn last line, from a killed run, is left out)."""
        if not os.path.exists(self.local):
            return []
        with open(self.local) as f:
            lines = [line for line in f if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise
        return rows


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
        written.append(_save(fig, fileio.join(output, "loss.png")))
    evals = [r for r in rows if r.get("type") == "eval"]
    series: dict[str, list[tuple[float, float]]] = {}
    for r in evals:
        for name, value in r.get("metrics", {}).items():
            if isinstance(value, int | float) and (name.endswith(("top1", "top5")) or "R@" in name):
                series.setdefault(name, []).append((r["epoch"], float(value)))
    if series:
        path = fileio.join(output, "eval.png")
        written.append(_series_figure(series, "epoch", "accuracy / recall", "evaluation", path))
    # --eval-suite runs by step: each set's top-1 or R@1, and the mean zero-shot top-1.
    suite_series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get("type") == "eval_suite":
            for name, value in r.get("metrics", {}).items():
                if name.endswith(("/top1", "_R@1")):
                    suite_series.setdefault(name, []).append((r["step"], float(value)))
    if suite_series:
        path = fileio.join(output, "eval_suite.png")
        written.append(
            _series_figure(suite_series, "step", "top-1 / R@1", "evaluation suite", path)
        )
    return written


def _series_figure(
    series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str, path: str
) -> str:
    """One line per named series of ``(x, y)`` points, saved to ``path``."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.set_title(title)
    return _save(fig, path)


def _save(fig: Any, path: str) -> str:
    """Render ``fig`` as PNG and write it atomically (local or remote ``path``)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with fileio.atomic_write(path, "wb") as f:
        f.write(buf.getvalue())
    return path


@dataclasses.dataclass
class LogWindow:
    """Sums over one logging interval, turned into a ``train`` row.

    A new window starts after every row and after each epoch's evaluation and checkpoint, so
    ``samples_per_s`` and ``data_wait_fraction`` exclude them.
    """

    loss: float = 0.0
    n: int = 0  # steps that made an update (a step without any decodable image has no loss)
    samples: int = 0
    data_s: float = 0.0
    skipped: int = 0
    trimmed: int = 0
    t0: float = dataclasses.field(default_factory=time.time)

    def add(
        self, *, loss: float | None, samples: int, data_s: float, skipped: int, trimmed: int
    ) -> None:
        """Count one optimizer step (``loss`` None: it made no update)."""
        if loss is not None:
            self.loss += loss
            self.n += 1
        self.skipped += skipped
        self.trimmed += trimmed
        self.samples += samples
        self.data_s += data_s

    def row(
        self, *, step: int, epoch: int, lr: float, logit_scale: float, samples_seen: int
    ) -> dict[str, Any]:
        """The ``train`` row of this window, ending now."""
        elapsed = max(1e-9, time.time() - self.t0)
        return {
            "type": "train",
            "step": step,
            "epoch": epoch,
            "loss": self.loss / self.n if self.n else None,
            "lr": lr,
            "logit_scale": logit_scale,
            "samples_per_s": self.samples / elapsed,
            "data_wait_fraction": self.data_s / elapsed,
            "samples_seen": samples_seen,
            "samples_skipped": self.skipped,
            "samples_trimmed": self.trimmed,
            "time": time.time(),
        }
