"""MetaCLIP balancing: flatten the distribution of concepts (queries) over the pool.

MetaCLIP (Xu et al. 2023, ``metaclip/balancing.py``) counts how many pairs match each query
("entry") over the whole pool; a query with count ``c`` gets probability ``p = min(1, t / c)``
(``t = 20,000`` in the paper, for 400M pairs), and a pair whose caption matches the queries ``E``
is kept when any of its per-query draws succeeds, i.e. with probability
``1 - prod_{e in E} (1 - p_e)``. Head queries ("photo", "image") are sampled down to about ``t``
pairs each; tail queries keep everything.

Here the draw is one uniform number per record, derived from a keyed hash of
``(seed, phase, id)`` (``id`` is the pair ``uid`` before download and the image ``key`` after
it), compared with ``1 - prod(1 - p_e)``: the same keep probability as MetaCLIP's per-query
draws, and the same decision on every runner, bundle split and worker count. Raising ``t`` only
adds records (the kept sets are nested).

Two phases:

- ``PreBalance`` before download, over ``wit gather`` candidates (pairs), with ``t`` multiplied by
  an oversampling factor ``f`` (``p = min(1, f * t / c)``): downloads are not spent on head
  queries, while enough survive download failures and dedup for the exact balance.
- ``BalanceSamples`` after download and dedup, over final samples (one per image, possibly with
  several pairs after URL grouping and near-duplicate collapsing): ``E`` is the union of the
  ``query_ids`` of the sample's pairs and counts are taken over samples, exactly MetaCLIP's
  algorithm with the sample as the unit. Records that match no query are dropped (``no_query``),
  as MetaCLIP keeps only matched texts. With ``unit="pair"`` (``balance.unit = pair``) counts and
  draws are per pair (id = pair ``uid``), as MetaCLIP: a sample keeps the pairs drawn, and is
  dropped when none is (``balance_sample_pairs``).

Each kept sample's ``caption`` (``KEY.txt``) is the caption of its pair with the rarest query
(smallest pool count; ties by ``uid``), so that a sample kept for a tail concept is captioned
with it; every caption stays in ``captions``. In a build that CLIP-scores (``--seed-model``), the
score stage runs before balancing and a sample's ``caption`` is its best-scoring caption instead.
Per-query counts (before, after pre-balance, after
download, after dedup, final) are written as a Parquet table by ``WriteQueryCounts``.
"""

from __future__ import annotations

import collections
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa

from wit_pipeline import beam_utils, fileio, stage
from wit_pipeline import counters as counters_lib
from wit_pipeline.config import BalanceConfig
from wit_pipeline.errors import WitError
from wit_pipeline.stages import balance_arrays as arrays
from wit_pipeline.stages.balance_reads import ReadQueryIds, read_row_groups

PREBALANCED_OUT = "prebalanced_out"
BALANCED_OUT = "balanced_out"
NO_QUERY = arrays.NO_QUERY

PHASE_PREBALANCE = "prebalance"
PHASE_BALANCE = "balance"

QUERY_COUNTS = "query_counts.parquet"  # the per-query counts table of a step
# Columns of the per-query counts table, in order.
COUNT_COLUMNS = ("before", "after_prebalance", "after_download", "after_dedup", "final")


def query_probabilities(counts: Mapping[int, int], t: float) -> dict[int, float]:
    """MetaCLIP's ``p = min(1, t / c)`` for every query with a non-zero count."""
    if t <= 0:
        raise ValueError(f"t must be > 0, got {t}")
    return {int(q): min(1.0, t / c) for q, c in counts.items() if c > 0}


def keep_probability(query_ids: Iterable[int], probs: Mapping[int, float]) -> float:
    """``1 - prod(1 - p_e)`` over the matched queries (0 for none), computed stably."""
    query_ids = set(query_ids)
    if len(query_ids) == 1:
        return probs.get(next(iter(query_ids)), 0.0)
    log_miss = 0.0
    for q in query_ids:
        p = probs.get(q, 0.0)
        if p >= 1.0:
            return 1.0
        log_miss += math.log1p(-p)
    return -math.expm1(log_miss) if log_miss else 0.0


