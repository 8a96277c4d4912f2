import collections
import io
import json

import apache_beam as beam
import download_fixture as fx
import imagehash
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from wit_pipeline import beam_utils, config, samples, steps
from wit_pipeline.errors import WitError
from wit_pipeline.stages.dedup import core as dedup
from wit_pipeline.stages.dedup import decontaminate, groups, lsh, phash


def _pipeline() -> test_pipeline.TestPipeline:
    # FnApiRunner: DirectRunner would try to download Prism.
    return test_pipeline.TestPipeline(options=beam_utils.pipeline_options([]))


def _flip(h: int, *bits: int) -> int:
    for b in bits:
        h ^= 1 << b
    return h


# ---------------------------------------------------------------------------------------------
# Banding and verification


def test_bands_partition_the_64_bits():
    for n in (1, 2, 5, 9, 33):
        masks = lsh.Bands(n).masks
        total = 0
        for m in masks.tolist():
            assert total & m == 0
            total |= m
        assert total == (1 << 64) - 1
    bands = lsh.Bands(5)
    # band b holds bits b, b + 5, ... counted from the most significant bit
    assert bands.values(np.array([1 << 63], np.uint64))[:, 0].tolist() == [1 << 12, 0, 0, 0, 0]
    assert bands.values(np.array([1 << 62], np.uint64))[:, 0].tolist() == [0, 1 << 12, 0, 0, 0]


def test_first_shared_band():
    bands = lsh.Bands(3)
    masks = bands.masks.tolist()
    x = np.array([0, masks[0], masks[0] | masks[1], (1 << 64) - 1], dtype=np.uint64)
    assert bands.first_shared(x).tolist() == [0, 1, 2, 3]


def test_max_distance_is_validated():
    with pytest.raises(WitError):
        lsh.bands_for(-1)
    with pytest.raises(WitError):
        lsh.bands_for(40)


@pytest.mark.parametrize("k", [0, 1, 3, 4, 8])
def test_banded_pairs_equal_all_pairs_on_real_hashes_with_planted_neighbours(shared_data, k):
    table = pq.read_table(shared_data / "cifar10" / "test.parquet").slice(0, 1500)
    real, _ = phash.PHasher().hash_bytes(table.column("image").to_pylist())
    rng = np.random.default_rng(k)
    planted = []
    for i in rng.integers(0, len(real), 300).tolist():
        flips = rng.choice(64, int(rng.integers(0, 10)), replace=False).tolist()
        planted.append(_flip(int(real[i]), *flips))
    hashes = np.concatenate([real, np.array(planted, np.uint64), real[:10]])
    expected = lsh.all_pairs_within(hashes, k)
    assert len(expected) > 10  # the planted neighbours and exact repeats are there
    assert lsh.near_duplicate_pairs(hashes, k) == expected


def test_band_pairs_reports_each_pair_once_in_its_first_shared_band():
    base = 0x0123456789ABCDEF
    hashes = np.array([base, _flip(base, 0), _flip(base, 63), _flip(base, 5, 6, 7)], np.uint64)
    bands = lsh.bands_for(2)
    found = collections.Counter()
    for b in range(bands.num_bands):
        i, j = lsh.band_pairs(hashes, b, bands, 2)
        found.update((min(a, c), max(a, c)) for a, c in zip(i.tolist(), j.tolist(), strict=True))
    assert found == {(0, 1): 1, (0, 2): 1, (1, 2): 1}


def test_band_pairs_chunks_large_buckets():
    hashes = np.array([_flip(0, b) for b in range(40)] + [0], np.uint64)
    bands = lsh.bands_for(2)
    full = lsh.band_pairs(hashes, 0, bands, 2)
    small = lsh.band_pairs(hashes, 0, bands, 2, budget=7)
    assert sorted(zip(*map(np.ndarray.tolist, full), strict=True)) == sorted(
        zip(*map(np.ndarray.tolist, small), strict=True)
    )


def test_sub_bands_hold_every_bit_outside_their_band_once():
    bands = lsh.bands_for(4)
    for band in range(bands.num_bands):
        groups_ = bands.sub_bands(band)
        assert len(groups_) == bands.num_bands
        held = sorted(p for g in groups_ for p in g.tolist())
        assert held == [p for p in range(64) if p % bands.num_bands != band]


