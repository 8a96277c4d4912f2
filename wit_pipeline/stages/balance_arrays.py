"""Balancing per batch: keep probabilities, draws and counts as arrays, and the Arrow cores.

``balance.py`` states the algorithm (MetaCLIP's, with a keyed-hash draw per record). This
module computes it for a whole batch at once, with exactly the numbers of the per-record
functions ``balance.keep_probability`` and ``balance.Draws``:

- ``p = 1 - prod(1 - p_e)`` over a record's distinct queries. One query: ``p_e`` itself. Any
  ``p_e >= 1``: 1. Two queries: ``-expm1(log1p(-p_a) + log1p(-p_b))`` (a sum of two terms does
  not depend on their order; ``log1p`` is taken per query and ``expm1`` per record with
  Python's ``math``, as the per-record function does). Three or more queries, none certain:
  the per-record function itself, whose sum runs in the set's iteration order;
- the draw ``u`` is taken only where it decides (``0 < p < 1``): ``u`` lies in ``[0, 1)``, so
  ``u < p`` always holds for ``p = 1`` and never for ``p = 0``;
- counts per query are ``numpy.bincount`` over each record's distinct query ids.

``balance_table`` and ``balance_sample_pairs_table`` are the cores over Arrow tables (one row
per record, a ``query_ids`` list column; samples with a ``pairs`` list-of-struct column);
``balance.balance_records`` and ``balance.balance_sample_pairs`` use the same arrays over lists
of dicts. Both keep, for the same seed, exactly the records the per-record rule keeps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wit_pipeline import counters as counters_lib
from wit_pipeline import stage

NO_QUERY = "no_query"  # balance.NO_QUERY (balance imports this module)


class Probabilities:
    """``p_e`` by query id as arrays: ``p`` (0 where a query has no count) and ``log_miss``
    (``math.log1p(-p_e)``, needed only where ``p_e < 1``), and the mapping itself."""

    def __init__(self, probs: Mapping[int, float]):
        self._probs = probs
        size = max(probs, default=-1) + 1
        self.p = np.zeros(size, dtype=np.float64)
        self.log_miss = np.zeros(size, dtype=np.float64)
        for q, p in probs.items():
            self.p[q] = p
            if p < 1.0:
                self.log_miss[q] = math.log1p(-p)

    @classmethod
    def from_counts(cls, dense: np.ndarray, t: float) -> Probabilities:
        """``balance.query_probabilities`` of a dense count array (the same floats:
        ``t / c`` is one correctly rounded division either way)."""
        if t <= 0:
            raise ValueError(f"t must be > 0, got {t}")
        self = cls.__new__(cls)
        counts = np.asarray(dense, dtype=np.int64)
        seen = counts > 0
        self.p = np.zeros(counts.size, dtype=np.float64)
        self.p[seen] = np.minimum(1.0, t / counts[seen])
        self.log_miss = np.zeros(counts.size, dtype=np.float64)
        head = np.flatnonzero(self.p < 1.0)
        head = head[seen[head]]
        self.log_miss[head] = [math.log1p(-x) for x in self.p[head].tolist()]
        self._probs = None
        return self

    @property
    def probs(self) -> Mapping[int, float]:
        """``{query_id: p_e}``, for the per-record function (built when first needed)."""
        if self._probs is None:
            ids = np.flatnonzero(self.p)
            self._probs = dict(zip(ids.tolist(), self.p[ids].tolist(), strict=True))
        return self._probs

    def lookup(self, values: np.ndarray, table: np.ndarray) -> np.ndarray:
        if len(values) and values.min() >= 0 and values.max() < len(table):
            return table[values]
        out = np.zeros(len(values), dtype=np.float64)
        inside = (values >= 0) & (values < len(table))
        out[inside] = table[values[inside]]
        return out


def flat_lists(lists: Sequence[Sequence[int] | None]) -> tuple[np.ndarray, np.ndarray]:
    """``(values, offsets)`` of Python lists of ints (``None`` as empty)."""
    lengths = np.fromiter((len(x) if x else 0 for x in lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter((q for x in lists if x for q in x), dtype=np.int64, count=int(offsets[-1]))
    return values, offsets


def arrow_lists(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(values, offsets)`` of an Arrow list column (nulls as empty lists)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        array = pc.if_else(pc.is_null(array), pa.scalar([], array.type), array)
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(array) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False).astype(np.int64)
    return values, offsets


def _increasing_within(values: np.ndarray, offsets: np.ndarray) -> bool:
    """Whether every record's values are strictly increasing (distinct and sorted, as the
    ``query_ids`` the stages write are): then they need no sorting."""
    if len(values) < 2:
        return True
    step = np.diff(values)
    starts = offsets[1:-1]
    starts = starts[(starts > 0) & (starts < len(values))]
    step[starts - 1] = 1  # a step across two records does not count
    return bool((step > 0).all())


def _distinct(values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each record's distinct values (sorted when they were not already increasing) and the
    record index of each: ``(values, parents)``."""
    n = len(offsets) - 1
    parents = np.repeat(np.arange(n), np.diff(offsets))
    if _increasing_within(values, offsets):
        return values, parents
    order = np.lexsort((values, parents))
    values, parents = values[order], parents[order]
    first = np.ones(len(values), dtype=bool)
    first[1:] = (values[1:] != values[:-1]) | (parents[1:] != parents[:-1])
    return values[first], parents[first]