class Draws:
    """Reproducible uniform draws in ``[0, 1)``: ``blake2b(key=seed)(phase, NUL, id)``, 53 bits."""

    def __init__(self, seed: int, phase: str):
        self._base = hashlib.blake2b(digest_size=8, key=str(int(seed)).encode())
        self._base.update(f"{phase}\0".encode())

    def __call__(self, record_id: str) -> float:
        h = self._base.copy()
        h.update(record_id.encode("utf-8", "surrogatepass"))
        return (int.from_bytes(h.digest(), "big") >> 11) / float(1 << 53)


def uniform(seed: int, phase: str, record_id: str) -> float:
    """One draw of ``Draws(seed, phase)`` (use ``Draws`` for many)."""
    return Draws(seed, phase)(record_id)


def count_queries(records: Iterable[Mapping[str, Any]]) -> collections.Counter:
    """``{query_id: records matching it}``: each record counts once per distinct query."""
    dense = arrays.count_arrays(*arrays.flat_lists([r.get("query_ids") for r in records]))
    ids = np.flatnonzero(dense)
    return collections.Counter(dict(zip(ids.tolist(), dense[ids].tolist(), strict=True)))


def drop_detail(reason: str, probability: float) -> str:
    """The ``detail`` of a record the draw dropped: why, or with which keep probability."""
    if reason == NO_QUERY:
        return "matches no query"
    return f"keep probability {probability:.6g}"


def balance_records(
    records: Iterable[Mapping[str, Any]],
    probs: Mapping[int, float] | arrays.Probabilities,
    *,
    seed: int,
    phase: str,
    id_field: str,
    reason: str,
) -> stage.Result:
    """Draw each record: kept ones get ``balance_probability``, dropped ones a ``reason``.

    A record that matches no query is dropped with ``no_query``, one whose draw fails with
    ``reason``; both carry the keep probability (and a ``detail`` saying it). Computed for the
    whole batch at once (``balance_arrays``), with the numbers of ``keep_probability`` and
    ``Draws`` record by record.
    """
    records = list(records)
    table = probs if isinstance(probs, arrays.Probabilities) else arrays.Probabilities(probs)
    qids = [r.get("query_ids") or () for r in records]
    p = arrays.keep_probabilities(*arrays.flat_lists(qids), table, qids)
    has_query = np.fromiter((bool(q) for q in qids), dtype=bool, count=len(qids))

    def ids(indices: np.ndarray) -> list[str]:
        return [str(records[i][id_field]) for i in indices.tolist()]

    won, no_query = arrays.decide(p, has_query, ids, Draws(seed, phase))
    kept, dropped = [], []
    for r, keep, none, prob in zip(
        records, won.tolist(), no_query.tolist(), p.tolist(), strict=True
    ):
        if keep:
            kept.append({**r, "balance_probability": prob})
        else:
            why = NO_QUERY if none else reason
            dropped.append(
                {**r, "reason": why, "balance_probability": prob, "detail": drop_detail(why, prob)}
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
    """Balance samples pair by pair (``balance.unit = pair``).

    Every pair is decided by ``balance_records`` as a record of its own (id = its ``uid``,
    ``E`` = its ``query_ids``), so the pairs kept are exactly those ``balance_records`` keeps
    from the pair records. A sample keeps its drawn pairs (``query_ids`` = their union,
    ``balance_probability`` = ``1 - prod(1 - p)`` over its pairs: the chance that any is drawn)
    and is dropped when none is (``rejected``): ``no_query`` when no pair matches a query, else
    ``reason``. ``partial`` holds, per kept sample and reason, a record with the pairs it lost.
    ``counts`` counts every dropped pair under its own reason (``pair/dropped:*``: the pairs of
    a dropped sample may have lost for different reasons).
    """
    kept, dropped, partial = [], [], []
    pair_drops: counters_lib.Counter = counters_lib.Counter()
    extra = ("_id", "reason", "balance_probability", "detail")

    def strip(ps: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in p.items() if k not in extra} for p in ps]

    table = probs if isinstance(probs, arrays.Probabilities) else arrays.Probabilities(probs)
    for s in samples:
        pairs = [{**p, "_id": p.get("uid") or f"{s['key']}:{i}"} for i, p in enumerate(s["pairs"])]
        drawn = balance_records(pairs, table, seed=seed, phase=phase, id_field="_id", reason=reason)
        won, lost = drawn.kept, drawn.rejected
        for p in lost:
            pair_drops[counters_lib.scoped(stage.PAIR, counters_lib.dropped(p["reason"]))] += 1
        qids = [p["query_ids"] or () for p in pairs]
        miss = 1.0
        for x in arrays.keep_probabilities(*arrays.flat_lists(qids), table, qids).tolist():
            miss *= 1.0 - x
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


