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
- ``balance.BalanceSamples``: the Beam transform on FnApiRunner (counting plus the draws),
  reading the samples from Parquet files written before the clock starts, as ``wit balance``
  reads ``wit dedup``'s samples: as dict records (one element per sample, ``ReadFromParquet``)
  and as Arrow tables (``tables=True``: one element per row group of 4,096 samples,
  ``ReadFromParquetBatched``, counted and drawn per table with ``balance_arrays``);
- ``balance.BalanceSampleFiles``: the same over Arrow tables, counted from a second read of
  only the files' ``query_ids`` column, so that the whole read runs fused with the draw
  instead of being materialized between counting and drawing.

The kept counts must agree within binomial noise. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
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


def ours_arrow(tables: list, t: int, seed: int) -> int:
    """The Arrow cores in one process: counts and draws per 4096-row table."""
    from wit_pipeline.stages import balance_arrays as arrays

    dense = np.zeros(0, np.int64)
    for tb in tables:
        c = arrays.count_table(tb)
        dense = np.concatenate([dense, np.zeros(max(0, c.size - dense.size), np.int64)])
        dense[: c.size] += c
    ids = np.flatnonzero(dense)
    del ids
    probs = arrays.Probabilities.from_counts(dense, t)
    draw = balance.Draws(seed, "balance")
    return sum(
        arrays.balance_table(tb, probs, draw, id_field="key", reason="balanced_out").kept.num_rows
        for tb in tables
    )


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


def _save(n, path):
    with open(path, "w") as f:
        f.write(str(n))


def table_of(qids: list[list[int]], offset: int = 0):
    """The same samples as ``records`` as an Arrow table (``samples.SAMPLE_SCHEMA`` columns)."""
    import pyarrow as pa

    keys = [f"{i:032x}" for i in range(offset, offset + len(qids))]
    q = pa.array(qids, pa.list_(pa.int32()))
    pair = pa.StructArray.from_arrays(
        [pa.array(keys), pa.array([f"caption {i}" for i in range(offset, offset + len(qids))]), q],
        names=["uid", "caption", "query_ids"],
    )
    offsets = pa.array(np.arange(len(qids) + 1, dtype=np.int32))
    return pa.table({"key": keys, "query_ids": q, "pairs": pa.ListArray.from_arrays(offsets, pair)})


def _rows(x):
    return x.num_rows if hasattr(x, "num_rows") else 1


