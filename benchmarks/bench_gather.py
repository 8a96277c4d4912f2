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


def _batches(inputs: str, cfg, limit: int = 0) -> list:
    """The input's ``RawBatch`` objects (the first ``limit`` pairs' worth), read once."""
    from wit_pipeline import fileio
    from wit_pipeline.stages.gather.readers import iter_file_batches

    out, n = [], 0
    for p in fileio.expand_inputs([inputs]):
        for b in iter_file_batches(p, cfg=cfg):
            out.append(b)
            n += len(b)
            if limit and n >= limit:
                return out
    return out


def child_core(inputs: str, queries: str, detector: str, out: str) -> None:
    """Per-core rates after set-up (CPU time of this one process): the bare read-and-match
    loop, the per-pair filter (``tests/gather_reference.py``, the implementation before the
    batch version) and ``PairFilter.process``; the last two must agree exactly."""
    import collections

    sys.path.insert(0, os.path.join(common.ROOT, "tests"))
    from gather_reference import reference_process

    from wit_pipeline import fileio
    from wit_pipeline.config import CaptionConfig, GatherConfig
    from wit_pipeline.queries import load_queries
    from wit_pipeline.stages.gather import pairs
    from wit_pipeline.stages.gather.match import QueryMatcher, spacing
    from wit_pipeline.stages.gather.readers import iter_file_batches

    cfg = GatherConfig(captions=CaptionConfig(language_detector=detector))
    paths = fileio.expand_inputs([inputs])
    query_list = load_queries(queries)
    matcher = QueryMatcher(query_list)
    # The baseline engine: pyahocorasick (what QueryMatcher used before ahocorasick-rs).
    automaton = common.pyahocorasick_matcher(query_list).automaton
    rates = {}

    t0 = time.process_time()
    n = 0
    for p in paths:  # the bare loop: read the Parquet files, run pyahocorasick on each caption
        for b in iter_file_batches(p, cfg=cfg):
            for c in b.captions:
                if c:
                    for _ in automaton.iter(spacing(c)):
                        pass
            n += len(b)
    rates["bare"] = n / (time.process_time() - t0)

    flt = pairs.PairFilter(cfg, matcher)
    results = {}
    for name, fn in (("per_pair", lambda b: reference_process(flt, b)), ("batch", flt.process)):
        flt._languages.clear()
        flt._matches.clear()
        counter: collections.Counter = collections.Counter()
        kept = []
        t0 = time.process_time()
        for p in paths:  # what gather_loop does, after its set-up
            for b in iter_file_batches(p, cfg=cfg):
                r = fn(b)
                pairs.add_counts(counter, r)
                kept.append(r.kept)
        deduped = pairs.dedup_candidates(pa_concat(kept))
        pairs.add_counts(counter, deduped)
        rates[name] = n / (time.process_time() - t0)
        results[name] = (deduped.kept, dict(counter))
    assert results["per_pair"][0].equals(results["batch"][0]), "candidates differ"
    assert results["per_pair"][1] == results["batch"][1], "counters differ"
    with open(out, "w") as f:
        json.dump({"rates": rates, "pairs": n}, f)


def pa_concat(tables):
    import pyarrow as pa

    return pa.concat_tables(tables)


# Where the time goes, by the function that spends it (cProfile's own time per function): the
# first category whose (file part, function part) both occur in "file:function" takes it.
_CATEGORIES = [
    ("language ID: fastText model call", [("", "fasttext_pybind.predict")]),
    (
        "language ID: input handling",
        [
            ("captions.py", "detect"),
            ("captions.py", "_ascii"),
            ("FastText.py", ""),
            ("", "findall"),
        ],
    ),
    ("caption cleaning + checks", [("captions.py", ""), ("unicodedata", ""), ("html", "")]),
    (
        "query matching (automaton, spacing)",
        [("match.py", ""), ("", "find_matches"), ("", "sorted")],
    ),
    (
        "URL checks + normalize_url",
        [("urls.py", ""), ("parse.py", ""), ("idna", ""), ("posixpath", "")],
    ),
    ("pair_uid (blake2b)", [("", "blake2b"), ("", "hexdigest"), ("", "encode")]),
    ("reading Parquet", [("tables.py", ""), ("parquet", ""), ("", "to_pylist")]),
    ("pyarrow kernels and tables", [("pyarrow", ""), ("", "pyarrow")]),
]