def choose_caption(pairs: Sequence[Mapping[str, Any]], counts: Mapping[int, int]) -> str:
    """The caption of the pair whose rarest query has the smallest count (ties: smallest uid).

    In a scored build (every pair has a ``clip_score``), the best-scoring caption instead (ties:
    smallest uid): the caption the seed found closest to the image.
    """
    if not pairs:
        return ""
    if len(pairs) == 1:
        return pairs[0]["caption"]
    if all(p.get("clip_score") is not None for p in pairs):
        return min(pairs, key=lambda p: (-p["clip_score"], p.get("uid") or ""))["caption"]

    def score(p):
        c = [counts.get(int(q), 0) for q in p.get("query_ids") or ()]
        c = [x for x in c if x > 0]
        return (min(c) if c else math.inf, p.get("uid") or "")

    return min(pairs, key=score)["caption"]


# ---------------------------------------------------------------------------------------------
# Beam


class _CountBatchFn(beam.DoFn):
    """Counts per query over a whole bundle, emitted once at its end as one dense array.

    A batch is a list of records or an Arrow table of them (``pairs``: count the records'
    pairs, a ``pairs`` column of structs with ``query_ids``).
    """

    def __init__(self, *, pairs: bool = False):
        super().__init__()
        self._pairs = pairs

    # Query ids are kept until this many, then added up with one bincount: a bincount per
    # batch would allocate and add a whole count array (as long as the query list) each time.
    FLUSH_IDS = 1 << 22

    def start_bundle(self):
        self._counts = np.zeros(0, np.int64)
        self._ids: list[np.ndarray] = []
        self._held = 0

    def process(self, batch):
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        if isinstance(batch, pa.Table):
            ids = arrays.table_query_ids(batch, pairs=self._pairs)
        else:
            records = [p for r in batch for p in r["pairs"]] if self._pairs else batch
            ids = arrays.distinct_values(*arrays.flat_lists([r.get("query_ids") for r in records]))
        self._ids.append(ids)
        self._held += len(ids)
        if self._held >= self.FLUSH_IDS:
            self._flush()

    def _flush(self):
        if self._held:
            self._counts = arrays.add_dense(self._counts, np.bincount(np.concatenate(self._ids)))
        self._ids, self._held = [], 0

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        self._flush()
        if self._counts.size:
            window = GlobalWindow()
            yield WindowedValue(self._counts, window.max_timestamp(), [window])
        self._counts = np.zeros(0, np.int64)


class _SumDense(beam.CombineFn):
    """Sums dense count arrays (of any lengths) into one."""

    def create_accumulator(self):
        return np.zeros(0, np.int64)

    def add_input(self, acc, dense):
        return arrays.add_dense(acc, dense)

    def merge_accumulators(self, accumulators):
        total = np.zeros(0, np.int64)
        for a in accumulators:
            total = arrays.add_dense(total, a)
        return total

    def extract_output(self, acc):
        return acc


def _count_pairs(dense: np.ndarray):
    """A dense count array -> its ``(query_id, count)`` pairs (non-zero ones)."""
    ids = np.flatnonzero(dense)
    return zip(ids.tolist(), dense[ids].tolist(), strict=True)


def _with_query_ids(inputs) -> tuple[Any, Any]:
    """``inputs`` -> ``(records, query-id tables)``: a PCollection alone is counted itself; a
    dict ``{"records": ..., "query_ids": ...}`` brings the same records' query columns apart
    (``ReadQueryIds``), so that the records are read once, by the draw, and no stage boundary
    between counting and drawing carries them."""
    if isinstance(inputs, Mapping):
        unknown = set(inputs) - {"records", "query_ids"}
        if unknown or "records" not in inputs:
            raise ValueError(f"expected {{'records', 'query_ids'}}, got {sorted(inputs)}")
        return inputs["records"], inputs.get("query_ids")
    return inputs, None


