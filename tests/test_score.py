"""The CLIP-score stage: thresholds, filtering with counted drops, RunInference, `wit score`."""

from __future__ import annotations

import collections
import io
import json
import pathlib

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from clip_helpers import SEED_MODEL, flickr_paths, trained_seed, write_flickr_shards
from PIL import Image
from score_helpers import FakeClipHandler, fake_score, image_vector, text_vector

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


def test_filter_pairs_drops_pairs_then_samples():
    def pair(uid, caption, s, q=()):
        return {"uid": uid, "caption": caption, "clip_score": s, "query_ids": list(q)}

    samples = [
        {"key": "a", "url": "ua", "query_ids": [1, 2],
         "pairs": [pair("a1", "good", 0.6, [1]), pair("a2", "bad", 0.1, [2])]},
        {"key": "b", "url": "ub", "query_ids": [3],
         "pairs": [pair("b1", "bad", 0.2, [3]), pair("b2", "worse", 0.1)]},
        {"key": "c", "url": "uc", "pairs": [pair("c1", "x", None)]},
        {"key": "d", "url": "ud", "pairs": [pair("d2", "tie", 0.5), pair("d1", "tie too", 0.5)]},
    ]  # fmt: skip
    result = score.filter_pairs(samples, 0.3)
    a, d = result.kept
    assert [p["uid"] for p in a["pairs"]] == ["a1"] and a["query_ids"] == [1]
    assert (a["caption"], a["clip_score"]) == ("good", 0.6)
    assert (d["caption"], len(d["pairs"])) == ("tie too", 2)  # ties: the smallest uid
    assert [(r["key"], r["reason"], r["clip_score"], r["detail"]) for r in result.rejected] == [
        ("b", "low_clip_score", 0.2, "clip_scores 0.2000, 0.1000 < threshold 0.3000"),
        ("c", "undecodable_image", None, "the seed model could not read the image"),
    ]
    (lost,) = result.partial
    assert (lost["key"], lost["uid"], lost["caption"], lost["clip_score"]) == (
        "a",
        "a2",
        "bad",
        0.1,
    )
    assert lost["detail"] == "clip_score 0.1000 < threshold 0.3000"
    rows = [stage.rejected_row(r, stage="score") for r in [*result.rejected, *result.partial]]
    assert [(r["key"], r["uid"], r["uids"]) for r in rows] == [
        ("b", None, ["b1", "b2"]), ("c", None, ["c1"]), ("a", "a2", ["a2"])]  # fmt: skip
    counts = stage.flow_counts(result.kept, result.rejected, pairs=True, partial=result.partial)
    assert dict(counts) == {
        "input": 4, "kept": 2, "dropped:low_clip_score": 1, "dropped:undecodable_image": 1,
        "pair/input": 7, "pair/kept": 3, "pair/dropped:low_clip_score": 3,
        "pair/dropped:undecodable_image": 1,
    }  # fmt: skip
    everything = score.filter_pairs(samples[:1], None)
    assert len(everything.kept[0]["pairs"]) == 2 and not everything.partial


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


def _kept_metas(out) -> dict[str, dict]:
    """``KEY.json`` (with ``txt``: ``KEY.txt``) of every sample of a scored output's shards."""
    found = {}
    for tar in shards.list_shards(str(out / "shards")):
        for smp in shards.iter_samples(tar):
            found[smp["__key__"]] = {**json.loads(smp["json"]), "txt": smp["txt"].decode()}
    return found


