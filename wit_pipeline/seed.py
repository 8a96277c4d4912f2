"""``wit seed``: a filter network trained on a trusted set, in one command (DFN's recipe).

A user without a pretrained CLIP (offline, or a new domain) trains a small one on data they
trust, then filters the crawl with it (``wit build --seed-model DIR/seed.pt``). The steps, each
resumable, all under ``DIR/``:

1. ``build/``: the trusted input (a URL/caption table, a WARC, ...) built with the same stages
   as ``wit build`` (:func:`trusted_shards`); skipped when the input is finished shards;
2. ``split/train/``, ``split/heldout/``: a share ``seed.holdout`` of the samples held out by a
   hash of their key (:func:`in_holdout`), the same on every machine and rerun;
3. ``runs/<name>/``: ``python -m wit_pipeline.train`` (in this process) with the seed recipe
   (``config.SeedConfig``): every epoch the held-out separation of true from shuffled pairs is
   measured (``train/separation.py``: ROC AUC, recall at 95% precision), the best epoch is kept
   (``checkpoints/best.pt``) and training stops after ``seed.patience`` epochs without a better
   AUC;
4. with ``--pool`` and ``seed.rounds`` > 0, rounds of selection from the pool itself
   (:func:`run_rounds`): pool pairs are scored by a model that never trained on them, the top
   ``seed.pool_keep_fraction`` of each half of the pool is added to the training set, and the
   next model is trained on it (cross-fitting: a model trained on one half scores the other);
5. ``seed.pt`` (the chosen checkpoint without its optimizer state: a trainer checkpoint that
   ``wit build --seed-model``, ``wit score`` and ``wit eval`` load as they are) and ``seed.json``
   (recipe, data sizes, every evaluation, the chosen one's held-out separation).

A rerun skips what is finished (the build by its markers, the split and each training run by a
fingerprint of what decides them) and resumes an interrupted training run; a rerun with another
recipe is refused unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from wit_pipeline import config as config_lib
from wit_pipeline import fileio, shards
from wit_pipeline.config import BuildConfig, SeedConfig
from wit_pipeline.errors import WitError

SEED_CHECKPOINT = "seed.pt"
SEED_JSON = "seed.json"
SEED_FORMAT = "wit-pipeline/seed"
SEED_VERSION = 1
SPLIT_DIR = "split"
RUNS_DIR = "runs"
POOL_DIR = "pool"
RUN_DONE = "run.json"
METRIC = "pairs/auc"
# Options of the recipe that decide where and how fast it runs, not what it computes.
EXECUTION_ONLY = ("workers", "threads", "device")
# Trainer options that do not change what a run computes (where it writes, how it reports).
_RUN_IDENTITY_EXCLUDED = (*EXECUTION_ONLY, "output", "resume", "progress", "log_every")
SAMPLES_PER_SHARD = 1000

Log = Callable[[str], None]
LOG = logging.getLogger(__name__)


def _stderr(msg: str) -> None:
    print(f"wit seed: {msg}", file=sys.stderr, flush=True)


def _digest(obj: Any) -> str:
    doc = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:32]


def _hash_unit(*parts: str) -> float:
    """A number in [0, 1) from a hash of ``parts``: the same on every machine."""
    h = hashlib.sha256(":".join(parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def recipe_dict(recipe: SeedConfig) -> dict[str, Any]:
    """The options of the recipe that decide the seed (execution-only ones left out)."""
    return {k: v for k, v in dataclasses.asdict(recipe).items() if k not in EXECUTION_ONLY}


# ---------------------------------------------------------------------------------------------
# The trusted set: built, or given as finished shards


def finished_shards(path: str) -> list[str]:
    """The finished shards of ``path``: a shard folder, or a build folder's ``shards/``."""
    if not (fileio.is_local(path) and os.path.isdir(path)) and not fileio.exists(path):
        return []
    return shards.list_shards(path) or shards.list_shards(fileio.join(path, "shards"))