def _batched(pcoll, batch_size: int, tables: bool):
    """Records -> lists of ``batch_size`` records; Arrow tables are batches already."""
    if tables:
        return pcoll
    return pcoll | "Batch" >> beam.BatchElements(
        min_batch_size=batch_size, max_batch_size=batch_size
    )


class CountQueries(beam.PTransform):
    """Records with ``query_ids`` -> ``(query_id, count)`` over the whole PCollection.

    ``tables=True``: the elements are Arrow tables (or record batches) of records.
    """

    def __init__(self, *, batch_size: int = 4096, tables: bool = False, pairs: bool = False):
        super().__init__()
        self._batch_size = batch_size
        self._tables = tables
        self._pairs = pairs

    def expand(self, records):
        return self.dense(records) | "Pairs" >> beam.FlatMap(_count_pairs)

    def dense(self, records):
        """The counts as one dense array (a singleton PCollection), for side inputs."""
        return (
            _batched(records, self._batch_size, self._tables)
            | "CountBatch" >> beam.ParDo(_CountBatchFn(pairs=self._pairs))
            | "Sum" >> beam.CombineGlobally(_SumDense())
        )


class _DenseCounts(beam.PTransform):
    """``counter.dense`` as a transform of its own (a label for the graph)."""

    def __init__(self, counter: CountQueries):
        super().__init__()
        self._counter = counter

    def expand(self, records):
        return self._counter.dense(records)


class CountUnits(beam.PTransform):
    """Samples -> ``(query_id, count)`` over samples (``unit="image"``) or their pairs."""

    def __init__(self, *, unit: str, batch_size: int = 4096, tables: bool = False):
        super().__init__()
        self._unit = unit
        self._batch_size = batch_size
        self._tables = tables

    def _counter(self) -> CountQueries:
        return CountQueries(
            batch_size=self._batch_size, tables=self._tables, pairs=self._unit == "pair"
        )

    def expand(self, samples):
        return samples | "Count" >> self._counter()

    def dense(self, samples):
        """The counts as one dense array (a singleton PCollection), for side inputs."""
        return self._counter().dense(samples)


class _BalanceFn(stage.StageFn):
    """A batch of records and the pool's counts per query -> the draw's kept and dropped ones.

    Counts drops only when balancing inside a pipeline of several stages (``flow=False``):
    the stage where records enter counts input, the one where they leave counts kept. A
    batch is a list of records or an Arrow table (``balance_arrays``: the same draws).
    """

    def __init__(
        self,
        *,
        t: float,
        seed: int,
        phase: str,
        id_field: str,
        reason: str,
        unit: str = "",
        tables: bool = False,
    ):
        super().__init__(
            stage=phase,
            flow=phase == PHASE_PREBALANCE,  # pre-balancing is a step of its own
            pairs=unit == "image",  # a dropped sample's pairs go with it
            kept_as="batch" if tables else "rows",
        )
        self._t = t
        self._seed = seed
        self._phase = phase
        self._id_field = id_field
        self._reason = reason
        self._unit = unit

    def setup(self):
        self._seen = None
        self._probs = arrays.Probabilities({})
        self._draw = Draws(self._seed, self._phase)

    def core(self, batch, dense):
        if dense is not self._seen:  # the side input is the same object for a whole bundle
            self._counts = arrays.DenseCounts(dense)
            self._probs = arrays.Probabilities.from_counts(dense, self._t)
            self._seen = dense
        counts = self._counts
        if isinstance(batch, pa.RecordBatch):
            batch = pa.Table.from_batches([batch])
        if isinstance(batch, pa.Table):
            return self._core_table(batch, counts)
        if self._unit == "pair":
            result = balance_sample_pairs(
                batch, self._probs, seed=self._seed, phase=self._phase, reason=self._reason
            )
        else:
            result = balance_records(
                batch,
                self._probs,
                seed=self._seed,
                phase=self._phase,
                id_field=self._id_field,
                reason=self._reason,
            )
        if self._phase == PHASE_BALANCE:
            for r in result.kept:
                r["caption"] = choose_caption(r["pairs"], counts)
                if r.get("clip_score") is not None:  # scored: the best of the pairs kept
                    r["clip_score"] = max(p["clip_score"] for p in r["pairs"])
        return result

    def _core_table(self, table: pa.Table, counts) -> stage.Result:
        if self._unit == "pair":
            result = arrays.balance_sample_pairs_table(
                table, self._probs, self._draw, reason=self._reason
            )
        else:
            result = arrays.balance_table(
                table, self._probs, self._draw, id_field=self._id_field, reason=self._reason
            )
        if self._phase == PHASE_BALANCE:
            result.kept = arrays.with_captions(result.kept, counts)
        if "pairs" in table.column_names:  # sample rows: uids and captions for rejected/
            result.rejected = arrays.sample_lists(result.rejected)
            if isinstance(result.partial, pa.Table):
                result.partial = arrays.sample_lists(result.partial)
        return result


