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
SCOPE_SEPARATOR = "/"
# Scopes used by more than one stage: pairs of a sample-level stage, distinct URLs of the
# download, and what readers saw (files, WARC records, table rows).
PAIR = "pair"
URL = "url"
READ = "read"

Counter = collections.Counter


def dropped(reason: str) -> str:
    """The counter name for records dropped for ``reason``."""
    return f"{DROPPED_PREFIX}{reason}"


def scoped(scope: str, name: str) -> str:
    """The counter name for ``name`` counted over another unit or a sub-step: ``scope/name``.

    Names without a scope count a step's own unit; ``pair/kept``, ``url/dropped:robots`` and
    ``read/warc:records`` count something else, in the same counts output.
    """
    return f"{scope}{SCOPE_SEPARATOR}{name}" if scope else name


def split_scopes(counters: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """``{scope: {name: n}}`` (scope ``""`` for unscoped names), each sorted by name.

    A scope is the text before the first ``/`` of a name; a ``/`` after ``dropped:`` belongs
    to the reason (``dropped:score/undecodable_image`` is unscoped).
    """
    out: dict[str, dict[str, int]] = {}
    for name, n in sorted(counters.items()):
        scope, sep, rest = name.partition(SCOPE_SEPARATOR)
        if not sep or scope.startswith(DROPPED_PREFIX):
            scope, rest = "", name
        out.setdefault(scope, {})[rest] = n
    return out


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
