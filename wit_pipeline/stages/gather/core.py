"""The gather stage: crawl data in, query-matched image/caption candidates out.

For every input file (WARC, WAT, or a table) each extracted image/caption pair goes through:

1. URL: present (``no_url``), http(s) (``unsupported_scheme``: ``data:``, ``javascript:``,
   ``blob:``, ...), normalizable (``bad_url``, ``urls.normalize_url``);
2. caption: present (``no_caption``), cleaned (``captions.clean_caption``), undamaged
   (``bad_encoding``), within length bounds (``too_short``, ``too_long``, ``too_few_words``,
   ``too_many_words``);
3. language (``language``, ``language_undetected``, ``low_language_score``);
4. query matching with MetaCLIP's substring semantics (``no_match``);
5. exact duplicates across the whole input: one pair per ``uid`` is kept (``duplicate``).

Every pair is counted: ``input == kept + sum(dropped:*)``. Pure cores (``PairFilter.process``,
``dedup_candidates``, ``gather_loop``) do the work; the Beam transforms ``GatherPairs``
(read + filter + deduplicate) and ``WriteGather`` (files and ``stats.json``) run them on batches
of Arrow tables; ``ReadPairs`` exposes the readers alone. Deduplication hash-partitions candidates by ``uid`` into buckets, one
``GroupByKey`` over whole tables, and each bucket becomes one output file, sorted by ``uid``:
the output is identical whatever the runner, the batching or the number of workers.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import re
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils import shared

from wit_pipeline import beam_utils, fileio, queries, schemas, urls
from wit_pipeline import counters as counters_lib
from wit_pipeline.config import GatherConfig
from wit_pipeline.errors import WitError
from wit_pipeline.stages.gather import captions as captions_lib
from wit_pipeline.stages.gather.match import QueryMatcher
from wit_pipeline.stages.gather.readers import FORMATS, RawBatch, detect_format, iter_file_batches
from wit_pipeline.stages.gather.readers.html import resolve_url

_LOG = logging.getLogger("wit_pipeline.stages.gather.core")

# Drop reasons decided here (caption and language reasons live in ``captions``).
NO_URL = "no_url"
UNSUPPORTED_SCHEME = "unsupported_scheme"
BAD_URL = "bad_url"
NO_MATCH = "no_match"
DUPLICATE = "duplicate"

CANDIDATES_DIR = "candidates"
REJECTED_DIR = "rejected"
STATS_FILE = "stats.json"
QUERY_COUNTS = "query_counts"
READ_COUNTER_PREFIXES = ("warc:", "wat:", "table:", "files:")

CANDIDATE_SCHEMA = schemas.CANDIDATE_SCHEMA
REJECTED_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("caption", pa.string()),
        ("reason", pa.string()),
        ("source", pa.string()),
        ("page_url", pa.string()),
    ]
)

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_HTTP_PREFIXES = ("http://", "https://")
_BUCKET_TARGET_BYTES = 128 << 20
MAX_BUCKETS = 4096


# ---------------------------------------------------------------------------------------------
# Pure core


def check_url(url: str | None, page_url: str | None = None) -> tuple[str | None, str | None]:
    """``(normalized URL, None)`` or ``(None, reason)`` for a raw image URL.

    A relative URL (tables only: readers of HTML resolve them) is resolved against the page
    URL when there is one, else it is a ``bad_url``.
    """
    if not url or not url.strip():
        return None, NO_URL
    url = url.strip()
    if not url[:8].lower().startswith(_HTTP_PREFIXES):
        m = _SCHEME.match(url)
        if m and m.group(1).lower() not in urls.HTTP_SCHEMES:
            return None, UNSUPPORTED_SCHEME
        if m is None:
            # Relative: resolvable only against an http(s) page URL.
            if page_url and page_url[:8].lower().startswith(_HTTP_PREFIXES):
                return check_url(resolve_url(page_url, url), None)
            return None, BAD_URL
    normalized = urls.normalize_url(url)
    if normalized is None:
        return None, BAD_URL
    return normalized, None


class PairFilter:
    """Cleans, filters and matches raw pairs; build once per worker (it holds the automaton).

    ``process`` counts ``input`` and every ``dropped:<reason>`` except ``duplicate``; the pairs
    it returns are candidates until ``dedup_candidates`` has seen every other batch.
    """

    def __init__(
        self,
        cfg: GatherConfig,
        matcher: QueryMatcher,
        detector: captions_lib.LanguageDetector | None = None,
    ):
        captions_lib.validate_caption_config(cfg.captions)
        self.cfg = cfg
        self.matcher = matcher
        self.detector = detector or captions_lib.make_detector(cfg.captions)

    def process(
        self, batch: RawBatch, counter: collections.Counter
    ) -> tuple[pa.Table, pa.Table | None]:
        """``(candidates, rejected)`` tables for one batch (rejected is None when not kept)."""
        ccfg = self.cfg.captions
        form = ccfg.unicode_form
        detect = self.detector.detect if self.detector.name != "none" else None
        # Detection runs before matching when it filters (a caption's language is checked like
        # its length); without a filter it runs only for the pairs that are kept.
        language_filter = bool(ccfg.languages) and detect is not None
        match = self.matcher.match
        keep_unmatched = self.cfg.match.keep_unmatched
        write_rejected = self.cfg.write_rejected
        clean = captions_lib.clean_caption
        check_caption = captions_lib.check_caption
        check_language = captions_lib.check_language
        recorded_language = captions_lib.recorded_language
        pair_uid = urls.pair_uid
        source = batch.source

        k_uid, k_url, k_caption, k_ids, k_page, k_lang, k_score = [], [], [], [], [], [], []
        r_url, r_caption, r_reason, r_page = [], [], [], []
        dropped: collections.Counter[str] = collections.Counter()

        for url, raw_caption, page_url in zip(
            batch.urls, batch.captions, batch.page_urls, strict=True
        ):
            caption = raw_caption
            normalized, reason = check_url(url, page_url)
            if reason is None:
                if not raw_caption:
                    reason = captions_lib.NO_CAPTION
                else:
                    caption = clean(raw_caption, unicode_form=form)
                    reason = check_caption(caption, ccfg)
            language, score = "", 0.0
            if reason is None and language_filter:
                language, score = detect(caption)
                reason = check_language(language, score, ccfg)
                if reason is None:
                    language = recorded_language(language, ccfg)
            if reason is None:
                ids = match(caption)
                if not ids and not keep_unmatched:
                    reason = NO_MATCH
                elif detect is not None and not language_filter:
                    # No filter: the language is only recorded, so only for kept pairs.
                    language, score = detect(caption)
            if reason is not None:
                dropped[reason] += 1
                if write_rejected:
                    r_url.append(normalized or url)
                    r_caption.append(caption)
                    r_reason.append(reason)
                    r_page.append(page_url)
                continue
            k_uid.append(pair_uid(normalized, caption))
            k_url.append(normalized)
            k_caption.append(caption)
            k_ids.append(ids)
            k_page.append(page_url)
            k_lang.append(language)
            k_score.append(score)

        counter[counters_lib.INPUT] += len(batch)
        for reason, n in dropped.items():
            counter[counters_lib.dropped(reason)] += n
        n = len(k_uid)
        candidates = pa.Table.from_arrays(
            [
                pa.array(k_uid, pa.string()),
                pa.array(k_url, pa.string()),
                pa.array(k_caption, pa.string()),
                pa.array(k_ids, pa.list_(pa.int32())),
                pa.array([source] * n, pa.string()),
                pa.array(k_page, pa.string()),
                pa.array(k_lang, pa.string()),
                pa.array(k_score, pa.float32()),
            ],
            schema=CANDIDATE_SCHEMA,
        )
        rejected = None
        if write_rejected:
            rejected = pa.Table.from_arrays(
                [
                    pa.array(r_url, pa.string()),
                    pa.array(r_caption, pa.string()),
                    pa.array(r_reason, pa.string()),
                    pa.array([source] * len(r_url), pa.string()),
                    pa.array(r_page, pa.string()),
                ],
                schema=REJECTED_SCHEMA,
            )
        return candidates, rejected


def _sorted_for_dedup(table: pa.Table) -> pa.Table:
    keys = pa.table(
        {
            "uid": table.column("uid"),
            "source": table.column("source"),
            "page_url": pc.fill_null(table.column("page_url"), ""),
        }
    )
    order = pc.sort_indices(
        keys,
        sort_keys=[("uid", "ascending"), ("source", "ascending"), ("page_url", "ascending")],
    )
    return table.take(order)


def dedup_candidates(
    table: pa.Table, counter: collections.Counter, *, dedup: bool = True
) -> tuple[pa.Table, pa.Table]:
    """Keep one pair per ``uid`` (smallest ``source``, then ``page_url``); sort by ``uid``.

    Returns ``(kept, duplicates)``; counts ``kept`` and ``dropped:duplicate``. The result
    depends only on the set of input rows, not on their order or partitioning.
    """
    if table.num_rows == 0:
        return table, table.slice(0, 0)
    table = _sorted_for_dedup(table)
    if not dedup:
        counter[counters_lib.KEPT] += table.num_rows
        return table, table.slice(0, 0)
    uid = table.column("uid").combine_chunks()
    first = np.ones(len(uid), dtype=bool)
    if len(uid) > 1:
        same = pc.equal(uid.slice(1), uid.slice(0, len(uid) - 1)).to_numpy(zero_copy_only=False)
        first[1:] = ~same
    mask = pa.array(first)
    kept = table.filter(mask)
    duplicates = table.filter(pc.invert(mask))
    counter[counters_lib.KEPT] += kept.num_rows
    if duplicates.num_rows:
        counter[counters_lib.dropped(DUPLICATE)] += duplicates.num_rows
    return kept, duplicates


def duplicates_as_rejected(duplicates: pa.Table) -> pa.Table:
    n = duplicates.num_rows
    return pa.Table.from_arrays(
        [
            duplicates.column("url"),
            duplicates.column("caption"),
            pa.array([DUPLICATE] * n, pa.string()),
            duplicates.column("source"),
            duplicates.column("page_url"),
        ],
        schema=REJECTED_SCHEMA,
    )


def query_count_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """``(query ids, pair counts)`` of the non-zero entries, for ``stats.json``."""
    flat = pc.list_flatten(table.column("query_ids")).to_numpy(zero_copy_only=False)
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    counts = np.bincount(flat.astype(np.int64))
    ids = np.flatnonzero(counts)
    return ids, counts[ids]


def bucket_of(uid: str, num_buckets: int) -> int:
    """The output bucket of a pair: a stable function of its ``uid``."""
    return int(uid[:8], 16) % num_buckets


def split_by_bucket(table: pa.Table, num_buckets: int) -> Iterator[tuple[int, pa.Table]]:
    """``(bucket, rows)`` for every bucket that ``table``'s rows fall into."""
    if table.num_rows == 0:
        return
    if num_buckets == 1:
        yield 0, table
        return
    buckets = np.fromiter(
        (int(u[:8], 16) for u in table.column("uid").to_pylist()),
        dtype=np.int64,
        count=table.num_rows,
    )
    buckets %= num_buckets
    order = np.argsort(buckets, kind="stable")
    table = table.take(pa.array(order))
    sorted_buckets = buckets[order]
    edges = np.flatnonzero(np.diff(sorted_buckets)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(order)]])
    for s, e in zip(starts, ends, strict=True):
        yield int(sorted_buckets[s]), table.slice(int(s), int(e - s))


