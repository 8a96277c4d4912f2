"""The stage protocol: one shape for every stage's Beam code.

A stage's pure core takes a *batch* (a list of records, or an Arrow table where the stage is
columnar) and returns a :class:`Result`: the rows it keeps, the rows it drops, each with a
``reason`` (and an optional ``detail``), and any counts that are not about its own rows
(reader counts, say). :class:`StageFn`, the one base DoFn, turns a result into Beam outputs and
owns nothing else:

- kept rows on the main output (one element per row, the batch as one element, or nothing when
  the core has written them itself: a shard writer);
- dropped rows on the ``rejected`` output, as rows of :data:`REJECTED_SCHEMA` (the one schema
  of every ``rejected/`` folder) stamped with the stage's name; so are *partial* rows, the
  pairs a kept sample lost (counted as dropped pairs, not as dropped samples);
- counts on the ``counts`` output as ``(name, n)`` pairs (:func:`beam_utils.emit_counts`),
  derived from the result: ``input``, ``kept`` and ``dropped:<reason>`` over the stage's unit,
  and, for samples that carry several pairs, the same names under the ``pair/`` scope;
- any further outputs the core names (``Result.outputs``, e.g. eval-set hits, shard infos).

Inside a pipeline of several stages only the drops are counted per stage (``flow=False``): the
stage where records enter counts ``input`` and the one where they leave counts ``kept``
(:func:`count_records`, :class:`CountRecords`), so that the stages add up to one balanced set.

Counter names follow one scheme everywhere (``counters``): ``input``, ``kept``,
``dropped:<reason>`` over a step's own unit, and ``<scope>/<name>`` for other units or
sub-steps (``pair/kept``, ``url/dropped:robots``, ``read/warc:records``). One stats writer
(:func:`stats_document`, :class:`WriteStats`) turns summed counts into a step's ``stats.json``,
one section per scope, and checks ``input == kept + sum(dropped:*)`` in every section that
counts a flow.

Counts travel as data, not as Beam metrics: a failed bundle's counts are discarded with its
outputs, so the totals are exact on every runner, retries included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.pvalue import TaggedOutput

from wit_pipeline import beam_utils, fileio
from wit_pipeline import counters as counters_lib

PAIR = counters_lib.PAIR  # the scope of pair-level counts of a sample-level stage
STATS_FILE = "stats.json"  # every step's counters (stats_document)
REJECTED_DIR = "rejected"  # every step's dropped records (REJECTED_SCHEMA)

# Every rejected/ folder of a build holds rows of this schema: which stage dropped the record,
# why, and what identifies it (a pair: uid, url, caption; a sample: key, url, its pairs' uids
# and captions), and for opt-outs the policy it rests on. Fields a stage does not know are null.
REJECTED_SCHEMA = pa.schema(
    [
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("key", pa.string()),
        ("uid", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("source", pa.string()),
        ("page_url", pa.string()),
        ("uids", pa.list_(pa.string())),
        ("captions", pa.list_(pa.string())),
        ("phash", pa.string()),
        ("duplicate_of", pa.string()),
        ("distance", pa.int32()),
        ("eval_set", pa.string()),
        ("eval_id", pa.string()),
        ("clip_score", pa.float32()),
        # Opt-out and robots decisions: the policy they rest on (robots.txt, tdmrep.json, the
        # page or image whose header or meta said so) and when it was fetched (ISO 8601 UTC;
        # for a crawled page, its WARC-Date). Null in every other row (``wit_pipeline.optout``).
        ("policy_url", pa.string()),
        ("policy_fetched", pa.string()),
    ]
)
REJECTED_FIELDS = tuple(REJECTED_SCHEMA.names)
_SAMPLE_LISTS = ("uids", "captions")


def rejected_row(record: Mapping[str, Any], *, stage: str) -> dict[str, Any]:
    """A dropped record as a row of :data:`REJECTED_SCHEMA`.

    ``record`` holds ``reason`` (and optionally ``detail``, ``duplicate_of``, ``distance``, ...);
    a sample's ``uids`` and ``captions`` come from its ``pairs`` when it has them.
    """
    row = {name: record.get(name) for name in REJECTED_FIELDS}
    row["stage"] = stage
    row["detail"] = record.get("detail") or ""
    pairs = record.get("pairs")
    if pairs is not None:
        row["uids"] = [p.get("uid") for p in pairs]
        row["captions"] = [p.get("caption") for p in pairs]
    return row


def rejected_table(table: pa.Table, *, stage: str) -> pa.Table:
    """A columnar stage's dropped rows (with a ``reason`` column) in :data:`REJECTED_SCHEMA`."""
    n = table.num_rows
    columns = []
    for field in REJECTED_SCHEMA:
        if field.name == "stage":
            columns.append(pa.array([stage] * n, pa.string()))
        elif field.name == "detail" and "detail" not in table.column_names:
            columns.append(pa.array([""] * n, pa.string()))
        elif field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(columns, schema=REJECTED_SCHEMA)