@pytest.mark.parametrize("k", [1, 4, 8, 16])
def test_long_runs_split_by_sub_bands_find_every_pair_once(k, monkeypatch):
    """Runs longer than ``_SUB_BAND_RUN`` (500 hashes equal on band 0, 100 on band 1, and their
    planted neighbours) are compared by sub-band: the same pairs as all pairs, each once."""
    split = []
    long_runs = lsh._near_in_long_runs
    monkeypatch.setattr(
        lsh,
        "_near_in_long_runs",
        lambda starts, *a: split.append(len(starts)) or long_runs(starts, *a),
    )
    rng = np.random.default_rng(k)
    bands = lsh.bands_for(k)
    m0, m1 = bands.masks[0], bands.masks[1]
    base = rng.integers(0, 2**63, size=600, dtype=np.int64).astype(np.uint64)
    base[:500] = (base[:500] & ~m0) | (np.uint64(0x0F0F0F0F0F0F0F0F) & m0)
    base[500:] = (base[500:] & ~m1) | (np.uint64(0x3333333333333333) & m1)
    planted = [
        _flip(int(base[i]), *rng.choice(64, int(rng.integers(0, k + 3)), replace=False).tolist())
        for i in rng.integers(0, 600, 300).tolist()
    ]
    hashes = np.unique(np.concatenate([base, np.array(planted, np.uint64)]))
    assert np.bincount(bands.values(hashes, 0)).max() > lsh._SUB_BAND_RUN
    found = collections.Counter()
    for b in range(bands.num_bands):
        i, j = lsh.band_pairs(hashes, b, bands, k)
        assert (i != j).all()
        found.update((min(a, c), max(a, c)) for a, c in zip(i.tolist(), j.tolist(), strict=True))
    expected = lsh.all_pairs_within(hashes, k)
    assert len(expected) > 50
    assert found == dict.fromkeys(expected, 1)
    assert split == [1]  # band 0's run of 500 went through the sub-bands; no other run did


def test_band_components_link_identical_hashes_on_band_zero_only():
    h = np.array([5, 5, 5, 1 << 40], np.uint64)
    bands = lsh.bands_for(1)
    assert lsh.band_components(h, 0, bands, 1).tolist()[:3] == [0, 0, 0]
    assert lsh.band_components(h, 0, bands, 1)[3] == -1
    assert lsh.band_components(h, 1, bands, 1).tolist() == [-1, -1, -1, -1]


# ---------------------------------------------------------------------------------------------
# Survivors


def test_union_find_root_is_the_best_ranked_member():
    uf = groups.UnionFind()
    uf.union("b", (-100, "b"), "a", (-100, "a"))
    uf.union("c", (-900, "c"), "b", (-100, "b"))
    uf.union("x", (-1, "x"), "y", (-1, "y"))
    assert uf.survivors() == {"a": "c", "b": "c", "c": "c", "x": "x", "y": "x"}
    other = groups.UnionFind()
    other.union("y", (-1, "y"), "z", (-5000, "z"))
    uf.merge(other)
    assert uf.survivors()["x"] == "z"


def test_survivor_rank_prefers_original_pixels_then_smallest_key():
    recs = [
        {"key": "b", "original_width": 100, "original_height": 100},
        {"key": "a", "original_width": 100, "original_height": 100},
        {"key": "c", "original_width": 0, "original_height": 0, "width": 90, "height": 90},
    ]
    assert [r["key"] for r in sorted(recs, key=groups.survivor_rank)] == ["a", "b", "c"]


def _rec(key, h, area=100):
    return {
        "key": key,
        "phash": phash.to_hex(h),
        "original_width": area,
        "original_height": 1,
        "url": f"http://x.test/{key}",
        "pairs": [{"uid": f"u{key}", "caption": f"cap {key}", "query_ids": [ord(key[0]) % 3]}],
        "query_ids": [ord(key[0]) % 3],
    }