def test_wit_score_end_to_end(trained_seed, dev_shards, tmp_path, capsys):
    """Every caption of the Flickr8k shards is a pair (5 per image): the top half of the pairs
    is kept, and a sample leaves only when none of its captions is in it."""
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
    # 452 pairs: 90 images x 5 captions, the red square's and the broken image's (not scored);
    # the top half of the 451 scored pairs (round(225.5) = 226) is kept.
    assert printed["pair_counters"] == {
        "input": 452,
        "kept": 226,
        "dropped:low_clip_score": 225,
        "dropped:undecodable_image": 1,
    }
    scores = {
        (r["key"], r["uid"]): r["clip_score"] for r in pq.read_table(out / "scores").to_pylist()
    }
    assert len(scores) == 452 and scores[("broken", "broken#0")] is None
    doc = json.loads((out / "score.json").read_text())
    threshold = doc["threshold"]
    assert doc["mode"] == "keep_fraction" and doc["pool_pairs"] == 451
    assert doc["null_size"] == 91  # every image that decodes (fewer than score.null_samples)
    assert 0 <= doc["mismatched_share"] <= 1 and doc["target_met"] is None
    by_key = collections.defaultdict(dict)
    for (k, u), v in scores.items():
        by_key[k][u] = v
    survivors = {k for k, v in by_key.items() if any(x is not None and x >= threshold
                                                     for x in v.values())}  # fmt: skip
    assert printed["counters"] == {
        "input": 92,
        "kept": len(survivors),
        "dropped:low_clip_score": 91 - len(survivors),
        "dropped:undecodable_image": 1,
    }
    stats = json.loads((out / "stats.json").read_text())
    assert stats["counters"] == printed["counters"] and stats["score"]["threshold"] == threshold
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["num_samples"] == len(survivors) and manifest["num_shards"] == 4
    assert manifest["clip_score_threshold"] == threshold
    # Each kept sample: its surviving captions, each with its score; KEY.txt the best one.
    metas = _kept_metas(out)
    assert sorted(metas) == sorted(survivors)
    for key, meta in metas.items():
        want = {u: v for u, v in by_key[key].items() if v >= threshold}
        assert {p["uid"]: p["clip_score"] for p in meta["pairs"]} == want
        assert meta["captions"] == [p["caption"] for p in meta["pairs"]]
        best = max(meta["pairs"], key=lambda p: p["clip_score"])
        assert meta["clip_score"] == best["clip_score"] == max(want.values())
        assert meta["txt"] == meta.get("caption", best["caption"]) == best["caption"]
    table = shards.read_table(str(out / "shards"))
    assert {r["key"]: r["clip_score"] for r in table.to_pylist()} == {
        k: m["clip_score"] for k, m in metas.items()
    }
    assert {r["key"]: r["captions"] for r in table.to_pylist()} == {
        k: m["captions"] for k, m in metas.items()
    }
    rejected = pq.read_table(out / "rejected")
    assert rejected.schema == stage.REJECTED_SCHEMA
    rows = rejected.to_pylist()
    assert {r["stage"] for r in rows} == {"score"}
    partial = [r for r in rows if r["uid"] is not None]  # pairs that kept samples lost
    assert sorted((r["key"], r["uid"]) for r in partial) == sorted(
        (k, u) for k in survivors for u, v in by_key[k].items() if v < threshold
    )
    assert all(r["clip_score"] == scores[(r["key"], r["uid"])] for r in partial)
    whole = sorted(r["key"] for r in rows if r["uid"] is None)
    assert whole == sorted(set(by_key) - survivors)


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
    rows = pq.read_table(cache).to_pylist()
    import pyarrow as pa

    keys = sorted({r["key"] for r in rows})
    good = set(keys[::2])  # every other sample keeps its first caption only
    for r in rows:
        r["clip_score"] = 0.9 if r["key"] in good and r["uid"].endswith("#0") else -0.5
    pq.write_table(pa.Table.from_pylist(rows, schema=score.SCORES_SCHEMA), cache)
    assert cli.main(argv) == 0
    table = pq.read_table(shards.shard_paths(str(out / "shards"), 0)[1])
    assert sorted(table.column("key").to_pylist()) == sorted(good)
    assert all(v == pytest.approx(0.9) for v in table.column("clip_score").to_pylist())
    assert all(len(c) == 1 for c in table.column("captions").to_pylist())
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


# ---------------------------------------------------------------------------------------------
# Pair by pair, with a seed of known embeddings (score_helpers.FakeClipHandler): exact outcomes


def _color_jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(
        buf, format="JPEG"
    )
    return buf.getvalue()


def _write_samples(directory, shard_id, specs):
    """``specs``: (key, meta, KEY.txt, image bytes); the Parquet holds one row per sample."""
    import pyarrow as pa

    samples = [shards.Sample(k, img, txt, meta) for k, meta, txt, img in specs]
    rows = [{"key": k, "url": meta.get("url", f"http://x/{k}.jpg"), "caption": txt,
             "captions": meta.get("captions") or [txt]} for k, meta, txt, _ in specs]  # fmt: skip
    shards.write_shard(str(directory), shard_id, samples, pa.Table.from_pylist(rows))