def trusted_shards(
    inputs: Sequence[str],
    output: str,
    cfg: BuildConfig,
    *,
    queries_path: str | None = None,
    beam_args: Sequence[str] = (),
    runner: str | None = None,
    overwrite: bool = False,
    log: Log = _stderr,
) -> tuple[list[str], str]:
    """The trusted set's shards and where they come from (``"shards"`` or ``"build"``).

    One input that holds finished shards (a shard folder or a build folder) is used as it is;
    anything else is built into ``output/build`` with ``wit build``'s stages (a rerun skips the
    finished steps).
    """
    if len(inputs) == 1:
        found = finished_shards(inputs[0])
        if found:
            log(f"trusted set: {len(found)} finished shard(s) in {inputs[0]} (no build)")
            return found, "shards"
    from wit_pipeline import build

    build_dir = fileio.join(output, "build")
    build.run_build(
        inputs,
        build_dir,
        cfg,
        queries_path=queries_path,
        beam_args=beam_args,
        runner=runner,
        overwrite=overwrite,
        log=lambda m: log(f"build: {m}"),
    )
    found = shards.list_shards(fileio.join(build_dir, "shards"))
    if not found:
        raise WitError(f"the trusted build {build_dir} wrote no shards")
    return found, "build"


def shards_identity(paths: Sequence[str]) -> list[list[str]]:
    """Name, size and modification time of each shard: enough to notice changed shards."""
    from wit_pipeline.build import file_identity

    return [[p, file_identity(p)] for p in paths]


# ---------------------------------------------------------------------------------------------
# Samples in and out of shards


def in_holdout(key: str, fraction: float, salt: str = "heldout") -> bool:
    """Whether sample ``key`` is held out: a hash of ``salt`` and the key below ``fraction``."""
    return _hash_unit(salt, key) < fraction


def pool_half(key: str, salt: str = "pool-half") -> int:
    """0 or 1: the half of the pool a sample belongs to, by a hash of its key."""
    return int(_hash_unit(salt, key) >= 0.5)


def read_samples(paths: Sequence[str]) -> list[shards.Sample]:
    """Every sample of shard tars with an image, as :class:`shards.Sample` (metadata parsed)."""
    from wit_pipeline.train import data

    out = []
    for path in paths:
        for raw in shards.iter_samples(path):
            ext = next((e for e in data.IMAGE_EXTS if raw.get(e)), None)
            if ext is None:
                continue
            meta = json.loads(raw["json"]) if raw.get("json") else {}
            caption = (raw.get("txt") or b"").decode("utf-8", errors="replace")
            out.append(shards.Sample(raw["__key__"], raw[ext], caption, meta, image_ext=ext))
    return out


def with_captions(sample: shards.Sample, captions: Sequence[str]) -> shards.Sample:
    """``sample`` holding only ``captions`` (``KEY.txt`` the first, ``KEY.json``'s list all)."""
    meta = {**dict(sample.meta), "captions": list(captions), "caption": captions[0]}
    return dataclasses.replace(sample, caption=captions[0], meta=meta)


def write_sample_shards(
    directory: str, samples: Sequence[shards.Sample], *, samples_per_shard: int = SAMPLES_PER_SHARD
) -> dict[str, Any]:
    """``samples`` (sorted by key) as final-format shards plus ``manifest.json`` in
    ``directory`` (cleared first); the Parquet tables hold ``key``, ``url``, ``caption``,
    ``captions``. Returns the manifest."""
    if fileio.exists(directory):
        shutil.rmtree(directory)
    fileio.makedirs(directory)
    ordered = sorted(samples, key=lambda s: s.key)
    infos = []
    for shard_id, start in enumerate(range(0, len(ordered), samples_per_shard)):
        chunk = ordered[start : start + samples_per_shard]
        table = pa.table(
            {
                "key": [s.key for s in chunk],
                "url": [str(s.meta.get("url") or "") for s in chunk],
                "caption": [s.caption for s in chunk],
                "captions": [list(s.meta.get("captions") or [s.caption]) for s in chunk],
            }
        )
        infos.append(shards.write_shard(directory, shard_id, chunk, table))
    return shards.write_manifest(directory, infos)


def _caption_count(sample: shards.Sample) -> int:
    caps = sample.meta.get("captions")
    return len(caps) if isinstance(caps, list) and caps else 1


@dataclasses.dataclass(frozen=True)
class Split:
    """The trusted set cut in two: where each part is and how big it is."""

    train_dir: str
    heldout_dir: str
    sizes: dict[str, dict[str, int]]  # {"train"|"heldout": {"samples", "pairs"}}
    fingerprint: str


