import collections
import itertools
import math
import pathlib
import pickle
import random
import tempfile

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from wit_pipeline import beam_utils, stage
from wit_pipeline.config import BalanceConfig
from wit_pipeline.errors import WitError
from wit_pipeline.stages import balance, balance_reads


def _pipeline(*args: str) -> test_pipeline.TestPipeline:
    return test_pipeline.TestPipeline(options=beam_utils.pipeline_options(list(args)))


def test_query_probabilities_are_min_one_t_over_count():
    assert balance.query_probabilities({0: 40_000, 1: 10, 2: 20_000, 3: 0}, 20_000) == {
        0: 0.5,
        1: 1.0,
        2: 1.0,
    }
    with pytest.raises(ValueError):
        balance.query_probabilities({0: 1}, 0)


def test_keep_probability_is_one_minus_product_of_misses():
    probs = {0: 0.5, 1: 0.2, 2: 1.0}
    assert balance.keep_probability([0, 1], probs) == pytest.approx(0.6, abs=1e-15)
    assert balance.keep_probability([0, 0, 1], probs) == pytest.approx(0.6, abs=1e-15)
    assert balance.keep_probability([1, 2], probs) == 1.0
    assert balance.keep_probability([], probs) == 0.0
    assert balance.keep_probability([9], probs) == 0.0
    tiny = {i: 1e-12 for i in range(3)}
    assert balance.keep_probability([0, 1, 2], tiny) == pytest.approx(3e-12, rel=1e-9)


