"""Balancing throughput: MetaCLIP's reference loop vs ours (pure core and Beam).

    python benchmarks/bench_balance.py            # 1,000,000 records
    python benchmarks/bench_balance.py --quick    # 100,000 records

Records match 1-4 of 500,000 queries drawn from a Zipf law (exponent 1.1), like captions matched
against MetaCLIP's 500k entries: a few head queries match a large share of the pool. Three
implementations of the same sampling (count per query, ``p = min(1, t / c)``, keep with
``1 - prod(1 - p)``), timed on the same records:

- baseline: MetaCLIP's ``balancing.py`` loop (count with a Python loop, then
  ``any(random.random() < p[e] for e in entries)`` per record; not reproducible across runs);
- ``balance.balance_records``: our pure core (seeded keyed-hash draw per record, reproducible);
- ``balance.BalanceSamples``: the Beam transform on FnApiRunner (counting with CombinePerKey
  plus the draws), records generated inside the pipeline.

The kept counts must agree within binomial noise. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import pickle
import platform
import random
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wit_pipeline.config import BalanceConfig  # noqa: E402
from wit_pipeline.stages import balance  # noqa: E402

N_QUERIES = 500_000


def make_query_ids(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n)
    flat = (rng.zipf(1.1, int(sizes.sum())) - 1) % N_QUERIES
    out, pos = [], 0
    for s in sizes.tolist():
        out.append(sorted(set(flat[pos : pos + s].tolist())))
        pos += s
    return out


def records(qids: list[list[int]], offset: int = 0) -> list[dict]:
    return [
        {
            "key": f"{i:032x}",
            "query_ids": q,
            "pairs": [{"uid": f"{i:032x}", "caption": f"caption {i}", "query_ids": q}],
        }
        for i, q in enumerate(qids, start=offset)
    ]


def metaclip_reference(qids: list[list[int]], t: int, seed: int) -> int:
    """MetaCLIP's balancing.py, as written there (numpy counts, random.random draws)."""
    entry_count = np.zeros(N_QUERIES, dtype=np.uint64)
    for entries in qids:
        for e in entries:
            entry_count[e] += 1
    entry_count[entry_count < t] = t
    entry_prob = t / entry_count
    random.seed(seed)
    kept = 0
    for entries in qids:
        if any(random.random() < entry_prob[e] for e in entries):
            kept += 1
    return kept


def ours_pure(recs: list[dict], t: int, seed: int) -> int:
    counts = balance.count_queries(recs)
    result = balance.balance_records(
        recs,
        balance.query_probabilities(counts, t),
        seed=seed,
        phase="balance",
        id_field="key",
        reason="balanced_out",
    )
    return len(result.kept)


def _gen(item, path):
    start, stop = item
    with open(path, "rb") as f:
        qids = pickle.load(f)
    yield from records(qids[start:stop], offset=start)


def _save(n, path):
    with open(path, "w") as f:
        f.write(str(n))


def ours_beam(qids: list[list[int]], t: int, seed: int) -> tuple[float, int]:
    import apache_beam as beam

    from wit_pipeline import beam_utils

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "q.pkl")
        with open(src, "wb") as f:
            pickle.dump(qids, f)
        out = os.path.join(tmp, "n.txt")
        chunks = [(s, min(len(qids), s + 50_000)) for s in range(0, len(qids), 50_000)]
        start = time.perf_counter()
        with beam.Pipeline(options=beam_utils.pipeline_options([])) as p:
            recs = p | beam.Create(chunks) | beam.FlatMap(_gen, src)
            res = recs | balance.BalanceSamples(config=BalanceConfig(t=t, seed=seed))
            _ = res["kept"] | beam.combiners.Count.Globally() | beam.Map(_save, out)
        elapsed = time.perf_counter() - start
        with open(out) as f:
            return elapsed, int(f.read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100,000 records")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--t", type=int, default=None, help="default: n / 50 (20,000 at 1M)")
    ap.add_argument("--no-beam", action="store_true")
    args = ap.parse_args()
    n = 100_000 if args.quick else args.n
    t = args.t or max(1, n // 50)
    qids = make_query_ids(n)
    recs = records(qids)

    start = time.perf_counter()
    ref_kept = metaclip_reference(qids, t, seed=0)
    t_ref = time.perf_counter() - start
    start = time.perf_counter()
    pure_kept = ours_pure(recs, t, seed=0)
    t_pure = time.perf_counter() - start
    rows = [
        ("MetaCLIP reference loop (baseline)", t_ref, ref_kept),
        ("`balance_records` (pure core)", t_pure, pure_kept),
    ]
    if not args.no_beam:
        t_beam, beam_kept = ours_beam(qids, t, seed=0)
        if beam_kept != pure_kept:
            print(f"MISMATCH: Beam kept {beam_kept}, pure core {pure_kept}", file=sys.stderr)
            return 1
        rows.append(("`BalanceSamples` (Beam, FnApiRunner)", t_beam, beam_kept))
    sd = (ref_kept * (1 - ref_kept / n)) ** 0.5
    if abs(pure_kept - ref_kept) > 6 * sd * 1.5 + 10:
        print(f"kept counts disagree: {pure_kept} vs {ref_kept}", file=sys.stderr)
        return 1
    print(
        f"Balancing {n:,} records over {N_QUERIES:,} Zipf queries, t={t:,}, "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}\n"
    )
    print("| implementation | time | records/s | vs baseline | kept |")
    print("|---|---|---|---|---|")
    for name, secs, kept in rows:
        print(f"| {name} | {secs:.1f} s | {n / secs:,.0f} | {t_ref / secs:.2f}x | {kept:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
