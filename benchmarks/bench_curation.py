"""Does curation train a better CLIP than the raw crawl? The filter and the models it trains.

A noisy crawl of Flickr8k train photos (``curation_pool.py``: 40% of the alt texts belong to
another photo, re-hosted copies with alt texts of their own, junk and foreign alt texts) is
served on loopback; Flickr8k train photos that are not in it are the trusted set. Steps, all
with the ``wit`` commands a user runs (in this process, so only the first import is paid):

1. ``wit seed --input trusted.parquet --allow-loopback``: the seed filter (its defaults;
   ``--seed-set`` changes them, ``--seed-pool`` passes the raw build as ``--pool``);
2. five training sets from the pool:
   - ``raw``: ``wit build`` of the pool, no filter (DataComp's baseline);
   - ``curated``: ``wit build --seed-model seed.pt --threshold auto`` (a fixed
     ``--curated-threshold`` or ``--curated-keep-fraction`` where the auto threshold is not
     available);
   - ``oracle``: the raw build's pairs that truly describe their photo (the upper reference);
   - ``random``: as many pairs of the raw build, drawn at random (seeded), as ``curated`` holds;
   - ``top30``: ``wit build --seed-model seed.pt --keep-fraction 0.3`` (DataComp's filter);
   - ``top50``: the same with the top half (``--half-fraction``), a looser fixed share;
3. precision (share of a set's pairs that describe their photo) and recall (share of the pool's
   true pairs the set holds), exactly, from the truth of every pair;
4. ``python -m wit_pipeline.train`` on each set with the same model, steps, batch size and
   training seed, for each of ``--train-seeds``; ``wit eval retrieval`` on the Flickr8k dev
   split (text-to-image R@10, chance 1%), with a 95% bootstrap interval over the eval captions
   (of the mean over the training seeds).

Prints a Markdown table (precision, recall, R@10 with interval, ratios to raw and oracle,
samples, pairs). Everything lives in ``--work-dir`` and a rerun reuses what is finished.

    python benchmarks/bench_curation.py --quick            # a few minutes
    python benchmarks/bench_curation.py                    # the full run (about an hour)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import common
import curation_pool as cp
import numpy as np

CONDITIONS = ("raw", "curated", "oracle", "random", "top30", "top50")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work-dir", default="", help="default: a new temporary folder")
    p.add_argument("--shared-data", default="", help="default: $WIT_SHARED_DATA, ../shared/data")
    p.add_argument("--trusted", type=int, default=2000, help="trusted photos")
    p.add_argument("--pool", type=int, default=4000, help="pool photos")
    p.add_argument("--mismatch", type=float, default=0.4, help="share of another photo's alt text")
    p.add_argument("--junk", type=float, default=0.05)
    p.add_argument("--foreign", type=float, default=0.03)
    p.add_argument("--rehost", type=float, default=0.25, help="share of photos re-hosted")
    p.add_argument("--pool-seed", type=int, default=0)
    p.add_argument("--model", default="wit-tiny", help="the model trained on each set")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--curated-threshold", type=float, help="fixed threshold instead of auto")
    g.add_argument("--curated-keep-fraction", type=float, help="top fraction instead of auto")
    p.add_argument(
        "--target-precision",
        type=float,
        help="score.target_precision of the auto threshold (default: the config's, 0.95)",
    )
    p.add_argument("--top-fraction", type=float, default=0.3, help="the top30 condition's share")
    p.add_argument("--half-fraction", type=float, default=0.5, help="the top50 condition's share")
    p.add_argument(
        "--seed-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a wit seed option (--set seed.KEY=VALUE), repeatable",
    )
    p.add_argument("--seed-pool", action="store_true", help="wit seed --pool RAW_BUILD")
    p.add_argument("--eval-max-images", type=int, default=0, help="dev images (0: all 1,000)")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples of the eval captions")
    p.add_argument("--quick", action="store_true", help="a few minutes: small pool, few steps")
    p.add_argument("--json", default="", help="also write the results here")
    return p


QUICK = {
    "trusted": 500,
    "pool": 1000,
    "steps": 100,
    "batch_size": 64,
    "warmup": 10,
    "train_seeds": [0],
    "bootstrap": 300,
}


def auto_threshold_supported() -> bool:
    """Whether this checkout's ``wit build`` takes ``--threshold auto`` (issue 13, part 2)."""
    from wit_pipeline import cli

    parser = cli.build_parser()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args, unknown = parser.parse_known_args(
                ["build", "--input", "x", "--output", "y", "--threshold", "auto"]
            )
    except SystemExit:  # a --threshold that takes numbers only
        return False
    return not unknown and str(getattr(args, "threshold", "")) == "auto"


