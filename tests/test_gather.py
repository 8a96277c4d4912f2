"""The gather stage: pure core, Beam transforms, end-to-end runs; exact outputs and counters."""

import collections
import gc
import json
import pathlib
import pickle
import random

import apache_beam as beam
import crawl_fixtures as cf
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from wit_pipeline import beam_utils, counters, optout, stage, takedown, urls
from wit_pipeline import config as config_lib
from wit_pipeline.config import GatherConfig, MatchConfig
from wit_pipeline.errors import WitError
from wit_pipeline.stages.gather import captions, pairs
from wit_pipeline.stages.gather import transforms as gather
from wit_pipeline.stages.gather.match import QueryMatcher
from wit_pipeline.stages.gather.readers import RawBatch

Q = cf.QUERIES  # dog, beach, cat, hot dog, puppy, snow


@pytest.fixture(scope="module")
def fixture_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "a.warc.gz").write_bytes(cf.damaged_warc_gz())
    (d / "b.wat.gz").write_bytes(cf.wat_gz())
    pq.write_table(
        pa.table(
            {
                "URL": [
                    "http://example.com/static/dog.jpg",
                    "https://example.com/t.jpg",
                    "ftp://x/y.jpg",
                    "relative.jpg",
                ],
                "TEXT": [
                    "A dog on the beach",
                    "A hot dog with mustard",
                    "a dog on ftp",
                    "a dog relative",
                ],
            }
        ),
        d / "c.parquet",
    )
    return [str(d / "a.warc.gz"), str(d / "b.wat.gz"), str(d / "c.parquet")]


def _src(files, i):
    return files[i]


# Every kept pair of the fixtures: (url, caption, query_ids, source index).
EXPECTED_KEPT = [
    ("https://static.example.com/media/dog.jpg", "A happy dog on the beach", [0, 1], 1),
    ("http://example.edu/img/caf%C3%A9.jpg", "A dog sitting in a café by the beach", [0, 1], 0),
    ("http://example.net/c.jpg", "A dog in the snow", [0, 5], 0),
    ("https://example.com/t.jpg", "A hot dog with mustard", [0, 3], 2),
    ("https://cdn.example.com/cat.jpg", "A cat & a dog sleeping", [0, 2], 0),
    # The same pair is twice in the WARC and once in the table: the copy from the smallest
    # source path (the WARC, a.warc.gz), then the smallest page URL, is kept.
    ("http://example.com/static/dog.jpg", "A dog on the beach", [0, 1], 0),
    ("https://example.com/small.jpg", "A puppy playing", [4], 0),
    ("http://cdn.example.com/cat.png", "A cat asleep", [2], 1),
]
EXPECTED_REJECTED = [
    ("javascript:void(0)", "a hot dog stand", "unsupported_scheme", 0),
    ("blob:https://example.com/1234", "a red dog toy", "unsupported_scheme", 0),
    ("data:image/png;base64,iVBORw0KGgo=", "a small dog", "unsupported_scheme", 0),
    (None, "a dog without a source", "no_url", 0),
    ("http://cdn.example.com/sunset.jpg", None, "no_caption", 0),
    ("http://example.com/static/empty.jpg", None, "no_caption", 0),
    ("http://example.com/static/tiny.jpg", "dog", "too_short", 0),
    ("http://[::1/bad.jpg", "a broken dog url", "bad_url", 0),
    ("https://example.com/fr.jpg", "Un chien qui joue sur la plage avec son maître", "language", 0),
    ("https://example.com/nomatch.jpg", "Sunset over the mountains", "no_match", 0),
    ("http://example.org/a.jpg", "Собака бежит по пляжу летом", "language", 0),
    ("http://example.net/b.jpg", "A dog \ufffd\ufffd on the grass", "bad_encoding", 0),
    ("https://static.example.com/media/spacer.gif", None, "no_caption", 1),
    ("data:image/gif;base64,R0lGOD", "a dog icon", "unsupported_scheme", 1),
    ("https://static.example.com/media/puppy.jpg", "Welpe im Schnee", "language", 1),
    ("ftp://x/y.jpg", "a dog on ftp", "unsupported_scheme", 2),
    ("relative.jpg", "a dog relative", "bad_url", 2),
    ("http://example.com/static/dog.jpg", "A dog on the beach", "duplicate", 0),
    ("http://example.com/static/dog.jpg", "A dog on the beach", "duplicate", 2),
]
EXPECTED_COUNTERS = {
    "dropped:bad_encoding": 1,
    "dropped:bad_url": 2,
    "dropped:duplicate": 2,
    "dropped:language": 3,
    "dropped:no_caption": 3,
    "dropped:no_match": 1,
    "dropped:no_url": 1,
    "dropped:too_short": 1,
    "dropped:unsupported_scheme": 5,
    "input": 27,
    "kept": 8,
}
EXPECTED_QUERY_COUNTS = {"0": 6, "1": 3, "2": 2, "3": 1, "4": 1, "5": 1}


def kept_rows(table, files):
    index = {f: i for i, f in enumerate(files)}
    return sorted(
        (r["url"], r["caption"], r["query_ids"], index[r["source"]]) for r in table.to_pylist()
    )


def rejected_rows(table, files):
    index = {f: i for i, f in enumerate(files)}
    return sorted(
        ((r["url"], r["caption"], r["reason"], index[r["source"]]) for r in table.to_pylist()),
        key=repr,
    )


def pair_counters(counts):
    """The ``counters`` section of gather's stats.json for these counts."""
    return stage.stats_document(counts, sections=pairs.STATS_SECTIONS)["counters"]


def counted(result):
    """What a core's result counts (as the Beam DoFns emit it), as a plain dict."""
    return dict(pairs.add_counts(collections.Counter(), result))


def candidate_table(uids):
    return pa.Table.from_pylist(
        [
            {
                "uid": u,
                "url": "u",
                "caption": "c",
                "query_ids": [],
                "source": "s",
                "page_url": None,
                "language": "",
                "language_score": 0.0,
            }
            for u in uids
        ],
        schema=pairs.CANDIDATE_SCHEMA,
    )


# ---------------------------------------------------------------------------------------------
# Pure core


