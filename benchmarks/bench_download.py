"""Benchmark: `wit download` vs bare `img2dataset.download` on the same Flickr8k URL list.

Both download the same URLs from one local HTTP server (a separate process serving the Flickr8k
photos of ../shared/data on 127.0.0.1) with the same processes, threads and resize settings,
each as a fresh command (interpreter start, imports, worker start-up included), one after the
other in the same run. Prints a Markdown table: images/s of each and their ratio. A second,
tiny run of each (``--small``) separates the fixed start-up cost from the per-image cost.

    .venv/bin/python benchmarks/bench_download.py            # 7,000 photos
    .venv/bin/python benchmarks/bench_download.py --quick    # 1,000 photos

`wit download` runs with ``per_host_concurrency`` equal to ``threads`` (every URL is on one
host here, and img2dataset has no per-host limit) and robots.txt on (one 404 per run).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def start_server(images: pathlib.Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "wit_pipeline.loopback", str(images), "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    line = proc.stdout.readline()  # "serving DIR at http://127.0.0.1:PORT/img/"
    port = int(line.rsplit(":", 1)[1].split("/", 1)[0])
    return proc, port


def write_url_list(path: pathlib.Path, data: pathlib.Path, port: int, n: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    first_caption: dict[str, str] = {}
    with open(data / "flickr8k" / "captions.tsv", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            first_caption.setdefault(row["image"], row["caption"])
    names = sorted(first_caption)[:n]
    table = pa.table(
        {
            "url": [f"http://127.0.0.1:{port}/img/{name}" for name in names],
            "caption": [first_caption[name] for name in names],
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return len(names)


def run_img2dataset(url_list: str, out: str, a: argparse.Namespace) -> None:
    from img2dataset import download

    download(
        url_list=url_list,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        output_folder=out,
        processes_count=a.processes,
        thread_count=a.threads,
        image_size=a.image_size,
        resize_mode=a.resize_mode,
        resize_only_if_bigger=False,
        encode_quality=95,
        min_image_size=32,
        max_aspect_ratio=4.0,
        max_image_area=89_478_485.0,
        number_sample_per_shard=a.samples_per_shard,
        timeout=10,
        retries=0,
        compute_hash="sha256",
        extract_exif=False,
        enable_wandb=False,
        distributor="multiprocessing",
        user_agent_token="wit-pipeline",
    )


def wit_command(url_list: str, out: str, a: argparse.Namespace) -> list[str]:
    sets = {
        "processes": a.processes,
        "threads": a.threads,
        "per_host_concurrency": a.threads,
        "image_size": a.image_size,
        "resize_mode": a.resize_mode,
        "resize_only_if_bigger": "false",
        "samples_per_shard": a.samples_per_shard,
        "retries": 0,
    }
    cmd = [sys.executable, "-m", "wit_pipeline", "download", "--input", url_list]
    cmd += ["--output", out, "--allow-loopback"]
    for k, v in sets.items():
        cmd += ["--set", f"download.{k}={v}"]
    return cmd


def img2dataset_command(url_list: str, out: str, a: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, __file__, "--_img2dataset", url_list, out]
    cmd += ["--processes", str(a.processes), "--threads", str(a.threads)]
    cmd += ["--image-size", str(a.image_size), "--resize-mode", a.resize_mode]
    cmd += ["--samples-per-shard", str(a.samples_per_shard)]
    return cmd


def count_wit(out: str) -> int:
    stats = json.loads(pathlib.Path(out, "stats.json").read_text())
    return int(stats["url_counters"].get("kept", 0))


def count_img2dataset(out: str) -> int:
    total = 0
    for p in pathlib.Path(out).glob("*_stats.json"):
        total += int(json.loads(p.read_text())["successes"])
    return total


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
    p.add_argument("--small", type=int, default=50, help="photos in the start-up runs (0: skip)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--resize-mode", default="keep_ratio")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--data", default=os.environ.get("WIT_SHARED_DATA", str(DEFAULT_DATA)))
    p.add_argument("--_img2dataset", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._img2dataset:
        run_img2dataset(a._img2dataset[0], a._img2dataset[1], a)
        return
    n_target = 1000 if a.quick else a.images
    data = pathlib.Path(a.data)
    server, port = start_server(data / "flickr8k" / "images")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-download-"))
    rows = []
    try:
        sizes = [n_target] + ([a.small] if a.small else [])
        results: dict[tuple[str, int], tuple[float, int]] = {}
        for n_req in sizes:
            url_list = tmp / f"urls-{n_req}" / "candidates" / "part-0.parquet"
            n = write_url_list(url_list, data, port, n_req)
            for tool in ("img2dataset", "wit download"):
                out = str(tmp / f"out-{tool.replace(' ', '-')}-{n}")
                if tool == "img2dataset":
                    wall = timed(img2dataset_command(str(url_list), out, a))
                    ok = count_img2dataset(out)
                else:
                    wall = timed(wit_command(str(url_list.parent.parent), out, a))
                    ok = count_wit(out)
                results[(tool, n)] = (wall, ok)
                shutil.rmtree(out, ignore_errors=True)
        big = max(n for _, n in results)
        base_wall, _ = results[("img2dataset", big)]
        for tool in ("img2dataset", "wit download"):
            wall, ok = results[(tool, big)]
            row = [tool, str(big), str(ok), f"{wall:.1f}", f"{ok / wall:.0f}"]
            row.append(f"{base_wall / wall:.2f}x")
            if a.small:
                small_wall, small_ok = results[(tool, min(sizes))]
                per_image = (wall - small_wall) / max(1, ok - small_ok)
                row += [f"{small_wall:.1f}", f"{1 / per_image:.0f}" if per_image > 0 else "-"]
            rows.append(row)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    if a.small:
        print("\nStart-up costs (each a fresh interpreter, measured in the same run):\n")
        print("| what | wall s |")
        print("|---|---|")
        for label, code in (
            ("python: import apache_beam", "import apache_beam"),
            ("python: import img2dataset.downloader", "import img2dataset.downloader"),
            (
                "python: import wit_pipeline.stages.download.transforms",
                "import wit_pipeline.stages.download.transforms",
            ),
        ):
            print(f"| {label} | {timed([sys.executable, '-c', code]):.1f} |")
    print(
        f"\n{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"processes={a.processes} threads={a.threads} image_size={a.image_size} "
        f"resize_mode={a.resize_mode}\n"
    )
    head = ["tool", "URLs", "images ok", "wall s", "images/s", "vs img2dataset"]
    if a.small:
        head += [f"wall s ({a.small} URLs)", "marginal images/s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