Batch = Any  # a list of records (dicts) or a pyarrow.Table


@dataclasses.dataclass
class Result:
    """What a stage's core did with one batch.

    ``rejected`` rows carry ``reason`` (and optionally ``detail`` and further
    :data:`REJECTED_SCHEMA` fields). ``partial`` rows are parts of kept records (the pairs a
    kept sample lost): written to ``rejected/`` like the others, counted as dropped pairs only.
    ``counts`` holds counts beyond the flow of the stage's own rows (reader counts, a
    sub-step's), already named with their scope. ``outputs`` holds elements of further tagged
    outputs, by tag (the stage's ``StageFn`` lists the tags).
    """

    kept: Batch
    rejected: Batch = dataclasses.field(default_factory=list)
    counts: Mapping[str, int] = dataclasses.field(default_factory=dict)
    partial: Batch = dataclasses.field(default_factory=list)
    outputs: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)


def _num_rows(batch: Batch) -> int:
    return batch.num_rows if isinstance(batch, pa.Table) else len(batch)


def _reasons(rejected: Batch) -> Iterable[str]:
    if isinstance(rejected, pa.Table):
        return rejected.column("reason").to_pylist() if rejected.num_rows else []
    return (r["reason"] for r in rejected)


def flow_counts(
    kept: Batch,
    rejected: Batch,
    *,
    flow: bool = True,
    pairs: bool = False,
    partial: Batch = (),
) -> counters_lib.Counter:
    """The counts a result implies: ``input``, ``kept``, ``dropped:<reason>``.

    ``flow=False`` counts drops only: inside a pipeline of several stages, input is counted
    where records enter and kept where they leave, so the stages add up to one balanced set.
    ``pairs=True`` also counts each record's ``pairs`` under ``pair/``, including the pairs of
    ``partial`` rows (parts of kept records: not drops of the stage's unit).
    """
    c: counters_lib.Counter = counters_lib.Counter()
    n_kept = _num_rows(kept)
    if flow:
        c[counters_lib.KEPT] += n_kept
        c[counters_lib.INPUT] += n_kept + _num_rows(rejected)
    for reason in _reasons(rejected):
        c[counters_lib.dropped(reason)] += 1
    if pairs:
        if flow:
            k = _pair_count(kept)
            c[counters_lib.scoped(PAIR, counters_lib.KEPT)] += k
            c[counters_lib.scoped(PAIR, counters_lib.INPUT)] += (
                k + _pair_count(rejected) + _pair_count(partial)
            )
        for batch in (rejected, partial):
            for reason, n in _pairs_by_reason(batch):
                c[counters_lib.scoped(PAIR, counters_lib.dropped(reason))] += n
    return c


def _pair_count(batch: Batch) -> int:
    if isinstance(batch, pa.Table):
        return int(pc.sum(pc.list_value_length(batch.column("pairs"))).as_py() or 0)
    return sum(len(r["pairs"]) for r in batch)


def _pairs_by_reason(batch: Batch) -> Iterable[tuple[str, int]]:
    if isinstance(batch, pa.Table):
        if not batch.num_rows:
            return []
        sizes = pc.fill_null(pc.list_value_length(batch.column("pairs")), 0).to_pylist()
        return zip(batch.column("reason").to_pylist(), sizes, strict=True)
    return ((r["reason"], len(r["pairs"])) for r in batch)


def count_records(
    records: Iterable[Mapping[str, Any]], name: str, *, pairs: bool = False
) -> counters_lib.Counter:
    """``name`` once per record (and ``pair/<name>`` once per pair): where records enter a
    pipeline (``input``) or leave it (``kept``)."""
    c: counters_lib.Counter = counters_lib.Counter()
    for r in records:
        c[name] += 1
        if pairs:
            c[counters_lib.scoped(PAIR, name)] += len(r["pairs"])
    return c