@pytest.mark.parametrize(
    ("url", "page", "want"),
    [
        ("http://Example.COM:80/a/./b.jpg#x", None, ("http://example.com/a/b.jpg", None)),
        ("  https://example.com/x.jpg ", None, ("https://example.com/x.jpg", None)),
        (None, None, (None, "no_url")),
        ("   ", None, (None, "no_url")),
        ("data:image/png;base64,xx", None, (None, "unsupported_scheme")),
        ("JavaScript:void(0)", None, (None, "unsupported_scheme")),
        ("blob:https://a/1", None, (None, "unsupported_scheme")),
        ("mailto:a@b", None, (None, "unsupported_scheme")),
        ("http://", None, (None, "bad_url")),
        ("http:/one-slash.jpg", None, (None, "bad_url")),
        ("http://[::1/x", None, (None, "bad_url")),
        ("img/x.jpg", None, (None, "bad_url")),
        ("img/x.jpg", "https://site.example/a/b.html", ("https://site.example/a/img/x.jpg", None)),
        ("//cdn.example/x.jpg", "http://site.example/", ("http://cdn.example/x.jpg", None)),
        ("img/x.jpg", "not a url", (None, "bad_url")),
    ],
)
def test_check_url(url, page, want):
    assert pairs.check_url(url, page) == want


def _flt(cfg=None, queries=Q):
    cfg = cfg or GatherConfig()
    return pairs.PairFilter(cfg, QueryMatcher(queries, case_sensitive=cfg.match.case_sensitive))


def test_pair_filter_exact_outputs_and_counters():
    batch = RawBatch(
        "src",
        ["http://a/1.jpg", "http://a/2.jpg", "data:x", "http://a/3.jpg", "http://a/4.jpg"],
        ["A dog on the beach", "Sunset over the sea", "a dog", None, "Un chien sur la plage"],
        ["http://p/", None, None, None, None],
    )
    result = _flt().process(batch)
    kept, rejected = result.kept, result.rejected
    got = kept.to_pylist()
    assert [
        (
            r["uid"],
            r["url"],
            r["caption"],
            r["query_ids"],
            r["source"],
            r["page_url"],
            r["language"],
        )
        for r in got
    ] == [
        (
            urls.pair_uid("http://a/1.jpg", "A dog on the beach"),
            "http://a/1.jpg",
            "A dog on the beach",
            [0, 1],
            "src",
            "http://p/",
            "en",
        ),
    ]
    assert 0.5 < got[0]["language_score"] <= 1
    assert rejected.to_pylist() == [
        {
            "url": "http://a/2.jpg",
            "caption": "Sunset over the sea",
            "reason": "no_match",
            "source": "src",
            "page_url": None,
        },
        {
            "url": "data:x",
            "caption": "a dog",
            "reason": "unsupported_scheme",
            "source": "src",
            "page_url": None,
        },
        {
            "url": "http://a/3.jpg",
            "caption": None,
            "reason": "no_caption",
            "source": "src",
            "page_url": None,
        },
        {
            "url": "http://a/4.jpg",
            "caption": "Un chien sur la plage",
            "reason": "language",
            "source": "src",
            "page_url": None,
        },
    ]
    assert counted(result) == {
        "input": 5,
        "dropped:no_match": 1,
        "dropped:unsupported_scheme": 1,
        "dropped:no_caption": 1,
        "dropped:language": 1,
    }
    assert kept.schema == pairs.CANDIDATE_SCHEMA
    # Written as rows of the one rejected-row schema, stamped with the stage.
    assert stage.rejected_table(rejected, stage="gather").to_pylist()[0] == {
        **dict.fromkeys(stage.REJECTED_FIELDS),
        "stage": "gather",
        "reason": "no_match",
        "detail": "",
        "url": "http://a/2.jpg",
        "caption": "Sunset over the sea",
        "source": "src",
    }


def test_pair_filter_options():
    batch = RawBatch(
        "s", ["http://a/1.jpg", "http://a/2.jpg"], ["Un chien", "A DOG sleeping"], [None, None]
    )
    cfg = GatherConfig(
        captions=captions.CaptionConfig(languages=(), language_detector="none"),
        match=MatchConfig(case_sensitive=False, keep_unmatched=True),
        write_rejected=False,
    )
    result = _flt(cfg).process(batch)
    assert result.rejected.num_rows == 0
    assert [
        (r["caption"], r["query_ids"], r["language"], r["language_score"])
        for r in result.kept.to_pylist()
    ] == [("Un chien", [], "", 0.0), ("A DOG sleeping", [0], "", 0.0)]
    assert counted(result) == {"input": 2}


def test_dedup_is_order_independent_and_exact():
    rows = [
        {"uid": "b" * 32, "source": "s2", "page_url": None},
        {"uid": "a" * 32, "source": "s2", "page_url": "p2"},
        {"uid": "a" * 32, "source": "s1", "page_url": "p9"},
        {"uid": "a" * 32, "source": "s1", "page_url": None},
        {"uid": "c" * 32, "source": "s1", "page_url": "p"},
    ]
    full = [
        {"url": "u", "caption": "c", "query_ids": [0], "language": "en", "language_score": 1.0, **r}
        for r in rows
    ]
    table = pa.Table.from_pylist(full, schema=pairs.CANDIDATE_SCHEMA)
    for seed in range(5):
        shuffled = list(full)
        random.Random(seed).shuffle(shuffled)
        result = pairs.dedup_candidates(
            pa.Table.from_pylist(shuffled, schema=pairs.CANDIDATE_SCHEMA)
        )
        kept, dups = result.kept, result.rejected
        assert [(r["uid"][0], r["source"], r["page_url"]) for r in kept.to_pylist()] == [
            ("a", "s1", None),
            ("b", "s2", None),
            ("c", "s1", "p"),
        ]
        assert sorted(
            (r["source"], r["page_url"] or "", r["reason"]) for r in dups.to_pylist()
        ) == [("s1", "p9", "duplicate"), ("s2", "p2", "duplicate")]
        assert counted(result) == {"kept": 3, "dropped:duplicate": 2}
    result = pairs.dedup_candidates(table, dedup=False)
    assert result.kept.num_rows == 5 and result.rejected.num_rows == 0
    assert counted(result) == {"kept": 5}


def test_split_by_bucket_partitions_by_uid():
    table = candidate_table([urls.pair_uid(f"http://a/{i}.jpg", "c") for i in range(200)])
    parts = list(pairs.split_by_bucket(table, 7))
    assert sorted(b for b, _ in parts) == list(range(7))
    assert sum(p.num_rows for _, p in parts) == 200
    for b, p in parts:
        assert all(pairs.bucket_of(u, 7) == b for u in p.column("uid").to_pylist())
    assert [b for b, _ in pairs.split_by_bucket(table, 1)] == [0]