def test_uniform_is_a_pinned_keyed_hash():
    assert balance.uniform(0, "balance", "abc") == 0.8186990208794692
    assert balance.uniform(1, "balance", "abc") == 0.5760118088414352
    assert balance.uniform(0, "prebalance", "abc") == 0.2712600278625301
    draws = [balance.uniform(3, "balance", f"id{i}") for i in range(20_000)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert sum(draws) / len(draws) == pytest.approx(0.5, abs=0.01)


def test_choose_caption_prefers_the_rarest_query():
    pairs = [
        {"uid": "a", "caption": "head", "query_ids": [0]},
        {"uid": "b", "caption": "tail", "query_ids": [0, 5]},
        {"uid": "c", "caption": "none", "query_ids": []},
        {"uid": "0", "caption": "tail too, smaller uid", "query_ids": [5]},
    ]
    counts = {0: 1000, 5: 3}
    assert balance.choose_caption(pairs, counts) == "tail too, smaller uid"
    assert balance.choose_caption(pairs[:1] + pairs[2:3], counts) == "head"
    assert balance.choose_caption([pairs[2]], counts) == "none"


def _pool():
    """Query 0: 20,000 records; query 1: 4,000; both: 2,000; query 2: 500; none: 100."""
    recs = []
    for i in range(20_000):
        recs.append({"key": f"a{i}", "query_ids": [0], "pairs": [{}]})
    for i in range(4_000):
        recs.append({"key": f"b{i}", "query_ids": [1], "pairs": [{}, {}]})
    for i in range(2_000):
        recs.append({"key": f"c{i}", "query_ids": [0, 1], "pairs": [{}]})
    for i in range(500):
        recs.append({"key": f"d{i}", "query_ids": [2], "pairs": [{}]})
    for i in range(100):
        recs.append({"key": f"e{i}", "query_ids": [], "pairs": [{}]})
    return recs


def test_keep_rate_per_query_matches_metaclip_probabilities():
    recs = _pool()
    counts = balance.count_queries(recs)
    assert dict(counts) == {0: 22_000, 1: 6_000, 2: 500}
    t = 1000
    probs = balance.query_probabilities(counts, t)
    result = balance.balance_records(
        recs, probs, seed=11, phase="balance", id_field="key", reason="balanced_out"
    )
    kept = result.kept
    c = stage.flow_counts(result.kept, result.rejected, pairs=True)
    p0, p1 = t / 22_000, t / 6_000
    groups = {"a": (20_000, p0), "b": (4_000, p1), "c": (2_000, 1 - (1 - p0) * (1 - p1))}
    by_group = collections.Counter(r["key"][0] for r in kept)
    for g, (n, p) in groups.items():
        # binomial: mean n p, standard deviation sqrt(n p (1 - p)); 5 sigma is a 1-in-1.7M miss
        assert abs(by_group[g] - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (g, by_group[g], n * p)
    assert by_group["d"] == 500  # count 500 < t: every record kept
    assert by_group["e"] == 0
    assert c["dropped:no_query"] == 100
    assert c["input"] == len(recs) == c["kept"] + c["dropped:balanced_out"] + 100
    assert c["pair/input"] == len(recs) + 4_000
    # the balanced pool is flat: head queries end near t
    after = balance.count_queries(kept)
    assert abs(after[0] - (20_000 * p0 + 2_000 * groups["c"][1])) < 200
    assert all(r["balance_probability"] == pytest.approx(groups[r["key"][0]][1]) for r in kept[:50])


def test_larger_t_keeps_a_superset():
    recs = _pool()
    counts = balance.count_queries(recs)
    kept = {}
    for t in (500, 2000):
        k = balance.balance_records(
            recs,
            balance.query_probabilities(counts, t),
            seed=4,
            phase="balance",
            id_field="key",
            reason="balanced_out",
        ).kept
        kept[t] = {r["key"] for r in k}
    assert kept[500] < kept[2000]


def _samples(n=1200):
    out = []
    for i in range(n):
        q = [i % 3] if i % 7 else [0, 4]
        out.append(
            {
                "key": f"{i:05x}",
                "query_ids": q,
                "pairs": [{"uid": f"u{i}", "caption": f"c{i}", "query_ids": q}],
            }
        )
    return out


def _expected_keys(samples, t, seed):
    counts = balance.count_queries(samples)
    kept = balance.balance_records(
        samples,
        balance.query_probabilities(counts, t),
        seed=seed,
        phase="balance",
        id_field="key",
        reason="balanced_out",
    ).kept
    return sorted(r["key"] for r in kept)


RUNNER_SETTINGS = [
    ((), 4096),
    ((), 7),
    (("--runner=BundleBasedDirectRunner",), 100),
    (("--direct_num_workers=2", "--direct_running_mode=multi_threading"), 33),
    (("--direct_num_workers=2", "--direct_running_mode=multi_processing"), 250),
]


@pytest.mark.parametrize(("args", "batch_size"), RUNNER_SETTINGS)
def test_balance_is_identical_across_runners_and_batch_sizes(args, batch_size):
    samples = _samples()
    expected = _expected_keys(samples, t=160, seed=5)
    assert 300 < len(expected) < 1000
    with _pipeline(*args) as p:
        out = (
            p
            | beam.Create(samples)
            | balance.BalanceSamples(config=BalanceConfig(t=160, seed=5), batch_size=batch_size)
        )
        assert_that(out["kept"] | beam.Map(lambda r: r["key"]), equal_to(expected))
        assert_that(
            out["counts"] | "Sum" >> beam.CombinePerKey(sum),
            equal_to(
                [
                    ("dropped:balanced_out", 1200 - len(expected)),
                    ("pair/dropped:balanced_out", 1200 - len(expected)),
                ]
            ),
            label="Counts",
        )


def _multi_pair_samples(n=600):
    """Samples of 1-3 pairs; some captions match several queries, some none."""
    out = []
    for i in range(n):
        pairs = []
        for j in range(1 + i % 3):
            q = [] if (i + j) % 11 == 0 else [(i + j) % 3] if (i + j) % 5 else [0, 4]
            pairs.append({"uid": f"u{i}-{j}", "caption": f"c{i}-{j}", "query_ids": q})
        qids = sorted({q for p in pairs for q in p["query_ids"]})
        out.append({"key": f"{i:05x}", "pairs": pairs, "query_ids": qids})
    return out


def test_pair_unit_keeps_exactly_what_balance_records_keeps_of_the_pairs():
    samples = _multi_pair_samples()
    sample_of = {p["uid"]: s for s in samples for p in s["pairs"]}
    pairs = list(itertools.chain.from_iterable(s["pairs"] for s in samples))
    pair_counts = balance.count_queries(pairs)
    result = balance.balance_records(
        pairs,
        balance.query_probabilities(pair_counts, 100),
        seed=5,
        phase="balance",
        id_field="uid",
        reason="balanced_out",
    )
    kept, dropped = result.kept, result.rejected
    c = stage.flow_counts(kept, dropped)
    kept_uids = sorted(p["uid"] for p in kept)
    kept_keys = sorted({sample_of[u]["key"] for u in kept_uids})
    gone = [s for s in samples if s["key"] not in set(kept_keys)]
    gone_no_query = [s for s in gone if not s["query_ids"]]
    partial = {sample_of[p["uid"]]["key"] for p in dropped} & set(kept_keys)
    assert len(kept_uids) < len(pairs) and len(partial) > 20 and gone_no_query
    # the image unit decides other samples on the same pool
    assert _expected_keys(samples, t=100, seed=5) != kept_keys
    with _pipeline() as p:
        out = (
            p
            | beam.Create(samples)
            | balance.BalanceSamples(
                config=BalanceConfig(t=100, seed=5, unit="pair"), batch_size=64
            )
        )
        assert_that(
            out["kept"] | beam.FlatMap(lambda r: [x["uid"] for x in r["pairs"]]),
            equal_to(kept_uids),
        )
        assert_that(
            out["kept"] | "Keys" >> beam.Map(lambda r: r["key"]), equal_to(kept_keys), label="Keys"
        )
        assert_that(
            out["counts"] | "Sum" >> beam.CombinePerKey(sum),
            equal_to(
                [
                    ("dropped:balanced_out", len(gone) - len(gone_no_query)),
                    ("dropped:no_query", len(gone_no_query)),
                    ("pair/dropped:balanced_out", c["dropped:balanced_out"]),
                    ("pair/dropped:no_query", c["dropped:no_query"]),
                ]
            ),
            label="Counts",
        )
        assert_that(out["before"], equal_to(sorted(pair_counts.items())), label="Before")
        # every dropped pair appears once in rejected/ (whole samples, or the part of a kept one)
        assert_that(
            out["rejected"] | "RejectedUids" >> beam.FlatMap(lambda r: r["uids"]),
            equal_to(sorted(p["uid"] for p in dropped)),
            label="Rejected",
        )
        assert_that(
            out["rejected"] | "Stages" >> beam.Map(lambda r: r["stage"]) | beam.Distinct(),
            equal_to(["balance"]),
            label="Stage",
        )


def test_balance_unit_is_validated():
    with pytest.raises(WitError, match=r"balance\.unit"):
        BalanceConfig(t=10, seed=0, unit="caption")


@pytest.mark.parametrize(("args", "batch_size"), RUNNER_SETTINGS)
def test_prebalance_oversamples_by_the_factor(args, batch_size):
    """The draw before download: the same kept uids on every runner setting and batch size."""
    cands = [{"uid": f"u{i}", "query_ids": [0] if i < 2700 else [1]} for i in range(3000)]
    probs = {0: 90 / 2700, 1: 90 / 300}  # t * factor = 90
    expected = balance.balance_records(
        cands, probs, seed=1, phase="prebalance", id_field="uid", reason="prebalanced_out"
    ).kept

    def check_after(after):
        after = dict(after)
        for q, n in ((0, 2700), (1, 300)):
            p = probs[q]
            assert abs(after[q] - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (q, after[q])

    with _pipeline(*args) as p:
        out = (
            p
            | beam.Create(cands)
            | balance.PreBalance(
                config=BalanceConfig(t=30, prebalance_factor=3.0, seed=1), batch_size=batch_size
            )
        )
        assert_that(out["before"], equal_to([(0, 2700), (1, 300)]), label="Before")
        assert_that(out["after"], check_after, label="After")
        assert_that(
            out["kept"] | beam.Map(lambda r: r["uid"]),
            equal_to([r["uid"] for r in expected]),
            label="Kept",
        )
        assert_that(
            out["rejected"] | beam.Map(lambda r: r["reason"]) | beam.combiners.Count.PerElement(),
            equal_to([("prebalanced_out", 3000 - len(expected))]),
            label="Rejected",
        )


def test_query_counts_table_fills_every_column():
    table = balance.query_counts_table(
        {"before": {0: 100, 3: 5}, "after_dedup": {0: 40, 3: 4}, "final": {0: 10, 3: 4}},
        queries=["photo", "b", "c", "okapi"],
        t=20,
        prebalance_factor=2.0,
    )
    assert table.to_pydict() == {
        "query_id": [0, 3],
        "query": ["photo", "okapi"],
        "before": [100, 5],
        "after_prebalance": [None, None],
        "after_download": [None, None],
        "after_dedup": [40, 4],
        "final": [10, 4],
        "p_prebalance": [0.4, 1.0],
        "p_balance": [0.5, 1.0],
    }


def test_write_query_counts_merges_a_base_table(tmp_path):
    base = tmp_path / "base.parquet"
    balance.write_query_counts(
        str(base), balance.query_counts_table({"after_download": {1: 9, 2: 3}})
    )
    queries = tmp_path / "q.txt"
    queries.write_text("zero\none\ntwo\n")
    out = tmp_path / "counts.parquet"
    with _pipeline() as p:
        cols = {
            "after_dedup": p | "D" >> beam.Create([(1, 7), (2, 3)]),
            "final": p | "F" >> beam.Create([(1, 4), (2, 3)]),
        }
        _ = cols | balance.WriteQueryCounts(
            str(out), base=str(base), queries_path=str(queries), t=4
        )
    got = pq.read_table(out).to_pydict()
    assert got["query"] == ["one", "two"]
    assert got["after_download"] == [9, 3]
    assert got["after_dedup"] == [7, 3]
    assert got["final"] == [4, 3]
    assert got["p_balance"] == [4 / 7, 1.0]


# ---------------------------------------------------------------------------------------------
# Per batch (balance_arrays, dict and Arrow) against the per-record reference
# (tests/balance_reference.py)

PAIR_STRUCT = pa.struct(
    [("uid", pa.string()), ("caption", pa.string()), ("query_ids", pa.list_(pa.int32()))]
)
SAMPLE_TABLE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("query_ids", pa.list_(pa.int32())),
        ("pairs", pa.list_(PAIR_STRUCT)),
    ]
)


def _random_query_ids(rng, n_queries=60):
    """0-5 ids from a skewed law, some repeated within the list, in any order."""
    k = rng.choice([0, 1, 1, 1, 2, 2, 3, 4, 5])
    return [min(int(rng.paretovariate(0.8)) - 1, n_queries - 1) for _ in range(k)]


def _random_samples(rng, n, *, uid_missing=0.05):
    out = []
    for i in range(n):
        pairs = []
        for j in range(rng.choice([1, 1, 1, 2, 3])):
            uid = None if rng.random() < uid_missing else f"u{i}-{j}"
            pairs.append({"uid": uid, "caption": f"c{i}-{j}", "query_ids": _random_query_ids(rng)})
        qids = sorted({q for p in pairs for q in p["query_ids"]})
        out.append({"key": f"{i:05x}", "url": f"http://x/{i}", "query_ids": qids, "pairs": pairs})
    return out


def _probabilities(records, t, *, pairs=False):
    from balance_reference import count_queries

    units = [p for r in records for p in r["pairs"]] if pairs else records
    counts = count_queries(units)
    assert balance.count_queries(units) == counts
    return balance.query_probabilities(counts, t), counts


@pytest.mark.parametrize("t", [3, 20, 400])
def test_keep_probabilities_are_bit_identical(t):
    from wit_pipeline.stages import balance_arrays as arrays

    rng = random.Random(t)
    records = [{"query_ids": _random_query_ids(rng)} for _ in range(5000)]
    probs, _ = _probabilities(records, t)
    qids = [r["query_ids"] for r in records]
    got = arrays.keep_probabilities(*arrays.flat_lists(qids), arrays.Probabilities(probs))
    want = [balance.keep_probability(q, probs) for q in qids]
    assert got.tolist() == want  # exact floats, not approximately
    # from the dense counts a Beam side input carries: the same probabilities
    _, counts = _probabilities(records, t)
    dense = np.zeros(max(counts) + 1, np.int64)
    dense[list(counts)] = list(counts.values())
    for tt in (t, t * 2.5):
        table = arrays.Probabilities.from_counts(dense, tt)
        assert table.probs == balance.query_probabilities(counts, tt)
        got = arrays.keep_probabilities(*arrays.flat_lists(qids), table)
        assert got.tolist() == [
            balance.keep_probability(q, balance.query_probabilities(counts, tt)) for q in qids
        ]


@pytest.mark.parametrize("t", [5, 40])
def test_balance_records_equals_the_reference_for_both_phases(t):
    from balance_reference import balance_records

    rng = random.Random(t)
    samples = _random_samples(rng, 3000)
    probs, _ = _probabilities(samples, t)
    for phase, id_field, reason in (
        ("balance", "key", "balanced_out"),
        ("prebalance", "key", "prebalanced_out"),
    ):
        kw = {"seed": 7, "phase": phase, "id_field": id_field, "reason": reason}
        got = balance.balance_records(samples, probs, **kw)
        want = balance_records(samples, probs, **kw)
        assert got.kept == want.kept and got.rejected == want.rejected
        assert 0 < len(got.kept) < len(samples)


@pytest.mark.parametrize("t", [5, 40])
def test_balance_sample_pairs_equals_the_reference(t):
    from balance_reference import balance_sample_pairs

    rng = random.Random(100 + t)
    samples = _random_samples(rng, 2000)
    probs, _ = _probabilities(samples, t, pairs=True)
    kw = {"seed": 3, "phase": "balance", "reason": "balanced_out"}
    got = balance.balance_sample_pairs(samples, probs, **kw)
    want = balance_sample_pairs(samples, probs, **kw)
    assert got.kept == want.kept
    assert got.rejected == want.rejected
    assert got.partial == want.partial and want.partial
    assert got.counts == want.counts


def _as_table(samples):
    return pa.Table.from_pylist(samples, schema=SAMPLE_TABLE_SCHEMA)


def _rows(table):
    """A table's rows as dicts, with the columns the reference's records have."""
    return table.to_pylist()


@pytest.mark.parametrize("t", [5, 40])
def test_arrow_cores_equal_the_reference(t):
    from balance_reference import balance_records, balance_sample_pairs

    from wit_pipeline.stages import balance_arrays as arrays

    rng = random.Random(200 + t)
    samples = _random_samples(rng, 2500)
    table = _as_table(samples)
    records = table.to_pylist()  # the same records as the table holds (null uids as None)
    # image unit and pre-balance: one draw per row
    probs, _ = _probabilities(records, t)
    for phase, id_field in (("balance", "key"), ("prebalance", "url")):
        got = arrays.balance_table(
            table,
            arrays.Probabilities(probs),
            balance.Draws(9, phase),
            id_field=id_field,
            reason="out",
        )
        want = balance_records(records, probs, seed=9, phase=phase, id_field=id_field, reason="out")
        assert _rows(got.kept) == want.kept
        assert _rows(got.rejected) == want.rejected
    # pair unit
    probs, _ = _probabilities(records, t, pairs=True)
    got = arrays.balance_sample_pairs_table(
        table, arrays.Probabilities(probs), balance.Draws(9, "balance"), reason="balanced_out"
    )
    want = balance_sample_pairs(records, probs, seed=9, phase="balance", reason="balanced_out")
    assert _rows(got.kept) == want.kept
    assert _rows(got.rejected) == want.rejected
    assert _rows(got.partial) == want.partial and want.partial
    assert got.counts == want.counts
    # counts per query, over rows and over pairs
    from balance_reference import count_queries

    for pairs in (False, True):
        dense = arrays.count_table(table, pairs=pairs)
        units = [p for r in records for p in r["pairs"]] if pairs else records
        assert {q: int(n) for q, n in enumerate(dense) if n} == dict(count_queries(units))


def _run_and_collect(build, *args):
    """Run ``build(p)`` (a dict of PCollections) and return every output's elements."""
    with tempfile.TemporaryDirectory() as tmp:
        names = []
        with _pipeline(*args) as p:
            for name, pcoll in build(p).items():
                names.append(name)
                _ = (
                    pcoll
                    | f"List[{name}]" >> beam.combiners.ToList()
                    # a lambda travels by value to worker processes (a test module does not)
                    | f"Dump[{name}]"
                    >> beam.Map(
                        lambda items, path: pathlib.Path(path).write_bytes(pickle.dumps(items)),
                        f"{tmp}/{name}.pkl",
                    )
                )
        out = {}
        for name in names:
            with open(f"{tmp}/{name}.pkl", "rb") as f:
                out[name] = pickle.load(f)
        return out


def _rows_of(elements):
    rows = []
    for x in elements:
        rows.extend(x.to_pylist() if isinstance(x, pa.Table) else [x])
    return sorted(rows, key=repr)


def _balance_outputs(out):
    return {
        "kept": _rows_of(out["kept"]),
        "rejected": _rows_of(out["rejected"]),
        "counts": sorted(out["counts"]),
        "before": sorted(out["before"]),
        "after": sorted(out["after"]),
    }


@pytest.mark.parametrize(
    ("unit", "args", "batch_size"),
    [("image", (), 4096), ("image", (), 7), ("pair", (), 64), ("pair", *RUNNER_SETTINGS[4])],
)
def test_balance_samples_on_tables_equals_dict_records(unit, args, batch_size):
    """Arrow batches through Beam: the same kept samples (pairs, captions, probabilities),
    rejected rows, counts and per-query counts as dict records, on several runners."""
    samples = _random_samples(random.Random(5), 600)
    table = pa.Table.from_pylist(samples, schema=SAMPLE_TABLE_SCHEMA)
    records = table.to_pylist()
    parts = [table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size)]
    cfg = BalanceConfig(t=30, seed=5, unit=unit)

    def dicts(p):
        out = p | beam.Create(records) | balance.BalanceSamples(config=cfg)
        return {**out, "counts": out["counts"] | "Sum" >> beam.CombinePerKey(sum)}

    def tables(p):
        out = p | beam.Create(parts) | balance.BalanceSamples(config=cfg, tables=True)
        return {**out, "counts": out["counts"] | "Sum" >> beam.CombinePerKey(sum)}

    want = _balance_outputs(_run_and_collect(dicts))
    got = _balance_outputs(_run_and_collect(tables, *args))
    assert 50 < len(want["kept"]) < len(records) and want["rejected"]
    assert got == want