def _planted_records():
    a = 0x0F0F0F0F33333333
    far = 0xF0F0F0F0CCCCCCCC
    return [
        _rec("a", a, 100),
        _rec("b", _flip(a, 1, 9, 17), 200),  # 3 bits from a, more pixels -> survivor
        _rec("c", _flip(a, 1, 9, 17, 30, 40, 50, 60), 50),  # 4 from b, 7 from a: joins via b
        _rec("d", far, 100),  # alone
        _rec("f", 0x1111222233334444, 100),  # identical pair: same area -> smallest key
        _rec("e", 0x1111222233334444, 100),
        _rec("g", 0x5555AAAA5555AAAA, 100),  # exactly 4 bits from h -> duplicates
        _rec("h", _flip(0x5555AAAA5555AAAA, 0, 16, 32, 48), 100),
        _rec("i", 0x7777000077770000, 100),  # 5 bits from j -> not duplicates
        _rec("j", _flip(0x7777000077770000, 3, 13, 23, 33, 43), 100),
    ]


@pytest.mark.parametrize(("partitions", "label_rounds"), [(1, 4), (3, 0), (64, None)])
def test_find_near_duplicates_maps_members_to_survivors(partitions, label_rounds):
    with _pipeline() as p:
        out = (
            p
            | beam.Create(_planted_records())
            | groups.FindNearDuplicates(
                max_distance=4, partitions=partitions, batch_size=3, label_rounds=label_rounds
            )
        )
        assert_that(
            out,
            equal_to(
                [
                    ("a", "b"),
                    ("b", "b"),
                    ("c", "b"),
                    ("e", "e"),
                    ("f", "e"),
                    ("g", "g"),
                    ("h", "g"),
                ]
            ),
        )


def _rank(key: str, area: int = 100) -> tuple[int, str]:
    return (-area, key)


def _union_find_survivors(edges):
    uf = groups.UnionFind()
    for a, ra, b, rb in edges:
        uf.union(a, ra, b, rb)
    return uf.survivors()


def _label_components(edges, rounds) -> int:
    """Runs LabelComponents, checks it against UnionFind; returns the nodes left to it."""
    p = _pipeline()
    out = p | beam.Create(edges) | groups.LabelComponents(rounds=rounds)
    assert_that(out, equal_to(sorted(_union_find_survivors(edges).items())))
    return _nodes_left_to_union_find(p)


def _nodes_left_to_union_find(p) -> int:
    """Runs ``p``; the images that label propagation left to the one-worker union-find."""
    result = p.run()
    result.wait_until_finish()
    name = MetricsFilter().with_name(groups.RESIDUE_NODES_METRIC)
    return sum(c.committed for c in result.metrics().query(name)["counters"])


@pytest.mark.parametrize(("rounds", "left"), [(0, 27), (1, 24), (3, 12), (9, 12), (10, 0)])
def test_label_components_equals_union_find_on_chains_and_stars(rounds, left):
    # A chain of 12 (wider than 0-2 rounds reach: finished by the one-worker union-find), two
    # stars joined through a leaf, a pair, and a key seen with two ranks (overlapping inputs):
    # its better rank makes it its group's survivor.
    chain = [
        (f"c{i:02d}", _rank(f"c{i:02d}"), f"c{i + 1:02d}", _rank(f"c{i + 1:02d}"))
        for i in range(11)
    ]
    chain.reverse()  # the best node (c00) at the far end of the first edges
    stars = [(f"s{i}", _rank(f"s{i}"), "hub1", _rank("hub1", 500)) for i in range(5)]
    stars += [(f"t{i}", _rank(f"t{i}"), "hub2", _rank("hub2", 900)) for i in range(5)]
    stars += [("s4", _rank("s4"), "t0", _rank("t0"))]
    pair = [("p1", _rank("p1", 50), "p2", _rank("p2", 40))]
    copies = [("x", _rank("x", 10), "y", _rank("y", 20)), ("x", _rank("x", 30), "z", _rank("z", 5))]
    edges = chain + stars + pair + copies
    survivors = _union_find_survivors(edges)
    assert survivors["c11"] == "c00" and survivors["s0"] == "hub2" and survivors["y"] == "x"
    # The first labels reach one hop: with 0 rounds only the pair is done; 1 more round settles
    # the copies, 3 the joined stars (s0 is 4 hops from hub2), 10 the chain (11 hops).
    assert _label_components(edges, rounds) == left