def keep_probabilities(
    values: np.ndarray,
    offsets: np.ndarray,
    probs: Probabilities,
    lists: Sequence[Sequence[int] | None] | None = None,
) -> np.ndarray:
    """``balance.keep_probability`` of every record, bit for bit.

    ``values``/``offsets`` are the records' query ids; ``lists`` the same as Python lists, for
    the records with three or more uncertain queries (built from the arrays when absent).
    """
    n = len(offsets) - 1
    out = np.zeros(n, dtype=np.float64)
    if n == 0 or len(values) == 0:
        return out
    qv, parents = _distinct(values, offsets)
    k = np.bincount(parents, minlength=n)
    pv = probs.lookup(qv, probs.p)
    certain = np.bincount(parents, weights=pv >= 1.0, minlength=n) > 0
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(k[:-1], out=starts[1:])
    one = np.flatnonzero(k == 1)
    out[one] = pv[starts[one]]
    out[(k >= 2) & certain] = 1.0
    two = np.flatnonzero((k == 2) & ~certain)
    if len(two):
        lv = probs.lookup(qv, probs.log_miss)
        sums = (lv[starts[two]] + lv[starts[two] + 1]).tolist()
        out[two] = [-math.expm1(s) if s else 0.0 for s in sums]
    many = np.flatnonzero((k >= 3) & ~certain)
    if len(many):
        # The per-record sum, in the order of a Python set of the record's ids (float addition
        # of three or more terms depends on the order); log_miss holds math.log1p(-p_e).
        log_table = probs.log_miss
        size = len(log_table)
        for i in many.tolist():
            ids = lists[i] if lists is not None else values[offsets[i] : offsets[i + 1]].tolist()
            total = 0.0
            for q in set(ids):
                if 0 <= q < size:
                    total += float(log_table[q])
            out[i] = -math.expm1(total) if total else 0.0
    return out


def decide(
    p: np.ndarray, has_query: np.ndarray, ids: Any, draw: Any
) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, no_query)`` masks: a record is kept when it matches a query and its draw
    ``u = draw(id)`` is below ``p``; the draw is taken only where ``0 < p < 1``.

    ``ids(indices)`` returns the record ids (strings) of those indices.
    """
    kept = has_query & (p >= 1.0)
    open_ = np.flatnonzero(has_query & (p > 0.0) & (p < 1.0))
    if len(open_):
        u = np.fromiter((draw(i) for i in ids(open_)), dtype=np.float64, count=len(open_))
        kept[open_] = u < p[open_]
    return kept, ~has_query


def distinct_values(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Each record's distinct values, concatenated (what a count adds up)."""
    if _increasing_within(values, offsets):
        return values
    return _distinct(values, offsets)[0]