def test_prebalance_on_tables_equals_dict_records():
    rng = random.Random(8)
    cands = [
        {"uid": f"u{i}", "url": f"http://x/{i}", "query_ids": _random_query_ids(rng)}
        for i in range(3000)
    ]
    schema = pa.schema(
        [("uid", pa.string()), ("url", pa.string()), ("query_ids", pa.list_(pa.int32()))]
    )
    table = pa.Table.from_pylist(cands, schema=schema)
    parts = [table.slice(i, 500) for i in range(0, 3000, 500)]
    cfg = BalanceConfig(t=20, prebalance_factor=2.0, seed=1)

    def dicts(p):
        out = p | beam.Create(table.to_pylist()) | balance.PreBalance(config=cfg)
        return {**out, "counts": out["counts"] | "Sum" >> beam.CombinePerKey(sum)}

    def tables(p):
        out = p | beam.Create(parts) | balance.PreBalance(config=cfg, tables=True)
        return {**out, "counts": out["counts"] | "Sum" >> beam.CombinePerKey(sum)}

    want = _balance_outputs(_run_and_collect(dicts))
    got = _balance_outputs(_run_and_collect(tables))
    assert 100 < len(want["kept"]) < 2900
    assert got == want


def test_distinct_values_skip_sorting_only_where_every_list_increases():
    from wit_pipeline.stages import balance_arrays as arrays

    cases = [
        ([[1, 2], [0, 5], [], [3]], [1, 2, 0, 5, 3]),  # increasing within each list
        ([[], [4], [], [1, 4]], [4, 1, 4]),  # empty lists at both ends of a step
        ([[2, 2], [7]], [2, 7]),  # a repeat is not an increase
        ([[5, 1, 5], [3, 0]], [1, 5, 0, 3]),  # unsorted: sorted and made distinct
        ([], []),
    ]
    for lists, want in cases:
        values, offsets = arrays.flat_lists(lists)
        assert arrays.distinct_values(values, offsets).tolist() == want
        counts = arrays.count_arrays(values, offsets)
        assert {q: int(n) for q, n in enumerate(counts) if n} == dict(collections.Counter(want))


