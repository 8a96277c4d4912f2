"""The gather stage's pure core: raw image/caption pairs -> query-matched, deduplicated candidates.

For every input file (WARC, WAT, or a table) each extracted image/caption pair goes through:

1. URL: present (``no_url``), http(s) (``unsupported_scheme``: ``data:``, ``javascript:``,
   ``blob:``, ...), normalizable (``bad_url``, ``urls.normalize_url``);
   takedown: the image URL or the page URL matches a ``url`` or ``domain`` entry of the
   blocklist (``takedown``, the entry in ``detail``);
   opt-out: the page the pair was found on opts out (``opt_out``, the signal in ``detail``,
   the page as ``policy_url`` and its crawl date as ``policy_fetched``; ``optout``), counted
   per signal as ``opt_out/<signal>``;
2. caption: present (``no_caption``), cleaned (``captions.clean_caption``), undamaged
   (``bad_encoding``), within length bounds (``too_short``, ``too_long``, ``too_few_words``,
   ``too_many_words``);
3. language (``language``, ``language_undetected``, ``low_language_score``);
4. query matching with MetaCLIP's substring semantics (``no_match``);
5. exact duplicates across the whole input: one pair per ``uid`` is kept (``duplicate``).

Both cores return a :class:`wit_pipeline.stage.Result` over Arrow tables: ``PairFilter.process``
(steps 1-4, one batch) and ``dedup_candidates`` (step 5, one bucket). Every pair is counted:
the filter counts ``input`` where pairs enter the stage, the dedup counts ``kept`` where they
leave it, and each rejected row is a ``dropped:<reason>`` (``stage.flow_counts`` with
``flow=False``), so that ``input == kept + sum(dropped:*)`` over the whole stage. Reader
counts (``warc:records``, ``files:read``, ...) are scoped ``read/``. ``gather_loop`` runs the
stage in one process; ``transforms`` runs the same cores in Beam.

Candidates are hash-partitioned by ``uid`` into buckets (``bucket_of``); each bucket is
deduplicated alone and becomes one output file, so the output is identical whatever the
runner, the batching or the number of workers.
"""

from __future__ import annotations

import collections
import math
import os
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wit_pipeline import counters as counters_lib
from wit_pipeline import fileio, optout, queries, schemas, stage, urls
from wit_pipeline.config import MAX_BUCKETS, CaptionConfig, GatherConfig
from wit_pipeline.errors import WitError
from wit_pipeline.stages.gather import captions as captions_lib
from wit_pipeline.stages.gather.match import QueryMatcher
from wit_pipeline.stages.gather.readers import RawBatch, detect_format, iter_file_batches
from wit_pipeline.stages.gather.readers.html import resolve_url
from wit_pipeline.takedown import TAKEDOWN, Blocklist

STAGE = "gather"  # the stage name in rejected rows

# Drop reasons decided here (caption and language reasons live in ``captions``).
NO_URL = "no_url"
UNSUPPORTED_SCHEME = "unsupported_scheme"
BAD_URL = "bad_url"
NO_MATCH = "no_match"
DUPLICATE = "duplicate"

FILES_READ = "files:read"  # a reader count (``read/files:read``): input files read to the end
# stats.json: pair counts under "counters", reader counts under "read_counters", pairs dropped
# per opt-out signal under "opt_out_counters".
STATS_SECTIONS = {
    "": "counters",
    counters_lib.READ: "read_counters",
    optout.SCOPE: "opt_out_counters",
}

CANDIDATE_SCHEMA = schemas.CANDIDATE_SCHEMA

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
_HTTP_PREFIXES = ("http://", "https://")
# Input bytes per output file (``auto_num_buckets``). A bucket's candidates are deduplicated
# together, in one task's memory, so the target bounds that task: a table's bytes are the pairs
# themselves (4 MiB of a LAION-shaped Parquet table: ~100k pairs, ~0.5 GB as Python records),
# a crawl's mostly HTML (128 MiB of WARC: ~160k pairs).
_BUCKET_TARGET_BYTES = {"crawl": 128 << 20, "table": 4 << 20}
_CRAWL_FORMATS = ("warc", "wat")


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


