"""The stage protocol (wit_pipeline.stage): results -> kept, rejected rows, exact counts."""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from wit_pipeline import beam_utils, counters, fileio, stage


def _pipeline():
    return TestPipeline(options=beam_utils.pipeline_options([]))


def test_scoped_and_split_scopes():
    assert counters.scoped("pair", "kept") == "pair/kept"
    assert counters.scoped("", "kept") == "kept"
    got = counters.split_scopes(
        {
            "input": 3,
            "kept": 1,
            "dropped:score/undecodable_image": 2,
            "pair/input": 5,
            "pair/dropped:score/undecodable_image": 4,
            "read/warc:records": 7,
        }
    )
    assert got == {
        "": {"dropped:score/undecodable_image": 2, "input": 3, "kept": 1},
        "pair": {"dropped:score/undecodable_image": 4, "input": 5},
        "read": {"warc:records": 7},
    }


def _sample(key, n_pairs):
    return {
        "key": key,
        "url": f"http://x/{key}.jpg",
        "pairs": [{"uid": f"{key}{i}", "caption": f"c{key}{i}"} for i in range(n_pairs)],
    }


def test_flow_counts_over_samples_and_pairs():
    kept = [_sample("a", 2)]
    rejected = [{**_sample("b", 3), "reason": "near_duplicate"}]
    assert dict(stage.flow_counts(kept, rejected, pairs=True)) == {
        "input": 2,
        "kept": 1,
        "dropped:near_duplicate": 1,
        "pair/input": 5,
        "pair/kept": 2,
        "pair/dropped:near_duplicate": 3,
    }
    assert dict(stage.flow_counts(kept, rejected, flow=False, pairs=True)) == {
        "dropped:near_duplicate": 1,
        "pair/dropped:near_duplicate": 3,
    }


def test_rejected_row_of_a_sample_and_of_a_pair():
    row = stage.rejected_row(
        {**_sample("b", 2), "reason": "near_duplicate", "duplicate_of": "a", "distance": 3},
        stage="dedup",
    )
    assert row == {
        **dict.fromkeys(stage.REJECTED_FIELDS),
        "stage": "dedup",
        "reason": "near_duplicate",
        "detail": "",
        "key": "b",
        "url": "http://x/b.jpg",
        "uids": ["b0", "b1"],
        "captions": ["cb0", "cb1"],
        "duplicate_of": "a",
        "distance": 3,
    }
    pair = stage.rejected_row(
        {"uid": "u", "url": "http://x/1", "caption": "c", "reason": "robots", "detail": "d"},
        stage="download",
    )
    assert (pair["stage"], pair["uid"], pair["reason"], pair["detail"], pair["uids"]) == (
        "download",
        "u",
        "robots",
        "d",
        None,
    )


def test_rejected_table_conforms_a_columnar_batch():
    t = pa.table({"url": ["u1", "u2"], "caption": ["a", "b"], "reason": ["no_match", "language"]})
    out = stage.rejected_table(t, stage="gather")
    assert out.schema == stage.REJECTED_SCHEMA
    assert out.column("stage").to_pylist() == ["gather", "gather"]
    assert out.column("detail").to_pylist() == ["", ""]
    assert out.column("reason").to_pylist() == ["no_match", "language"]
    assert out.column("key").to_pylist() == [None, None]


class _KeepEven(stage.StageFn):
    """Keeps even numbers; odd ones are dropped as ``odd``, zeros as ``zero``."""

    def __init__(self):
        super().__init__(stage="parity")

    def core(self, batch, *args):
        kept = [{"n": n} for n in batch if n and n % 2 == 0]
        rejected = [
            {"key": str(n), "reason": "zero" if n == 0 else "odd", "detail": f"n={n}"}
            for n in batch
            if not n or n % 2
        ]
        return stage.Result(kept, rejected, {"read/batches": 1})


