"""Counters: every record a stage drops is counted under a reason.

Pure code takes a ``Counter`` (``collections.Counter``) and increments names such as ``input``,
``kept`` and ``dropped:too_short``. Beam code carries the same counts as data (a tagged
``counts`` output of ``(name, n)`` pairs summed with ``CombinePerKey``), so the totals written
to ``stats.json`` are exact on every runner, retries included: outputs of failed bundles are
discarded together with their counts. The counts are also mirrored to Beam metrics for
monitoring UIs (Dataflow's job page, the local progress display).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping

INPUT = "input"
KEPT = "kept"
DROPPED_PREFIX = "dropped:"

Counter = collections.Counter


def dropped(reason: str) -> str:
    """The counter name for records dropped for ``reason``."""
    return f"{DROPPED_PREFIX}{reason}"


def total_dropped(counters: Mapping[str, int]) -> int:
    return sum(v for k, v in counters.items() if k.startswith(DROPPED_PREFIX))


def drop_reasons(counters: Mapping[str, int]) -> dict[str, int]:
    """``{reason: n}`` for every ``dropped:<reason>`` counter that is not zero."""
    return {
        k[len(DROPPED_PREFIX) :]: v
        for k, v in sorted(counters.items())
        if k.startswith(DROPPED_PREFIX) and v
    }


def check_balanced(counters: Mapping[str, int], *, stage: str = "") -> None:
    """Raise ``AssertionError`` unless ``input == kept + sum(dropped:*)``."""
    n_in = counters.get(INPUT, 0)
    n_kept = counters.get(KEPT, 0)
    n_dropped = total_dropped(counters)
    if n_in != n_kept + n_dropped:
        where = f"{stage}: " if stage else ""
        raise AssertionError(
            f"{where}counters do not balance: input={n_in} != kept={n_kept} + "
            f"dropped={n_dropped} ({dict(sorted(counters.items()))})"
        )


def merge(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Sum several counter mappings into one sorted plain dict."""
    total: collections.Counter[str] = collections.Counter()
    for part in parts:
        total.update(part)
    return dict(sorted(total.items()))
