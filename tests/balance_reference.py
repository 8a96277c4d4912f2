"""Balancing as it was written before it was computed per batch: one record at a time.

Kept as the reference that ``balance.balance_records``, ``balance.balance_sample_pairs`` and
the Arrow cores of ``balance_arrays`` are tested against (the same kept records, the same
probabilities, the same rejected and partial rows and counts).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from wit_pipeline import counters as counters_lib
from wit_pipeline import stage
from wit_pipeline.stages.balance import NO_QUERY, Draws, drop_detail, keep_probability


def count_queries(records: Iterable[Mapping[str, Any]]) -> collections.Counter:
    return collections.Counter(
        itertools.chain.from_iterable(set(r.get("query_ids") or ()) for r in records)
    )


def balance_records(
    records: Iterable[Mapping[str, Any]],
    probs: Mapping[int, float],
    *,
    seed: int,
    phase: str,
    id_field: str,
    reason: str,
) -> stage.Result:
    draw = Draws(seed, phase)
    kept, dropped = [], []
    for r in records:
        qids = r.get("query_ids") or ()
        p = keep_probability(qids, probs)
        if not qids:
            why = NO_QUERY
        elif draw(str(r[id_field])) < p:
            kept.append({**r, "balance_probability": p})
            continue
        else:
            why = reason
        dropped.append(
            {**r, "reason": why, "balance_probability": p, "detail": drop_detail(why, p)}
        )
    return stage.Result(kept, dropped)


def balance_sample_pairs(
    samples: Iterable[Mapping[str, Any]],
    probs: Mapping[int, float],
    *,
    seed: int,
    phase: str,
    reason: str,
) -> stage.Result:
    kept, dropped, partial = [], [], []
    pair_drops: counters_lib.Counter = counters_lib.Counter()
    extra = ("_id", "reason", "balance_probability", "detail")

    def strip(ps):
        return [{k: v for k, v in p.items() if k not in extra} for p in ps]

    for s in samples:
        pairs = [{**p, "_id": p.get("uid") or f"{s['key']}:{i}"} for i, p in enumerate(s["pairs"])]
        drawn = balance_records(pairs, probs, seed=seed, phase=phase, id_field="_id", reason=reason)
        won, lost = drawn.kept, drawn.rejected
        for p in lost:
            pair_drops[counters_lib.scoped(stage.PAIR, counters_lib.dropped(p["reason"]))] += 1
        miss = 1.0
        for p in pairs:
            miss *= 1.0 - keep_probability(p["query_ids"] or (), probs)
        prob = 1.0 - miss
        if won:
            kept_pairs = strip(won)
            kept.append(
                {
                    **s,
                    "pairs": kept_pairs,
                    "query_ids": sorted({q for p in kept_pairs for q in p["query_ids"]}),
                    "balance_probability": prob,
                }
            )
            for why in sorted({p["reason"] for p in lost}):
                part = strip([p for p in lost if p["reason"] == why])
                partial.append(
                    {
                        **s,
                        "pairs": part,
                        "reason": why,
                        "balance_probability": prob,
                        "detail": drop_detail(why, prob),
                    }
                )
        else:
            why = reason if any(p["query_ids"] for p in pairs) else NO_QUERY
            dropped.append(
                {**s, "reason": why, "balance_probability": prob, "detail": drop_detail(why, prob)}
            )
    return stage.Result(kept, dropped, pair_drops, partial=partial)
