"""What makes a better seed filter at this scale? A fixed grid of ``wit seed`` recipes.

Data: the trusted set and the noisy pool of ``bench_curation.py`` (``curation_pool.py``:
Flickr8k train photos; 2,000 trusted photos with five captions each, 4,000 pool photos whose
alt texts are 40% another photo's, plus re-hosted copies, junk and foreign alt texts), the pool
built with ``wit build`` (no filter). The trusted photos are split once (``seed.holdout``, 10%
by key hash: about 200 photos, 1,000 true pairs) and every grid point trains on the same
training part with ``wit_pipeline.seed`` (the code of ``wit seed``), early-stopped on the
held-out AUC.

Each of the 11 grid points changes one thing against the base recipe (``config.SeedConfig``'s
defaults, ``--epochs`` and ``--patience`` by default ``wit seed``'s): model size (wit-nano
32 px, wit-small 96 px), image size (wit-tiny at 96 px), augmentation (crop scale 0.5 and
flips), epochs (half and twice the base's: the learning rate follows a cosine over the epochs,
so fewer epochs also anneal sooner), and using the pool itself: ``pool-all`` (the trusted set
plus the whole raw pool), ``pool-seed50`` (bootstrapping: the
base seed scores the pool, the top half of each pool half is added, one more model is
trained), ``pool-seed50-r2`` (a second round, cross-fitted: models trained on one half score
the other), ``pool-early50`` (selection by fit early in training: two models trained three
epochs on the trusted set plus the other half of the raw pool score each half).

Measured per point, for its final model: the held-out separation (true vs shuffled pairs,
50/50: ROC AUC and recall at 95% precision; the epoch was chosen on this set, so it is
slightly optimistic) and the separation on the raw pool's own labels (its true pairs against
its mismatched, junk and foreign ones, at the pool's mix), plus training samples, steps,
chosen epoch and seconds. ``--quick`` runs the same grid on a smaller set with fewer epochs.

Size: 11 points, 15 training runs (the pool points reuse the base point's first run), on
1,800 training photos (plus up to 4,000 pool photos); about an hour on 2 quiet cores, half of
it ``small`` and ``tiny-96`` (an estimate scaled from runs on the loaded machine, BENCHMARKS.md).
A rerun reuses every finished point (``WORK/grid/NAME/point.json``).

    python benchmarks/bench_seed.py --quick
    python benchmarks/bench_seed.py --points tiny tiny-aug pool-seed50
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import bench_curation
import common
import curation_pool as cp

# (name, what it changes against the base recipe). Fixed: the grid is the benchmark.
GRID: tuple[tuple[str, dict[str, Any]], ...] = (
    ("tiny", {}),
    ("nano", {"model": "wit-nano"}),
    ("small", {"model": "wit-small"}),
    ("tiny-96", {"model": "wit-tiny-96"}),
    ("tiny-aug", {"crop_scale_min": 0.5, "hflip": 0.5}),
    ("tiny-short", {}),  # half the epochs: the cosine schedule ends sooner (see points())
    ("tiny-long", {}),  # twice the epochs and patience (see points())
    ("pool-all", {"rounds": 1, "pool_keep_fraction": 1.0}),
    ("pool-seed50", {"rounds": 1, "pool_keep_fraction": 0.5}),
    ("pool-seed50-r2", {"rounds": 2, "pool_keep_fraction": 0.5}),
    ("pool-early50", {"rounds": 1, "pool_keep_fraction": 0.5, "selection": "early"}),
)
QUICK = {"trusted": 500, "pool": 1000, "epochs": 8, "patience": 3}


def register_tiny_96() -> None:
    """``wit-tiny-96``: wit-tiny at 96 px (patch 8: 12 x 12 tokens instead of 8 x 8), to measure
    image size alone; checkpoints record the architecture, so they load anywhere."""
    import open_clip

    from wit_pipeline import models

    cfg = models.model_config("wit-tiny")
    cfg["vision_cfg"]["image_size"] = 96
    directory = tempfile.mkdtemp(prefix="wit-tiny-96-")
    with open(os.path.join(directory, "wit-tiny-96.json"), "w") as f:
        json.dump(cfg, f)
    open_clip.add_model_config(directory)


def points(args) -> list[tuple[str, dict[str, Any]]]:
    """The grid's recipes as ``SeedConfig`` overrides (base: ``--epochs``, ``--patience``)."""
    out = []
    grid = dict(GRID)
    for name in args.points or grid:  # in the order given
        change = grid[name]
        recipe = {"epochs": args.epochs, "patience": args.patience, **change}
        if name == "tiny-long":
            recipe.update(epochs=2 * args.epochs, patience=2 * args.patience)
        if name == "tiny-short":
            recipe.update(epochs=max(1, args.epochs // 2))
        out.append((name, recipe))
    return out


def trusted_shards(manifest: dict, shared: str, out: str) -> list[str]:
    """The trusted photos with their five captions as finished shards (what ``wit seed`` builds
    from ``trusted.parquet``, without the crawl: keys are the photos' file stems)."""
    import pyarrow.parquet as pq

    from wit_pipeline import seed, shards
    from wit_pipeline.train import caption_sets

    if not shards.list_shards(out):
        t = pq.read_table(manifest["trusted"])
        caps: dict[str, list[str]] = {}
        for url, c in zip(
            t.column("url").to_pylist(), t.column("caption").to_pylist(), strict=True
        ):
            caps.setdefault(url.rsplit("/", 1)[1], []).append(c)
        samples = []
        for name, captions in caps.items():
            with open(os.path.join(shared, "flickr8k", "images", name), "rb") as f:
                image = f.read()
            key = caption_sets.sample_key(name)
            meta = {"key": key, "url": name, "caption": captions[0], "captions": captions}
            samples.append(shards.Sample(key, image, captions[0], meta))
        seed.write_sample_shards(out, samples)
    return shards.list_shards(out)


def finished_pool(work: str, cfg: cp.PoolConfig) -> dict | None:
    """The pool's manifest when its raw build is finished (then nothing needs serving), else
    None."""
    path = os.path.join(work, "pool", "pool.json")
    if not os.path.exists(os.path.join(work, "builds", "raw", "done", "report.json")):
        return None
    if not os.path.exists(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    return manifest if manifest.get("config") == dataclasses.asdict(cfg) else None


def run_point(name, recipe, *, work, split, pool_paths, raw_dir, truth, base_dir, log):
    """Train one grid point (reusing the base point's round 0 when it has the same recipe)
    and measure its final model."""
    from wit_pipeline import config, seed

    cfg = config.SeedConfig(**recipe)
    out = os.path.join(work, "grid", name)
    done = os.path.join(out, "point.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    trusted_part = {
        k: v
        for k, v in recipe.items()
        if k not in ("rounds", "pool_keep_fraction", "selection", "early_epochs")
    }
    if base_dir and recipe.get("rounds") and not os.path.exists(os.path.join(out, "runs")):
        with open(os.path.join(base_dir, "point.json")) as f:
            base_recipe = json.load(f)["recipe"]
        if base_recipe == trusted_part:
            os.makedirs(os.path.join(out, "runs"), exist_ok=True)
            shutil.copytree(
                os.path.join(base_dir, "runs", "round0"),
                os.path.join(out, "runs", "round0"),
                copy_function=os.link,
            )
    t0 = time.monotonic()
    ctx = seed.SeedContext(out, cfg, split, log)
    runs, pool_info = seed.run_rounds(ctx, pool_paths)
    seconds = time.monotonic() - t0
    final = runs[-1]
    held = seed.heldout_separation(final.checkpoint, split.heldout_dir, cfg.device)
    pool_sep = bench_curation.pool_separation(final.checkpoint, raw_dir, truth)
    result = {
        "point": name,
        "recipe": trusted_part,
        "pool_recipe": {k: v for k, v in recipe.items() if k not in trusted_part},
        "heldout_auc": held["auc"],
        "heldout_recall@p95": held["recall@p95"],
        "pool_auc": pool_sep["auc"],
        "pool_recall@p95": pool_sep["recall@p95"],
        "train_samples": final.info["train_samples"],
        "best_epoch": final.info["best"]["epoch"],
        "epochs_run": final.info["epochs_run"],
        "steps": sum(r.info["steps"] for r in runs),
        "runs": len(runs),
        "seconds": round(seconds, 1),
        "pool": pool_info,
    }
    with open(done, "w") as f:
        json.dump(result, f, indent=1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work-dir", default="")
    p.add_argument("--shared-data", default="")
    p.add_argument("--trusted", type=int, default=2000)
    p.add_argument("--pool", type=int, default=4000)
    p.add_argument(
        "--epochs", type=int, default=None, help="the base recipe's most epochs (wit seed's: 40)"
    )
    p.add_argument("--patience", type=int, default=None, help="(wit seed's: 8)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--points", nargs="+", default=[], choices=[n for n, _ in GRID])
    p.add_argument("--quick", action="store_true", help=f"{QUICK}")
    p.add_argument("--json", default="")
    args = p.parse_args()
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    from wit_pipeline import config

    args.epochs = args.epochs or config.SeedConfig().epochs
    args.patience = args.patience if args.patience is not None else config.SeedConfig().patience
    shared = args.shared_data or str(common.shared_data())
    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="bench-seed-"))
    os.makedirs(work, exist_ok=True)
    register_tiny_96()
    load = os.getloadavg()
    log_lines: list[str] = []
    pool_cfg = cp.PoolConfig(trusted=args.trusted, pool=args.pool)
    raw = os.path.join(work, "builds", "raw")
    manifest = finished_pool(work, pool_cfg)
    if manifest is None:  # serve the pool only to build it
        with cp.served_pool(os.path.join(work, "pool"), pool_cfg, shared) as manifest:
            raw = bench_curation.build_pool("raw", manifest, work, [], log_lines)
    truth = cp.load_truth(manifest["truth"])
    from wit_pipeline import config, seed, shards

    paths = trusted_shards(manifest, shared, os.path.join(work, "trusted"))
    split = seed.split_trusted(paths, os.path.join(work, "trusted-split"), config.SeedConfig())
    pool_paths = shards.list_shards(os.path.join(raw, "shards"))
    results = []
    base_dir = os.path.join(work, "grid", "tiny")  # a finished base point lends its round 0
    base_dir = base_dir if os.path.exists(os.path.join(base_dir, "point.json")) else ""
    for name, recipe in points(args):
        recipe = {**recipe, "workers": args.workers}
        print(f"[bench] point {name}: {recipe}", file=sys.stderr, flush=True)
        r = run_point(
            name,
            recipe,
            work=work,
            split=split,
            pool_paths=pool_paths,
            raw_dir=os.path.join(raw, "shards"),
            truth=truth,
            base_dir=base_dir,
            log=lambda m: print(f"[seed] {m}", file=sys.stderr, flush=True),
        )
        if name == "tiny":
            base_dir = os.path.join(work, "grid", name)
        results.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    print(
        common.header(
            "Seed recipe grid", "python benchmarks/bench_seed.py " + " ".join(sys.argv[1:])
        )
    )
    print(
        f"Load average before/after: {load[0]:.1f} / {os.getloadavg()[0]:.1f}. Trusted: "
        f"{split.sizes['train']['samples']:,} training + {split.sizes['heldout']['samples']:,} "
        f"held-out photos ({split.sizes['heldout']['pairs']:,} true + as many shuffled pairs); "
        f"pool: {manifest['pool_photos']:,} photos, {manifest['pool_pairs']:,} alt texts "
        f"{manifest['pool_kinds']}.\n"
    )
    base = next((r for r in results if r["point"] == "tiny"), None)
    rows = []
    for r in results:
        change = {
            **{
                k: v
                for k, v in r["recipe"].items()
                if k != "workers" and (base is None or base["recipe"].get(k) != v)
            },
            **r["pool_recipe"],
        }
        change.pop("workers", None)
        rows.append(
            [
                r["point"],
                ", ".join(f"{k}={v}" for k, v in change.items()) or "(base)",
                f"{r['heldout_auc']:.3f}",
                f"{r['heldout_recall@p95']:.3f}",
                f"{r['pool_auc']:.3f}",
                f"{r['pool_recall@p95']:.3f}",
                f"{r['heldout_auc'] / base['heldout_auc']:.3f}x" if base else "-",
                f"{r['train_samples']:,}",
                f"{r['best_epoch']}/{r['epochs_run']}",
                f"{r['seconds']:.0f}",
            ]
        )
    head = [
        "point",
        "change",
        "held-out AUC",
        "held-out R@P95",
        "pool AUC",
        "pool R@P95",
        "AUC vs base",
        "train samples",
        "best/run epochs",
        "s",
    ]
    print(common.table(rows, head))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "args": vars(args), "load": load}, f, indent=1)


if __name__ == "__main__":
    main()