class CountRecords(beam.PTransform):
    """Records -> ``(name, n)`` count pairs of :func:`count_records` (one batch per bundle)."""

    def __init__(self, name: str, *, pairs: bool = False):
        super().__init__()
        self._name = name
        self._pairs = pairs

    def expand(self, records):
        name, pairs = self._name, self._pairs
        return records | "Count" >> beam.FlatMap(
            lambda r: count_records([r], name, pairs=pairs).items()
        )


class StageFn(beam.DoFn):
    """The base DoFn of every stage: a core's :class:`Result` -> kept, rejected and counts.

    Subclasses implement :meth:`core` (``setup`` builds expensive state once per
    worker, as usual). ``stage`` names the stage in rejected rows; ``flow=False`` counts drops
    only (see :func:`flow_counts`); ``pairs=True`` also counts pairs of sample records;
    ``kept_as="rows"`` emits each kept row, ``"batch"`` the kept batch as one element (empty
    batches are not emitted), ``"none"`` nothing (the core wrote them; they are counted);
    ``outputs`` names the further tagged outputs the core fills (``Result.outputs``).
    """

    KEPT_AS: ClassVar[tuple[str, ...]] = ("rows", "batch", "none")

    def __init__(
        self,
        *,
        stage: str,
        flow: bool = True,
        pairs: bool = False,
        kept_as: str = "rows",
        outputs: Sequence[str] = (),
    ):
        super().__init__()
        if kept_as not in self.KEPT_AS:
            raise ValueError(f"kept_as must be one of {self.KEPT_AS}, got {kept_as!r}")
        reserved = {beam_utils.COUNTS, beam_utils.REJECTED} & set(outputs)
        if reserved:
            raise ValueError(f"outputs {sorted(reserved)} are the protocol's own")
        self.stage = stage
        self.outputs = tuple(outputs)
        self._flow = flow
        self._pairs = pairs
        self._kept_as = kept_as

    def core(self, batch: Batch, *args: Any) -> Result:
        raise NotImplementedError

    def process(self, batch, *args):  # no annotations: Beam would read them as type hints
        yield from self.emit(self.core(batch, *args))

    def emit(self, result: Result) -> Iterator[Any]:
        """Yield a result's kept rows, then its rejected rows, further outputs and counts as
        tagged outputs."""
        kept, rejected = result.kept, result.rejected
        if self._kept_as == "batch":
            if _num_rows(kept):
                yield kept
        elif self._kept_as == "rows":
            yield from kept
        yield from self.emit_rejected(rejected)
        yield from self.emit_rejected(result.partial)
        unknown = set(result.outputs) - set(self.outputs)
        if unknown:
            raise ValueError(f"{self.stage}: outputs {sorted(unknown)} are not declared")
        for tag, elements in result.outputs.items():
            for e in elements:
                yield TaggedOutput(tag, e)
        counts = flow_counts(
            kept, rejected, flow=self._flow, pairs=self._pairs, partial=result.partial
        )
        counts.update(result.counts)
        yield from beam_utils.emit_counts(counts)

    def emit_rejected(self, rejected: Batch) -> Iterator[TaggedOutput]:
        if isinstance(rejected, pa.Table):
            if rejected.num_rows:
                yield TaggedOutput(beam_utils.REJECTED, rejected_table(rejected, stage=self.stage))
            return
        for r in rejected:
            yield TaggedOutput(beam_utils.REJECTED, rejected_row(r, stage=self.stage))


def apply(pcoll, label: str, fn: StageFn, *side_inputs: Any) -> dict[str, Any]:
    """``pcoll | label >> ParDo(fn)`` with the protocol's outputs: ``kept``, ``rejected``,
    ``counts`` (and the stage's further ``outputs``, by tag)."""
    out = pcoll | label >> beam.ParDo(fn, *side_inputs).with_outputs(
        beam_utils.COUNTS, beam_utils.REJECTED, *fn.outputs, main="kept"
    )
    return {
        "kept": out.kept,
        beam_utils.REJECTED: out[beam_utils.REJECTED],
        beam_utils.COUNTS: out[beam_utils.COUNTS],
        **{tag: out[tag] for tag in fn.outputs},
    }


# ---------------------------------------------------------------------------------------------
# Writing rejected rows and stats


def _as_table(items: Sequence[Any]) -> pa.Table:
    """A batch of rejected rows and tables -> one table of :data:`REJECTED_SCHEMA`."""
    tables = [x for x in items if isinstance(x, pa.Table)]
    rows = [x for x in items if not isinstance(x, pa.Table)]
    if rows:
        tables.append(pa.Table.from_pylist(rows, schema=REJECTED_SCHEMA))
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def _row_count(item: Any) -> int:
    return item.num_rows if isinstance(item, pa.Table) else 1