class _Draw(beam.PTransform):
    """Keep each record with probability ``1 - prod(1 - min(1, t / c_e))`` (seeded, by id).

    ``counts`` is a singleton PCollection: the pool's dense count array (``CountQueries.dense``),
    so that the side input is one array, not a dict of every query. Returns the stage
    outputs (``stage.apply``): ``kept`` (with ``balance_probability``), ``rejected``, ``counts``.
    """

    def __init__(self, *, counts, fn: _BalanceFn, batch_size: int, tables: bool = False):
        super().__init__()
        self._counts = counts
        self._fn = fn
        self._batch_size = batch_size
        self._tables = tables

    def expand(self, records):
        batches = _batched(records, self._batch_size, self._tables)
        return stage.apply(batches, "Draw", self._fn, beam.pvalue.AsSingleton(self._counts))


class PreBalance(beam.PTransform):
    """Gather candidates (pairs) -> candidates kept with ``p = min(1, factor * t / c)``.

    ``balance.prebalance_factor`` is the oversampling factor (0 disables the step: refused
    here). Returns a dict: ``kept``, ``rejected`` (reason ``prebalanced_out`` or ``no_query``),
    ``counts`` (input, kept and drops), ``before`` and ``after`` (``(query_id, n)`` over pairs).

    ``tables=True``: the candidates come as Arrow tables (``ReadFromParquetBatched``), and
    ``kept`` and ``rejected`` are tables too; counted and drawn per table
    (``balance_arrays``), the same records are kept as with dict records. The input may be
    ``{"records": candidates, "query_ids": their query ids}`` (``ReadQueryIds``): counted from
    the second, drawn from the first (see ``BalanceSampleFiles``).
    """

    def __init__(self, *, config: BalanceConfig, batch_size: int = 4096, tables: bool = False):
        super().__init__()
        if not config.prebalance:
            raise WitError("balance.prebalance_factor is 0: pre-balancing is disabled")
        self._fn = _BalanceFn(
            t=config.t * config.prebalance_factor,
            seed=config.seed,
            phase=PHASE_PREBALANCE,
            id_field="uid",
            reason=PREBALANCED_OUT,
            tables=tables,
        )
        self._batch_size = batch_size
        self._tables = tables

    def expand(self, candidates):
        size, tables = self._batch_size, self._tables
        candidates, query_ids = _with_query_ids(candidates)
        if query_ids is None:
            dense = CountQueries(batch_size=size, tables=tables).dense(candidates)
        else:
            dense = query_ids | "CountQueryIds" >> _DenseCounts(CountQueries(tables=True))
        before = dense | "CountBefore" >> beam.FlatMap(_count_pairs)
        out = candidates | "Balance" >> _Draw(
            counts=dense, fn=self._fn, batch_size=size, tables=tables
        )
        after = out["kept"] | "CountAfter" >> CountQueries(batch_size=size, tables=tables)
        return {**out, "before": before, "after": after}


