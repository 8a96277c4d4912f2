"""The CLIP-score stage: thresholds, filtering with counted drops, RunInference, `wit score`."""

from __future__ import annotations

import io
import json
import math
import pathlib

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from clip_helpers import SEED_MODEL, flickr_paths, trained_seed, write_flickr_shards
from PIL import Image

from wit_pipeline import beam_utils, cli, shards, stage
from wit_pipeline import counters as counters_lib
from wit_pipeline.config import ScoreConfig
from wit_pipeline.errors import WitError
from wit_pipeline.stages import score
from wit_pipeline.train import caption_sets

__all__ = ["trained_seed"]

torch.set_num_threads(2)


# ---------------------------------------------------------------------------------------------
# Pure pieces


def test_top_fraction_threshold():
    scores = [0.1, 0.5, 0.3, 0.9, 0.7, 0.2, 0.4, 0.8, 0.6, 0.0]
    assert score.top_fraction_threshold(scores, 0.3) == pytest.approx(0.7)  # keeps 0.9, 0.8, 0.7
    assert score.top_fraction_threshold(scores, 1.0) == pytest.approx(0.0)
    assert score.top_fraction_threshold(scores, 0.04) == math.inf  # round(0.4) = 0 kept
    assert score.top_fraction_threshold(scores, 0.05) == pytest.approx(0.9)  # round(0.5) = 1
    assert score.top_fraction_threshold([], 0.5) == math.inf
    assert score.top_fraction_threshold([0.2, 0.5, 0.5, 0.1], 0.25) == 0.5  # ties all kept


def test_filter_scored_counts_every_drop():
    records = [
        {"key": "a", "clip_score": 0.31},
        {"key": "b", "clip_score": 0.27},
        {"key": "c", "clip_score": None},
        {"key": "d", "clip_score": 0.28},
        {"key": "e", "reason": "no_image_or_caption"},
    ]
    result = score.filter_scored(records, 0.28)
    assert [r["key"] for r in result.kept] == ["a", "d"]
    counter = stage.flow_counts(result.kept, result.rejected)
    assert dict(counter) == {
        "input": 5,
        "kept": 2,
        "dropped:low_clip_score": 1,
        "dropped:undecodable_image": 1,
        "dropped:no_image_or_caption": 1,
    }
    assert [(r["key"], r["reason"]) for r in result.rejected] == [
        ("b", "low_clip_score"),
        ("c", "undecodable_image"),
        ("e", "no_image_or_caption"),
    ]
    assert result.rejected[0]["detail"] == "clip_score 0.2700 < threshold 0.2800"
    counters_lib.check_balanced(counter)


def test_filter_options_are_validated():
    with pytest.raises(WitError, match="not both"):
        ScoreConfig(threshold=0.2, keep_fraction=0.3)
    with pytest.raises(WitError, match="between 0 and 1"):
        ScoreConfig(keep_fraction=1.5)
    with pytest.raises(WitError, match="needs a seed model"):
        score.ScoreWithClip(config=ScoreConfig(model="ViT-B-32", pretrained=""))


