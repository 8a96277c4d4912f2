"""The threshold: fixed, a top fraction, or calibrated on the data (``score.threshold: auto``).

The auto threshold models the pool's pair scores as a mix of two distributions: matched pairs
(the caption describes the image) and mismatched ones (it does not), in unknown shares.

1. **The null.** Mismatched pairs are taken to look like an image with the caption of another
   image of the pool. ``score.null_samples`` images (default 10,000; all when the pool has fewer)
   are chosen by a keyed hash of their key (:func:`null_rank`, seeded by ``score.null_seed``);
   in the order of that hash, each image is scored against the first caption (by ``uid``) of the
   next one, cyclically (:func:`null_scores`). The choice and the pairing depend on the keys
   only, never on batch positions, so every runner, batch size and worker count gets the same
   null.
2. **The mismatched share** ``pi0``: Storey's estimator on the pool's null p-values,
   ``pi0 = #{p > lambda} / ((1 - lambda) m)`` with ``lambda = 0.5``, capped to ``[0, 1]``
   (:func:`storey_pi0`); ``p`` of a score ``s`` is ``(#{null >= s} + 1) / (n + 1)``.
3. **Expected precision and recall** at a threshold ``t``, with ``m`` pool pairs and
   ``F(t) = (#{null >= t} + 1) / (n + 1)``: ``1 - pi0 m F(t) / #{pool >= t}`` and
   ``(#{pool >= t} - pi0 m F(t)) / ((1 - pi0) m)`` (:func:`curve`). The +1 (the permutation-test
   convention) keeps the tail beyond the null's largest score from being taken as free of
   mismatches.
4. **The choice**: the lowest ``t`` of a fine grid (:data:`FINE_BINS` bins over [-1, 1], width
   1e-4) whose expected precision reaches ``score.target_precision``; when none does, the ``t`` of
   the highest expected precision, with ``target_met: false`` and a logged warning
   (:func:`choose_threshold`).

Everything is computed from two histograms on that grid (the pool's, a combiner output, and the
null's), so the cost does not grow with the pool. :func:`decide` gives the threshold of every
mode with the document written to ``score.json`` and the build's ``stats.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np

from wit_pipeline.config import ScoreConfig
from wit_pipeline.stages import balance
from wit_pipeline.stages.score.model import NULL_FIELD, NULL_MARK, pair_score

LOG = logging.getLogger("wit_pipeline.score")

FINE_BINS = 20_000  # the grid of candidate thresholds and of both histograms: width 1e-4
LO, HI = -1.0, 1.0
DOC_BINS = 100  # at most this many bins in the histograms written to score.json
LAMBDA = 0.5  # Storey's lambda
NULL_PHASE = "null"  # the hash phase of the null's choice and order (balance.Draws)
DIGITS = 4  # grid edges are multiples of 1e-4: written with 4 decimals


# ---------------------------------------------------------------------------------------------
# The grid and histograms


def edge(j: Any) -> Any:
    """The grid's ``j``-th edge (``-1 + j * 1e-4``, the nearest double to that decimal)."""
    return np.round(LO + np.asarray(j, dtype=np.float64) * ((HI - LO) / FINE_BINS), DIGITS)


def bin_index(scores: Iterable[float] | np.ndarray) -> np.ndarray:
    """The grid bin of each score: ``edge(j) <= s < edge(j + 1)``, exactly as float comparisons
    go (scores outside [-1, 1] fall in the first or last bin)."""
    s = np.asarray(list(scores) if not isinstance(scores, np.ndarray) else scores, np.float64)
    j = np.clip(np.floor((s - LO) / ((HI - LO) / FINE_BINS)).astype(np.int64), 0, FINE_BINS - 1)
    j = np.where((s < edge(j)) & (j > 0), j - 1, j)  # rounding put s one bin too high
    return np.where((s >= edge(j + 1)) & (j < FINE_BINS - 1), j + 1, j)


def histogram(scores: Iterable[float] | np.ndarray) -> np.ndarray:
    """Counts of ``scores`` on the grid (int64, :data:`FINE_BINS` bins)."""
    idx = bin_index(scores)
    return np.bincount(idx, minlength=FINE_BINS).astype(np.int64)