def test_label_components_matches_union_find_on_random_forests():
    rng = np.random.default_rng(21)
    keys = [f"n{i:04d}" for i in range(600)]
    areas = rng.integers(1, 5, len(keys)) * 100
    edges = []
    for _ in range(700):
        a, b = rng.choice(len(keys), 2, replace=False)
        if abs(int(a) - int(b)) < 40:  # local edges: groups of varied sizes and diameters
            edges.append((keys[a], _rank(keys[a], areas[a]), keys[b], _rank(keys[b], areas[b])))
    assert len(edges) > 20
    _label_components(edges, 3)


def test_a_round_keeps_the_best_label_and_refuses_a_node_without_its_own_state():
    own = ((-400, "b"), (-400, "b"), (("a", (-100, "a")),))
    assert groups._keep_best_label(("b", [own, ([-900, "z"], None, None)])) == (
        "b",
        ((-900, "z"), (-400, "b"), (("a", (-100, "a")),)),
    )
    with pytest.raises(RuntimeError, match=r"node 'b' received 1 label\(s\) but not its own state"):
        groups._keep_best_label(("b", [((-900, "z"), None, None)]))


def test_label_components_rejects_negative_rounds():
    with pytest.raises(ValueError):
        groups.LabelComponents(rounds=-1)
    with pytest.raises(ValueError):
        groups.FindNearDuplicates(max_distance=4, label_rounds=-1)


def test_dedup_records_collapses_groups_and_counts_drops():
    with _pipeline() as p:
        out = (
            p
            | beam.Create(_planted_records())
            | dedup.DedupRecords(config=config.DedupConfig(max_distance=4))
        )
        assert_that(
            out["samples"]
            | "Keys" >> beam.Map(lambda r: (r["key"], [x["uid"] for x in r["pairs"]])),
            equal_to(
                [
                    ("b", ["ua", "ub", "uc"]),
                    ("d", ["ud"]),
                    ("e", ["ue", "uf"]),
                    ("g", ["ug", "uh"]),
                    ("i", ["ui"]),
                    ("j", ["uj"]),
                ]
            ),
            label="Samples",
        )
        assert_that(
            out["rejected"]
            | beam.Map(lambda r: (r["key"], r["reason"], r["duplicate_of"], r["distance"])),
            equal_to(
                [
                    ("a", "near_duplicate", "b", 3),
                    ("c", "near_duplicate", "b", 4),
                    ("f", "near_duplicate", "e", 0),
                    ("h", "near_duplicate", "g", 4),
                ]
            ),
            label="Rejected",
        )
        assert_that(
            out["counts"] | beam.CombinePerKey(sum),
            equal_to([("dropped:near_duplicate", 4)]),
            label="Counts",
        )


def test_collapse_key_sends_keys_in_no_group_past_the_second_shuffle():
    rec = {"key": "k", "url": "u", "phash": "0" * 16, "pairs": [{"uid": "p", "caption": "c"}]}
    alone = dedup.collapse_key(("k", {"records": [rec], "survivor": []}))
    assert alone.kept == [] and alone.rejected == [] and alone.outputs == {dedup.ALONE: [rec]}
    member = dedup.collapse_key(("k", {"records": [rec], "survivor": ["s"]}))
    assert member.kept == [("s", (False, rec))] and not member.outputs
    survivor = dedup.collapse_key(("k", {"records": [rec], "survivor": ["k"]}))
    assert survivor.kept == [("k", (True, rec))]
    assert dedup.collapse_key(("k", {"records": [], "survivor": ["s"]})).kept == []


def test_union_find_keeps_the_best_rank_of_a_key_seen_twice():
    uf = groups.UnionFind()
    uf.union("a", (-100, "a"), "b", (-200, "b"))
    uf.union("c", (-50, "c"), "b", (-200, "b"))
    uf.add("a", (-300, "a"))  # a second copy of "a" with more pixels: it becomes the root
    uf.add("c", (-10, "c"))  # a worse rank changes nothing
    assert uf.survivors() == {"a": "a", "b": "a", "c": "a"}
    assert uf.rank == {"a": (-300, "a"), "b": (-200, "b"), "c": (-50, "c")}