def _pairs(*items):
    return [{"uid": u, "caption": c, "query_ids": list(q)} for u, c, q in items]


# The good captions score 0.8 with their image; every other pair is a random direction
# (below 0.5 for the pairs below: asserted by test_fake_scores_are_as_planned).
MATCHES = {
    "a good caption of s1": ("s1", 0.8),
    "a good caption of s3": ("s3", 0.8),
    "a good caption of s5": ("s5", 0.8),
    "a good caption of s6": ("s6", 0.8),
}


@pytest.fixture
def fake_shards(tmp_path):
    """Two shards: s1 (one good, one bad caption), s2 (only a bad one), s3 (good), s4 (broken
    image); s5 (captions only: a bad one in KEY.txt, a good one), s6 (KEY.txt only)."""
    d = tmp_path / "in"
    _write_samples(d, 0, [
        ("s1", {"key": "s1", "caption": "a bad caption of s1", "query_ids": [1, 2], "pairs":
                _pairs(("u1a", "a good caption of s1", [1]), ("u1b", "a bad caption of s1", [2])),
                "captions": ["a good caption of s1", "a bad caption of s1"], "uids": ["u1a", "u1b"]},
         "a bad caption of s1", _color_jpeg(1)),
        ("s2", {"key": "s2", "pairs": _pairs(("u2a", "a bad caption of s2", [3]))},
         "a bad caption of s2", _color_jpeg(2)),
        ("s3", {"key": "s3", "pairs": _pairs(("u3a", "a good caption of s3", []))},
         "a good caption of s3", _color_jpeg(3)),
        ("s4", {"key": "s4", "pairs": _pairs(("u4a", "a good caption of s4", []))},
         "a good caption of s4", b"\xff\xd8 not an image"),
    ])  # fmt: skip
    _write_samples(d, 1, [
        ("s5", {"key": "s5", "caption": "a bad caption of s5",
                "captions": ["a bad caption of s5", "a good caption of s5"]},
         "a bad caption of s5", _color_jpeg(5)),
        ("s6", {}, "a good caption of s6", _color_jpeg(6)),
    ])  # fmt: skip
    return d


def _run_score_shards(input_dir, out, cfg, handler, beam_args=()):
    with beam.Pipeline(options=beam_utils.pipeline_options(list(beam_args))) as p:
        _ = p | score.ScoreShards(
            input_dir=str(input_dir), output_dir=str(out), config=cfg, model_handler=handler
        )


def _fake_cfg(**kw):
    return ScoreConfig(model="fake", pretrained="fake", **kw)


def test_write_scored_shard_keeps_the_parquet_rows_of_surviving_pairs(tmp_path):
    """Download shards have one Parquet row per pair: a row stays when its pair does, with its
    own score."""
    import pyarrow as pa

    img = _jpeg_bytes()
    pairs = _pairs(("a", "a red square", [1]), ("b", "a red box", [2]))
    samples = [
        shards.Sample("k1", img, "a red square", {"key": "k1", "url": "u1", "pairs": pairs}),
        shards.Sample("k2", img, "a blue sky", {"key": "k2", "url": "u2",
                      "pairs": _pairs(("c", "a blue sky", []))}),
        shards.Sample("k3", img, "", {"key": "k3", "url": "u3"}),
    ]  # fmt: skip
    rows = pa.table({"key": ["k1", "k1", "k2", "k3"], "uid": ["a", "b", "c", "d"]})
    shards.write_shard(str(tmp_path / "in"), 7, samples, rows)
    scores = {("k1", "a"): 0.31, ("k1", "b"): 0.2, ("k2", "c"): 0.12}
    result = score.write_scored_shard(
        "00007", scores, 0.3, input_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "out")
    )
    counts = stage.flow_counts(result.kept, result.rejected, pairs=True, partial=result.partial)
    assert dict(counts) == {
        "input": 3, "kept": 1, "dropped:low_clip_score": 1, "dropped:no_image_or_caption": 1,
        "pair/input": 3, "pair/kept": 1, "pair/dropped:low_clip_score": 2,
        "pair/dropped:no_image_or_caption": 0,  # k3 has no caption: no pair
    }  # fmt: skip
    (info,) = result.outputs["infos"]
    assert info["num_samples"] == 1 and info["tar"] == "00007.tar"
    tar, parquet = shards.shard_paths(str(tmp_path / "out" / "shards"), 7)
    (kept,) = list(shards.iter_samples(tar))
    meta = json.loads(kept["json"])
    assert meta["pairs"] == [{**pairs[0], "clip_score": 0.31}] and meta["clip_score"] == 0.31
    table = pq.read_table(parquet).to_pylist()
    assert [(r["key"], r["uid"]) for r in table] == [("k1", "a")]
    assert table[0]["clip_score"] == pytest.approx(0.31)
    assert [(r["key"], r["reason"]) for r in result.rejected] == [
        ("k2", "low_clip_score"), ("k3", "no_image_or_caption")]  # fmt: skip
    assert [(r["key"], r["uid"], r["clip_score"]) for r in result.partial] == [("k1", "b", 0.2)]


