"""The counting pipeline of ``wit queries build``, on any Beam runner.

Counting a full dump is the only part of the build that needs a cluster; everything else is
small enough for the driver. ``run_counting_pipeline`` wires these transforms together and
writes the candidate files (``unigrams.tsv.gz``, ``bigrams.tsv.gz``, ``titles.tsv.gz``) and
``stats.json`` last, as the completion marker:

- ``CountWikipediaNgrams``: dump files -> byte ranges -> article batches -> summed unigram and
  bigram counts; ``CountTextNgrams``: the same for ``--text`` files.
- ``SelectUnigrams``, ``ScoreBigrams`` (PMI, through two joins), ``SumPageviews``: the
  thresholds of each source, with a counted reason for every drop.
- ``WriteCandidates``: one sorted gzip TSV file per source.

Every count names its scope (``pages/kept``, ``bigrams/dropped:below_min_pmi``,
``corpus/tokens``); ``counters.split_scopes`` splits them again.
"""

from __future__ import annotations

import collections
import gzip
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import GlobalWindows

from wit_pipeline import beam_utils, fileio
from wit_pipeline import counters as counters_lib
from wit_pipeline.config import QueriesConfig
from wit_pipeline.errors import WitError
from wit_pipeline.queries.ngrams import (
    bigram_prefilter_reason,
    bigram_sort_key,
    count_ngrams,
    pmi,
    unigram_reason,
    unigram_sort_key,
)
from wit_pipeline.queries.reading import file_size, read_lines
from wit_pipeline.queries.text import iter_text_paragraphs
from wit_pipeline.queries.titles import sum_pageviews, title_sort_key
from wit_pipeline.queries.wikipedia import (
    articles,
    clean_wikitext,
    iter_page_fragments,
    iter_split_pages,
    parse_fragment,
    plan_splits,
)

dropped = counters_lib.dropped


# ---------------------------------------------------------------------------------------------
# Counting the corpora

# Outputs of the counting transforms, and the scopes of their counts in stats.json
# (``counters.scoped``: ``pages/input``, ``unigrams/dropped:too_long``, ``corpus/tokens``).
UNIGRAMS = "unigrams"
BIGRAMS = "bigrams"
PAGES = "pages"  # dump pages read
CORPUS = "corpus"  # tokens of the dumps
TEXT = "text"  # paragraphs and tokens of the --text files
PAGEVIEW_LINES = "pageview_lines"
TITLES = "titles"
TEXT_BATCH_PARAGRAPHS = 1024  # paragraphs of a --text file per batch handed to the counting


def _in_scope(scope: str, counter: Mapping[str, int]) -> dict[str, int]:
    """``{"input": 3}`` -> ``{"pages/input": 3}``: every count names its scope."""
    return {counters_lib.scoped(scope, name): n for name, n in counter.items()}


def _plan_file(path: str, split_bytes: int) -> list[tuple[str, int, int]]:
    return plan_splits(path, file_size(path), split_bytes)


class _ReadSplitFn(beam.DoFn):
    """A byte range of a dump -> batches of article wikitext; pages counted by outcome."""

    def __init__(self, batch_pages: int):
        self._batch_pages = batch_pages

    def process(self, split: tuple[str, int, int]):
        path, start, end = split
        if path.endswith(".bz2"):
            fragments = iter_split_pages(path, start, end)
        else:
            fragments = iter_page_fragments(path)  # gzip/plain XML: one split per file
        counter: collections.Counter = collections.Counter()
        batch: list[str] = []
        pages = (parse_fragment(fragment, source=path) for fragment in fragments)
        for page in articles(pages, counter):
            batch.append(page.text)
            if len(batch) >= self._batch_pages:
                yield batch
                batch = []
        if batch:
            yield batch
        yield from beam_utils.emit_counts(_in_scope(PAGES, counter))