class WriteRejected(beam.PTransform):
    """Rejected rows (dicts or tables of :data:`REJECTED_SCHEMA`) -> ``DIR/part-*.parquet``."""

    def __init__(self, directory: str, *, batch_size: int = 4096):
        super().__init__()
        self._prefix = fileio.join(directory, "part")
        self._batch_size = batch_size

    def expand(self, rows):
        # Dict rows are batched into tables of batch_size; tables pass as they are (a batch
        # counts their rows), so columnar stages never go through one element per row.
        tables = (
            rows
            | "Batch"
            >> beam.BatchElements(
                min_batch_size=self._batch_size,
                max_batch_size=self._batch_size,
                element_size_fn=_row_count,
            )
            | "ToTable" >> beam.Map(_as_table)
        )
        return tables | "Write" >> beam.io.WriteToParquetBatched(
            self._prefix, schema=REJECTED_SCHEMA, file_name_suffix=".parquet", codec="zstd"
        )


Section = str | Sequence[str] | None


def stats_document(
    counts: Mapping[str, int],
    *,
    sections: Mapping[str, Section],
    flows: Sequence[str] = ("",),
    extra: Mapping[str, Any] | None = None,
    stage: str = "",
) -> dict[str, Any]:
    """A step's ``stats.json``: summed counts split by scope into named sections.

    ``sections`` maps a scope (``""`` for unscoped names) to its key in the document
    (``{"": "counters", "pair": "pair_counters"}``), to several keys (the same counts under
    each), or to ``None`` (counted, not reported: a unit that does not hold end to end); counts
    of a scope not listed raise. Every reported scope in ``flows`` has ``input`` and ``kept``
    (zero when absent) and must balance.
    """
    parts = counters_lib.split_scopes(counts)
    unknown = sorted(set(parts) - set(sections))
    if unknown:
        raise AssertionError(f"{stage or 'stats'}: counts of unknown scope(s) {unknown}")
    doc: dict[str, Any] = {}
    for scope, keys in sections.items():
        if keys is None:
            continue
        part = dict(parts.get(scope, {}))
        if scope in flows:
            for name in (counters_lib.INPUT, counters_lib.KEPT):
                part.setdefault(name, 0)
            where = f"{stage} ({scope})" if scope else stage
            counters_lib.check_balanced(part, stage=where)
        for key in [keys] if isinstance(keys, str) else keys:
            doc[key] = dict(sorted(part.items()))
    doc.update(extra or {})
    return doc


def _write_stats(
    counts: Mapping[str, int],
    path: str,
    sections: Mapping[str, Section],
    flows: Sequence[str],
    extra: Mapping[str, Any],
    stage: str,
    *side,  # no annotation: Beam would read it as a type hint
) -> dict[str, Any]:
    more = dict(extra)
    for value in side:  # side inputs: mappings merged into the document
        more.update(value)
    doc = stats_document(counts, sections=sections, flows=flows, extra=more, stage=stage)
    fileio.write_json(path, doc)
    return doc


class WriteStats(beam.PTransform):
    """``(name, n)`` count pairs -> ``path`` (:func:`stats_document`); returns the document.

    ``extra`` is merged into the document; so is each element of ``side`` (singleton
    PCollections of mappings, e.g. per-query counts), as side inputs.
    """

    def __init__(
        self,
        path: str,
        *,
        sections: Mapping[str, Section] | None = None,
        flows: Sequence[str] = ("",),
        extra: Mapping[str, Any] | None = None,
        side: Sequence[Any] = (),
        stage: str = "",
    ):
        super().__init__()
        self._path = path
        self._sections = dict(sections or {"": "counters"})
        missing = set(flows) - set(self._sections)
        if missing:
            raise ValueError(f"flows {sorted(missing)} have no section")
        self._flows = tuple(flows)
        self._extra = dict(extra or {})
        self._side = list(side)
        self._stage = stage

    def expand(self, counts):
        totals = counts | "Sum" >> beam_utils.SumCounts()
        return totals | "Write" >> beam.Map(
            _write_stats,
            self._path,
            self._sections,
            self._flows,
            self._extra,
            self._stage,
            *[beam.pvalue.AsSingleton(s) for s in self._side],
        )