class BalanceSamples(beam.PTransform):
    """Deduplicated samples -> MetaCLIP-balanced samples (``balance.t`` as is).

    ``balance.unit = image``: counted over samples and drawn by sample ``key``; ``pair``:
    counted over pairs and drawn by pair ``uid`` (``balance_sample_pairs``). Returns a dict:
    ``kept`` (with ``caption`` and ``balance_probability``), ``rejected`` (``balanced_out``,
    ``no_query``), ``counts`` (drops only), ``before`` and ``after`` (``(query_id, n)`` over
    the unit).

    ``tables=True``: samples come as Arrow tables (``key``, ``query_ids``, ``pairs`` as a list
    of structs with ``uid``, ``caption``, ``query_ids``; ``samples.SAMPLE_SCHEMA`` has them),
    and ``kept``, ``rejected`` (with ``uids`` and ``captions``) are tables; the same samples
    and pairs are kept as with dict records. The input may be ``{"records": samples,
    "query_ids": their query ids}`` (``ReadQueryIds``): counted from the second, drawn from the
    first (``BalanceSampleFiles`` reads samples files so).
    """

    def __init__(self, *, config: BalanceConfig, batch_size: int = 4096, tables: bool = False):
        super().__init__()
        self._unit = config.unit
        self._fn = _BalanceFn(
            t=config.t,
            seed=config.seed,
            phase=PHASE_BALANCE,
            id_field="key",
            reason=BALANCED_OUT,
            unit=config.unit,
            tables=tables,
        )
        self._batch_size = batch_size
        self._tables = tables

    def _count(self, records, label: str):
        return records | label >> CountUnits(
            unit=self._unit, batch_size=self._batch_size, tables=self._tables
        )

    def expand(self, samples):
        samples, query_ids = _with_query_ids(samples)
        if query_ids is None:
            dense = CountUnits(
                unit=self._unit, batch_size=self._batch_size, tables=self._tables
            ).dense(samples)
        else:
            counter = CountQueries(tables=True, pairs=self._unit == "pair")
            dense = query_ids | "CountQueryIds" >> _DenseCounts(counter)
        before = dense | "CountBefore" >> beam.FlatMap(_count_pairs)
        out = samples | "Balance" >> _Draw(
            counts=dense, fn=self._fn, batch_size=self._batch_size, tables=self._tables
        )
        after = self._count(out["kept"], "CountAfter")
        return {**out, "before": before, "after": after}


def _input_counts(table: pa.Table) -> list[tuple[str, int]]:
    """``input`` and ``pair/input`` of a table of samples (``stage.count_records``' names)."""
    pairs = arrays.pair_lists(table)[1][-1] if table.num_rows else 0
    return [
        (counters_lib.INPUT, table.num_rows),
        (counters_lib.scoped(stage.PAIR, counters_lib.INPUT), int(pairs)),
    ]


class BalanceSampleFiles(beam.PTransform):
    """Samples Parquet files (``wit dedup``'s) -> ``BalanceSamples(tables=True)``'s outputs.

    The files are read twice: once only their query columns (``ReadQueryIds``), for the
    counts; once whole, by the draw, which the runner fuses with that read. Reading one
    PCollection for both would make every runner materialize the samples between counting and
    drawing (the draw waits for the counts); a second read of only the query ids costs a
    fraction of that. The files are a ``file_pattern`` or a list of ``files``. Records enter
    the pipeline here, so ``counts`` also holds ``input`` and ``pair/input``. Apply to the
    pipeline: ``p | BalanceSampleFiles(...)``.
    """

    def __init__(
        self,
        *,
        config: BalanceConfig,
        file_pattern: str = "",
        files: Sequence[str] = (),
        batch_size: int = 4096,
    ):
        super().__init__()
        self._query_ids = ReadQueryIds(
            file_pattern=file_pattern, files=files, pairs=config.unit == "pair"
        )
        self._pattern = file_pattern
        self._files = list(files)
        self._balance = BalanceSamples(config=config, batch_size=batch_size, tables=True)

    def expand(self, pbegin):
        if self._pattern:
            # validate=False: a remote runner's workers list the glob, not the launcher.
            records = pbegin | "ReadSamples" >> beam.io.ReadFromParquetBatched(
                self._pattern, validate=False
            )
        else:
            records = (
                pbegin
                | "Files" >> beam.Create(self._files, reshuffle=False)
                | "Spread" >> beam.Reshuffle()
                | "ReadSamples" >> beam.FlatMap(read_row_groups)
            )
        query_ids = pbegin | "ReadQueryIds" >> self._query_ids
        out = {"records": records, "query_ids": query_ids} | "Balance" >> self._balance
        entered = records | "CountInput" >> beam.FlatMap(_input_counts)
        counts = (entered, out[beam_utils.COUNTS]) | "AllCounts" >> beam.Flatten()
        return {**out, beam_utils.COUNTS: counts}