def test_split_by_bucket_pieces_pickle_only_their_rows():
    """A shuffle pickles each piece; a slice would carry the whole batch's buffers with it."""
    import pickle

    table = candidate_table([urls.pair_uid(f"http://a/{i}.jpg", "c") for i in range(2000)])
    whole = len(pickle.dumps(table))
    pieces = [len(pickle.dumps(p)) for _, p in pairs.split_by_bucket(table, 16)]
    assert len(pieces) == 16
    assert sum(pieces) < 1.5 * whole  # slices: ~16x


def test_auto_num_buckets_by_input_kind(tmp_path):
    """One output file per 4 MiB of table input or 128 MiB of crawl input (sparse files)."""
    mib = 1 << 20

    def files(name, size, n):
        paths = []
        for i in range(n):
            path = tmp_path / f"{i}-{name}"
            with open(path, "wb") as f:
                f.truncate(size)
            paths.append(str(path))
        return paths

    assert pairs.auto_num_buckets([]) == 1
    assert pairs.auto_num_buckets(files("a.parquet", 5 * mib, 3)) == 4  # 15 / 4
    assert pairs.auto_num_buckets(files("b.csv.gz", 1 * mib, 2)) == 1
    assert pairs.auto_num_buckets(files("c.warc.gz", 100 * mib, 3)) == 3  # 300 / 128
    assert pairs.auto_num_buckets(files("d.wat.gz", 64 * mib, 5)) == 3  # 320 / 128
    # The format given overrides the names; an unknown name counts as a table.
    assert pairs.auto_num_buckets(files("e.bin", 64 * mib, 2), "warc") == 1
    assert pairs.auto_num_buckets(files("f.bin", 64 * mib, 2)) == 32
    # Missing files are left out of the mean size.
    assert pairs.auto_num_buckets([*files("g.parquet", 8 * mib, 1), str(tmp_path / "x")]) == 4
    assert pairs.auto_num_buckets([str(tmp_path / "missing.parquet")]) == 1


def test_query_count_arrays():
    table = pa.table({"query_ids": pa.array([[0, 3], [3], [], [7, 0]], pa.list_(pa.int32()))})
    ids, counts = pairs.query_count_arrays(table)
    assert ids.tolist() == [0, 3, 7] and counts.tolist() == [2, 2, 1]


def test_gather_loop_on_fixtures(fixture_files):
    cand, rej, counter = pairs.gather_loop(fixture_files, config=GatherConfig(), query_list=Q)
    assert kept_rows(cand, fixture_files) == sorted(EXPECTED_KEPT)
    assert rejected_rows(rej, fixture_files) == sorted(EXPECTED_REJECTED, key=repr)
    assert rej.schema == stage.REJECTED_SCHEMA
    assert set(rej.column("stage").to_pylist()) == {"gather"}
    assert counter["read/files:read"] == 3 and counter["read/warc:read_errors"] == 1
    doc = stage.stats_document(counter, sections=pairs.STATS_SECTIONS)
    assert doc["counters"] == EXPECTED_COUNTERS
    assert doc["read_counters"]["files:read"] == 3 and doc["read_counters"]["warc:read_errors"] == 1


# ---------------------------------------------------------------------------------------------
# Beam


def test_gather_pairs_transform(fixture_files):
    with test_pipeline.TestPipeline(options=beam_utils.pipeline_options([])) as p:
        result = (
            p
            | beam.Create(list(enumerate(fixture_files)))
            | gather.GatherPairs(config=GatherConfig(), queries=Q, num_buckets=3)
        )
        kept = result["candidates"] | "KeptRows" >> beam.FlatMap(
            lambda t, files: [
                (r["url"], r["caption"], tuple(r["query_ids"]), files.index(r["source"]))
                for r in t.to_pylist()
            ],
            fixture_files,
        )
        assert_that(
            kept,
            equal_to([(u, c, tuple(q), s) for u, c, q, s in EXPECTED_KEPT]),
            label="CheckKept",
        )
        reasons = result["rejected"] | "Reasons" >> beam.FlatMap(
            lambda t: [(r["stage"], r["reason"]) for r in t.to_pylist()]
        )
        assert_that(
            reasons,
            equal_to([("gather", r) for _, _, r, _ in EXPECTED_REJECTED]),
            label="CheckReasons",
        )
        totals = result["counts"] | beam_utils.SumCounts() | beam.Map(pair_counters)
        assert_that(totals, equal_to([EXPECTED_COUNTERS]), label="CheckCounts")
        assert_that(result["query_counts"], equal_to([EXPECTED_QUERY_COUNTS]), label="CheckQC")


def test_gather_pairs_validates_at_construction():
    with pytest.raises(WitError, match="query list is empty"):
        gather.GatherPairs(config=GatherConfig(), queries=[], num_buckets=1)
    with pytest.raises(WitError, match="output shards"):
        gather.GatherPairs(config=GatherConfig(), queries=Q, num_buckets=0)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            {"input_format": "xml"},
            r"gather\.input_format .*must be one of auto, warc, .* got 'xml'",
        ),
        ({"batch_size": 0}, r"gather\.batch_size must be > 0"),
        ({"num_output_shards": -1}, r"gather\.num_output_shards .*must be within 0\.\.65536"),
        ({"num_output_shards": 65537}, r"gather\.num_output_shards .*must be within 0\.\.65536"),
        (
            {"captions": {"unicode_form": "NFX"}},
            r"gather\.captions\.unicode_form must be one of",
        ),
    ],
)
def test_the_gather_section_checks_itself_when_made(bad, message):
    """A bad section never reaches ``GatherPairs``, ``ReadPairs`` or ``run_gather``."""
    with pytest.raises(WitError, match=f"^config: {message}"):
        config_lib.from_dict(GatherConfig, bad)
    GatherConfig()  # the defaults pass