def at_or_above(hist: np.ndarray) -> np.ndarray:
    """``#{s >= edge(j)}`` for every bin ``j`` of a histogram."""
    return np.cumsum(hist[::-1])[::-1]


def doc_histogram(pool: np.ndarray, null: np.ndarray, bins: int = DOC_BINS) -> dict[str, Any]:
    """Both histograms on at most ``bins`` common bins spanning the scores seen (edges on the
    grid): ``{"edges", "pool", "null"}`` for ``score.json`` and the report's plot."""
    seen = np.nonzero(pool + null)[0]
    if not len(seen):
        return {"edges": [], "pool": [], "null": []}
    first, last = int(seen[0]), int(seen[-1])
    width = max(1, math.ceil((last + 1 - first) / bins))
    start = (first // width) * width
    n = math.ceil((last + 1 - start) / width)
    starts = start + width * np.arange(n)
    padded = lambda h: np.concatenate([h, np.zeros(width, np.int64)])  # noqa: E731
    return {
        "edges": [float(e) for e in edge(start + width * np.arange(n + 1))],
        "pool": [int(c) for c in np.add.reduceat(padded(pool), starts)],
        "null": [int(c) for c in np.add.reduceat(padded(null), starts)],
    }


# ---------------------------------------------------------------------------------------------
# The mixture


def storey_pi0(pool: np.ndarray, null: np.ndarray, lam: float = LAMBDA) -> float | None:
    """Estimated share of mismatched pairs in the pool (None without pool pairs or null).

    Storey's estimator: pool pairs whose null p-value exceeds ``lam`` come from the null with
    probability close to 1, and the null puts ``1 - lam`` of its mass there. Matched pairs with
    a large p-value make it overestimate the share (the estimate is conservative).
    """
    m, n = int(pool.sum()), int(null.sum())
    if m == 0 or n == 0:
        return None
    p = (at_or_above(null) + 1) / (n + 1)  # of a pool score at a bin's lower edge
    return float(min(1.0, pool[p > lam].sum() / ((1.0 - lam) * m)))


@dataclasses.dataclass(frozen=True)
class Curve:
    """Expected precision and recall at every grid edge ``j`` (NaN where nothing is kept)."""

    kept: np.ndarray  # #{pool >= edge(j)}
    precision: np.ndarray
    recall: np.ndarray


def curve(pool: np.ndarray, null: np.ndarray, pi0: float) -> Curve:
    """Expected precision and recall of keeping the pool pairs at or above each grid edge."""
    m, n = int(pool.sum()), int(null.sum())
    kept = at_or_above(pool).astype(np.float64)
    false = pi0 * m * (at_or_above(null) + 1) / (n + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(kept > 0, np.clip(1.0 - false / kept, 0.0, 1.0), np.nan)
        if pi0 < 1.0:
            recall = np.clip((kept - false) / ((1.0 - pi0) * m), 0.0, 1.0)
        else:
            recall = np.full(FINE_BINS, np.nan)
    return Curve(kept, precision, recall)


@dataclasses.dataclass(frozen=True)
class Choice:
    threshold: float
    index: int  # the grid edge
    met: bool  # whether the expected precision there reaches the target


def choose_threshold(
    pool: np.ndarray, null: np.ndarray, pi0: float, target: float
) -> Choice | None:
    """The lowest grid edge (between the lowest and the highest pool score) whose expected
    precision reaches ``target``; else the edge of the highest expected precision (the lowest
    such edge), not met. None without pool pairs."""
    seen = np.nonzero(pool)[0]
    if not len(seen):
        return None
    lo, hi = int(seen[0]), int(seen[-1])
    prec = curve(pool, null, pi0).precision[lo : hi + 1]
    ok = np.nonzero(prec >= target - 1e-12)[0]
    if len(ok):
        j, met = lo + int(ok[0]), True
    else:
        j, met = lo + int(np.nanargmax(prec)), False
    return Choice(float(edge(j)), j, met)


def estimates_at(
    pool: np.ndarray, null: np.ndarray, pi0: float, threshold: float | None
) -> tuple[float | None, float | None]:
    """Expected precision and recall of keeping pairs at or above ``threshold`` (None: all), at
    the first grid edge at or above it."""
    if threshold is None or threshold == -math.inf:
        j = 0
    elif threshold > HI:
        return None, None
    else:
        j = int(np.searchsorted(edge(np.arange(FINE_BINS + 1)), threshold, side="left"))
        if j >= FINE_BINS:
            return None, None
    c = curve(pool, null, pi0)
    prec, rec = float(c.precision[j]), float(c.recall[j])
    return (None if math.isnan(prec) else prec), (None if math.isnan(rec) else rec)


# ---------------------------------------------------------------------------------------------
# The null


def null_rank(seed: int, image_id: str) -> float:
    """Where an image stands in the null's order (a keyed hash of its id, uniform in [0, 1))."""
    return balance.uniform(seed, NULL_PHASE, image_id)


def select_null(image_ids: Iterable[str], n: int, seed: int) -> list[str]:
    """The ``n`` images of the null (all when fewer), in the null's order: the smallest
    ``(null_rank, id)``."""
    draws = balance.Draws(seed, NULL_PHASE)
    return [i for _, i in sorted((draws(i), i) for i in set(image_ids))[:n]]


def image_id(record: Mapping[str, Any]) -> str:
    """The image a sample shows (samples of one image share it: ``dedup.collapse = false``)."""
    return str(record.get("image_key") or record["key"])


@dataclasses.dataclass(frozen=True)
class NullCandidate:
    """A null image's embedding and that of its first caption (by ``uid``)."""

    image_id: str
    rank: float
    uid: str
    image: np.ndarray
    text: np.ndarray


def null_candidate(record: Mapping[str, Any], seed: int) -> list[NullCandidate]:
    """The null candidate a scored record carries (``[]`` when it was not selected)."""
    found = record.get(NULL_FIELD)
    if found is None:
        return []
    uid, image, text = found
    iid = image_id(record)
    return [NullCandidate(iid, null_rank(seed, iid), uid, image, text)]


def null_scores(candidates: Iterable[NullCandidate]) -> np.ndarray:
    """The null: in the order of ``(rank, image id)``, each image scored against the first
    caption of the next image, cyclically (an image's first caption: its smallest ``uid`` over
    the samples showing it). Fewer than two images give no null."""
    first: dict[str, NullCandidate] = {}
    for c in candidates:
        cur = first.get(c.image_id)
        if cur is None or (c.uid, c.text.tobytes()) < (cur.uid, cur.text.tobytes()):
            first[c.image_id] = c
    order = sorted(first.values(), key=lambda c: (c.rank, c.image_id))
    n = len(order)
    if n < 2:
        return np.zeros(0, np.float64)
    return np.array([pair_score(order[i].image, order[(i + 1) % n].text) for i in range(n)])


# ---------------------------------------------------------------------------------------------
# The decision


def top_fraction_threshold(scores: Sequence[float] | np.ndarray, keep_fraction: float) -> float:
    """The score threshold that keeps the top ``keep_fraction`` of ``scores``.

    ``k = round(keep_fraction * n)`` (half up) pairs are kept: the threshold is the k-th largest
    score (ties at the threshold are all kept); ``inf`` when k is 0.
    """
    arr = np.asarray(scores, dtype=np.float64)
    k = math.floor(keep_fraction * len(arr) + 0.5)
    if k <= 0 or len(arr) == 0:
        return math.inf
    k = min(k, len(arr))
    return float(np.partition(arr, len(arr) - k)[len(arr) - k])


@dataclasses.dataclass(frozen=True)
class Decision:
    """The threshold the filter applies (None: keep every scored pair; ``inf``: none) and the
    document written to ``score.json`` and ``stats.json``."""

    threshold: float | None
    doc: dict[str, Any]


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isinf(x) or math.isnan(x) else float(x)


def _round(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(float(x), digits)


def decide(
    config: ScoreConfig,
    pool: np.ndarray,
    null: np.ndarray | Sequence[float],
    kth: float | None = None,
    *,
    log: logging.Logger = LOG,
) -> Decision:
    """The threshold of ``config``'s mode and what is known about it.

    ``pool``: the pool's pair scores as a grid histogram; ``null``: the null's scores;
    ``kth``: the top-fraction threshold (``keep_fraction`` mode). The document holds ``mode``,
    ``threshold`` (null: none), ``mismatched_share``, ``expected_precision`` and
    ``expected_recall`` at the threshold (null when the null is empty),
    ``target_precision``, ``target_met`` (auto only), ``pool_pairs``, ``null_size`` and both
    histograms (:func:`doc_histogram`).
    """
    null_arr = np.asarray(null, np.float64)
    null_hist = histogram(null_arr)
    m, n = int(pool.sum()), int(null_arr.size)
    pi0 = storey_pi0(pool, null_hist) if n >= 2 else None
    mode = config.mode
    met: bool | None = None
    threshold: float | None
    if mode == "auto":
        choice = (
            None if pi0 is None else choose_threshold(pool, null_hist, pi0, config.target_precision)
        )
        if choice is None:
            threshold, met = None, False
            log.warning(
                "score: no auto threshold (%d pool pairs, a null of %d): every scored pair kept",
                m,
                n,
            )
        else:
            threshold, met = choice.threshold, choice.met
            if not met:
                log.warning(
                    "score: no threshold reaches the expected precision %.3f; using %.4f, the "
                    "highest expected precision (mismatched share %.3f)",
                    config.target_precision,
                    threshold,
                    pi0,
                )
    elif mode == "fixed":
        threshold = float(config.threshold)  # type: ignore[arg-type]
    elif mode == "keep_fraction":
        threshold = math.inf if kth is None else float(kth)
    else:
        threshold = None
    precision = recall = None
    if pi0 is not None and m:
        precision, recall = estimates_at(pool, null_hist, pi0, threshold)
    doc = {
        "mode": mode,
        "threshold": _finite(threshold),
        "threshold_given": config.threshold,
        "keep_fraction": config.keep_fraction,
        "mismatched_share": _round(pi0),
        "expected_precision": _round(precision),
        "expected_recall": _round(recall),
        "target_precision": config.target_precision,
        "target_met": met,
        "pool_pairs": m,
        "null_size": n,
        "null_samples": config.null_samples,
        "null_seed": config.null_seed,
        "histogram": doc_histogram(pool, null_hist),
    }
    return Decision(threshold, doc)


def describe(doc: Mapping[str, Any]) -> str:
    """One line on a ``score.json`` document: the threshold, how it was chosen, the estimates."""

    def num(x: Any, fmt: str = ".3f") -> str:
        return "n/a" if x is None else format(x, fmt)

    thr = doc.get("threshold")
    mode = doc.get("mode")
    if mode == "auto":
        if doc.get("target_met"):
            head = f"auto threshold {num(thr, '.4f')} (target precision {doc['target_precision']})"
        else:
            head = (
                f"WARNING: no threshold reaches the target precision {doc['target_precision']}; "
                f"threshold {num(thr, '.4f')}, the highest expected precision"
            )
    elif mode == "fixed":
        head = f"threshold {num(thr, '.4f')}"
    elif mode == "keep_fraction":
        head = f"top {doc['keep_fraction']:g} of pairs: threshold {num(thr, '.4f')}"
    else:
        head = "no threshold (every scored pair kept)"
    return (
        f"{head}; expected precision {num(doc.get('expected_precision'))}, recall "
        f"{num(doc.get('expected_recall'))}; mismatched share {num(doc.get('mismatched_share'))} "
        f"({doc.get('pool_pairs', 0):,} pairs, a null of {doc.get('null_size', 0):,})"
    )


# ---------------------------------------------------------------------------------------------
# Beam


class HistogramFn(beam.CombineFn):
    """Scores (None skipped) -> their grid histogram (:func:`histogram`), binned in batches."""

    def create_accumulator(self):
        return ([], np.zeros(FINE_BINS, np.int64))

    def add_input(self, acc, score):
        if score is not None:
            acc[0].append(score)
            if len(acc[0]) >= 4096:
                return self.compact(acc)
        return acc

    def merge_accumulators(self, accs):
        total = np.zeros(FINE_BINS, np.int64)
        for pending, hist in accs:
            total += hist
            if pending:
                total += histogram(pending)
        return ([], total)

    def compact(self, acc):
        return self.merge_accumulators([acc])

    def extract_output(self, acc):
        return self.merge_accumulators([acc])[1]


class ScoresToArray(beam.CombineFn):
    """All non-null scores of a collection as one float32 array (4 bytes per pair)."""

    def create_accumulator(self):
        return ([], [])  # (pending floats, float32 arrays)

    def add_input(self, acc, score):
        if score is not None:
            acc[0].append(score)
        return acc

    def merge_accumulators(self, accs):
        arrays = []
        for pending, arrs in accs:
            arrays.extend(arrs)
            if pending:
                arrays.append(np.asarray(pending, dtype=np.float32))
        merged = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.float32)
        return ([], [merged])

    def compact(self, acc):
        return self.merge_accumulators([acc])

    def extract_output(self, acc):
        return self.merge_accumulators([acc])[1][0]


def _mark(record: dict[str, Any], selected: frozenset[str]) -> dict[str, Any]:
    if image_id(record) in selected:
        return {**record, NULL_MARK: True}
    return record


def _rank_of(iid: str, seed: int) -> tuple[float, str]:
    return (null_rank(seed, iid), iid)


def _ids(ranked: list[tuple[float, str]]) -> frozenset[str]:
    return frozenset(i for _, i in ranked)


class MarkNullSamples(beam.PTransform):
    """Samples -> the same samples, those of the null's images marked (``NULL_MARK``).

    The null's images are the ``score.null_samples`` smallest ``(null_rank, image id)`` of the
    pool (:func:`select_null`), found with a combiner over the distinct image ids.
    """

    def __init__(self, *, config: ScoreConfig):
        super().__init__()
        self._n = config.null_samples
        self._seed = config.null_seed

    def expand(self, samples):
        selected = (
            samples
            | "ImageIds" >> beam.Map(image_id)
            | "Distinct" >> beam.Distinct()
            | "Rank" >> beam.Map(_rank_of, self._seed)
            | "Smallest" >> beam.combiners.Top.Smallest(self._n)
            | "Ids" >> beam.Map(_ids)
        )
        return samples | "Mark" >> beam.Map(_mark, beam.pvalue.AsSingleton(selected))


def strip_null(record: Mapping[str, Any]) -> dict[str, Any]:
    """A scored record without its null mark and embeddings."""
    return {k: v for k, v in record.items() if k not in (NULL_FIELD, NULL_MARK)}


def _decide(_, config: ScoreConfig, pool, candidates, kth=None) -> Decision:
    return decide(config, pool, null_scores(candidates), kth)


class DecideThreshold(beam.PTransform):
    """``{"scores": pool pair scores, "candidates": NullCandidate}`` -> a singleton
    :class:`Decision` (:func:`decide`): the pool's histogram, the null (all candidates on one
    worker: at most ``score.null_samples``) and, for ``keep_fraction``, every score."""

    def __init__(self, *, config: ScoreConfig):
        super().__init__()
        self._config = config

    def expand(self, inputs: Mapping[str, Any]):
        cfg = self._config
        scores = inputs["scores"]
        pool = scores | "PoolHistogram" >> beam.CombineGlobally(HistogramFn())
        candidates = inputs["candidates"] | "AllCandidates" >> beam.combiners.ToList()
        side = [beam.pvalue.AsSingleton(pool), beam.pvalue.AsSingleton(candidates)]
        if cfg.keep_fraction is not None:
            kth = (
                scores
                | "AllScores" >> beam.CombineGlobally(ScoresToArray())
                | "TopFraction" >> beam.Map(top_fraction_threshold, cfg.keep_fraction)
            )
            side.append(beam.pvalue.AsSingleton(kth))
        return (
            scores.pipeline
            | "Once" >> beam.Create([None])
            | "Decide" >> beam.Map(_decide, cfg, *side)
        )