def split_trusted(
    paths: Sequence[str], output: str, recipe: SeedConfig, *, log: Log = _stderr
) -> Split:
    """Hold out ``recipe.holdout`` of the trusted samples (by key hash) into
    ``output/split/heldout`` and write the rest to ``output/split/train``; a finished split of
    the same shards and settings is reused."""
    fp = _digest(
        {"shards": shards_identity(paths), "holdout": recipe.holdout, "salt": recipe.holdout_salt}
    )
    base = fileio.join(output, SPLIT_DIR)
    marker = fileio.join(base, "split.json")
    train_dir, heldout_dir = fileio.join(base, "train"), fileio.join(base, "heldout")
    if fileio.exists(marker):
        doc = fileio.read_json(marker)
        if doc.get("fingerprint") == fp:
            log(f"split: done (skipped): {doc['sizes']}")
            return Split(train_dir, heldout_dir, doc["sizes"], fp)
    samples = read_samples(paths)
    parts: dict[str, list[shards.Sample]] = {"train": [], "heldout": []}
    for s in samples:
        held = in_holdout(s.key, recipe.holdout, recipe.holdout_salt)
        parts["heldout" if held else "train"].append(s)
    for name, part in parts.items():
        if len(part) < 2:
            raise WitError(
                f"the trusted set's {name} part holds {len(part)} sample(s) of {len(samples)}: "
                f"too few to train and measure a seed (more trusted samples, or another "
                f"seed.holdout)"
            )
    sizes = {
        name: {"samples": len(part), "pairs": sum(_caption_count(s) for s in part)}
        for name, part in parts.items()
    }
    write_sample_shards(train_dir, parts["train"])
    write_sample_shards(heldout_dir, parts["heldout"])
    fileio.write_json(marker, {"fingerprint": fp, "sizes": sizes})
    log(
        f"split: {sizes['train']['samples']:,} training and {sizes['heldout']['samples']:,} "
        f"held-out samples"
    )
    return Split(train_dir, heldout_dir, sizes, fp)


# ---------------------------------------------------------------------------------------------
# Training runs