class _CountNgramsFn(beam.DoFn):
    """Batches of wikitext -> partial ``(token, n)`` and ``(bigram, n)`` counts.

    Counts are combined across the whole bundle before they are emitted (and flushed when the
    bigram table reaches ``max_keys``): emitting per page would send every token of the dump
    through the shuffle.
    """

    def __init__(
        self,
        *,
        bigrams: bool,
        max_keys: int = 2_000_000,
        wikitext: bool = True,
        tokens_counter: str = counters_lib.scoped(CORPUS, "tokens"),
    ):
        self._bigrams = bigrams
        self._max_keys = max_keys
        self._wikitext = wikitext  # False: plain text (``--text``), counted as it is
        self._tokens_counter = tokens_counter

    def start_bundle(self):
        self._uni: collections.Counter = collections.Counter()
        self._bi: collections.Counter | None = collections.Counter() if self._bigrams else None
        self._tokens = 0

    def process(self, batch: list[str]):
        texts = (clean_wikitext(t) for t in batch) if self._wikitext else batch
        self._tokens += count_ngrams(texts, self._uni, self._bi)
        if len(self._uni) + len(self._bi or ()) >= self._max_keys:
            yield from self._flush(windowed=False)

    def finish_bundle(self):
        yield from self._flush(windowed=True)

    def _flush(self, *, windowed: bool):
        def out(tag: str, value: Any):
            v = GlobalWindows.windowed_value(value) if windowed else value
            return TaggedOutput(tag, v)

        for item in self._uni.items():
            yield out(UNIGRAMS, item)
        for item in (self._bi or {}).items():
            yield out(BIGRAMS, item)
        if self._tokens:
            yield out(beam_utils.COUNTS, (self._tokens_counter, self._tokens))
        self.start_bundle()


def _count_batches(read, count: _CountNgramsFn) -> dict[str, Any]:
    """Batches of text (``read.batches``, with the reader's ``counts``) -> summed unigram and
    bigram counts and every count: the counting half of ``CountWikipediaNgrams`` and
    ``CountTextNgrams``. Batches are redistributed first: the counting dominates the cost."""
    counted = (
        read.batches
        | "ShuffleBatches" >> beam.Reshuffle()
        | "Count" >> beam.ParDo(count).with_outputs(UNIGRAMS, BIGRAMS, beam_utils.COUNTS)
    )
    unigrams = counted[UNIGRAMS] | "SumUnigrams" >> beam.CombinePerKey(sum)
    bigrams = counted[BIGRAMS] | "SumBigrams" >> beam.CombinePerKey(sum)
    counts = (read[beam_utils.COUNTS], counted[beam_utils.COUNTS]) | "Counts" >> beam.Flatten()
    return {UNIGRAMS: unigrams, BIGRAMS: bigrams, beam_utils.COUNTS: counts}


class CountWikipediaNgrams(beam.PTransform):
    """Dump files -> ``{"unigrams": (token, count), "bigrams": ("a b", count), "counts": ...}``.

    Totals are exact: ``(token, count)`` partials are summed with ``CombinePerKey``. Byte ranges
    of ``.bz2`` files are read in parallel (``split_bytes`` each) and the page batches are
    redistributed before the counting, which dominates the cost. ``split_bytes`` and
    ``batch_pages`` are ``queries.split_bytes`` and ``queries.batch_pages`` (positive: the
    section checked them when it was made).
    """

    def __init__(
        self,
        *,
        files: Sequence[str],
        split_bytes: int,
        batch_pages: int,
        bigrams: bool = True,
        max_keys: int = 2_000_000,
    ):
        super().__init__()
        if not files:
            raise WitError("no dump files to count")
        self._max_keys = max_keys
        self._files = list(files)
        self._split_bytes = split_bytes
        self._batch_pages = batch_pages
        self._bigrams = bigrams

    def expand(self, pbegin):
        read = (
            pbegin
            | "Files" >> beam.Create(self._files)
            | "PlanSplits" >> beam.FlatMap(_plan_file, self._split_bytes)
            | "ShuffleSplits" >> beam.Reshuffle()
            | "ReadSplits"
            >> beam.ParDo(_ReadSplitFn(self._batch_pages)).with_outputs(
                beam_utils.COUNTS, main="batches"
            )
        )
        return _count_batches(read, _CountNgramsFn(bigrams=self._bigrams, max_keys=self._max_keys))