# ---------------------------------------------------------------------------------------------
# Running the commands


def wit(argv: Sequence[str], log: list[str]) -> int:
    """``wit ARGV`` in this process (stdout captured); raises when it fails."""
    from wit_pipeline import cli

    log.append("wit " + " ".join(argv))
    print(f"[bench] wit {' '.join(argv)}", file=sys.stderr, flush=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(list(argv))
    if status != 0:
        raise SystemExit(f"wit {' '.join(argv)} failed with status {status}\n{out.getvalue()}")
    return status


def build_pool(
    name: str, manifest: dict, work: str, extra: Sequence[str], log: list[str], base: str = ""
) -> str:
    """``wit build`` of the pool into ``work/builds/NAME``; with ``base`` a copy of that build
    is the start, so only the finalize step (dedup, balance, score, shards) runs again."""
    out = os.path.join(work, "builds", name)
    if base and not os.path.exists(os.path.join(out, "build.json")):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(base, out, copy_function=os.link)  # the overwrite clears finalize
    argv = ["build", "--input", *manifest["pool_inputs"], "--output", out, "--allow-loopback"]
    wit([*argv, *extra, *(["--overwrite"] if base else [])], log)
    return out


def train_and_eval(
    args, data_dir: str, out: str, seed: int, shared: str, log: list[str], batch_size: int
) -> dict:
    """Train on ``data_dir`` (same model, steps, lr for every set; the batch is ``--batch-size``
    unless the set holds fewer samples, see ``batch_for``) and evaluate."""
    from wit_pipeline.train import loop

    result_path = os.path.join(out, "eval.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    shutil.rmtree(out, ignore_errors=True)
    flags = [
        "--train-data", data_dir, "--model", args.model, "--max-steps", str(args.steps),
        "--epochs", "100000", "--batch-size", str(batch_size), "--lr", str(args.lr),
        "--warmup", str(args.warmup), "--seed", str(seed), "--workers", str(args.workers),
        "--output", out, "--no-progress", "--no-plots", "--no-epoch-checkpoints",
        "--log-every", "50",
    ]  # fmt: skip
    log.append("python -m wit_pipeline.train " + " ".join(flags))
    print(f"[bench] train {out}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    with contextlib.redirect_stdout(io.StringIO()):
        status = loop.main(flags)
    if status != 0:
        raise SystemExit(f"training on {data_dir} failed")
    train_s = time.monotonic() - t0
    eval_path = os.path.join(out, "retrieval.json")
    wit(
        [
            "eval", "retrieval", "--checkpoint", os.path.join(out, "checkpoints", "latest.pt"),
            "--images", os.path.join(shared, "flickr8k", "images"),
            "--captions", os.path.join(shared, "flickr8k", "captions.tsv"), "--split", "dev",
            "--max-images", str(args.eval_max_images), "--ranks", "--output", eval_path,
        ],
        log,
    )  # fmt: skip
    with open(eval_path) as f:
        ev = json.load(f)
    result = {
        "seed": seed,
        "R@10": ev["text_to_image_R@10"],
        "ranks": ev["text_to_image_ranks"],
        "train_s": round(train_s, 1),
        "batch_size": batch_size,
    }
    with open(result_path, "w") as f:
        json.dump(result, f)
    return result


# ---------------------------------------------------------------------------------------------
# The benchmark


def batch_for(batch_size: int, samples: int, workers: int) -> int:
    """The training batch of a set: ``batch_size``, or as many samples as each data loader
    worker holds when that is fewer (a strict threshold can keep less than a batch, and the
    trainer needs a full batch per worker)."""
    return max(1, min(batch_size, samples // max(1, workers)))


def random_pairs(raw_dir: str, n: int, seed: int) -> set[str]:
    """``n`` uids drawn at random (seeded) from the pairs of the raw build's shards."""
    from wit_pipeline import shards

    uids = sorted(
        p["uid"] for _, pairs in cp.shard_pairs(shards.list_shards(raw_dir)) for p in pairs
    )
    return set(random.Random(f"random:{seed}").sample(uids, min(n, len(uids))))


def curated_flags(args: argparse.Namespace) -> list[str]:
    """``wit build`` flags of the curated set: the auto threshold unless a fixed threshold or
    a top fraction is given."""
    if args.curated_threshold is not None:
        return ["--set", f"score.threshold={args.curated_threshold}"]
    if args.curated_keep_fraction is not None:
        return ["--set", f"score.keep_fraction={args.curated_keep_fraction}"]
    if not auto_threshold_supported():
        raise SystemExit(
            "this checkout's wit build has no --threshold auto (issue 13, part 2): pass "
            "--curated-threshold X or --curated-keep-fraction F"
        )
    flags = ["--threshold", "auto"]
    if args.target_precision is not None:
        flags += ["--set", f"score.target_precision={args.target_precision}"]
    return flags


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the results (also ``WORK/results.json``)."""
    shared = args.shared_data or str(common.shared_data())
    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="bench-curation-"))
    os.makedirs(work, exist_ok=True)
    log: list[str] = []
    started = time.monotonic()
    timings: dict[str, float] = {}
    pool_cfg = cp.PoolConfig(
        trusted=args.trusted,
        pool=args.pool,
        mismatch=args.mismatch,
        junk=args.junk,
        foreign=args.foreign,
        rehost=args.rehost,
        seed=args.pool_seed,
    )
    curated = curated_flags(args)
    sets: dict[str, str] = {}
    with cp.served_pool(os.path.join(work, "pool"), pool_cfg, shared) as manifest:
        truth = cp.load_truth(manifest["truth"])
        t0 = time.monotonic()
        raw = build_pool("raw", manifest, work, [], log)
        sets["raw"] = os.path.join(raw, "shards")
        timings["raw_build_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        seed_dir = os.path.join(work, "seed")
        seed_argv = ["seed", "--input", manifest["trusted"], "--output", seed_dir]
        seed_argv += ["--allow-loopback", "--overwrite"]
        for kv in args.seed_set:
            seed_argv += ["--set", kv if kv.startswith("seed.") else f"seed.{kv}"]
        if args.seed_pool:
            seed_argv += ["--pool", raw]
        wit(seed_argv, log)
        timings["seed_s"] = time.monotonic() - t0
        seed_pt = os.path.join(seed_dir, "seed.pt")
        with open(os.path.join(seed_dir, "seed.json")) as f:
            seed_doc = json.load(f)
        t0 = time.monotonic()
        scored = {
            "curated": curated,
            "top30": ["--set", f"score.keep_fraction={args.top_fraction}"],
            "top50": ["--set", f"score.keep_fraction={args.half_fraction}"],
        }
        for name, flags in scored.items():
            if name in args.conditions or (name == "curated" and "random" in args.conditions):
                b = build_pool(name, manifest, work, ["--seed-model", seed_pt, *flags], log, raw)
                sets[name] = os.path.join(b, "shards")
        timings["scored_builds_s"] = time.monotonic() - t0
    if "oracle" in args.conditions:
        cp.rewrite_pairs(sets["raw"], os.path.join(work, "data", "oracle"), truth.__getitem__)
        sets["oracle"] = os.path.join(work, "data", "oracle")
    measured = {name: cp.measure(d, truth) for name, d in sets.items()}
    if "random" in args.conditions:
        chosen = random_pairs(sets["raw"], measured["curated"]["pairs"], args.pool_seed)
        cp.rewrite_pairs(sets["raw"], os.path.join(work, "data", "random"), chosen.__contains__)
        sets["random"] = os.path.join(work, "data", "random")
        measured["random"] = cp.measure(sets["random"], truth)
    t0 = time.monotonic()
    runs: dict[str, list[dict]] = {}
    for name in args.conditions:
        runs[name] = [
            train_and_eval(
                args,
                sets[name],
                os.path.join(work, "runs", f"{name}-s{s}"),
                s,
                shared,
                log,
                batch_for(args.batch_size, measured[name]["samples"], args.workers),
            )
            for s in args.train_seeds
        ]
    timings["train_eval_s"] = time.monotonic() - t0
    timings["total_s"] = time.monotonic() - started
    rows = summarize(args, measured, runs)
    curated_stats = {}
    if "curated" in sets:
        with open(os.path.join(os.path.dirname(sets["curated"]), "stats.json")) as f:
            curated_stats = json.load(f).get("score") or {}
        with open(os.path.join(os.path.dirname(sets["curated"]), "finalize", "score.json")) as f:
            curated_stats = {"score.json": json.load(f), "stats.score": curated_stats}
    results = {
        "pool": {
            k: manifest[k] for k in ("pool_photos", "pool_pairs", "pool_kinds", "trusted_photos")
        },
        "seed": {
            "heldout": seed_doc["heldout"],
            "recipe": seed_doc["recipe"],
            "chosen": seed_doc["chosen"],
            "pool_separation": pool_separation(seed_pt, sets["raw"], truth),
        },
        "curated_score": curated_stats,
        "rows": rows,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "commands": log,
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "work_dir": work,
    }
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def pool_separation(seed_pt: str, raw_dir: str, truth: dict[str, bool]) -> dict[str, Any]:
    """The seed's AUC and recall at 95% precision on the raw pool's pairs and their truth."""
    from wit_pipeline import seed
    from wit_pipeline.train import separation

    pairs, labels = cp.labelled_pairs(raw_dir, truth)
    scores = seed.score_pool(seed_pt, pairs)
    at = separation.recall_at_precision(scores[labels], scores[~labels])
    return {
        "auc": separation.roc_auc(scores[labels], scores[~labels]),
        "recall@p95": at["recall"],
        "true_pairs": int(labels.sum()),
        "false_pairs": int((~labels).sum()),
    }


def summarize(args, measured: dict, runs: dict) -> list[dict[str, Any]]:
    """One row per condition: precision, recall, sizes, R@10 (mean over training seeds) with a
    bootstrap interval over the eval captions, ratios to raw and oracle."""
    from wit_pipeline.train.evaluate import bootstrap_interval

    rows = []
    for name in args.conditions:
        rs = runs[name]
        hits = np.asarray([np.asarray(r["ranks"]) < 10 for r in rs])
        lo, hi = bootstrap_interval(hits, resamples=args.bootstrap)
        m = measured[name]
        rows.append(
            {
                "condition": name,
                "precision": m["precision"],
                "recall": m["recall"],
                "samples": m["samples"],
                "pairs": m["pairs"],
                "R@10": float(np.mean([r["R@10"] for r in rs])),
                "R@10_per_seed": [r["R@10"] for r in rs],
                "R@10_ci95": [lo, hi],
                "batch_size": rs[0].get("batch_size", args.batch_size) if rs else None,
            }
        )
    by = {r["condition"]: r["R@10"] for r in rows}
    for r in rows:
        r["vs_raw"] = r["R@10"] / by["raw"] if by.get("raw") else None
        r["vs_oracle"] = r["R@10"] / by["oracle"] if by.get("oracle") else None
    return rows


def format_table(results: dict[str, Any]) -> str:
    def f(x, digits=3):
        return "-" if x is None else f"{x:.{digits}f}"

    head = [
        "set",
        "precision",
        "recall",
        "R@10 (95% CI)",
        "vs raw",
        "vs oracle",
        "samples",
        "pairs",
        "batch",
    ]
    rows = [
        [
            r["condition"],
            f(r["precision"]),
            f(r["recall"]),
            f"{100 * r['R@10']:.2f}% ({100 * r['R@10_ci95'][0]:.2f}-{100 * r['R@10_ci95'][1]:.2f})",
            f(r["vs_raw"], 2) + "x" if r["vs_raw"] is not None else "-",
            f(r["vs_oracle"], 2) + "x" if r["vs_oracle"] is not None else "-",
            f"{r['samples']:,}",
            f"{r['pairs']:,}",
            str(r.get("batch_size") or "-"),
        ]
        for r in results["rows"]
    ]
    s = results["seed"]
    lines = [
        common.table(rows, head),
        "",
        f"Seed: held-out AUC {s['heldout']['auc']:.3f}, recall@P95 {s['heldout']['recall@p95']:.3f} "
        f"({s['heldout']['num_true']:,} true + {s['heldout']['num_shuffled']:,} shuffled pairs); "
        f"on the raw pool's labels AUC {s['pool_separation']['auc']:.3f}, recall@P95 "
        f"{s['pool_separation']['recall@p95']:.3f}.",
        f"Pool: {results['pool']}. Timings: {results['timings']}.",
        f"Curated threshold: {json.dumps(results['curated_score'], sort_keys=True)}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.quick:
        defaults = parser().parse_args([])
        for k, v in QUICK.items():
            if getattr(args, k) == getattr(defaults, k):
                setattr(args, k, v)
    load = os.getloadavg()
    results = run(args)
    results["load"] = {"before": load, "after": os.getloadavg()}
    command = "python benchmarks/bench_curation.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    print(common.header("Curation benchmark", command.strip()))
    print(
        f"Load average before/after: {load[0]:.1f} / {os.getloadavg()[0]:.1f}. "
        f"Training: {args.model}, {args.steps} steps, batch {args.batch_size}, seeds "
        f"{args.train_seeds}.\n"
    )
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
