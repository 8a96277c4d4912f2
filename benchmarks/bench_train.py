"""Training throughput: ``wit_pipeline.train`` vs open_clip's own trainer, same everything.

Both trainers run in subprocesses, one after the other (alternating when ``--repeats`` > 1), on
the same webdataset shards (Flickr8k train, built here), the same model, batch size, worker count,
number of optimizer steps, precision and device. Reported per trainer:

- steady samples/s: the median over steps after the first ``--skip-steps`` of the per-step rate
  each trainer logs itself (open_clip: ``Batch (t)`` with ``--log-every-n-steps 1``; ours:
  ``metrics.jsonl`` with ``--log-every 1``); both include time spent waiting for data;
- end-to-end samples/s: steps x batch / wall time of the whole process (start-up included).

The ratio ``wit / open_clip`` is the figure to compare (goal >= 1.0). One command, e.g.:

    python benchmarks/bench_train.py --quick
    python benchmarks/bench_train.py --device cuda --model ViT-B-32 --batch-size 256 --steps 100

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# open_clip's trainer runs as ``python -m wit_pipeline.train.open_clip``: open_clip_train.main
# with its training reader fixed for webdataset >= 0.2.87 (see that module) and the wit-*
# architectures registered; nothing else of open_clip's trainer changes.


def build_shards(shared: str, out: str, samples_per_shard: int) -> str:
    from wit_pipeline.train import caption_sets

    if not os.path.exists(os.path.join(out, "manifest.json")):
        caption_sets.write_caption_shards(
            os.path.join(shared, "flickr8k", "images"),
            os.path.join(shared, "flickr8k", "captions.tsv"),
            out,
            split="train",
            samples_per_shard=samples_per_shard,
            source="flickr8k",
        )
    return out


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def run_wit(args, shards: str, out: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "wit_pipeline.train",
        "--train-data",
        shards,
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--max-steps",
        str(args.steps),
        "--epochs",
        "100",
        "--lr",
        str(args.lr),
        "--warmup",
        str(args.warmup),
        "--wd",
        "0.2",
        "--precision",
        args.precision,
        "--device",
        args.device,
        "--output",
        out,
        "--log-every",
        "1",
        "--no-progress",
        "--no-plots",
        "--grad-clip",
        "1.0",
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"wit_pipeline.train failed:\n{proc.stderr[-3000:]}")
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    rates = [r["samples_per_s"] for r in rows if r.get("type") == "train"]
    return {"wall_s": wall, "rates": rates}


_OC_LINE = re.compile(r"Batch \(t\): ([0-9.]+), ([0-9.]+)/s")


def run_open_clip(args, shards: str, out: str) -> dict:
    from wit_pipeline import shards as shards_lib

    with open(os.path.join(shards, shards_lib.MANIFEST)) as f:
        manifest = json.load(f)
    pattern = os.path.join(shards, manifest["train_data"])
    cmd = [
        sys.executable,
        "-m",
        "wit_pipeline.train.open_clip",
        "--train-data",
        pattern,
        "--train-num-samples",
        str(args.steps * args.batch_size),
        "--dataset-type",
        "webdataset",
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--epochs",
        "1",
        "--lr",
        str(args.lr),
        "--warmup",
        str(args.warmup),
        "--wd",
        "0.2",
        "--grad-clip-norm",
        "1.0",
        "--precision",
        {
            "fp32": "fp32",
            "bf16": "amp_bf16",
            "fp16": "amp",
            "auto": "amp_bf16" if args.device.startswith("cuda") else "fp32",
        }[args.precision],
        "--device",
        args.device,
        "--logs",
        out,
        "--name",
        "bench",
        "--log-every-n-steps",
        "1",
        "--save-frequency",
        "0",
        "--zeroshot-frequency",
        "0",
        "--val-frequency",
        "0",
        "--report-to",
        "",
        "--seed",
        "0",
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    wall = time.time() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"open_clip_train failed:\n{log[-3000:]}")
    rates = [float(m.group(2)) for m in _OC_LINE.finditer(log)]
    return {"wall_s": wall, "rates": rates}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shared-data",
        default=os.environ.get("WIT_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data")),
    )
    parser.add_argument("--model", default="wit-tiny")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--skip-steps", type=int, default=5, help="warm-up steps left out of the steady rate"
    )
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each trainer")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="24 steps, one repeat")
    parser.add_argument("--work-dir", default="")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 24, 1
    work = args.work_dir or tempfile.mkdtemp(prefix="bench-train-")
    shards = build_shards(args.shared_data, os.path.join(work, "shards"), args.samples_per_shard)

    results: dict[str, list[dict]] = {"wit_pipeline.train": [], "open_clip_train.main": []}
    for r in range(args.repeats):
        for name, fn in (("wit_pipeline.train", run_wit), ("open_clip_train.main", run_open_clip)):
            out = os.path.join(work, f"{name}-{r}")
            shutil.rmtree(out, ignore_errors=True)
            results[name].append(fn(args, shards, out))

    def steady(runs):
        rates = [x for run in runs for x in run["rates"][args.skip_steps :]]
        return statistics.median(rates) if rates else float("nan")

    def e2e(runs):
        return statistics.median(args.steps * args.batch_size / run["wall_s"] for run in runs)

    ours, theirs = results["wit_pipeline.train"], results["open_clip_train.main"]
    print(
        f"\n### Training throughput ({args.model}, batch {args.batch_size}, {args.workers} workers, "
        f"{args.steps} steps, {args.device}, {args.repeats} repeat(s))\n"
    )
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}; "
        f"date {time.strftime('%Y-%m-%d')}; command: `python benchmarks/bench_train.py "
        f"{' '.join(sys.argv[1:])}`\n"
    )
    print("| trainer | steady samples/s | end-to-end samples/s | wall s |")
    print("|---|---:|---:|---:|")
    for name, runs in results.items():
        print(
            f"| {name} | {steady(runs):.1f} | {e2e(runs):.1f} | "
            f"{statistics.median(r['wall_s'] for r in runs):.1f} |"
        )
    print(
        f"| **ratio wit / open_clip** | **{steady(ours) / steady(theirs):.2f}x** | "
        f"**{e2e(ours) / e2e(theirs):.2f}x** | |"
    )


if __name__ == "__main__":
    main()
