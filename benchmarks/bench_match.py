"""QueryMatcher (Aho-Corasick) vs the naive loop over every query, MetaCLIP semantics.

Both run on the same real LAION captions against the same real-sized 500k-entry query list;
the naive loop is measured on a sample (it costs tens of milliseconds per caption) and both
must return identical results on it. Also reports the automaton's build time and memory.

    .venv/bin/python benchmarks/bench_match.py [--quick] [--queries N] [--naive-captions N]
"""

from __future__ import annotations

import argparse
import gc
import random
import time

import common

from wit_pipeline.captions import clean_caption
from wit_pipeline.match import QueryMatcher, naive_match


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer naive captions and repeats")
    ap.add_argument("--queries", type=int, default=500_000)
    ap.add_argument("--naive-captions", type=int, default=0, help="default 50 (quick: 10)")
    args = ap.parse_args()
    data = common.shared_data()
    n_naive = args.naive_captions or (10 if args.quick else 50)
    repeats = 1 if args.quick else 3

    queries = common.real_sized_queries(data, args.queries)
    captions = [clean_caption(t) for t in common.laion_rows(data)[1] if t]

    gc.collect()
    rss0 = common.rss_bytes()
    t0 = time.perf_counter()
    matcher = QueryMatcher(queries)
    build_s = time.perf_counter() - t0
    gc.collect()
    build_mb = (common.rss_bytes() - rss0) / 2**20

    best = float("inf")
    matched = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = [matcher.match(c) for c in captions]
        best = min(best, time.perf_counter() - t0)
        matched = sum(1 for r in results if r)
    fast_us = best / len(captions) * 1e6

    sample = random.Random(0).sample(captions, n_naive)
    t0 = time.perf_counter()
    naive = [naive_match(c, queries) for c in sample]
    naive_us = (time.perf_counter() - t0) / len(sample) * 1e6
    assert naive == [matcher.match(c) for c in sample], "matcher differs from the naive loop"

    cmd = "benchmarks/bench_match.py" + (" --quick" if args.quick else "")
    print(common.header("Query matching: Aho-Corasick vs naive loop", cmd))
    print(
        f"{len(queries):,} queries (wordfreq English words, Wikipedia vital-article titles, "
        f"frequent caption bigrams); {len(captions):,} real LAION captions "
        f"({matched / len(captions):.1%} match at least one query); the naive loop on a sample "
        f"of {len(sample)}, with identical results.\n"
    )
    print(
        common.table(
            [
                ["naive loop over all queries (baseline)", f"{naive_us:,.0f}", "1x"],
                ["QueryMatcher (pyahocorasick)", f"{fast_us:,.1f}", f"{naive_us / fast_us:,.0f}x"],
            ],
            ["matcher", "µs per caption", "speed-up"],
        )
    )
    print()
    print(
        common.table(
            [[f"{len(queries):,}", f"{build_s:.2f}", f"{build_mb:,.0f}"]],
            ["queries", "automaton build (s)", "automaton memory (MiB, RSS delta)"],
        )
    )


if __name__ == "__main__":
    main()