def test_a_bad_setting_leaves_a_finished_output_untouched(fixture_files, tmp_path):
    """The inputs are checked against the config before any old output is cleared."""
    qpath = write_queries(tmp_path / "q.txt")
    out = tmp_path / "out"
    gather.run_gather(fixture_files, str(out), config=GatherConfig(), queries_path=qpath)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for bad, message in [
        (GatherConfig(url_column="link"), "no URL column 'link'"),
        (GatherConfig(input_format="csv"), r"a\.warc\.gz: no URL column"),
    ]:
        with pytest.raises(WitError, match=message):
            gather.run_gather(fixture_files, str(out), config=bad, queries_path=qpath)
        after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert after == before


def test_pipeline_survives_runner_api_round_trip(fixture_files, tmp_path):
    """What a remote runner does with the pipeline: translate it and unpickle every DoFn."""
    p = beam.Pipeline(options=beam_utils.pipeline_options([]))
    result = (
        p
        | beam.Create(list(enumerate(fixture_files)))
        | gather.GatherPairs(config=GatherConfig(), queries=str(tmp_path / "q.txt"), num_buckets=2)
    )
    _ = result | gather.WriteGather(
        output_dir=str(tmp_path / "out"), config=GatherConfig(), num_buckets=2
    )
    proto = p.to_runner_api()
    restored = beam.Pipeline.from_runner_api(proto, p.runner, p._options)
    names = {t.full_label for t in restored.transforms_stack[0].parts}
    assert names  # the pipeline translated back
    from apache_beam.internal import pickler

    fn = gather._ReadFilterFn(
        config=GatherConfig(),
        query_spec=Q,
        queries_sha256=None,
        num_buckets=2,
        total_files=1,
        progress_interval=1.0,
    )
    clone = pickler.loads(pickler.dumps(fn))
    clone.setup()
    out = list(clone.process((0, fixture_files[2])))
    rows = collections.Counter()
    for o in out:
        if not isinstance(o, beam.pvalue.TaggedOutput):
            bucket, table = o
            assert 0 <= bucket < 2
            rows["candidates"] += table.num_rows
        elif o.tag == beam_utils.REJECTED:
            assert o.value.schema == stage.REJECTED_SCHEMA
            rows["rejected"] += o.value.num_rows
        else:
            assert o.tag == beam_utils.COUNTS
            rows[o.value[0]] += o.value[1]
    assert rows == {
        "candidates": 2,
        "rejected": 2,
        "input": 4,
        "dropped:unsupported_scheme": 1,
        "dropped:bad_url": 1,
        "read/files:read": 1,
        "read/table:rows": 4,
    }


# ---------------------------------------------------------------------------------------------
# End to end


def write_queries(path, queries=Q):
    path.write_text("\n".join(queries) + "\n")
    return str(path)


def read_dir(d):
    return pq.read_table(d, schema=None)


@pytest.mark.parametrize(
    ("runner", "beam_args"),
    [
        (None, []),
        ("BundleBasedDirectRunner", []),
        # Beam's DirectRunner first tries Prism, which downloads its binary from github.com
        # (the network jail fails a test that tries); a missing local binary makes that attempt
        # fail without the network, and DirectRunner falls back as it does offline.
        ("DirectRunner", ["--prism_location=/nonexistent/prism"]),
    ],
    ids=["FnApiRunner", "BundleBasedDirectRunner", "DirectRunner"],
)
def test_run_gather_end_to_end(fixture_files, tmp_path, runner, beam_args):
    """Every local runner: the same exact counters and rows as the single-process loop."""
    qpath = write_queries(tmp_path / "q.txt")
    out = tmp_path / "out"
    doc = gather.run_gather(
        fixture_files,
        str(out),
        config=GatherConfig(num_output_shards=2),
        queries_path=qpath,
        runner=runner,
        beam_args=beam_args,
    )
    assert doc["counters"] == EXPECTED_COUNTERS
    assert doc["query_counts"] == EXPECTED_QUERY_COUNTS
    assert doc["queries"]["count"] == len(Q) and len(doc["queries"]["sha256"]) == 64
    assert doc["read_counters"]["files:read"] == 3
    assert doc["runner"] == (runner or "FnApiRunner")
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["counters"] == EXPECTED_COUNTERS
    beam_utils.check_stats_file(str(out / "stats.json"))

    names = sorted(p.name for p in (out / "candidates").iterdir())
    assert names == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
    parts = [pq.read_table(out / "candidates" / n) for n in names]
    for b, part in enumerate(parts):
        assert part.schema == pairs.CANDIDATE_SCHEMA
        uids = part.column("uid").to_pylist()
        assert uids == sorted(uids)
        assert all(pairs.bucket_of(u, 2) == b for u in uids)
    cand = pa.concat_tables(parts)
    assert kept_rows(cand, fixture_files) == sorted(EXPECTED_KEPT)
    for r in cand.to_pylist():
        assert r["uid"] == urls.pair_uid(r["url"], r["caption"])
    rej_names = sorted(p.name for p in (out / "rejected").iterdir())
    assert rej_names == names
    rej = pa.concat_tables(pq.read_table(out / "rejected" / n) for n in rej_names)
    assert rej.schema == stage.REJECTED_SCHEMA
    assert rejected_rows(rej, fixture_files) == sorted(EXPECTED_REJECTED, key=repr)

    # The Beam run equals the single-process loop, row for row.
    loop_cand, _, _ = pairs.gather_loop(fixture_files, config=GatherConfig(), query_list=Q)
    assert cand.sort_by("uid").equals(loop_cand)


def test_output_does_not_depend_on_shards_or_batches(fixture_files, tmp_path):
    qpath = write_queries(tmp_path / "q.txt")
    tables = []
    for i, cfg in enumerate(
        [GatherConfig(num_output_shards=1), GatherConfig(num_output_shards=5, batch_size=2)]
    ):
        gather.run_gather(fixture_files, str(tmp_path / f"o{i}"), config=cfg, queries_path=qpath)
        tables.append(pq.read_table(tmp_path / f"o{i}" / "candidates").sort_by("uid"))
    assert tables[0].equals(tables[1])
    assert len(list((tmp_path / "o1" / "candidates").iterdir())) == 5