def _read_text_batches(path: str, batch_paragraphs: int):
    """A text file (``--text``) -> batches of paragraphs; ``text/paragraphs`` counted."""
    batch: list[str] = []
    n = 0
    for paragraph in iter_text_paragraphs(path):
        n += 1
        batch.append(paragraph)
        if len(batch) >= batch_paragraphs:
            yield batch
            batch = []
    if batch:
        yield batch
    yield from beam_utils.emit_counts({counters_lib.scoped(TEXT, "paragraphs"): n})


class CountTextNgrams(beam.PTransform):
    """Plain-text files -> ``{"unigrams", "bigrams", "counts"}`` like ``CountWikipediaNgrams``.

    Each file is read whole by one worker (text corpora are small next to a dump); paragraph
    batches are redistributed before the counting. Tokens are counted as ``text/tokens``.
    """

    def __init__(self, *, files: Sequence[str], batch_paragraphs: int, max_keys: int = 2_000_000):
        super().__init__()
        if not files:
            raise WitError("no text files to count")
        self._files = list(files)
        self._batch_paragraphs = batch_paragraphs
        self._max_keys = max_keys

    def expand(self, pbegin):
        read = (
            pbegin
            | "Files" >> beam.Create(self._files)
            | "ShuffleFiles" >> beam.Reshuffle()
            | "Read"
            >> beam.FlatMap(_read_text_batches, self._batch_paragraphs).with_outputs(
                beam_utils.COUNTS, main="batches"
            )
        )
        count = _CountNgramsFn(
            bigrams=True,
            max_keys=self._max_keys,
            wikitext=False,
            tokens_counter=counters_lib.scoped(TEXT, "tokens"),
        )
        return _count_batches(read, count)


# ---------------------------------------------------------------------------------------------
# Selecting unigrams, scoring bigrams, summing page views


class _BundleCountsFn(beam.DoFn):
    """A DoFn whose counters are summed over the bundle and emitted once at its end.

    Selection steps see one element per distinct word or bigram (hundreds of millions on a
    full dump); emitting ``(name, 1)`` per element would double the shuffle.
    """

    scope = ""  # of the counts (``counters.scoped``)

    def start_bundle(self):
        self._counter: collections.Counter = collections.Counter()

    def finish_bundle(self):
        for out in beam_utils.emit_counts(_in_scope(self.scope, self._counter)):
            yield TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
        self._counter = collections.Counter()


class _SelectUnigramsFn(_BundleCountsFn):
    scope = UNIGRAMS

    def __init__(self, *, min_count: int, max_chars: int):
        self._min_count = min_count
        self._max_chars = max_chars

    def process(self, item: tuple[str, int]):
        word, count = item
        reason = unigram_reason(word, count, min_count=self._min_count, max_chars=self._max_chars)
        self._counter[counters_lib.INPUT] += 1
        if reason:
            self._counter[dropped(reason)] += 1
        else:
            self._counter[counters_lib.KEPT] += 1
            yield item


class SelectUnigrams(beam.PTransform):
    """``(word, count)`` totals -> the words kept, with a counted reason for each drop."""

    def __init__(self, *, min_count: int, max_chars: int):
        super().__init__()
        self._fn = _SelectUnigramsFn(min_count=min_count, max_chars=max_chars)

    def expand(self, pcoll):
        out = pcoll | beam.ParDo(self._fn).with_outputs(beam_utils.COUNTS, main="kept")
        return {"kept": out.kept, beam_utils.COUNTS: out[beam_utils.COUNTS]}


