"""Benchmark: `make build-dataset` (the built-in demo) end to end, against training alone.

Runs, each as a fresh command in the same run (interpreter start and imports included):

- `python -m wit_pipeline demo run --output DIR` with the shipped demo config: generate the web,
  serve it, `wit build` it (gather, prebalance, download, finalize, report), audit the planted
  mess, train `wit-tiny`, evaluate zero-shot on the held-out renders;
- baseline: `python -m wit_pipeline.train --config DIR/train/train.yaml` into a fresh folder:
  the demo's training alone, on the shards the demo built, with the same options (the part of
  the demo no data pipeline can save);
- the demo again in the same DIR: everything done, nothing recomputed.

The ratio demo / baseline says what generating, crawling, building, auditing and reporting add on
top of training. The issue's budget for the whole `make build-dataset` is 600 s on 2 cores.
Prints Markdown tables.

    .venv/bin/python benchmarks/bench_demo.py            # the shipped demo (3,000 scenes, 250 steps)
    .venv/bin/python benchmarks/bench_demo.py --quick    # 1,000 scenes, 60 steps
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import ROOT, header, table

BUDGET_S = 600.0


def _run(cmd: list[str], log: pathlib.Path) -> float:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    t0 = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 scenes and 60 training steps")
    ap.add_argument("--keep", metavar="DIR", help="run in DIR and keep it (default: a temp dir)")
    args = ap.parse_args()
    work = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="bench_demo_"))
    work.mkdir(parents=True, exist_ok=True)
    out = work / "demo"
    sets = ["--set", "web.n_images=1000", "--set", "train.max_steps=60"] if args.quick else []
    demo_cmd = [sys.executable, "-m", "wit_pipeline", "demo", "run", "--output", str(out), *sets]
    try:
        demo_s = _run(demo_cmd, work / "demo.log")
        summary = json.loads((out / "demo.json").read_text())
        base_out = work / "train-alone"
        cfg = (out / "train" / "train.yaml").read_text()
        cfg = cfg.replace(f"output: {out / 'train'}", f"output: {base_out}")
        (work / "train-alone.yaml").write_text(cfg)
        train_cmd = [sys.executable, "-m", "wit_pipeline.train", "--config"]
        train_s = _run([*train_cmd, str(work / "train-alone.yaml")], work / "train.log")
        rerun_s = _run(demo_cmd, work / "rerun.log")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    t = summary["timings"]
    z = summary["zeroshot"]
    command = "python benchmarks/bench_demo.py" + (" --quick" if args.quick else "")
    print(header("The demo: `make build-dataset`", command))
    print(
        f"{summary['web']['page_images'] + summary['web']['table_images']:,} image references "
        f"({summary['web']['pages']} pages + table), {summary['build']['samples']:,} final "
        f"samples, {summary['train']['steps']} training steps of `wit-tiny`. Zero-shot top-1 on "
        f"the held-out renders: {100 * z['top1']:.1f}% (chance {100 * z['chance_top1']:.1f}%), "
        f"top-5 {100 * z['top5']:.1f}%. Planted mess: {summary['audit']['caught']} caught, "
        f"{summary['audit']['earlier']} dropped earlier, {len(summary['audit']['missed'])} missed.\n"
    )
    rows = [
        ["training alone, same shards and options (baseline)", f"{train_s:.1f}", "1.00x"],
        ["`wit demo run`, end to end", f"{demo_s:.1f}", f"{demo_s / train_s:.2f}x"],
        ["`wit demo run` again, everything done", f"{rerun_s:.1f}", f"{rerun_s / train_s:.2f}x"],
    ]
    print(table(rows, ["command (fresh process)", "wall s", "vs baseline"]))
    print()
    parts = [
        ["generate and serve the web", t["web_s"]],
        ["`wit build` (5 steps)", t["build_s"]],
        ["train + zero-shot eval (subprocess)", t["train_s"]],
        ["score the shards with the trained model", t["score_s"]],
    ]
    parts.append(["start-up, audit, summary (rest)", demo_s - sum(p[1] for p in parts)])
    print(
        table(
            [[n, f"{s:.1f}", f"{100 * s / demo_s:.0f}%"] for n, s in parts],
            ["part of the demo", "wall s", "share"],
        )
    )
    print(f"\nWhole demo: {demo_s:.0f} s = {demo_s / BUDGET_S:.2f} of the 600 s budget.")


if __name__ == "__main__":
    main()
