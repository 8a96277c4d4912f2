"""The gather stage in Beam: ``GatherPairs`` (read + filter + deduplicate), ``WriteGather``
(``candidates/``, ``rejected/``, then ``stats.json``), ``ReadPairs`` (the readers alone), and
``run_gather`` (``wit gather``, whose graph is ``pipeline.gather``).

The DoFns run the pure cores of ``pairs`` through the stage protocol (``stage.StageFn``): one
DoFn reads each input file and filters its batches, another deduplicates each ``uid`` bucket
after one ``GroupByKey`` over whole tables; rejected rows (``stage.REJECTED_SCHEMA``, stage
``gather``) and counts are the base's outputs. Each bucket becomes one output file, sorted by
``uid``: the output is identical whatever the runner, the batching or the number of workers.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils import shared

from wit_pipeline import beam_utils, fileio, queries, stage
from wit_pipeline.config import MAX_BUCKETS, GatherConfig
from wit_pipeline.errors import WitError
from wit_pipeline.stages.gather.match import QueryMatcher
from wit_pipeline.stages.gather.pairs import (
    CANDIDATE_SCHEMA,
    FILES_READ,
    STAGE,
    STATS_SECTIONS,
    PairFilter,
    auto_num_buckets,
    bucket_of,
    dedup_candidates,
    load_query_list,
    query_count_arrays,
    read_counts,
    rejected_bucket,
    split_by_bucket,
)
from wit_pipeline.stages.gather.readers import RawBatch, detect_format, iter_file_batches
from wit_pipeline.takedown import Blocklist

_LOG = logging.getLogger(__name__)

CANDIDATES_DIR = "candidates"
REJECTED_DIR = "rejected"
STATS_FILE = "stats.json"
QUERY_COUNTS = "query_counts"


class _Progress:
    """Throttled progress lines for one input file (logged where the DoFn runs)."""

    def __init__(self, label: str, interval: float):
        self.label = label
        self.interval = interval
        self.start = self.last = time.monotonic()

    def update(self, pairs: int) -> None:
        now = time.monotonic()
        if self.interval > 0 and now - self.last >= self.interval:
            self.last = now
            rate = pairs / max(now - self.start, 1e-9)
            _LOG.info(
                "gather: %s: %s pairs so far (%s/s)", self.label, f"{pairs:,}", f"{rate:,.0f}"
            )

    def done(self, pairs: int, kept: int | None = None) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        kept_s = f", {kept:,} candidates" if kept is not None else ""
        _LOG.info(
            "gather: %s: done, %s pairs%s in %.1fs (%s pairs/s)",
            self.label,
            f"{pairs:,}",
            kept_s,
            elapsed,
            f"{pairs / elapsed:,.0f}",
        )


class _ReadFn(beam.DoFn):
    def __init__(self, *, config: GatherConfig, batch_size: int | None):
        self._config = config
        self._batch_size = batch_size

    def process(self, path: str) -> Iterator[Any]:
        counter: collections.Counter[str] = collections.Counter()
        yield from iter_file_batches(
            path, cfg=self._config, counter=counter, batch_size=self._batch_size
        )
        counter[FILES_READ] += 1
        yield from beam_utils.emit_counts(read_counts(counter))


class ReadPairs(beam.PTransform):
    """Input file paths -> ``RawBatch`` elements (raw pairs, nothing filtered).

    The Beam face of the readers (``readers.iter_file_batches``: WARC, WAT, Parquet, CSV, TSV,
    JSONL by file name or ``config.input_format``). Reader counts (``read/warc:records``, ...)
    go to the ``counts`` output as ``(name, n)`` pairs. ``GatherPairs`` does not use it: it
    reads and filters in one DoFn so that each file's progress line reports the whole cost.
    """

    def __init__(self, *, config: GatherConfig | None = None, batch_size: int | None = None):
        super().__init__()
        self._config = config or GatherConfig()
        self._batch_size = batch_size

    def expand(self, paths):
        return (
            paths
            | "Reshuffle" >> beam.Reshuffle()
            | "Read"
            >> beam.ParDo(_ReadFn(config=self._config, batch_size=self._batch_size)).with_outputs(
                beam_utils.COUNTS, main="batches"
            )
        )


class _Released:
    """What ``_ReadFilterFn.teardown`` acquires to make ``Shared`` drop its keep-alive."""


_RELEASE = shared.Shared()


class _ReadFilterFn(stage.StageFn):
    """One input file -> ``(bucket, candidates)`` per bucket; rejected rows; counts.

    Reading and filtering run in one DoFn so that a file's progress line reports its whole
    cost. Each batch goes through ``PairFilter.process`` and the base's ``emit`` (rejected
    rows and counts; ``input`` and drops only, ``kept`` is counted after deduplication); the
    candidates are collected per bucket (``_BucketBuffer``) before the shuffle. The
    ``PairFilter`` (the matcher's automaton and the language detector) is built once per
    worker *process*: a runner runs many threads per process, each with its own DoFn
    instance, and every instance's ``setup()`` acquires the same object through a
    ``apache_beam.utils.shared.Shared`` handle (pickled with the DoFn, so all its copies share
    one key), tagged with the query list's sha256 and the config.
    """

    def __init__(
        self,
        *,
        config: GatherConfig,
        query_spec: Sequence[str] | str,
        queries_sha256: str | None,
        num_buckets: int,
        total_files: int,
        progress_interval: float,
        blocklist: Blocklist | None = None,
    ):
        super().__init__(stage=STAGE, flow=False, kept_as="batch")
        self._config = config
        self._query_spec = query_spec
        self._sha = queries_sha256
        self._blocklist = blocklist
        # What the shared PairFilter is tagged with: the list's sha256 (a literal list is hashed
        # here; a path without a recorded sha256 stands for itself) and the config.
        if isinstance(query_spec, str):
            list_id = queries_sha256 or query_spec
        else:
            list_id = hashlib.sha256(json.dumps(list(query_spec)).encode()).hexdigest()
        self._shared_tag = (list_id, config, blocklist.url_digest() if blocklist else "")
        self._num_buckets = num_buckets
        self._total = total_files
        self._interval = progress_interval
        self._shared = shared.Shared()
        self._filter: PairFilter | None = None

    def _build_filter(self) -> PairFilter:
        query_list = load_query_list(self._query_spec)
        if self._sha and isinstance(self._query_spec, str):
            got = queries.queries_sha256(self._query_spec)
            if got != self._sha:
                raise WitError(
                    f"query list {self._query_spec} changed since the pipeline was built "
                    f"(sha256 {got} != {self._sha})"
                )
        matcher = QueryMatcher(query_list, case_sensitive=self._config.match.case_sensitive)
        return PairFilter(self._config, matcher, blocklist=self._blocklist)

    def setup(self):
        self._filter = self._shared.acquire(self._build_filter, tag=self._shared_tag)

    def teardown(self):
        # ``Shared`` keeps the last object acquired alive until another one is acquired; doing
        # so here frees the PairFilter (~130 MB for a 500k list) once every DoFn instance of
        # the process is torn down, instead of holding it until the process exits.
        self._filter = None
        _RELEASE.acquire(_Released)

    def core(self, batch: RawBatch, *args: Any) -> stage.Result:
        assert self._filter is not None
        return self._filter.process(batch)

    def process(self, element: tuple[int, str]):
        index, path = element
        reader_counter: collections.Counter[str] = collections.Counter()
        progress = _Progress(f"[{index + 1}/{self._total}] {path}", self._interval)
        buffer = _BucketBuffer()
        pairs = kept = 0
        for batch in iter_file_batches(path, cfg=self._config, counter=reader_counter):
            for out in self.emit(self.core(batch)):
                if isinstance(out, pa.Table):  # the batch's candidates (kept_as="batch")
                    kept += out.num_rows
                    for bucket, part in split_by_bucket(out, self._num_buckets):
                        yield from buffer.add(bucket, part)
                else:  # rejected rows and counts, tagged
                    yield out
            pairs += len(batch)
            progress.update(pairs)
        yield from buffer.flush()
        reader_counter[FILES_READ] += 1
        progress.done(pairs, kept)
        yield from beam_utils.emit_counts(read_counts(reader_counter))


class _BucketBuffer:
    """Collects a file's candidate rows per bucket so that each shuffled element is large.

    With thousands of buckets, a 4096-row batch would otherwise become thousands of one-row
    elements. A bucket is emitted once it holds ``flush_rows`` rows; everything is emitted at
    the end of the file or when ``max_rows`` rows are held.
    """

    def __init__(self, *, flush_rows: int = 2048, max_rows: int = 262_144):
        self._parts: dict[int, list[pa.Table]] = collections.defaultdict(list)
        self._rows: collections.Counter[int] = collections.Counter()
        self._total = 0
        self._flush_rows = flush_rows
        self._max_rows = max_rows

    def add(self, bucket: int, table: pa.Table) -> Iterator[tuple[int, pa.Table]]:
        self._parts[bucket].append(table)
        self._rows[bucket] += table.num_rows
        self._total += table.num_rows
        if self._rows[bucket] >= self._flush_rows:
            yield self._take(bucket)
        if self._total >= self._max_rows:
            yield from self.flush()

    def _take(self, bucket: int) -> tuple[int, pa.Table]:
        parts = self._parts.pop(bucket)
        self._total -= self._rows.pop(bucket)
        return bucket, parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    def flush(self) -> Iterator[tuple[int, pa.Table]]:
        for bucket in sorted(self._parts):
            yield self._take(bucket)


class _DedupFn(stage.StageFn):
    """One bucket's candidates -> the deduplicated table sorted by ``uid`` (``kept`` counted),
    the duplicates as rejected rows, and the bucket's per-query counts."""

    def __init__(self, *, dedup: bool):
        super().__init__(stage=STAGE, flow=False, kept_as="batch")
        self._dedup = dedup

    def core(self, element: tuple[int, Iterable[pa.Table]], *args: Any) -> stage.Result:
        _, parts = element
        tables = list(parts)
        candidates = pa.concat_tables(tables) if tables else CANDIDATE_SCHEMA.empty_table()
        return dedup_candidates(candidates, dedup=self._dedup)

    def process(self, element: tuple[int, Iterable[pa.Table]]):
        result = self.core(element)
        yield from self.emit(result)
        if result.kept.num_rows:
            yield TaggedOutput(QUERY_COUNTS, query_count_arrays(result.kept))


class _SumQueryCounts(beam.CombineFn):
    """Sums sparse ``(ids, counts)`` arrays into ``{"<query id>": n}`` (non-zero only)."""

    def create_accumulator(self):
        return np.zeros(0, np.int64)

    def add_input(self, acc, element):
        ids, counts = element
        if ids.size:
            need = int(ids.max()) + 1
            if acc.size < need:
                acc = np.concatenate([acc, np.zeros(need - acc.size, np.int64)])
            np.add.at(acc, ids, counts)
        return acc

    def merge_accumulators(self, accumulators):
        accs = list(accumulators)
        size = max((a.size for a in accs), default=0)
        total = np.zeros(size, np.int64)
        for a in accs:
            total[: a.size] += a
        return total

    def extract_output(self, acc):
        return {str(int(i)): int(acc[i]) for i in np.flatnonzero(acc)}


class GatherPairs(beam.PTransform):
    """Input file paths -> deduplicated, query-matched candidate pairs (see ``pairs``).

    Returns a dict of PCollections: ``candidates`` (``pa.Table`` per non-empty bucket,
    deduplicated and sorted by ``uid``: every row's ``bucket_of(uid)`` is the bucket's),
    ``rejected`` (``pa.Table`` batches of ``stage.REJECTED_SCHEMA``: every dropped pair with
    its ``reason``, stage ``gather``), ``counts`` (``(name, n)``: ``input``, ``kept``,
    ``dropped:<reason>`` and ``read/...`` reader counts) and ``query_counts`` (one
    ``{"<id>": n}``).

    The input is a PCollection of ``(index, path)`` (``index`` is only used in progress
    lines); use ``beam.Create(list(enumerate(paths)))``. ``queries`` is the query list itself or
    a path to it: pass a path for large lists (workers load it in ``setup()``; on Dataflow it
    must be readable by them, e.g. ``gs://``), with its sha256 to detect a changed file.
    ``num_buckets`` is the number of output files (``config.num_output_shards``, or
    ``pairs.auto_num_buckets`` when that is 0). ``config`` is the ``gather`` section (default:
    the defaults), which checked itself when it was made. ``blocklist``: takedown entries
    (``takedown.load_blocklists``); its ``url`` and ``domain`` entries drop the pairs whose image
    or page URL they match, as ``takedown``.
    """

    def __init__(
        self,
        *,
        config: GatherConfig | None = None,
        queries: Sequence[str] | str,
        num_buckets: int,
        total_files: int = 0,
        queries_sha256: str | None = None,
        progress_interval: float = 10.0,
        blocklist: Blocklist | None = None,
    ):
        super().__init__()
        config = config or GatherConfig()
        self._blocklist = blocklist
        if not 1 <= num_buckets <= MAX_BUCKETS:
            raise WitError(f"number of output shards must be within 1..{MAX_BUCKETS}")
        if not isinstance(queries, str) and not queries:
            raise WitError("query list is empty")
        self._config = config
        self._queries = queries if isinstance(queries, str) else list(queries)
        self._sha = queries_sha256
        self._num_buckets = num_buckets
        self._total = total_files
        self._interval = progress_interval

    def expand(self, files):
        read = (
            files
            | "Reshuffle" >> beam.Reshuffle()
            | "ReadAndFilter"
            >> beam.ParDo(
                _ReadFilterFn(
                    config=self._config,
                    query_spec=self._queries,
                    queries_sha256=self._sha,
                    num_buckets=self._num_buckets,
                    total_files=self._total,
                    progress_interval=self._interval,
                    blocklist=self._blocklist,
                )
            ).with_outputs(beam_utils.COUNTS, beam_utils.REJECTED, main="parts")
        )
        deduped = (
            read.parts
            | "GroupByBucket" >> beam.GroupByKey()
            | "Dedup"
            >> beam.ParDo(_DedupFn(dedup=self._config.dedup)).with_outputs(
                beam_utils.COUNTS, beam_utils.REJECTED, QUERY_COUNTS, main="kept"
            )
        )
        counts = (read[beam_utils.COUNTS], deduped[beam_utils.COUNTS]) | "AllCounts" >> (
            beam.Flatten()
        )
        rejected = (
            read[beam_utils.REJECTED],
            deduped[beam_utils.REJECTED],
        ) | "AllRejected" >> beam.Flatten()
        query_counts = deduped[QUERY_COUNTS] | "SumQueryCounts" >> beam.CombineGlobally(
            _SumQueryCounts()
        )
        return {
            "candidates": deduped.kept,
            beam_utils.REJECTED: rejected,
            beam_utils.COUNTS: counts,
            QUERY_COUNTS: query_counts,
        }


# ---------------------------------------------------------------------------------------------
# Writing the stage's output


def part_name(bucket: int, num_buckets: int) -> str:
    return f"part-{bucket:05d}-of-{num_buckets:05d}.parquet"


# Rows per Parquet row group of the stage's files. A row group is the unit a Parquet read
# splits at: pyarrow's default (1Mi rows) made a whole bucket one element for the pre-balance
# step and everything after it (one worker busy, the others idle); 64Ki rows of candidates are
# about 10 MB, still large enough to compress well.
ROW_GROUP_ROWS = 1 << 16


def write_table(path: str, table: pa.Table) -> str:
    import pyarrow.parquet as pq

    with fileio.atomic_write(path, "wb") as f:
        pq.write_table(table, f, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return path


def _write_candidates(table: pa.Table, directory: str, num_buckets: int) -> str:
    bucket = bucket_of(table.column("uid")[0].as_py(), num_buckets)
    return write_table(fileio.join(directory, part_name(bucket, num_buckets)), table)


def _key_rejected(table: pa.Table, num_buckets: int) -> tuple[int, pa.Table]:
    return rejected_bucket(table, num_buckets), table


def _write_rejected(item: tuple[int, Iterable[pa.Table]], directory: str, n: int) -> str:
    bucket, tables = item
    return write_table(fileio.join(directory, part_name(bucket, n)), pa.concat_tables(list(tables)))


def _fill_empty_buckets(
    _,
    written: Sequence[str],
    *,
    output_dir: str,
    num_buckets: int,
    write_rejected: bool,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """Write empty files for empty buckets; returns ``extra`` for ``stats.json``, which waits
    for it (``stats.json`` is written last: it marks completion)."""
    written_set = set(written)
    dirs = [(CANDIDATES_DIR, CANDIDATE_SCHEMA)]
    if write_rejected:
        dirs.append((REJECTED_DIR, stage.REJECTED_SCHEMA))
    for sub, schema in dirs:
        for b in range(num_buckets):
            path = fileio.join(output_dir, sub, part_name(b, num_buckets))
            if path not in written_set:
                write_table(path, schema.empty_table())
    return dict(extra)


def _query_counts_doc(query_counts: Mapping[str, int]) -> dict[str, Any]:
    return {QUERY_COUNTS: dict(sorted(query_counts.items(), key=lambda kv: int(kv[0])))}


class WriteGather(beam.PTransform):
    """Write ``GatherPairs``' output as ``candidates/``, ``rejected/``, then ``stats.json``.

    One ``part-NNNNN-of-MMMMM.parquet`` per bucket in each folder (empty buckets get empty
    files); ``rejected/`` only with ``config.write_rejected``. Returns the ``stats.json``
    document.
    """

    def __init__(
        self,
        *,
        output_dir: str,
        config: GatherConfig | None = None,
        num_buckets: int,
        extra: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        config = config or GatherConfig()
        if not output_dir:
            raise WitError("WriteGather needs an output_dir")
        self._output_dir = output_dir
        self._write_rejected = config.write_rejected
        self._num_buckets = num_buckets
        self._extra = dict(extra or {})

    def expand(self, result):
        n = self._num_buckets
        out = self._output_dir
        written = [
            result["candidates"]
            | "WriteCandidates" >> beam.Map(_write_candidates, fileio.join(out, CANDIDATES_DIR), n)
        ]
        if self._write_rejected:
            written.append(
                result[beam_utils.REJECTED]
                | "KeyRejected" >> beam.Map(_key_rejected, n)
                | "GroupRejected" >> beam.GroupByKey()
                | "WriteRejected" >> beam.Map(_write_rejected, fileio.join(out, REJECTED_DIR), n)
            )
        paths = tuple(written) | "AllWritten" >> beam.Flatten()
        filled = result[QUERY_COUNTS] | "FillEmptyBuckets" >> beam.Map(
            _fill_empty_buckets,
            beam.pvalue.AsList(paths),
            output_dir=out,
            num_buckets=n,
            write_rejected=self._write_rejected,
            extra=self._extra,
        )
        query_counts = result[QUERY_COUNTS] | "QueryCounts" >> beam.Map(_query_counts_doc)
        return result[beam_utils.COUNTS] | "WriteStats" >> stage.WriteStats(
            fileio.join(out, STATS_FILE),
            sections=STATS_SECTIONS,
            side=[query_counts, filled],
            stage=STAGE,
        )


# ---------------------------------------------------------------------------------------------
# Running the stage


def _clear_outputs(output_dir: str) -> None:
    for d in (
        output_dir,
        fileio.join(output_dir, CANDIDATES_DIR),
        fileio.join(output_dir, REJECTED_DIR),
    ):
        fileio.remove_temporaries(d)  # of writes a killed run left
    for sub in (CANDIDATES_DIR, REJECTED_DIR):
        path = fileio.join(output_dir, sub)
        if fileio.exists(path):
            fs = fileio.filesystem(path)
            for f in fs.ls(path, detail=False):
                if str(f).endswith(".parquet"):
                    fs.rm(f)
    stats = fileio.join(output_dir, STATS_FILE)
    if fileio.exists(stats):
        fileio.filesystem(stats).rm(stats)


def validate_inputs(paths: Sequence[str], config: GatherConfig) -> dict[str, int]:
    """Check formats (and, for the first table of each format, its columns) before running."""
    from wit_pipeline.stages.gather.readers import tables

    formats: collections.Counter[str] = collections.Counter()
    checked: set[str] = set()
    for p in paths:
        fmt = detect_format(p, config.input_format)
        formats[fmt] += 1
        if fmt not in ("warc", "wat") and fmt not in checked:
            tables.check_table(p, config)
            checked.add(fmt)
    return dict(formats)


def run_gather(
    inputs: Sequence[str],
    output_dir: str,
    *,
    config: GatherConfig | None = None,
    queries_path: str | None = None,
    beam_args: Sequence[str] = (),
    runner: str | None = None,
    progress_interval: float = 10.0,
    overwrite: bool = False,
    blocklist: Blocklist | None = None,
) -> dict[str, Any]:
    """Run the gather stage end to end; returns the ``stats.json`` document.

    A finished output (``stats.json`` present, same inputs, config, query list and takedown
    entries) is not recomputed unless ``overwrite``; any partial output is cleared before
    running, once the graph (and with it the config) has been checked.
    """
    config = config or GatherConfig()
    queries_path = queries_path or queries.default_queries_path()
    paths = fileio.expand_inputs(list(inputs))
    formats = validate_inputs(paths, config)
    loaded = queries.read_query_list(queries_path)
    query_list, sha = loaded.entries, loaded.sha256
    num_buckets = config.num_output_shards or auto_num_buckets(paths, config.input_format)
    from wit_pipeline.config import to_dict

    extra = {
        "queries": loaded.record(),
        "inputs": {"count": len(paths), "formats": formats, "files": paths},
        "config": to_dict(config),
        "num_output_shards": num_buckets,
    }
    if blocklist is not None and blocklist.has_url_entries:
        extra["takedown"] = {"url_entries": blocklist.url_digest(), "files": blocklist.describe()}
    stats_path = fileio.join(output_dir, STATS_FILE)
    if not overwrite and fileio.exists(stats_path):
        previous = fileio.read_json(stats_path)
        same = all(previous.get(k) == v for k, v in extra.items())
        if same:
            _LOG.info(
                "gather: %s is complete for these inputs; skipping (use --overwrite)", output_dir
            )
            previous["skipped"] = True
            return previous

    options = beam_utils.pipeline_options(beam_args, runner=runner)
    extra["runner"] = beam_utils.runner_name(options)
    _LOG.info(
        "gather: %d input files (%s), %s queries, %d output shards, runner %s",
        len(paths),
        ", ".join(f"{n} {f}" for f, n in sorted(formats.items())),
        f"{len(query_list):,}",
        num_buckets,
        extra["runner"],
    )
    # Small lists travel inside the pipeline; large ones are loaded by each worker from the path.
    query_spec: Sequence[str] | str = query_list if len(query_list) <= 10_000 else queries_path
    started = time.monotonic()
    from wit_pipeline import pipeline  # the step's graph (pipeline imports this module)

    with beam.Pipeline(options=options) as p:
        pipeline.gather(
            p,
            paths=paths,
            output=output_dir,
            config=config,
            queries=query_spec,
            num_buckets=num_buckets,
            queries_sha256=sha,
            extra=extra,
            progress_interval=progress_interval,
            blocklist=blocklist,
        )
        # The graph is built (its transforms have checked the config): clear any partial
        # output only now, so that a bad setting never destroys a previous run's files.
        _clear_outputs(output_dir)
        fileio.makedirs(output_dir)
    doc = fileio.read_json(stats_path)
    doc["elapsed_s"] = round(time.monotonic() - started, 3)
    return doc