def test_rerun_skips_and_overwrite_clears_stale_parts(fixture_files, tmp_path):
    qpath = write_queries(tmp_path / "q.txt")
    out = tmp_path / "out"
    first = gather.run_gather(
        fixture_files, str(out), config=GatherConfig(num_output_shards=3), queries_path=qpath
    )
    again = gather.run_gather(
        fixture_files, str(out), config=GatherConfig(num_output_shards=3), queries_path=qpath
    )
    assert again["skipped"] is True and again["counters"] == first["counters"]
    # A different config reruns; stale part files of the old layout are removed.
    gather.run_gather(
        fixture_files, str(out), config=GatherConfig(num_output_shards=2), queries_path=qpath
    )
    assert sorted(p.name for p in (out / "candidates").iterdir()) == [
        "part-00000-of-00002.parquet",
        "part-00001-of-00002.parquet",
    ]
    # A crash left a partial output (no stats.json): it is cleared and recomputed.
    (out / "stats.json").unlink()
    (out / "candidates" / "part-00007-of-00009.parquet").write_bytes(b"junk")
    doc = gather.run_gather(
        fixture_files, str(out), config=GatherConfig(num_output_shards=2), queries_path=qpath
    )
    assert "skipped" not in doc
    assert len(list((out / "candidates").iterdir())) == 2


def test_rejected_rows_are_stage_rows_of_the_one_schema(fixture_files, tmp_path):
    """Filtered and duplicate pairs alike: exact rows of stage.REJECTED_SCHEMA, stage gather."""
    table = fixture_files[2]
    copy = tmp_path / "d.parquet"  # the same rows again: its kept pairs are duplicates
    copy.write_bytes(pathlib.Path(table).read_bytes())
    out = tmp_path / "out"
    doc = gather.run_gather(
        [table, str(copy)],
        str(out),
        config=GatherConfig(num_output_shards=1),
        queries_path=write_queries(tmp_path / "q.txt"),
    )
    assert doc["counters"] == {
        "input": 8,
        "kept": 2,
        "dropped:bad_url": 2,
        "dropped:duplicate": 2,
        "dropped:unsupported_scheme": 2,
    }
    assert doc["read_counters"] == {"files:read": 2, "table:rows": 8}
    rejected = pq.read_table(out / "rejected" / "part-00000-of-00001.parquet")
    assert rejected.schema == stage.REJECTED_SCHEMA

    def row(url, caption, reason, source, uid=None):
        return {
            **dict.fromkeys(stage.REJECTED_FIELDS),
            "stage": "gather",
            "reason": reason,
            "detail": "",
            "uid": uid,
            "url": url,
            "caption": caption,
            "source": source,
        }

    dog, hot_dog = (
        ("http://example.com/static/dog.jpg", "A dog on the beach"),
        ("https://example.com/t.jpg", "A hot dog with mustard"),
    )
    expected = [
        row(*dog, "duplicate", str(copy), uid=urls.pair_uid(*dog)),
        row(*hot_dog, "duplicate", str(copy), uid=urls.pair_uid(*hot_dog)),
    ]
    for source in (table, str(copy)):
        expected.append(row("ftp://x/y.jpg", "a dog on ftp", "unsupported_scheme", source))
        expected.append(row("relative.jpg", "a dog relative", "bad_url", source))
    assert sorted(rejected.to_pylist(), key=repr) == sorted(expected, key=repr)


def test_no_rejected_and_empty_inputs(tmp_path):
    qpath = write_queries(tmp_path / "q.txt")
    empty = tmp_path / "empty.parquet"
    pq.write_table(
        pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}), empty
    )
    out = tmp_path / "out"
    doc = gather.run_gather(
        [str(empty)], str(out), config=GatherConfig(write_rejected=False), queries_path=qpath
    )
    assert doc["counters"] == {"input": 0, "kept": 0}
    assert doc["query_counts"] == {}
    assert not (out / "rejected").exists()
    files = list((out / "candidates").iterdir())
    assert len(files) == 1 and pq.read_table(files[0]).schema == pairs.CANDIDATE_SCHEMA


def test_expensive_state_is_built_once_per_worker(fixture_files, tmp_path, monkeypatch):
    """The automaton and the fastText model are built in setup(), not per bundle or file."""
    built = collections.Counter()
    real_matcher_init = QueryMatcher.__init__
    real_ft_init = captions.FastTextLanguageDetector.__init__

    def matcher_init(self, *a, **k):
        built["matcher"] += 1
        real_matcher_init(self, *a, **k)

    def ft_init(self, *a, **k):
        built["fasttext"] += 1
        real_ft_init(self, *a, **k)

    monkeypatch.setattr(QueryMatcher, "__init__", matcher_init)
    monkeypatch.setattr(captions.FastTextLanguageDetector, "__init__", ft_init)
    copies = []
    for i in range(4):
        for f in fixture_files:
            dst = tmp_path / f"copy{i}" / f.rsplit("/", 1)[-1]
            dst.parent.mkdir(exist_ok=True)
            dst.write_bytes(pathlib.Path(f).read_bytes())
            copies.append(str(dst))
    qpath = write_queries(tmp_path / "q.txt")
    doc = gather.run_gather(
        copies, str(tmp_path / "out"), config=GatherConfig(batch_size=2), queries_path=qpath
    )
    assert doc["read_counters"]["files:read"] == 12
    assert doc["counters"]["input"] == 4 * 27
    # The copies hold the same pairs: 8 kept in all, every other copy is a duplicate.
    assert doc["counters"]["kept"] == 8
    assert doc["counters"]["dropped:duplicate"] == 4 * 10 - 8
    assert built == {"matcher": 1, "fasttext": 1}


def test_dofn_instances_in_one_process_share_one_filter(tmp_path, monkeypatch):
    """Threads of one worker process each get a DoFn copy; all share one PairFilter."""
    built = collections.Counter()
    real_init = QueryMatcher.__init__

    def matcher_init(self, *a, **k):
        built["matcher"] += 1
        real_init(self, *a, **k)

    monkeypatch.setattr(QueryMatcher, "__init__", matcher_init)
    qpath = write_queries(tmp_path / "q.txt")
    kwargs = dict(num_buckets=2, total_files=1, progress_interval=0.0)
    fn = gather._ReadFilterFn(
        config=GatherConfig(), query_spec=qpath, queries_sha256=None, **kwargs
    )
    # What a runner does: unpickle one copy of the DoFn per thread, call setup() on each.
    payload = pickle.dumps(fn)
    a, b = pickle.loads(payload), pickle.loads(payload)
    a.setup()
    b.setup()
    assert a is not b
    assert a._filter is b._filter
    assert built == {"matcher": 1}
    # Another DoFn (another handle, or another config) builds its own.
    other = gather._ReadFilterFn(
        config=GatherConfig(match=MatchConfig(case_sensitive=False)),
        query_spec=Q,
        queries_sha256=None,
        **kwargs,
    )
    other.setup()
    assert other._filter is not a._filter
    assert other._filter.matcher.case_sensitive is False
    assert built == {"matcher": 2}