def test_stage_fn_outputs_and_exact_counts():
    with _pipeline() as p:
        batches = p | beam.Create([[0, 1, 2], [3, 4, 6]])
        out = stage.apply(batches, "Parity", _KeepEven())
        assert_that(out["kept"], equal_to([{"n": 2}, {"n": 4}, {"n": 6}]), label="Kept")
        assert_that(
            out["rejected"] | beam.Map(lambda r: (r["stage"], r["key"], r["reason"], r["detail"])),
            equal_to(
                [
                    ("parity", "0", "zero", "n=0"),
                    ("parity", "1", "odd", "n=1"),
                    ("parity", "3", "odd", "n=3"),
                ]
            ),
            label="Rejected",
        )
        assert_that(
            out["counts"] | beam.CombinePerKey(sum),
            equal_to(
                [
                    ("input", 6),
                    ("kept", 3),
                    ("dropped:odd", 2),
                    ("dropped:zero", 1),
                    ("read/batches", 2),
                ]
            ),
            label="Counts",
        )


class _KeepShort(stage.StageFn):
    def __init__(self):
        super().__init__(stage="len", kept_as="batch")

    def core(self, table, *args):
        short = pc.less_equal(pc.utf8_length(table.column("caption")), 3)
        rejected = table.filter(pc.invert(short)).append_column(
            "reason", pa.array(["too_long"] * (table.num_rows - pc.sum(short).as_py()))
        )
        return stage.Result(table.filter(short), rejected)


def test_columnar_stage_emits_tables():
    t = pa.table({"caption": ["cat", "a long one", "dog"], "url": ["1", "2", "3"]})
    with _pipeline() as p:
        out = stage.apply(p | beam.Create([t]), "Len", _KeepShort())
        assert_that(
            out["kept"] | beam.FlatMap(lambda tb: tb.column("caption").to_pylist()),
            equal_to(["cat", "dog"]),
            label="Kept",
        )
        assert_that(
            out["rejected"] | beam.FlatMap(lambda tb: tb.to_pylist()),
            equal_to(
                [
                    {
                        **dict.fromkeys(stage.REJECTED_FIELDS),
                        "stage": "len",
                        "reason": "too_long",
                        "detail": "",
                        "url": "2",
                        "caption": "a long one",
                    }
                ]
            ),
            label="Rejected",
        )
        assert_that(
            out["counts"] | beam.CombinePerKey(sum),
            equal_to([("input", 3), ("kept", 2), ("dropped:too_long", 1)]),
            label="Counts",
        )


def test_stats_document_sections_and_checks():
    counts = {"input": 3, "kept": 2, "dropped:x": 1, "pair/input": 4, "pair/kept": 4}
    doc = stage.stats_document(
        counts, sections={"": "counters", "pair": "pair_counters"}, flows=("", "pair")
    )
    assert doc == {
        "counters": {"dropped:x": 1, "input": 3, "kept": 2},
        "pair_counters": {"input": 4, "kept": 4},
    }
    with pytest.raises(AssertionError, match="unknown scope"):
        stage.stats_document(counts, sections={"": "counters"})
    with pytest.raises(AssertionError, match="do not balance"):
        stage.stats_document({"input": 3, "kept": 1}, sections={"": "counters"}, stage="s")
    # Empty input: the flow section still lists input and kept.
    assert stage.stats_document({}, sections={"": "counters"}) == {
        "counters": {"input": 0, "kept": 0}
    }


def test_write_stats_and_rejected(tmp_path):
    path = str(tmp_path / "stats.json")
    rejected_dir = str(tmp_path / "rejected")
    with _pipeline() as p:
        batches = p | "Batches" >> beam.Create([[0, 1, 2], [3, 4]])
        out = stage.apply(batches, "Parity", _KeepEven())
        side = p | "Side" >> beam.Create([{"query_counts": {"1": 2}}])
        _ = out["counts"] | stage.WriteStats(
            path,
            sections={"": "counters", "read": "read_counters"},
            extra={"step": "parity"},
            side=[side],
        )
        _ = out["rejected"] | stage.WriteRejected(rejected_dir)
    assert fileio.read_json(path) == {
        "counters": {"dropped:odd": 2, "dropped:zero": 1, "input": 5, "kept": 2},
        "read_counters": {"batches": 2},
        "step": "parity",
        "query_counts": {"1": 2},
    }
    table = pq.read_table(rejected_dir)
    assert table.schema == stage.REJECTED_SCHEMA
    assert sorted(table.column("key").to_pylist()) == ["0", "1", "3"]