def ours_beam(
    qids: list[list[int]],
    t: int,
    seed: int,
    *,
    tables: bool = False,
    batch: int = 4096,
    read_only: bool = False,
    files: bool = False,
) -> tuple[tuple[float, float], int]:
    """``BalanceSamples`` reading the samples from Parquet files (written before the clock
    starts), as ``wit balance`` reads ``wit dedup``'s samples: as Arrow tables of ``batch`` rows
    (``ReadFromParquetBatched``, ``tables=True``) or as dict records (``ReadFromParquet``)."""
    import apache_beam as beam
    import pyarrow.parquet as pq

    from wit_pipeline import beam_utils

    with tempfile.TemporaryDirectory() as tmp:
        for start in range(0, len(qids), 50_000):
            part = table_of(qids[start : start + 50_000], offset=start)
            pq.write_table(part, os.path.join(tmp, f"s{start:09d}.parquet"), row_group_size=batch)
        out = os.path.join(tmp, "n.txt")
        pattern = os.path.join(tmp, "*.parquet")
        start = clock()
        with beam.Pipeline(options=beam_utils.pipeline_options([])) as p:
            cfg = BalanceConfig(t=t, seed=seed)
            if files:  # the samples read twice: query ids for the counts, whole for the draw
                kept = (p | balance.BalanceSampleFiles(file_pattern=pattern, config=cfg))["kept"]
            else:
                if tables:
                    recs = p | beam.io.ReadFromParquetBatched(pattern)
                else:
                    recs = p | beam.io.ReadFromParquet(pattern)
                if read_only:  # the floor: the same pipeline without the balancing
                    kept = recs
                else:
                    kept = (recs | balance.BalanceSamples(config=cfg, tables=tables))["kept"]
            _ = kept | beam.Map(_rows) | beam.CombineGlobally(sum) | beam.Map(_save, out)
        elapsed = since(start)
        with open(out) as f:
            return elapsed, int(f.read())


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) since ``start``. FnApiRunner
    runs its SDK worker in this process, so the CPU time covers the pipeline's work."""
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100,000 records")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--t", type=int, default=None, help="default: n / 50 (20,000 at 1M)")
    ap.add_argument("--no-beam", action="store_true")
    ap.add_argument(
        "--skip-dict-beam", action="store_true", help="leave out Beam over dict records (slow)"
    )
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    n = 100_000 if args.quick else args.n
    t = args.t or max(1, n // 50)
    qids = make_query_ids(n)
    recs = records(qids)

    tables = [table_of(qids[s : s + 4096], offset=s) for s in range(0, n, 4096)]
    start = clock()
    ref_kept = metaclip_reference(qids, t, seed=0)
    t_ref = since(start)
    start = clock()
    pure_kept = ours_pure(recs, t, seed=0)
    t_pure = since(start)
    start = clock()
    arrow_kept = ours_arrow(tables, t, seed=0)
    t_arrow = since(start)
    if arrow_kept != pure_kept:
        print(f"MISMATCH: Arrow core kept {arrow_kept}, dict core {pure_kept}", file=sys.stderr)
        return 1
    rows = [
        ("MetaCLIP reference loop (baseline)", t_ref, ref_kept),
        ("`balance_records` (pure core, dict records)", t_pure, pure_kept),
        ("`balance_arrays.balance_table` (pure core, Arrow tables of 4,096)", t_arrow, arrow_kept),
    ]
    if not args.no_beam:
        floor, read = ours_beam(qids, t, seed=0, tables=True, read_only=True)
        rows.append(
            (
                "Beam, FnApiRunner: only read the Arrow tables and count rows (the floor)",
                floor,
                read,
            )
        )
        for tables, files, label in (
            (
                True,
                True,
                "`BalanceSampleFiles` (Beam, FnApiRunner: counted from a read of the query ids, "
                "drawn over Arrow tables of 4,096 fused with a second read)",
            ),
            (
                True,
                False,
                "`BalanceSamples(tables=True)` (Beam, FnApiRunner, Arrow tables of 4,096, "
                "one read materialized between counting and drawing)",
            ),
            (False, False, "`BalanceSamples` (Beam, FnApiRunner, dict records)"),
        ):
            if tables is False and args.skip_dict_beam:
                continue
            t_beam, beam_kept = ours_beam(qids, t, seed=0, tables=tables, files=files)
            if beam_kept != pure_kept:
                print(f"MISMATCH: Beam kept {beam_kept}, pure core {pure_kept}", file=sys.stderr)
                return 1
            rows.append((label, t_beam, beam_kept))
    sd = (ref_kept * (1 - ref_kept / n)) ** 0.5
    if abs(pure_kept - ref_kept) > 6 * sd * 1.5 + 10:
        print(f"kept counts disagree: {pure_kept} vs {ref_kept}", file=sys.stderr)
        return 1
    print(
        f"Balancing {n:,} records over {N_QUERIES:,} Zipf queries, t={t:,}, "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average (1 min) "
        f"{load0:.1f} at the start and {os.getloadavg()[0]:.1f} at the end\n"
    )
    print(
        "| implementation | wall | CPU | records/s (CPU) | vs baseline (CPU) "
        "| vs baseline (wall) | kept |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (wall, cpu), kept in rows:
        print(
            f"| {name} | {wall:.1f} s | {cpu:.1f} s | {n / cpu:,.0f} | {t_ref[1] / cpu:.2f}x "
            f"| {t_ref[0] / wall:.2f}x | {kept:,} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
