"""Query-list builder throughput on the real Wikipedia dump excerpt (gensim's 206 pages).

Measures, in one run and on the same file, pages/s and compressed MB/s of:
  - the baseline: a plain Python loop over the whole file (decompress, parse, clean, tokenize,
    count unigrams and bigrams), single process;
  - its stages alone (decompress + parse; + wikitext cleaning);
  - the Beam counting transform (``CountWikipediaNgrams`` + PMI scoring) on FnApiRunner over a
    multistream copy of the file split into byte ranges, as Dataflow would run it.
Every figure is also given as a ratio to the baseline. Prints a Markdown table and the sizing of
a full English Wikipedia run derived from the measured Beam marginal cost, scaled by tokens,
compressed bytes and articles, with the distinct bigrams extrapolated from their growth on the
excerpt (an estimate, not a Dataflow run).

    python benchmarks/bench_querybuild.py [--quick] [--repeat N]
"""

from __future__ import annotations

import argparse
import bz2
import collections
import math
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from wit_pipeline.queries import default, ngrams, pipeline, wikipedia

# English Wikipedia pages-articles, all current articles compressed: about 22.14 GB
# (Wikipedia:Size of Wikipedia, 2 July 2023).
FULL_DUMP_MB = 22_140
# About 6.9 M articles and 4.5 billion words (Wikipedia:Size of Wikipedia, April 2024).
FULL_DUMP_ARTICLES = 6_900_000
FULL_DUMP_TOKENS = 4_500_000_000


def multistream_copy(src: str, dst: str, pages_per_stream: int = 100, times: int = 1) -> None:
    """Recompress ``src`` as a multistream dump; ``times`` > 1 repeats its pages."""
    with open(src, "rb") as f:
        xml = bz2.decompress(f.read())
    first, footer = xml.find(b"  <page>"), xml.rfind(b"</mediawiki>")
    xml = xml[:first] + xml[first:footer] * times + xml[footer:]
    with open(dst, "wb") as f:
        f.write(wikipedia.multistream_bytes(xml, pages_per_stream=pages_per_stream))


def best_of(repeat: int, fn) -> float:
    """Least CPU time of the process over ``repeat`` runs (FnApiRunner's threads included):
    robust to other work on a shared machine, unlike wall time."""
    times = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times)


def plain_parse(path: str) -> None:
    for page in wikipedia.iter_pages(path):
        wikipedia.page_reason(page)


def plain_clean(path: str) -> None:
    for page in wikipedia.iter_pages(path):
        if wikipedia.page_reason(page) is None:
            wikipedia.clean_wikitext(page.text)


def plain_count(path: str):
    uni, bi, c = collections.Counter(), collections.Counter(), collections.Counter()
    wikipedia.count_pages(wikipedia.iter_pages(path), uni, bi, c)
    return uni, bi, c["tokens"]


def plain_pmi(uni, bi, n_tokens) -> None:
    ngrams.score_bigrams(bi, uni, n_tokens, min_count=5, min_pmi=8.0, counter=collections.Counter())