class _PrefilterBigramsFn(_BundleCountsFn):
    """Checks that need no unigram counts, before the joins (``kept`` is counted after PMI)."""

    scope = BIGRAMS

    def __init__(self, min_count: int):
        self._min_count = min_count

    def process(self, item: tuple[str, int]):
        bigram, count = item
        reason = bigram_prefilter_reason(bigram, count, min_count=self._min_count)
        self._counter[counters_lib.INPUT] += 1
        if reason:
            self._counter[dropped(reason)] += 1
        else:
            yield item


def _attach_first(kv):
    _, groups = kv
    counts = list(groups["uni"])
    if not counts:
        return
    for bigram, count in groups["bi"]:
        yield bigram.partition(" ")[2], (bigram, count, counts[0])


def _attach_second(kv):
    _, groups = kv
    counts = list(groups["uni"])
    if not counts:
        return
    for bigram, count, count_a in groups["bi"]:
        yield bigram, count, count_a, counts[0]


class _ScoreBigramsFn(_BundleCountsFn):
    scope = BIGRAMS

    def __init__(self, min_pmi: float):
        self._min_pmi = min_pmi

    def process(self, item, n_tokens: int):
        bigram, count, count_a, count_b = item
        score = pmi(count, count_a, count_b, n_tokens)
        if score < self._min_pmi:
            self._counter[dropped("below_min_pmi")] += 1
        else:
            self._counter[counters_lib.KEPT] += 1
            yield bigram, score, count


class ScoreBigrams(beam.PTransform):
    """Bigram and unigram totals -> ``(bigram, pmi, count)`` kept at both thresholds.

    PMI needs ``count(a)`` and ``count(b)``: two ``CoGroupByKey`` joins (by first word, then by
    second word) bring them to each bigram without holding the vocabulary in memory.
    """

    def __init__(self, *, min_count: int, min_pmi: float):
        super().__init__()
        self._min_count = min_count
        self._min_pmi = min_pmi

    def expand(self, inputs):
        unigrams, bigrams = inputs[UNIGRAMS], inputs[BIGRAMS]
        n_tokens = unigrams | "Tokens" >> beam.Values() | "N" >> beam.CombineGlobally(sum)
        pre = bigrams | "Prefilter" >> beam.ParDo(
            _PrefilterBigramsFn(self._min_count)
        ).with_outputs(beam_utils.COUNTS, main="kept")
        # Words rarer than min_count cannot be part of a kept bigram.
        vocab = unigrams | "Vocab" >> beam.Filter(lambda kv, m: kv[1] >= m, self._min_count)
        by_first = pre.kept | "KeyFirst" >> beam.Map(lambda kv: (kv[0].partition(" ")[0], kv))
        with_a = (
            {"bi": by_first, "uni": vocab}
            | "JoinFirst" >> beam.CoGroupByKey()
            | "AttachFirst" >> beam.FlatMap(_attach_first)
        )
        with_ab = (
            {"bi": with_a, "uni": vocab}
            | "JoinSecond" >> beam.CoGroupByKey()
            | "AttachSecond" >> beam.FlatMap(_attach_second)
        )
        scored = with_ab | "PMI" >> beam.ParDo(
            _ScoreBigramsFn(self._min_pmi), beam.pvalue.AsSingleton(n_tokens)
        ).with_outputs(beam_utils.COUNTS, main="kept")
        counts = (pre[beam_utils.COUNTS], scored[beam_utils.COUNTS]) | beam.Flatten()
        return {"kept": scored.kept, beam_utils.COUNTS: counts, "n_tokens": n_tokens}