def test_partial_rows_are_pair_drops_of_kept_records():
    kept = [_sample("a", 1)]  # a sample that lost one of its two pairs
    partial = [{**_sample("a", 1), "reason": "balanced_out"}]
    rejected = [{**_sample("b", 2), "reason": "no_query"}]
    assert dict(stage.flow_counts(kept, rejected, pairs=True, partial=partial)) == {
        "input": 2,
        "kept": 1,
        "dropped:no_query": 1,
        "pair/input": 4,
        "pair/kept": 1,
        "pair/dropped:no_query": 2,
        "pair/dropped:balanced_out": 1,
    }
    assert dict(stage.count_records([_sample("a", 2), _sample("b", 3)], "kept", pairs=True)) == {
        "kept": 2,
        "pair/kept": 5,
    }


class _WriteOdd(stage.StageFn):
    """A writer: consumes the odd numbers it keeps (kept_as="none"), reports them as ``infos``."""

    def __init__(self):
        super().__init__(stage="writer", pairs=True, kept_as="none", outputs=("infos",))

    def core(self, batch, *args):
        kept = [_sample(str(n), n) for n in batch if n % 2]
        partial = [{**_sample(str(n), 1), "reason": "trimmed"} for n in batch if n % 2]
        rejected = [{**_sample(str(n), n), "reason": "even"} for n in batch if not n % 2]
        return stage.Result(kept, rejected, partial=partial, outputs={"infos": [len(kept)]})


def test_stage_fn_writer_outputs_partial_rows_and_further_outputs():
    with _pipeline() as p:
        out = stage.apply(p | beam.Create([[1, 2, 3]]), "Write", _WriteOdd())
        assert_that(out["kept"], equal_to([]), label="Kept")
        assert_that(out["infos"], equal_to([2]), label="Infos")
        assert_that(
            out["rejected"] | beam.Map(lambda r: (r["stage"], r["key"], r["reason"], r["uids"])),
            equal_to(
                [
                    ("writer", "2", "even", ["20", "21"]),
                    ("writer", "1", "trimmed", ["10"]),
                    ("writer", "3", "trimmed", ["30"]),
                ]
            ),
            label="Rejected",
        )
        assert_that(
            out["counts"] | beam.CombinePerKey(sum),
            equal_to(
                [
                    ("input", 3),
                    ("kept", 2),
                    ("dropped:even", 1),
                    ("pair/input", 8),
                    ("pair/kept", 4),
                    ("pair/dropped:even", 2),
                    ("pair/dropped:trimmed", 2),
                ]
            ),
            label="Counts",
        )


def test_undeclared_outputs_and_reserved_tags_are_refused():
    with pytest.raises(ValueError, match="protocol's own"):
        stage.StageFn(stage="s", outputs=("rejected",))
    with pytest.raises(ValueError, match="kept_as"):
        stage.StageFn(stage="s", kept_as="table")
    fn = stage.StageFn(stage="s")
    with pytest.raises(ValueError, match="not declared"):
        list(fn.emit(stage.Result([], outputs={"hits": [1]})))


def test_stats_document_writes_a_scope_under_several_keys_or_none():
    counts = {"input": 3, "kept": 1, "dropped:x": 1, "pair/input": 4, "pair/kept": 4}
    # one sample per pair: image counts do not hold end to end, pairs are both sections
    doc = stage.stats_document(
        counts, sections={"": None, "pair": ("pair_counters", "counters")}, flows=("pair",)
    )
    assert doc == {
        "counters": {"input": 4, "kept": 4},
        "pair_counters": {"input": 4, "kept": 4},
    }