def train_config(
    recipe: SeedConfig,
    *,
    sources: Sequence[str],
    num_samples: int,
    heldout_dir: str,
    output: str,
    epochs: int | None = None,
    early_stop: bool = True,
) -> Any:
    """The trainer's options for one seed run over ``sources`` (``num_samples`` samples)."""
    from wit_pipeline.train.config import TrainConfig

    epochs = epochs or recipe.epochs
    batch = max(2, min(recipe.batch_size, num_samples))
    steps = epochs * max(1, num_samples // batch)
    return TrainConfig(
        train_data=tuple(sources),
        model=recipe.model,
        epochs=epochs,
        batch_size=batch,
        lr=recipe.lr,
        warmup=int(recipe.warmup_fraction * steps),
        wd=recipe.wd,
        crop_scale_min=recipe.crop_scale_min,
        hflip=recipe.hflip,
        seed=recipe.seed,
        workers=recipe.workers,
        threads=recipe.threads,
        device=recipe.device,
        output=output,
        eval_pairs=heldout_dir,
        eval_every=1,
        early_stop_metric=METRIC,
        early_stop_patience=recipe.patience if early_stop else 0,
        epoch_checkpoints=False,
        plots=False,
        progress=False,
        log_every=10,
    )


@dataclasses.dataclass(frozen=True)
class RunResult:
    """A finished training run: its best checkpoint and what its evaluations said."""

    name: str
    checkpoint: str  # checkpoints/best.pt
    info: dict[str, Any]  # steps, epochs, evals, best, train samples


def _eval_rows(metrics_path: str) -> list[dict[str, Any]]:
    rows = []
    with open(metrics_path) as f:
        for line in f:
            row = json.loads(line)
            if row.get("type") == "eval":
                m = row["metrics"]
                rows.append(
                    {
                        "epoch": row["epoch"] + 1,
                        "step": row["step"],
                        "auc": m.get("pairs/auc"),
                        "recall@p95": m.get("pairs/recall@p95"),
                    }
                )
    return rows


def run_training(
    tcfg: Any, *, name: str, data_fingerprint: str, num_samples: int, log: Log = _stderr
) -> RunResult:
    """Train ``tcfg`` in this process (or reuse the finished run of the same fingerprint in its
    output; resume an interrupted one); the result points at ``checkpoints/best.pt``."""
    from wit_pipeline.train import checkpoint, loop

    out = tcfg.output
    fp = _digest(
        {
            "train": {
                k: v for k, v in config_lib.to_dict(tcfg).items() if k not in _RUN_IDENTITY_EXCLUDED
            },
            "data": data_fingerprint,
        }
    )
    done_path = fileio.join(out, RUN_DONE)
    best = checkpoint.best_path(out)
    if fileio.exists(done_path):
        done = fileio.read_json(done_path)
        if done.get("fingerprint") == fp and fileio.exists(best):
            log(f"train {name}: done (skipped)")
            return RunResult(name, best, done["info"])
    started = fileio.join(out, "started.json")
    resume = (
        fileio.exists(started)
        and fileio.read_json(started).get("fingerprint") == fp
        and fileio.exists(checkpoint.latest_path(out))
    )
    if not resume and fileio.exists(out):
        shutil.rmtree(out)
    fileio.makedirs(out)
    fileio.write_json(started, {"fingerprint": fp})
    log(
        f"train {name}: {tcfg.model} on {num_samples:,} samples, up to {tcfg.epochs} epochs of "
        f"batch {tcfg.batch_size}{' (resumed)' if resume else ''}"
    )
    t0 = time.monotonic()
    summary = loop.train(dataclasses.replace(tcfg, resume="latest" if resume else ""))
    if summary["best"] is None:
        raise WitError(f"training run {out} measured no held-out separation")
    evals = _eval_rows(fileio.join(out, "metrics.jsonl"))
    info = {
        "train_samples": num_samples,
        "batch_size": tcfg.batch_size,
        "max_epochs": tcfg.epochs,
        "epochs_run": summary["epoch"],
        "steps": summary["step"],
        "early_stopped": summary["early_stopped"],
        "evals": evals,
        "best": {k: summary["best"][k] for k in ("epoch", "step", "value")},
        "seconds": round(time.monotonic() - t0, 1),
    }
    fileio.write_json(done_path, {"fingerprint": fp, "info": info})
    log(
        f"train {name}: best held-out AUC {info['best']['value']:.4f} after epoch "
        f"{info['best']['epoch']} ({info['steps']} steps, {info['seconds']:.0f} s)"
    )
    return RunResult(name, best, info)


# ---------------------------------------------------------------------------------------------
# Using the pool


def score_pool(checkpoint_path: str, pool: Any, *, device: str = "auto") -> np.ndarray:
    """The cosine similarity of every pair of ``pool`` (a ``separation.PairSet``) under the
    model of ``checkpoint_path``, in pair order."""
    from wit_pipeline import models
    from wit_pipeline.train import separation

    loaded = models.load_model(None, checkpoint_path, device=device)
    return separation.pair_scores(
        loaded.model, loaded.preprocess, loaded.tokenizer, pool, device=loaded.device
    )


def top_fraction_mask(scores: np.ndarray, fraction: float) -> np.ndarray:
    """True for the ``round(fraction * n)`` highest scores (ties broken by position)."""
    n = len(scores)
    k = min(n, int(np.floor(fraction * n + 0.5)))
    mask = np.zeros(n, dtype=bool)
    if k:
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
        mask[order[:k]] = True
    return mask


def select_pairs(pool: Any, scores: np.ndarray, halves: np.ndarray, fraction: float) -> np.ndarray:
    """Per pair of ``pool``: kept when in the top ``fraction`` of its half's scores (each half
    is ranked on its own: cross-fitted halves are scored by different models)."""
    owners = pool.owners()
    keep = np.zeros(len(scores), dtype=bool)
    for h in (0, 1):
        idx = np.flatnonzero(halves[owners] == h)
        keep[idx] = top_fraction_mask(scores[idx], fraction)
    return keep


def kept_samples(
    samples_by_key: Mapping[str, shards.Sample], pool: Any, keep: np.ndarray, sample_mask: Any
) -> list[shards.Sample]:
    """The pool samples chosen by ``sample_mask`` (per sample) with only their kept captions;
    samples without a kept caption are left out."""
    out = []
    start = 0
    for i, key in enumerate(pool.keys):
        n = len(pool.captions[i])
        flags, start = keep[start : start + n], start + n
        if not sample_mask[i]:
            continue
        caps = [c for c, k in zip(pool.captions[i], flags, strict=True) if k]
        if caps:
            out.append(with_captions(samples_by_key[key], caps))
    return out


@dataclasses.dataclass
class SeedContext:
    """What every training run of one ``wit seed`` shares."""

    output: str
    recipe: SeedConfig
    split: Split
    log: Log

    def train(
        self,
        name: str,
        *,
        extra: Sequence[shards.Sample] = (),
        epochs: int | None = None,
        early_stop: bool = True,
    ) -> RunResult:
        """One run on the trusted training part plus ``extra`` pool samples."""
        sources = [self.split.train_dir]
        data_fp = {"split": self.split.fingerprint}
        if extra:
            extra_dir = fileio.join(self.output, POOL_DIR, f"{name}-data")
            write_sample_shards(extra_dir, extra)
            sources.append(extra_dir)
            data_fp["extra"] = [(s.key, s.meta.get("captions")) for s in extra]
        n = self.split.sizes["train"]["samples"] + len(extra)
        tcfg = train_config(
            self.recipe,
            sources=sources,
            num_samples=n,
            heldout_dir=self.split.heldout_dir,
            output=fileio.join(self.output, RUNS_DIR, name),
            epochs=epochs,
            early_stop=early_stop,
        )
        return run_training(
            tcfg, name=name, data_fingerprint=_digest(data_fp), num_samples=n, log=self.log
        )


def run_rounds(ctx: SeedContext, pool_paths: Sequence[str]) -> tuple[list[RunResult], dict]:
    """Train the seed: on the trusted set alone, then ``seed.rounds`` rounds with pool pairs.

    Round ``r`` trains on the trusted training part plus the pool pairs in the top
    ``pool_keep_fraction`` of each pool half under scores from models that never saw them: for
    round 1 the trusted-only model (``selection = seed``), or for ``selection = early`` two
    models trained ``early_epochs`` on the trusted part plus the other half of the raw pool;
    for later rounds two models trained as round ``r - 1`` but on one half each, each scoring
    the other half. Returns every run (the last is the seed) and the pool's sizes per round.
    """
    from wit_pipeline.train import separation

    recipe = ctx.recipe
    runs = [ctx.train("round0")]
    if not recipe.rounds or not pool_paths:
        return runs, {}
    pool = separation.PairSet.from_shards(pool_paths)
    if len(pool.keys) < 2:
        raise WitError(f"the pool holds {len(pool.keys)} captioned sample(s): nothing to select")
    wanted = set(pool.keys)
    by_key = {s.key: s for s in read_samples(pool_paths) if s.key in wanted}
    halves = np.asarray([pool_half(k) for k in pool.keys])
    info: dict[str, Any] = {"samples": len(pool.keys), "pairs": pool.num_pairs, "rounds": []}

    def cross_scores(name: str, keep: np.ndarray, epochs: int | None, stop: bool) -> np.ndarray:
        scores = np.zeros(pool.num_pairs)
        owners = pool.owners()
        for h in (0, 1):
            other = halves != h  # train on the other half, score this one
            res = ctx.train(
                f"{name}-half{1 - h}",
                extra=kept_samples(by_key, pool, keep, other),
                epochs=epochs,
                early_stop=stop,
            )
            runs.append(res)
            part = halves[owners] == h
            mine = separation.PairSet(
                [k for k, hh in zip(pool.keys, halves, strict=True) if hh == h],
                [im for im, hh in zip(pool.images, halves, strict=True) if hh == h],
                [c for c, hh in zip(pool.captions, halves, strict=True) if hh == h],
            )
            scores[part] = score_pool(res.checkpoint, mine, device=recipe.device)
        return scores

    if recipe.selection == "early":
        everything = np.ones(pool.num_pairs, dtype=bool)
        scores = cross_scores("early", everything, recipe.early_epochs, False)
    else:
        scores = score_pool(runs[0].checkpoint, pool, device=recipe.device)
    for r in range(1, recipe.rounds + 1):
        keep = select_pairs(pool, scores, halves, recipe.pool_keep_fraction)
        info["rounds"].append({"round": r, "pairs_kept": int(keep.sum())})
        if r == recipe.rounds:
            everyone = np.ones(len(pool.keys), dtype=bool)
            runs.append(ctx.train(f"round{r}", extra=kept_samples(by_key, pool, keep, everyone)))
        else:
            scores = cross_scores(f"round{r}", keep, None, True)
    return runs, info


# ---------------------------------------------------------------------------------------------
# The seed files


def write_seed_checkpoint(best_path: str, path: str) -> None:
    """The chosen checkpoint without optimizer and scaler state (a third of the size; it is for
    scoring, not for resuming)."""
    import torch

    from wit_pipeline.train import checkpoint

    ckpt = torch.load(best_path, map_location="cpu", weights_only=True)
    ckpt["optimizer"] = None
    ckpt["scaler"] = None
    checkpoint.save_checkpoint(path, ckpt)


def heldout_separation(checkpoint_path: str, heldout_dir: str, device: str) -> dict[str, Any]:
    """The held-out separation of the seed as written (loaded as ``wit build`` loads it)."""
    from wit_pipeline import models
    from wit_pipeline.train import separation

    loaded = models.load_model(None, checkpoint_path, device=device)
    pairs = separation.PairSet.from_shards(shards.list_shards(heldout_dir))
    return separation.run_separation(
        loaded.model, loaded.preprocess, loaded.tokenizer, pairs, device=loaded.device
    )


def run_seed(
    inputs: Sequence[str],
    output: str,
    cfg: BuildConfig,
    *,
    pool: str | None = None,
    queries_path: str | None = None,
    beam_args: Sequence[str] = (),
    runner: str | None = None,
    overwrite: bool = False,
    log: Log = _stderr,
) -> dict[str, Any]:
    """Build (or read) the trusted set, split it, train the seed; returns ``seed.json``."""
    output = os.path.abspath(output) if fileio.is_local(output) else output
    recipe = cfg.seed
    pool_paths: list[str] = []
    if pool:
        pool_paths = finished_shards(pool)
        if not pool_paths:
            raise WitError(f"--pool {pool}: no finished shards (a build folder or a shard folder)")
        if not recipe.rounds:
            log(f"seed.rounds = 0: --pool {pool} is not used (set --rounds N)")
    elif recipe.rounds:
        log(f"seed.rounds = {recipe.rounds} needs --pool: training on the trusted set alone")
    paths, source = trusted_shards(
        inputs,
        output,
        cfg,
        queries_path=queries_path,
        beam_args=beam_args,
        runner=runner,
        overwrite=overwrite,
        log=log,
    )
    fp = _digest(
        {
            "trusted": shards_identity(paths),
            "recipe": recipe_dict(recipe),
            "pool": shards_identity(pool_paths),
        }
    )
    seed_json = fileio.join(output, SEED_JSON)
    seed_pt = fileio.join(output, SEED_CHECKPOINT)
    if fileio.exists(seed_json):
        previous = fileio.read_json(seed_json)
        if previous.get("fingerprint") == fp and fileio.exists(seed_pt):
            log(f"done (skipped): {seed_pt}")
            return previous
        if not overwrite:
            raise WitError(
                f"{output} holds a seed trained with other settings or data; rerun with "
                f"--overwrite to train again, or choose another --output"
            )
    split = split_trusted(paths, output, recipe, log=log)
    ctx = SeedContext(output, recipe, split, log)
    runs, pool_info = run_rounds(ctx, pool_paths)
    final = runs[-1]
    write_seed_checkpoint(final.checkpoint, seed_pt)
    separation = heldout_separation(seed_pt, split.heldout_dir, recipe.device)
    doc = {
        "format": SEED_FORMAT,
        "version": SEED_VERSION,
        "fingerprint": fp,
        "checkpoint": seed_pt,
        "model": recipe.model,
        "recipe": recipe_dict(recipe),
        "data": {
            "trusted": {"source": source, "shards": len(paths), **_sum_sizes(split.sizes)},
            "train": split.sizes["train"],
            "heldout": split.sizes["heldout"],
            "pool": {"shards": len(pool_paths), **pool_info} if pool_paths else None,
        },
        "runs": [{"name": r.name, **r.info} for r in runs],
        "chosen": {"run": final.name, **final.info["best"]},
        "heldout": separation,
        "usage": f"wit build --seed-model {seed_pt} ...",
    }
    fileio.write_json(seed_json, doc)
    log(
        f"{seed_pt}: held-out AUC {separation['auc']:.4f}, recall at 95% precision "
        f"{separation['recall@p95']:.4f} ({separation['num_true']:,} true and "
        f"{separation['num_shuffled']:,} shuffled pairs)"
    )
    return doc


def _sum_sizes(sizes: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    return {k: sum(int(part[k]) for part in sizes.values()) for k in ("samples", "pairs")}