def _category(file: str, func: str) -> str:
    for name, rules in _CATEGORIES:
        if any(a in file and b in func for a, b in rules):
            return name
    return "other"


def profile_core(inputs: str, queries: str, detector: str, sample: int) -> list[list[str]]:
    """cProfile of the per-pair filter and of the batch filter on the first ``sample`` pairs
    (reading included), their own time summed by category: microseconds per pair."""
    import cProfile
    import pstats

    sys.path.insert(0, os.path.join(common.ROOT, "tests"))
    from gather_reference import reference_process

    from wit_pipeline.config import CaptionConfig, GatherConfig
    from wit_pipeline.queries import load_queries
    from wit_pipeline.stages.gather import pairs
    from wit_pipeline.stages.gather.match import QueryMatcher

    cfg = GatherConfig(captions=CaptionConfig(language_detector=detector))
    flt = pairs.PairFilter(cfg, QueryMatcher(load_queries(queries)))
    columns = {}
    for name, fn in (("per_pair", lambda b: reference_process(flt, b)), ("batch", flt.process)):
        flt._languages.clear()
        flt._matches.clear()
        prof = cProfile.Profile()
        prof.enable()
        n = 0
        for b in _batches(inputs, cfg, sample):
            fn(b)
            n += len(b)
        prof.disable()
        by_cat: dict[str, float] = dict.fromkeys([c for c, _ in _CATEGORIES] + ["other"], 0.0)
        for (file, _, func), (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():
            by_cat[_category(file, func)] += tottime
        total = sum(by_cat.values())
        columns[name] = {c: (t / n * 1e6, t / total) for c, t in by_cat.items()}
        columns[name]["total"] = (total / n * 1e6, 1.0)
    return [
        [cat, *(f"{columns[k][cat][0]:,.1f} ({columns[k][cat][1]:.0%})" for k in columns)]
        for cat in columns["per_pair"]
    ]


def warc_rates(copies: int) -> tuple[list[list[str]], dict]:
    """Pages/s and pairs/s of the gather loop on a WARC file against FastWARC alone reading the
    same file (every record, response blocks read), single process, CPU time."""
    import collections

    from fastwarc.warc import ArchiveIterator

    from wit_pipeline.config import GatherConfig
    from wit_pipeline.stages.gather import pairs
    from wit_pipeline.stages.gather.match import QueryMatcher
    from wit_pipeline.stages.gather.readers import iter_file_batches

    excerpt = common.shared_data() / "warc" / "cc-main-2020-34-excerpt.warc.gz"
    data = excerpt.read_bytes() * copies
    tmp = tempfile.mkdtemp(prefix="wit-bench-warc-")
    try:
        path = os.path.join(tmp, "crawl.warc.gz")
        with open(path, "wb") as f:
            f.write(data)
        queries = common.real_sized_queries(common.shared_data(), 500_000)
        t0 = time.process_time()
        records = pages = 0
        with open(path, "rb") as f:
            for r in ArchiveIterator(f, parse_http=False):
                r.reader.read()
                records += 1
        fast_s = time.process_time() - t0
        cfg = GatherConfig()
        flt = pairs.PairFilter(cfg, QueryMatcher(queries))
        counter: collections.Counter = collections.Counter()
        t0 = time.process_time()  # what gather_loop does after its set-up
        kept = []
        for b in iter_file_batches(path, cfg=cfg, counter=counter):
            r = flt.process(b)
            pairs.add_counts(counter, r)
            kept.append(r.kept)
        pairs.add_counts(counter, pairs.dedup_candidates(pa_concat(kept)))
        loop_s = time.process_time() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pages = counter["warc:html_pages"]
    n_pairs = counter["input"]
    return [
        [
            f"FastWARC ArchiveIterator alone, every record read (baseline; {records:,} records)",
            f"{pages / fast_s:,.0f}",
            f"{n_pairs / fast_s:,.0f}",
            "1.00",
            f"{len(data) / fast_s / 2**20:,.1f}",
        ],
        [
            "gather loop after set-up: read (FastWARC + recovery), parse HTML, filter, dedup",
            f"{pages / loop_s:,.0f}",
            f"{n_pairs / loop_s:,.0f}",
            f"{fast_s / loop_s:.3f}",
            f"{len(data) / loop_s / 2**20:,.1f}",
        ],
    ], dict(counter)


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
    ap.add_argument("--warc-copies", type=int, default=0, help="default 200 (quick: 40)")
    ap.add_argument(
        "--skip-whole", action="store_true", help="only the per-core, profile and WARC tables"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument(
        "--child-loop",
        nargs=4,
        metavar=("INPUTS", "QUERIES", "OUT", "DETECTOR"),
        help=argparse.SUPPRESS,
    )
    ap.add_argument("--child-core", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_loop:
        child_loop(*args.child_loop)
        return
    if args.child_core:
        child_core(*args.child_core)
        return
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    files = args.files or (4 if args.quick else 20)
    detectors = ["fasttext", "none"] if args.detector == "both" else [args.detector]
    copies = args.warc_copies or (40 if args.quick else 200)
    load = [f"{os.getloadavg()[0]:.1f}"]

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
        for det in [] if args.skip_whole else detectors:
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
            load.append(f"{os.getloadavg()[0]:.1f}")
        core = {}
        for det in detectors:
            out = os.path.join(tmp, f"core-{det}.json")
            timed([env_py, __file__, "--child-core", inputs, qpath, det, out])
            with open(out) as f:
                core[det] = json.load(f)
            load.append(f"{os.getloadavg()[0]:.1f}")
        sample = min(rows, 50_000)
        profile = profile_core(inputs, qpath, detectors[0], sample)
        warc, warc_counts = warc_rates(copies)
        load.append(f"{os.getloadavg()[0]:.1f}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    cmd = "benchmarks/bench_gather.py" + (" --quick" if args.quick else "")
    if args.workers:
        cmd += f" --workers {args.workers}"
    print(common.header("Gather: per-core throughput, `wit gather` (Beam) and a plain loop", cmd))
    print(f"`uptime` load average (1 min) during the run: {', '.join(load)}.\n")
    print(
        f"{rows:,} real-shaped LAION captions in {files} Parquet files (distinct captions; "
        f"1% exact duplicate pairs), {args.queries:,} queries.\n"
    )
    print(
        "Per core, after set-up (CPU seconds of one process; automaton and model loading "
        "excluded; outputs of the two filters identical):\n"
    )
    table = []
    for det, r in core.items():
        rates = r["rates"]
        for key, label in (
            ("bare", "bare loop: read Parquet + pyahocorasick over each caption (baseline)"),
            ("per_pair", "gather filter per pair (before; tests/gather_reference.py)"),
            ("batch", "gather filter per Arrow batch (`PairFilter.process`)"),
        ):
            table.append([det, label, f"{rates[key]:,.0f}", f"{rates[key] / rates['bare']:.3f}"])
    print(common.table(table, ["language detector", "run", "pairs/s", "vs bare loop"]))
    print()
    print(
        f"Where the time goes (detector {detectors[0]}, first {sample:,} pairs, reading "
        "included; cProfile's own time per function, by category, µs per pair and share; "
        "cProfile inflates Python-level calls):\n"
    )
    print(common.table(profile, ["category", "per pair (before)", "per batch (now)"]))
    if results:
        print()
        kept = next(r[4] for r in results if r[4])
        print(
            f"Whole processes (start-up, imports, automaton build included); {kept['kept']:,} "
            f"kept, {kept.get('dropped:duplicate', 0):,} duplicates; outputs identical:\n"
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
        f"WARC input: the real Common Crawl excerpt x {copies} "
        f"({warc_counts.get('warc:html_pages', 0):,} HTML pages, "
        f"{warc_counts.get('input', 0):,} image/alt pairs, {warc_counts.get('kept', 0):,} "
        "kept), one process, CPU time:\n"
    )
    print(common.table(warc, ["reader", "pages/s", "pairs/s", "vs FastWARC", "MiB/s (gzip)"]))


if __name__ == "__main__":
    main()