def query_counts_table(
    columns: Mapping[str, Mapping[int, int]],
    *,
    queries: Sequence[str] | None = None,
    t: float | None = None,
    prebalance_factor: float | None = None,
):
    """The per-query counts table: one row per query seen in any column, sorted by id.

    Count columns are ``COUNT_COLUMNS`` (those not given are null, so that ``wit build`` and
    the separate commands write the same schema). With ``t``, ``p_balance = min(1, t / c)``
    over ``after_dedup``; with ``prebalance_factor``, ``p_prebalance`` over ``before``.
    """
    unknown = set(columns) - set(COUNT_COLUMNS)
    if unknown:
        raise ValueError(f"unknown count columns: {sorted(unknown)}")
    ids = sorted({int(q) for col in columns.values() for q in col})
    data: dict[str, Any] = {"query_id": pa.array(ids, pa.int32())}
    if queries is not None:
        data["query"] = pa.array([queries[q] if 0 <= q < len(queries) else None for q in ids])
    for name in COUNT_COLUMNS:
        col = columns.get(name)
        values = [int(col.get(q, 0)) for q in ids] if col is not None else [None] * len(ids)
        data[name] = pa.array(values, pa.int64())

    def prob(col_name, tt):
        col = columns.get(col_name)
        if col is None or tt is None:
            return pa.array([None] * len(ids), pa.float64())
        return pa.array([min(1.0, tt / col[q]) if col.get(q) else None for q in ids], pa.float64())

    t_pre = t * prebalance_factor if (t is not None and prebalance_factor) else None
    data["p_prebalance"] = prob("before", t_pre)
    data["p_balance"] = prob("after_dedup", t)
    return pa.table(data)


def write_query_counts(path: str, table) -> None:
    import pyarrow.parquet as pq

    with fileio.atomic_write(path, "wb") as f:
        pq.write_table(table, f, compression="zstd")


def read_query_counts(path: str) -> dict[str, dict[int, int]]:
    """Count columns of a query-counts Parquet file (non-null columns only)."""
    import pyarrow.parquet as pq

    with fileio.open_file(path, "rb") as f:
        table = pq.read_table(f)
    ids = table.column("query_id").to_pylist()
    out = {}
    for name in COUNT_COLUMNS:
        if name in table.column_names:
            vals = table.column(name).to_pylist()
            if any(v is not None for v in vals):
                out[name] = {q: int(v) for q, v in zip(ids, vals, strict=True) if v}
    return out


def _write_counts_file(_, path: str, extra: Mapping[str, Any], base: str, **cols: Any) -> str:
    columns = {k: dict(v) for k, v in cols.items()}
    if base and fileio.exists(base):
        for k, v in read_query_counts(base).items():
            columns.setdefault(k, v)
    queries = None
    if extra.get("queries_path"):
        from wit_pipeline.queries import load_queries

        queries = load_queries(extra["queries_path"])
    table = query_counts_table(
        columns, queries=queries, t=extra.get("t"), prebalance_factor=extra.get("factor")
    )
    write_query_counts(path, table)
    return path


class WriteQueryCounts(beam.PTransform):
    """``{column: PCollection[(query_id, n)]}`` -> one Parquet table at ``path``.

    ``base`` is an earlier table (e.g. the dedup command's) whose columns fill the ones not
    given here; ``queries_path`` adds the query text; ``t``/``prebalance_factor`` add the
    probability columns.
    """

    def __init__(
        self,
        path: str,
        *,
        base: str = "",
        queries_path: str = "",
        t: float | None = None,
        prebalance_factor: float | None = None,
    ):
        super().__init__()
        self._path = path
        self._base = base
        self._extra = {"queries_path": queries_path, "t": t, "factor": prebalance_factor}

    def expand(self, columns: Mapping[str, Any]):
        unknown = set(columns) - set(COUNT_COLUMNS)
        if unknown:
            raise ValueError(f"unknown count columns: {sorted(unknown)}")
        root = next(iter(columns.values())).pipeline
        dicts = {
            name: pcoll | f"ToDict[{name}]" >> beam.combiners.ToDict()
            for name, pcoll in columns.items()
        }
        side = {n: beam.pvalue.AsSingleton(d) for n, d in sorted(dicts.items())}
        return (
            root
            | "Once" >> beam.Create([None])
            | "Write" >> beam.Map(_write_counts_file, self._path, self._extra, self._base, **side)
        )