def test_overlapping_inputs_merge_copies_of_one_key_and_count_them():
    recs = _planted_records()
    a = next(r for r in recs if r["key"] == "a")
    d = next(r for r in recs if r["key"] == "d")
    extra = {"uid": "ua2", "caption": "another caption of a", "query_ids": [5]}
    copies = [
        {**a, "source_tar": "t2.tar"},
        # the same URL from another download dir: more original pixels, one more caption
        {**a, "source_tar": "t1.tar", "original_width": 1000, "pairs": [*a["pairs"], extra]},
        {**d, "source_tar": "t1.tar"},
        {**d, "source_tar": "t2.tar"},
    ]
    recs = [r for r in recs if r["key"] not in ("a", "d")] + copies
    with _pipeline() as p:
        out = p | beam.Create(recs) | dedup.DedupRecords(config=config.DedupConfig(max_distance=4))
        assert_that(
            out["samples"]
            | "Keys"
            >> beam.Map(lambda r: (r["key"], r.get("source_tar"), [x["uid"] for x in r["pairs"]])),
            equal_to(
                [
                    ("a", "t1.tar", ["ua", "ua2", "ub", "uc"]),  # a's 1000 px beat b's 200
                    ("d", "t1.tar", ["ud"]),  # equal copies: the smaller source_tar
                    ("e", None, ["ue", "uf"]),
                    ("g", None, ["ug", "uh"]),
                    ("i", None, ["ui"]),
                    ("j", None, ["uj"]),
                ]
            ),
            label="Samples",
        )
        assert_that(
            out["rejected"]
            | beam.Map(lambda r: (r["key"], r["reason"], r["duplicate_of"], r["distance"])),
            equal_to(
                [
                    ("a", "duplicate_input", "a", 0),
                    ("d", "duplicate_input", "d", 0),
                    ("b", "near_duplicate", "a", 3),
                    ("c", "near_duplicate", "a", 7),
                    ("f", "near_duplicate", "e", 0),
                    ("h", "near_duplicate", "g", 4),
                ]
            ),
            label="Rejected",
        )
        assert_that(
            out["counts"] | beam.CombinePerKey(sum),
            equal_to(
                [
                    ("dropped:near_duplicate", 4),
                    ("dropped:duplicate_input", 2),
                    ("pair/dropped:duplicate_input", 2),  # "ua" and "ud" were there already
                ]
            ),
            label="Counts",
        )


def test_collapse_false_marks_groups_and_keeps_everything():
    with _pipeline() as p:
        out = (
            p
            | beam.Create(_planted_records())
            | dedup.DedupRecords(config=config.DedupConfig(max_distance=4, collapse=False))
        )
        assert_that(
            out["samples"]
            | beam.Map(lambda r: (r["key"], r.get("duplicate_of"), r.get("duplicate_group"))),
            equal_to(
                [
                    ("a", "b", "b"),
                    ("b", None, "b"),
                    ("c", "b", "b"),
                    ("d", None, None),
                    ("e", None, "e"),
                    ("f", "e", "e"),
                    ("g", None, "g"),
                    ("h", "g", "g"),
                    ("i", None, None),
                    ("j", None, None),
                ]
            ),
        )


def test_merge_group_keeps_every_caption_once():
    s = _rec("s", 0)
    d1 = _rec("d", 3)
    d2 = {**_rec("e", 1), "pairs": [s["pairs"][0], {"uid": "z", "caption": "z", "query_ids": [7]}]}
    merged = dedup.merge_group(s, [d2, d1])
    assert [p["uid"] for p in merged["pairs"]] == ["ud", "us", "z"]
    assert merged["query_ids"] == [1, 7]
    assert [(d["key"], d["distance"]) for d in merged["duplicates"]] == [("d", 2), ("e", 1)]


# ---------------------------------------------------------------------------------------------
# Eval sets and decontamination


def test_parse_eval_set():
    es = decontaminate.parse_eval_set(
        "flickr-dev=/data/flickr8k/captions.tsv?split=dev&column=image"
    )
    assert es == decontaminate.EvalSet(
        "flickr-dev", "/data/flickr8k/captions.tsv", "image", None, None, (("split", "dev"),)
    )
    assert es.kind == "table"
    auto = decontaminate.parse_eval_set("/data/cifar10/test.parquet")
    assert (auto.name, auto.kind) == ("cifar10-test", "parquet")
    assert decontaminate.parse_eval_set("imgs/").kind == "folder"
    with pytest.raises(WitError):
        decontaminate.parse_eval_set("name=")