def test_shared_filter_is_freed_after_the_run(fixture_files, tmp_path):
    """Once the pipeline's DoFns are torn down, no PairFilter stays alive in the process."""
    qpath = write_queries(tmp_path / "q.txt")
    gather.run_gather(
        fixture_files, str(tmp_path / "out"), config=GatherConfig(), queries_path=qpath
    )
    gc.collect()
    assert [o for o in gc.get_objects() if isinstance(o, pairs.PairFilter)] == []


def test_real_data_pipeline_equals_loop(shared_data, tmp_path):
    from wordfreq import top_n_list

    queries = top_n_list("en", 50_000, wordlist="large")
    qpath = write_queries(tmp_path / "q.txt", queries)
    inputs = [
        str(shared_data / "warc" / "cc-main-2020-34-excerpt.warc.gz"),
        str(shared_data / "laion-sample" / "laion_10000.parquet"),
    ]
    out = tmp_path / "out"
    doc = gather.run_gather(
        inputs, str(out), config=GatherConfig(num_output_shards=4), queries_path=qpath
    )
    c = doc["counters"]
    assert c["input"] == 153 + 10_000
    counters.check_balanced(c)
    assert c["kept"] > 5_000
    assert c["dropped:no_url"] == 4  # the WARC's <img> tags without any src
    cand = pq.read_table(out / "candidates")
    assert cand.num_rows == c["kept"]
    loop_cand, _, loop_counter = pairs.gather_loop(
        inputs, config=GatherConfig(), query_list=queries
    )
    assert cand.sort_by("uid").equals(loop_cand)
    assert pair_counters(loop_counter) == c
    # Per-query counts are exactly what the candidates say.
    recount = collections.Counter(q for ids in cand.column("query_ids").to_pylist() for q in ids)
    assert doc["query_counts"] == {str(k): v for k, v in sorted(recount.items())}
    rej = pq.read_table(out / "rejected")
    assert rej.num_rows == counters.total_dropped(c)
    assert collections.Counter(rej.column("reason").to_pylist()) == counters.drop_reasons(c)


def test_bucket_buffer_groups_rows_into_large_elements():
    uids = [urls.pair_uid(f"http://a/{i}.jpg", "c") for i in range(100)]
    table = candidate_table(uids)
    buf = gather._BucketBuffer(flush_rows=10, max_rows=40)
    out = []
    for start in range(0, 100, 7):  # batches of 7 rows, each split over 4 buckets
        for bucket, part in pairs.split_by_bucket(table.slice(start, 7), 4):
            out.extend(buf.add(bucket, part))
    out.extend(buf.flush())
    assert sorted(u for _, t in out for u in t.column("uid").to_pylist()) == sorted(uids)
    for bucket, t in out:
        assert {pairs.bucket_of(u, 4) for u in t.column("uid").to_pylist()} == {bucket}
    assert len(out) < 100 // 7 * 4 / 2  # far fewer elements than batch x bucket slices


def test_fsspec_urls_in_and_out(fixture_files, tmp_path):
    """Inputs and outputs through fsspec (memory:// here; gs:// and s3:// work the same way)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in fixture_files:
        with fs.open(f"memory://bucket/in/{f.rsplit('/', 1)[-1]}", "wb") as out:
            out.write(pathlib.Path(f).read_bytes())
    with fs.open("memory://bucket/q.txt", "wb") as out:
        out.write("\n".join(Q).encode())
    try:
        doc = gather.run_gather(
            ["memory://bucket/in/*.gz", "memory://bucket/in/c.parquet"],
            "memory://bucket/out",
            config=GatherConfig(num_output_shards=2),
            queries_path="memory://bucket/q.txt",
        )
        assert doc["counters"] == EXPECTED_COUNTERS
        names = sorted(
            p.rsplit("/", 1)[-1] for p in fs.ls("memory://bucket/out/candidates", detail=False)
        )
        assert names == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
        with fs.open("memory://bucket/out/stats.json") as f:
            assert json.load(f)["counters"] == EXPECTED_COUNTERS
    finally:
        fs.rm("memory://bucket", recursive=True)


class _CountingDetector:
    name = "fake"

    def __init__(self):
        self.seen = []

    def detect(self, text):
        self.seen.append(text)
        return ("fr", 0.9) if "chien" in text else ("en", 0.8)


def test_language_is_detected_before_matching_only_when_it_filters():
    batch = RawBatch(
        "s",
        ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg", "http://a/4.jpg"],
        ["A dog on a sofa", "Un chien dog", "Sunset over the sea", "tiny"],
        [None] * 4,
    )
    det = _CountingDetector()
    flt = pairs.PairFilter(GatherConfig(), QueryMatcher(Q), det)
    result = flt.process(batch)
    kept, counter = result.kept, counted(result)
    # Filtering: every caption that passed the length checks is detected, matched or not.
    assert det.seen == ["A dog on a sofa", "Un chien dog", "Sunset over the sea"]
    assert kept.column("language").to_pylist() == ["en"]
    assert counter["dropped:language"] == 1 and counter["dropped:no_match"] == 1
    det = _CountingDetector()
    cfg = GatherConfig(captions=captions.CaptionConfig(languages=()))
    kept = pairs.PairFilter(cfg, QueryMatcher(Q), det).process(batch).kept
    # No filter: only kept pairs are detected, and their language is recorded.
    assert det.seen == ["A dog on a sofa", "Un chien dog"]
    assert kept.column("language").to_pylist() == ["en", "fr"]
    assert kept.column("language_score").to_pylist() == pytest.approx([0.8, 0.9])


def test_an_unsure_foreign_detection_keeps_the_caption_as_undetermined():
    """fastText's lite model on real short alt texts: unsure guesses do not drop English."""
    batch = RawBatch(
        "s",
        [f"http://a/{i}.jpg" for i in range(4)],
        [
            "One blue circle",  # lite model: de, 0.26
            "Stonehenge tours photo montage",  # LAION sample caption; lite model: de, 0.31
            "zwei rote Kreise auf einem grauen Hintergrund",  # de, 0.999
            "A dog on the beach",  # en
        ],
        [None] * 4,
    )
    queries = ["circle", "photo", "Kreise", "dog"]
    result = _flt(queries=queries).process(batch)
    kept, rejected = result.kept, result.rejected
    assert kept.column("caption").to_pylist() == [
        "One blue circle",
        "Stonehenge tours photo montage",
        "A dog on the beach",
    ]
    assert kept.column("language").to_pylist() == ["und", "und", "en"]
    assert rejected.column("reason").to_pylist() == ["language"]
    assert counted(result) == {"input": 4, "dropped:language": 1}
    strict = GatherConfig(captions=captions.CaptionConfig(min_foreign_language_score=0.0))
    result = _flt(strict, queries).process(batch)
    assert result.kept.column("caption").to_pylist() == ["A dog on the beach"]
    assert counted(result) == {"input": 4, "dropped:language": 3}