def rejected_bucket(table: pa.Table, num_buckets: int) -> int:
    """A stable bucket for a batch of rejected rows (they need no grouping, only spreading)."""
    first = table.slice(0, 1).to_pylist()[0] if table.num_rows else {}
    key = f"{first.get('source')}\0{first.get('url')}\0{first.get('caption')}\0{table.num_rows}"
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % num_buckets


def auto_num_buckets(paths: Sequence[str]) -> int:
    """About one output file per 128 MiB of input (sizes from a sample of up to 64 files)."""
    if not paths:
        return 1
    step = max(1, len(paths) // 64)
    sample = paths[::step][:64]
    sizes = []
    for p in sample:
        try:
            if fileio.is_local(p):
                sizes.append(os.path.getsize(p.removeprefix("file://")))
            else:
                sizes.append(int(fileio.filesystem(p).size(p) or 0))
        except (OSError, ValueError, WitError):
            continue
    mean = sum(sizes) / len(sizes) if sizes else _BUCKET_TARGET_BYTES
    return int(min(MAX_BUCKETS, max(1, math.ceil(mean * len(paths) / _BUCKET_TARGET_BYTES))))


def load_query_list(spec: Sequence[str] | str) -> list[str]:
    """A literal list, or a query-list path (``queries.load_queries``)."""
    if isinstance(spec, str):
        return queries.load_queries(spec)
    return list(spec)


def gather_loop(
    paths: Sequence[str],
    *,
    cfg: GatherConfig,
    query_list: Sequence[str],
    counter: collections.Counter | None = None,
) -> tuple[pa.Table, pa.Table, collections.Counter]:
    """The whole stage in one process, without Beam: ``(candidates, rejected, counters)``.

    The reference the Beam pipeline is tested and benchmarked against; fine for small inputs.
    """
    counter = counter if counter is not None else collections.Counter()
    flt = PairFilter(cfg, QueryMatcher(query_list, case_sensitive=cfg.match.case_sensitive))
    kept, rejected = [], []
    for path in paths:
        counter["files:read"] += 1
        for batch in iter_file_batches(path, cfg=cfg, counter=counter):
            c, r = flt.process(batch, counter)
            kept.append(c)
            if r is not None:
                rejected.append(r)
    candidates, dups = dedup_candidates(
        pa.concat_tables(kept) if kept else CANDIDATE_SCHEMA.empty_table(), counter, dedup=cfg.dedup
    )
    if cfg.write_rejected and dups.num_rows:
        rejected.append(duplicates_as_rejected(dups))
    rejected_table = pa.concat_tables(rejected) if rejected else REJECTED_SCHEMA.empty_table()
    return candidates, rejected_table, counter


# ---------------------------------------------------------------------------------------------
# Beam transforms


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
    def __init__(self, *, cfg: GatherConfig, batch_size: int | None):
        self._cfg = cfg
        self._batch_size = batch_size

    def process(self, path: str):
        counter: collections.Counter[str] = collections.Counter()
        yield from iter_file_batches(
            path, cfg=self._cfg, counter=counter, batch_size=self._batch_size
        )
        counter["files:read"] += 1
        yield from beam_utils.emit_counts(counter)


class ReadPairs(beam.PTransform):
    """Input file paths -> ``RawBatch`` elements (raw pairs, nothing filtered).

    The Beam face of the readers (``readers.iter_file_batches``: WARC, WAT, Parquet, CSV, TSV,
    JSONL by file name or ``cfg.input_format``). Reader counters (``warc:records``, ...) go to
    the ``counts`` output as ``(name, n)`` pairs. ``GatherPairs`` does not use it: it reads and
    filters in one DoFn so that each file's progress line reports the whole cost.
    """

    def __init__(self, *, cfg: GatherConfig | None = None, batch_size: int | None = None):
        super().__init__()
        cfg = cfg or GatherConfig()
        if cfg.input_format not in ("auto", *FORMATS):
            raise WitError(f"unknown input format {cfg.input_format!r}")
        self._cfg = cfg
        self._batch_size = batch_size

    def expand(self, paths):
        return (
            paths
            | "Reshuffle" >> beam.Reshuffle()
            | "Read"
            >> beam.ParDo(_ReadFn(cfg=self._cfg, batch_size=self._batch_size)).with_outputs(
                beam_utils.COUNTS, main="batches"
            )
        )


class _Released:
    """What ``_ReadFilterFn.teardown`` acquires to make ``Shared`` drop its keep-alive."""


_RELEASE = shared.Shared()


class _ReadFilterFn(beam.DoFn):
    """One input file -> ``(bucket, ("c"|"r", table))`` per batch; reader and drop counts.

    Reading and filtering run in one DoFn so that a file's progress line reports its whole
    cost. The ``PairFilter`` (the matcher's automaton and the language detector) is built once
    per worker *process*: a runner runs many threads per process, each with its own DoFn
    instance, and every instance's ``setup()`` acquires the same object through a
    ``apache_beam.utils.shared.Shared`` handle (pickled with the DoFn, so all its copies share
    one key), tagged with the query list's sha256 and the config.
    """

    def __init__(
        self,
        *,
        cfg: GatherConfig,
        query_spec: Sequence[str] | str,
        queries_sha256: str | None,
        num_buckets: int,
        total_files: int,
        progress_interval: float,
    ):
        self._cfg = cfg
        self._query_spec = query_spec
        self._sha = queries_sha256
        # What the shared PairFilter is tagged with: the list's sha256 (a literal list is hashed
        # here; a path without a recorded sha256 stands for itself) and the config.
        if isinstance(query_spec, str):
            list_id = queries_sha256 or query_spec
        else:
            list_id = hashlib.sha256(json.dumps(list(query_spec)).encode()).hexdigest()
        self._shared_tag = (list_id, cfg)
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
        matcher = QueryMatcher(query_list, case_sensitive=self._cfg.match.case_sensitive)
        return PairFilter(self._cfg, matcher)

    def setup(self):
        self._filter = self._shared.acquire(self._build_filter, tag=self._shared_tag)

    def teardown(self):
        # ``Shared`` keeps the last object acquired alive until another one is acquired; doing
        # so here frees the PairFilter (~130 MB for a 500k list) once every DoFn instance of
        # the process is torn down, instead of holding it until the process exits.
        self._filter = None
        _RELEASE.acquire(_Released)

    def process(self, element: tuple[int, str]):
        index, path = element
        assert self._filter is not None
        counter: collections.Counter[str] = collections.Counter()
        label = f"[{index + 1}/{self._total}] {path}"
        progress = _Progress(label, self._interval)
        buffer = _BucketBuffer()
        pairs = kept = 0
        for batch in iter_file_batches(path, cfg=self._cfg, counter=counter):
            candidates, rejected = self._filter.process(batch, counter)
            pairs += len(batch)
            kept += candidates.num_rows
            for bucket, part in split_by_bucket(candidates, self._num_buckets):
                yield from buffer.add(bucket, part)
            if rejected is not None and rejected.num_rows:
                yield rejected_bucket(rejected, self._num_buckets), ("r", rejected)
            progress.update(pairs)
        yield from buffer.flush()
        counter["files:read"] += 1
        progress.done(pairs, kept)
        yield from beam_utils.emit_counts(counter)


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

    def add(self, bucket: int, table: pa.Table) -> Iterator[tuple[int, tuple[str, pa.Table]]]:
        self._parts[bucket].append(table)
        self._rows[bucket] += table.num_rows
        self._total += table.num_rows
        if self._rows[bucket] >= self._flush_rows:
            yield self._take(bucket)
        if self._total >= self._max_rows:
            yield from self.flush()

    def _take(self, bucket: int) -> tuple[int, tuple[str, pa.Table]]:
        parts = self._parts.pop(bucket)
        self._total -= self._rows.pop(bucket)
        return bucket, ("c", parts[0] if len(parts) == 1 else pa.concat_tables(parts))

    def flush(self) -> Iterator[tuple[int, tuple[str, pa.Table]]]:
        for bucket in sorted(self._parts):
            yield self._take(bucket)


class _DedupFn(beam.DoFn):
    """One bucket's candidates and rejected rows -> deduplicated, sorted tables."""

    def __init__(self, *, dedup: bool, write_rejected: bool):
        self._dedup = dedup
        self._write_rejected = write_rejected

    def process(self, element: tuple[int, Iterable[tuple[str, pa.Table]]]):
        bucket, parts = element
        kept_parts, rejected_parts = [], []
        for kind, table in parts:
            (kept_parts if kind == "c" else rejected_parts).append(table)
        counter: collections.Counter[str] = collections.Counter()
        candidates = pa.concat_tables(kept_parts) if kept_parts else CANDIDATE_SCHEMA.empty_table()
        kept, duplicates = dedup_candidates(candidates, counter, dedup=self._dedup)
        if self._write_rejected and duplicates.num_rows:
            rejected_parts.append(duplicates_as_rejected(duplicates))
        if kept.num_rows:
            yield bucket, kept
            yield TaggedOutput(QUERY_COUNTS, query_count_arrays(kept))
        if rejected_parts:
            yield TaggedOutput(beam_utils.REJECTED, (bucket, pa.concat_tables(rejected_parts)))
        yield from beam_utils.emit_counts(counter)


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
    """Input file paths -> deduplicated, query-matched candidate pairs (see module doc).

    Returns a dict of PCollections: ``candidates`` (``(bucket, pa.Table)``, deduplicated and
    sorted by ``uid``, one element per non-empty bucket), ``rejected`` (``(bucket, pa.Table)``,
    every dropped pair with its ``reason``), ``counts`` (``(name, n)``: ``input``, ``kept``,
    ``dropped:<reason>`` and reader counters) and ``query_counts`` (one ``{"<id>": n}``).

    The input is a PCollection of ``(index, path)`` (``index`` is only used in progress
    lines); use ``beam.Create(list(enumerate(paths)))``. ``queries`` is the query list itself or
    a path to it: pass a path for large lists (workers load it in ``setup()``; on Dataflow it
    must be readable by them, e.g. ``gs://``), with its sha256 to detect a changed file.
    """

    def __init__(
        self,
        *,
        cfg: GatherConfig,
        queries: Sequence[str] | str,
        num_buckets: int,
        total_files: int = 0,
        queries_sha256: str | None = None,
        progress_interval: float = 10.0,
    ):
        super().__init__()
        captions_lib.validate_caption_config(cfg.captions)
        if cfg.input_format not in ("auto", *FORMATS):
            raise WitError(f"unknown input format {cfg.input_format!r}")
        if cfg.batch_size < 1:
            raise WitError("config: gather.batch_size must be >= 1")
        if not 1 <= num_buckets <= MAX_BUCKETS:
            raise WitError(f"number of output shards must be within 1..{MAX_BUCKETS}")
        if not isinstance(queries, str) and not queries:
            raise WitError("query list is empty")
        self._cfg = cfg
        self._queries = queries if isinstance(queries, str) else list(queries)
        self._sha = queries_sha256
        self._num_buckets = num_buckets
        self._total = total_files
        self._interval = progress_interval

    def expand(self, files):
        filtered = (
            files
            | "Reshuffle" >> beam.Reshuffle()
            | "ReadAndFilter"
            >> beam.ParDo(
                _ReadFilterFn(
                    cfg=self._cfg,
                    query_spec=self._queries,
                    queries_sha256=self._sha,
                    num_buckets=self._num_buckets,
                    total_files=self._total,
                    progress_interval=self._interval,
                )
            ).with_outputs(beam_utils.COUNTS, main="parts")
        )
        deduped = (
            filtered.parts
            | "GroupByBucket" >> beam.GroupByKey()
            | "Dedup"
            >> beam.ParDo(
                _DedupFn(dedup=self._cfg.dedup, write_rejected=self._cfg.write_rejected)
            ).with_outputs(beam_utils.COUNTS, beam_utils.REJECTED, QUERY_COUNTS, main="kept")
        )
        counts = (filtered[beam_utils.COUNTS], deduped[beam_utils.COUNTS]) | "AllCounts" >> (
            beam.Flatten()
        )
        query_counts = deduped[QUERY_COUNTS] | "SumQueryCounts" >> beam.CombineGlobally(
            _SumQueryCounts()
        )
        return {
            "candidates": deduped.kept,
            "rejected": deduped[beam_utils.REJECTED],
            "counts": counts,
            QUERY_COUNTS: query_counts,
        }


def part_name(bucket: int, num_buckets: int) -> str:
    return f"part-{bucket:05d}-of-{num_buckets:05d}.parquet"


def write_table(path: str, table: pa.Table) -> str:
    import pyarrow.parquet as pq

    with fileio.atomic_write(path, "wb") as f:
        pq.write_table(table, f, compression="zstd")
    return path


def _write_part(element: tuple[int, pa.Table], directory: str, num_buckets: int) -> str:
    bucket, table = element
    return write_table(fileio.join(directory, part_name(bucket, num_buckets)), table)


def split_counters(counts: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """``(pair counters, reader counters)``: reader counters are ``warc:``/``wat:``/... names."""
    pairs = {k: v for k, v in counts.items() if not k.startswith(READ_COUNTER_PREFIXES)}
    read = {k: v for k, v in counts.items() if k.startswith(READ_COUNTER_PREFIXES)}
    for name in (counters_lib.INPUT, counters_lib.KEPT):
        pairs.setdefault(name, 0)
    return dict(sorted(pairs.items())), dict(sorted(read.items()))


def _finalize(
    counts: dict[str, int],
    query_counts: Mapping[str, int],
    written: Sequence[str],
    *,
    output: str,
    num_buckets: int,
    write_rejected: bool,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """Write empty files for empty buckets, check the counters, then ``stats.json`` (last)."""
    written_set = set(written)
    dirs = [(CANDIDATES_DIR, CANDIDATE_SCHEMA)]
    if write_rejected:
        dirs.append((REJECTED_DIR, REJECTED_SCHEMA))
    for sub, schema in dirs:
        for b in range(num_buckets):
            path = fileio.join(output, sub, part_name(b, num_buckets))
            if path not in written_set:
                write_table(path, schema.empty_table())
    pair_counts, read_counts = split_counters(counts)
    counters_lib.check_balanced(pair_counts, stage="gather")
    doc = {
        "counters": pair_counts,
        "read_counters": read_counts,
        "query_counts": dict(sorted(query_counts.items(), key=lambda kv: int(kv[0]))),
        **extra,
    }
    fileio.write_json(fileio.join(output, STATS_FILE), doc)
    return doc


class WriteGather(beam.PTransform):
    """Write ``GatherPairs``' output as ``candidates/``, ``rejected/``, then ``stats.json``."""

    def __init__(
        self,
        output: str,
        *,
        num_buckets: int,
        write_rejected: bool = True,
        extra: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self._output = output
        self._num_buckets = num_buckets
        self._write_rejected = write_rejected
        self._extra = dict(extra or {})

    def expand(self, result):
        n = self._num_buckets
        written = [
            result["candidates"]
            | "WriteCandidates"
            >> beam.Map(_write_part, fileio.join(self._output, CANDIDATES_DIR), n)
        ]
        if self._write_rejected:
            written.append(
                result["rejected"]
                | "WriteRejected"
                >> beam.Map(_write_part, fileio.join(self._output, REJECTED_DIR), n)
            )
        paths = tuple(written) | "AllWritten" >> beam.Flatten()
        totals = result["counts"] | "SumCounts" >> beam_utils.SumCounts()
        return totals | "WriteStats" >> beam.Map(
            _finalize,
            beam.pvalue.AsSingleton(result[QUERY_COUNTS]),
            beam.pvalue.AsList(paths),
            output=self._output,
            num_buckets=n,
            write_rejected=self._write_rejected,
            extra=self._extra,
        )


# ---------------------------------------------------------------------------------------------
# Running the stage


def _clear_outputs(output: str) -> None:
    for sub in (CANDIDATES_DIR, REJECTED_DIR):
        path = fileio.join(output, sub)
        if fileio.exists(path):
            fs = fileio.filesystem(path)
            for f in fs.ls(path, detail=False):
                if str(f).endswith(".parquet"):
                    fs.rm(f)
    stats = fileio.join(output, STATS_FILE)
    if fileio.exists(stats):
        fileio.filesystem(stats).rm(stats)


def validate_inputs(paths: Sequence[str], cfg: GatherConfig) -> dict[str, int]:
    """Check formats (and, for the first table of each format, its columns) before running."""
    from wit_pipeline.stages.gather.readers import tables

    formats: collections.Counter[str] = collections.Counter()
    checked: set[str] = set()
    for p in paths:
        fmt = detect_format(p, cfg.input_format)
        formats[fmt] += 1
        if fmt not in ("warc", "wat") and fmt not in checked:
            tables.check_table(p, cfg)
            checked.add(fmt)
    return dict(formats)


def run_gather(
    inputs: Sequence[str],
    output: str,
    *,
    cfg: GatherConfig | None = None,
    queries_path: str | None = None,
    beam_args: Sequence[str] = (),
    runner: str | None = None,
    progress_interval: float = 10.0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the gather stage end to end; returns the ``stats.json`` document.

    A finished output (``stats.json`` present, same inputs, config and query list) is not
    recomputed unless ``overwrite``; any partial output is cleared before running.
    """
    cfg = cfg or GatherConfig()
    captions_lib.validate_caption_config(cfg.captions)
    queries_path = queries_path or queries.default_queries_path()
    paths = fileio.expand_inputs(list(inputs))
    formats = validate_inputs(paths, cfg)
    query_list = queries.load_queries(queries_path)
    sha = queries.queries_sha256(queries_path)
    num_buckets = cfg.num_output_shards or auto_num_buckets(paths)
    from wit_pipeline.config import to_dict

    extra = {
        "queries": {"path": queries_path, "sha256": sha, "count": len(query_list)},
        "inputs": {"count": len(paths), "formats": formats, "files": paths},
        "config": to_dict(cfg),
        "num_output_shards": num_buckets,
    }
    stats_path = fileio.join(output, STATS_FILE)
    if not overwrite and fileio.exists(stats_path):
        previous = fileio.read_json(stats_path)
        same = all(previous.get(k) == v for k, v in extra.items())
        if same:
            _LOG.info("gather: %s is complete for these inputs; skipping (use --overwrite)", output)
            previous["skipped"] = True
            return previous
    _clear_outputs(output)
    fileio.makedirs(output)

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
    from wit_pipeline import pipeline

    with beam.Pipeline(options=options) as p:
        pipeline.gather(
            p,
            paths=paths,
            output=output,
            config=cfg,
            queries=query_spec,
            num_buckets=num_buckets,
            queries_sha256=sha,
            extra=extra,
            progress_interval=progress_interval,
        )
    doc = fileio.read_json(stats_path)
    doc["elapsed_s"] = round(time.monotonic() - started, 3)
    return doc