# Caption text that ``captions.clean_caption`` returns unchanged, recognizable by RE2 in one
# pass over a batch: printable ASCII without "&" (no entity to unescape, nothing to normalize,
# no control character), words separated by single spaces, none at either end.
_CLEAN_ASCII = r"^[!-%'-~]+(?: [!-%'-~]+)*$"
# Per-caption results kept by a ``PairFilter`` (language, matched queries); cleared when full.
CAPTION_CACHE_SIZE = 1 << 16


def _mask(array: pa.Array, pattern: str) -> np.ndarray:
    return pc.fill_null(pc.match_substring_regex(array, pattern), False).to_numpy(
        zero_copy_only=False
    )


class PairFilter:
    """Cleans, filters and matches raw pairs; build once per worker (it holds the automaton).

    ``process`` returns the batch's candidates (until ``dedup_candidates`` has seen every
    other batch) and its rejected pairs, each with its ``reason``; its counts are ``input``.

    The work is done per batch: URL checks and caption checks as pyarrow kernels over the
    whole batch, with ``urls.normalize_url`` and ``captions.clean_caption`` called only for
    the URLs and captions that the kernels cannot vouch for; language detection once per
    distinct caption of the batch (``captions.detect_many``) and query matching once per
    distinct caption, both remembered across batches for up to ``CAPTION_CACHE_SIZE``
    captions (alt texts repeat: "image", "logo", product names). The outputs are those of
    the per-pair rules applied in order (URL, caption, language, match), row for row.
    """

    def __init__(
        self,
        config: GatherConfig,
        matcher: QueryMatcher,
        detector: captions_lib.LanguageDetector | None = None,
        blocklist: Blocklist | None = None,
    ):
        self.config = config
        self.matcher = matcher
        self.detector = detector or captions_lib.make_detector(config.captions)
        self.blocklist = blocklist if blocklist is not None and blocklist.has_url_entries else None
        self._languages: dict[str, tuple[str, float]] = {}
        self._matches: dict[str, list[int]] = {}

    def _takedown(self, normalized: str, page_url: str | None, pages: dict) -> str | None:
        """The blocklist entry the image URL or the page URL matches (pages are cached: the
        pairs of a page come together)."""
        bl = self.blocklist
        assert bl is not None
        hit = bl.match_url(normalized)
        if hit is None and page_url:
            if page_url not in pages:
                page_hit = bl.match_raw_url(page_url)
                pages.clear()  # one page at a time: pairs of a page arrive together
                pages[page_url] = f"{page_hit} (page URL)" if page_hit else None
            hit = pages[page_url]
        return hit

    def _detect(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """The detector's answer for each text, once per distinct text (cached).

        The caches may be shared by threads (one ``PairFilter`` per worker process): they are
        only read with ``get`` and written whole entries at a time, so a clear by another
        thread costs a recomputation, never a wrong or missing answer.
        """
        cache = self._languages
        out = [cache.get(t) for t in texts]
        todo = list(dict.fromkeys(t for t, r in zip(texts, out, strict=True) if r is None))
        if todo:
            found = dict(zip(todo, captions_lib.detect_many(self.detector, todo), strict=True))
            if len(cache) + len(found) > CAPTION_CACHE_SIZE:
                cache.clear()
            cache.update(found)
            out = [found[t] if r is None else r for t, r in zip(texts, out, strict=True)]
        return out  # type: ignore[return-value]

    def _match(self, texts: Sequence[str]) -> list[list[int]]:
        """The matched query ids of each text, once per distinct text (cached)."""
        cache = self._matches
        if len(cache) + len(texts) > CAPTION_CACHE_SIZE:
            cache.clear()
        match = self.matcher.match
        out = []
        for t in texts:
            ids = cache.get(t)
            if ids is None:
                ids = cache[t] = match(t)
            out.append(ids)
        return out

    def process(self, batch: RawBatch) -> stage.Result:
        """Candidates (``CANDIDATE_SCHEMA``) and rejected pairs (``url``, ``caption``,
        ``reason``, ``source``, ``page_url``; with ``detail``, ``policy_url`` and
        ``policy_fetched`` when a takedown or an opt-out is among them) of one batch, as Arrow
        tables; the counts are ``input`` and ``opt_out/<signal>``."""
        ccfg = self.config.captions
        detecting = self.detector.name != "none"
        # Detection runs before matching when it filters (a caption's language is checked like
        # its length); without a filter it runs only for the pairs that are kept.
        language_filter = bool(ccfg.languages) and detecting
        n = len(batch)
        raw_urls, raw_captions, page_urls = batch.urls, batch.captions, batch.page_urls
        reasons: list[str | None] = [None] * n

        # 1. URLs: the common shape is already normal; the rest goes through check_url.
        normalized: list[str | None] = list(raw_urls)
        url_arr = pa.array(raw_urls, pa.string())
        for i in np.flatnonzero(~urls.already_normalized(url_arr)).tolist():
            normalized[i], reasons[i] = check_url(raw_urls[i], page_urls[i])

        # Takedowns (the blocklist's URL and domain entries), then the page's opt-out signal.
        details: dict[int, str] = {}
        policies: dict[int, tuple[str | None, str | None]] = {}
        opt_outs: collections.Counter[str] = collections.Counter()
        if self.blocklist is not None:
            pages: dict[str, str | None] = {}
            for i in range(n):
                if reasons[i] is None:
                    hit = self._takedown(normalized[i], page_urls[i], pages)  # type: ignore[arg-type]
                    if hit is not None:
                        reasons[i], details[i] = TAKEDOWN, hit
        if batch.opt_outs:
            dates = batch.page_dates or [None] * n
            for i, signal in enumerate(batch.opt_outs):
                if signal is not None and reasons[i] is None:
                    reasons[i], details[i] = optout.OPT_OUT, signal
                    policies[i] = (page_urls[i], dates[i] or None)
                    opt_outs[counters_lib.scoped(optout.SCOPE, signal)] += 1

        # 2. Captions: cleaned (the kernel vouches for clean ASCII), then checked.
        cleaned: list[str | None] = list(raw_captions)
        cap_arr = pa.array(raw_captions, pa.string())
        form = ccfg.unicode_form
        clean = captions_lib.clean_caption
        for i in np.flatnonzero(~_mask(cap_arr, _CLEAN_ASCII)).tolist():
            if reasons[i] is None:
                raw = raw_captions[i]
                if not raw:
                    reasons[i] = captions_lib.NO_CAPTION
                else:
                    cleaned[i] = clean(raw, unicode_form=form)
        alive = [i for i, r in enumerate(reasons) if r is None]
        if alive:
            texts = [cleaned[i] for i in alive]
            for i, why in zip(alive, _caption_reasons(texts, ccfg), strict=True):
                reasons[i] = why
            alive = [i for i in alive if reasons[i] is None]

        # 3. Language (when it filters), once per distinct caption.
        languages: dict[int, tuple[str, float]] = {}
        if language_filter and alive:
            check_language, recorded = captions_lib.check_language, captions_lib.recorded_language
            found = self._detect([cleaned[i] for i in alive])
            still = []
            for i, (language, score) in zip(alive, found, strict=True):
                why = check_language(language, score, ccfg)
                if why is None:
                    languages[i] = (recorded(language, ccfg), score)
                    still.append(i)
                else:
                    reasons[i] = why
            alive = still

        # 4. Query matching, once per distinct caption.
        keep_unmatched = self.config.match.keep_unmatched
        kept: list[int] = []
        kept_ids: list[list[int]] = []
        for i, ids in zip(alive, self._match([cleaned[i] for i in alive]), strict=True):
            if ids or keep_unmatched:
                kept.append(i)
                kept_ids.append(ids)
            else:
                reasons[i] = NO_MATCH
        if detecting and not language_filter and kept:
            # No filter: the language is only recorded, so only for kept pairs.
            languages = dict(zip(kept, self._detect([cleaned[i] for i in kept]), strict=True))

        page_urls = batch.page_urls
        k_url = [normalized[i] for i in kept]
        k_caption = [cleaned[i] for i in kept]
        found = [languages.get(i, ("", 0.0)) for i in kept]
        candidates = pa.Table.from_arrays(
            [
                pa.array(urls.pair_uids(k_url, k_caption), pa.string()),
                pa.array(k_url, pa.string()),
                pa.array(k_caption, pa.string()),
                pa.array(kept_ids, pa.list_(pa.int32())),
                pa.array([batch.source] * len(kept), pa.string()),
                pa.array([page_urls[i] for i in kept], pa.string()),
                pa.array([f[0] for f in found], pa.string()),
                pa.array([f[1] for f in found], pa.float32()),
            ],
            schema=CANDIDATE_SCHEMA,
        )
        dropped = [i for i, r in enumerate(reasons) if r is not None]
        columns = [
            pa.array([normalized[i] or raw_urls[i] for i in dropped], pa.string()),
            # A pair dropped for its URL (or its page) keeps its raw caption (never cleaned).
            pa.array([cleaned[i] for i in dropped], pa.string()),
            pa.array([reasons[i] for i in dropped], pa.string()),
            pa.array([batch.source] * len(dropped), pa.string()),
            pa.array([page_urls[i] for i in dropped], pa.string()),
        ]
        names = ["url", "caption", "reason", "source", "page_url"]
        if details:  # takedowns and opt-outs say which entry or signal, and the policy
            no_policy = (None, None)
            columns += [
                pa.array([details.get(i, "") for i in dropped], pa.string()),
                pa.array([policies.get(i, no_policy)[0] for i in dropped], pa.string()),
                pa.array([policies.get(i, no_policy)[1] for i in dropped], pa.string()),
            ]
            names += ["detail", "policy_url", "policy_fetched"]
        rejected = pa.Table.from_arrays(columns, names=names)
        return stage.Result(candidates, rejected, {counters_lib.INPUT: n, **opt_outs})


def _caption_reasons(texts: Sequence[str], cfg: CaptionConfig) -> list[str | None]:
    """``captions.check_caption`` of each cleaned caption, as pyarrow kernels over the batch."""
    array = pa.array(texts, pa.string())
    length = pc.utf8_length(array).to_numpy(zero_copy_only=False)
    words = pc.count_substring(array, " ").to_numpy(zero_copy_only=False) + 1
    damaged = pc.match_substring(array, "\ufffd").to_numpy(zero_copy_only=False)
    # The rules in check_caption's order: the first that applies names the reason.
    rules = [
        (length == 0, captions_lib.NO_CAPTION),
        (damaged, captions_lib.BAD_ENCODING),
        (length < cfg.min_chars, captions_lib.TOO_SHORT),
        ((length > cfg.max_chars) if cfg.max_chars else None, captions_lib.TOO_LONG),
        (words < cfg.min_words, captions_lib.TOO_FEW_WORDS),
        ((words > cfg.max_words) if cfg.max_words else None, captions_lib.TOO_MANY_WORDS),
    ]
    out: list[str | None] = [None] * len(texts)
    for mask, reason in reversed(rules):
        if mask is not None:
            for i in np.flatnonzero(mask).tolist():
                out[i] = reason
    return out


def _dedup_order(table: pa.Table) -> np.ndarray:
    """Row indices sorted by ``uid``, then ``source``, then ``page_url`` (nulls as "")."""
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
    return order.to_numpy()


def _with_reason(table: pa.Table, reason: str) -> pa.Table:
    return table.append_column("reason", pa.array([reason] * table.num_rows, pa.string()))


def dedup_candidates(table: pa.Table, *, dedup: bool = True) -> stage.Result:
    """Keep one pair per ``uid`` (smallest ``source``, then ``page_url``); sort by ``uid``.

    The rejected rows are the other copies (reason ``duplicate``); the counts are ``kept``.
    The result depends only on the set of input rows, not on their order or partitioning.
    """
    # The sort is computed on the key columns and the rows are taken once, into their place
    # in ``kept`` or ``duplicates`` (not the whole table sorted and then filtered twice).
    order = _dedup_order(table) if table.num_rows else np.zeros(0, np.int64)
    kept_rows, duplicate_rows = order, order[:0]
    if dedup and table.num_rows > 1:
        uid = table.column("uid").take(pa.array(order)).combine_chunks()
        first = np.ones(len(uid), dtype=bool)
        same = pc.equal(uid.slice(1), uid.slice(0, len(uid) - 1)).to_numpy(zero_copy_only=False)
        first[1:] = ~same
        kept_rows, duplicate_rows = order[first], order[~first]
    kept = table.take(pa.array(kept_rows, pa.int64()))
    duplicates = table.take(pa.array(duplicate_rows, pa.int64()))
    return stage.Result(
        kept, _with_reason(duplicates, DUPLICATE), {counters_lib.KEPT: kept.num_rows}
    )


def add_counts(counter: collections.Counter, result: stage.Result) -> collections.Counter:
    """Add what a core's result counts (its drops by reason, and its own counts) to ``counter``.

    The same counts the Beam DoFns emit for it (``stage.StageFn`` with ``flow=False``).
    """
    counter.update(stage.flow_counts(result.kept, result.rejected, flow=False))
    counter.update({k: v for k, v in result.counts.items() if v})
    return counter


def read_counts(reader_counter: Mapping[str, int]) -> dict[str, int]:
    """A reader's counts (``warc:records``, ...) under the ``read/`` scope."""
    return {counters_lib.scoped(counters_lib.READ, k): v for k, v in reader_counter.items() if v}


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
    """``(bucket, rows)`` for every bucket that ``table``'s rows fall into.

    Each bucket's rows are a copy (``take``), not a slice: a pickled Arrow slice carries its
    whole parent buffers, so a shuffle would move each batch once per bucket in it (measured in
    a 3M-pair gather on Dask: 30 buckets made every split's shuffle data ~30x its rows).
    """
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
    sorted_buckets = buckets[order]
    edges = np.flatnonzero(np.diff(sorted_buckets)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(order)]])
    for s, e in zip(starts, ends, strict=True):
        yield int(sorted_buckets[s]), table.take(pa.array(order[s:e]))


