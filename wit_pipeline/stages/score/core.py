"""The filter core: scored samples and a threshold -> a ``stage.Result``, pair by pair.

A sample (one image) carries ``pairs``, each with its ``clip_score``. A pair below the
threshold leaves the sample (a *partial* row of the result: written to ``rejected/`` as
``low_clip_score`` with its ``uid``, ``caption`` and ``clip_score``, counted as a dropped pair);
the sample is dropped only when none of its pairs survives (``low_clip_score`` over samples,
its pairs counted as dropped pairs). A kept sample's ``clip_score`` is its best surviving pair's
and its ``caption`` that pair's caption (:func:`best_pair`). An image the model could not read
drops the sample (``undecodable_image``).

:func:`filter_scored` is the same for records with one caption and a ``clip_score`` (the
``FilterByClipScore`` transform).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from wit_pipeline import stage
from wit_pipeline.stages.score.model import SCORE_FIELD

STAGE = "score"
LOW_SCORE = "low_clip_score"
UNDECODABLE = "undecodable_image"
MISSING = "no_image_or_caption"
UNREADABLE_DETAIL = "the seed model could not read the image"


def best_pair(pairs: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The pair with the highest ``clip_score`` (ties: the smallest ``uid``, then the first)."""
    return min(
        enumerate(pairs), key=lambda ip: (-ip[1][SCORE_FIELD], ip[1].get("uid") or "", ip[0])
    )[1]


def _below(scores: Sequence[float], threshold: float) -> str:
    listed = ", ".join(f"{s:.4f}" for s in scores)
    name = SCORE_FIELD if len(scores) == 1 else f"{SCORE_FIELD}s"
    return f"{name} {listed} < threshold {threshold:.4f}"


def filter_pairs(
    samples: Iterable[Mapping[str, Any]],
    threshold: float | None,
    *,
    undecodable: str = UNDECODABLE,
) -> stage.Result:
    """Keep each sample's pairs with ``clip_score >= threshold`` (every pair when None).

    A sample that already has a ``reason`` (nothing to score) is dropped with it. Returns the
    kept samples (``pairs``, ``query_ids`` when present, ``clip_score`` and ``caption`` updated
    to the surviving pairs), the dropped samples and, as ``partial`` rows, one record per pair a
    kept sample lost (``pairs`` = that pair; ``uid``, ``caption``, ``clip_score`` its own).
    """
    kept, rejected, partial = [], [], []
    for s in samples:
        pairs = list(s.get("pairs") or ())
        if s.get("reason"):
            rejected.append(s)
            continue
        if not pairs or any(p.get(SCORE_FIELD) is None for p in pairs):
            rejected.append(
                {**s, "reason": undecodable, SCORE_FIELD: None, "detail": UNREADABLE_DETAIL}
            )
            continue
        keep = [threshold is None or p[SCORE_FIELD] >= threshold for p in pairs]
        if not any(keep):
            best = best_pair(pairs)
            detail = _below([p[SCORE_FIELD] for p in pairs], threshold)  # type: ignore[arg-type]
            rejected.append(
                {
                    **s,
                    "reason": LOW_SCORE,
                    "caption": best["caption"],
                    SCORE_FIELD: best[SCORE_FIELD],
                    "detail": detail,
                }
            )
            continue
        survivors = [p for p, k in zip(pairs, keep, strict=True) if k]
        best = best_pair(survivors)
        out = {**s, "pairs": survivors, "caption": best["caption"], SCORE_FIELD: best[SCORE_FIELD]}
        if "query_ids" in s:
            out["query_ids"] = sorted({q for p in survivors for q in p.get("query_ids") or ()})
        kept.append(out)
        for p, k in zip(pairs, keep, strict=True):
            if not k:
                partial.append(
                    {
                        **s,
                        "pairs": [p],
                        "uid": p.get("uid"),
                        "caption": p["caption"],
                        SCORE_FIELD: p[SCORE_FIELD],
                        "reason": LOW_SCORE,
                        "detail": _below([p[SCORE_FIELD]], threshold),  # type: ignore[arg-type]
                    }
                )
    return stage.Result(kept, rejected, partial=partial)


def filter_scored(
    records: Iterable[Mapping[str, Any]],
    threshold: float | None,
    *,
    undecodable: str = UNDECODABLE,
) -> stage.Result:
    """Keep records (one caption each) whose ``clip_score`` >= ``threshold`` (every scored one
    when None).

    A record that already has a ``reason`` is dropped with it; one without a score (the model
    could not read the image) with ``undecodable``; one below the threshold with
    ``low_clip_score``. Each dropped record says why in ``detail``.
    """
    kept, rejected = [], []
    for r in records:
        score = r.get(SCORE_FIELD)
        if r.get("reason"):
            rejected.append(r)
        elif score is None:
            rejected.append({**r, "reason": undecodable, "detail": UNREADABLE_DETAIL})
        elif threshold is not None and score < threshold:
            rejected.append({**r, "reason": LOW_SCORE, "detail": _below([score], threshold)})
        else:
            kept.append(r)
    return stage.Result(kept, rejected)


def pair_scores(record: Mapping[str, Any]) -> list[float]:
    """A scored sample's pair scores (none for an undecodable image): the pool's values."""
    return [p[SCORE_FIELD] for p in record.get("pairs") or () if p.get(SCORE_FIELD) is not None]


def score_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A scored sample's rows of the scores table: ``key``, ``uid``, ``clip_score`` per pair
    (``clip_score`` null where the image does not decode)."""
    return [
        {"key": record["key"], "uid": p.get("uid") or "", SCORE_FIELD: p.get(SCORE_FIELD)}
        for p in record.get("pairs") or ()
    ]