def test_fake_scores_are_as_planned():
    for caption, (key, cos) in MATCHES.items():
        assert fake_score(key, caption, MATCHES) == pytest.approx(cos, abs=1e-6)
    for key, caption in [("s1", "a bad caption of s1"), ("s2", "a bad caption of s2"),
                         ("s5", "a bad caption of s5")]:  # fmt: skip
        assert fake_score(key, caption, MATCHES) < 0.5


def test_wit_score_keeps_the_good_captions_pair_by_pair(fake_shards, tmp_path):
    out = tmp_path / "out"
    _run_score_shards(fake_shards, out, _fake_cfg(threshold=0.5), FakeClipHandler(MATCHES))
    sc = {c: fake_score(k, c, MATCHES) for k, c in [
        ("s1", "a good caption of s1"), ("s1", "a bad caption of s1"),
        ("s2", "a bad caption of s2"), ("s3", "a good caption of s3"),
        ("s5", "a bad caption of s5"), ("s5", "a good caption of s5"),
        ("s6", "a good caption of s6")]}  # fmt: skip
    stats = json.loads((out / "stats.json").read_text())
    assert stats["counters"] == {
        "input": 6,
        "kept": 4,
        "dropped:low_clip_score": 1,
        "dropped:undecodable_image": 1,
    }
    assert stats["pair_counters"] == {
        "input": 8,
        "kept": 4,
        "dropped:low_clip_score": 3,
        "dropped:undecodable_image": 1,
    }
    assert stats["score"]["mode"] == "fixed" and stats["score"]["threshold"] == 0.5
    metas = _kept_metas(out)
    assert sorted(metas) == ["s1", "s3", "s5", "s6"]
    s1 = metas["s1"]  # one good, one bad caption: only the good one is left
    assert s1["pairs"] == [{"uid": "u1a", "caption": "a good caption of s1", "query_ids": [1],
                            "clip_score": sc["a good caption of s1"]}]  # fmt: skip
    assert (s1["captions"], s1["uids"], s1["query_ids"]) == (
        ["a good caption of s1"], ["u1a"], [1])  # fmt: skip
    assert s1["txt"] == s1["caption"] == "a good caption of s1"
    assert s1["clip_score"] == sc["a good caption of s1"]
    s5 = metas["s5"]  # captions only: pairs named KEY#i; KEY.txt was the bad one
    assert s5["txt"] == s5["caption"] == "a good caption of s5"
    assert s5["captions"] == ["a good caption of s5"]
    assert s5["pairs"] == [{"uid": "s5#1", "caption": "a good caption of s5",
                            "clip_score": sc["a good caption of s5"]}]  # fmt: skip
    assert metas["s6"]["pairs"][0]["uid"] == "s6#0"
    # the Parquet rows follow KEY.json
    rows = {r["key"]: r for r in shards.read_table(str(out / "shards")).to_pylist()}
    assert rows["s1"]["captions"] == ["a good caption of s1"]
    assert rows["s1"]["caption"] == "a good caption of s1"
    assert rows["s1"]["clip_score"] == pytest.approx(sc["a good caption of s1"])
    assert [p["uid"] for p in rows["s5"]["pairs"]] == ["s5#1"]
    # rejected/: the two lost pairs with their scores, the dropped samples
    rej = sorted(
        pq.read_table(out / "rejected").to_pylist(), key=lambda r: (r["key"], r["uid"] or "")
    )
    assert [(r["key"], r["uid"], r["reason"], r["caption"]) for r in rej] == [
        ("s1", "u1b", "low_clip_score", "a bad caption of s1"),
        ("s2", None, "low_clip_score", "a bad caption of s2"),
        ("s4", None, "undecodable_image", "a good caption of s4"),
        ("s5", "s5#0", "low_clip_score", "a bad caption of s5"),
    ]
    assert rej[0]["clip_score"] == pytest.approx(sc["a bad caption of s1"])
    assert rej[0]["detail"] == f"clip_score {sc['a bad caption of s1']:.4f} < threshold 0.5000"
    assert rej[1]["uids"] == ["u2a"] and rej[1]["clip_score"] == pytest.approx(
        sc["a bad caption of s2"])  # fmt: skip
    # the scores table: every pair, kept or not
    table = pq.read_table(out / "scores").to_pylist()
    assert sorted((r["key"], r["uid"]) for r in table) == [
        ("s1", "u1a"), ("s1", "u1b"), ("s2", "u2a"), ("s3", "u3a"), ("s4", "u4a"),
        ("s5", "s5#0"), ("s5", "s5#1"), ("s6", "s6#0")]  # fmt: skip
    assert {r["uid"]: r["clip_score"] for r in table}["u4a"] is None


