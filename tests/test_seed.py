"""``wit seed`` and what it stands on: separation metrics, early stopping, the split, the rounds."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from clip_helpers import read_jsonl, write_flickr_shards

from wit_pipeline import cli, config, models, seed, shards
from wit_pipeline.errors import WitError
from wit_pipeline.loopback import ImageServer
from wit_pipeline.train import checkpoint, data, loop, separation
from wit_pipeline.train.config import TrainConfig, validate

torch.set_num_threads(2)


# ---------------------------------------------------------------------------------------------
# Pure metrics


def test_roc_auc_counts_ordered_pairs_and_half_ties():
    # (0.9, 0.8 beat both negatives; 0.4 beats 0.3 only): 5 of 6 ordered pairs
    assert separation.roc_auc([0.9, 0.8, 0.4], [0.5, 0.3]) == pytest.approx(5 / 6)
    assert separation.roc_auc([0.5], [0.5]) == 0.5
    assert separation.roc_auc([0.1, 0.2], [0.3, 0.4]) == 0.0
    assert separation.roc_auc([0.5, 0.7], [0.5, 0.1]) == pytest.approx(3.5 / 4)
    with pytest.raises(WitError, match="at least one"):
        separation.roc_auc([], [0.1])


def test_recall_at_precision_keeps_whole_runs_of_ties():
    pos, neg = [0.9, 0.8, 0.7, 0.2], [0.75, 0.1]
    # descending: T T F T T F; precision 1, 1, 2/3, 3/4, 4/5, 4/6
    assert separation.recall_at_precision(pos, neg, 0.95) == {
        "recall": 0.5,
        "threshold": 0.8,
        "precision": 1.0,
    }
    assert separation.recall_at_precision(pos, neg, 0.8) == {
        "recall": 1.0,
        "threshold": 0.2,
        "precision": 0.8,
    }
    # a tie between a true and a shuffled pair cannot be split by a threshold
    assert separation.recall_at_precision([0.9, 0.5], [0.5], 0.95)["recall"] == 0.5
    assert separation.recall_at_precision([0.1], [0.9], 0.95) == {
        "recall": 0.0,
        "threshold": None,
        "precision": None,
    }


def test_separation_metrics_and_partners():
    m = separation.separation_metrics([0.9, 0.8], [0.1, 0.85])
    assert m["auc"] == 0.75 and m["recall@p95"] == 0.5 and m["recall@p95_threshold"] == 0.9
    assert (m["num_true"], m["num_shuffled"]) == (2, 2)
    keys = [f"k{i}" for i in range(50)]
    partners = separation.partner_indices(keys)
    assert partners == separation.partner_indices(keys)  # a hash, not a draw
    assert all(p != i and 0 <= p < 50 for i, p in enumerate(partners))
    assert separation.partner_indices(["a", "b"]) == [1, 0]
    with pytest.raises(WitError, match="at least two"):
        separation.partner_indices(["a"])


def test_top_fraction_mask_and_per_half_selection():
    assert seed.top_fraction_mask(np.array([0.1, 0.9, 0.5, 0.7]), 0.5).tolist() == [
        False,
        True,
        False,
        True,
    ]
    assert seed.top_fraction_mask(np.array([0.3, 0.3, 0.3]), 0.34).tolist() == [True, False, False]
    pool = separation.PairSet(["a", "b", "c"], [b"", b"", b""], [["x", "y"], ["z"], ["u", "v"]])
    halves = np.array([0, 1, 0])  # a, c in half 0 (4 pairs); b in half 1 (1 pair)
    keep = seed.select_pairs(pool, np.array([0.9, 0.1, 0.5, 0.8, 0.2]), halves, 0.5)
    # half 0 ranks x 0.9, u 0.8, v 0.2, y 0.1 and keeps 2; half 1 keeps round(0.5) = 0 (half up: 1)
    assert keep.tolist() == [True, False, True, True, False]


def test_holdout_is_a_hash_of_the_key():
    keys = [f"key{i}" for i in range(2000)]
    held = [k for k in keys if seed.in_holdout(k, 0.1)]
    assert held == [k for k in keys if seed.in_holdout(k, 0.1)]
    assert 150 < len(held) < 250
    assert set(held) <= {k for k in keys if seed.in_holdout(k, 0.2)}  # nested across fractions
    assert {seed.pool_half(k) for k in keys} == {0, 1}


def test_hflip_mirrors_the_crop_with_one_more_draw(shared_data):
    path = (
        shared_data
        / "flickr8k"
        / "images"
        / sorted(os.listdir(shared_data / "flickr8k" / "images"))[0]
    )
    raw = path.read_bytes()
    plain = data.decode_crop(raw, 32, random.Random(3), (0.5, 1.0))
    flipped = data.decode_crop(raw, 32, random.Random(3), (0.5, 1.0), hflip=1.0)
    assert np.array_equal(flipped, plain[:, :, ::-1])
    assert np.array_equal(data.decode_crop(raw, 32, random.Random(3), (0.5, 1.0), hflip=0.0), plain)


def test_seed_config_and_train_options_are_checked():
    with pytest.raises(WitError, match=r"seed\.holdout"):
        config.SeedConfig(holdout=1.0)
    with pytest.raises(WitError, match=r"seed\.selection"):
        config.SeedConfig(selection="best")
    with pytest.raises(WitError, match="needs --early-stop-metric"):
        validate(TrainConfig(train_data=("x",), early_stop_patience=2))
    with pytest.raises(WitError, match="needs an evaluation set"):
        validate(TrainConfig(train_data=("x",), early_stop_metric="pairs/auc"))
    with pytest.raises(WitError, match="--hflip"):
        validate(TrainConfig(train_data=("x",), hflip=2.0))


# ---------------------------------------------------------------------------------------------
# Early stopping in the trainer


@pytest.fixture(scope="module")
def tiny_sets(shared_data, tmp_path_factory):
    """64 Flickr8k train images to train on, 16 dev images held out."""
    base = tmp_path_factory.mktemp("seed-sets")
    train = write_flickr_shards(shared_data, base / "train", samples_per_shard=32, limit=64)
    held = write_flickr_shards(shared_data, base / "held", split="dev", limit=16)
    return train, held


def test_early_stopping_keeps_the_best_epoch(tiny_sets, tmp_path):
    train, held = tiny_sets
    cfg = TrainConfig(
        train_data=(train,),
        output=str(tmp_path / "run"),
        model="wit-nano",
        epochs=8,
        batch_size=16,
        workers=0,
        warmup=1,
        lr=5e-3,
        progress=False,
        plots=False,
        epoch_checkpoints=False,
        eval_pairs=held,
        early_stop_metric="pairs/auc",
        early_stop_patience=1,
    )
    summary = loop.train(cfg)
    evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "eval"]
    aucs = [r["metrics"]["pairs/auc"] for r in evals]
    assert all(0.0 <= a <= 1.0 for a in aucs)
    # patience 1: training stops at the first evaluation that does not beat the best before it
    first_worse = next((i for i in range(1, len(aucs)) if aucs[i] <= max(aucs[:i])), None)
    assert len(evals) == (first_worse + 1 if first_worse is not None else 8)
    assert summary["early_stopped"] == (first_worse is not None and first_worse < 7)
    best = int(np.argmax(aucs))
    assert summary["best"] == {
        "metric": "pairs/auc",
        "value": aucs[best],
        "epoch": best + 1,
        "step": evals[best]["step"],
    }
    saved = models.read_checkpoint(checkpoint.best_path(str(tmp_path / "run")))
    assert saved["step"] == evals[best]["step"]
    assert saved["early_stop"]["best"] == summary["best"]
    latest = models.read_checkpoint(checkpoint.latest_path(str(tmp_path / "run")))
    assert latest["early_stop"]["evals_since_best"] == len(evals) - 1 - best
    # a resumed run that already ran out of patience trains no further
    if summary["early_stopped"]:
        again = loop.train(
            TrainConfig(**{**config.to_dict(cfg), "train_data": (train,), "resume": "latest"})
        )
        assert (again["step"], again["early_stopped"]) == (summary["step"], True)


def test_unknown_early_stop_metric_is_a_one_line_error(tiny_sets, tmp_path):
    train, held = tiny_sets
    cfg = TrainConfig(
        train_data=(train,),
        output=str(tmp_path / "run"),
        model="wit-nano",
        epochs=1,
        batch_size=16,
        workers=0,
        progress=False,
        plots=False,
        eval_pairs=held,
        early_stop_metric="pairs/AUC",
    )
    with pytest.raises(WitError, match="not among the evaluation's metrics"):
        loop.train(cfg)


# ---------------------------------------------------------------------------------------------
# wit seed, end to end


def _trusted_table(shared_data, site, server, n=40):
    """``n`` Flickr8k train photos served on loopback, with 2 to 5 captions each."""
    import csv

    caps: dict[str, list[str]] = {}
    with open(shared_data / "flickr8k" / "captions.tsv", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row["split"] == "train":
                caps.setdefault(row["image"], []).append(" ".join(row["caption"].split()))
    names = sorted(caps)[:n]
    os.makedirs(site, exist_ok=True)
    rows = {"url": [], "caption": []}
    for i, name in enumerate(names):
        (site / name).write_bytes((shared_data / "flickr8k" / "images" / name).read_bytes())
        for c in caps[name][: 2 + i % 4]:
            rows["url"].append(server.url(f"/img/{name}"))
            rows["caption"].append(c)
    return names, rows


def test_wit_seed_end_to_end(shared_data, tmp_path, capsys):
    site = tmp_path / "site"
    site.mkdir()
    with ImageServer(str(site)) as server:
        names, rows = _trusted_table(shared_data, site, server)
        table = tmp_path / "trusted.parquet"
        pq.write_table(pa.table(rows), table)
        out = tmp_path / "seed"
        argv = [
            "seed",
            "--input",
            str(table),
            "--output",
            str(out),
            "--allow-loopback",
            "--set",
            "gather.match.keep_unmatched=true",
            "--set",
            "seed.model=wit-nano",
            "--set",
            "seed.batch_size=8",
            "--set",
            "seed.workers=0",
            "--epochs",
            "3",
            "--holdout",
            "0.25",
        ]
        assert cli.main(argv) == 0
        printed = json.loads(capsys.readouterr().out)
        doc = json.loads((out / "seed.json").read_text())
        # the trusted build ran with wit build's steps; every caption a pair of its photo's sample
        for step in ("gather", "prebalance", "download", "finalize", "report"):
            assert (out / "build" / "done" / f"{step}.json").exists()
        built = seed.read_samples(shards.list_shards(str(out / "build" / "shards")))
        assert len(built) == len(names) and sum(len(s.meta["captions"]) for s in built) == len(
            rows["url"]
        )
        held = [s for s in built if seed.in_holdout(s.key, 0.25)]
        assert doc["data"]["trusted"] == {
            "source": "build",
            "shards": 1,
            "samples": len(names),
            "pairs": len(rows["url"]),
        }
        assert doc["data"]["heldout"] == {
            "samples": len(held),
            "pairs": sum(len(s.meta["captions"]) for s in held),
        }
        assert doc["data"]["train"]["samples"] == len(names) - len(held)
        assert doc["data"]["pool"] is None
        (run,) = doc["runs"]
        assert run["name"] == "round0" and run["max_epochs"] == 3 and run["batch_size"] == 8
        assert len(run["evals"]) == run["epochs_run"] <= 3
        aucs = [e["auc"] for e in run["evals"]]
        assert all(0.0 <= a <= 1.0 for a in aucs)
        assert doc["chosen"]["value"] == max(aucs)
        assert doc["chosen"]["epoch"] == run["evals"][aucs.index(max(aucs))]["epoch"]
        # seed.json's held-out figures are those of seed.pt as wit build loads it
        h = doc["heldout"]
        assert h["auc"] == pytest.approx(doc["chosen"]["value"], abs=1e-6)
        assert (h["num_true"], h["num_shuffled"]) == (doc["data"]["heldout"]["pairs"],) * 2
        assert 0.0 <= h["recall@p95"] <= 1.0
        assert printed["checkpoint"] == str(out / "seed.pt")
        loaded = models.load_model(None, str(out / "seed.pt"), device="cpu")
        assert loaded.model_name == "wit-nano"
        ckpt = models.read_checkpoint(str(out / "seed.pt"))
        assert ckpt["format"] == models.CHECKPOINT_FORMAT and ckpt["optimizer"] is None

        # a rerun is skipped as a whole; other settings are refused without --overwrite
        before = (out / "seed.json").stat().st_mtime_ns
        assert cli.main(argv) == 0
        assert (out / "seed.json").stat().st_mtime_ns == before
        assert "done (skipped)" in capsys.readouterr().err
        assert cli.main([*argv, "--epochs", "2"]) == 2
        assert "other settings" in capsys.readouterr().err

    # finished shards as the input: no build, the same split and the same seed
    out2 = tmp_path / "seed-from-shards"
    argv2 = [a if a != str(out) else str(out2) for a in argv]
    argv2[argv2.index(str(table))] = str(out / "build")
    assert cli.main(argv2) == 0
    doc2 = json.loads((out2 / "seed.json").read_text())
    assert not (out2 / "build").exists()
    assert doc2["data"]["trusted"]["source"] == "shards"
    assert doc2["data"]["heldout"] == doc["data"]["heldout"]
    assert doc2["heldout"]["auc"] == pytest.approx(doc["heldout"]["auc"], abs=1e-6)


def test_rounds_select_pool_pairs_per_half(tiny_sets, shared_data, tmp_path):
    train, held = tiny_sets
    pool_dir = write_flickr_shards(
        shared_data, tmp_path / "pool", limit=48, samples_per_shard=48
    )  # the first 48 train photos: a pool whose captions are all true
    recipe = config.SeedConfig(
        model="wit-nano",
        epochs=2,
        batch_size=16,
        workers=0,
        rounds=2,
        pool_keep_fraction=0.4,
        selection="early",
        early_epochs=1,
    )
    split = seed.Split(
        train, held, {"train": {"samples": 64, "pairs": 320}, "heldout": {"samples": 16}}, "fp"
    )
    logs: list[str] = []
    ctx = seed.SeedContext(str(tmp_path / "out"), recipe, split, logs.append)
    runs, info = seed.run_rounds(ctx, shards.list_shards(pool_dir))
    names = [r.name for r in runs]
    assert names == [
        "round0",
        "early-half1",
        "early-half0",
        "round1-half1",
        "round1-half0",
        "round2",
    ]
    pool = separation.PairSet.from_shards(shards.list_shards(pool_dir))
    halves = [seed.pool_half(k) for k in pool.keys]
    per_half = [
        sum(len(c) for c, h in zip(pool.captions, halves, strict=True) if h == x) for x in (0, 1)
    ]
    expected = sum(int(np.floor(0.4 * n + 0.5)) for n in per_half)
    assert info["rounds"] == [
        {"round": 1, "pairs_kept": expected},
        {"round": 2, "pairs_kept": expected},
    ]
    # the early models trained on the other half of the raw pool, the last on both halves' picks
    early = [r for r in runs if r.name.startswith("early")]
    assert [r.info["train_samples"] for r in early] == [64 + halves.count(1), 64 + halves.count(0)]
    assert all(r.info["max_epochs"] == 1 for r in early)
    final_extra = seed.read_samples(
        shards.list_shards(str(tmp_path / "out" / "pool" / "round2-data"))
    )
    assert sum(len(s.meta["captions"]) for s in final_extra) == expected
    assert runs[-1].info["train_samples"] == 64 + len(final_extra)
    # a second call reuses every finished run
    logs.clear()
    again, _ = seed.run_rounds(ctx, shards.list_shards(pool_dir))
    assert [r.info for r in again] == [r.info for r in runs]
    assert sum("done (skipped)" in m for m in logs) == len(runs)
