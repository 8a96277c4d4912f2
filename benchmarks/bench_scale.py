"""Scale: gather, pre-balance, dedup grouping and balance over N candidate pairs, with the
throughput of each step and the peak memory of each worker process.

    python benchmarks/bench_scale.py                 # N = 1M and 3M
    python benchmarks/bench_scale.py --sizes 10000000 --workers 2

Input: N pairs, real LAION alt texts (``../shared/data/laion-sample``) recombined (two real
captions' halves joined, so that the text is real-shaped but mostly new) with synthetic image
URLs spread over 100,000 hosts, written as LAION-style Parquet files of 100,000 rows. Each step
runs as its own process on FnApiRunner with separate worker processes
(``--direct_num_workers=W --direct_running_mode=multi_processing``), as ``wit build`` runs its
steps:

1. ``wit gather`` (default fastText language ID, a real-sized 500k query list);
2. ``wit balance --pre`` (Arrow tables, ``balance.PreBalance(tables=True)``);
3. dedup grouping: the download is replaced by a generator that makes one image record per URL
   of the pre-balanced candidates (sizes, ``sha256``, and a pHash drawn from the URL's hash,
   with planted near-duplicate groups: 10% of the images fall into groups of about 5 whose
   hashes differ by 0-3 bits), then ``dedup.DedupRecords`` (LSH banding, label propagation,
   collapse) and the samples written as ``wit dedup`` writes them (``samples/*.parquet``);
4. balance: the samples read back as Arrow tables, ``balance.BalanceSamples(tables=True)``.

With ``--runner dask`` each step starts a local Dask cluster of ``--workers`` processes instead,
with one partition per ``--pairs-per-partition`` pairs (``--dask_npartitions``). Every size is
checked to be exact: each step's records balance (``check_counts``), or the run stops.

For every step: records in, wall seconds, CPU seconds of all its processes, records per wall
second and per CPU second (per core), and the peak resident memory (``VmHWM``) of the launcher
process (FnApiRunner keeps data between stages there) and of the largest worker process. The
machine is shared: CPU seconds are the steadier measure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import common

HOSTS = 100_000
ROWS_PER_FILE = 100_000


def generate(directory: str, n: int, seed: int = 0) -> None:
    """``n`` pairs in Parquet files of ``ROWS_PER_FILE`` rows (``URL``, ``TEXT``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, texts = common.laion_rows(common.shared_data())
    words = [t.split() for t in texts if t and len(t.split()) >= 2]
    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    for f, start in enumerate(range(0, n, ROWS_PER_FILE)):
        stop = min(n, start + ROWS_PER_FILE)
        urls, caps = [], []
        for i in range(start, stop):
            a, b = rng.choice(words), rng.choice(words)
            caps.append(" ".join(a[: max(1, len(a) // 2)] + b[len(b) // 2 :]))
            host = rng.randrange(HOSTS)
            urls.append(f"https://img{host % 7}.host{host}.example/p/{i // 1000}/{i}.jpg")
        pq.write_table(
            pa.table({"URL": urls, "TEXT": caps}),
            os.path.join(directory, f"part-{f:05d}.parquet"),
            compression="zstd",
        )


# ---------------------------------------------------------------------------------------------
# Steps 3 and 4 as pipelines of their own (run in a child process)


def _h(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest(), "big")


def image_records(table):
    """One synthetic downloaded-image record per URL of a candidates table (the download's
    shape: key, url, sizes, sha256, pairs, query_ids, phash, source_tar)."""
    from wit_pipeline import urls as urls_lib

    by_url: dict[str, list] = {}
    for r in table.to_pylist():
        by_url.setdefault(r["url"], []).append(r)
    for url, rows in by_url.items():
        key = urls_lib.url_uid(url)
        h = _h("phash", key)
        if h % 10 == 0:  # a planted near-duplicate group of about 5 images
            group = (h // 10) % max(1, _GROUPS[0])
            base = _h("group", str(group))
            flips = [(h >> (8 + 6 * j)) & 63 for j in range((h >> 4) % 4)]
            phash = base
            for bit in flips:
                phash ^= 1 << bit
        else:
            phash = h
        side = 128 + (h >> 20) % 256
        pairs = [
            {
                "uid": r["uid"],
                "caption": r["caption"],
                "query_ids": list(r["query_ids"] or []),
                "language": r.get("language"),
                "page_url": r.get("page_url"),
                "source": r.get("source"),
            }
            for r in rows
        ]
        yield {
            "key": key,
            "url": url,
            "source_tar": "synthetic.tar",
            "image_ext": "jpg",
            "width": side,
            "height": side,
            "original_width": side * 2,
            "original_height": side * 2,
            "sha256": f"{_h('sha', key):016x}",
            "pairs": pairs,
            "query_ids": sorted({q for p in pairs for q in p["query_ids"]}),
            "phash": f"{phash & ((1 << 64) - 1):016x}",
        }


_GROUPS = [1]  # number of planted groups, set per run (about n / 50)


def run_dedup(
    candidates: str, out: str, n: int, beam_args: list[str], label_rounds: int = 4
) -> None:
    import apache_beam as beam

    from wit_pipeline import beam_utils, samples
    from wit_pipeline.config import DedupConfig
    from wit_pipeline.stages.dedup import core as dedup

    _GROUPS[0] = max(1, n // 50)
    groups = _GROUPS[0]

    def records(table, groups=groups):
        _GROUPS[0] = groups  # workers are other processes: set it where they run
        yield from image_records(table)

    with beam.Pipeline(options=beam_utils.pipeline_options(beam_args)) as p:
        recs = (
            p
            | "Read" >> beam.io.ReadFromParquetBatched(os.path.join(candidates, "*.parquet"))
            | "Images" >> beam.FlatMap(records)
        )
        dd = recs | "Dedup" >> dedup.DedupRecords(config=DedupConfig(label_rounds=label_rounds))
        _ = (
            dd["samples"]
            | "ToRow" >> beam.Map(samples.sample_row)
            | "Write"
            >> beam.io.WriteToParquet(
                os.path.join(out, "part"),
                schema=samples.SAMPLE_SCHEMA,
                file_name_suffix=".parquet",
                codec="zstd",
            )
        )
        _ = (
            dd["counts"]
            | "Sum" >> beam.CombinePerKey(sum)
            | "Counts" >> beam.combiners.ToDict()
            | "Save" >> beam.Map(_save_json, os.path.join(out, "counts.json"))
        )


def run_balance(samples_dir: str, out: str, beam_args: list[str]) -> None:
    import apache_beam as beam

    from wit_pipeline import beam_utils
    from wit_pipeline.config import BalanceConfig
    from wit_pipeline.stages import balance

    with beam.Pipeline(options=beam_utils.pipeline_options(beam_args)) as p:
        res = p | "Balance" >> balance.BalanceSampleFiles(
            file_pattern=os.path.join(samples_dir, "*.parquet"), config=BalanceConfig()
        )
        kept = res["kept"] | "Rows" >> beam.Map(lambda t: t.num_rows) | beam.CombineGlobally(sum)
        counts = res["counts"] | "Sum" >> beam.CombinePerKey(sum) | beam.combiners.ToDict()
        _ = kept | "SaveKept" >> beam.Map(
            lambda k, c: _save_json({"kept": k, **c}, os.path.join(out, "counts.json")),
            beam.pvalue.AsSingleton(counts),
        )


def _save_json(doc, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f)


# ---------------------------------------------------------------------------------------------
# Measuring a step


def _peak_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``; wall and CPU seconds (children included) and the peak RSS of the launcher
    and of each descendant process (``VmHWM``, sampled every 0.2 s)."""
    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    stop = threading.Event()

    def poll():
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                kids = root.children(recursive=True)
            except psutil.Error:
                kids = []
            for p in [root, *kids]:
                peaks[p.pid] = max(peaks.get(p.pid, 0), _peak_kib(p.pid))
            stop.wait(0.2)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    stop.set()
    thread.join()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{output[-4000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    launcher = peaks.pop(proc.pid, 0)
    return {
        "wall": wall,
        "cpu": cpu,
        "launcher_mib": launcher / 1024,
        "worker_mib": max(peaks.values(), default=0) / 1024,
        "processes": len(peaks),
    }


def _rows(directory: str) -> int:
    import pyarrow.parquet as pq

    return sum(
        pq.ParquetFile(os.path.join(directory, f)).metadata.num_rows
        for f in os.listdir(directory)
        if f.endswith(".parquet")
    )


def _counters(path: str) -> dict:
    with open(path) as f:
        doc = json.load(f)
    return doc.get("counters", doc)


def _distinct_urls(directory: str) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return len(pc.unique(pq.read_table(directory, columns=["url"]).column("url")))


def _check(step: str, ok: bool, what: str) -> None:
    """The run is exact or it stops: every record that enters a step is kept or counted."""
    if not ok:
        sys.exit(f"{step}: records lost or doubled: {what}")


def check_counts(d: str, n: int) -> None:
    """Each step's records balance: gather's counters sum to its N inputs and to the rows it
    wrote; pre-balance keeps or rejects each candidate; dedup's samples and near-duplicates are
    one per distinct URL; balance's kept samples and its counters agree with its input."""
    g = _counters(os.path.join(d, "gather", "stats.json"))
    dropped = sum(v for k, v in g.items() if k.startswith("dropped:"))
    _check("gather", g["input"] == n and g["kept"] + dropped == n, f"{g}")
    cands = _rows(os.path.join(d, "gather", "candidates"))
    _check("gather", cands == g["kept"], f"{cands} rows written, kept {g['kept']}")
    pre = _counters(os.path.join(d, "pre", "stats.json"))
    pre_rows = _rows(os.path.join(d, "pre", "candidates"))
    _check("prebalance", pre["input"] == cands and pre["kept"] == pre_rows, f"{pre}, {pre_rows}")
    dd = _counters(os.path.join(d, "samples", "counts.json"))
    samples = _rows(os.path.join(d, "samples"))
    urls = _distinct_urls(os.path.join(d, "pre", "candidates"))
    near = dd.get("dropped:near_duplicate", 0)
    _check("dedup", samples + near == urls, f"{samples} samples + {near} near-dups, {urls} URLs")
    b = _counters(os.path.join(d, "final", "counts.json"))
    if "input" in b:
        out = sum(v for k, v in b.items() if k.startswith("dropped:")) + b["kept"]
        _check("balance", b["input"] == samples and out == samples, f"{b}, {samples} samples")


def runner_args(runner: str, workers: int, n: int, per_partition: int) -> list[str]:
    """The args of every step: FnApiRunner with ``workers`` processes, or a local Dask cluster
    of ``workers`` worker processes started by the step (``wit ... --runner dask``), with
    partitions sized by the data: one per ``per_partition`` pairs (``--dask_npartitions``, of
    every read, ``Create`` and shuffle), at least two per worker."""
    if runner == "dask":
        parts = max(2 * workers, math.ceil(n / per_partition))
        return ["--runner", "dask", "--dask-workers", str(workers), f"--dask_npartitions={parts}"]
    return [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]


def run_size(
    n: int,
    tmp: str,
    queries: str,
    workers: int,
    label_rounds: int,
    runner: str = "fnapi",
    per_partition: int = 62_500,
) -> list[dict]:
    py = sys.executable
    me = os.path.abspath(__file__)
    beam = runner_args(runner, workers, n, per_partition)
    d = os.path.join(tmp, f"n{n}")
    inputs, gather, pre = (os.path.join(d, x) for x in ("inputs", "gather", "pre"))
    samples_dir, final = os.path.join(d, "samples"), os.path.join(d, "final")
    generate(inputs, n)
    steps = []
    m = measure(
        [
            py,
            "-m",
            "wit_pipeline",
            "gather",
            "--input",
            inputs,
            "--queries",
            queries,
            "--output",
            gather,
            "--quiet",
            *beam,
        ]
    )
    steps.append({"step": "gather", "records": n, **m})
    m = measure(
        [py, "-m", "wit_pipeline", "balance", "--pre", "--input", gather, "--output", pre, *beam]
    )
    steps.append({"step": "prebalance", "records": _rows(os.path.join(gather, "candidates")), **m})
    m = measure(
        [
            py,
            me,
            "--child-dedup",
            os.path.join(pre, "candidates"),
            samples_dir,
            str(n),
            f"--label-rounds={label_rounds}",
            *beam,
        ]
    )
    steps.append({"step": "dedup grouping", "records": _rows(os.path.join(pre, "candidates")), **m})
    m = measure([py, me, "--child-balance", samples_dir, final, *beam])
    steps.append({"step": "balance (Arrow)", "records": _rows(samples_dir), **m})
    with open(os.path.join(final, "counts.json")) as f:
        steps[-1]["kept"] = json.load(f)["kept"]
    check_counts(d, n)
    shutil.rmtree(d, ignore_errors=True)
    for s in steps:
        s["n"] = n
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000000,3000000", help="comma-separated N")
    ap.add_argument("--workers", type=int, default=2, help="worker processes per step")
    ap.add_argument("--queries", type=int, default=500_000)
    ap.add_argument("--json", help="also write the measurements here")
    ap.add_argument(
        "--label-rounds", type=int, default=4, help="dedup.label_rounds (-1: one union-find)"
    )
    ap.add_argument(
        "--runner",
        default="fnapi",
        choices=["fnapi", "dask"],
        help="FnApiRunner with --workers processes, or a local Dask cluster of --workers workers",
    )
    ap.add_argument(
        "--pairs-per-partition",
        type=int,
        default=62_500,
        help="--runner dask: one partition per this many pairs (--dask_npartitions of each step)",
    )
    ap.add_argument("--dask-workers", type=int, help=argparse.SUPPRESS)  # the steps' own flag
    ap.add_argument("--child-dedup", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--child-balance", nargs=2, help=argparse.SUPPRESS)
    args, beam_args = ap.parse_known_args()
    if args.child_dedup or args.child_balance:
        from wit_pipeline import runners

        runner = "dask" if args.runner == "dask" else None
        with runners.dask_cluster(runner, beam_args, workers=args.dask_workers) as beam_args:
            if runner:
                beam_args = [*beam_args, "--runner=dask"]
            if args.child_dedup:
                cands, out, n = args.child_dedup
                run_dedup(cands, out, int(n), beam_args, args.label_rounds)
            else:
                run_balance(*args.child_balance, beam_args)
        return
    sizes = [int(x) for x in args.sizes.split(",")]
    load = [f"{os.getloadavg()[0]:.1f}"]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    tmp = tempfile.mkdtemp(prefix="wit-bench-scale-")
    rows = []
    try:
        import gzip

        queries = os.path.join(tmp, "queries.txt.gz")
        with gzip.open(queries, "wt", encoding="utf-8") as f:
            f.write("\n".join(common.real_sized_queries(common.shared_data(), args.queries)))
        for n in sizes:
            rows += run_size(
                n,
                tmp,
                queries,
                args.workers,
                args.label_rounds,
                args.runner,
                args.pairs_per_partition,
            )
            load.append(f"{os.getloadavg()[0]:.1f}")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cmd = f"benchmarks/bench_scale.py --sizes {args.sizes} --workers {args.workers}"
    if args.runner != "fnapi":
        cmd += f" --runner {args.runner}"
        if args.pairs_per_partition != 62_500:
            cmd += f" --pairs-per-partition {args.pairs_per_partition}"
    if args.label_rounds != 4:
        cmd += f" --label-rounds {args.label_rounds}"
    print(common.header("Scale: every step at growing N, throughput and worker memory", cmd))
    print(
        f"Started {started}; `uptime` load average (1 min) at the start and after each size: "
        f"{', '.join(load)}. "
        + (
            f"A local Dask cluster of {args.workers} worker processes per step.\n"
            if args.runner == "dask"
            else f"FnApiRunner, {args.workers} worker processes per step.\n"
        )
    )
    table = []
    for r in rows:
        table.append(
            [
                f"{r['n']:,}",
                r["step"],
                f"{r['records']:,}",
                f"{r['wall']:,.0f}",
                f"{r['cpu']:,.0f}",
                f"{r['records'] / r['wall']:,.0f}",
                f"{r['records'] / r['cpu']:,.0f}",
                f"{r['launcher_mib']:,.0f}",
                f"{r['worker_mib']:,.0f}",
            ]
        )
    print(
        common.table(
            table,
            [
                "N",
                "step",
                "records in",
                "wall s",
                "CPU s",
                "records/s (wall)",
                "records per CPU s",
                "launcher peak MiB",
                "largest worker peak MiB",
            ],
        )
    )
    first = {r["step"]: r for r in rows if r["n"] == sizes[0]}
    if len(sizes) > 1:
        print()
        print(f"From N = {sizes[0]:,} to N = {sizes[-1]:,}:\n")
        ratios = []
        for r in rows:
            if r["n"] != sizes[-1]:
                continue
            a = first[r["step"]]
            ratios.append(
                [
                    r["step"],
                    f"{r['worker_mib'] / max(a['worker_mib'], 1):.2f}",
                    f"{r['launcher_mib'] / max(a['launcher_mib'], 1):.2f}",
                    f"{(r['records'] / r['cpu']) / (a['records'] / a['cpu']):.2f}",
                ]
            )
        print(
            common.table(
                ratios,
                [
                    "step",
                    "worker peak memory ratio",
                    "launcher peak memory ratio",
                    "per-core throughput ratio",
                ],
            )
        )


if __name__ == "__main__":
    main()