def test_wit_score_keep_fraction_is_a_fraction_of_pairs(fake_shards, tmp_path):
    out = tmp_path / "out"
    _run_score_shards(fake_shards, out, _fake_cfg(keep_fraction=0.5), FakeClipHandler(MATCHES))
    table = pq.read_table(out / "scores").to_pylist()
    scored = sorted((r["clip_score"] for r in table if r["clip_score"] is not None), reverse=True)
    assert len(scored) == 7
    threshold = scored[3]  # k = round(3.5) = 4 of the 7 scored pairs
    doc = json.loads((out / "score.json").read_text())
    assert doc["threshold"] == pytest.approx(threshold) and doc["mode"] == "keep_fraction"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["pair_counters"]["kept"] == 4
    assert stats["pair_counters"]["dropped:low_clip_score"] == 3
    kept = {(k, p["uid"]) for k, m in _kept_metas(out).items() for p in m["pairs"]}
    assert kept == {(r["key"], r["uid"]) for r in table if (r["clip_score"] or -9) >= threshold}


def _auto_pool(directory, n_samples: int = 40):
    """``n_samples`` samples over two shards; 1 to 3 captions each, about a third of them bad."""
    matches, specs = {}, {0: [], 1: []}
    for i in range(n_samples):
        key = f"k{i:03d}"
        caps = [f"caption {j} of {key}" for j in range(1 + i % 3)]
        for j, c in enumerate(caps):
            if (i + j) % 3:
                matches[c] = (key, 0.55 + 0.01 * (i % 20))
        meta = {"key": key, "pairs": _pairs(*((f"{key}-{j}", c, []) for j, c in enumerate(caps)))}
        specs[i % 2].append((key, meta, caps[0], _color_jpeg(i)))
    for shard_id, items in specs.items():
        _write_samples(directory, shard_id, sorted(items))
    return matches


def _expected_auto(input_dir, matches, cfg):
    """The auto decision, computed from the definitions (docs/score.md), not by the pipeline."""
    from wit_pipeline.stages.score import calibrate

    pool, cands, ids = [], [], []
    for tar in shards.list_shards(str(input_dir)):
        for smp in shards.iter_samples(tar):
            meta = json.loads(smp["json"])
            ids.append(smp["__key__"])
            pool += [fake_score(smp["__key__"], p["caption"], matches) for p in meta["pairs"]]
    for iid in calibrate.select_null(ids, cfg.null_samples, cfg.null_seed):
        tar_meta = {}
        for tar in shards.list_shards(str(input_dir)):
            for smp in shards.iter_samples(tar):
                if smp["__key__"] == iid:
                    tar_meta = json.loads(smp["json"])
        first = min(tar_meta["pairs"], key=lambda p: p["uid"])
        cands.append(calibrate.NullCandidate(
            iid, calibrate.null_rank(cfg.null_seed, iid), first["uid"],
            image_vector(iid), text_vector(first["caption"], matches)))  # fmt: skip
    return calibrate.decide(cfg, calibrate.histogram(pool), calibrate.null_scores(cands)), pool