class _SumPageviewsFn(beam.DoFn):
    """One pageview file -> ``(title, views)`` summed within the file; lines counted."""

    def __init__(self, projects: Sequence[str]):
        self._projects = tuple(projects)

    def process(self, path: str):
        counter: collections.Counter = collections.Counter()
        views = sum_pageviews(read_lines(path), projects=self._projects, counter=counter)
        yield from views.items()
        yield from beam_utils.emit_counts(_in_scope(PAGEVIEW_LINES, counter))


class _ThresholdTitlesFn(_BundleCountsFn):
    scope = TITLES

    def __init__(self, min_views: int):
        self._min_views = min_views

    def process(self, item: tuple[str, int]):
        self._counter[counters_lib.INPUT] += 1
        if item[1] < self._min_views:
            self._counter[dropped("below_min_views")] += 1
        else:
            self._counter[counters_lib.KEPT] += 1
            yield item


class SumPageviews(beam.PTransform):
    """Pageview files -> ``(canonical title, total views)`` for titles at ``>= min_views``."""

    def __init__(self, *, files: Sequence[str], projects: Sequence[str], min_views: int):
        super().__init__()
        if not files:
            raise WitError("no pageview files")
        self._files = list(files)
        self._projects = tuple(projects)
        self._min_views = min_views

    def expand(self, pbegin):
        per_file = (
            pbegin
            | "Files" >> beam.Create(self._files)
            | "Shuffle" >> beam.Reshuffle()
            | "SumFile"
            >> beam.ParDo(_SumPageviewsFn(self._projects)).with_outputs(
                beam_utils.COUNTS, main="views"
            )
        )
        totals = per_file.views | "SumTitles" >> beam.CombinePerKey(sum)
        kept = totals | "Threshold" >> beam.ParDo(_ThresholdTitlesFn(self._min_views)).with_outputs(
            beam_utils.COUNTS, main="kept"
        )
        counts = (per_file[beam_utils.COUNTS], kept[beam_utils.COUNTS]) | beam.Flatten()
        return {"kept": kept.kept, beam_utils.COUNTS: counts}


# ---------------------------------------------------------------------------------------------
# Candidate files and the counting pipeline


def write_candidates(path: str, rows: Iterable[Sequence[Any]]) -> int:
    """Write tab-separated rows (query first) to a gzip file; returns the number of rows."""
    n = 0
    with (
        fileio.atomic_write(path, "wb") as f,
        gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as g,
    ):
        for row in rows:
            g.write(("\t".join(_fmt(v) for v in row) + "\n").encode("utf-8"))
            n += 1
    return n


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)


def read_candidates(path: str) -> list[list[str]]:
    return [line.split("\t") for line in read_lines(path) if line]


class WriteCandidates(beam.PTransform):
    """Collect rows, sort them (strongest first) and write one gzip TSV file.

    Candidate lists are small (a few million rows at most: every kept row already passed a
    threshold), so one worker writes them in a deterministic order.
    """

    def __init__(self, path: str, *, sort_key):
        super().__init__()
        self._path = path
        self._sort_key = sort_key

    def expand(self, pcoll):
        return (
            pcoll
            | "ToList" >> beam.combiners.ToList()
            | "Write"
            >> beam.Map(
                lambda rows, p, k: write_candidates(p, sorted(rows, key=k)),
                self._path,
                self._sort_key,
            )
        )