def count_arrays(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Records per query id (each record once per distinct query): a dense count array."""
    qv = distinct_values(values, offsets)
    if len(qv) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.bincount(qv)


def detail_strings(reasons: Sequence[str], p: np.ndarray) -> list[str]:
    """``balance.drop_detail`` of each dropped record."""
    return [
        "matches no query" if r == NO_QUERY else f"keep probability {x:.6g}"
        for r, x in zip(reasons, p.tolist(), strict=True)
    ]


def _with_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, values) if i >= 0 else table.append_column(name, values)


def _ids(table: pa.Table, id_field: str):
    column = table.column(id_field)

    def take(indices: np.ndarray) -> list[str]:
        return [str(x) for x in column.take(pa.array(indices)).to_pylist()]

    return take


def balance_table(
    table: pa.Table,
    probs: Probabilities,
    draw: Any,
    *,
    id_field: str,
    reason: str,
) -> stage.Result:
    """``balance.balance_records`` over an Arrow table: kept rows get ``balance_probability``,
    dropped rows ``reason`` (or ``no_query``), ``balance_probability`` and ``detail``."""
    values, offsets = arrow_lists(table.column("query_ids"))
    p = keep_probabilities(values, offsets, probs)
    kept, no_query = decide(p, np.diff(offsets) > 0, _ids(table, id_field), draw)
    mask = pa.array(kept)
    out = _with_column(table.filter(mask), "balance_probability", pa.array(p[kept]))
    dropped = ~kept
    reasons = np.where(no_query[dropped], NO_QUERY, reason).tolist()
    rejected = table.filter(pc.invert(mask))
    rejected = _with_column(rejected, "reason", pa.array(reasons, pa.string()))
    rejected = _with_column(rejected, "balance_probability", pa.array(p[dropped]))
    rejected = _with_column(
        rejected, "detail", pa.array(detail_strings(reasons, p[dropped]), pa.string())
    )
    return stage.Result(out, rejected)


def pair_lists(table: pa.Table) -> tuple[pa.Array, np.ndarray]:
    """The samples' pairs flattened (a struct array) and each sample's offsets into it."""
    column = table.column("pairs").combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(column) + 1, dtype=np.int64)
    np.cumsum(np.nan_to_num(lengths).astype(np.int64), out=offsets[1:])
    return pc.list_flatten(column), offsets


def sample_lists(table: pa.Table) -> pa.Table:
    """``uids`` and ``captions`` of each sample, from its pairs (as ``stage.rejected_row``)."""
    flat, offsets = pair_lists(table)
    offsets_arr = pa.array(offsets.astype(np.int32))
    for name, field in (("uids", "uid"), ("captions", "caption")):
        values = pc.struct_field(flat, field) if len(flat) else pa.array([], pa.string())
        table = _with_column(table, name, pa.ListArray.from_arrays(offsets_arr, values))
    return table


def table_query_ids(table: pa.Table, *, pairs: bool = False) -> np.ndarray:
    """The distinct query ids of each record (or, with ``pairs``, of each of the records'
    pairs), concatenated: a count per query is their ``bincount``."""
    if pairs:
        flat, _ = pair_lists(table)
        if len(flat) == 0:
            return np.zeros(0, dtype=np.int64)
        return distinct_values(*arrow_lists(pc.struct_field(flat, "query_ids")))
    return distinct_values(*arrow_lists(table.column("query_ids")))


def count_table(table: pa.Table, *, pairs: bool = False) -> np.ndarray:
    """Records (or, with ``pairs``, the records' pairs) per query id: a dense count array."""
    qv = table_query_ids(table, pairs=pairs)
    return np.bincount(qv) if len(qv) else np.zeros(0, dtype=np.int64)


def balance_sample_pairs_table(
    table: pa.Table, probs: Probabilities, draw: Any, *, reason: str
) -> stage.Result:
    """``balance.balance_sample_pairs`` over an Arrow table of samples (``pairs`` column).

    Every pair is drawn with its own id (its ``uid``, else ``"<key>:<index>"``) and queries; a
    sample keeps its drawn pairs (``query_ids`` their sorted union, ``balance_probability``
    ``1 - prod(1 - p)`` over all its pairs) and is dropped when none is drawn. Partial rows
    hold, per kept sample and reason, the pairs it lost; ``counts`` count every lost pair.
    """
    n = table.num_rows
    flat, offsets = pair_lists(table)
    m = len(flat)
    parents = np.repeat(np.arange(n), np.diff(offsets))
    if m:
        pair_q = pc.struct_field(flat, "query_ids")
        values, q_offsets = arrow_lists(pair_q)
        uids = pc.struct_field(flat, "uid").to_pylist()
    else:
        values, q_offsets, uids = np.zeros(0, np.int64), np.zeros(1, np.int64), []
    keys = table.column("key").to_pylist()
    position = np.arange(m) - offsets[parents]

    def ids(indices: np.ndarray) -> list[str]:
        return [uids[i] or f"{keys[parents[i]]}:{position[i]}" for i in indices.tolist()]

    p = keep_probabilities(values, q_offsets, probs)
    has_query = np.diff(q_offsets) > 0
    won, _ = decide(p, has_query, ids, draw)
    lost_reason = np.where(has_query, reason, NO_QUERY)
    # 1 - prod(1 - p) over each sample's pairs, multiplied in pair order as the loop does.
    miss = 1.0 - p
    prob = np.zeros(n, dtype=np.float64)
    sizes = np.diff(offsets)
    single = np.flatnonzero(sizes == 1)
    prob[single] = 1.0 - (1.0 * miss[offsets[single]])
    miss_list = miss.tolist()
    for i in np.flatnonzero(sizes != 1).tolist():
        acc = 1.0
        for j in range(offsets[i], offsets[i + 1]):
            acc *= miss_list[j]
        prob[i] = 1.0 - acc
    won_per_sample = np.bincount(parents[won], minlength=n)
    kept = won_per_sample > 0

    counts: counters_lib.Counter = counters_lib.Counter()
    for why, k in zip(*np.unique(lost_reason[~won], return_counts=True), strict=True):
        counts[counters_lib.scoped(stage.PAIR, counters_lib.dropped(str(why)))] += int(k)

    def with_pairs(rows: np.ndarray, pair_mask: np.ndarray) -> pa.Table:
        """Rows ``rows`` of ``table`` with only the pairs in ``pair_mask`` (per sample)."""
        sub = table.take(pa.array(rows, pa.int64()))
        chosen = pair_mask & np.isin(parents, rows)
        lens = np.bincount(parents[chosen], minlength=n)[rows]
        new_offsets = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(lens, out=new_offsets[1:])
        values_ = flat.filter(pa.array(chosen)) if m else flat
        pairs_type = table.schema.field("pairs").type
        new_pairs = pa.ListArray.from_arrays(pa.array(new_offsets), values_, type=pairs_type)
        return _with_column(sub, "pairs", new_pairs)

    kept_rows = np.flatnonzero(kept)
    out = with_pairs(kept_rows, won)
    # query_ids: the sorted union of the drawn pairs' queries
    pair_of_value = np.repeat(np.arange(m), np.diff(q_offsets))
    chosen_values = won[pair_of_value] if m else np.zeros(0, bool)
    v = values[chosen_values]
    s = parents[pair_of_value[chosen_values]] if m else np.zeros(0, np.int64)
    order = np.lexsort((v, s))
    v, s = v[order], s[order]
    first = np.ones(len(v), dtype=bool)
    first[1:] = (v[1:] != v[:-1]) | (s[1:] != s[:-1])
    v, s = v[first], s[first]
    lens = np.bincount(s, minlength=n)[kept_rows]
    q_off = np.zeros(len(kept_rows) + 1, dtype=np.int32)
    np.cumsum(lens, out=q_off[1:])
    q_type = table.schema.field("query_ids").type
    union = pa.ListArray.from_arrays(pa.array(q_off), pa.array(v, q_type.value_type), type=q_type)
    out = _with_column(out, "query_ids", union)
    out = _with_column(out, "balance_probability", pa.array(prob[kept_rows]))

    dropped_rows = np.flatnonzero(~kept)
    any_query = np.bincount(parents[has_query], minlength=n) > 0
    why = np.where(any_query[dropped_rows], reason, NO_QUERY).tolist()
    rejected = table.take(pa.array(dropped_rows, pa.int64()))
    rejected = _with_column(rejected, "reason", pa.array(why, pa.string()))
    rejected = _with_column(rejected, "balance_probability", pa.array(prob[dropped_rows]))
    rejected = _with_column(
        rejected, "detail", pa.array(detail_strings(why, prob[dropped_rows]), pa.string())
    )

    partial = []
    lost_kept = ~won & kept[parents] if m else np.zeros(0, bool)
    for r in sorted(set(lost_reason[lost_kept].tolist())):
        mask = lost_kept & (lost_reason == r)
        rows = np.unique(parents[mask])
        part = with_pairs(rows, mask)
        part = _with_column(part, "reason", pa.array([r] * len(rows), pa.string()))
        part = _with_column(part, "balance_probability", pa.array(prob[rows]))
        part = _with_column(
            part, "detail", pa.array(detail_strings([r] * len(rows), prob[rows]), pa.string())
        )
        partial.append((rows, part))
    if partial:
        # one row per kept sample and reason, samples in input order, reasons sorted
        tables = [t for _, t in partial]
        order_keys = np.concatenate(
            [rows * len(partial) + k for k, (rows, _) in enumerate(partial)]
        )
        order = np.argsort(order_keys, kind="stable")
        partial_table = pa.concat_tables(tables).take(pa.array(order))
    else:
        partial_table = rejected.schema.empty_table()  # not a slice: it would pickle rejected
    return stage.Result(out, rejected, counts, partial=partial_table)


def add_dense(acc: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """``acc + dense`` for count arrays of any lengths (``acc`` grown as needed)."""
    if dense.size > acc.size:
        acc = np.concatenate([acc, np.zeros(dense.size - acc.size, np.int64)])
    acc[: dense.size] += dense
    return acc


class DenseCounts(Mapping):
    """A dense count array seen as ``{query_id: count}`` (non-zero entries), for
    ``choose_caption`` and ``query_probabilities``."""

    def __init__(self, dense: np.ndarray):
        self._dense = dense
        self._ids = np.flatnonzero(dense)

    def __getitem__(self, q):
        q = int(q)
        if 0 <= q < self._dense.size and self._dense[q]:
            return int(self._dense[q])
        raise KeyError(q)

    def __iter__(self):
        return iter(self._ids.tolist())

    def __len__(self):
        return len(self._ids)


def with_captions(table: pa.Table, counts) -> pa.Table:
    """``choose_caption`` of each sample of a table: its one pair's caption (taken as a
    column), or for samples of several pairs the caption of the rarest query's pair."""
    from wit_pipeline.stages.balance import choose_caption

    flat, offsets = pair_lists(table)
    sizes = np.diff(offsets)
    if len(flat):
        first = np.where(sizes > 0, offsets[:-1], -1)
        index = pa.array(first, mask=first < 0)
        column = pc.take(pc.struct_field(flat, "caption"), index)
    else:
        column = pa.nulls(table.num_rows, pa.string())
    column = pc.fill_null(column.cast(pa.string()), "")
    several = np.flatnonzero(sizes > 1)
    if len(several):
        values = column.to_pylist()
        pairs = table.column("pairs").take(pa.array(several)).to_pylist()
        for i, ps in zip(several.tolist(), pairs, strict=True):
            values[i] = choose_caption(ps, counts)
        column = pa.array(values, pa.string())
    i = table.schema.get_field_index("caption")
    return (
        table.set_column(i, "caption", column) if i >= 0 else table.append_column("caption", column)
    )