def rejected_bucket(table: pa.Table, num_buckets: int) -> int:
    """A stable bucket for a batch of rejected rows (they need no grouping, only spreading)."""
    first = table.slice(0, 1).to_pylist()[0] if table.num_rows else {}
    key = f"{first.get('source')}\0{first.get('url')}\0{first.get('caption')}\0{table.num_rows}"
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % num_buckets


def auto_num_buckets(paths: Sequence[str], input_format: str = "auto") -> int:
    """About one output file per 4 MiB of table input or 128 MiB of crawl input (WARC, WAT),
    sizes from a sample of up to 64 files."""
    if not paths:
        return 1
    step = max(1, len(paths) // 64)
    sample = paths[::step][:64]
    shares = []  # output files per sampled file whose size is known
    for p in sample:
        try:
            if fileio.is_local(p):
                size = os.path.getsize(p.removeprefix("file://"))
            else:
                size = int(fileio.filesystem(p).size(p) or 0)
        except (OSError, ValueError, WitError):
            continue
        try:
            kind = "crawl" if detect_format(p, input_format) in _CRAWL_FORMATS else "table"
        except WitError:
            kind = "table"
        shares.append(size / _BUCKET_TARGET_BYTES[kind])
    mean = sum(shares) / len(shares) if shares else 1.0
    return int(min(MAX_BUCKETS, max(1, math.ceil(mean * len(paths)))))


def load_query_list(spec: Sequence[str] | str) -> list[str]:
    """A literal list, or a query-list path (``queries.load_queries``)."""
    if isinstance(spec, str):
        return queries.load_queries(spec)
    return list(spec)


def gather_loop(
    paths: Sequence[str],
    *,
    config: GatherConfig,
    query_list: Sequence[str],
    counter: collections.Counter | None = None,
    blocklist: Blocklist | None = None,
) -> tuple[pa.Table, pa.Table, collections.Counter]:
    """The whole stage in one process, without Beam: ``(candidates, rejected, counts)``.

    ``rejected`` holds ``stage.REJECTED_SCHEMA`` rows (none unless ``config.write_rejected``);
    ``counts`` are the ones the Beam pipeline sums (``stage.stats_document`` with
    ``STATS_SECTIONS`` splits them as ``stats.json`` does). The reference the Beam pipeline is
    tested and benchmarked against; fine for small inputs.
    """
    counter = counter if counter is not None else collections.Counter()
    matcher = QueryMatcher(query_list, case_sensitive=config.match.case_sensitive)
    flt = PairFilter(config, matcher, blocklist=blocklist)
    kept, rejected = [], []

    def reject(table: pa.Table) -> None:
        if config.write_rejected and table.num_rows:
            rejected.append(stage.rejected_table(table, stage=STAGE))

    for path in paths:
        read: collections.Counter[str] = collections.Counter()
        for batch in iter_file_batches(path, cfg=config, counter=read):
            result = flt.process(batch)
            add_counts(counter, result)
            kept.append(result.kept)
            reject(result.rejected)
        read[FILES_READ] += 1
        counter.update(read_counts(read))
    deduped = dedup_candidates(
        pa.concat_tables(kept) if kept else CANDIDATE_SCHEMA.empty_table(), dedup=config.dedup
    )
    add_counts(counter, deduped)
    reject(deduped.rejected)
    rejected_rows = pa.concat_tables(rejected) if rejected else stage.REJECTED_SCHEMA.empty_table()
    return deduped.kept, rejected_rows, counter
