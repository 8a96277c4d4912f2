"""Benchmark: `wit build` end to end vs bare `img2dataset.download` of the same images.

A local HTTP server process serves the Flickr8k photos of ../shared/data on 127.0.0.1; gallery
pages linking them (one `<img src alt>` per photo, its first caption as alt text) are written to
a WARC, and the same URLs and captions to a Parquet URL list. Then, each as a fresh command in
the same run:

- baseline: `img2dataset.download(url_list)` (the download step alone, nothing else);
- `wit build --input crawl.warc.gz` with the shipped 500k-query list: gather (WARC parsing,
  language detection, query matching), pre-balance, download, dedup (pHash, LSH), balance,
  final shards and the report;
- the same `wit build` again: every step already done (the cost of a no-op rerun).

Prints a Markdown table (wall seconds, images/s, ratio to the baseline) and the per-step time
from the build's completion markers.

With ``--runner dask --workers N`` the same build runs on three runners instead, each as a fresh
command in the same run, against FnApiRunner as the baseline: FnApiRunner (one process; the
download step with ``--processes`` processes, as always), FnApiRunner with N worker processes
for every step (``--direct_num_workers N --direct_running_mode multi_processing``), and
``--runner dask --dask-workers N`` (a local Dask cluster of N single-thread worker processes,
started and closed by the command, inside its wall time). The final shards of the three must be
byte-identical (checked). ``--repeat R`` runs R rounds, each in another order (on a shared
machine the load changes between runs), and reports the median wall times.

    .venv/bin/python benchmarks/bench_build.py            # 7,000 photos
    .venv/bin/python benchmarks/bench_build.py --quick    # 1,000 photos
    .venv/bin/python benchmarks/bench_build.py --runner dask --workers 2 --repeat 3
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
DEFAULT_DATA = ROOT.parent / "shared" / "data"

from bench_download import _env, img2dataset_command, start_server  # noqa: E402


def write_inputs(tmp: pathlib.Path, data: pathlib.Path, port: int, n: int) -> tuple[str, str]:
    """``crawl.warc.gz`` (pages of 50 images) and ``urls/candidates/part-0.parquet``."""
    import html

    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT))
    from wit_pipeline.demo.web import write_warc

    first: dict[str, str] = {}
    with open(data / "flickr8k" / "captions.tsv", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            first.setdefault(row["image"], row["caption"])
    names = sorted(first)[:n]
    urls = [f"http://127.0.0.1:{port}/img/{name}" for name in names]
    pages = []
    for p in range(0, len(names), 50):
        imgs = "\n".join(
            f'<img src="{u}" alt="{html.escape(first[name])}">'
            for u, name in zip(urls[p : p + 50], names[p : p + 50], strict=True)
        )
        body = f'<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>{imgs}</body></html>'
        pages.append((f"http://127.0.0.1:{port}/pages/{p // 50}.html", body.encode()))
    warc = tmp / "crawl.warc.gz"
    write_warc(str(warc), pages)
    url_list = tmp / "urls" / "candidates" / "part-0.parquet"
    url_list.parent.mkdir(parents=True)
    pq.write_table(pa.table({"url": urls, "caption": [first[n] for n in names]}), url_list)
    return str(warc), str(url_list)


def build_command(warc: str, out: str, a: argparse.Namespace) -> list[str]:
    sets = {
        "download.processes": a.processes,
        "download.threads": a.threads,
        "download.per_host_concurrency": a.threads,
        "download.image_size": a.image_size,
        "download.resize_mode": a.resize_mode,
        "download.resize_only_if_bigger": "false",
        "download.samples_per_shard": a.samples_per_shard,
        "download.retries": 0,
        "balance.t": a.t,
    }
    cmd = [sys.executable, "-m", "wit_pipeline", "build", "--input", warc, "--output", out]
    cmd += ["--allow-loopback"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


STEPS = ("gather", "prebalance", "download", "finalize", "report")


def step_times(out: str) -> dict[str, float]:
    """Each step's time, from the build's completion markers."""
    return {
        s: json.loads(pathlib.Path(out, "done", f"{s}.json").read_text())["elapsed_s"]
        for s in STEPS
    }


def shard_digests(out: str) -> dict[str, str]:
    shards = pathlib.Path(out, "shards")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shards.iterdir())}


def compare_runners(warc: str, tmp: pathlib.Path, a: argparse.Namespace, n: int) -> None:
    """The same build on FnApiRunner, FnApiRunner with N processes, and a local Dask cluster."""
    runs = {
        "FnApiRunner (baseline)": [],
        f"FnApiRunner, {a.workers} worker processes": [
            f"--direct_num_workers={a.workers}",
            "--direct_running_mode=multi_processing",
        ],
        f"--runner dask --dask-workers {a.workers}": [
            "--runner",
            "dask",
            "--dask-workers",
            str(a.workers),
        ],
    }
    load = os.getloadavg()
    walls: dict[str, list[float]] = {name: [] for name in runs}
    steps: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    digests = {}
    names = list(runs)
    for r in range(a.repeat):  # each round in another order: load changes hit every runner
        for i in [(r + k) % len(names) for k in range(len(names))]:
            name = names[i]
            out = str(tmp / f"build-{r}-{i}")
            walls[name].append(timed([*build_command(warc, out, a), *runs[name]]))
            steps[name].append(step_times(out))
            digests[name, r] = shard_digests(out)
            shutil.rmtree(out)
    same = all(d == next(iter(digests.values())) for d in digests.values())
    if not same:
        sys.exit("the runners wrote different shards")
    print(
        f"\n{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, {n} photos, "
        f"processes={a.processes} threads={a.threads} image_size={a.image_size} t={a.t}, "
        f"{a.repeat} round(s), load average {load[0]:.1f} before and {os.getloadavg()[0]:.1f} "
        f"after; shards identical across runners and rounds: {same}\n"
    )
    median = {name: statistics.median(w) for name, w in walls.items()}
    base = median["FnApiRunner (baseline)"]
    print(
        "| runner | wall s, median (each round) | photos/s | vs FnApiRunner | "
        + " | ".join(STEPS)
        + " |"
    )
    print("|---|---:|---:|---:|" + "---:|" * len(STEPS))
    for name, wall in median.items():
        rounds = ", ".join(f"{w:.1f}" for w in walls[name])
        per_step = " | ".join(
            f"{statistics.median(st[s] for st in steps[name]):.1f}" for s in STEPS
        )
        print(
            f"| {name} | {wall:.1f} ({rounds}) | {n / wall:.0f} | {base / wall:.2f}x | {per_step} |"
        )


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    res = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=7000)
    p.add_argument("--quick", action="store_true", help="1,000 photos")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--resize-mode", default="keep_ratio")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--t", type=int, default=20000, help="balance.t")
    p.add_argument("--data", default=os.environ.get("WIT_SHARED_DATA", str(DEFAULT_DATA)))
    p.add_argument(
        "--runner",
        choices=("FnApiRunner", "dask"),
        default="FnApiRunner",
        help="dask: compare FnApiRunner, FnApiRunner with --workers processes and a local Dask "
        "cluster of --workers processes (instead of the img2dataset comparison)",
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes (--runner dask)")
    p.add_argument(
        "--repeat", type=int, default=1, help="rounds of the three runs (--runner dask), medians"
    )
    a = p.parse_args()
    n = 1000 if a.quick else a.images
    data = pathlib.Path(a.data)
    server, port = start_server(data / "flickr8k" / "images")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-build-"))
    try:
        warc, url_list = write_inputs(tmp, data, port, n)
        if a.runner == "dask":
            compare_runners(warc, tmp, a, n)
            return
        base = timed(img2dataset_command(url_list, str(tmp / "img2dataset"), a))
        out = str(tmp / "build")
        wall = timed(build_command(warc, out, a))
        again = timed(build_command(warc, out, a))
        stats = json.loads(pathlib.Path(out, "stats.json").read_text())
        steps = step_times(out)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    ic = stats["image_counters"]
    print(
        f"\n{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, {n} photos, "
        f"processes={a.processes} threads={a.threads} image_size={a.image_size} t={a.t}\n"
    )
    print("| run | wall s | photos/s | vs img2dataset |")
    print("|---|---:|---:|---:|")
    print(f"| img2dataset.download (baseline) | {base:.1f} | {n / base:.0f} | 1.00x |")
    print(f"| wit build, all steps | {wall:.1f} | {n / wall:.0f} | {base / wall:.2f}x |")
    print(f"| wit build rerun, all steps done | {again:.1f} | - | {base / again:.2f}x |")
    print(
        f"\nFinal: {stats['samples']:,} samples of {ic['input']:,} URLs "
        f"({ic.get('dropped:balanced_out', 0):,} balanced out, "
        f"{ic.get('dropped:near_duplicate', 0):,} near duplicates); "
        f"{stats['counters']['kept']:,} of {stats['counters']['input']:,} pairs.\n"
    )
    print("| step | wall s (in the build's process) | share |")
    print("|---|---:|---:|")
    total = sum(steps.values())
    for s, t in steps.items():
        print(f"| {s} | {t:.1f} | {100 * t / total:.0f}% |")
    print(f"| start-up and checks (rest of the command) | {wall - total:.1f} | |")


if __name__ == "__main__":
    main()