def test_write_scored_shard_matches_parquet_rows_by_key(tmp_path):
    """Download shards have one Parquet row per pair: every row of a kept key keeps its score."""
    import pyarrow as pa

    img = _jpeg_bytes()
    samples = [
        shards.Sample("k1", img, "a red square", {"key": "k1", "url": "u1"}),
        shards.Sample("k2", img, "a blue sky", {"key": "k2", "url": "u2", "clip_score": 0.9}),
        shards.Sample("k3", img, "", {"key": "k3", "url": "u3"}),
    ]
    rows = pa.table({"key": ["k1", "k1", "k2", "k3"], "uid": ["a", "b", "c", "d"]})
    shards.write_shard(str(tmp_path / "in"), 7, samples, rows)
    result = score.write_scored_shard(
        "00007", {"k1": 0.31, "k2": 0.12}, 0.3,
        input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    counts = dict(stage.flow_counts(result.kept, result.rejected))
    assert counts == {"input": 3, "kept": 1, "dropped:low_clip_score": 1,
                      "dropped:no_image_or_caption": 1}  # fmt: skip
    (info,) = result.outputs["infos"]
    assert info["num_samples"] == 1 and info["tar"] == "00007.tar"
    tar, parquet = shards.shard_paths(str(tmp_path / "out" / "shards"), 7)
    kept = list(shards.iter_samples(tar))
    assert [k["__key__"] for k in kept] == ["k1"]
    assert json.loads(kept[0]["json"]) == {
        "key": "k1",
        "url": "u1",
        "clip_score": pytest.approx(0.31),
    }
    table = pq.read_table(parquet).to_pylist()
    assert [(r["key"], r["uid"]) for r in table] == [("k1", "a"), ("k1", "b")]
    assert all(r["clip_score"] == pytest.approx(0.31) for r in table)
    rejected = result.rejected
    assert [(r["key"], r["reason"]) for r in rejected] == [
        ("k2", "low_clip_score"), ("k3", "no_image_or_caption")]  # fmt: skip
    assert rejected[0]["clip_score"] == pytest.approx(0.12) and rejected[1]["clip_score"] is None


# ---------------------------------------------------------------------------------------------
# Beam transforms


def _pipeline() -> BeamTestPipeline:
    # Beam's default DirectRunner fetches the Prism binary from the network; FnApiRunner is local.
    return BeamTestPipeline(options=beam_utils.pipeline_options([]))


RECORDS = [
    {"key": k, "clip_score": s}
    for k, s in [("a", 0.9), ("b", 0.1), ("c", 0.5), ("d", None), ("e", 0.7), ("f", 0.3)]
]


def _keys(records):
    return sorted(r["key"] for r in records)


def test_filter_by_threshold_pipeline():
    with _pipeline() as p:
        out = p | beam.Create(RECORDS) | score.FilterByClipScore(config=ScoreConfig(threshold=0.5))
        assert_that(
            out["kept"] | "K" >> beam.Map(lambda r: r["key"]),
            equal_to(["a", "c", "e"]),
            label="kept",
        )
        assert_that(
            out[beam_utils.REJECTED] | "R" >> beam.Map(lambda r: (r["key"], r["reason"])),
            equal_to(
                [("b", "low_clip_score"), ("d", "undecodable_image"), ("f", "low_clip_score")]
            ),
            label="rejected",
        )
        assert_that(
            out[beam_utils.COUNTS] | beam_utils.SumCounts(),
            equal_to(
                [
                    {
                        "dropped:low_clip_score": 2,
                        "dropped:undecodable_image": 1,
                        "input": 6,
                        "kept": 3,
                    }
                ]
            ),
            label="counts",
        )


def test_filter_by_top_fraction_pipeline():
    # 5 scored records, top 40% -> the 2 best; the undecodable one is dropped on its own.
    with _pipeline() as p:
        out = (
            p
            | beam.Create(RECORDS)
            | score.FilterByClipScore(config=ScoreConfig(keep_fraction=0.4))
        )
        assert_that(
            out["kept"] | "K" >> beam.Map(lambda r: r["key"]), equal_to(["a", "e"]), label="kept"
        )
        assert_that(
            out[beam_utils.COUNTS] | beam_utils.SumCounts(),
            equal_to(
                [
                    {
                        "dropped:low_clip_score": 3,
                        "dropped:undecodable_image": 1,
                        "input": 6,
                        "kept": 2,
                    }
                ]
            ),
            label="counts",
        )


# ---------------------------------------------------------------------------------------------
# With a seed trained by wit_pipeline.train


def _auc(pos, neg):
    """Probability that a true pair outscores a shuffled one (ties count half)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_scorer_separates_true_pairs_from_shuffled_ones(trained_seed, shared_data, tmp_path):
    images, captions = flickr_paths(shared_data)
    dev = caption_sets.read_captions_tsv(captions, split="dev")[:300]
    data = [pathlib.Path(images, x.image).read_bytes() for x in dev]
    records = [
        {"key": f"t{i}", "image": data[i], "caption": x.captions[0]} for i, x in enumerate(dev)
    ]
    # Shuffled: each image with the caption of an image 150 places away (a derangement).
    records += [
        {"key": f"s{i}", "image": data[i], "caption": dev[(i + 150) % 300].captions[0]}
        for i in range(300)
    ]
    report = tmp_path / "auc.json"

    def check(actual):  # runs on a pickled copy: results go through a file
        by_key = dict(actual)
        assert len(by_key) == 600 and all(-1.0 <= s <= 1.0 for s in by_key.values())
        pos = [by_key[f"t{i}"] for i in range(300)]
        neg = [by_key[f"s{i}"] for i in range(300)]
        auc = _auc(pos, neg)
        assert auc >= 0.68, auc  # 0.5 is chance; this seed reaches about 0.75
        report.write_text(json.dumps({"auc": auc, "t0": by_key["t0"]}))

    with _pipeline() as p:
        scored = (
            p
            | beam.Create(records)
            | score.ScoreWithClip(
                config=ScoreConfig(model=SEED_MODEL, pretrained=trained_seed, batch_size=128)
            )
            | beam.Map(lambda r: (r["key"], r["clip_score"]))
        )
        assert_that(scored, check)
    result = json.loads(report.read_text())
    # The scores are the model's cosine similarities, batch-independent.
    from wit_pipeline import models

    loaded = models.load_model(SEED_MODEL, trained_seed, device="cpu")
    direct = score.score_pairs(loaded, [data[0], b"broken"], [dev[0].captions[0], "x"])
    assert direct[0] == pytest.approx(result["t0"], abs=1e-5)
    assert direct[1] is None
    # The same test with the untrained model (the trainer's initialization) is near chance.
    untrained = models.load_model(SEED_MODEL, None, device="cpu")
    plain = score.score_pairs(
        untrained, [r["image"] for r in records], [r["caption"] for r in records]
    )
    untrained_auc = _auc(plain[:300], plain[300:])
    assert abs(untrained_auc - 0.5) < 0.1
    assert result["auc"] >= untrained_auc + 0.15


def _jpeg_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def dev_shards(shared_data, tmp_path):
    """90 Flickr8k dev images in 3 shards of 30, plus a fourth shard with a broken sample."""
    out = write_flickr_shards(
        shared_data, tmp_path / "in", split="dev", samples_per_shard=30, limit=90
    )
    broken = [
        shards.Sample(
            "broken",
            b"\xff\xd8 not an image",
            "a broken image",
            {"key": "broken", "captions": ["x"]},
        ),
        shards.Sample(
            "red", _jpeg_bytes(), "a red square", {"key": "red", "captions": ["a red square"]}
        ),
    ]
    import pyarrow as pa

    shards.write_shard(out, 3, broken, pa.table({"key": ["broken", "red"], "url": ["u1", "u2"]}))
    return out


def test_wit_score_end_to_end(trained_seed, dev_shards, tmp_path, capsys):
    out = tmp_path / "scored"
    argv = [
        "score",
        "--input",
        dev_shards,
        "--output",
        str(out),
        "--model",
        SEED_MODEL,
        "--pretrained",
        trained_seed,
        "--keep-fraction",
        "0.5",
        "--batch-size",
        "64",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    # 92 samples: 1 broken image, 91 scored, top half (round(45.5) = 46) kept.
    assert printed["counters"] == {
        "input": 92,
        "kept": 46,
        "dropped:low_clip_score": 45,
        "dropped:undecodable_image": 1,
    }
    stats = json.loads((out / "stats.json").read_text())
    assert stats["counters"] == printed["counters"]
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] == 46 and manifest["num_shards"] == 4
    threshold = manifest["clip_score_threshold"]
    # Every kept sample carries its score in KEY.json and in the Parquet row; all >= threshold.
    kept_scores = {}
    for shard_id in range(4):
        tar, parquet = shards.shard_paths(str(out / "shards"), shard_id)
        metas = {s["__key__"]: json.loads(s["json"]) for s in shards.iter_samples(tar)}
        table = pq.read_table(parquet)
        assert sorted(table.column("key").to_pylist()) == sorted(metas)
        for row in table.to_pylist():
            assert row["clip_score"] == pytest.approx(metas[row["key"]]["clip_score"], abs=1e-6)
            assert row["clip_score"] >= threshold - 1e-6
            kept_scores[row["key"]] = row["clip_score"]
        if shard_id < 3:
            assert set(table.column_names) >= {"key", "url", "captions", "caption", "clip_score"}
    table = pq.read_table(out / "rejected")
    assert table.schema == stage.REJECTED_SCHEMA
    rejected = table.to_pylist()
    assert len(rejected) == 46 and {r["stage"] for r in rejected} == {"score"}
    assert {r["reason"] for r in rejected} == {"low_clip_score", "undecodable_image"}
    assert [r["key"] for r in rejected if r["reason"] == "undecodable_image"] == ["broken"]
    assert all(r["clip_score"] < threshold for r in rejected if r["reason"] == "low_clip_score")
    assert min(kept_scores.values()) >= max(
        r["clip_score"] for r in rejected if r["clip_score"] is not None
    )


def test_wit_score_rerun_reuses_cached_scores_and_checks_the_seed(
    trained_seed, dev_shards, tmp_path, capsys
):
    out = tmp_path / "scored"
    argv = [
        "score",
        "--input",
        dev_shards,
        "--output",
        str(out),
        "--model",
        SEED_MODEL,
        "--pretrained",
        trained_seed,
        "--threshold",
        "0.0",
    ]
    assert cli.main(argv) == 0
    capsys.readouterr()
    # Overwrite shard 0's cached scores: a rerun must use them instead of scoring again.
    cache = score.scores_path(str(out), "00000")
    keys = pq.read_table(cache).column("key").to_pylist()
    import pyarrow as pa

    fake = {k: (0.9 if i % 2 else -0.5) for i, k in enumerate(keys)}
    pq.write_table(
        pa.table({"key": list(fake), "clip_score": pa.array(list(fake.values()), pa.float32())}),
        cache,
    )
    assert cli.main(argv) == 0
    table = pq.read_table(shards.shard_paths(str(out / "shards"), 0)[1])
    assert sorted(table.column("key").to_pylist()) == sorted(k for k, v in fake.items() if v > 0)
    assert all(v == pytest.approx(0.9) for v in table.column("clip_score").to_pylist())
    capsys.readouterr()
    # Another seed into the same output is refused.
    other = tmp_path / "other.pt"
    other.write_bytes(pathlib.Path(trained_seed).read_bytes())
    rc = cli.main([*argv[:-4], "--pretrained", str(other), "--threshold", "0.0"])
    assert rc == 2 and "scores from another seed model" in capsys.readouterr().err


def test_wit_score_errors(dev_shards, tmp_path, capsys):
    rc = cli.main(
        ["score", "--input", dev_shards, "--output", str(tmp_path / "o"), "--model", "ViT-B-32"]
    )
    assert rc == 2 and "needs a seed model" in capsys.readouterr().err
    rc = cli.main(
        [
            "score",
            "--input",
            dev_shards,
            "--output",
            str(tmp_path / "o"),
            "--model",
            "wit-nano",
            "--pretrained",
            str(tmp_path / "missing.pt"),
        ]
    )
    assert rc == 2 and "checkpoint not found" in capsys.readouterr().err
    rc = cli.main(
        [
            "score",
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "o"),
            "--model",
            "wit-nano",
            "--pretrained",
            "openai",
        ]
    )
    assert rc == 2 and "neither a file nor a known tag" in capsys.readouterr().err


def test_score_shards_pipeline_serializes_for_remote_runners(trained_seed, dev_shards, tmp_path):
    """Every DoFn of the stage pickles: the pipeline survives a round trip through its proto
    (what Dataflow, Flink and Spark runners receive)."""
    cfg = ScoreConfig(model=SEED_MODEL, pretrained=trained_seed, keep_fraction=0.3)
    p = beam.Pipeline(options=beam_utils.pipeline_options([]))
    _ = p | score.ScoreShards(input_dir=dev_shards, output_dir=str(tmp_path / "o"), config=cfg)
    proto = p.to_runner_api()
    again = beam.Pipeline.from_runner_api(proto, p.runner, p._options)
    labels = {t.full_label for t in again.transforms_stack[0].parts[0].parts}
    assert {"ScoreShards/Score", "ScoreShards/WriteShards", "ScoreShards/WriteStats"} <= labels
