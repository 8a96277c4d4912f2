"""``wit gather`` on FnApiRunner vs a plain single-process Python loop doing the same work.

Input: ``--rows`` real-shaped captions (default 1M) derived from the 10,000 real LAION rows:
every copy gets its own image URL and a lightly perturbed caption (a word dropped, repeated or
swapped, seeded), 1% are exact duplicates of earlier rows; written as LAION-style Parquet files
(``URL``, ``TEXT``). Queries: a real-sized 500k list. Both contenders parse the Parquet files,
clean, filter by length and language, match the queries, deduplicate and write candidates and
rejected pairs; both are timed from process start to exit (interpreter, imports, automaton and
model loading included), and their outputs must be identical.

The baseline loop is ``pairs.gather_loop`` (the pure per-batch core in a ``for`` loop) plus
writing its tables. A second table shows where the loop's time goes, component by component.

    .venv/bin/python benchmarks/bench_gather.py [--quick] [--rows N] [--files N]
        [--detector fasttext|none|langdetect|both] [--workers N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import common

HERE = os.path.dirname(os.path.abspath(__file__))


def perturb(words: list[str], rng: random.Random, pool: list[str]) -> list[str]:
    """One seeded edit of a caption's words: drop, repeat or swap a word, or insert one from
    another real caption."""
    words = list(words)
    op = rng.randrange(4)
    if op == 3 or len(words) < 3:
        words.insert(rng.randrange(len(words) + 1), rng.choice(pool))
        return words
    k = rng.randrange(len(words) - 1)
    if op == 0:
        del words[k]
    elif op == 1:
        words.insert(k, words[k])
    else:
        words[k], words[k + 1] = words[k + 1], words[k]
    return words


def build_inputs(directory: str, rows: int, files: int, seed: int = 0) -> None:
    """``rows`` LAION-shaped pairs: copies of the real rows with their own URLs and captions
    edited (``perturb``) until every caption is new, so that the input holds ``rows`` distinct
    captions apart from the 1% exact duplicate pairs (a real crawl's repeated alt texts are not
    modelled: no cache can help more here than it would on distinct text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    urls, texts = common.laion_rows(common.shared_data())
    base = [(u, t) for u, t in zip(urls, texts, strict=True) if u and t]
    pool = [w for _, t in base for w in t.split()]
    rng = random.Random(seed)
    seen: set[str] = set()
    out_u: list[str] = []
    out_t: list[str] = []
    for i in range(rows):
        if out_u and rng.random() < 0.01:  # an exact duplicate of an earlier pair
            j = rng.randrange(len(out_u))
            out_u.append(out_u[j])
            out_t.append(out_t[j])
            continue
        u, t = base[i % len(base)]
        copy = i // len(base)
        if copy:
            head, _, name = u.rpartition("/")
            u = f"{head}/{copy}-{name}"
        words = t.split()
        while t in seen:
            words = perturb(words, rng, pool)
            t = " ".join(words)
        seen.add(t)
        out_u.append(u)
        out_t.append(t)
    per = -(-rows // files)
    for f in range(files):
        part = slice(f * per, min(rows, (f + 1) * per))
        table = pa.table({"URL": out_u[part], "TEXT": out_t[part]})
        pq.write_table(table, os.path.join(directory, f"laion-{f:04d}.parquet"))


def child_loop(inputs: str, queries: str, out: str, detector: str) -> None:
    """The baseline: one process, a plain loop over the pure core, then write the tables."""
    import pyarrow.parquet as pq

    from wit_pipeline import fileio, stage
    from wit_pipeline.config import CaptionConfig, GatherConfig
    from wit_pipeline.queries import load_queries
    from wit_pipeline.stages.gather import pairs

    cfg = GatherConfig(captions=CaptionConfig(language_detector=detector))
    paths = fileio.expand_inputs([inputs])
    cand, rej, counter = pairs.gather_loop(paths, config=cfg, query_list=load_queries(queries))
    os.makedirs(out, exist_ok=True)
    pq.write_table(cand, os.path.join(out, "candidates.parquet"), compression="zstd")
    pq.write_table(rej, os.path.join(out, "rejected.parquet"), compression="zstd")
    doc = stage.stats_document(counter, sections=pairs.STATS_SECTIONS)
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump({"counters": doc["counters"]}, f)


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return elapsed


def same_output(loop_out: str, pipe_out: str) -> dict:
    import pyarrow.parquet as pq

    a = pq.read_table(os.path.join(loop_out, "candidates.parquet"))
    b = pq.read_table(os.path.join(pipe_out, "candidates")).sort_by("uid")
    assert a.equals(b), "pipeline candidates differ from the loop's"
    with open(os.path.join(loop_out, "stats.json")) as f:
        ca = json.load(f)["counters"]
    with open(os.path.join(pipe_out, "stats.json")) as f:
        cb = json.load(f)["counters"]
    assert ca == cb, (ca, cb)
    return cb


def profile_loop(inputs: str, queries: str, detector: str, sample: int) -> list[list[str]]:
    """Time each component of the per-pair work, in isolation, on the first ``sample`` pairs."""

    import pyarrow as pa

    from wit_pipeline import fileio, urls
    from wit_pipeline.config import CaptionConfig, GatherConfig
    from wit_pipeline.queries import load_queries
    from wit_pipeline.stages.gather import captions, pairs
    from wit_pipeline.stages.gather.match import QueryMatcher
    from wit_pipeline.stages.gather.readers import iter_file_batches

    cfg = GatherConfig(captions=CaptionConfig(language_detector=detector))
    paths = fileio.expand_inputs([inputs])
    t0 = time.perf_counter()
    batches = []
    n = 0
    for p in paths:
        for b in iter_file_batches(p, cfg=cfg):
            batches.append(b)
            n += len(b)
            if n >= sample:
                break
        if n >= sample:
            break
    read_s = time.perf_counter() - t0
    url_l = [u for b in batches for u in b.urls]
    cap_l = [c for b in batches for c in b.captions]
    times: dict[str, float] = {}

    def t(name, fn):
        t0 = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t0
        return out

    checked = t("URL check + normalize_url", lambda: [pairs.check_url(u) for u in url_l])
    cleaned = t("clean_caption", lambda: [captions.clean_caption(c or "") for c in cap_l])
    t("check_caption (lengths)", lambda: [captions.check_caption(c, cfg.captions) for c in cleaned])
    det = captions.make_detector(cfg.captions)
    t(f"language detection ({detector})", lambda: [det.detect(c) for c in cleaned])
    matcher = QueryMatcher(load_queries(queries))
    t("QueryMatcher.match", lambda: [matcher.match(c) for c in cleaned])
    t(
        "pair_uid (blake2b)",
        lambda: [urls.pair_uid(u or "", c) for (u, _), c in zip(checked, cleaned, strict=True)],
    )
    flt = pairs.PairFilter(cfg, matcher, det)
    t0 = time.perf_counter()
    kept = [flt.process(b).kept for b in batches]
    whole = time.perf_counter() - t0
    t0 = time.perf_counter()
    pairs.dedup_candidates(pa.concat_tables(kept))
    dedup = time.perf_counter() - t0
    total = read_s + whole + dedup
    rows = [
        ["read Parquet (iter_file_batches)", read_s],
        ["PairFilter.process, all steps together", whole],
        *[[f"  {name} (timed alone)", s] for name, s in times.items()],
        ["dedup_candidates (Arrow sort + mask)", dedup],
    ]
    return [[name, f"{s / n * 1e6:,.1f}", f"{s / total:.0%}"] for name, s in rows] + [
        ["total (read + process + dedup)", f"{total / n * 1e6:,.1f}", "100%"]
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="100k rows in 4 files")
    ap.add_argument("--rows", type=int, default=0, help="default 1,000,000")
    ap.add_argument("--files", type=int, default=0, help="default 20 (quick: 4)")
    ap.add_argument(
        "--detector", default="both", choices=["fasttext", "none", "langdetect", "both"]
    )
    ap.add_argument(
        "--workers", type=int, default=0, help="also run FnApiRunner with N worker processes"
    )
    ap.add_argument("--queries", type=int, default=500_000)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument(
        "--child-loop",
        nargs=4,
        metavar=("INPUTS", "QUERIES", "OUT", "DETECTOR"),
        help=argparse.SUPPRESS,
    )
    args = ap.parse_args()
    if args.child_loop:
        child_loop(*args.child_loop)
        return
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    files = args.files or (4 if args.quick else 20)
    detectors = ["fasttext", "none"] if args.detector == "both" else [args.detector]

    tmp = tempfile.mkdtemp(prefix="wit-bench-gather-")
    try:
        inputs = os.path.join(tmp, "inputs")
        os.makedirs(inputs)
        build_inputs(inputs, rows, files)
        qpath = os.path.join(tmp, "queries.txt.gz")
        with gzip.open(qpath, "wt", encoding="utf-8") as f:
            f.write("\n".join(common.real_sized_queries(common.shared_data(), args.queries)))
        env_py = sys.executable
        results = []
        for det in detectors:
            loop_out = os.path.join(tmp, f"loop-{det}")
            loop_s = timed([env_py, __file__, "--child-loop", inputs, qpath, loop_out, det])
            runs = [("FnApiRunner, 1 process", [])]
            if args.workers:
                runs.append(
                    (
                        f"FnApiRunner, {args.workers} processes",
                        [
                            f"--direct_num_workers={args.workers}",
                            "--direct_running_mode=multi_processing",
                        ],
                    )
                )
            results.append((det, "plain Python loop, 1 process (baseline)", loop_s, loop_s, None))
            for label, extra in runs:
                out = os.path.join(tmp, f"pipe-{det}-{len(extra)}")
                cmd = [
                    env_py,
                    "-m",
                    "wit_pipeline",
                    "gather",
                    "--input",
                    inputs,
                    "--queries",
                    qpath,
                    "--output",
                    out,
                    "--quiet",
                    "--set",
                    f"gather.captions.language_detector={det}",
                    *extra,
                ]
                s = timed(cmd)
                counters = same_output(loop_out, out)
                results.append((det, f"`wit gather`, {label}", s, loop_s, counters))
        profile = profile_loop(inputs, qpath, detectors[0], min(rows, 50_000))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    cmd = "benchmarks/bench_gather.py" + (" --quick" if args.quick else "")
    if args.workers:
        cmd += f" --workers {args.workers}"
    print(common.header("Gather: `wit gather` (Beam) vs a plain Python loop", cmd))
    kept = next(r[4] for r in results if r[4])
    print(
        f"{rows:,} real-shaped LAION captions in {files} Parquet files, {args.queries:,} queries; "
        f"{kept['kept']:,} kept, {kept.get('dropped:duplicate', 0):,} duplicates. Times are "
        "whole processes (start-up, imports, automaton build included); outputs identical.\n"
    )
    table = []
    for det, label, s, loop_s, _ in results:
        table.append([det, label, f"{s:,.1f}", f"{rows / s:,.0f}", f"{loop_s / s:.2f}"])
    print(
        common.table(
            table, ["language detector", "run", "seconds", "pairs/s", "throughput vs loop"]
        )
    )
    print()
    print(
        f"Where the loop's time goes (detector {detectors[0]}, first "
        f"{min(rows, 50_000):,} pairs, each component timed alone):\n"
    )
    print(common.table(profile, ["component", "µs per pair", "share"]))


if __name__ == "__main__":
    main()