def run_counting_pipeline(
    *,
    dump_files: Sequence[str],
    pageview_files: Sequence[str],
    cfg: QueriesConfig,
    text_files: Sequence[str] = (),
    work_dir: str,
    beam_args: Sequence[str] = (),
    fingerprint: str = "",
    max_keys: int = 2_000_000,
) -> dict[str, Any]:
    """Count the dumps and sum the page views on Beam; write candidate files to ``work_dir``.

    Writes ``unigrams.tsv.gz`` (word, count), ``bigrams.tsv.gz`` (bigram, pmi, count),
    ``titles.tsv.gz`` (title, views) as far as they apply, then ``stats.json`` (counters and
    the fingerprint) last: its presence marks the run complete. ``text_files`` add to the
    bigram counts only: their words enter the PMI's counts and ``N``, not ``unigrams.tsv.gz``.
    """
    options = beam_utils.pipeline_options(beam_args)
    stats_path = fileio.join(work_dir, "stats.json")
    with beam.Pipeline(options=options) as p:
        counts = []
        written: dict[str, Any] = {}  # candidate file name -> PCollection of its row count
        corpora = []  # the bigram corpus: the dumps and the text files
        if dump_files and (cfg.unigrams.enabled or cfg.bigrams.enabled):
            ngrams = p | "CountDumps" >> CountWikipediaNgrams(
                files=dump_files,
                split_bytes=cfg.split_bytes,
                batch_pages=cfg.batch_pages,
                bigrams=cfg.bigrams.enabled,
                max_keys=max_keys,
            )
            counts.append(ngrams[beam_utils.COUNTS])
            corpora.append(ngrams)
            if cfg.unigrams.enabled:
                uni = ngrams[UNIGRAMS] | "SelectUnigrams" >> SelectUnigrams(
                    min_count=cfg.unigrams.min_count, max_chars=cfg.unigrams.max_chars
                )
                counts.append(uni[beam_utils.COUNTS])
                written["unigrams"] = uni["kept"] | "WriteUnigrams" >> WriteCandidates(
                    fileio.join(work_dir, "unigrams.tsv.gz"), sort_key=unigram_sort_key
                )
        if text_files and cfg.bigrams.enabled:
            text = p | "CountText" >> CountTextNgrams(
                files=text_files, batch_paragraphs=TEXT_BATCH_PARAGRAPHS, max_keys=max_keys
            )
            counts.append(text[beam_utils.COUNTS])
            corpora.append(text)
        if corpora and cfg.bigrams.enabled:
            if len(corpora) == 1:
                corpus = corpora[0]
            else:
                corpus = {
                    part: tuple(c[part] for c in corpora)
                    | f"Flatten{part.title()}" >> beam.Flatten()
                    | f"SumCorpus{part.title()}" >> beam.CombinePerKey(sum)
                    for part in (UNIGRAMS, BIGRAMS)
                }
            bi = corpus | "ScoreBigrams" >> ScoreBigrams(
                min_count=cfg.bigrams.min_count, min_pmi=cfg.bigrams.min_pmi
            )
            counts.append(bi[beam_utils.COUNTS])
            written["bigrams"] = bi["kept"] | "WriteBigrams" >> WriteCandidates(
                fileio.join(work_dir, "bigrams.tsv.gz"), sort_key=bigram_sort_key
            )
        if pageview_files and cfg.titles.enabled:
            views = p | "Pageviews" >> SumPageviews(
                files=pageview_files, projects=cfg.titles.projects, min_views=cfg.titles.min_views
            )
            counts.append(views[beam_utils.COUNTS])
            written["titles"] = views["kept"] | "WriteTitles" >> WriteCandidates(
                fileio.join(work_dir, "titles.tsv.gz"), sort_key=title_sort_key
            )
        # The completion marker: its step takes every candidate file's row count as a side
        # input, so it runs only once all of them are written.
        names = sorted(written)
        _ = (
            tuple(counts)
            | "AllCounts" >> beam.Flatten()
            | "Stats" >> beam_utils.SumCounts()
            | "WriteStats"
            >> beam.Map(
                _write_stats_marker,
                stats_path,
                fingerprint,
                names,
                *[beam.pvalue.AsSingleton(written[n]) for n in names],
            )
        )
    return fileio.read_json(stats_path)


def _write_stats_marker(
    counts: dict[str, int], path: str, fingerprint: str, names: list[str], *rows: int
) -> None:
    doc = {
        "counters": counts,
        "fingerprint": fingerprint,
        "rows": dict(zip(names, rows, strict=True)),
    }
    fileio.write_json(path, doc)