def test_eval_sets_from_parquet_tsv_and_folder(shared_data, tmp_path):
    cifar = decontaminate.parse_eval_set(f"cifar={shared_data}/cifar10/test.parquet")
    ids = decontaminate.list_eval_items(cifar)
    assert len(ids) == 10_000 and ids[0] == "airplane/0000.jpg"
    dev = decontaminate.parse_eval_set(f"dev={shared_data}/flickr8k/captions.tsv?split=dev")
    dev_ids = decontaminate.list_eval_items(dev)
    assert len(dev_ids) == 1000  # 5 captions per image, counted once
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jpg").write_bytes(fx.flickr_bytes(shared_data, dev_ids[0]))
    (tmp_path / "a.png").write_bytes(b"broken")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = decontaminate.parse_eval_set(f"mine={tmp_path}")
    assert decontaminate.list_eval_items(folder) == ["a.png", "sub/b.jpg"]
    chunk = decontaminate.hash_eval_chunk(folder, ["a.png", "sub/b.jpg"])
    assert (chunk.ids, chunk.undecodable) == (["sub/b.jpg"], 1)
    with pytest.raises(WitError, match="no column"):
        decontaminate.list_eval_items(
            decontaminate.parse_eval_set(f"x={shared_data}/flickr8k/captions.tsv?fold=1")
        )
    with pytest.raises(WitError, match="not found"):
        decontaminate.list_eval_items(decontaminate.parse_eval_set(f"{tmp_path}/missing.parquet"))