def _write_samples(directory, samples, *, files, row_group_size, compliant):
    table = pa.Table.from_pylist(samples, schema=SAMPLE_TABLE_SCHEMA)
    per_file = -(-table.num_rows // files)
    for i in range(files):
        part = table.slice(i * per_file, per_file)
        pq.write_table(
            part,
            f"{directory}/part-{i}.parquet",
            row_group_size=row_group_size,
            use_compliant_nested_type=compliant,
        )
    return table


@pytest.mark.parametrize("compliant", [True, False])
def test_read_query_ids_reads_only_the_query_columns_of_every_row_group(tmp_path, compliant):
    samples = _random_samples(random.Random(2), 50)
    table = _write_samples(tmp_path, samples, files=2, row_group_size=10, compliant=compliant)
    for pairs in (False, True):
        out = _run_and_collect(
            lambda p, pairs=pairs: {
                "ids": p | balance.ReadQueryIds(file_pattern=f"{tmp_path}/*.parquet", pairs=pairs)
            }
        )["ids"]
        assert len(out) == 6  # 25 rows per file, row groups of 10: 3 per file
        want_columns = ["pairs"] if pairs else ["query_ids"]
        assert all(t.column_names == want_columns for t in out)
        if pairs:
            got = sorted(p["query_ids"] for t in out for r in t.to_pylist() for p in r["pairs"])
            want = sorted(p["query_ids"] for p in table.column("pairs").to_pylist() for p in p)
            assert out[0].schema.field("pairs").type.value_type.names == ["query_ids"]
        else:
            got = sorted(r["query_ids"] for t in out for r in t.to_pylist())
            want = sorted(table.column("query_ids").to_pylist())
        assert got == want
    pq.write_table(pa.table({"key": ["a"]}), f"{tmp_path}/other.pq")
    for pairs in (False, True):
        with pytest.raises(WitError, match=r"no .*query_ids column"):
            balance_reads.query_id_columns(
                pq.ParquetFile(f"{tmp_path}/other.pq").schema, pairs=pairs
            )
    with pytest.raises(ValueError, match="file_pattern"):
        balance.ReadQueryIds(file_pattern="")


@pytest.mark.parametrize(
    ("unit", "args"), [("image", ()), ("pair", ()), ("image", RUNNER_SETTINGS[4][0])]
)
def test_balance_sample_files_equals_balance_samples_over_dict_records(tmp_path, unit, args):
    """Counted from a read of the query ids, drawn over a second read: the same outputs as
    one PCollection of dict records (which Beam materializes between counting and drawing)."""
    samples = _random_samples(random.Random(6), 700)
    table = _write_samples(tmp_path, samples, files=3, row_group_size=64, compliant=False)
    cfg = BalanceConfig(t=30, seed=5, unit=unit)

    def dicts(p):
        records = p | beam.Create(table.to_pylist())
        out = records | balance.BalanceSamples(config=cfg)
        # the files transform is where samples enter: it also counts them
        entered = records | stage.CountRecords("input", pairs=True)
        counts = (out["counts"], entered) | beam.Flatten()
        return {**out, "counts": counts | "Sum" >> beam.CombinePerKey(sum)}

    def files(p):
        out = p | balance.BalanceSampleFiles(file_pattern=f"{tmp_path}/*.parquet", config=cfg)
        return {**out, "counts": out["counts"] | "Sum" >> beam.CombinePerKey(sum)}

    want = _balance_outputs(_run_and_collect(dicts))
    got = _balance_outputs(_run_and_collect(files, *args))
    assert 50 < len(want["kept"]) < len(samples) and want["rejected"]
    assert got == want


def test_counting_flushes_held_ids_without_changing_the_counts(monkeypatch):
    """Query ids held past ``FLUSH_IDS`` are added up early: the same counts."""
    samples = _random_samples(random.Random(4), 300)
    table = pa.Table.from_pylist(samples, schema=SAMPLE_TABLE_SCHEMA)
    parts = [table.slice(i, 16) for i in range(0, table.num_rows, 16)]
    want = collections.Counter(q for s in samples for q in s["query_ids"])

    def counts(p):
        return {"n": p | beam.Create(parts) | balance.CountQueries(tables=True)}

    for flush in (1 << 22, 5):
        monkeypatch.setattr(balance._CountBatchFn, "FLUSH_IDS", flush)
        assert dict(_run_and_collect(counts)["n"]) == dict(want)


def test_prebalance_counted_from_query_ids_equals_one_read(tmp_path):
    rng = random.Random(9)
    schema = pa.schema(
        [("uid", pa.string()), ("url", pa.string()), ("query_ids", pa.list_(pa.int32()))]
    )
    cands = [
        {"uid": f"u{i}", "url": f"http://x/{i}", "query_ids": _random_query_ids(rng)}
        for i in range(2000)
    ]
    table = pa.Table.from_pylist(cands, schema=schema)
    pq.write_table(table.slice(0, 900), f"{tmp_path}/a.parquet", row_group_size=300)
    pq.write_table(table.slice(900), f"{tmp_path}/b.parquet", row_group_size=500)
    cfg = BalanceConfig(t=20, prebalance_factor=2.0, seed=1)
    pattern = f"{tmp_path}/*.parquet"

    def one_read(p):
        out = p | beam.Create(cands) | balance.PreBalance(config=cfg)
        return {**out, "counts": out["counts"] | "Sum" >> beam.CombinePerKey(sum)}

    def two_reads(p):
        inputs = {
            "records": p | beam.io.ReadFromParquetBatched(pattern),
            "query_ids": p | balance.ReadQueryIds(file_pattern=pattern),
        }
        out = inputs | balance.PreBalance(config=cfg, tables=True)
        return {**out, "counts": out["counts"] | "Sum" >> beam.CombinePerKey(sum)}

    want = _balance_outputs(_run_and_collect(one_read))
    got = _balance_outputs(_run_and_collect(two_reads))
    assert 100 < len(want["kept"]) < 1900
    assert got == want
    with pytest.raises(ValueError, match="expected"):
        _run_and_collect(
            lambda p: {"x": {"samples": p | beam.Create([])} | balance.PreBalance(config=cfg)}
        )
