"""The curation benchmark's plumbing, on a tiny pool: every set is built, measured, trained and
evaluated, and the table's numbers follow from the truth and the files (not the figures)."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_curation  # noqa: E402
import curation_pool as cp  # noqa: E402

from wit_pipeline import shards  # noqa: E402


def _pairs(shards_dir: str) -> list[tuple[str, str]]:
    """(sample key, pair uid) of every pair in a set's shards."""
    out = []
    for path in shards.list_shards(shards_dir):
        for raw in shards.iter_samples(path):
            meta = json.loads(raw["json"])
            out += [(raw["__key__"], p["uid"]) for p in meta["pairs"]]
    return out


@pytest.fixture(scope="module")
def bench(shared_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("curation")
    argv = [
        "--work-dir", str(work), "--shared-data", str(shared_data),
        "--trusted", "40", "--pool", "80",
        "--model", "wit-nano", "--steps", "3", "--batch-size", "16", "--warmup", "1",
        "--workers", "0", "--train-seeds", "0", "1",
        "--seed-set", "model=wit-nano", "--seed-set", "epochs=2",
        "--seed-set", "batch_size=16", "--seed-set", "workers=0",
        # Keys name the pool server's port, so the held-out part is a fresh draw each run:
        # a quarter of 40 samples leaves 2 or more held out but once in ~7,000 runs.
        "--seed-set", "holdout=0.25",
        "--eval-max-images", "20", "--bootstrap", "200",
        # A fixed share, so that the curated set fills a batch whatever the tiny seed scores
        # (the auto threshold's choice depends on it); the default flags are tested below.
        "--curated-keep-fraction", "0.5",
    ]  # fmt: skip
    args = bench_curation.parser().parse_args(argv)
    return args, bench_curation.run(args), work


def test_the_curated_set_takes_the_auto_threshold_by_default():
    parse = bench_curation.parser().parse_args
    assert bench_curation.curated_flags(parse([])) == ["--threshold", "auto"]
    assert bench_curation.curated_flags(parse(["--target-precision", "0.9"])) == [
        "--threshold", "auto", "--set", "score.target_precision=0.9",
    ]  # fmt: skip
    assert bench_curation.curated_flags(parse(["--curated-keep-fraction", "0.5"])) == [
        "--set", "score.keep_fraction=0.5",
    ]  # fmt: skip


def test_a_set_smaller_than_a_batch_trains_on_the_whole_set():
    assert bench_curation.batch_for(128, 5000, 2) == 128
    assert bench_curation.batch_for(128, 85, 0) == 85
    assert bench_curation.batch_for(128, 85, 2) == 42  # a full batch per loader worker
    assert bench_curation.batch_for(128, 0, 2) == 1


def test_every_condition_trains_and_evaluates(bench):
    _, results, work = bench
    assert [r["condition"] for r in results["rows"]] == list(bench_curation.CONDITIONS)
    for row in results["rows"]:
        assert len(row["R@10_per_seed"]) == 2
        for s in (0, 1):
            run = work / "runs" / f"{row['condition']}-s{s}"
            assert (run / "checkpoints" / "latest.pt").exists()
            ev = json.loads((run / "retrieval.json").read_text())
            assert ev["num_images"] == 20 and len(ev["text_to_image_ranks"]) == 100
            # R@10 is the share of captions whose image ranks in the first ten
            hits = np.asarray(ev["text_to_image_ranks"]) < 10
            assert ev["text_to_image_R@10"] == pytest.approx(hits.mean())
            assert row["R@10_per_seed"][s] == ev["text_to_image_R@10"]
        assert row["R@10"] == pytest.approx(np.mean(row["R@10_per_seed"]))
        assert row["batch_size"] == min(16, row["samples"])
        lo, hi = row["R@10_ci95"]
        assert 0.0 <= lo <= hi <= 1.0
    by = {r["condition"]: r for r in results["rows"]}
    assert by["raw"]["vs_raw"] == 1.0 and by["oracle"]["vs_oracle"] == 1.0
    assert by["curated"]["vs_raw"] == pytest.approx(by["curated"]["R@10"] / by["raw"]["R@10"])
    table = bench_curation.format_table(results)
    assert table.count("\n| ") == len(bench_curation.CONDITIONS)  # a line per set


def test_precision_and_recall_follow_from_the_truth(bench):
    _, results, work = bench
    truth_table = pq.read_table(work / "pool" / "truth.parquet").to_pylist()
    truth = {r["uid"]: r["true"] for r in truth_table}
    assert len(truth) == len(truth_table)  # one row per planted pair
    kinds = {k: sum(r["kind"] == k for r in truth_table) for k in cp.KINDS}
    assert results["pool"]["pool_kinds"] == kinds
    assert sum(truth.values()) == kinds["true"]
    sets = {
        "raw": work / "builds" / "raw" / "shards",
        "curated": work / "builds" / "curated" / "shards",
        "top30": work / "builds" / "top30" / "shards",
        "top50": work / "builds" / "top50" / "shards",
        "oracle": work / "data" / "oracle",
        "random": work / "data" / "random",
    }
    pairs = {name: _pairs(str(d)) for name, d in sets.items()}
    for row in results["rows"]:
        got = pairs[row["condition"]]
        true_kept = sum(truth[uid] for _, uid in got)
        assert row["pairs"] == len(got)
        assert row["samples"] == len({k for k, _ in got})
        assert row["precision"] == true_kept / len(got)
        assert row["recall"] == true_kept / kinds["true"]
    raw_uids = {uid for _, uid in pairs["raw"]}
    # every pool pair that reached the raw set is in the truth; gather dropped the foreign ones
    foreign = {r["uid"] for r in truth_table if r["kind"] == "foreign"}
    assert raw_uids <= set(truth) and not raw_uids & foreign
    # the oracle is exactly the raw set's true pairs; random draws as many pairs as curated holds
    assert {uid for _, uid in pairs["oracle"]} == {u for u in raw_uids if truth[u]}
    assert {uid for _, uid in pairs["random"]} <= raw_uids
    assert len(pairs["random"]) == len(pairs["curated"])
    assert {uid for _, uid in pairs["curated"]} <= raw_uids
    # the raw build's counters agree: the pairs it kept are the pairs in its shards
    stats = json.loads((work / "builds" / "raw" / "stats.json").read_text())
    assert stats["counters"]["kept"] == len(pairs["raw"])


def test_seed_and_pool_separation_are_reported(bench):
    _, results, work = bench
    s = results["seed"]
    assert s["recipe"]["model"] == "wit-nano" and s["recipe"]["epochs"] == 2
    for part in (s["heldout"], s["pool_separation"]):
        assert 0.0 <= part["auc"] <= 1.0 and 0.0 <= part["recall@p95"] <= 1.0
    raw = next(r for r in results["rows"] if r["condition"] == "raw")
    true_in_raw = raw["recall"] * results["pool"]["pool_kinds"]["true"]
    assert s["pool_separation"]["true_pairs"] == pytest.approx(true_in_raw)
    assert s["pool_separation"]["true_pairs"] + s["pool_separation"]["false_pairs"] == raw["pairs"]
    assert json.loads((work / "results.json").read_text())["rows"] == results["rows"]