def test_eval_index_finds_every_match_within_distance():
    rng = np.random.default_rng(3)
    ev = rng.integers(0, 2**63, 400, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    chunks = [
        decontaminate.EvalHashes("setA", [f"a{i}" for i in range(200)], ev[:200]),
        decontaminate.EvalHashes("setB", [f"b{i}" for i in range(200)], ev[200:]),
    ]
    index = decontaminate.EvalIndex(chunks, max_distance=3)
    queries = [_flip(int(ev[5]), 2, 9), _flip(int(ev[250]), 1, 2, 3, 4), int(ev[399]), 12345]
    q = np.array(queries, np.uint64)
    got = decontaminate.contamination_matches(index, q)
    brute = {}
    for qi, h in enumerate(queries):
        for ei, e in enumerate(ev.tolist()):
            d = phash.hamming(h, e)
            if d <= 3:
                brute.setdefault(qi, []).append(("setA" if ei < 200 else "setB", ei, d))
    assert {k: len(v) for k, v in got.items()} == {k: len(v) for k, v in brute.items()}
    assert got[0][0] == ("setA", "a5", 2)
    assert got[2][0] == ("setB", "b199", 0)
    assert 1 not in got  # 4 bits away


# ---------------------------------------------------------------------------------------------
# Download shards -> dedup output, end to end


@pytest.fixture(scope="module")
def planted(shared_data, tmp_path_factory):
    ds = fx.planted_dataset(shared_data)
    d = tmp_path_factory.mktemp("download")
    fx.write_download_dir(d, ds["samples"], per_shard=9)
    return ds, d


def test_read_download_shard_hashes_every_image(planted):
    ds, d = planted
    records, bad = samples.read_download_shard(str(d / "shards" / "00000.tar"))
    first = ds["samples"][:9]
    assert [r["key"] for r in records] == [s["key"] for s in first]
    assert bad == []
    assert records[0]["phash"] == str(imagehash.phash(Image.open(io.BytesIO(first[0]["image"]))))
    assert records[0]["pairs"][0]["language"] == "en"
    assert records[0]["source_tar"].endswith("00000.tar")


def test_shards_and_eval_images_are_hashed_with_the_configured_decoder(planted):
    """``dedup.phash_decode`` reaches both hashers: the download shards' and the eval sets'."""
    _, d = planted
    tar = str(d / "shards" / "00000.tar")
    by_decode = {}
    for decode in ("exact", "draft"):
        fn = samples._ReadShardFn(phash_decode=decode)
        fn.setup()
        assert fn._hasher.decode == decode
        records = fn.core(tar).kept
        by_decode[decode] = {r["key"]: phash.from_hex(r["phash"]) for r in records}
        eval_fn = decontaminate._HashEvalChunkFn(decode)
        eval_fn.setup()
        assert eval_fn._hasher.decode == decode
    exact, draft = by_decode["exact"], by_decode["draft"]
    assert exact.keys() == draft.keys()
    assert max(phash.hamming(exact[k], draft[k]) for k in exact) <= 4
    # the default, chosen by BENCHMARKS.md's measurement
    assert config.DedupConfig().phash_decode == "draft"


def test_run_dedup_on_planted_duplicates_and_eval_images(planted, shared_data, tmp_path):
    ds, d = planted
    p = ds["planted"]
    base = ds["base"]
    cfg = config.apply_overrides(
        config.BuildConfig(),
        {
            "dedup.eval_sets": [
                f"cifar10-test={shared_data}/cifar10/test.parquet",
                f"flickr8k-dev={shared_data}/flickr8k/captions.tsv?split=dev",
            ]
        },
    )
    stats = steps.run_dedup([str(d)], str(tmp_path), cfg)
    n_in = len(ds["samples"])
    assert stats["counters"] == {
        "input": n_in,
        "kept": n_in - 7,
        "dropped:near_duplicate": 4,
        "dropped:eval_contamination": 2,
        "dropped:undecodable_image": 1,
    }
    n_pairs = sum(len(s["pairs"]) for s in ds["samples"])
    # pairs of merged duplicates stay (as captions of the survivor)
    assert stats["pair_counters"] == {
        "input": n_pairs,
        "kept": n_pairs - 3,
        "dropped:eval_contamination": 2,
        "dropped:undecodable_image": 1,
    }
    rejected = pq.read_table(tmp_path / "rejected").to_pylist()
    assert {r["stage"] for r in rejected} == {"dedup"}
    got = {(r["key"], r["reason"], r["duplicate_of"], r["eval_set"]) for r in rejected}

    def same_size(a, b):  # equal original pixels: the smaller key survives
        lo, hi = sorted([a["key"], b["key"]])
        return (hi, "near_duplicate", lo, None)

    assert got == {
        same_size(p["copy"], base[0]),  # exact copy under another URL
        same_size(p["reencode"], base[1]),  # JPEG quality 30
        # the 128x128 copy has more original pixels than the 96x96 original: it survives
        (base[2]["key"], "near_duplicate", p["upscaled"]["key"], None),
        (p["downscaled"]["key"], "near_duplicate", base[3]["key"], None),
        (p["cifar"]["key"], "eval_contamination", None, "cifar10-test"),
        (p["flickr_dev"]["key"], "eval_contamination", None, "flickr8k-dev"),
        (p["corrupt"]["key"], "undecodable_image", None, None),
    }
    samples = {r["key"]: r for r in pq.read_table(tmp_path / "samples").to_pylist()}
    assert len(samples) == n_in - 7
    big = samples[p["upscaled"]["key"]]
    assert sorted(big["captions"]) == sorted(
        [base[2]["pairs"][0]["caption"], "big version with grass"]
    )
    assert [x["key"] for x in big["duplicates"]] == [base[2]["key"]]
    assert samples[p["multi"]["key"]]["captions"] == [x["caption"] for x in p["multi"]["pairs"]]
    assert p["mirrored"]["key"] in samples and base[4]["key"] in samples
    assert samples[base[3]["key"]]["source_tar"].endswith(".tar")
    report = json.loads((tmp_path / "contamination.json").read_text())
    assert report["sets_hit"] == ["cifar10-test", "flickr8k-dev"]
    assert report["eval_sets"]["cifar10-test"]["images"] == 10_000
    assert report["eval_sets"]["flickr8k-dev"]["images"] == 1000
    assert report["eval_sets"]["cifar10-test"]["contaminated_samples"] == 1
    assert report["contaminated_samples"] == 2
    counts = pq.read_table(tmp_path / "query_counts.parquet").to_pydict()
    assert set(counts) >= {"query_id", "after_download", "after_dedup", "final"}
    assert counts["final"] == [None] * len(counts["query_id"])


def test_run_dedup_on_overlapping_inputs_counts_every_copy(planted, tmp_path):
    """Two download dirs holding the same URLs: one sample per key, every copy counted."""
    ds, d = planted
    p, base = ds["planted"], ds["base"]
    extra = fx.sample(base[0]["url"], base[0]["image"], ["another caption of photo 0"])
    again = [
        {**base[0], "pairs": sorted(base[0]["pairs"] + extra["pairs"], key=lambda x: x["uid"])},
        *base[1:5],
        p["copy"],
        p["corrupt"],
    ]
    other = tmp_path / "download-again"
    fx.write_download_dir(other, again, per_shard=4)
    stats = steps.run_dedup([str(d), str(other)], str(tmp_path / "out"), config.BuildConfig())
    n_in = len(ds["samples"])
    assert stats["counters"] == {
        "input": n_in + 7,
        "kept": n_in - 5,
        "dropped:duplicate_input": 6,
        "dropped:near_duplicate": 4,
        "dropped:undecodable_image": 2,
    }
    n_pairs = sum(len(s["pairs"]) for s in ds["samples"])
    assert stats["pair_counters"] == {
        "input": n_pairs + 8,
        "kept": n_pairs - 1 + 1,  # the corrupt image's pair goes; photo 0's new caption joins
        "dropped:duplicate_input": 6,
        "dropped:undecodable_image": 2,
    }
    rejected = pq.read_table(tmp_path / "out" / "rejected").to_pylist()
    dup = sorted(
        (r["key"], r["duplicate_of"], r["distance"])
        for r in rejected
        if r["reason"] == "duplicate_input"
    )
    assert dup == sorted((s["key"], s["key"], 0) for s in again[:-1])
    samples = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "samples").to_pylist()}
    assert len(samples) == n_in - 5
    lo, hi = sorted([base[0]["key"], p["copy"]["key"]])  # equal pixels: the smaller key survives
    assert hi not in samples
    assert sorted(samples[lo]["captions"]) == sorted(
        [base[0]["pairs"][0]["caption"], "another caption of photo 0", "a copied dog photo"]
    )
    # after_download counts every copy's pairs whose image decodes
    per_query = collections.Counter(
        q
        for s in [*ds["samples"], *again]
        if s is not p["corrupt"]
        for x in s["pairs"]
        for q in x["query_ids"]
    )
    counts = pq.read_table(tmp_path / "out" / "query_counts.parquet").to_pydict()
    got = dict(zip(counts["query_id"], counts["after_download"], strict=True))
    assert {q: n for q, n in got.items() if n} == dict(per_query)