def test_multi_process_run_gives_the_same_output(fixture_files, tmp_path):
    qpath = write_queries(tmp_path / "q.txt")
    doc = gather.run_gather(
        fixture_files,
        str(tmp_path / "out"),
        config=GatherConfig(num_output_shards=3),
        queries_path=qpath,
        beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"],
    )
    assert doc["counters"] == EXPECTED_COUNTERS
    assert doc["query_counts"] == EXPECTED_QUERY_COUNTS
    cand = pq.read_table(tmp_path / "out" / "candidates").sort_by("uid")
    loop_cand, _, _ = pairs.gather_loop(fixture_files, config=GatherConfig(), query_list=Q)
    assert cand.equals(loop_cand)


def test_read_pairs_transform(fixture_files):
    with test_pipeline.TestPipeline(options=beam_utils.pipeline_options([])) as p:
        result = p | beam.Create(fixture_files[:2]) | gather.ReadPairs(batch_size=4)
        sizes = result.batches | "Sizes" >> beam.Map(
            lambda b: (b.source.rsplit("/", 1)[-1], len(b))
        )
        assert_that(
            sizes,
            equal_to([("a.warc.gz", 4)] * 4 + [("a.warc.gz", 2), ("b.wat.gz", 4), ("b.wat.gz", 1)]),
            label="CheckBatches",
        )
        counts = result[beam_utils.COUNTS] | beam_utils.SumCounts()
        assert_that(
            counts
            | beam.Map(
                lambda d: (d["read/files:read"], d["read/warc:html_pages"], d["read/wat:records"])
            ),
            equal_to([(2, 5, 6)]),
            label="CheckCounts",
        )


def test_progress_lines(fixture_files, tmp_path, caplog):
    qpath = write_queries(tmp_path / "q.txt")
    caplog.set_level("INFO", logger="wit_pipeline.stages.gather.transforms")
    gather.run_gather(
        fixture_files,
        str(tmp_path / "out"),
        config=GatherConfig(batch_size=2),
        queries_path=qpath,
        progress_interval=1e-9,  # a line after every batch
    )
    lines = [
        r.getMessage() for r in caplog.records if r.name == "wit_pipeline.stages.gather.transforms"
    ]
    assert lines[0].startswith("gather: 3 input files (1 parquet, 1 warc, 1 wat), 6 queries")
    warc = [line for line in lines if f"[1/3] {fixture_files[0]}" in line]
    assert len([line for line in warc if "pairs so far" in line]) == 9  # 18 pairs, 2 per batch
    assert warc[-1].startswith(f"gather: [1/3] {fixture_files[0]}: done, 18 pairs, 6 candidates")
    assert sum("done" in line for line in lines) == 3


# ---------------------------------------------------------------------------------------------
# The batch-vectorized filter against the per-pair reference (tests/gather_reference.py)

# Each part of a generated URL: (what the common shape has, what some URLs have instead).
_URL_PARTS = {
    "scheme": (["http://", "https://"], ["HTTP://", "Https://", "ftp://", "data:", "", "//"]),
    "user": ([""], ["user@", ":@", "u:p@"]),
    "host": (
        ["example.com", "img.example.com", "ex_ample.com", "127.0.0.1", "a-b.example"],
        [
            *["EXAMPLE.com", "Ex.com", "bücher.de", "example.com.", "a..b", "[::1]", ""],
            *["xn--bcher-kva.de", "a" * 70 + ".com", "ex%41.com"],
        ],
    ),
    "port": ([""], [":80", ":443", ":8080", ":99999", ":0080", ":"]),
    "segment": (
        [
            "a",
            "x.jpg",
            "wp-content",
            "2019",
            "a-b_c~d",
            "x.y.z",
            "!$&'()*+,;=:@",
            "%20",
            "%2F",
            "%E2%82%AC",
            "%C3",
            "%25",
            "%3F",
            "%7F",
            "%00",
            "%5B1%5D",
            "...",
        ],
        [
            "",
            "a b",
            "a\tb",
            '"q"',
            "{}",
            *[
                ".",
                "..",
                ".a",
                "%7e",
                "%7E",
                "%2f",
                "%41",
                "%3f",
                "%e2%82%ac",
                "%",
                "%zz",
                "%2",
                "é",
                "%2C",
                "%26",
                "%3D",
                "%2B",
                "[1]",
                "a|b",
            ],
        ],
    ),
    "query": (
        ["", "", "?q=1", "?w=1&h=2", "?a=%2F", "?x=/y/", "??", "?%3F=1", "?a=%E2%82%AC"],
        ["?", "?a=%2C&b=,", "?x=/./", "?%7e", "?a b", "?é", "?a=%2f", "?x=//y", "?%3f"],
    ),
    "fragment": ([""], ["#", "#frag"]),
    "space": ([""], [" ", "\t", "\n"]),
}


def _random_url(rng: random.Random) -> str:
    """A URL of the common shape, with each part replaced by an odd one now and then."""

    def pick(part):
        common, odd = _URL_PARTS[part]
        return rng.choice(odd if rng.random() < 0.06 else common)

    segments = [pick("segment") for _ in range(rng.randrange(5))]
    path = "/".join(["", *segments]) if segments or rng.random() < 0.9 else ""
    if segments and rng.random() < 0.2:
        path += "/"
    return "".join(
        [
            pick("space"),
            pick("scheme"),
            pick("user"),
            pick("host"),
            pick("port"),
            path,
            pick("query"),
            pick("fragment"),
            pick("space"),
        ]
    )