def test_wit_score_auto_threshold_is_the_same_on_every_runner(tmp_path, monkeypatch):
    """The null is chosen and paired by keys: batch sizes and worker processes give the same
    null, threshold and shards (byte for byte)."""
    import os

    d = tmp_path / "in"
    matches = _auto_pool(d)
    cfg = _fake_cfg(threshold="auto", target_precision=0.9, null_samples=30)
    want, pool = _expected_auto(d, matches, cfg)
    assert want.doc["null_size"] == 30 and want.doc["pool_pairs"] == len(pool) == 79
    tests_dir = str(pathlib.Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = {
        "batch 3": ([], 3),
        "batch 16": ([], 16),
        "2 processes": (["--direct_num_workers=2", "--direct_running_mode=multi_processing"], 5),
    }
    docs, manifests = {}, {}
    for name, (args, batch) in runs.items():
        out = tmp_path / name.replace(" ", "-")
        _run_score_shards(d, out, cfg, FakeClipHandler(matches, batch_size=batch), args)
        docs[name] = json.loads((out / "score.json").read_text())
        m = json.loads((out / "shards" / "manifest.json").read_text())
        manifests[name] = [(s["tar"], s["sha256"], s["num_samples"]) for s in m["shards"]]
    first = docs["batch 3"]
    assert all(doc == first for doc in docs.values())
    assert all(m == manifests["batch 3"] for m in manifests.values())
    assert {k: v for k, v in first.items() if k not in ("model", "pretrained")} == want.doc
    assert first["threshold"] == want.threshold and first["target_met"] is True
    kept = sum(s >= want.threshold for s in pool)
    stats = json.loads((tmp_path / "batch-3" / "stats.json").read_text())
    assert stats["pair_counters"]["kept"] == kept
    assert stats["pair_counters"]["dropped:low_clip_score"] == 79 - kept
    assert stats["score"]["expected_precision"] == want.doc["expected_precision"]


def test_balancing_captions_a_scored_sample_with_its_best_caption():
    from wit_pipeline.stages import balance

    counts = {1: 100, 2: 3}
    pairs = [
        {"uid": "b", "caption": "rare query", "query_ids": [2]},
        {"uid": "a", "caption": "common query", "query_ids": [1]},
    ]
    assert balance.choose_caption(pairs, counts) == "rare query"  # unscored: the rarest query
    scored = [{**pairs[0], "clip_score": 0.2}, {**pairs[1], "clip_score": 0.4}]
    assert balance.choose_caption(scored, counts) == "common query"  # scored: the best score
    tied = [{**pairs[0], "clip_score": 0.4}, {**pairs[1], "clip_score": 0.4}]
    assert balance.choose_caption(tied, counts) == "common query"  # ties: the smallest uid


class _NoScoring(FakeClipHandler):
    def embed(self, batch, loaded):
        raise AssertionError("a cached shard was scored again")


def test_wit_score_rerun_reuses_the_null_cache(tmp_path):
    d = tmp_path / "in"
    matches = _auto_pool(d, n_samples=24)
    cfg = _fake_cfg(threshold="auto", target_precision=0.9, null_samples=12)
    out = tmp_path / "out"
    _run_score_shards(d, out, cfg, FakeClipHandler(matches))
    first = json.loads((out / "score.json").read_text())
    assert sorted(p.name for p in (out / "scores" / "_null").iterdir()) == [
        "00000.parquet", "00001.parquet"]  # fmt: skip
    # every shard cached, scores and null embeddings: nothing is scored, the same decision
    _run_score_shards(d, out, cfg, _NoScoring(matches))
    assert json.loads((out / "score.json").read_text()) == first
    # another null (another seed): the shards whose null images are not cached are scored
    # again, and the outcome is that of a fresh run
    other = _fake_cfg(threshold="auto", target_precision=0.9, null_samples=12, null_seed=1)
    _run_score_shards(d, out, other, FakeClipHandler(matches))
    fresh = tmp_path / "fresh"
    _run_score_shards(d, fresh, other, FakeClipHandler(matches))
    again = json.loads((out / "score.json").read_text())
    assert again == json.loads((fresh / "score.json").read_text())
    want, _ = _expected_auto(d, matches, other)
    assert {k: v for k, v in again.items() if k not in ("model", "pretrained")} == want.doc
    assert again["histogram"]["null"] != first["histogram"]["null"]  # another null indeed