def _expected_groups(hashes, keys, areas, k):
    """Reference: connected components of the all-pairs graph, survivor by the documented rule."""
    uf = groups.UnionFind()
    for i, j in lsh.all_pairs_within(hashes, k):
        uf.union(keys[i], (-areas[i], keys[i]), keys[j], (-areas[j], keys[j]))
    return uf.survivors()


def test_beam_in_process_and_all_pairs_give_the_same_groups(shared_data):
    table = pq.read_table(shared_data / "cifar10" / "test.parquet").slice(2000, 1500)
    real, _ = phash.PHasher().hash_bytes(table.column("image").to_pylist())
    rng = np.random.default_rng(12)
    hashes = [int(h) for h in real]
    for seed in rng.integers(0, len(real), 80).tolist():
        for _ in range(int(rng.integers(1, 6))):
            flips = rng.choice(64, int(rng.integers(0, 7)), replace=False).tolist()
            hashes.append(_flip(int(real[seed]), *flips))
    hashes += [int(real[0])] * 30  # a heavy exact-duplicate group
    h = np.array(hashes, np.uint64)
    keys = [f"k{i:05d}" for i in range(len(h))]
    areas = rng.choice([96 * 96, 128 * 128, 64 * 64], len(h)).tolist()
    expected = _expected_groups(h, keys, areas, 4)
    assert len(expected) > 200
    assert groups.find_groups(h, keys, areas, 4, partitions=5) == expected
    records = [
        {"key": k, "phash": phash.to_hex(x), "original_width": a, "original_height": 1}
        for k, x, a in zip(keys, hashes, areas, strict=True)
    ]
    left = {}
    for label_rounds in (4, 1, 0, None):
        p = _pipeline()
        out = (
            p
            | beam.Create(records)
            | groups.FindNearDuplicates(
                max_distance=4, partitions=7, batch_size=500, label_rounds=label_rounds
            )
        )
        assert_that(out, equal_to(sorted(expected.items())))
        left[label_rounds] = _nodes_left_to_union_find(p)
    # measured: 46 images left to the union-find after 0 rounds, 21 after 1, none after 2
    assert left == {4: 0, 1: 21, 0: 46, None: 0}