def beam_count(path: str, split_bytes: int) -> None:
    import apache_beam as beam

    from wit_pipeline import beam_utils

    with beam.Pipeline(options=beam_utils.pipeline_options([])) as p:
        counted = p | pipeline.CountWikipediaNgrams(
            files=[path], split_bytes=split_bytes, batch_pages=32
        )
        _ = counted | pipeline.ScoreBigrams(min_count=5, min_pmi=8.0)


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def bigram_growth(path: str) -> tuple[float, int, int]:
    """Least-squares exponent of distinct bigrams against tokens over the excerpt's articles
    (after the first quarter), and the final token and distinct-bigram counts."""
    uni: collections.Counter = collections.Counter()
    bi: collections.Counter = collections.Counter()
    points = []
    n = 0
    for page in wikipedia.iter_pages(path):
        if wikipedia.page_reason(page) is None:
            n += ngrams.count_ngrams([wikipedia.clean_wikitext(page.text)], uni, bi)
            points.append((math.log(n), math.log(len(bi))))
    points = points[len(points) // 4 :]
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return slope, n, len(bi)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one repetition of each measurement")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    repeat = 1 if args.quick else args.repeat
    src = default.gensim_dump_path()
    pages = sum(1 for _ in wikipedia.iter_page_fragments(src))
    articles = sum(1 for p in wikipedia.iter_pages(src) if wikipedia.page_reason(p) is None)
    mb = os.path.getsize(src) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        ms1 = os.path.join(tmp, "enwiki-1x-pages-articles-multistream.xml.bz2")
        ms4 = os.path.join(tmp, "enwiki-4x-pages-articles-multistream.xml.bz2")
        multistream_copy(src, ms1, pages_per_stream=20)
        multistream_copy(src, ms4, pages_per_stream=20, times=4)
        uni, bi, n_tokens = plain_count(src)
        pmi_secs = best_of(repeat, lambda: plain_pmi(uni, bi, n_tokens))
        results = [
            (
                "plain loop: decompress + parse + clean + count (baseline)",
                best_of(repeat, lambda: plain_count(src)),
            ),
            ("plain loop: decompress + parse only", best_of(repeat, lambda: plain_parse(src))),
            ("plain loop: decompress + parse + clean", best_of(repeat, lambda: plain_clean(src))),
        ]
        beam1 = best_of(repeat, lambda: beam_count(ms1, os.path.getsize(ms1) // 4 + 1))
        beam4 = best_of(repeat, lambda: beam_count(ms4, os.path.getsize(ms4) // 4 + 1))
    base = results[0][1]
    # Beam's fixed start-up cost cancels out in the difference between 4x and 1x the input.
    beam_marginal = (beam4 - beam1) / 3
    results.append(("Beam FnApiRunner, 4 byte ranges, 1x input (incl. start-up)", beam1))
    results.append(("Beam FnApiRunner, 4 byte ranges, 4x input (incl. start-up)", beam4 / 4))
    results.append(("Beam FnApiRunner, marginal cost per 1x ((4x - 1x) / 3)", beam_marginal))
    print(
        f"Dump excerpt: {pages} pages ({articles} articles), {mb:.2f} MB bz2; CPU seconds, "
        f"best of {repeat}; {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}\n"
    )
    print("| run | CPU s per excerpt | pages/s | compressed MB/s | vs baseline |")
    print("|---|---:|---:|---:|---:|")
    for name, secs in results:
        print(
            f"| {name} | {secs:.2f} | {pages / secs:,.0f} | {mb / secs:.2f} | {base / secs:.2f}x |"
        )
    print()
    print(
        f"PMI scoring, plain loop: {len(bi):,} distinct bigrams in {pmi_secs:.2f} CPU s "
        f"({len(bi) / pmi_secs:,.0f} bigrams/s); it scales with distinct bigrams, not bytes."
    )
    print()
    print(
        f"Full English Wikipedia (~{FULL_DUMP_ARTICLES:,} articles, ~{FULL_DUMP_TOKENS:,} "
        f"tokens, ~{FULL_DUMP_MB:,} MB bz2), Beam marginal cost scaled by (an estimate):"
    )
    print("| scaled by | arithmetic | core-hours | n2-standard-4 workers for 1 h |")
    print("|---|---|---:|---:|")
    for name, rate, unit, total in (
        ("tokens", n_tokens / beam_marginal, "tokens/s", FULL_DUMP_TOKENS),
        ("compressed bytes", mb / beam_marginal, "MB/s", FULL_DUMP_MB),
        ("articles (upper bound)", articles / beam_marginal, "articles/s", FULL_DUMP_ARTICLES),
    ):
        secs = total / rate
        print(
            f"| {name} | {total:,} / {_rate(rate)} {unit} = {secs:,.0f} s | {secs / 3600:,.1f} "
            f"| {math.ceil(secs / 3600 / 4):,} |"
        )
    slope, toks, distinct = bigram_growth(src)
    full = distinct * (FULL_DUMP_TOKENS / toks) ** slope
    print()
    print(
        f"Distinct bigrams grow as tokens^{slope:.2f} on the excerpt ({distinct:,} at {toks:,} "
        f"tokens): {distinct:,} x ({FULL_DUMP_TOKENS:,} / {toks:,})^{slope:.2f} = "
        f"{full / 1e9:.2f} billion at the full dump; PMI at the measured rate: "
        f"{full / (len(bi) / pmi_secs) / 3600:.2f} core-hours (shuffles not included)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
