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
from typing import Any

import common

# open_clip's trainer runs as ``python -m wit_pipeline.train.open_clip``: open_clip_train.main
# with its training reader fixed for webdataset >= 0.2.87 (see that module) and the wit-*
# architectures registered; nothing else of open_clip's trainer changes.


def base_parser(doc: str, *, workers: int, lr: float, warmup: int) -> argparse.ArgumentParser:
    """The options of the training benchmarks (this one and bench_train_budget.py)."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shared-data", default="", help="real data (default: $WIT_SHARED_DATA, ../shared/data)"
    )
    parser.add_argument("--model", default="wit-tiny")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=workers)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--device", default="cpu")
    return parser


def build_shards(shared: str, out: str, samples_per_shard: int) -> str:
    """Final-format shards of Flickr8k train (6,000 images, their 5 captions each) in ``out``."""
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


def flags(**values: Any) -> list[str]:
    """``--name value`` per keyword (``name_x`` is ``--name-x``; True: ``--name``; False:
    ``--no-name``), the convention of both trainers."""
    out: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + flag[2:])
        else:
            out += [flag, str(value)]
    return out


def run_timed(module: str, argv: list[str]) -> tuple[str, float]:
    """``python -m module argv`` with the repository importable: its output and wall seconds.

    Exits with the end of the output when the process fails.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(common.ROOT), env.get("PYTHONPATH")) if p)
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", module, *argv], capture_output=True, text=True, env=env
    )
    wall = time.time() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"{module} failed:\n{log[-3000:]}")
    return log, wall


def run_wit_train(args, shards: str, out: str, **more: Any) -> float:
    """``python -m wit_pipeline.train`` on ``shards`` into ``out`` with the benchmark's model,
    batch size, workers, learning rate and device, and the options ``more``; its wall seconds."""
    _, wall = run_timed(
        "wit_pipeline.train",
        flags(
            train_data=shards,
            model=args.model,
            batch_size=args.batch_size,
            workers=args.workers,
            lr=args.lr,
            device=args.device,
            output=out,
            progress=False,
            **more,
        ),
    )
    return wall


def run_wit(args, shards: str, out: str) -> dict:
    wall = run_wit_train(
        args,
        shards,
        out,
        max_steps=args.steps,
        epochs=100,
        warmup=args.warmup,
        wd=0.2,
        precision=args.precision,
        log_every=1,
        plots=False,
        grad_clip=1.0,
    )
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    rates = [r["samples_per_s"] for r in rows if r.get("type") == "train"]
    return {"wall_s": wall, "rates": rates}


_OC_LINE = re.compile(r"Batch \(t\): ([0-9.]+), ([0-9.]+)/s")
_OC_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}


def run_open_clip(args, shards: str, out: str) -> dict:
    from wit_pipeline import shards as shards_lib

    with open(os.path.join(shards, shards_lib.MANIFEST)) as f:
        manifest = json.load(f)
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if args.device.startswith("cuda") else "fp32"
    log, wall = run_timed(
        "wit_pipeline.train.open_clip",
        flags(
            train_data=os.path.join(shards, manifest["train_data"]),
            train_num_samples=args.steps * args.batch_size,
            dataset_type="webdataset",
            model=args.model,
            batch_size=args.batch_size,
            workers=args.workers,
            epochs=1,
            lr=args.lr,
            warmup=args.warmup,
            wd=0.2,
            grad_clip_norm=1.0,
            precision=_OC_PRECISION[precision],
            device=args.device,
            logs=out,
            name="bench",
            log_every_n_steps=1,
            save_frequency=0,
            zeroshot_frequency=0,
            val_frequency=0,
            report_to="",
            seed=0,
        ),
    )
    rates = [float(m.group(2)) for m in _OC_LINE.finditer(log)]
    return {"wall_s": wall, "rates": rates}


def main() -> None:
    parser = base_parser(__doc__, workers=2, lr=5e-4, warmup=10)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--skip-steps", type=int, default=5, help="warm-up steps left out of the steady rate"
    )
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each trainer")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="24 steps, one repeat")
    parser.add_argument("--work-dir", default="")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 24, 1
    work = args.work_dir or tempfile.mkdtemp(prefix="bench-train-")
    shared = args.shared_data or str(common.shared_data())
    shards = build_shards(shared, os.path.join(work, "shards"), args.samples_per_shard)

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