_WORDS = ["A", "dog", "on", "the", "beach", "hot", "snow", "Kreise", "sunset", "HOT", "x,", "a.b"]
_CAPTION_PIECES = [
    "A dog",
    "on the beach",
    "hot dog",
    "snow",
    "cat",
    "puppy",
    "Un chien sur la plage",
    "zwei rote Kreise auf einem grauen Hintergrund",
    "A DOG ON THE BEACH",
    "&amp;",
    "&lt;b&gt;",
    "&",
    "  ",
    " ",
    "\t",
    "\n",
    "\x0b",
    "\x7f",
    "\u200b",
    "\ufeff",
    "\ufffd",
    "e\u0301",
    "ﬁ",
    "Ａ",
    "日本語のテキスト",
    "dog,",
    "x" * 40,
    "word " * 30,
]


def _random_batch(rng: random.Random, n: int) -> RawBatch:
    def url():
        r = rng.random()
        if r < 0.05:
            return None
        if r < 0.3:  # the common shape
            return f"https://img{rng.randrange(9)}.example.com/p/{rng.randrange(99)}.jpg"
        return _random_url(rng)

    def caption(pool):
        r = rng.random()
        if r < 0.04:
            return None
        if r < 0.08:
            return ""
        if r < 0.15 and pool:  # a caption seen before: the caches
            return rng.choice(pool)
        if r < 0.5:  # plain words
            return " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(1, 9)))
        return "".join(rng.choice(_CAPTION_PIECES) + rng.choice(["", " "]) for _ in range(3))

    pool: list[str] = []
    urls_, caps, pages = [], [], []
    for _ in range(n):
        urls_.append(url())
        c = caption(pool)
        if c:
            pool.append(c)
        caps.append(c)
        pages.append(rng.choice([None, "https://site.example/a/b.html", "not a url"]))
    return RawBatch("gen", urls_, caps, pages)


@pytest.mark.parametrize(
    "cfg",
    [
        GatherConfig(),
        GatherConfig(captions=captions.CaptionConfig(languages=())),
        GatherConfig(captions=captions.CaptionConfig(language_detector="none")),
        GatherConfig(
            captions=captions.CaptionConfig(max_words=4, min_words=2, max_chars=40),
            match=MatchConfig(keep_unmatched=True, case_sensitive=False),
        ),
        GatherConfig(captions=captions.CaptionConfig(unicode_form="NFKC", min_chars=0)),
    ],
    ids=["default", "no-language-filter", "no-detector", "bounds-unmatched-folded", "nfkc"],
)
def test_vectorized_filter_equals_the_per_pair_reference(cfg):
    from gather_reference import reference_process

    rng = random.Random(15)
    flt = _flt(cfg, queries=["dog", "beach", "hot dog", "snow", "Kreise", "x" * 40])
    for size in (0, 1, 7, 300, 2000):
        batch = _random_batch(rng, size)
        got, want = flt.process(batch), reference_process(flt, batch)
        assert got.kept.equals(want.kept)
        assert got.rejected.equals(want.rejected)
        assert counted(got) == counted(want)


def test_vectorized_filter_equals_the_per_pair_reference_with_takedowns_and_opt_outs():
    """Blocklisted image and page URLs and pages' opt-out signals, mixed with every other
    reason: the same rejected rows (``detail``, ``policy_url``, ``policy_fetched``) and the
    same ``opt_out/<signal>`` counts as the per-pair rules."""
    from gather_reference import reference_process

    blocklist = takedown.parse_blocklist(
        "url https://img3.example.com/p/7.jpg\ndomain img5.example.com\ndomain site.example\n"
    )
    rng = random.Random(16)
    flt = pairs.PairFilter(
        GatherConfig(),
        QueryMatcher(["dog", "beach", "snow"], case_sensitive=False),
        None,
        blocklist,
    )
    signals = [None, None, None, "noai", "noimageai"]
    seen_reasons, seen_counts = set(), set()
    for size in (0, 1, 7, 300, 2000):
        base = _random_batch(rng, size)
        pages = [rng.choice([p, "https://other.example/x.html"]) for p in base.page_urls]
        opt_outs = [rng.choice(signals) for _ in range(size)]
        dates = [rng.choice([None, "", "2024-01-02T03:04:05Z"]) for _ in range(size)]
        batch = RawBatch(base.source, base.urls, base.captions, pages, opt_outs, dates)
        got, want = flt.process(batch), reference_process(flt, batch)
        assert got.kept.equals(want.kept)
        assert got.rejected.equals(want.rejected)
        assert counted(got) == counted(want)
        seen_reasons.update(got.rejected.column("reason").to_pylist())
        seen_counts.update(counted(got))
    assert {takedown.TAKEDOWN, optout.OPT_OUT, pairs.NO_MATCH} <= seen_reasons
    assert {"opt_out/noai", "opt_out/noimageai"} <= seen_counts


def test_vectorized_filter_equals_the_reference_on_real_laion_rows(shared_data):
    from gather_reference import reference_process

    table = pq.read_table(shared_data / "laion-sample" / "laion_10000.parquet")
    queries = sorted({w for t in table.column("TEXT").to_pylist() if t for w in t.split()})[:3000]
    flt = _flt(queries=queries)
    batch = RawBatch(
        "laion",
        table.column("URL").to_pylist(),
        table.column("TEXT").to_pylist(),
        [None] * table.num_rows,
    )
    got, want = flt.process(batch), reference_process(flt, batch)
    assert got.kept.num_rows > 5000
    assert got.kept.equals(want.kept)
    assert got.rejected.equals(want.rejected)
    assert counted(got) == counted(want)
    # The second pass answers from the caches: the same again.
    again = flt.process(batch)
    assert again.kept.equals(want.kept) and again.rejected.equals(want.rejected)


def test_stage_files_have_bounded_row_groups(tmp_path, monkeypatch):
    """A row group is what a Parquet read splits at: the stage's files are written in groups of
    at most ``ROW_GROUP_ROWS`` rows, so that later steps can spread one file over workers."""
    monkeypatch.setattr(gather, "ROW_GROUP_ROWS", 2)
    table = pa.table({"uid": ["a", "b", "c", "d", "e"]})
    path = gather.write_table(str(tmp_path / "t.parquet"), table)
    f = pq.ParquetFile(path)
    assert [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)] == [2, 2, 1]
    assert f.read().equals(table)
